"""Image-caption pairs for retriever training and evaluation."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from rvqa.config import CaptionDataConfig

logger = logging.getLogger(__name__)

# Caption sources that have named splits, and which.
SOURCE_SPLITS = {
    "easy_vqa": ("train", "test"),
    "karpathy": ("train", "restval", "val", "test"),
}


def load_caption_split(cfg: CaptionDataConfig, split: str) -> list:
    """Caption records of ``split`` ("train" for sources without splits)."""
    from rvqa.data import load_captions

    if cfg.source == "karpathy":
        splits = list(cfg.splits) if split == "train" else [split]
        return list(load_captions(cfg, split=splits))
    return list(load_captions(cfg, split=split if cfg.source in SOURCE_SPLITS else None))


def has_split(cfg: CaptionDataConfig, split: str | None) -> bool:
    """Whether the caption source has a split of that name."""
    return split is not None and split in SOURCE_SPLITS.get(cfg.source, ())


def holdout_by_image(records: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """Split records into (train, held-out) by image, deterministically."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    images = sorted({r.image_id for r in records}, key=str)
    rng = random.Random(seed)
    rng.shuffle(images)
    n_val = max(1, int(round(fraction * len(images))))
    val_ids = set(images[:n_val])
    train = [r for r in records if r.image_id not in val_ids]
    val = [r for r in records if r.image_id in val_ids]
    return train, val


class PixelCache:
    """Preprocessed pixel values per image reference (computed once, kept as float16)."""

    def __init__(
        self,
        images: Sequence[Any],
        processor: Any,
        batch_size: int = 256,
        desc: str = "preprocessing images",
    ):
        from rvqa.data.images import load_image

        self.index: dict[Any, int] = {}
        unique = []
        for im in images:
            key = _image_key(im)
            if key not in self.index:
                self.index[key] = len(unique)
                unique.append(im)
        chunks = []
        for s in tqdm(
            range(0, len(unique), batch_size), desc=desc, unit="batch", disable=len(unique) < 2000
        ):
            pil = [load_image(im) for im in unique[s : s + batch_size]]
            chunks.append(
                processor(images=pil, return_tensors="pt")["pixel_values"].to(torch.float16)
            )
        self.pixels = torch.cat(chunks) if chunks else torch.empty(0)

    def row(self, image: Any) -> int:
        """Row of ``image`` in :attr:`pixels` (and in anything computed from them in order)."""
        return self.index[_image_key(image)]

    def __getitem__(self, image: Any) -> torch.Tensor:
        return self.pixels[self.row(image)].float()

    @staticmethod
    def nbytes(n_images: int, image_size: int) -> int:
        return n_images * 3 * image_size * image_size * 2


def _image_key(image: Any) -> Any:
    return image if isinstance(image, (str, int)) else id(image)


class PairDataset(Dataset):
    """(image, caption) pairs: items are dicts with pixel values and the caption."""

    def __init__(self, records: Sequence, processor: Any, cache: PixelCache | None = None):
        self.records = list(records)
        self.processor = processor
        self.cache = cache

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from rvqa.data.images import load_image

        r = self.records[i]
        if self.cache is not None:
            pixels = self.cache[r.image]
        else:
            pixels = self.processor(images=[load_image(r.image)], return_tensors="pt")[
                "pixel_values"
            ][0]
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
        pixels = torch.stack([it["pixel_values"] for it in items])  # (B, 3, H, W)
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
