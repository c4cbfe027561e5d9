"""Retriever evaluation protocols (coco1k / coco5k / f30k1k / all) and `rvqa evaluate-retriever`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rvqa.data.records import CaptionRecord
from rvqa.errors import UsageError
from rvqa.metrics import recall_at_k, recall_at_k_folds, recall_at_k_multi
from rvqa.retriever.evaluation import PROTOCOLS, evaluate_retriever, protocol_records

DIM = 8


class StubEncoder:
    """Known embeddings: images are integer ids, captions are looked up by text."""

    def __init__(self, image_vectors: np.ndarray, caption_vectors: dict[str, np.ndarray]):
        self.image_vectors = image_vectors
        self.caption_vectors = caption_vectors
        self.texts_seen: list[str] = []

    def embed_images(self, images, batch_size=128):
        return self.image_vectors[np.asarray(images, dtype=np.int64)]

    def embed_texts(self, texts, batch_size=128):
        self.texts_seen.extend(texts)
        return np.stack([self.caption_vectors[t] for t in texts])


def generated(n_images: int, per_image: int = 6, seed: int = 0):
    """``per_image`` captions per image, interleaved (caption j of every image, then j+1);
    unit vectors; the 6th caption of each image is its exact image vector (cosine 1:
    a sure image->text hit if it were kept)."""
    rng = np.random.default_rng(seed)
    image_vectors = rng.standard_normal((n_images, DIM)).astype(np.float32)
    image_vectors /= np.linalg.norm(image_vectors, axis=1, keepdims=True)
    caption_vectors: dict[str, np.ndarray] = {}
    records = []
    for j in range(per_image):
        for i in range(n_images):
            text = f"image {i} caption {j}"
            noise = 0.0 if j == 5 else 1.5
            vector = image_vectors[i] + noise * rng.standard_normal(DIM).astype(np.float32)
            caption_vectors[text] = vector / np.linalg.norm(vector)  # unit: cosine similarity
            records.append(CaptionRecord(text, f"{i}-{j}", image_id=f"img{i}", image=i))
    return records, StubEncoder(image_vectors, caption_vectors)


def expected_arrays(records, encoder, keep_per_image):
    kept = [r for r in records if int(r.caption_id.split("-")[1]) < keep_per_image]
    texts = np.stack([encoder.caption_vectors[r.caption] for r in kept])
    t2i = np.array([r.image for r in kept])
    return encoder.image_vectors, texts, t2i


@pytest.fixture(scope="module")
def coco_test():
    return generated(5000)


def test_coco5k_and_coco1k_keep_the_first_five_captions(coco_test):
    records, encoder = coco_test
    images, texts, t2i = expected_arrays(records, encoder, 5)
    got5k = evaluate_retriever(encoder, records, protocol="coco5k")
    assert got5k == recall_at_k(images, texts, t2i)
    assert len(encoder.texts_seen) == 25_000  # 5 of the 6 captions of 5,000 images
    assert not any(t.endswith("caption 5") for t in encoder.texts_seen)
    got1k = evaluate_retriever(encoder, records, protocol="coco1k")
    assert got1k == recall_at_k_folds(images, texts, t2i, n_folds=5)
    assert got1k["i2t_r1"] > got5k["i2t_r1"]  # 1K galleries are easier
    # The sixth caption (an exact copy of the image) would have changed the result:
    assert evaluate_retriever(encoder, records, protocol="all")["i2t_r1"] == 100.0
    assert got5k["i2t_r1"] < 100.0


def test_f30k1k_counts_and_caps():
    records, encoder = generated(1000, seed=1)
    images, texts, t2i = expected_arrays(records, encoder, 5)
    assert evaluate_retriever(encoder, records, protocol="f30k1k") == recall_at_k(
        images, texts, t2i
    )
    with pytest.raises(
        UsageError,
        match=r"protocol 'coco5k' \(COCO 5K test images as one gallery\) needs exactly 5,000 "
        r"test images; these records have 1,000 \(from 6,000 captions\)",
    ):
        evaluate_retriever(encoder, records, protocol="coco5k")
    with pytest.raises(
        UsageError, match="needs exactly 5,000 test images; these records have 1,000"
    ):
        evaluate_retriever(encoder, records, protocol="coco1k")


def test_image_count_must_be_exact(coco_test):
    records, encoder = coco_test
    missing_one = [r for r in records if r.image_id != "img17"]
    with pytest.raises(UsageError, match="these records have 4,999"):
        evaluate_retriever(encoder, missing_one, protocol="coco5k")
    with pytest.raises(
        UsageError, match="needs exactly 1,000 test images; these records have 5,000"
    ):
        evaluate_retriever(encoder, records, protocol="f30k1k")


def test_protocol_records_and_bad_arguments():
    records, encoder = generated(1000, per_image=7, seed=2)
    kept = protocol_records(records, "f30k1k")
    assert [r.caption_id for r in kept] == [
        r.caption_id for r in records if int(r.caption_id.split("-")[1]) < 5
    ]
    assert protocol_records(records, "all") == records
    assert set(PROTOCOLS) == {"all", "coco1k", "coco5k", "f30k1k"}
    with pytest.raises(
        UsageError, match="unknown retrieval protocol 'coco25k'; choose one of all, coco1k"
    ):
        evaluate_retriever(encoder, records, protocol="coco25k")
    with pytest.raises(UsageError, match="protocol 'f30k1k' ranks every caption; dedupe=True"):
        evaluate_retriever(encoder, records, protocol="f30k1k", dedupe=True)
    with pytest.raises(ValueError, match="no records to evaluate"):
        evaluate_retriever(encoder, [], protocol="all")


def test_all_with_shared_captions_uses_distinct_strings():
    # 4 images, 2 distinct caption strings (case and spaces differ): many-to-many.
    vec = {"a red shape": np.array([1.0, 0.0]), "a blue shape": np.array([0.0, 1.0])}
    vec["A red shape "] = vec["a red shape"]
    images = np.array([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [0.2, 0.8]])
    encoder = StubEncoder(images, vec)
    captions = ["a red shape", "A red shape ", "a blue shape", "a blue shape"]
    records = [CaptionRecord(c, i, image_id=i, image=i) for i, c in enumerate(captions)]
    got = evaluate_retriever(encoder, records)
    want = recall_at_k_multi(
        images, np.stack([vec["a red shape"], vec["a blue shape"]]), [{0}, {0}, {1}, {1}]
    )
    assert got == dict(sorted({**want, "num_images": 4.0, "num_captions": 2.0}.items()))


def test_cli_evaluate_retriever_end_to_end(tiny_run, capsys):
    from rvqa.cli import main
    from rvqa.config import load_config
    from rvqa.data import load_caption_split
    from rvqa.retriever.modeling import RetrieverModel

    config = tiny_run / "retriever" / "config.yaml"
    model_dir = tiny_run / "retriever" / "final"
    argv = ["evaluate-retriever", "--config", str(config), "--model", str(model_dir)]
    assert main([*argv, "--split", "test", "--json", "--batch-size", "16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = load_config(config)
    records = load_caption_split(cfg.retriever.captions, "test")
    want = evaluate_retriever(RetrieverModel.from_pretrained(model_dir), records, batch_size=16)
    assert printed == pytest.approx(want, abs=1e-12)
    assert set(printed) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}

    # A named protocol on a split of the wrong size: one line, exit status 1.
    assert main([*argv, "--split", "test", "--protocol", "coco5k"]) == 1
    err = capsys.readouterr().err
    assert "protocol 'coco5k'" in err and "needs exactly 5,000 test images" in err
    assert "Traceback" not in err
