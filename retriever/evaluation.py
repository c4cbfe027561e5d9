"""Recall@K of the retriever on held-out image-caption pairs (exact, not via an index).

Standard protocol (VSE++, COCO/Flickr30K): an image→text hit is any of the
image's captions in the top K; a text→image hit is the caption's own image in
the top K (:func:`rvqa.metrics.recall_at_k`). The named protocols of
:func:`evaluate_retriever` fix the test set as the papers do:

- ``coco1k``: the 5,000 COCO test images (Karpathy split) in 5 folds of 1,000,
  every metric the mean over the folds;
- ``coco5k``: the same 5,000 images as one gallery;
- ``f30k1k``: the 1,000 Flickr30K test images as one gallery;
- ``all``: every image of the records, as many captions as they have.

The three named protocols keep each image's first 5 captions (record order;
a few COCO images have 6 or 7) and refuse a split with another image count.

Corpora where many images share one caption string (easy-vqa's derived
captions: a few dozen distinct strings for thousands of images) are evaluated
under ``all`` with distinct caption strings as the gallery (``dedupe=True``):
a hit is the image's own caption *text* among the top K distinct captions, and
a text→image hit is any image carrying that caption
(:func:`rvqa.metrics.recall_at_k_multi`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rvqa.distributed import sharded_map
from rvqa.errors import UsageError
from rvqa.metrics import recall_at_k, recall_at_k_folds, recall_at_k_multi

logger = logging.getLogger(__name__)

CAPTIONS_PER_IMAGE = 5
"""Captions per image that the named protocols keep (the first 5 of each image)."""


@dataclass(frozen=True)
class Protocol:
    """A retrieval test protocol: how many test images, in how many folds."""

    name: str
    num_images: int | None
    """Exact image count required (``None``: any)."""
    folds: int = 1
    captions_per_image: int | None = CAPTIONS_PER_IMAGE
    """Captions kept per image (the first ones; ``None``: all)."""
    description: str = ""


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("all", None, 1, None, "every image of the split, all its captions"),
        Protocol("coco1k", 5000, 5, description="COCO 5K test images, mean over 5 folds of 1,000"),
        Protocol("coco5k", 5000, 1, description="COCO 5K test images as one gallery"),
        Protocol("f30k1k", 1000, 1, description="Flickr30K 1K test images"),
    )
}


def protocol_records(records: Sequence[Any], protocol: str | Protocol) -> list[Any]:
    """The records a protocol evaluates: each image's first captions, image count checked.

    Args:
        records: Caption records with ``.image_id`` (image order = first appearance).
        protocol: A name of :data:`PROTOCOLS` or a :class:`Protocol`.

    Raises:
        UsageError: An unknown protocol name, or the records do not hold exactly
            the protocol's number of images.
    """
    p = _protocol(protocol)
    kept: list[Any] = []
    per_image: dict[str, int] = {}
    for r in records:
        key = str(r.image_id)
        seen = per_image.get(key, 0)
        per_image[key] = seen + 1
        if p.captions_per_image is None or seen < p.captions_per_image:
            kept.append(r)
    if p.num_images is not None and len(per_image) != p.num_images:
        raise UsageError(
            f"protocol {p.name!r} ({p.description}) needs exactly {p.num_images:,} test "
            f"images; these records have {len(per_image):,} (from {len(records):,} captions). "
            "Evaluate the matching test split, or use protocol 'all'."
        )
    return kept


def evaluate_retriever(
    model: Any,
    records: Sequence[Any],
    *,
    protocol: str | Protocol = "all",
    dedupe: bool | None = None,
    batch_size: int = 128,
    accelerator: Any = None,
) -> dict[str, float]:
    """Recall@1/5/10 (i2t, t2i) and rsum of ``model`` on caption ``records``.

    Args:
        model: A :class:`RetrieverModel` (or anything with ``embed_images``/``embed_texts``
            taking a list and ``batch_size`` and returning an ``(n, d)`` array).
        records: Caption records with ``.image``, ``.image_id`` and ``.caption``.
        protocol: ``"all"`` (default), ``"coco1k"``, ``"coco5k"`` or ``"f30k1k"``
            (see the module doc: image count checked, first 5 captions per image).
        dedupe: Use distinct caption strings as the gallery (see module doc).
            ``None``: automatically when captions repeat across images, under
            protocol ``all`` only; the named protocols never dedupe.
        batch_size: Encoding batch size.
        accelerator: Split the encoding across processes (every process gets the result).
            The model must already be on the device it should run on (its inputs
            follow its parameters: ``accelerator.device`` in the run commands).

    Returns:
        ``{"i2t_r1", "i2t_r10", "i2t_r5", "rsum", "t2i_r1", ...}`` in percent;
        the deduplicated form adds ``num_images`` and ``num_captions``.

    Raises:
        ValueError: No records.
        UsageError: Unknown protocol, wrong image count, or ``dedupe=True`` with
            a named protocol.
    """
    if not records:
        raise UsageError("no records to evaluate the retriever on")
    p = _protocol(protocol)
    if p.name != "all":
        if dedupe:
            raise UsageError(f"protocol {p.name!r} ranks every caption; dedupe=True is for 'all'")
        dedupe = False
        records = protocol_records(records, p)
    image_order: dict[str, int] = {}
    images: list[Any] = []
    for r in records:
        key = str(r.image_id)
        if key not in image_order:
            image_order[key] = len(images)
            images.append(r.image)
    img_of_caption = np.array([image_order[str(r.image_id)] for r in records])
    texts = [r.caption for r in records]
    if dedupe is None:
        dedupe = len({t.strip().lower() for t in texts}) < len(texts) * 0.9

    embed_images = model.embed_images
    embed_texts = model.embed_texts
    img_emb = sharded_map(lambda xs: embed_images(xs, batch_size=batch_size), images, accelerator)

    if not dedupe:
        txt_emb = sharded_map(lambda xs: embed_texts(xs, batch_size=batch_size), texts, accelerator)
        if p.folds > 1:
            return recall_at_k_folds(img_emb, txt_emb, img_of_caption, n_folds=p.folds)
        return recall_at_k(img_emb, txt_emb, img_of_caption)

    # Distinct caption strings as the gallery: many-to-many ground truth.
    distinct: dict[str, int] = {}
    texts_of_image: list[set[int]] = [set() for _ in images]
    for t, im in zip(texts, img_of_caption):
        texts_of_image[im].add(distinct.setdefault(t.strip().lower(), len(distinct)))
    gallery = list(distinct)
    txt_emb = sharded_map(lambda xs: embed_texts(xs, batch_size=batch_size), gallery, accelerator)
    out = recall_at_k_multi(img_emb, txt_emb, texts_of_image)
    out["num_images"] = float(len(images))
    out["num_captions"] = float(len(gallery))
    return dict(sorted(out.items()))


def _protocol(protocol: str | Protocol) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise UsageError(
            f"unknown retrieval protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}"
        )
    return PROTOCOLS[protocol]
