"""Preprocessed pixels held in memory, one row per distinct image.

Retriever training uses it when its pixels fit in 2 GB (``retriever.cache_images``);
reader training always holds every training and validation image here (about
``3 × size² × 2`` bytes each), which bounds the data sets it can train on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from rvqa.data.images import image_key, load_image

__all__ = ["PixelCache"]


class PixelCache:
    """Preprocessed pixel values per image reference (computed once, kept as float16)."""

    def __init__(
        self,
        images: Sequence[Any],
        processor: Any,
        batch_size: int = 256,
        desc: str = "preprocessing images",
    ):
        self.index: dict[Any, int] = {}
        unique = []
        for im in images:
            key = image_key(im)
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
        return self.index[image_key(image)]

    def __getitem__(self, image: Any) -> torch.Tensor:
        return self.pixels[self.row(image)].float()

    @staticmethod
    def nbytes(n_images: int, image_size: int) -> int:
        return n_images * 3 * image_size * image_size * 2
