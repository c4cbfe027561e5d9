"""Retrieval results for reader training: sharded, stored as arrays, reused, kill-safe."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from rvqa.reader.retrieval import RetrievedCaptions, index_fingerprint, retrieve_for_images
from rvqa.retriever.index import KnowledgeIndex, build_index
from rvqa.retriever.modeling import RetrieverModel
from rvqa.run_layout import retriever_dir
from tests.tiny import run_two_cpu_processes

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, K = 12, 3

# The script of the subprocess tests: retriever, index and cache folders, mode, N_IMAGES, K.
SCRIPT = r"""
import json, sys, time
import easy_vqa
import numpy as np
from rvqa.reader import retrieval
from rvqa.retriever.index import KnowledgeIndex
from rvqa.retriever.modeling import RetrieverModel

ret_dir, index_dir, cache_dir, mode, N_IMAGES, K = sys.argv[1:5] + list(map(int, sys.argv[5:7]))
retriever = RetrieverModel.from_pretrained(ret_dir)
index = KnowledgeIndex.load(index_dir, retriever=retriever)
paths = [p for _, p in sorted(easy_vqa.get_train_image_paths().items())][:N_IMAGES]
images = {str(i): p for i, p in enumerate(paths)}
encoded = [0]
encode = RetrieverModel.encode_images
def counting(self, pixel_values):
    encoded[0] += len(pixel_values)
    return encode(self, pixel_values)
RetrieverModel.encode_images = counting
accelerator = None
if mode == "killed":
    save = np.save
    def slow_save(path, arr, **kw):
        save(path, arr, **kw)
        if str(path).endswith("rows.npy"):  # half of the entry is on disk
            print("WRITING", flush=True)
            time.sleep(300)
    np.save = slow_save
else:
    from accelerate import Accelerator
    accelerator = Accelerator()
    assert accelerator.num_processes == 2, accelerator.num_processes
out = retrieval.retrieve_for_images(
    retriever, index, images, K, cache_dir=cache_dir, accelerator=accelerator, show_progress=False
)
rank = accelerator.process_index
with open(f"{cache_dir}/rank{rank}.json", "w") as f:
    json.dump({"encoded": encoded[0], "result": {k: out[k] for k in out}}, f)
accelerator.end_training()
"""


@pytest.fixture(scope="module")
def setup(tiny_run):
    import easy_vqa

    ret_dir = retriever_dir(tiny_run)
    retriever = RetrieverModel.from_pretrained(ret_dir)
    index_dir = tiny_run.parent / "indices" / "tiny-captions"
    index = KnowledgeIndex.load(index_dir, retriever=retriever)
    paths = [p for _, p in sorted(easy_vqa.get_train_image_paths().items())][:N_IMAGES]
    images = {str(i): p for i, p in enumerate(paths)}
    want = {
        key: [(c, s, i) for c, s, i in zip(r.captions, r.scores, r.ids)]
        for key, r in zip(images, index.search(retriever.embed_images(paths), K))
    }
    return ret_dir, index_dir, retriever, index, images, want


@pytest.fixture
def encoded(monkeypatch):
    """How many images went through the retriever's image tower."""
    count = [0]
    encode = RetrieverModel.encode_images

    def counting(self, pixel_values):
        count[0] += len(pixel_values)
        return encode(self, pixel_values)

    monkeypatch.setattr(RetrieverModel, "encode_images", counting)
    return count


def _same(got: Mapping, want: dict) -> None:
    assert list(got) == list(want)
    for key in want:
        assert [(c, i) for c, _, i in got[key]] == [(c, i) for c, _, i in want[key]], key
        assert [s for _, s, _ in got[key]] == pytest.approx([s for _, s, _ in want[key]], abs=1e-5)


def test_result_equals_direct_search_as_a_lazy_mapping(setup, tmp_path):
    _, _, retriever, index, images, want = setup
    got = retrieve_for_images(retriever, index, images, K, cache_dir=tmp_path, num_workers=1)
    assert isinstance(got, RetrievedCaptions) and isinstance(got, Mapping)
    _same(got, want)
    assert got.rows.shape == (N_IMAGES, K) and got.rows.dtype == np.int64
    assert got.get("no such image", []) == []
    # Picklable for DataLoader workers: the copy reopens the index folder itself.
    copy = pickle.loads(pickle.dumps(got))
    assert copy._store.index is None
    _same(copy, want)
    (entry,) = tmp_path.glob("retrieval-*")
    assert sorted(p.name for p in entry.iterdir()) == [
        "keys.json",
        "meta.json",
        "rows.npy",
        "scores.npy",
    ]


def test_cache_reused_extended_and_keyed(setup, tmp_path, encoded):
    _, _, retriever, index, images, want = setup
    first = dict(list(images.items())[:8])
    retrieve_for_images(retriever, index, first, K, cache_dir=tmp_path)
    assert encoded[0] == 8
    again = retrieve_for_images(retriever, index, first, K, cache_dir=tmp_path)
    assert encoded[0] == 8  # reused: no image encoded
    _same(again, {k: want[k] for k in first})
    # More images: only the new ones are encoded; the entry is rewritten with all.
    _same(retrieve_for_images(retriever, index, images, K, cache_dir=tmp_path), want)
    assert encoded[0] == 8 + (N_IMAGES - 8)
    # A subset, in another order: served from the cache.
    sub = {k: images[k] for k in ["5", "1"]}
    _same(
        retrieve_for_images(retriever, index, sub, K, cache_dir=tmp_path), {k: want[k] for k in sub}
    )
    assert encoded[0] == N_IMAGES
    # Another k, other exclusions, another retriever: other entries.
    retrieve_for_images(retriever, index, images, K - 1, cache_dir=tmp_path)
    retrieve_for_images(retriever, index, images, K, cache_dir=tmp_path, exclude_ids={"0": {-1}})
    assert encoded[0] == 3 * N_IMAGES
    other = RetrieverModel.from_pretrained(setup[0])
    with torch.no_grad():
        other.vision_projection.weight.mul_(1.01)
    retrieve_for_images(other, index, images, K, cache_dir=tmp_path)
    assert encoded[0] == 4 * N_IMAGES
    # A rebuilt index (other contents, same folder name): another entry.
    _, captions = index.lookup(range(20))
    rebuilt = KnowledgeIndex.load(
        build_index(retriever, captions, tmp_path / "ix" / index.name, show_progress=False)
    )
    assert index_fingerprint(rebuilt) != index_fingerprint(index)
    retrieve_for_images(retriever, rebuilt, images, K, cache_dir=tmp_path)
    assert encoded[0] == 5 * N_IMAGES
    assert len(list(tmp_path.glob("retrieval-*"))) == 5


def test_own_captions_excluded(setup):
    _, _, retriever, index, images, want = setup
    own = {want["0"][0][2], want["0"][1][2]}
    got = retrieve_for_images(retriever, index, images, K, exclude_ids={"0": own})
    ids = [i for _, _, i in got["0"]]
    assert len(ids) == K and not own & set(ids)
    full = retrieve_for_images(retriever, index, {"0": images["0"]}, K + 2)["0"]
    assert ids == [i for _, _, i in full if i not in own][:K]
    _same({k: got[k] for k in images if k != "0"}, {k: want[k] for k in images if k != "0"})


def test_unreadable_entry_is_rebuilt(setup, tmp_path, encoded, caplog):
    _, _, retriever, index, images, want = setup
    retrieve_for_images(retriever, index, images, K, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("retrieval-*")
    np.save(entry / "rows.npy", np.zeros((2, K), dtype=np.int64))  # wrong shape
    _same(retrieve_for_images(retriever, index, images, K, cache_dir=tmp_path), want)
    assert encoded[0] == 2 * N_IMAGES and "unreadable" in caplog.text


def test_writer_killed_mid_write_leaves_nothing_that_loads(setup, tmp_path, encoded):
    """SIGKILL while the entry is half written: the next run rebuilds, the one after reuses."""
    ret_dir, index_dir, retriever, index, images, want = setup
    script = tmp_path / "retrieve.py"
    script.write_text(SCRIPT)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(ret_dir),
            str(index_dir),
            str(cache),
            "killed",
            str(N_IMAGES),
            str(K),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", proc.stderr.read()[-3000:]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert list(cache.glob("retrieval-*")) == []  # nothing under the final name
    (half,) = cache.glob(".retrieval-*.tmp-*")
    assert (half / "rows.npy").is_file() and not (half / "meta.json").exists()

    _same(retrieve_for_images(retriever, index, images, K, cache_dir=cache), want)
    assert encoded[0] == N_IMAGES  # rebuilt: every image encoded
    assert not half.exists()  # the killed writer's leftovers are gone
    _same(retrieve_for_images(retriever, index, images, K, cache_dir=cache), want)
    assert encoded[0] == N_IMAGES  # the complete entry is reused


@pytest.mark.slow
def test_two_processes_shard_and_equal_one_process(setup, tmp_path):
    ret_dir, index_dir, retriever, index, images, want = setup
    script = tmp_path / "retrieve.py"
    script.write_text(SCRIPT)
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = run_two_cpu_processes(
        [str(script), str(ret_dir), str(index_dir), str(cache), "sharded", str(N_IMAGES), str(K)],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((cache / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["encoded"] for r in ranks] == [N_IMAGES // 2, N_IMAGES // 2]  # a shard each
    for r in ranks:  # every process holds the whole one-process result
        got = {k: [tuple(h) for h in v] for k, v in r["result"].items()}
        _same(got, want)
    (entry,) = cache.glob("retrieval-*")
    assert json.loads((entry / "keys.json").read_text()) == list(images)
