"""Image-caption pairs for retriever training and evaluation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from rvqa.errors import UsageError
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
        return {
            "pixel_values": pixels,
            "caption": r.caption,
            "image_id": r.image_id,
            "label": getattr(r, "label", None),
        }


class PairCollator:
    """Stacks pixels, tokenises captions, marks extra positives.

    No randomness here: augmentation happens in the model's training forward, so
    the data loader (which runs a batch ahead) never consumes RNG state that a
    checkpoint would then miss on resume.
    """

    def __init__(self, tokenizer: Any, max_length: int, class_names: Sequence[str] | None = None):
        """``class_names``: the model's semantic categories (``config.class_names``);
        given, each batch has ``labels``: a caption's label's index, -1 when it has
        none or one the model does not know."""
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.class_index = (
            None if class_names is None else {c: i for i, c in enumerate(class_names)}
        )

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
        batch = {
            "pixel_values": pixels,
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "positive_mask": pos,
        }
        if self.class_index is not None:
            batch["labels"] = torch.tensor(
                [self.class_index.get(_label_key(it.get("label")), -1) for it in items],
                dtype=torch.long,
            )
        return batch


def _label_key(label: Any) -> str | None:
    """Labels are compared as strings (``class_names`` are strings; a label 3 is "3")."""
    return None if label is None else str(label).strip()


def _labels_of(records: Sequence) -> list:
    """Each record's label: ``CaptionCorpus.labels`` when there (no records built)."""
    labels = getattr(records, "labels", None)
    return [getattr(r, "label", None) for r in records] if labels is None else labels


def class_names_of(records: Sequence) -> list[str]:
    """The sorted distinct labels of caption records."""
    return sorted({_label_key(x) for x in _labels_of(records) if x is not None})


def check_labels(records: Sequence, loss: str, where: str) -> None:
    """Every caption has a label (what the ``center`` term needs).

    Raises:
        UsageError: Naming how many captions lack one, the first of them and where
            labels come from.
    """
    labels = _labels_of(records)
    missing = [i for i, x in enumerate(labels) if x is None]
    if missing:
        first = records[missing[0]]
        raise UsageError(
            f"loss {loss!r} needs a semantic category (label) for every training caption; "
            f"{len(missing)} of {len(labels)} captions of {where} have none (the first: "
            f"caption id {getattr(first, 'caption_id', missing[0])!r}). Labels come from a "
            "Karpathy file's per-image 'label', a JSONL or datasets 'label' column "
            "(captions.columns.label) or easy-vqa's colour and shape"
        )
