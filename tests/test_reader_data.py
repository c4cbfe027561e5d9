"""The reader's training data: dataset items, the record image key, the frozen-tower feature cache."""

from __future__ import annotations

import logging

import numpy as np
import torch

from rvqa.data import CaptionRecord, VQARecord
from rvqa.pixels import PixelCache
from rvqa.reader.answers import build_vocab
from rvqa.reader.data import ReaderCollator, ReaderDataset, record_image_key, visual_features_for
from rvqa.reader.retrieval import own_caption_ids
from rvqa.towers import small_cnn_processor
from tests.test_reader_model import images, processor, tiny_model, tokenizer  # noqa: F401


def _pixels(n: int) -> tuple[list, PixelCache]:
    ims = images(n)
    return ims, PixelCache(ims, small_cnn_processor(32))


def _records(ims: list) -> list[VQARecord]:
    return [
        VQARecord(
            question_id=10 + i,
            image_id=i,
            image=im,
            question="what color is the shape?",
            answers=["red"] * 10,
        )
        for i, im in enumerate(ims)
    ]


def test_record_image_key_matches_own_caption_ids():
    vqa = VQARecord(question_id=1, image_id=7, image="x.png", question="q?")
    caps = [CaptionRecord(caption_id=3, caption="a red circle", image_id=7)]
    assert record_image_key(vqa) == "7"
    assert own_caption_ids(caps) == {record_image_key(vqa): {3}}


def test_features_equal_the_tower_output_per_image(tokenizer):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=True).train()
    _, pixels = _pixels(5)
    feats = visual_features_for(model, pixels, batch_size=2)
    assert feats.dtype == torch.float32 and feats.shape[0] == 5
    assert model.training and not model.vision_model.training  # modes restored
    with torch.no_grad():
        one_by_one = torch.cat(
            [model.vision_features(pixels.pixels[i : i + 1].float()) for i in range(5)]
        )
    torch.testing.assert_close(feats, one_by_one, rtol=1e-6, atol=1e-6)


def test_no_cache_for_a_trained_tower(tokenizer):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=False)
    _, pixels = _pixels(2)
    assert visual_features_for(model, pixels) is None


def test_over_budget_runs_the_tower_per_step_and_says_so(tokenizer, caplog):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=True)
    _, pixels = _pixels(3)
    # 3 images × 4 tokens (grid 2) × 16 channels × 4 bytes = 768 bytes
    with caplog.at_level(logging.INFO, logger="rvqa.reader.data"):
        assert visual_features_for(model, pixels, max_bytes=767) is None
    assert "exceeds the" in caplog.text and "runs on every step" in caplog.text
    assert visual_features_for(model, pixels, max_bytes=768).shape == (3, 4, 16)


def test_dataset_items_read_the_cached_rows(tokenizer, processor):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=True)
    ims, pixels = _pixels(4)
    records = _records(ims)
    vocab = build_vocab(r.answers for r in records)
    feats = visual_features_for(model, pixels)
    cached = ReaderDataset(records, pixels, None, vocab, 0, features=feats)
    plain = ReaderDataset(records, pixels, None, vocab, 0)
    for i in range(4):
        assert "pixel_values" not in cached[i]
        assert torch.equal(cached[i]["visual_features"], feats[pixels.row(ims[i])])
        torch.testing.assert_close(plain[i]["pixel_values"], pixels[ims[i]])
    # The model gives the same logits from cached features as from pixels.
    collate = ReaderCollator(processor, with_labels=False)
    with torch.no_grad():
        a = model(**collate([cached[i] for i in range(4)])).logits
        b = model(**collate([plain[i] for i in range(4)])).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cached[0]["labels"], plain[0]["labels"])


def test_no_images_no_features(tokenizer):  # noqa: F811
    model = tiny_model(tokenizer, freeze_vision=True)
    assert visual_features_for(model, PixelCache([], small_cnn_processor(32))) is None
