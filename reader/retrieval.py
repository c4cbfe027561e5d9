"""Captions for the reader: retrieve once per image, cache by index fingerprint and k.

VQA datasets ask many questions about each image (easy-vqa ~10, VQAv2 ~5), so
retrieval runs once per distinct image. Results are cached on disk as JSON,
keyed by the knowledge index's fingerprint (a hash of its manifest: retriever
fingerprint, factory, count, creation time), ``k`` and the exclusion rule, so a
rebuilt or swapped index is never served stale captions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rvqa.io import write_text_atomic
from rvqa.reader.data import record_image_key

logger = logging.getLogger(__name__)

# (caption text, score, caption id)
Retrieved = list[tuple[str, float, Any]]


def index_fingerprint(index: Any) -> str:
    """A hash of the knowledge index's identity (changes whenever its contents do)."""
    m = index.manifest
    key = {k: m.get(k) for k in ("retriever_fingerprint", "factory", "count", "created", "files")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def retrieve_for_images(
    retriever: Any,
    index: Any,
    images: dict[str, Any],
    k: int,
    *,
    exclude_ids: dict[str, set] | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 128,
    show_progress: bool = True,
) -> dict[str, Retrieved]:
    """Top-``k`` captions for each image, computed once and cached.

    Args:
        retriever: Has ``embed_images(images, batch_size)`` (a RetrieverModel).
        index: A :class:`~rvqa.retriever.index.KnowledgeIndex`.
        images: image key (:func:`~rvqa.reader.data.record_image_key`) → image
            reference (path, PIL, array).
        k: Captions per image.
        exclude_ids: image key → caption ids never to return for that image (its own
            captions, so training does not learn to copy them).
        cache_dir: Folder for the JSON cache (None: no disk cache).
        batch_size: Image encoding batch size.
        show_progress: Progress bar.

    Returns:
        image key → [(caption, score, caption id), ...] best first (≤ k).
    """
    if k <= 0:
        return {key: [] for key in images}
    extra = max((len(v) for v in (exclude_ids or {}).values()), default=0)
    tag = hashlib.sha256(
        json.dumps(
            {"index": index_fingerprint(index), "k": k, "exclude": bool(exclude_ids)},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    cache_file = Path(cache_dir) / f"retrieval-{tag}.json" if cache_dir else None
    cached: dict[str, Retrieved] = {}
    if cache_file is not None and cache_file.is_file():
        cached = {
            key: [tuple(h) for h in hits]
            for key, hits in json.loads(cache_file.read_text()).items()
        }
    todo = [key for key in images if key not in cached]
    if todo:
        logger.info(
            "retrieving top-%d captions for %d images (%d cached)", k, len(todo), len(cached)
        )
    for s in tqdm(
        range(0, len(todo), batch_size),
        desc="retrieving captions",
        unit="batch",
        disable=not show_progress or not todo,
    ):
        keys = todo[s : s + batch_size]
        emb = retriever.embed_images([images[key] for key in keys], batch_size=batch_size)
        results = index.search(emb, k + extra)
        for key, res in zip(keys, results):
            banned = (exclude_ids or {}).get(key, set())
            hits = [
                (text, float(score), cid)
                for text, score, cid in zip(res.captions, res.scores, res.ids)
                if cid not in banned
            ]
            cached[key] = hits[:k]
    if cache_file is not None and todo:
        write_text_atomic(cache_file, json.dumps(cached, default=str))
    return {key: cached[key] for key in images}


def own_caption_ids(caption_records: Sequence[Any]) -> dict[str, set]:
    """image key → the ids of that image's own captions (for ``exclude_ids``).

    Keys are :func:`~rvqa.reader.data.record_image_key` of the caption records, the
    keys VQA records of the same image ids have.
    """
    out: dict[str, set] = {}
    for r in caption_records:
        if r.image_id is not None:
            out.setdefault(record_image_key(r), set()).add(r.caption_id)
    return out
