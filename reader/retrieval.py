"""Captions for the reader's training images: retrieved once, sharded, cached on disk.

VQA datasets ask many questions about each image (easy-vqa ~10, VQAv2 ~5), so
retrieval runs once per distinct image. :func:`retrieve_for_images`:

* **Sharded.** With several processes each embeds and searches a contiguous shard
  of the images still to retrieve (:func:`rvqa.distributed.shard_bounds`) on its
  device; the shards' arrays are gathered over the process group (no shared
  disk needed), so every process holds the one-process result.
* **Streamed.** Images are decoded and preprocessed by a ``DataLoader``'s workers
  (``num_workers``; pinned memory on CUDA); only the retriever's forward runs in
  the main process.
* **Stored as arrays.** A cache entry is a folder ``retrieval-TAG/``: ``keys.json``
  (the image keys, in row order), ``rows.npy`` (int64, images × k: the index's
  row numbers, best first, -1 past the last hit) and ``scores.npy`` (float32,
  same shape), ``meta.json`` last. About ``12 · k`` bytes per image, not the
  caption texts: :class:`RetrievedCaptions` reads the texts and ids from the
  index's memory-mapped caption store on access.
* **Keyed** by ``TAG``, a hash of the retriever's fingerprint, the knowledge
  index's fingerprint (:func:`index_fingerprint`), ``k`` and the exclusion rule's
  contents, so another retriever, a rebuilt or swapped index, another ``k`` or
  other excluded captions never get stale results. A later run reuses the entry;
  images it lacks are retrieved and the entry is rewritten with them added.
* **Atomic.** The main process writes an entry into a temporary folder and renames
  it into place (:func:`rvqa.io.atomic_directory`): a writer killed midway leaves
  only a temporary folder, which no run loads (and the next writer removes); an
  entry whose files do not agree is logged and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from rvqa.data.images import load_image
from rvqa.distributed import process_rank, shard_bounds
from rvqa.io import atomic_directory, write_json_atomic
from rvqa.reader.data import record_image_key

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of the cache folder layout (an entry of another version is rebuilt)."""

# (caption text, score, caption id)
Retrieved = list[tuple[str, float, Any]]


def index_fingerprint(index: Any) -> str:
    """A hash of the knowledge index's identity (changes whenever its contents do)."""
    m = index.manifest
    key = {k: m.get(k) for k in ("retriever_fingerprint", "factory", "count", "created", "files")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _exclusion_hash(exclude_ids: dict[str, set] | None) -> str | None:
    if not exclude_ids:
        return None
    h = hashlib.sha256()
    for key in sorted(exclude_ids):
        h.update(json.dumps([key, sorted(map(str, exclude_ids[key]))]).encode())
    return h.hexdigest()[:16]


def cache_tag(retriever: Any, index: Any, k: int, exclude_ids: dict[str, set] | None) -> str:
    """The cache key of a retrieval: retriever and index fingerprints, ``k``, exclusions."""
    key = {
        "retriever": retriever.fingerprint(),
        "index": index_fingerprint(index),
        "k": k,
        "exclude": _exclusion_hash(exclude_ids),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- result


class _CaptionStore:
    """Row number → (caption id, caption text) of a knowledge index.

    In the process that retrieved, the loaded index itself (:meth:`KnowledgeIndex.lookup`,
    memory-mapped Arrow). Pickled into a ``DataLoader`` worker it carries only the
    index folder and reopens it (memory-mapped, fingerprint checked) on first use.
    """

    def __init__(self, index: Any, fingerprint: str):
        self.index = index
        self.path = Path(index.path) if getattr(index, "path", None) else None
        self.fingerprint = fingerprint

    def __getstate__(self) -> dict:
        if self.path is None:  # an in-memory index: only a forked worker can share it
            return dict(self.__dict__)
        return {"index": None, "path": self.path, "fingerprint": self.fingerprint}

    def lookup(self, rows: np.ndarray) -> tuple[list, list[str]]:
        if self.index is None:
            from rvqa.errors import IndexMismatchError
            from rvqa.retriever.index import KnowledgeIndex

            index = KnowledgeIndex.load(self.path)
            if index_fingerprint(index) != self.fingerprint:
                raise IndexMismatchError(
                    f"knowledge index {self.path} changed since the captions were retrieved "
                    "from it; restart the run to retrieve again"
                )
            self.index = index
        return self.index.lookup(rows)


class RetrievedCaptions(Mapping):
    """Read-only image key → ``[(caption, score, caption id), ...]``, best first (≤ k).

    Holds the (images × k) row and score arrays; caption texts and ids are read
    from the index's caption store per access. Picklable (``DataLoader`` workers).
    """

    def __init__(
        self, keys: Sequence[str], rows: np.ndarray, scores: np.ndarray, store: _CaptionStore
    ):
        self._keys = list(keys)
        self._pos = {key: i for i, key in enumerate(self._keys)}
        self.rows = rows
        self.scores = scores
        self._store = store

    def __getitem__(self, key: str) -> Retrieved:
        i = self._pos[key]
        rows = self.rows[i]
        n = int((rows >= 0).sum())  # valid rows come first
        if n == 0:
            return []
        ids, captions = self._store.lookup(rows[:n])
        return list(zip(captions, self.scores[i, :n].tolist(), ids))

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"RetrievedCaptions({len(self)} images, k={self.rows.shape[1]})"


# --------------------------------------------------------------------------- cache files


def _read_entry(folder: Path, k: int) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """A cache entry's (keys, rows, scores), or None when absent or inconsistent (logged)."""
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        keys = json.loads((folder / "keys.json").read_text(encoding="utf-8"))
        rows = np.load(folder / "rows.npy", allow_pickle=False)
        scores = np.load(folder / "scores.npy", allow_pickle=False)
        shape = (len(keys), k)
        if (
            meta.get("format") != CACHE_FORMAT
            or meta.get("images") != len(keys)
            or rows.shape != shape
            or scores.shape != shape
            or rows.dtype != np.int64
            or scores.dtype != np.float32
        ):
            raise ValueError(
                f"expected {shape} int64 rows and float32 scores for {meta.get('images')} "
                f"images, got {rows.shape} {rows.dtype} and {scores.shape} {scores.dtype}"
            )
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        logger.warning("retrieval cache %s is unreadable (%s); retrieving again", folder, err)
        return None
    return keys, rows, scores


def _write_entry(
    folder: Path, keys: list[str], rows: np.ndarray, scores: np.ndarray, meta: dict
) -> None:
    """Write an entry atomically (temporary folder, then rename); stale temporaries go."""
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        pid = stale.name.split(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):  # a writer that was killed
            shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(folder, overwrite=True) as tmp:
        np.save(tmp / "rows.npy", rows, allow_pickle=False)
        np.save(tmp / "scores.npy", scores, allow_pickle=False)
        write_json_atomic(tmp / "keys.json", keys, indent=None)
        write_json_atomic(tmp / "meta.json", {**meta, "format": CACHE_FORMAT, "images": len(keys)})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- retrieval


class _Pixels(Dataset):
    """Image references → preprocessed pixels (decoded in ``DataLoader`` workers)."""

    def __init__(self, images: Sequence[Any], image_processor: Any):
        self.images = images
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        pil = load_image(self.images[i])
        return self.image_processor(images=[pil], return_tensors="pt")["pixel_values"][0]


@torch.inference_mode()
def _retrieve_shard(
    retriever: Any,
    index: Any,
    images: Sequence[Any],
    keys: Sequence[str],
    width: int,
    k: int,
    exclude_ids: dict[str, set] | None,
    batch_size: int,
    num_workers: int,
    show_progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores), each (len(images), k), of one process's images."""
    rows_out = np.full((len(images), k), -1, dtype=np.int64)
    scores_out = np.zeros((len(images), k), dtype=np.float32)
    if not images:
        return rows_out, scores_out
    device = next(retriever.parameters()).device
    dtype = next(retriever.vision_model.parameters()).dtype
    loader = DataLoader(
        _Pixels(images, retriever.image_processor),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    was_training = retriever.training
    retriever.eval()
    start = 0
    try:
        for pixels in tqdm(
            loader, desc="retrieving captions", unit="batch", disable=not show_progress
        ):
            emb = retriever.encode_images(pixels.to(device, dtype, non_blocking=True))
            scores, rows = index.search_rows(emb.float().cpu().numpy(), width)
            for j in range(len(rows)):
                key = keys[start + j]
                banned = (exclude_ids or {}).get(key)
                r, s = rows[j], scores[j]
                valid = r >= 0
                r, s = r[valid], s[valid]
                if banned:
                    ids, _ = index.lookup(r)
                    keep = np.array([cid not in banned for cid in ids], dtype=bool)
                    r, s = r[keep], s[keep]
                n = min(k, len(r))
                rows_out[start + j, :n] = r[:n]
                scores_out[start + j, :n] = s[:n]
            start += len(rows)
    finally:
        retriever.train(was_training)
    return rows_out, scores_out


def retrieve_for_images(
    retriever: Any,
    index: Any,
    images: dict[str, Any],
    k: int,
    *,
    exclude_ids: dict[str, set] | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    accelerator: Any = None,
    show_progress: bool = True,
) -> Mapping[str, Retrieved]:
    """Top-``k`` captions for each image, computed once (sharded) and cached.

    Args:
        retriever: A :class:`~rvqa.retriever.modeling.RetrieverModel` on the run's
            device (its ``image_processor``, ``encode_images`` and ``fingerprint``).
        index: A :class:`~rvqa.retriever.index.KnowledgeIndex` (CPU or GPU).
        images: image key (:func:`~rvqa.reader.data.record_image_key`) → image
            reference (path, PIL, array).
        k: Captions per image.
        exclude_ids: image key → caption ids never to return for that image (its own
            captions, so training does not learn to copy them).
        cache_dir: Folder of the cache entries (None: no disk cache).
        batch_size: Images per retriever forward.
        num_workers: ``DataLoader`` workers decoding and preprocessing images.
        accelerator: The run's ``Accelerator``: with several processes each retrieves
            a contiguous shard and every process gets the whole result; all must call.
        show_progress: Progress bar (on the main process).

    Returns:
        A read-only mapping image key → ``[(caption, score, caption id), ...]`` best
        first (≤ k; fewer when exclusions or the index leave fewer), over exactly the
        keys of ``images`` (:class:`RetrievedCaptions`).
    """
    keys = list(images)
    fingerprint = index_fingerprint(index)
    store = _CaptionStore(index, fingerprint)
    if k <= 0:
        empty = np.zeros((len(keys), 0))
        return RetrievedCaptions(keys, empty.astype(np.int64), empty.astype(np.float32), store)
    tag = cache_tag(retriever, index, k, exclude_ids)
    entry = Path(cache_dir) / f"retrieval-{tag}" if cache_dir is not None else None
    cached = _read_entry(entry, k) if entry is not None else None
    old_keys, old_rows, old_scores = cached or ([], None, None)
    known = set(old_keys)
    todo = [key for key in keys if key not in known]
    rank, world = process_rank(accelerator)
    main = rank == 0
    if todo and main:
        logger.info(
            "retrieving top-%d captions for %d images (%d cached) on %d process(es)",
            k,
            len(todo),
            len(known),
            world,
        )
    new_rows = np.zeros((0, k), dtype=np.int64)
    new_scores = np.zeros((0, k), dtype=np.float32)
    if todo:
        extra = max((len(v) for v in (exclude_ids or {}).values()), default=0)
        lo, hi = shard_bounds(len(todo), world, rank)
        part = _retrieve_shard(
            retriever,
            index,
            [images[key] for key in todo[lo:hi]],
            todo[lo:hi],
            k + extra,
            k,
            exclude_ids,
            batch_size,
            num_workers,
            show_progress and main,
        )
        if world > 1:
            from accelerate.utils import gather_object

            parts = sorted(gather_object([(lo, *part)]), key=lambda p: p[0])
            new_rows = np.concatenate([p[1] for p in parts])
            new_scores = np.concatenate([p[2] for p in parts])
        else:
            new_rows, new_scores = part
        if len(new_rows) != len(todo):
            raise RuntimeError(f"gathered retrieval for {len(new_rows)} of {len(todo)} images")
    all_keys = [*old_keys, *todo]
    rows = np.concatenate([old_rows, new_rows]) if old_rows is not None else new_rows
    scores = np.concatenate([old_scores, new_scores]) if old_scores is not None else new_scores
    if entry is not None and todo:
        if main:
            meta = {"k": k, "index_fingerprint": fingerprint, "index_path": str(index.path)}
            _write_entry(entry, all_keys, rows, scores, meta)
        if accelerator is not None and world > 1:
            accelerator.wait_for_everyone()
    if all_keys != keys:  # the asked images, in the asked order (the cache may hold more)
        pos = {key: i for i, key in enumerate(all_keys)}
        take = np.array([pos[key] for key in keys], dtype=np.int64)
        rows, scores = rows[take], scores[take]
    return RetrievedCaptions(keys, rows, scores, store)


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
