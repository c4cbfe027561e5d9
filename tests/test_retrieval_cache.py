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

from rvqa.config import CaptionDataConfig
from rvqa.data import VQADataset, VQARecord, load_caption_corpus
from rvqa.errors import ImageLoadError, IndexMismatchError
from rvqa.reader.retrieval import (
    RecordImages,
    RetrievedCaptions,
    index_fingerprint,
    own_caption_ids,
    retrieve_for_images,
)
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
    # The reference: what inference retrieves (RetrieverModel.embed_images, float32
    # pixels, then a direct search); the retrieval pass must give the same captions.
    retriever.eval()
    emb = retriever.embed_images(paths)
    want = {
        key: [(c, s, i) for c, s, i in zip(r.captions, r.scores, r.ids)]
        for key, r in zip(images, index.search(emb, K))
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
        # float32 throughout; batches of another size round differently (~1e-5)
        assert [s for _, s, _ in got[key]] == pytest.approx([s for _, s, _ in want[key]], abs=1e-4)


def test_result_equals_direct_search_as_a_lazy_mapping(setup, tmp_path):
    _, _, retriever, index, images, want = setup
    got = retrieve_for_images(retriever, index, images, K, cache_dir=tmp_path, num_workers=1)
    assert isinstance(got, RetrievedCaptions) and isinstance(got, Mapping)
    _same(got, want)
    assert got.rows.shape == (N_IMAGES, K) and got.rows.dtype == np.int64
    assert got.get("no such image", []) == []
    (entry,) = tmp_path.glob("retrieval-*")
    assert sorted(p.name for p in entry.iterdir()) == [
        "digests.npy",
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


def _no_faiss_index_read(monkeypatch):
    import faiss

    def refuse(*args, **kwargs):
        raise AssertionError("the faiss index was read")

    monkeypatch.setattr(KnowledgeIndex, "load", refuse)
    monkeypatch.setattr(faiss, "read_index", refuse)


class _Captions(torch.utils.data.Dataset):
    def __init__(self, retrieved, keys):
        self.retrieved, self.keys = retrieved, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return json.dumps(self.retrieved[self.keys[i]])


def test_workers_read_captions_without_the_faiss_index(setup, monkeypatch):
    """Pickled (a spawned worker): only the manifest and the captions store are opened;
    forked: the inherited store is used as is. Neither reads the faiss index."""
    _, _, retriever, index, images, want = setup
    got = retrieve_for_images(retriever, index, images, K)
    _no_faiss_index_read(monkeypatch)
    copy = pickle.loads(pickle.dumps(got))
    assert copy._store._lookup is None and copy._store.path == Path(index.path)
    _same(copy, want)
    keys = list(images)
    loader = torch.utils.data.DataLoader(
        _Captions(got, keys),
        batch_size=None,
        num_workers=1,
        multiprocessing_context="fork",
    )
    forked = {key: [tuple(h) for h in json.loads(item)] for key, item in zip(keys, loader)}
    _same(forked, want)
    # A copy of another index's captions: the manifest's fingerprint is checked.
    copy._store.fingerprint = "0" * 16
    copy._store._lookup = None
    with pytest.raises(IndexMismatchError, match="changed since the captions were retrieved"):
        copy["0"]


def test_changed_image_file_is_retrieved_again(setup, tmp_path, encoded):
    """Same key, rewritten file: that image is retrieved again, the others reused."""
    _, _, retriever, index, images, want = setup
    folder = tmp_path / "images"
    folder.mkdir()
    local = {}
    for key, path in images.items():
        local[key] = folder / f"{key}.png"
        local[key].write_bytes(Path(path).read_bytes())
    cache = tmp_path / "cache"
    _same(retrieve_for_images(retriever, index, local, K, cache_dir=cache), want)
    assert encoded[0] == N_IMAGES
    _same(retrieve_for_images(retriever, index, local, K, cache_dir=cache), want)
    assert encoded[0] == N_IMAGES  # unchanged: reused
    # Image "3" regenerated with image "7"'s pixels (same key, same path).
    local["3"].write_bytes(Path(images["7"]).read_bytes())
    st = local["3"].stat()
    os.utime(local["3"], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    got = retrieve_for_images(retriever, index, local, K, cache_dir=cache)
    assert encoded[0] == N_IMAGES + 1  # only the changed image
    _same(got, {**want, "3": want["7"]})
    _same(
        retrieve_for_images(retriever, index, local, K, cache_dir=cache), {**want, "3": want["7"]}
    )
    assert encoded[0] == N_IMAGES + 1  # the rewritten entry is reused
    (entry,) = cache.glob("retrieval-*")
    assert sorted(json.loads((entry / "keys.json").read_text())) == sorted(images)


def test_record_images_hold_positions_not_images(setup, tmp_path, monkeypatch):
    """RecordImages over lazy record sequences: keys by image id, no record built until
    an image is asked for; the retrieval result equals the direct search."""
    _, _, retriever, index, images, want = setup

    def records(keys):
        return VQADataset.from_records(
            [
                VQARecord(question_id=q, question="what?", image=images[key], image_id=int(key))
                for q, key in enumerate(keys)
            ]
        )

    train = records(["0", "1", "1", "2", "3", "0", "4", "5"])
    val = records(["6", "2", "7", "8", "9", "10", "11", "11"])
    build = VQADataset._record

    def refuse(self, i):
        raise AssertionError("a record was built")

    monkeypatch.setattr(VQADataset, "_record", refuse)
    lazy = RecordImages(train, val)
    assert list(lazy) == list(images) and len(lazy) == N_IMAGES
    tokens = [lazy.token(key) for key in lazy]  # file identity, from the columns
    assert tokens[0].startswith(f"path\t{images['0']}\t")
    monkeypatch.setattr(VQADataset, "_record", build)
    assert lazy["7"] == images["7"]
    _same(retrieve_for_images(retriever, index, lazy, K, cache_dir=tmp_path, num_workers=1), want)


def test_decoded_images_are_keyed_by_their_datasets_identity(tmp_path):
    """A datasets Image column: the token is the dataset's identity (no image decoded);
    a regenerated dataset in the same folder has another."""
    import datasets
    from PIL import Image

    from rvqa.data.hf_datasets import _DatasetsRows, read_vqa_datasets

    def write(color):
        pixels = [Image.new("RGB", (8, 8), c) for c in (color, "blue")]
        ds = datasets.Dataset.from_dict(
            {"image": pixels, "question": ["q0", "q1"], "image_id": [1, 2]},
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "question": datasets.Value("string"),
                    "image_id": datasets.Value("int64"),
                }
            ),
        )
        ds.save_to_disk(str(tmp_path / "ds"))
        return RecordImages(read_vqa_datasets(str(tmp_path / "ds"), "train"))

    first = write("red")
    record = _DatasetsRows.record
    _DatasetsRows.record = lambda self, i: (_ for _ in ()).throw(AssertionError("decoded"))
    try:
        tokens = [first.token(key) for key in first]
    finally:
        _DatasetsRows.record = record
    assert tokens[0] == tokens[1] and tokens[0].startswith("source\t")
    reopened = RecordImages(read_vqa_datasets(str(tmp_path / "ds"), "train"))
    assert reopened.token("1") == first.token("1")  # the same files: the same identity
    assert write("green").token("1") != first.token("1")  # regenerated: another


def test_missing_image_raises_image_load_error_from_a_worker(setup, tmp_path):
    _, _, retriever, index, images, _ = setup
    broken = {**images, "5": str(tmp_path / "gone.png")}
    with pytest.raises(ImageLoadError, match="gone.png"):
        retrieve_for_images(
            retriever, index, broken, K, cache_dir=tmp_path, num_workers=2, batch_size=2
        )
    assert list(tmp_path.glob("retrieval-*")) == []


def test_own_caption_ids_read_no_image(tmp_path, monkeypatch):
    """With skip_bad_images set, the exclusion ids still open no image."""
    lines = [
        {"caption": f"caption {k} of image {i}", "id": i * 10 + k, "image_id": i, "image": "x.png"}
        for i in range(3)
        for k in range(2)
    ]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = CaptionDataConfig(
        source="jsonl", path=str(path), images=str(tmp_path), skip_bad_images=True
    )

    def refuse(*args, **kwargs):
        raise AssertionError("an image was read")

    monkeypatch.setattr("rvqa.data.lazy.find_unreadable_images", refuse)
    monkeypatch.setattr("rvqa.data.images.load_image", refuse)
    ids = own_caption_ids(load_caption_corpus(cfg, "train"))
    assert ids == {"0": {0, 1}, "1": {10, 11}, "2": {20, 21}}


def test_one_set_of_loader_workers_with_a_progress_bar(setup, tmp_path, monkeypatch):
    """The retrieval pass starts one DataLoader iterator (one set of workers), also with
    its progress bar on: tqdm.auto calls iter() on what it wraps, which on a DataLoader
    would start a second, idle set of worker processes for the whole pass."""
    from torch.utils.data import DataLoader

    _, _, retriever, index, images, want = setup
    iterators = []
    real_iter = DataLoader.__iter__

    def counting_iter(self):
        iterators.append(self)
        return real_iter(self)

    monkeypatch.setattr(DataLoader, "__iter__", counting_iter)
    got = retrieve_for_images(
        retriever, index, images, K, cache_dir=tmp_path, num_workers=1, show_progress=True
    )
    _same(got, want)
    assert len(iterators) == 1
