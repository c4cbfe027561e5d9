"""The reader's training data: VQA records → model inputs.

* :func:`load_reader_data` — a run config's (train, validation) VQA records.
* :class:`ReaderDataset` — items of pixels (or cached image-tower features),
  question, retrieved captions and soft answer targets.
* :class:`ReaderCollator` — tokenises a batch with the reader's processor.
* :func:`visual_features_for` — a frozen image tower's features, computed once
  per distinct image within a memory budget (:data:`FEATURE_CACHE_MAX_BYTES`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from rvqa.config import RunConfig
from rvqa.data import holdout_by_image, load_vqa
from rvqa.distributed import sharded_map
from rvqa.errors import DataFormatError
from rvqa.pixels import PixelCache
from rvqa.reader.answers import AnswerVocab
from rvqa.reader.processing import ReaderProcessor

logger = logging.getLogger(__name__)

FEATURE_CACHE_MAX_BYTES = 2 * 1024**3
"""Largest cache of frozen image-tower features (float32) that reader training keeps
in memory: 2 GiB, e.g. 100,000 images × 4 tokens × 768 channels × 4 bytes = 1.2 GB.
Over it, the tower runs on every training step instead (logged)."""


def record_image_key(record: Any) -> str:
    """The key a VQA record's image has in retrieval results: ``str(record.image_id)``.

    (Not :func:`rvqa.data.images.image_key`, which keys an image *object*.)
    """
    return str(record.image_id)


def load_reader_data(cfg: RunConfig) -> tuple[list, list]:
    """(train, validation) VQA records: validation = ``reader.eval_split`` or held-out images.

    Raises:
        DataFormatError: The training split has no answers.
    """
    d, s = cfg.data, cfg.reader
    train_set = load_vqa(d, d.train_split)
    if d.train_fraction < 1.0:
        train_set = train_set.subset(d.train_fraction, seed=s.seed)
    train_records = list(train_set)
    if s.eval_split:
        val_records = list(load_vqa(d, s.eval_split))
    else:
        train_records, val_records = holdout_by_image(train_records, s.val_fraction, s.seed)
    if s.max_eval_questions and len(val_records) > s.max_eval_questions:
        val_records = val_records[: s.max_eval_questions]
    for r in train_records[:1]:
        if r.answers is None:
            raise DataFormatError(
                f"the training split {d.train_split!r} has no annotations (answers)"
            )
    return train_records, val_records


def _k_for(question_id: Any, top_k: int, k_dropout: float, seed: int) -> int:
    """A per-question k: top_k, or with probability k_dropout a random k in [0, top_k].

    Derived from a hash (not the RNG), so the data loader's read-ahead never
    disturbs the RNG state that checkpoints save.
    """
    if k_dropout <= 0:
        return top_k
    h = int(hashlib.sha256(f"{seed}:{question_id}".encode()).hexdigest()[:12], 16)
    if (h % 10_000) / 10_000 >= k_dropout:
        return top_k
    return (h // 10_000) % (top_k + 1)


class ReaderDataset(Dataset):
    """Items: pixel values (or cached visual features), question, captions, scores, targets.

    Args:
        records: VQA records (``image``, ``image_id``, ``question``, ``question_id``, ``answers``).
        pixels: Preprocessed pixels of every record's image.
        retrieved: :func:`record_image_key` → retrieved ``(caption, score, id)`` best
            first (None: no captions).
        vocab: The answer vocabulary (soft targets).
        top_k: Captions per question.
        k_dropout: Probability of a random k in [0, top_k] per question (see :func:`_k_for`).
        rule: Soft-target rule of :meth:`AnswerVocab.soft_target_vector`.
        seed: Seed of the k-dropout hash.
        features: (images, V, C) image-tower features, row i = ``pixels`` row i; given,
            items carry ``visual_features`` instead of ``pixel_values``.
    """

    def __init__(
        self,
        records: Sequence[Any],
        pixels: PixelCache,
        retrieved: dict[str, list] | None,
        vocab: AnswerVocab,
        top_k: int,
        k_dropout: float = 0.0,
        rule: str = "min3",
        seed: int = 0,
        features: torch.Tensor | None = None,
    ):
        self.records = list(records)
        self.pixels = pixels
        self.features = features
        self.retrieved = retrieved
        self.vocab = vocab
        self.top_k = top_k
        self.k_dropout = k_dropout
        self.rule = rule
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        hits = (self.retrieved or {}).get(record_image_key(r), [])
        k = _k_for(r.question_id, self.top_k, self.k_dropout, self.seed) if self.retrieved else 0
        hits = hits[:k]
        visual = (
            {"visual_features": self.features[self.pixels.row(r.image)]}
            if self.features is not None
            else {"pixel_values": self.pixels[r.image]}
        )
        return {
            **visual,
            "question": r.question,
            "captions": [h[0] for h in hits],
            "scores": [h[1] for h in hits],
            "labels": self.vocab.soft_target_vector(r.answers or [], self.rule),
        }


class ReaderCollator:
    """Tokenises a batch with the reader's processor (cached per distinct string)."""

    def __init__(self, processor: ReaderProcessor, with_labels: bool = True):
        self.processor = processor
        self.with_labels = with_labels

    def __call__(self, items: list[dict]) -> dict:
        batch = self.processor(
            None,
            [it["question"] for it in items],
            captions=[it["captions"] for it in items],
            scores=[it["scores"] for it in items],
        )
        out = dict(batch)
        key = "visual_features" if "visual_features" in items[0] else "pixel_values"
        out[key] = torch.stack([it[key] for it in items])
        if self.with_labels:
            out["labels"] = torch.from_numpy(np.stack([it["labels"] for it in items]))
        return out


# --------------------------------------------------------------------------- feature cache


@torch.no_grad()
def visual_features_for(
    model: Any,
    pixels: PixelCache,
    *,
    max_bytes: int = FEATURE_CACHE_MAX_BYTES,
    accelerator: Any = None,
    batch_size: int = 256,
) -> torch.Tensor | None:
    """A frozen image tower's features of every image in ``pixels``, computed once.

    A frozen tower stays in eval mode while the reader trains (no dropout, fixed
    normalisation statistics), so its output is a fixed function of the image and
    row i here equals what :meth:`ReaderModel.vision_features` gives ``pixels``
    row i on any training step. The tower runs under the accelerator's autocast
    (as the training forward does) on its device; with several processes each
    encodes its shard and every process receives all rows (each trains on rows
    of any image).

    Args:
        model: A :class:`~rvqa.reader.modeling.ReaderModel`.
        pixels: Preprocessed pixels of every image training and evaluation read.
        max_bytes: Memory budget: images × tokens × channels × 4 bytes (float32).
        accelerator: The run's ``Accelerator`` (None: one process, the model's device).
        batch_size: Images per tower forward.

    Returns:
        (images, V, C) float32 features on the CPU; None when the tower is not frozen
        or the features would exceed ``max_bytes`` (the tower then runs per step).
    """
    n = len(pixels.pixels)
    if not model.config.freeze_vision or n == 0:
        return None
    device = accelerator.device if accelerator is not None else model.device
    model.to(device)
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    dtype = next(model.vision_model.parameters()).dtype  # as forward casts pixel_values
    was = model.training
    model.eval()
    try:

        def encode(rows: list[int]) -> np.ndarray:
            out = []
            for s in range(0, len(rows), batch_size):
                batch = pixels.pixels[rows[s : s + batch_size]].float().to(device, dtype)
                with autocast():
                    out.append(model.vision_features(batch).float().cpu().numpy())
            return np.concatenate(out)

        probe = encode([0])  # (1, V, C): the size of one image's features
        nbytes = n * probe[0].size * 4
        if nbytes > max_bytes:
            logger.info(
                "not caching frozen image-tower features: %d images × %d tokens × %d channels "
                "× 4 bytes = %.2f GB exceeds the %.2f GB budget; the tower runs on every step",
                n,
                probe.shape[1],
                probe.shape[2],
                nbytes / 1e9,
                max_bytes / 1e9,
            )
            return None
        features = torch.from_numpy(sharded_map(encode, list(range(n)), accelerator))
    finally:
        model.train(was)
    logger.info(
        "cached frozen image-tower features of %d images (%s, %.1f MB)",
        n,
        tuple(features.shape[1:]),
        nbytes / 1e6,
    )
    return features
