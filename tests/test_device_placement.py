"""Every model of every command runs on the run's device: a device spy on CPU.

The trick: CPU tensors and modules report ``cpu`` whatever device index they were
moved to, so a CPU-only test cannot tell "moved to the run's device" from "left
where it was loaded" by reading ``.device``. The spy therefore

* makes the run's device a sentinel, ``torch.device("cpu", 7)``: ``Accelerator.device``
  returns it (``accelerate.prepare`` and our code move models there), and the
  ``RVQA`` API is given it as ``device=``;
* records, through ``nn.Module.to`` / ``.cpu`` / ``.cuda``, the device each module was
  last moved to (a tag on the module and its submodules);
* records, through a global forward pre-hook, every forward of every module with
  parameters: its tag and the devices of its tensor inputs.

A test then asserts that every forward ran on a module moved to the sentinel. (The
inputs' devices are recorded too, but on CPU every tensor reports ``cpu``, so only
the modules' placement is really checked here; inputs follow the model's
``.device`` in the code, and a batch left behind on a GPU run fails in torch.) A
command that forgets
``model.to(accelerator.device)`` (build-index, evaluate-retriever, the test
evaluation of train-retriever and the retrieval pass of train-reader did, before
issue 17) runs its towers on untagged modules, and fails here. On a GPU the same
omission leaves the towers on the CPU.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from accelerate import Accelerator

from rvqa.config import load_config
from rvqa.distributed import placement_line
from rvqa.retriever.modeling import RetrieverModel
from rvqa.run_layout import retriever_dir

SENTINEL = torch.device("cpu", 7)
PLACEMENT = re.compile(r"rvqa placement: stage=(\S+) rank=(\d+)/(\d+)((?: \S+=\S+)+)$")


class DeviceSpy:
    """Forwards seen: (module class, device it was moved to, input tensor devices)."""

    def __init__(self) -> None:
        self.forwards: list[tuple[str, torch.device | None, set[str], str]] = []

    def misplaced(self) -> list[tuple]:
        return [f for f in self.forwards if f[1] != SENTINEL or f[2] - {f[3]}]

    def classes(self) -> set[str]:
        return {f[0] for f in self.forwards}

    def clear(self) -> None:
        self.forwards.clear()


@pytest.fixture
def spy(monkeypatch):
    real_to, real_cpu, real_cuda = torch.nn.Module.to, torch.nn.Module.cpu, torch.nn.Module.cuda

    def tag(module: torch.nn.Module, device: torch.device) -> None:
        for m in module.modules():
            m.__dict__["_spy_device"] = device

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            tag(self, torch.device(device))
        return real_to(self, *args, **kwargs)

    def cpu(self):
        tag(self, torch.device("cpu"))
        return real_cpu(self)

    def cuda(self, device=None):
        tag(self, torch.device("cuda", device or 0))
        return real_cuda(self, device)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(torch.nn.Module, "cpu", cpu)
    monkeypatch.setattr(torch.nn.Module, "cuda", cuda)
    monkeypatch.setattr(Accelerator, "device", property(lambda self: SENTINEL))
    seen = DeviceSpy()

    def hook(module, args):
        params = list(module.parameters(recurse=False))
        if params:
            inputs = {str(a.device) for a in args if torch.is_tensor(a)}
            seen.forwards.append(
                (
                    type(module).__name__,
                    module.__dict__.get("_spy_device"),
                    inputs,
                    str(params[0].device),
                )
            )

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _placements(caplog, stage: str) -> list[dict[str, str]]:
    out = []
    for rec in caplog.records:
        m = PLACEMENT.search(rec.getMessage())
        if m and m.group(1) == stage:
            out.append(dict(kv.split("=", 1) for kv in m.group(4).split()))
    return out


def _assert_all_on_sentinel(spy: DeviceSpy, must_run: set[str]) -> None:
    assert spy.forwards, "no module ran"
    assert must_run <= spy.classes(), spy.classes()
    bad = spy.misplaced()
    assert not bad, f"{len(bad)} forwards on modules not moved to the run's device: {bad[:3]}"


def test_spy_catches_a_model_left_where_it_was_loaded(tiny_run, spy):
    """The spy's own check: a retriever used without .to(run device) is reported."""
    model = RetrieverModel.from_pretrained(tiny_run / "retriever" / "final")
    model.embed_texts(["a red circle"])
    assert spy.misplaced() and {f[1] for f in spy.misplaced()} == {None}
    spy.clear()
    model.to(SENTINEL).embed_texts(["a red circle"])
    assert spy.forwards and not spy.misplaced()


def test_build_index_encodes_on_the_run_device(tiny_run, spy, tmp_path, caplog):
    from rvqa.indexing import build_index_from_config

    cfg = load_config(tiny_run / "retriever" / "config.yaml")
    with caplog.at_level(logging.INFO, logger="rvqa.placement"):
        path = build_index_from_config(
            cfg, retriever=tiny_run / "retriever" / "final", out=tmp_path / "idx"
        )
    assert (path / "manifest.json").is_file()
    _assert_all_on_sentinel(spy, {"Embedding", "Linear"})  # the text tower and projection
    assert _placements(caplog, "build-index") == [{"retriever": "cpu", "index.idx": "faiss-cpu"}]


def test_evaluate_retriever_runs_on_the_run_device(tiny_run, spy, caplog):
    from rvqa.evaluation import evaluate_retriever_split

    cfg = load_config(tiny_run / "retriever" / "config.yaml")
    with caplog.at_level(logging.INFO, logger="rvqa.placement"):
        metrics = evaluate_retriever_split(tiny_run / "retriever" / "final", cfg, split="test")
    assert 0 <= metrics["i2t_r1"] <= 100
    _assert_all_on_sentinel(spy, {"Conv2d", "Embedding"})  # both towers
    assert _placements(caplog, "evaluate-retriever") == [{"retriever": "cpu"}]


def test_train_retriever_test_evaluation_of_best_on_the_run_device(
    tmp_path, spy, monkeypatch, caplog
):
    """best/ is reloaded with from_pretrained for the test split: it must be moved too."""
    from rvqa.retriever import train as retriever_train
    from tests.tiny import tiny_run_config

    cfg = tiny_run_config(tmp_path, **{"retriever.test_split": "test", "retriever.eval_every": 2})
    real = retriever_train.load_caption_split
    monkeypatch.setattr(  # a small test split: 12 captions
        retriever_train,
        "load_caption_split",
        lambda src, split: real(src, split)[:12] if split == "test" else real(src, split),
    )
    loaded = []
    real_load = RetrieverModel.from_pretrained.__func__

    def spy_load(cls, path, *a, **kw):
        loaded.append(str(path))
        return real_load(cls, path, *a, **kw)

    monkeypatch.setattr(RetrieverModel, "from_pretrained", classmethod(spy_load))
    with caplog.at_level(logging.INFO, logger="rvqa.placement"):
        out = retriever_train.train_retriever(cfg)
    assert out["test"] is not None and out["model_dir"].name == "best"
    assert loaded == [str(out["model_dir"])]  # the test evaluation used the reloaded best/
    _assert_all_on_sentinel(spy, {"Conv2d", "Embedding"})
    assert _placements(caplog, "train-retriever") == [{"retriever": "cpu"}]


def test_train_reader_retrieval_and_training_on_the_run_device(tmp_path, tiny_run, spy, caplog):
    from rvqa.reader.train import train_reader
    from tests.tiny import tiny_run_config

    cfg = tiny_run_config(tmp_path, **{"reader.max_steps": 1, "reader.eval_every": 0})
    cfg.index.path = str(tiny_run.parent / "indices" / "tiny-captions")
    trained = retriever_dir(tiny_run)  # the retriever the run's index was built with
    (tmp_path / "run" / "retriever").mkdir(parents=True)
    (tmp_path / "run" / "retriever" / trained.name).symlink_to(trained)
    with caplog.at_level(logging.INFO, logger="rvqa.placement"):
        train_reader(cfg)
    # Conv2d: the retriever's image tower (retrieval pass; the reader shares it).
    _assert_all_on_sentinel(spy, {"Conv2d", "Embedding"})
    lines = _placements(caplog, "train-reader")
    assert lines == [
        {"retriever": "cpu", "index.tiny-captions": "faiss-cpu"},
        {"reader": "cpu"},
    ]


def test_rvqa_api_and_evaluate_on_the_given_device(tiny_run, spy, tmp_path, caplog):
    from rvqa import RVQA
    from rvqa.evaluation import evaluate_split
    from tests.tiny import draw_shape

    model = RVQA.from_pretrained(tiny_run, device=SENTINEL)
    out = model.answer(draw_shape("red", "circle"), "what color is the shape?")
    assert out.evidence
    _assert_all_on_sentinel(spy, {"Conv2d", "Embedding"})
    spy.clear()
    with caplog.at_level(logging.INFO, logger="rvqa.placement"):
        evaluate_split(tiny_run, tmp_path / "eval", max_questions=8, device=SENTINEL)
    _assert_all_on_sentinel(spy, {"Conv2d", "Embedding"})
    assert _placements(caplog, "evaluate") == [
        {"retriever": "cpu", "reader": "cpu", "index.tiny-captions": "faiss-cpu"}
    ]


def test_placement_line_format():
    class Idx:
        on_gpu = True

    lin = torch.nn.Linear(2, 2)
    line = placement_line("ask", 1, 4, {"retriever": lin, "index.coco": Idx(), "x": "cuda:3"})
    assert line == "rvqa placement: stage=ask rank=1/4 retriever=cpu index.coco=faiss-gpu x=cuda:3"
    assert PLACEMENT.search(line)


@pytest.mark.slow
def test_two_process_build_index_logs_each_rank(tiny_run, tmp_path):
    """Under a 2-process launch every rank encodes its shard and logs its placement."""
    from tests.tiny import run_two_cpu_processes

    config = tiny_run / "retriever" / "config.yaml"
    args = ["-m", "rvqa", "build-index", "--config", str(config)]
    args += ["--retriever", str(tiny_run / "retriever" / "final"), "--out", str(tmp_path / "ix")]
    proc = run_two_cpu_processes(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(m.group(2, 3) for m in map(PLACEMENT.search, proc.stderr.splitlines()) if m)
    assert ranks == [("0", "2"), ("1", "2")], proc.stderr[-2000:]
    assert "index.ix=faiss-cpu" in proc.stderr
