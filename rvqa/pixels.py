"""Images streamed through ``DataLoader`` workers: decode + image processor per item.

No stage keeps every image's pixels: datasets call :func:`image_pixels` in
``__getitem__``, so the loader's workers decode and preprocess while the model
trains, and memory holds only the batches in flight. Pixels leave the workers
as float16 for training and the feature cache (half the bytes through shared and
pinned memory; the models cast them to their own dtype) and as float32 for the
reader's retrieval pass, which must embed images exactly as inference does
(:meth:`RetrieverModel.embed_images`).

An :class:`~rvqa.errors.RVQAError` raised in a worker (a missing or corrupt
image: :class:`~rvqa.errors.ImageLoadError`) would reach the main process as
torch's re-raise: a message holding the worker's traceback, or a
``RuntimeError`` for errors whose constructor takes other arguments.
:func:`carry_errors` makes a loader deliver such an error as data instead, and
:func:`raise_carried` raises the original error (its class and one-line
message, naming the file) where the batch is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

from rvqa.data.images import load_image
from rvqa.errors import RVQAError

__all__ = [
    "ImagePixels",
    "image_pixels",
    "loader_options",
    "carry_errors",
    "raise_carried",
]


def image_pixels(image: Any, processor: Any, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """One image (path, PIL image, array) → its (3, H, W) pixel values in ``dtype``.

    Raises:
        ImageLoadError: The image cannot be read (naming the file).
    """
    pil = load_image(image)
    return processor(images=[pil], return_tensors="pt")["pixel_values"][0].to(dtype)


class ImagePixels(Dataset):
    """A sequence of images → pixel values (float16 unless ``dtype``), preprocessed on access.

    Args:
        images: Image references (anything :func:`~rvqa.data.images.load_image`
            takes); a lazy sequence stays lazy.
        processor: The image processor (``images=[PIL], return_tensors="pt"``).
        dtype: Pixel dtype leaving the workers.
    """

    def __init__(self, images: Sequence[Any], processor: Any, dtype: torch.dtype = torch.float16):
        self.images = images
        self.processor = processor
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return image_pixels(self.images[i], self.processor, self.dtype)


def loader_options(num_workers: int, device: Any = None) -> dict[str, Any]:
    """``DataLoader`` keywords for streaming images onto ``device``.

    ``num_workers`` processes decode and preprocess; batches are pinned when the
    device is a GPU (faster, asynchronous host-to-device copies).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    return {"num_workers": num_workers, "pin_memory": device.type == "cuda"}


class _Carried:
    """An :class:`RVQAError` raised while a worker built a batch, delivered as the batch."""

    def __init__(self, error: RVQAError):
        self.error = error


class _CarryingDataset(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        if get_worker_info() is None:  # the main process: raise as usual
            return self.dataset[i]
        try:
            return self.dataset[i]
        except RVQAError as err:
            return _Carried(err)


class _CarryingCollate:
    def __init__(self, collate_fn: Callable[[list], Any]):
        self.collate_fn = collate_fn

    def __call__(self, items: list) -> Any:
        for item in items:
            if isinstance(item, _Carried):
                return item
        return self.collate_fn(items)


def carry_errors(
    dataset: Dataset, collate_fn: Callable[[list], Any]
) -> tuple[Dataset, Callable[[list], Any]]:
    """``(dataset, collate_fn)`` for a ``DataLoader`` whose workers deliver an
    :class:`RVQAError` as the batch (see :func:`raise_carried`) instead of
    torch's traceback-in-a-message re-raise. In the main process (``num_workers=0``)
    errors raise as usual."""
    return _CarryingDataset(dataset), _CarryingCollate(collate_fn)


def raise_carried(batch: Any) -> Any:
    """``batch``, or the error a worker delivered in its place, raised (see :func:`carry_errors`)."""
    if isinstance(batch, _Carried):
        raise batch.error
    return batch
