"""GPU FAISS on request: ``use_gpu`` reaches every index load, falls back once, serialises.

No GPU here, so faiss's GPU entry points are replaced by a fake (``FakeGpu``) that
wraps the CPU index and detects overlapping calls: what the code under test sends
to the GPU, and whether two threads ever search the GPU at once, is observable.
"""

from __future__ import annotations

import logging
import threading
import time

import faiss
import pytest

from rvqa.errors import RVQAError
from rvqa.retriever.index import IndexRegistry, KnowledgeIndex, knowledge_index
from rvqa.run_layout import retriever_dir
from tests.index_helpers import build_arrays, unit_rows


class FakeGpuIndex:
    """A "GPU" index: the CPU index, with a check that no two calls overlap."""

    def __init__(self, cpu: faiss.Index, detector: Detector):
        self.cpu, self.detector = cpu, detector
        self.ntotal, self.d = cpu.ntotal, cpu.d

    def search(self, xq, k):
        with self.detector:
            return self.cpu.search(xq, k)


class Detector:
    """Counts calls in flight; remembers the most seen at once."""

    def __init__(self) -> None:
        self.active = self.most = self.calls = 0
        self.lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            self.active += 1
            self.calls += 1
            self.most = max(self.most, self.active)
        time.sleep(0.002)  # releases the GIL: unserialised callers would overlap here

    def __exit__(self, *exc):
        with self.lock:
            self.active -= 1


class FakeClonerOptions:
    shard = False


@pytest.fixture
def fake_gpu(monkeypatch):
    """faiss with 2 fake GPUs; records every clone (options and GPU list)."""
    detector = Detector()
    clones: list[dict] = []

    def to_all(index, co=None, ngpu=-1):
        with detector:
            clones.append({"shard": co.shard, "gpus": None})
        return FakeGpuIndex(index, detector)

    def to_list(index, co=None, gpus=None, ngpu=-1):
        with detector:
            clones.append({"shard": co.shard, "gpus": list(gpus)})
        return FakeGpuIndex(index, detector)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", FakeClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpus_list", to_list, raising=False)
    return detector, clones


@pytest.fixture(scope="module")
def two_indices(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    x1, x2 = unit_rows(500, 16, seed=3), unit_rows(400, 16, seed=4)
    a = build_arrays(root, x1, name="a", embeddings_dtype="float32")
    b = build_arrays(root, x2, name="b", ids=list(range(1000, 1400)), embeddings_dtype="float32")
    return a, b, unit_rows(64, 16, seed=5)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the CPU fallback")
def test_without_gpus_one_warning_and_cpu_results(two_indices, monkeypatch, caplog):
    a, b, q = two_indices
    monkeypatch.setattr(knowledge_index, "_warned_no_gpu", False)
    with caplog.at_level(logging.WARNING, logger="rvqa.retriever.index"):
        first = KnowledgeIndex.load(a, use_gpu=True)
        KnowledgeIndex.load(b, use_gpu=True)
        IndexRegistry(use_gpu=True).load(a)
        first.set_search_params()  # a new state: moved again, no second warning
    warnings = [r for r in caplog.records if "no GPU" in r.getMessage()]
    assert len(warnings) == 1 and "searching on CPU" in warnings[0].getMessage()
    assert not first.on_gpu
    assert first.search(q, 3) == KnowledgeIndex.load(a).search(q, 3)


def test_gpu_index_is_sharded_and_searches_equal_cpu(two_indices, fake_gpu):
    a, _, q = two_indices
    detector, clones = fake_gpu
    gpu = KnowledgeIndex.load(a, use_gpu=True)
    assert gpu.on_gpu and clones == [{"shard": True, "gpus": None}]
    assert gpu.search(q, 5) == KnowledgeIndex.load(a).search(q, 5)
    assert detector.calls == 2  # the clone and one search
    KnowledgeIndex.load(a, use_gpu=True, gpus=[1])
    assert clones[-1] == {"shard": True, "gpus": [1]}


def test_concurrent_gpu_searches_are_serialised(two_indices, fake_gpu):
    """Threads searching one GPU index, a merged registry search over two, and an
    add that re-clones to the GPU meanwhile: the fake GPU never sees two calls at once."""
    a, b, q = two_indices
    detector, _ = fake_gpu
    ix_a = KnowledgeIndex.load(a, use_gpu=True)
    registry = IndexRegistry(use_gpu=True)
    registry.register("a", ix_a)
    registry.load(b, name="b")
    want_a = KnowledgeIndex.load(a).search(q, 4)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                if i % 3 == 0:
                    assert ix_a.search(q, 4)[:64] == want_a or len(ix_a) > 500
                elif i % 3 == 1:
                    assert len(registry.search(q, 4)) == len(q)
                else:
                    ix_a.set_search_params()  # rebuilds the state: a new GPU clone
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert detector.calls > 40 and detector.most == 1


def test_the_detector_sees_unserialised_calls(two_indices, fake_gpu):
    """The check above can fail: calling the fake GPU index without the lock overlaps."""
    a, _, q = two_indices
    detector, _ = fake_gpu
    raw = KnowledgeIndex.load(a, use_gpu=True)._state.index  # bypasses KnowledgeIndex.search
    threads = [
        threading.Thread(target=lambda: [raw.search(q, 2) for _ in range(5)]) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert detector.most > 1


# --------------------------------------------------------------------------- entry points


class _Stop(RVQAError):
    """Raised by the spy to end a command right after its index load."""


@pytest.fixture
def load_spy(monkeypatch):
    """Records the use_gpu / gpus of every KnowledgeIndex.load (and loads normally)."""
    seen: list[tuple] = []
    real = KnowledgeIndex.load.__func__

    def load(cls, path, *args, **kwargs):
        seen.append((kwargs.get("use_gpu", False), kwargs.get("gpus")))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(KnowledgeIndex, "load", classmethod(load))
    monkeypatch.setattr(knowledge_index, "_warned_no_gpu", True)  # quiet fallback
    return seen


def test_use_gpu_reaches_load_from_the_api(tiny_run, load_spy, two_indices):
    from rvqa import RVQA

    index_dir = tiny_run.parent / "indices" / "tiny-captions"
    model = RVQA.from_pretrained(tiny_run, use_gpu=True, device="cpu")
    assert load_spy == [(True, None)] and model.use_gpu
    model.use_indices([index_dir])  # swaps the run's own index: the model's default
    model.use_indices([index_dir], use_gpu=False)
    model.load_index(index_dir, name="again")
    assert load_spy[1:] == [(True, None), (False, None), (True, None)]
    plain = RVQA.from_pretrained(tiny_run, device="cpu")
    assert load_spy[-1] == (False, None) and plain.placement()["index.tiny-captions"] == "faiss-cpu"
    load_spy.clear()
    IndexRegistry(use_gpu=True, gpus=[0]).load(two_indices[0])
    IndexRegistry().load(two_indices[0], use_gpu=True)
    assert load_spy == [(True, [0]), (True, None)]


def test_use_gpu_reaches_load_from_every_cli_command(
    tiny_run, load_spy, tmp_path, capsys, monkeypatch
):
    from rvqa.cli import main
    from tests.tiny import draw_shape

    image = tmp_path / "shape.png"
    draw_shape("red", "circle").save(image)
    index_dir = tiny_run.parent / "indices" / "tiny-captions"
    ask = ["ask", "--model", str(tiny_run), "--image", str(image), "--question", "what color?"]
    assert main([*ask, "--gpu-index"]) == 0
    assert main(ask) == 0
    assert load_spy == [(True, None), (False, None)]
    load_spy.clear()
    ev = ["evaluate", "--model", str(tiny_run), "--max-questions", "4"]
    assert main([*ev, "--gpu-index", "--out", str(tmp_path / "e1")]) == 0
    assert main([*ev, "--set", "index.use_gpu=true", "--out", str(tmp_path / "e2")]) == 0
    assert main([*ev, "--out", str(tmp_path / "e3")]) == 0
    assert load_spy == [(True, None), (True, None), (False, None)]
    load_spy.clear()
    assert main(["index-info", str(index_dir), "--gpu-index"]) == 0
    assert load_spy == [(True, None)]
    capsys.readouterr()

    # train-reader: stop right after its index load (the retrieval pass follows it).
    def stop(cls, path, *args, **kwargs):
        load_spy.append((kwargs.get("use_gpu", False), kwargs.get("gpus")))
        raise _Stop("stopped after the index load")

    monkeypatch.setattr(KnowledgeIndex, "load", classmethod(stop))
    config = tiny_run / "reader" / "config.yaml"  # read only: the run goes elsewhere
    trained = retriever_dir(tiny_run)
    (tmp_path / "run" / "retriever").mkdir(parents=True)
    (tmp_path / "run" / "retriever" / trained.name).symlink_to(trained)
    out = ["--output-dir", str(tmp_path / "run")]
    load_spy.clear()
    assert main(["train-reader", "--config", str(config), *out, "--gpu-index"]) == 1
    assert main(["train-reader", "--config", str(config), *out]) == 1
    assert "stopped after the index load" in capsys.readouterr().err
    assert load_spy == [(True, None), (False, None)]


def test_use_gpu_reaches_the_automatic_index_choice_of_build_index(tiny_run, tmp_path, monkeypatch):
    """``index.use_gpu`` reaches build-index, whose automatic choice then skips HNSW (no faiss
    GPU version; tests/test_index_factory.py shows the tiers)."""
    import rvqa.indexing
    from rvqa.config import load_config

    spy = _BuildSpy(rvqa.indexing)
    monkeypatch.setattr(rvqa.indexing, "build_index", spy)
    cfg = load_config(tiny_run / "retriever" / "config.yaml")
    for use_gpu in (False, True):
        cfg.index.use_gpu = use_gpu
        path = rvqa.indexing.build_index_from_config(
            cfg, retriever=tiny_run / "retriever" / "final", out=tmp_path / f"idx-{use_gpu}"
        )
        assert KnowledgeIndex.load(path).manifest["factory"] == "Flat"  # 36 captions
    assert spy.for_gpu == [False, True]


class _BuildSpy:
    def __init__(self, module):
        self.real, self.for_gpu = module.build_index, []

    def __call__(self, *args, **kwargs):
        self.for_gpu.append(kwargs.get("for_gpu"))
        return self.real(*args, **kwargs)
