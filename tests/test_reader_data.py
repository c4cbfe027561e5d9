"""The reader's training data: dataset items, the record image key, the frozen-tower
feature cache on disk (equality with the tower, reuse, rebuild, a killed writer)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rvqa.data import CaptionRecord, VQADataset, VQARecord, holdout_by_image, load_image, load_vqa
from rvqa.pixels import image_pixels
from rvqa.reader.answers import build_vocab
from rvqa.reader.data import (
    ReaderCollator,
    ReaderDataset,
    RecordFeatures,
    load_reader_data,
    record_image_key,
    visual_features_for,
)
from rvqa.reader.modeling import ReaderModel
from rvqa.reader.retrieval import own_caption_ids
from rvqa.towers import small_cnn_processor
from tests.test_reader_model import images, processor, tiny_model, tokenizer  # noqa: F401
from tests.tiny import tiny_run_config

REPO = Path(__file__).resolve().parents[1]


def _image_files(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images(n)):
        path = folder / f"{i}.png"
        im.save(path)
        paths.append(str(path))
    return paths


def _records(ims: list, repeat_first: int = 0, answers: list | None = None) -> VQADataset:
    """One question per image, plus ``repeat_first`` more questions on image 0."""
    refs = [*ims, *[ims[0]] * repeat_first]
    answers = answers or ["red"] * len(refs)
    return VQADataset.from_records(
        [
            VQARecord(
                question_id=10 + i,
                image_id=ims.index(im) if isinstance(im, str) else i,
                image=im,
                question="what color is the shape?",
                answers=[answers[i]] * 10,
            )
            for i, im in enumerate(refs)
        ]
    )


def _tower_output(model: ReaderModel, ims: list) -> torch.Tensor:
    """The tower on each image's pixels (float16, as streamed), one at a time."""
    proc = small_cnn_processor(32)
    with torch.no_grad():
        return torch.cat(
            [model.vision_features(image_pixels(im, proc)[None].float()) for im in ims]
        )


def _count_tower_calls(monkeypatch) -> dict:
    counts = {"calls": 0}
    original = ReaderModel.vision_features

    def spy(self, pixel_values):
        counts["calls"] += 1
        return original(self, pixel_values)

    monkeypatch.setattr(ReaderModel, "vision_features", spy)
    return counts


def test_record_image_key_matches_own_caption_ids():
    vqa = VQARecord(question_id=1, image_id=7, image="x.png", question="q?")
    caps = [CaptionRecord(caption_id=3, caption="a red circle", image_id=7)]
    assert record_image_key(vqa) == "7"
    assert own_caption_ids(caps) == {record_image_key(vqa): {3}}


def test_load_reader_data_stays_lazy(tmp_path):
    cfg = tiny_run_config(tmp_path)
    train, val = load_reader_data(cfg)
    # Subsets of the parsed data, not lists of records; no image in common.
    assert isinstance(train, VQADataset) and isinstance(val, VQADataset)
    assert train._rows is val._rows
    assert len(val) <= cfg.reader.max_eval_questions
    assert not {r.image_id for r in train} & {r.image_id for r in val}
    # The same split as the same hold-out of a list of the records.
    d = cfg.data
    full = load_vqa(d, d.train_split).subset(d.train_fraction, seed=cfg.reader.seed)
    t, v = holdout_by_image(list(full), cfg.reader.val_fraction, cfg.reader.seed)
    assert [r.question_id for r in train] == [r.question_id for r in t]
    assert [r.question_id for r in val] == [r.question_id for r in v][: len(val)]


def test_features_on_disk_equal_the_tower_output_per_image(tokenizer, tmp_path):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=True).train()
    ims = _image_files(tmp_path / "images", 5)
    records = _records(ims, repeat_first=2)  # 7 questions on 5 images
    out = visual_features_for(
        model, small_cnn_processor(32), [records[:4], records[4:]], tmp_path / "fc", batch_size=2
    )
    train, val = out
    files = list((tmp_path / "fc").iterdir())
    assert [f.suffix for f in files] == [".npy"] and train.path == val.path == files[0]
    on_disk = np.load(files[0])
    assert on_disk.dtype == np.float32 and on_disk.shape == (5, 4, 16)  # one row per image
    assert model.training and not model.vision_model.training  # modes restored
    expected = _tower_output(model, ims)
    torch.testing.assert_close(torch.from_numpy(on_disk), expected, rtol=1e-6, atol=1e-6)
    # Records map to their image's row, across both sequences.
    for seq, feats in ((records[:4], train), (records[4:], val)):
        for i, r in enumerate(seq):
            torch.testing.assert_close(feats[i], expected[ims.index(r.image)])
    assert isinstance(train.array, np.memmap)  # read through a memory map


def test_cache_reused_and_rebuilt_when_the_key_changes(tokenizer, tmp_path, monkeypatch, caplog):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=True)
    proc = small_cnn_processor(32)
    ims = _image_files(tmp_path / "images", 4)
    records = _records(ims)
    counts = _count_tower_calls(monkeypatch)
    with caplog.at_level(logging.INFO, logger="rvqa.reader.data"):
        first = visual_features_for(model, proc, [records], tmp_path / "fc")[0]
    assert counts["calls"] >= 2  # a probe + the images
    assert "4 images × 4 × 16 × 4 bytes = 0.0 MB on disk at" in caplog.text
    assert caplog.text.index("bytes =") < caplog.text.index("wrote")  # estimate first
    mtime = first.path.stat().st_mtime_ns

    counts["calls"] = 0
    again = visual_features_for(model, proc, [records], tmp_path / "fc")[0]
    assert counts["calls"] == 0 and again.path == first.path
    assert first.path.stat().st_mtime_ns == mtime

    # Another tower (its weights changed): a new key, rebuilt; the old file is removed.
    with torch.no_grad():
        next(model.vision_model.parameters()).add_(0.5)
    other = visual_features_for(model, proc, [records], tmp_path / "fc")[0]
    assert counts["calls"] >= 2 and other.path != first.path and not first.path.exists()
    torch.testing.assert_close(other[1], _tower_output(model, ims)[1])

    # An image file rewritten with other content: rebuilt, with the new pixels.
    counts["calls"] = 0
    images(4)[3].save(ims[1])
    os.utime(ims[1], ns=(0, 10**9))
    changed = visual_features_for(model, proc, [records], tmp_path / "fc")[0]
    assert counts["calls"] >= 2 and changed.path != other.path
    torch.testing.assert_close(changed[1], _tower_output(model, ims)[1])
    # Another image processor (another input size): another key.
    resized = visual_features_for(model, small_cnn_processor(24), [records], tmp_path / "fc")[0]
    assert resized.path != changed.path


def test_decoded_images_are_keyed_by_their_pixels(tokenizer, tmp_path, monkeypatch):  # noqa: F811
    # In-memory images (records without a data source that identifies them): one row
    # per image id, the key from their pixels (the fallback: nothing cheaper says what
    # they are), so new objects with the same pixels reuse the cache, other pixels do not.
    model = tiny_model(tokenizer, freeze_vision=True)
    proc = small_cnn_processor(32)
    first = visual_features_for(model, proc, [_records(images(3))], tmp_path)[0]
    counts = _count_tower_calls(monkeypatch)
    again = visual_features_for(model, proc, [_records(images(3))], tmp_path)[0]
    assert counts["calls"] == 0 and again.path == first.path
    torch.testing.assert_close(
        torch.from_numpy(np.array(again.array)), _tower_output(model, images(3))
    )
    other = visual_features_for(model, proc, [_records(images(4)[1:])], tmp_path)[0]
    assert counts["calls"] >= 2 and other.path != first.path


def _hf_vqa_folder(folder: Path, ims: list, image_of: list[int]) -> Path:
    """A ``datasets`` folder (split ``train``) with an Image column: question i on image
    ``image_of[i]`` (its ``image_id``)."""
    import datasets

    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "answers": datasets.List(datasets.Value("string")),
        }
    )
    rows = {
        "question": [f"question {i}?" for i in range(len(image_of))],
        "image_id": image_of,
        "image": [ims[j] for j in image_of],
        "answers": [["red"] * 10 for _ in image_of],
    }
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(folder))
    return folder


def test_dataset_images_one_row_per_image_id_and_no_decoding_to_key_or_reuse(
    tokenizer,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    # Images decoded by a datasets source: one row per image id, keyed by the dataset's
    # fingerprint and the ids; an image is decoded only to encode it (once per image),
    # never to build the table, compute the key or reuse the cache.
    from rvqa.data import read_vqa_datasets
    from rvqa.data.hf_datasets import _DatasetsRows
    from rvqa.reader.data import ImageTable

    model, proc = tiny_model(tokenizer, freeze_vision=True), small_cnn_processor(32)
    ims, image_of = images(3), [0, 1, 0, 2, 1]  # 5 questions on 3 images
    folder = _hf_vqa_folder(tmp_path / "hf", ims, image_of)
    built = {"records": 0}
    original = _DatasetsRows.record

    def counting(self, i):
        built["records"] += 1
        return original(self, i)

    monkeypatch.setattr(_DatasetsRows, "record", counting)
    ds = read_vqa_datasets(str(folder), "train")
    train, val = ds[:3], ds[3:]
    table = ImageTable(train, val)
    assert len(table) == 3 and table.digest
    assert table.rows(0).tolist() == [0, 1, 0] and table.rows(1).tolist() == [2, 1]
    assert built["records"] == 0  # table and key from the columns only

    first = visual_features_for(model, proc, [train, val], tmp_path / "fc")
    assert built["records"] == 1 + 3  # the size probe + one per image (not per question)
    on_disk = np.load(first[0].path)
    torch.testing.assert_close(torch.from_numpy(on_disk), _tower_output(model, ims))
    for seq, feats in ((train, first[0]), (val, first[1])):
        for i in range(len(seq)):
            torch.testing.assert_close(feats[i], _tower_output(model, ims)[seq.image_id_at(i)])

    # The next run (the dataset loaded again): reused, no image decoded, the tower idle.
    built["records"] = 0
    calls = _count_tower_calls(monkeypatch)
    ds = read_vqa_datasets(str(folder), "train")
    again = visual_features_for(model, proc, [ds[:3], ds[3:]], tmp_path / "fc")
    assert again[0].path == first[0].path and built["records"] == 0 and calls["calls"] == 0

    # Other data under the same path and ids (another fingerprint): another key.
    _hf_vqa_folder(tmp_path / "hf", images(4)[1:], image_of)
    ds = read_vqa_datasets(str(folder), "train")
    other = visual_features_for(model, proc, [ds[:3], ds[3:]], tmp_path / "fc")
    assert other[0].path != first[0].path and calls["calls"] >= 2
    torch.testing.assert_close(other[0][0], _tower_output(model, images(4)[1:])[0])


def test_a_truncated_cache_file_is_rebuilt(tokenizer, tmp_path):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=True)
    ims = _image_files(tmp_path / "images", 3)
    feats = visual_features_for(model, small_cnn_processor(32), [_records(ims)], tmp_path / "fc")[0]
    data = feats.path.read_bytes()
    feats.path.write_bytes(data[: len(data) // 2])
    again = visual_features_for(model, small_cnn_processor(32), [_records(ims)], tmp_path / "fc")[0]
    assert again.path == feats.path and again.path.stat().st_size == len(data)
    torch.testing.assert_close(again[2], _tower_output(model, ims)[2])


def test_no_cache_for_a_trained_tower(tokenizer, tmp_path):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=False)
    records = _records(_image_files(tmp_path / "images", 2))
    assert visual_features_for(model, small_cnn_processor(32), [records], tmp_path) is None


def test_over_budget_runs_the_tower_per_step_and_says_so(tokenizer, tmp_path, caplog):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=True)
    records = _records(_image_files(tmp_path / "images", 3))
    proc = small_cnn_processor(32)
    # 3 images × 4 tokens (grid 2) × 16 channels × 4 bytes = 768 bytes
    with caplog.at_level(logging.INFO, logger="rvqa.reader.data"):
        assert visual_features_for(model, proc, [records], tmp_path / "a", max_bytes=767) is None
    assert "exceeds the" in caplog.text and "runs on every step" in caplog.text
    assert not any((tmp_path / "a").iterdir())  # nothing written
    assert visual_features_for(model, proc, [records], tmp_path / "b", max_bytes=0) is None
    feats = visual_features_for(model, proc, [records], tmp_path / "c", max_bytes=768)[0]
    assert feats.array.shape == (3, 4, 16)


def test_dataset_items_stream_pixels_or_read_the_cached_rows(tokenizer, processor, tmp_path):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=True)
    ims = _image_files(tmp_path / "images", 4)
    records = _records(ims)
    vocab = build_vocab(r.answers for r in records)
    proc = processor.image_processor
    feats = visual_features_for(model, proc, [records], tmp_path / "fc")[0]
    cached = ReaderDataset(records, proc, None, vocab, 0, features=feats)
    plain = ReaderDataset(records, proc, None, vocab, 0)
    for i in range(4):
        assert "pixel_values" not in cached[i]
        assert torch.equal(cached[i]["visual_features"], torch.from_numpy(np.array(feats.array[i])))
        # Streamed pixels: the processor's output on the loaded image, as float16.
        expected = proc(images=[load_image(ims[i])], return_tensors="pt")["pixel_values"][0]
        assert plain[i]["pixel_values"].dtype == torch.float16
        torch.testing.assert_close(plain[i]["pixel_values"], expected.half())
    # The model gives the same logits from cached features as from pixels.
    collate = ReaderCollator(processor, with_labels=False)
    with torch.no_grad():
        a = model(**collate([cached[i] for i in range(4)])).logits
        b = model(**collate([plain[i] for i in range(4)])).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cached[0]["labels"], plain[0]["labels"])


def test_no_records_no_features(tokenizer, tmp_path):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=True)
    empty = VQADataset.from_records([])
    assert visual_features_for(model, small_cnn_processor(32), [empty], tmp_path) is None


# ---------------------------------------------------------------- kill -9 during the write

_WRITER = """
import sys, time
from pathlib import Path
import torch
from rvqa.reader.data import visual_features_for
from rvqa.reader.modeling import ReaderModel
from rvqa.towers import load_tokenizer, small_cnn_processor
from tests.test_reader_data import _records
from tests.test_reader_model import tiny_model

ims, cache, marker = sys.argv[1].split(","), Path(sys.argv[2]), Path(sys.argv[3])
model = tiny_model(load_tokenizer("minilm"), freeze_vision=True)
original, calls = ReaderModel.vision_features, [0]

def stalls_after_the_first_batch(self, pixel_values):
    calls[0] += 1
    if calls[0] == 3:  # the probe, batch 1 (written), then batch 2: stop here
        marker.write_text("writing")
        time.sleep(600)
    return original(self, pixel_values)

ReaderModel.vision_features = stalls_after_the_first_batch
visual_features_for(model, small_cnn_processor(32), [_records(ims)], cache, batch_size=2)
"""


def test_a_writer_killed_mid_write_leaves_nothing_that_loads(tokenizer, tmp_path, monkeypatch):  # noqa: F811
    ims = _image_files(tmp_path / "images", 6)
    cache, marker = tmp_path / "fc", tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, ",".join(ims), str(cache), str(marker)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the writer did not start writing: {proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in cache.iterdir())
    assert len(left) == 1 and left[0].endswith(".partial.npy"), left  # no complete cache

    # The next run: the partial file is neither loaded nor in the way; the cache is rebuilt.
    model = tiny_model(tokenizer, freeze_vision=True)
    counts = _count_tower_calls(monkeypatch)
    feats = visual_features_for(model, small_cnn_processor(32), [_records(ims)], cache)[0]
    assert counts["calls"] >= 2
    assert [p.name for p in cache.iterdir()] == [feats.path.name]  # partial file removed
    torch.testing.assert_close(
        torch.from_numpy(np.array(feats.array)), _tower_output(model, ims), rtol=1e-6, atol=1e-6
    )
    # ... and the run after that reuses it.
    counts["calls"] = 0
    again = visual_features_for(model, small_cnn_processor(32), [_records(ims)], cache)[0]
    assert counts["calls"] == 0 and again.path == feats.path


# ---------------------------------------------------------------- two processes


class FeatureProbe(torch.nn.Module):
    """Answers as a fixed random linear function of the visual features (less a fixed
    centre): a model whose answers differ between images (a random tiny reader answers
    every question alike), so that evaluation scores 100 only if every prediction lands
    on its own question."""

    def __init__(self, features: RecordFeatures, num_answers: int):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4 * 16, num_answers)
        self.register_buffer(
            "centre", torch.from_numpy(np.array(features.array)).flatten(1).mean(0)
        )

    def forward(self, visual_features, **_):
        return SimpleNamespace(logits=self.proj(visual_features.flatten(1) - self.centre))


_TWO_PROCESSES = """
import json, sys
from pathlib import Path
from accelerate import Accelerator
from rvqa.reader.answers import AnswerVocab
from rvqa.reader.data import ReaderDataset, visual_features_for
from rvqa.reader.evaluation import evaluate_reader
from rvqa.reader.processing import ReaderProcessor
from rvqa.towers import load_tokenizer, small_cnn_processor
from tests.test_reader_data import FeatureProbe, _records
from tests.test_reader_model import ANSWERS, tiny_model

ims, cache, out = sys.argv[1].split(","), Path(sys.argv[2]), Path(sys.argv[3])
answers = json.loads(sys.argv[4])
acc = Accelerator()
assert acc.num_processes == 2
tok = load_tokenizer("minilm")
model = tiny_model(tok, freeze_vision=True)
proc = ReaderProcessor(tok, small_cnn_processor(32), max_question_length=8, max_caption_length=5)
records = _records(ims, repeat_first=2, answers=answers)
feats = visual_features_for(model, proc.image_processor, [records], cache, accelerator=acc,
                            batch_size=2)[0]
vocab = AnswerVocab(ANSWERS)
metrics = {
    "cached": evaluate_reader(FeatureProbe(feats, len(vocab)), proc, ReaderDataset(
        records, proc.image_processor, None, vocab, 0, features=feats), acc, batch_size=2),
    "pixels": evaluate_reader(model, proc, ReaderDataset(records, proc.image_processor, None,
                              vocab, 0), acc, batch_size=2, num_workers=1),
}
if acc.is_main_process:
    out.write_text(json.dumps({"metrics": metrics, "cache": str(feats.path)}))
acc.end_training()
"""


def test_two_processes_write_one_cache_and_evaluate_like_one(tokenizer, processor, tmp_path):  # noqa: F811
    from rvqa.reader.answers import AnswerVocab
    from rvqa.reader.evaluation import evaluate_reader, predict
    from tests.test_reader_model import ANSWERS
    from tests.tiny import run_two_cpu_processes

    ims = _image_files(tmp_path / "images", 5)  # 7 questions: the last batches are uneven
    model, vocab = tiny_model(tokenizer, freeze_vision=True), AnswerVocab(ANSWERS)
    proc = processor.image_processor
    # Each question's human answer = the probe's own prediction in one process.
    feats = visual_features_for(model, proc, [_records(ims, 2)], tmp_path / "one")[0]
    probe_set = ReaderDataset(_records(ims, 2), proc, None, vocab, 0, features=feats)
    answers = [
        vocab.decode(p[0][0])
        for p in predict(FeatureProbe(feats, len(vocab)), processor, probe_set)
    ]
    assert len(set(answers)) > 1  # the order of the predictions matters
    script, out = tmp_path / "two.py", tmp_path / "out.json"
    script.write_text(_TWO_PROCESSES)
    args = [str(script), ",".join(ims), str(tmp_path / "fc"), str(out), json.dumps(answers)]
    run = run_two_cpu_processes(args, REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())
    # One complete cache, equal to the tower's output; no partial file left.
    assert [p.name for p in (tmp_path / "fc").iterdir()] == [Path(got["cache"]).name]
    torch.testing.assert_close(
        torch.from_numpy(np.load(got["cache"])), _tower_output(model, ims), rtol=1e-6, atol=1e-6
    )
    # Sharded and gathered: every prediction on its question; pixels streamed by a
    # worker in each process give the one-process accuracy of the reader.
    assert got["metrics"]["cached"]["accuracy"] == 100.0
    plain = ReaderDataset(_records(ims, 2, answers=answers), proc, None, vocab, 0)
    assert got["metrics"]["pixels"] == evaluate_reader(model, processor, plain)


_DISAGREEING_RANKS = """
import json, os, shutil, sys
from pathlib import Path
from accelerate import Accelerator
from rvqa.reader import data
from rvqa.reader.data import visual_features_for
from rvqa.towers import load_tokenizer, small_cnn_processor
from tests.test_reader_data import _records
from tests.test_reader_model import tiny_model

ims, cache, out = sys.argv[1].split(","), Path(sys.argv[2]), Path(sys.argv[3])
acc = Accelerator()
assert acc.num_processes == 2
if acc.process_index == 1:  # rank 1's own view: no free space, every cache invalid
    Usage = type(shutil.disk_usage(cache.parent))
    shutil.disk_usage = lambda _: Usage(total=10**6, used=10**6, free=0)
    data._valid_cache = lambda path, rows: False
if acc.process_index == 0:  # its second build fails on rank 0 while it decides
    original, calls = data._start_partial, [0]
    def fails_the_second_time(*args):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("No space left on device (simulated)")
        return original(*args)
    data._start_partial = fails_the_second_time
model = tiny_model(load_tokenizer("minilm"), freeze_vision=True)
proc, records = small_cnn_processor(32), _records(ims)
got = {}
for run in ("build", "reuse"):
    feats = visual_features_for(model, proc, [records], cache, accelerator=acc, batch_size=2)
    got[run] = None if feats is None else [str(feats[0].path), feats[0].array.tolist()]
try:  # a new key (other weights): rank 0 builds, and fails doing so
    next(model.vision_model.parameters()).data.add_(0.5)
    visual_features_for(model, proc, [records], cache, accelerator=acc, batch_size=2)
    got["failure"] = None
except Exception as err:
    got["failure"] = f"{type(err).__name__}: {err}"
(out / f"rank{acc.process_index}.json").write_text(json.dumps(got))
acc.end_training()
"""


def test_every_process_follows_the_main_process_decision(tokenizer, tmp_path):  # noqa: F811
    # Rank 1 sees a full disk and no valid cache; the main process sees room and then
    # its own cache: both ranks build once, then reuse it, with the same features (not
    # pixels on one rank, features on the other, nor a rank waiting forever). When the
    # main process fails while deciding, every process raises instead of hanging.
    from tests.tiny import run_two_cpu_processes

    ims = _image_files(tmp_path / "images", 5)
    script, out = tmp_path / "ranks.py", tmp_path / "out"
    script.write_text(_DISAGREEING_RANKS)
    out.mkdir()
    args = [str(script), ",".join(ims), str(tmp_path / "fc"), str(out)]
    run = run_two_cpu_processes(args, REPO, timeout=240)  # a hang fails here
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    model = tiny_model(tokenizer, freeze_vision=True)
    for got in ranks:
        assert got["build"] is not None and got["reuse"] == got["build"] == ranks[0]["build"]
        torch.testing.assert_close(
            torch.tensor(got["build"][1]), _tower_output(model, ims), rtol=1e-6, atol=1e-6
        )
    assert ranks[0]["failure"] == "OSError: No space left on device (simulated)"
    assert ranks[1]["failure"] == (
        "RuntimeError: feature cache: the main process failed "
        "(OSError: No space left on device (simulated)); see its log"
    )
