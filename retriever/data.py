"""Image-caption pairs for retriever training and evaluation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from rvqa.pixels import image_pixels

logger = logging.getLogger(__name__)


class PairDataset(Dataset):
    """(image, caption) pairs: items are dicts with pixel values and the caption.

    Images are read and preprocessed on access (in the training loader's workers,
    :mod:`rvqa.pixels`); pixel values are float16, as they leave the workers.
    """

    def __init__(self, records: Sequence, processor: Any):
        self.records = records  # a lazy corpus stays lazy
        self.processor = processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        pixels = image_pixels(r.image, self.processor)
        return {"pixel_values": pixels, "caption": r.caption, "image_id": r.image_id}


class PairCollator:
    """Stacks pixels, tokenises captions, marks extra positives.

    No randomness here: augmentation happens in the model's training forward, so
    the data loader (which runs a batch ahead) never consumes RNG state that a
    checkpoint would then miss on resume.
    """

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: list[dict]) -> dict:
        pixels = torch.stack([it["pixel_values"] for it in items]).float()  # (B, 3, H, W)
        captions = [it["caption"] for it in items]
        enc = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        # Same image or identical caption text: a positive, never a negative.
        img = [str(it["image_id"]) for it in items]
        norm = [c.strip().lower() for c in captions]
        b = len(items)
        pos = torch.tensor(
            [[img[i] == img[j] or norm[i] == norm[j] for j in range(b)] for i in range(b)],
            dtype=torch.bool,
        )
        return {
            "pixel_values": pixels,
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "positive_mask": pos,
        }
