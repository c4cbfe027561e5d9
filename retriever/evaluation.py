"""Recall@K of the retriever on held-out image-caption pairs (exact, not via an index).

Standard protocol (VSE++, COCO/Flickr30K): each image has ~5 captions; an
image→text hit is any of its captions in the top K; a text→image hit is the
caption's own image in the top K. COCO 1K = mean over 5 folds of 1,000 test
images, 5K = all 5,000 (see :func:`rvqa.metrics.recall_at_k`).

Corpora where many images share one caption string (easy-vqa's derived
captions: a few dozen distinct strings for thousands of images) are evaluated
with distinct caption strings as the gallery (``dedupe=True``): a hit is the
image's own caption *text* among the top K distinct captions, and a text→image
hit is any image carrying that caption.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from rvqa.distributed import sharded_map
from rvqa.metrics import recall_at_k, recall_at_k_folds

logger = logging.getLogger(__name__)


def evaluate_retriever(
    model: Any,
    records: Sequence[Any],
    *,
    dedupe: bool | None = None,
    batch_size: int = 128,
    accelerator: Any = None,
    folds: int = 1,
) -> dict[str, float]:
    """Recall@1/5/10 (i2t, t2i) and rsum of ``model`` on caption ``records``.

    Args:
        model: A :class:`RetrieverModel` (or anything with ``embed_images``/``embed_texts``).
        records: Caption records with ``.image``, ``.image_id`` and ``.caption``.
        dedupe: Use distinct caption strings as the gallery (see module doc).
            ``None``: automatically when captions repeat across images.
        batch_size: Encoding batch size.
        accelerator: Split the encoding across processes (every process gets the result).
        folds: ``5`` for the COCO 1K protocol (mean over 5 folds of the images).
    """
    if not records:
        raise ValueError("no records to evaluate the retriever on")
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
        if folds > 1:
            return recall_at_k_folds(img_emb, txt_emb, img_of_caption, n_folds=folds)
        return recall_at_k(img_emb, txt_emb, img_of_caption)

    # Distinct caption strings as the gallery: many-to-many ground truth.
    distinct: dict[str, int] = {}
    texts_of_image: list[set[int]] = [set() for _ in images]
    for t, im in zip(texts, img_of_caption):
        idx = distinct.setdefault(t.strip().lower(), len(distinct))
        texts_of_image[im].add(idx)
    images_of_text: list[set[int]] = [set() for _ in distinct]
    for im, idxs in enumerate(texts_of_image):
        for idx in idxs:
            images_of_text[idx].add(im)
    gallery = list(distinct)
    txt_emb = embed_texts(gallery, batch_size=batch_size)
    ks = (1, 5, 10)
    i2t = recall_multi(img_emb, txt_emb, texts_of_image, ks)
    t2i = recall_multi(txt_emb, img_emb, images_of_text, ks)
    out = {f"i2t_r{k}": v for k, v in zip(ks, i2t)}
    out.update({f"t2i_r{k}": v for k, v in zip(ks, t2i)})
    out["rsum"] = float(sum(i2t) + sum(t2i))
    out["num_images"] = float(len(images))
    out["num_captions"] = float(len(gallery))
    return dict(sorted(out.items()))


def recall_multi(
    queries: np.ndarray,
    gallery: np.ndarray,
    positives: Sequence[set[int]],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> list[float]:
    """Recall@K (percent) where query i's hits are any gallery item in ``positives[i]``.

    Rank of a query = rank of its best positive; ties go to the lower gallery
    index (a stable sort), as in :func:`rvqa.metrics.recall_at_k`.
    """
    ranks = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), chunk_size):
        sims = queries[s : s + chunk_size] @ gallery.T  # (chunk, G)
        for row, i in enumerate(range(s, min(s + chunk_size, len(queries)))):
            pos = np.fromiter(sorted(positives[i]), dtype=np.int64)
            if len(pos) == 0:
                raise ValueError(f"query {i} has no positive in the gallery")
            sc = sims[row]
            best = pos[np.lexsort((pos, -sc[pos]))[0]]  # highest score, then lowest index
            ranks[i] = np.count_nonzero(sc > sc[best]) + np.count_nonzero(sc[:best] == sc[best])
    return [float(100.0 * np.mean(ranks < k)) for k in ks]
