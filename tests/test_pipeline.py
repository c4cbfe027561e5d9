"""RVQA, the Python API: evidence, no-retrieval, batches, index swaps, threads, bad input.

Everything runs on the shared tiny run (``tiny_run``: tiny retriever, its index
``tiny-captions``, tiny reader); the models are random-ish, so tests compare the
API against the components it composes rather than expecting good answers.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from pathlib import Path

import easy_vqa
import numpy as np
import pytest
import torch
from PIL import Image

from rvqa import RVQA
from rvqa.config import ReaderSettings
from rvqa.data.images import ImageLoadError, load_image
from rvqa.errors import UsageError

QUESTION = "what color is the shape?"
RUN_INDEX = "tiny-captions"
# Captions unlike easy-vqa's, so every hit tells which index it came from.
OTHER_CAPTIONS = [
    "a photo of a dog on a beach",
    "a bowl of soup on a table",
    "two trains at a station",
    "a man riding a red bicycle",
    "snow on a mountain at dawn",
    "a cat sleeping on a sofa",
]


def write_other_index(tiny_run: Path, out: Path, retriever) -> Path:
    """An index over OTHER_CAPTIONS, built with the tiny run's retriever."""
    from rvqa.indexing import build_index_from_config
    from tests.tiny import tiny_run_config

    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.parent / "other_captions.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"caption": c, "id": f"other-{i}"}) + "\n"
            for i, c in enumerate(OTHER_CAPTIONS)
        )
    )
    cfg = tiny_run_config(tiny_run.parent)
    return build_index_from_config(cfg, retriever=retriever, captions=str(jsonl), out=out)


def index_captions(path: Path) -> set[str]:
    from rvqa.retriever.index import CAPTIONS_DIR, read_captions

    return set(read_captions(Path(path) / CAPTIONS_DIR, mmap=False)["caption"])


def same_evidence(got, want, atol: float = 1e-5) -> bool:
    """Same captions, ids and index names in the same order; scores within ``atol``."""
    return [(e.text, e.id, e.index) for e in got] == [
        (e.text, e.id, e.index) for e in want
    ] and all(abs(g.score - w.score) <= atol for g, w in zip(got, want))


@pytest.fixture(scope="module")
def model(tiny_run):
    """Read-only use: tests that load, swap or unload indices build their own."""
    return RVQA.from_pretrained(tiny_run, device="cpu")


@pytest.fixture
def fresh(tiny_run):
    return RVQA.from_pretrained(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def run_index(model):
    return Path(model.registry.get(RUN_INDEX).path)


@pytest.fixture(scope="module")
def other_index(tiny_run, model, tmp_path_factory):
    return write_other_index(
        tiny_run, tmp_path_factory.mktemp("other") / "other-captions", model.retriever
    )


@pytest.fixture(scope="module")
def foreign_index(model, tmp_path_factory):
    """A valid index folder, but built with another retriever (another fingerprint)."""
    from rvqa.retriever.index import build_index_from_embeddings

    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(OTHER_CAPTIONS), model.retriever.embed_dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = tmp_path_factory.mktemp("foreign") / "foreign-captions"
    return build_index_from_embeddings(
        x, OTHER_CAPTIONS, None, out, fingerprint="sha256:other", show_progress=False
    )


@pytest.fixture(scope="module")
def images():
    paths = easy_vqa.get_test_image_paths()
    return [paths[i] for i in range(4)]


# --------------------------------------------------------------------------- answers


def test_answer_evidence_matches_direct_search(model, run_index, images):
    from rvqa.retriever.index import KnowledgeIndex

    k = 3
    index = KnowledgeIndex.load(run_index, model.retriever)
    for image in images[:2]:
        emb = model.retriever.embed_images([load_image(image)])
        [direct] = index.search(emb, k)
        out = model.answer(image, QUESTION, top_k=k, index=RUN_INDEX)
        assert len(out.evidence) == k
        assert [e.id for e in out.evidence] == direct.ids
        assert [e.text for e in out.evidence] == direct.captions
        np.testing.assert_allclose([e.score for e in out.evidence], direct.scores, atol=1e-6)
        assert {e.index for e in out.evidence} == {RUN_INDEX}
        # The default searches every loaded index: here just the run's.
        assert model.answer(image, QUESTION, top_k=k).evidence == out.evidence
    assert out.question == QUESTION
    assert out.answer in model.answers and 0.0 < out.score < 1.0
    assert len(out.alternatives) == 4
    ranked = [out.score] + [s for _, s in out.alternatives]
    assert ranked == sorted(ranked, reverse=True)
    assert out.answer not in [a for a, _ in out.alternatives]
    # The default top_k is the one the reader was trained with (rvqa_run.json).
    assert len(model.answer(images[0], QUESTION).evidence) == model.default_top_k == 2


def test_answer_without_retrieval_is_the_k0_reader_output(model, images):
    out = model.answer(images[0], QUESTION, index=None)
    assert out.evidence == []
    assert model.answer(images[0], QUESTION, index=[]) == out

    batch = model.processor([load_image(images[0])], [QUESTION])  # no captions at all
    assert "caption_scores" not in batch
    with torch.inference_mode():
        probs = torch.sigmoid(model.reader(**batch).logits.float())[0]
    p, idx = probs.topk(5)
    assert out.answer == model.answers[idx[0]]
    assert out.score == pytest.approx(p[0].item(), abs=1e-6)
    assert [a for a, _ in out.alternatives] == [model.answers[i] for i in idx[1:]]
    np.testing.assert_allclose([s for _, s in out.alternatives], p[1:].tolist(), atol=1e-6)

    # ... and retrieval does change what the reader reads.
    with_captions = model.answer(images[0], QUESTION, top_k=2)
    assert with_captions.evidence and with_captions.score != pytest.approx(out.score, abs=1e-7)


def test_answer_batch_equals_answer(model, images):
    inputs = [images[0], np.asarray(load_image(images[1])), load_image(images[2]), images[3]]
    questions = [QUESTION, "what shape is in the image?", "is there a blue shape?", QUESTION]
    for index in (RUN_INDEX, None):
        outs = model.answer_batch(inputs, questions, top_k=3, index=index, batch_size=3)
        assert len(outs) == len(inputs)
        for image, question, got in zip(inputs, questions, outs):
            want = model.answer(image, question, top_k=3, index=index)
            assert got.question == question
            assert got.answer == want.answer
            assert got.score == pytest.approx(want.score, abs=1e-5)
            assert [a for a, _ in got.alternatives] == [a for a, _ in want.alternatives]
            assert [(e.text, e.index, e.id) for e in got.evidence] == [
                (e.text, e.index, e.id) for e in want.evidence
            ]
            np.testing.assert_allclose(
                [e.score for e in got.evidence], [e.score for e in want.evidence], atol=1e-6
            )
    assert model.answer_batch([], []) == []


def _tower_calls(model) -> dict[str, int]:
    """Count each image tower's forward passes (hooks on a model's two towers)."""
    calls = {"retriever": 0, "reader": 0}
    for name, tower in (
        ("retriever", model.retriever.vision_model),
        ("reader", model.reader.vision_model),
    ):
        tower.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def same_answers(got, want, atol: float = 1e-5) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.answer == w.answer
        assert g.score == pytest.approx(w.score, abs=atol)
        assert [a for a, _ in g.alternatives] == [a for a, _ in w.alternatives]
        np.testing.assert_allclose(
            [s for _, s in g.alternatives], [s for _, s in w.alternatives], atol=atol
        )
        assert same_evidence(g.evidence, w.evidence)


def test_one_image_tower_pass_when_the_reader_reads_the_retrievers_tower(fresh, images):
    """The tiny run's reader was built with ``vision_backbone: retriever`` and a frozen
    tower: its features are read off the retriever's pass (its own tower never runs),
    with the answers of running both towers; a batch with a repeated image included."""
    calls = _tower_calls(fresh)
    read: list[torch.Tensor] = []  # the visual features each reader forward is given
    fresh.reader.register_forward_pre_hook(
        lambda _, args, kwargs: read.append(kwargs["visual_features"].clone()), with_kwargs=True
    )
    inputs = [images[0], images[1], images[0], images[2]]
    questions = [QUESTION, "what shape is in the image?", "is there a blue shape?", QUESTION]
    assert fresh.image_tower_shared
    shared = fresh.answer_batch(inputs, questions)
    assert calls == {"retriever": 1, "reader": 0}
    fresh.share_image_tower = False
    assert not fresh.image_tower_shared
    both = fresh.answer_batch(inputs, questions)
    assert calls == {"retriever": 2, "reader": 1}
    same_answers(shared, both)
    # (the tiny reader barely looks at the image: its features are compared too)
    assert read[0].shape == read[1].shape == (4, 4, fresh.reader.vision_model.config.hidden_size)
    torch.testing.assert_close(read[0], read[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(read[1][0], read[1][1], atol=1e-3)  # the images' differ
    # without retrieval (no retriever pass) the reader runs its own tower
    fresh.share_image_tower = True
    assert fresh.image_tower_shared  # (checked again: the probe runs both towers)
    calls.update(retriever=0, reader=0)
    fresh.answer_batch(inputs, questions, index=None)
    assert calls == {"retriever": 0, "reader": 1}


def test_image_tower_sharing_is_checked_again_when_a_tower_changes(fresh, images):
    """A changed weight (in place) or a retriever grid the reader's cannot be pooled
    from ends the sharing — each is seen on the next call — and the answers are then
    the reader's own tower's; undone, the sharing is back."""
    calls = _tower_calls(fresh)
    inputs, questions = images[:3], [QUESTION] * 3
    reader_tower = fresh.reader.vision_model
    weight = next(reader_tower.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.5)
    assert not fresh.image_tower_shared
    changed = fresh.answer_batch(inputs, questions)
    assert calls == {"retriever": 1, "reader": 1}
    fresh.share_image_tower = False
    same_answers(changed, fresh.answer_batch(inputs, questions))
    fresh.share_image_tower = True
    with torch.no_grad():
        weight.copy_(saved)
    assert fresh.image_tower_shared
    # The tiny CNN's 8 x 8 map: the retriever's tokens (the whole map) pool to the
    # reader's 2 x 2 grid, and so would 4 x 4 tokens; 3 x 3 (overlapping windows) not.
    conf = fresh.retriever.vision_model.config
    assert (conf.grid_size, fresh.reader.config.visual_grid) == (None, 2)
    conf.grid_size = 3
    assert not fresh.image_tower_shared
    conf.grid_size = 4
    assert fresh.image_tower_shared
    conf.grid_size = None
    assert fresh.image_tower_shared
    # another image processing (here: its resize) is not shared either
    fresh.processor.image_processor.size = {"height": 24, "width": 24}
    try:
        assert not fresh.image_tower_shared
    finally:
        fresh.processor.image_processor.size = {"height": 32, "width": 32}
    assert fresh.image_tower_shared
    # a tower in training mode (batch statistics) is not either
    reader_tower.train()
    assert not fresh.image_tower_shared
    reader_tower.eval()
    assert fresh.image_tower_shared


def test_a_failing_shared_tower_probe_runs_the_towers_apart(fresh, images, monkeypatch, caplog):
    """Whatever the probe hits (here the retriever refusing to return its tokens), the
    reader runs its own tower, the answers come, and the probe is not retried per call."""
    embed = fresh.retriever.embed_images
    probes = []

    def no_tokens(*args, **kwargs):
        if kwargs.get("return_tokens"):
            probes.append(1)
            raise ValueError("no tokens today")
        return embed(*args, **kwargs)

    monkeypatch.setattr(fresh.retriever, "embed_images", no_tokens)
    calls = _tower_calls(fresh)
    with caplog.at_level(logging.INFO, logger="rvqa.pipeline"):
        fresh.share_image_tower = True  # (setting it forgets the last check)
        outs = [fresh.answer_batch(images[:2], [QUESTION] * 2) for _ in range(2)]
    assert "the shared-tower probe failed: no tokens today" in caplog.text
    assert probes == [1] and not fresh.image_tower_shared
    assert calls == {"retriever": 2, "reader": 2}
    same_answers(outs[0], outs[1])


def test_answer_to_dict_is_json(model, images):
    out = model.answer(images[0], QUESTION)
    d = json.loads(json.dumps(out.to_dict()))
    assert d["answer"] == out.answer and d["question"] == QUESTION
    assert [e["id"] for e in d["evidence"]] == [e.id for e in out.evidence]
    assert set(d["evidence"][0]) == {"text", "score", "index", "id"}  # no PCME: no uncertainty
    assert "uncertainty" not in d


def test_device_cpu(tiny_run, model, images):
    assert model.device == torch.device("cpu")
    params = [*model.reader.parameters(), *model.retriever.parameters()]
    assert all(p.device.type == "cpu" for p in params)
    m = RVQA.from_pretrained(tiny_run, device=torch.device("cpu"), load_indices=False)
    assert m.indices == {}
    assert m.answer(images[0], QUESTION).evidence == []  # no index loaded: no retrieval


# --------------------------------------------------------------------------- indices


def test_indices_load_unload(fresh, run_index, other_index, images):
    assert list(fresh.indices) == [RUN_INDEX]
    manifest = fresh.indices[RUN_INDEX]
    assert manifest["retriever_fingerprint"] == fresh.retriever.fingerprint()
    assert manifest["count"] == len(index_captions(run_index))

    assert fresh.load_index(other_index, name="other") == "other"
    assert list(fresh.indices) == [RUN_INDEX, "other"]
    assert fresh.indices["other"]["count"] == len(OTHER_CAPTIONS)
    with pytest.raises(ValueError, match="'other' is loaded already; use swap_index"):
        fresh.load_index(run_index, name="other")

    only_other = fresh.answer(images[0], QUESTION, top_k=3, index="other").evidence
    assert {e.index for e in only_other} == {"other"}
    assert {e.text for e in only_other} <= set(OTHER_CAPTIONS)
    merged = fresh.answer(images[0], QUESTION, top_k=4, index=[RUN_INDEX, "other"]).evidence
    assert len(merged) == 4
    assert [e.score for e in merged] == sorted((e.score for e in merged), reverse=True)
    assert fresh.answer(images[0], QUESTION, top_k=4).evidence == merged  # default: all

    fresh.unload_index("other")
    assert list(fresh.indices) == [RUN_INDEX]
    with pytest.raises(KeyError, match=r"unknown index 'other' \(loaded: tiny-captions\)"):
        fresh.answer(images[0], QUESTION, index="other")
    with pytest.raises(KeyError, match="no knowledge index named 'other'; loaded: tiny-captions"):
        fresh.unload_index("other")
    # The default name is the folder name.
    assert fresh.load_index(other_index) == "other-captions"


def test_swap_index_changes_evidence_source(fresh, run_index, other_index, images):
    run_caps, other_caps = index_captions(run_index), set(OTHER_CAPTIONS)
    before = fresh.answer(images[0], QUESTION, top_k=3)
    assert {e.text for e in before.evidence} <= run_caps

    fresh.swap_index(other_index, name=RUN_INDEX)
    assert list(fresh.indices) == [RUN_INDEX]
    assert fresh.indices[RUN_INDEX]["count"] == len(OTHER_CAPTIONS)
    after = fresh.answer(images[0], QUESTION, top_k=3)
    assert {e.text for e in after.evidence} <= other_caps
    assert {e.index for e in after.evidence} == {RUN_INDEX}

    fresh.swap_index(run_index, name=RUN_INDEX)  # and back: the same evidence as before
    assert fresh.answer(images[0], QUESTION, top_k=3).evidence == before.evidence


def test_bad_swap_keeps_the_old_index(fresh, other_index, foreign_index, tmp_path, images):
    fresh.swap_index(other_index, name=RUN_INDEX)
    serving = fresh.answer(images[0], QUESTION, top_k=3)
    fp = fresh.retriever.fingerprint()
    with pytest.raises(ValueError, match=rf"fingerprint sha256:other.*fingerprint {fp}"):
        fresh.swap_index(foreign_index, name=RUN_INDEX)
    with pytest.raises(ValueError, match="sha256:other"):
        fresh.load_index(foreign_index, name="foreign")
    with pytest.raises(FileNotFoundError, match="knowledge index folder not found"):
        fresh.swap_index(tmp_path / "missing", name=RUN_INDEX)
    broken = tmp_path / "broken"
    shutil.copytree(other_index, broken)
    (broken / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="index.faiss is missing"):
        fresh.swap_index(broken, name=RUN_INDEX)
    assert list(fresh.indices) == [RUN_INDEX]
    still = fresh.answer(images[0], QUESTION, top_k=3)
    assert still.evidence == serving.evidence
    assert still.score == pytest.approx(serving.score, abs=1e-6)


def test_threads_answer_while_another_swaps(fresh, run_index, other_index, images):
    """8 threads answer (10 calls each) while one thread swaps A <-> B under one name."""
    k = 3
    want = {
        "A": [fresh.answer(im, QUESTION, top_k=k) for im in images],
    }
    fresh.swap_index(other_index, name=RUN_INDEX)
    want["B"] = [fresh.answer(im, QUESTION, top_k=k) for im in images]
    fresh.swap_index(run_index, name=RUN_INDEX)
    assert {e.text for e in want["A"][0].evidence}.isdisjoint(
        {e.text for e in want["B"][0].evidence}
    )

    results: list[tuple[int, object]] = []
    errors: list[BaseException] = []
    swaps = [0]
    done = threading.Event()
    start = threading.Barrier(9)

    def worker(w: int) -> None:
        try:
            start.wait()
            for n in range(10):
                i = (w + n) % len(images)
                results.append((i, fresh.answer(images[i], QUESTION, top_k=k)))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    def swapper() -> None:
        try:
            start.wait()
            paths = [other_index, run_index]
            while not done.is_set():
                fresh.swap_index(paths[swaps[0] % 2], name=RUN_INDEX)
                swaps[0] += 1
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    workers = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    swap_thread = threading.Thread(target=swapper)
    for t in [*workers, swap_thread]:
        t.start()
    for t in workers:
        t.join(timeout=120)
    done.set()
    swap_thread.join(timeout=60)

    assert not errors, errors
    assert len(results) == 80
    assert swaps[0] >= 2
    for i, out in results:
        # Every answer comes from exactly one index state: A's or B's, never a mix.
        states = [s for s in ("A", "B") if same_evidence(out.evidence, want[s][i].evidence)]
        assert len(states) == 1, (out.evidence, want["A"][i].evidence, want["B"][i].evidence)
        assert out.answer == want[states[0]][i].answer
        assert out.score == pytest.approx(want[states[0]][i].score, abs=1e-5)


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    load_image(easy_vqa.get_test_image_paths()[0]).save(d / "ok.png")
    data = (d / "ok.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (d / "notes.txt").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    Image.new("1", (7000, 6000)).save(d / "huge.png")  # 42 MP, a few kB on disk
    return d


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("missing.png", ImageLoadError, r"cannot load image .*missing\.png.*file not found"),
        ("truncated.png", ImageLoadError, r"truncated\.png.*corrupt or truncated"),
        ("garbage.png", ImageLoadError, r"garbage\.png.*(corrupt|not an image)"),
        ("notes.txt", ImageLoadError, r"notes\.txt.*not an image file"),
        ("empty.png", ImageLoadError, r"empty\.png.*empty \(0 bytes\)"),
        ("huge.png", ValueError, r"huge\.png.*7000x6000 = 42,000,000 pixels, above the limit"),
        (".", ImageLoadError, "not a regular file"),
    ],
)
def test_bad_image_files(model, bad_files, name, error, match):
    with pytest.raises(error, match=match):
        model.answer(bad_files / name, QUESTION)


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (np.zeros((32, 32, 3), np.float32), TypeError, "dtype float32, expected uint8"),
        (np.zeros((32, 32, 3), np.int64), TypeError, "dtype int64, expected uint8"),
        (np.zeros((3, 32, 32), np.uint8), ValueError, r"shape \(3, 32, 32\).*channels last"),
        (np.zeros((1, 32, 32, 3), np.uint8), ValueError, r"shape \(1, 32, 32, 3\)"),
        (np.zeros((0, 32, 3), np.uint8), ValueError, r"shape \(0, 32, 3\)"),
        (np.zeros((6500, 6500), np.uint8), ValueError, "6500x6500 = 42,250,000 pixels, above"),
        (Image.new("1", (7000, 6000)), ValueError, "PIL image is 7000x6000"),
        (
            5,
            TypeError,
            "expects a file path, a PIL.Image.Image or a uint8 numpy array, got builtins.int",
        ),
        (None, TypeError, "got builtins.NoneType"),
        (b"\x89PNG", TypeError, "got builtins.bytes"),
    ],
    ids=["float", "int64", "chw", "4d", "empty", "huge-array", "huge-pil", "int", "none", "bytes"],
)
def test_bad_image_values(model, image, error, match):
    with pytest.raises(error, match=match):
        model.answer(image, QUESTION)


def test_bad_images_in_batches_and_lazy_pil(model, bad_files, images):
    with pytest.raises(ValueError, match=r"image 1: image array has shape \(3, 32, 32\)"):
        model.answer_batch([images[0], np.zeros((3, 32, 32), np.uint8)], [QUESTION, QUESTION])
    with pytest.raises(TypeError, match="image 2: image array has dtype float64"):
        model.answer_batch([images[0]] * 2 + [np.zeros((8, 8, 3))], [QUESTION] * 3)
    with pytest.raises(ImageLoadError, match="notes.txt"):
        model.answer_batch([images[0], bad_files / "notes.txt"], [QUESTION, QUESTION])
    lazy = Image.open(bad_files / "truncated.png")  # decoded only when used
    with pytest.raises(ValueError, match="image: cannot decode the PIL image .*truncated"):
        model.answer(lazy, QUESTION)
    with pytest.raises(TypeError, match="images must be a list with one image per question"):
        model.answer_batch(images[0], [QUESTION])
    with pytest.raises(TypeError, match="questions must be a list of strings, got str"):
        model.answer_batch([images[0]], QUESTION)
    with pytest.raises(ValueError, match="got 2 images but 1 questions"):
        model.answer_batch(images[:2], [QUESTION])


@pytest.mark.parametrize(
    ("question", "error", "match"),
    [
        ("", ValueError, "question is empty or whitespace"),
        ("  \n\t ", ValueError, "question is empty or whitespace"),
        ("\u200b", ValueError, "has no tokens after tokenisation"),
        (5, TypeError, "question must be a string, got int"),
        (None, TypeError, "question must be a string, got NoneType"),
        (b"what color?", TypeError, "question must be a string, got bytes"),
        (["what color?"], TypeError, "question must be a string, got list"),
    ],
)
def test_bad_questions(model, images, question, error, match):
    with pytest.raises(error, match=match):
        model.answer(images[0], question)


def test_bad_question_in_batch_is_named(model, images):
    with pytest.raises(ValueError, match="question 1 is empty"):
        model.answer_batch(images[:2], [QUESTION, " "])


def test_long_question_is_truncated_with_a_warning(model, images, caplog):
    limit = model.processor.max_question_length
    words = ["what", "color", "is", "the", "big", "shape"] + ["really"] * (limit + 40)
    assert all(len(model.processor.tokenizer.tokenize(w)) == 1 for w in set(words))
    long_q = " ".join(words) + " ?"
    prefix = " ".join(words[:limit])
    with caplog.at_level(logging.WARNING, logger="rvqa.reader.processing"):
        out = model.answer(images[0], long_q)
    assert f"truncated to max_question_length={limit}" in caplog.text
    assert out.question == long_q  # reported as asked
    kept = model.answer(images[0], prefix)  # the reader read only the prefix
    assert out.answer == kept.answer
    assert out.score == pytest.approx(kept.score, abs=1e-6)
    assert out.evidence == kept.evidence


@pytest.mark.parametrize(
    ("top_k", "error", "match"),
    [
        (0, ValueError, r"top_k must be ≥ 1, got 0 \(use index=None"),
        (-3, ValueError, "top_k must be ≥ 1, got -3"),
        (2.0, TypeError, "top_k must be an integer, got 2.0"),
        ("3", TypeError, "top_k must be an integer, got '3'"),
        (True, TypeError, "top_k must be an integer, got True"),
    ],
)
def test_bad_top_k(model, images, top_k, error, match):
    with pytest.raises(error, match=match):
        model.answer(images[0], QUESTION, top_k=top_k)


def test_top_k_limits(model, other_index, images):
    assert len(model.answer(images[0], QUESTION, top_k=np.int64(3)).evidence) == 3
    # At most what always fits the reader's 64 text positions: (64 - 12 - 2) // (6 + 1).
    assert model.max_top_k == 7
    assert len(model.answer(images[0], QUESTION, top_k=7).evidence) == 7
    with pytest.raises(
        ValueError, match=r"top_k=8 is more captions than the reader's text fits: at most 7"
    ):
        model.answer(images[0], QUESTION, top_k=8)
    # An index smaller than top_k gives what it has.
    m = RVQA.from_pretrained(Path(model.run_dir), device="cpu", load_indices=False)
    m.load_index(other_index)
    assert len(m.answer(images[0], QUESTION, top_k=7).evidence) == len(OTHER_CAPTIONS) == 6


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        ("nope", KeyError, r"unknown index 'nope' \(loaded: tiny-captions\)"),
        ([RUN_INDEX, "nope"], KeyError, r"unknown index 'nope' \(loaded: tiny-captions\)"),
        (5, TypeError, "index must be an index name, a list of names, None"),
        ([5], TypeError, "index names must be strings, got 5"),
    ],
)
def test_bad_index_names(model, images, index, error, match):
    with pytest.raises(error, match=match):
        model.answer(images[0], QUESTION, index=index)


def test_bad_devices(tiny_run):
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        RVQA.from_pretrained(tiny_run, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            RVQA.from_pretrained(tiny_run, device="cuda")


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the run folder and its index (the run refers to ../indices/...)."""
    skip = shutil.ignore_patterns("checkpoints", "retrieval_cache", "final")
    shutil.copytree(tiny_run, tmp_path / "run", ignore=skip)
    shutil.copytree(tiny_run.parent / "indices", tmp_path / "indices")
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("remove", "match"),
    [
        ("rvqa_run.json", r"rvqa_run\.json is missing: not an rvqa run folder"),
        ("reader/best/model.safetensors", r"reader folder .*best is missing model\.safetensors"),
        ("reader/best/config.json", r"reader folder .*best is missing config\.json"),
        ("reader/best/reader_processor.json", "is missing reader_processor.json"),
        ("reader/best/tokenizer.json", "reader folder .* has no tokenizer vocabulary"),
        ("reader/best/tokenizer_config.json", "is missing tokenizer_config.json"),
        ("reader/best/preprocessor_config.json", "reader folder .* is missing preprocessor_config"),
        ("retriever/best", r"retriever folder .*retriever/best does not exist"),
        ("retriever/best/model.safetensors", "retriever folder .* is missing model.safetensors"),
        ("retriever/best/preprocessor_config.json", "retriever folder .* is missing preprocessor"),
        ("../indices/tiny-captions", "knowledge index folder not found: .*tiny-captions"),
        ("../indices/tiny-captions/index.faiss", "file index.faiss is missing"),
        ("../indices/tiny-captions/manifest.json", "has no manifest.json"),
    ],
)
def test_run_folder_missing_a_component(run_copy, remove, match):
    target = run_copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=match):
        RVQA.from_pretrained(run_copy, device="cpu")


def test_run_folder_errors(run_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder .*nowhere does not exist"):
        RVQA.from_pretrained(tmp_path / "nowhere")
    run_file = run_copy / "rvqa_run.json"
    run_file.write_text('{"reader": "reader/best"}')
    with pytest.raises(ValueError, match=r"rvqa_run\.json is malformed: 'retriever'"):
        RVQA.from_pretrained(run_copy)
    run_file.write_text("{not json")
    with pytest.raises(ValueError, match=r"rvqa_run\.json is malformed"):
        RVQA.from_pretrained(run_copy)


def test_run_trained_without_retrieval_loads_and_answers(run_copy):
    """``train-reader --set reader.top_k=0`` records top_k 0 and no index: it still loads."""
    run_file = run_copy / "rvqa_run.json"
    run = json.loads(run_file.read_text())
    run.update(top_k=0, indices={})
    run_file.write_text(json.dumps(run))
    config = run_copy / run["reader"] / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "top_k": 0}))
    model = RVQA.from_pretrained(run_copy, device="cpu")
    assert model.reader.config.top_k == 0 and model.indices == {}
    assert model.default_top_k == ReaderSettings.top_k  # used only if an index is loaded
    out = model.answer(easy_vqa.get_test_image_paths()[0], "what color is the shape?")
    assert out.answer in model.answers and out.evidence == []
    with pytest.raises(UsageError, match="top_k must be ≥ 1, got 0"):
        RVQA(model.retriever, model.reader, model.processor, top_k=0)


# --------------------------------------------------------------------------- README


def test_readme_quickstart(tiny_run, run_index, other_index, monkeypatch):
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8")
    found = re.search(r"^## Python API\s*$.*?^```python\n(.*?)^```", text, re.S | re.M)
    if found is None:
        pytest.skip("README has no Python API section yet")
    code = found.group(1)
    code = code.replace("runs/demo", str(tiny_run).replace("\\", "/"))
    code = code.replace("indices/easyvqa-captions", str(run_index).replace("\\", "/"))
    # Other demo indices (e.g. a paraphrased caption corpus) → an index of other captions.
    code = re.sub(r"(?<![\w/.-])indices/[\w.-]+", str(other_index).replace("\\", "/"), code)
    code = code.replace("image.png", easy_vqa.get_test_image_paths()[0])
    monkeypatch.chdir(tiny_run.parent)
    exec(compile(code, str(readme) + ":python-api", "exec"), {"__name__": "__readme__"})


def test_cli_build_index_rebuild_and_info(tiny_run, tmp_path, capsys):
    """`rvqa build-index` (encode; --from-index rebuild), `index-info`, --overwrite guard."""
    from rvqa.cli import main
    from rvqa.run_layout import retriever_dir

    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(json.dumps({"caption": c}) + "\n" for c in OTHER_CAPTIONS))
    out, re_out = tmp_path / "idx" / "cli-hnsw", tmp_path / "idx" / "cli-flat"
    args = ["build-index", "--retriever", str(retriever_dir(tiny_run)), "--captions", str(jsonl)]
    queries = tmp_path / "queries.npy"
    np.save(queries, np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32))
    hnsw = [*args, "--out", str(out), "--factory", "HNSW8", "--ef-construction", "16"]
    missing = [*hnsw, "--tuning-queries", str(tmp_path / "nope.npy")]
    assert main(missing) == 1
    assert "nope.npy does not exist" in capsys.readouterr().err
    assert main([*hnsw, "--tuning-queries", str(queries)]) == 1  # 7 columns, not the dim
    assert "tuning queries must have shape" in capsys.readouterr().err
    assert not out.exists()
    dim = json.loads((retriever_dir(tiny_run) / "config.json").read_text())["embed_dim"]
    np.save(queries, np.random.default_rng(0).standard_normal((5, dim)).astype(np.float32))
    hnsw += ["--tuning-queries", str(queries)]
    assert main(hnsw) == 0
    assert f"built {out}: {len(OTHER_CAPTIONS)} captions, HNSW8" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build_params"] == {"efConstruction": 16}
    assert manifest["search_tuning"]["query_proxy"] == "given queries"
    assert manifest["search_tuning"]["queries"] == 5
    assert manifest["count"] == len(OTHER_CAPTIONS)
    before = (out / "manifest.json").read_bytes()
    assert main(hnsw) == 1  # exists: refused, untouched
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before

    rebuild = ["build-index", "--from-index", str(out), "--factory", "Flat", "--out", str(re_out)]
    assert main(rebuild) == 0
    capsys.readouterr()
    assert main(["index-info", str(out)]) == 0
    assert "HNSW8, efConstruction=16" in capsys.readouterr().out
    x = np.load(out / "embeddings.npy")
    y = np.load(re_out / "embeddings.npy")
    np.testing.assert_array_equal(x, y)
    assert json.loads((re_out / "manifest.json").read_text())["factory"] == "Flat"
    for folder in (out, re_out):  # the resolved run config, beside the manifest
        assert (folder / "config.yaml").is_file()

    assert main(["index-info", str(re_out), "--retriever", str(retriever_dir(tiny_run))]) == 0
    info = capsys.readouterr().out
    assert "Flat" in info and str(len(OTHER_CAPTIONS)) in info
    assert main(["index-info", str(re_out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["factory"] == "Flat"


# --------------------------------------------------------------------------- moved run folders


def _copy_run(tiny_run: Path, dest: Path) -> Path:
    """A copy of the tiny run's folder (its models and rvqa_run.json; no index)."""
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    return dest


def test_run_with_its_index_inside_moved_together(tiny_run, run_index, tmp_path, images):
    """An index inside the run folder is recorded without `..` and moves with the run."""
    from rvqa.run_layout import RUN_FILE, read_run_file, write_run_file

    src = _copy_run(tiny_run, tmp_path / "a" / "run")
    shutil.copytree(run_index, src / "indices" / RUN_INDEX)
    old = read_run_file(src)
    write_run_file(src, old.retriever, old.reader, {RUN_INDEX: src / "indices" / RUN_INDEX}, 2)
    recorded = json.loads((src / RUN_FILE).read_text())
    assert recorded["indices"] == {RUN_INDEX: f"indices/{RUN_INDEX}"}
    assert ".." not in json.dumps(recorded)
    moved = tmp_path / "elsewhere" / "deeper" / "run"
    moved.parent.mkdir(parents=True)
    shutil.move(src, moved)
    model = RVQA.from_pretrained(moved, device="cpu")
    assert list(model.indices) == [RUN_INDEX]
    assert (
        Path(model.registry.get(RUN_INDEX).path).resolve()
        == (moved / "indices" / RUN_INDEX).resolve()
    )
    assert model.answer(images[0], "what color is the shape?").evidence


def test_run_moved_with_its_indices_beside_it(tiny_run, run_index, tmp_path, images):
    """runs/NAME + indices/ moved together: found as indices/NAME above the run folder."""
    recorded = json.loads((tiny_run / "rvqa_run.json").read_text())["indices"][RUN_INDEX]
    root = tmp_path / "moved"
    run = _copy_run(tiny_run, root / "runs" / "tiny")  # one level deeper than recorded
    shutil.copytree(run_index, root / "indices" / RUN_INDEX)
    assert not (run / recorded).exists()  # the recorded relative path misses
    model = RVQA.from_pretrained(run, device="cpu")
    assert (
        Path(model.registry.get(RUN_INDEX).path).resolve()
        == (root / "indices" / RUN_INDEX).resolve()
    )
    assert model.answer(images[0], "what color is the shape?").evidence


def test_old_style_run_file_still_loads(tiny_run, run_index, tmp_path, images):
    """rvqa_run.json as written before the run layout module: no format_version, ../../indices."""
    root = tmp_path / "old"
    run = _copy_run(tiny_run, root / "runs" / "demo")
    shutil.copytree(run_index, root / "indices" / RUN_INDEX)
    old = {
        "retriever": "retriever/best"
        if (run / "retriever" / "best").is_dir()
        else "retriever/final",
        "reader": "reader/best" if (run / "reader" / "best").is_dir() else "reader/final",
        "indices": {RUN_INDEX: f"../../indices/{RUN_INDEX}"},
        "top_k": 2,
    }
    (run / "rvqa_run.json").write_text(json.dumps(old, indent=1))
    model = RVQA.from_pretrained(run, device="cpu")
    assert list(model.indices) == [RUN_INDEX] and model.default_top_k == 2
    assert model.answer(images[0], "what color is the shape?").evidence


def test_use_indices_resolves_folders_and_names(fresh, run_index, other_index):
    """One resolution of ``--index``: folders loaded (or swapped in), names checked."""
    from rvqa.errors import UnknownIndexError

    assert fresh.use_indices([]) == []
    names = fresh.use_indices([str(other_index), RUN_INDEX, other_index])
    assert names == [other_index.name, RUN_INDEX]
    assert list(fresh.indices) == [RUN_INDEX, other_index.name]
    before = fresh.registry.get(RUN_INDEX)
    assert fresh.use_indices([run_index]) == [RUN_INDEX]  # a folder of a loaded name: swapped
    assert fresh.registry.get(RUN_INDEX) is not before
    with pytest.raises(UnknownIndexError) as err:
        fresh.use_indices(["nope"])
    assert str(err.value) == (
        "index 'nope' is neither an index folder nor the name of a loaded index "
        f"(loaded: {RUN_INDEX}, {other_index.name})"
    )
    assert isinstance(err.value, KeyError)


# ---------------------------------------------------------------- inference precision


def test_bf16_inference_runs_under_autocast_and_agrees_with_float32(tiny_run):
    """``precision="bf16"``: the towers compute in bfloat16 (a hook sees it), the answers
    agree with float32's and the scores are close."""
    import torch

    from rvqa.distributed import bf16_supported
    from tests.tiny import draw_shape

    if not bf16_supported("cpu"):
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    fp = RVQA.from_pretrained(tiny_run, device="cpu")
    bf = RVQA.from_pretrained(tiny_run, device="cpu", precision="bf16")
    assert fp.precision == "float32" and bf.precision == "bf16"
    seen: list[torch.dtype] = []
    linear = next(m for m in bf.reader.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    images = [draw_shape(c, s) for c in ("red", "green", "blue") for s in ("circle", "square")]
    questions = ["what color is the shape?", "what shape is it?"] * 3
    a32 = fp.answer_batch(images, questions)
    a16 = bf.answer_batch(images, questions)
    assert seen and set(seen) == {torch.bfloat16}
    # bf16 rounding may flip a near-tie of the tiny model: at most one of six
    assert sum(x.answer == y.answer for x, y in zip(a16, a32)) >= len(a32) - 1
    for x, y in zip(a16, a32):
        if x.answer == y.answer:
            assert x.score == pytest.approx(y.score, abs=0.05)
    ev16 = bf.retrieve(images, 2)
    assert all(isinstance(e.score, float) for row in ev16 for e in row)
    seen.clear()
    fp_linear = next(m for m in fp.reader.modules() if isinstance(m, torch.nn.Linear))
    fp_linear.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    fp.answer(images[0], questions[0])
    assert set(seen) == {torch.float32}


def test_precision_is_checked_before_loading(tiny_run, monkeypatch):
    import torch

    with pytest.raises(UsageError, match="precision must be one of float32, bf16, got 'fp8'"):
        RVQA.from_pretrained(tiny_run, device="cpu", precision="fp8")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(UsageError, match="'bf16' is not supported on this CPU"):
        RVQA.from_pretrained(tiny_run, device="cpu", precision="bf16")
