"""Caption corpus preparation: validate captions and ids, drop duplicates, encode (sharded)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rvqa.distributed import shard_bounds
from rvqa.errors import DataFormatError
from rvqa.retriever.index.types import CaptionEncoder

__all__ = [
    "check_embeddings",
    "dedupe_captions",
    "encode_captions",
    "normalise_ids",
    "prepare_corpus",
]

logger = logging.getLogger(__name__)


def prepare_corpus(captions: Any, ids: Sequence[Any] | None = None) -> tuple[list[str], list]:
    """Validate captions and ids; returns stripped captions and ids (default 0..N-1).

    Args:
        captions: A list of strings, or a sequence of objects with ``.caption`` and
            ``.caption_id`` (e.g. a caption corpus).
        ids: Caption ids (all ints or all strings, unique); not allowed together with
            caption objects, which carry their own.

    Raises:
        TypeError: A caption is not a string, or ids mix types.
        ValueError: Empty corpus, an empty caption, wrong ids length, duplicate ids.
    """
    if isinstance(captions, (str, bytes)):
        raise TypeError("captions must be a list of strings, not a single string")
    items = list(captions)
    if not items:
        raise DataFormatError("the caption corpus is empty: nothing to index")
    if not isinstance(items[0], str) and hasattr(items[0], "caption"):
        if ids is not None:
            raise DataFormatError("ids given twice: the caption objects carry .caption_id already")
        ids = [getattr(it, "caption_id", None) for it in items]
        if any(i is None for i in ids):
            ids = None if all(i is None for i in ids) else ids
        items = [getattr(it, "caption", it) for it in items]
    texts = []
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise TypeError(f"caption {i} must be a string, got {type(t).__name__}: {t!r:.80}")
        s = t.strip()
        if not s:
            raise DataFormatError(f"caption {i} is empty (or whitespace only)")
        texts.append(s)
    ids = list(range(len(texts))) if ids is None else normalise_ids(ids, len(texts))
    return texts, ids


def normalise_ids(ids: Sequence[Any], n: int) -> list:
    """Check ids: length ``n``, all ints or all strings, unique; numpy ints become ints."""
    ids = list(ids)
    if len(ids) != n:
        raise DataFormatError(f"got {len(ids)} ids for {n} captions; they must match one to one")
    if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        ids = [int(i) for i in ids]
    elif not all(isinstance(i, str) for i in ids):
        kinds = sorted({type(i).__name__ for i in ids})
        raise TypeError(
            f"caption ids must be all integers or all strings, got a mix of {', '.join(kinds)}"
        )
    if len(set(ids)) != len(ids):
        seen: set = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise DataFormatError(f"caption ids must be unique; {dup!r} occurs more than once")
    return ids


def dedupe_captions(texts: list[str], ids: list, seen: set[str] | None = None) -> tuple:
    """Drop exact duplicate captions, keeping the first occurrence (and its id).

    Args:
        texts: Stripped captions.
        ids: Their ids.
        seen: Captions already indexed (also dropped), e.g. when adding.

    Returns:
        ``(texts, ids, keep)`` where ``keep`` are the kept row numbers.
    """
    seen = set() if seen is None else set(seen)
    keep = []
    for i, t in enumerate(texts):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    return [texts[i] for i in keep], [ids[i] for i in keep], np.asarray(keep, dtype=np.int64)


def check_embeddings(
    x: Any, n: int | None = None, d: int | None = None, *, binary: bool = False
) -> np.ndarray:
    """Validate an (n, d) float embedding matrix; returns it as float32.

    ``binary``: a hashing retriever's codes, (n, bits) of ±1, instead of L2-normalised rows.

    Raises:
        TypeError: Not a float array.
        ValueError: Wrong shape, NaN/inf, rows not L2-normalised (tolerance 1e-2), or
            (``binary``) values other than ±1.
    """
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"embeddings must be a float array, got dtype {x.dtype}")
    if x.ndim != 2 or (n is not None and x.shape[0] != n) or (d is not None and x.shape[1] != d):
        want = f"({n if n is not None else 'n'}, {d if d is not None else 'd'})"
        raise DataFormatError(f"embeddings must have shape {want}, got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataFormatError("embeddings contain NaN or inf")
    if binary:
        bad = ~np.isin(x, (-1.0, 1.0))
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            raise DataFormatError(
                f"binary codes must be ±1 (a hashing retriever's sign codes); row {row} has "
                f"{x[row][bad[row]][:3].tolist()}"
            )
        return x
    norms = np.linalg.norm(x, axis=1)
    if len(x) and np.abs(norms - 1).max() > 1e-2:
        raise DataFormatError(
            f"embeddings must be L2-normalised (inner product = cosine); row norms range "
            f"{norms.min():.3f}..{norms.max():.3f}. Normalise them (or pass normalize=True)"
        )
    return x


def encode_captions(
    encoder: CaptionEncoder,
    texts: list[str],
    *,
    batch_size: int = 256,
    accelerator: Any = None,
    scratch_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    with_logsigma: bool = False,
) -> Any:
    """Encode captions, sharded over processes when an ``Accelerator`` has several.

    ``with_logsigma`` (a PCME retriever): ``(embeddings, logsigma)``, both (N, d).

    With ``accelerator.num_processes > 1`` each process encodes a contiguous
    shard and writes it as ``shard-RANK.npy`` into a folder shared by all
    processes (created by the main process under ``scratch_dir`` and broadcast);
    the main process concatenates them in rank order, which gives exactly the
    rows of a one-process run.

    Returns:
        (N, d) float32 on the main process; None on the other processes.
    """
    binary = getattr(encoder, "index_metric", "inner_product") == "hamming"
    extra = {"return_logsigma": True} if with_logsigma else {}
    if accelerator is None or accelerator.num_processes <= 1:
        out = encoder.embed_texts(
            texts, batch_size=batch_size, show_progress=show_progress, **extra
        )
        x, sig = out if with_logsigma else (out, None)
        x = check_embeddings(x, len(texts), encoder.embed_dim, binary=binary)
        return (x, sig) if with_logsigma else x
    from accelerate.utils import broadcast_object_list

    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    parent = Path(scratch_dir or tempfile.gettempdir())
    box = [tempfile.mkdtemp(prefix=".rvqa-shards-", dir=parent) if main else None]
    broadcast_object_list(box, from_process=0)
    shards = Path(box[0])
    try:
        lo, hi = shard_bounds(len(texts), world, rank)
        d = encoder.embed_dim
        sig = None
        if hi > lo:
            out = encoder.embed_texts(
                texts[lo:hi], batch_size=batch_size, show_progress=show_progress and main, **extra
            )
            x, sig = out if with_logsigma else (out, None)
            x = check_embeddings(x, hi - lo, d, binary=binary)
        else:
            x = np.zeros((0, d), dtype=np.float32)
            sig = np.zeros((0, d), dtype=np.float32) if with_logsigma else None
        np.save(shards / f"shard-{rank:05d}.npy", x, allow_pickle=False)
        if with_logsigma:
            np.save(shards / f"sigma-{rank:05d}.npy", sig, allow_pickle=False)
        accelerator.wait_for_everyone()
        if not main:
            return None
        parts = []
        for r in range(world):
            part = np.load(shards / f"shard-{r:05d}.npy", allow_pickle=False)
            lo, hi = shard_bounds(len(texts), world, r)
            if part.shape != (hi - lo, d):
                raise RuntimeError(
                    f"process {r} wrote {part.shape} embeddings, expected {(hi - lo, d)}"
                )
            parts.append(part)
        logger.info("gathered caption embeddings from %d processes", world)
        x = np.concatenate(parts, axis=0)
        if with_logsigma:
            sigs = [
                np.load(shards / f"sigma-{r:05d}.npy", allow_pickle=False) for r in range(world)
            ]
            return x, np.concatenate(sigs, axis=0)
        return x
    finally:
        if main:
            shutil.rmtree(shards, ignore_errors=True)
