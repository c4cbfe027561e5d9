"""Captions for the reader's training images: retrieved once, sharded, cached on disk.

VQA datasets ask many questions about each image (easy-vqa ~10, VQAv2 ~5), so
retrieval runs once per distinct image. :func:`retrieve_for_images`:

* **Sharded.** With several processes each embeds and searches a contiguous shard
  of the images still to retrieve (:func:`rvqa.distributed.shard_bounds`) on its
  device; the shards' arrays are gathered over the process group (no shared
  disk needed), so every process holds the one-process result.
* **Streamed.** Images are fetched, decoded and preprocessed by a ``DataLoader``'s
  workers (:mod:`rvqa.pixels`: float32 pixels as at inference, pinned memory on CUDA, a worker's
  :class:`~rvqa.errors.ImageLoadError` raised as itself); only the retriever's
  forward runs in the main process. :class:`RecordImages` gives the images of
  record sequences by key without holding any: ``images[key]`` builds the record
  on access (a ``datasets`` image is decoded in the worker).
* **Stored as arrays.** A cache entry is a folder ``retrieval-TAG/``: ``keys.json``
  (the image keys, in row order), ``rows.npy`` (int64, images × k: the index's
  row numbers, best first, -1 past the last hit), ``scores.npy`` (float32, same
  shape) and ``digests.npy`` (uint64, one per image: a hash of the image's
  identity, see below), ``meta.json`` last. About ``12 · k + 8`` bytes per image,
  not the caption texts: :class:`RetrievedCaptions` reads the texts and ids from
  the index's memory-mapped caption store on access.
* **Keyed** by ``TAG``, a hash of the retriever's fingerprint, the knowledge
  index's fingerprint (:func:`index_fingerprint`), ``k`` and the exclusion rule's
  contents, so another retriever, a rebuilt or swapped index, another ``k`` or
  other excluded captions never get stale results; and **checked per image** by
  its digest: an image file's path, size and modification time (as the reader's
  feature cache does), or, for an image without a file, the identity of its data
  source (:attr:`rvqa.data.VQADataset.data_identity`: a ``datasets`` dataset's
  fingerprint and Arrow files; hashing every image's pixels would decode the
  whole data set on every run) and, for images held in memory by neither, the
  pixels' hash. A later run reuses the entry's rows of unchanged images; images
  it lacks or whose digest changed are retrieved and the entry is rewritten.
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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rvqa.data import CaptionCorpus
from rvqa.data.images import load_image
from rvqa.distributed import process_rank, shard_bounds
from rvqa.errors import IndexFormatError, IndexMismatchError, UsageError
from rvqa.io import atomic_directory, write_json_atomic
from rvqa.pixels import ImagePixels, carry_errors, loader_options, raise_carried
from rvqa.reader.data import record_image_key

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Version of the cache folder layout (an entry of another version is rebuilt)."""

# (caption text, score, caption id)
Retrieved = list[tuple[str, float, Any]]


def index_fingerprint(index: Any) -> str:
    """A hash of the knowledge index's identity (changes whenever its contents do)."""
    return _manifest_fingerprint(index.manifest)


def _manifest_fingerprint(m: dict) -> str:
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

    For an index with a folder it holds only the folder and fingerprint, and on
    first use reads the folder's manifest (fingerprint checked) and memory-maps its
    captions store (:func:`~rvqa.retriever.index.read_captions`): it keeps no
    reference to the loaded index, whose faiss index (HNSW is not memory-mapped) is
    freed once the retrieval pass is over, and never reads the faiss index file. A
    forked ``DataLoader`` worker inherits it as it is (the mapped columns shared with
    the parent), a spawned one gets the folder and fingerprint (pickled). An index
    without a folder (built in memory) is read through its own
    :meth:`KnowledgeIndex.lookup` and cannot be pickled.
    """

    def __init__(self, index: Any, fingerprint: str):
        self.path = Path(index.path) if getattr(index, "path", None) else None
        self.fingerprint = fingerprint
        self._lookup: Any = None if self.path is not None else index.lookup

    def __getstate__(self) -> dict:
        if self.path is None:
            raise UsageError(
                "captions retrieved from a knowledge index without a folder cannot be sent "
                "to a spawned DataLoader worker; save the index first (KnowledgeIndex.save) "
                "or use the 'fork' start method"
            )
        return {"path": self.path, "fingerprint": self.fingerprint, "_lookup": None}

    def lookup(self, rows: np.ndarray) -> tuple[list, list[str]]:
        if self._lookup is None:
            self._lookup = self._open()
        return self._lookup(rows)

    def _open(self) -> Any:
        """The lookup of the folder's captions store (manifest and captions only)."""
        from rvqa.retriever.index import CAPTIONS_DIR, read_captions, read_manifest
        from rvqa.retriever.index.knowledge_index import _Rows

        manifest = read_manifest(self.path)
        if _manifest_fingerprint(manifest) != self.fingerprint:
            raise IndexMismatchError(
                f"knowledge index {self.path} changed since the captions were retrieved "
                "from it; restart the run to retrieve again"
            )
        captions = read_captions(self.path / CAPTIONS_DIR)
        if len(captions) != manifest["count"]:
            raise IndexFormatError(
                f"{self.path / CAPTIONS_DIR} holds {len(captions)} captions, "
                f"manifest says {manifest['count']}"
            )
        ids = _Rows(captions.data.column("id"))
        texts = _Rows(captions.data.column("caption"))

        def lookup(rows: np.ndarray) -> tuple[list, list[str]]:
            r = np.asarray(rows, dtype=np.int64).reshape(-1)
            if len(r) and (r.min() < 0 or r.max() >= len(captions)):
                raise IndexError(f"rows {r.tolist()} out of range for {len(captions)} captions")
            return ids.take(r), texts.take(r)

        return lookup


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


def _read_entry(
    folder: Path, k: int
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray] | None:
    """A cache entry's (keys, rows, scores, digests), or None when absent or inconsistent (logged)."""
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache format {meta.get('format')}, this rvqa writes {CACHE_FORMAT}")
        keys = json.loads((folder / "keys.json").read_text(encoding="utf-8"))
        rows = np.load(folder / "rows.npy", allow_pickle=False)
        scores = np.load(folder / "scores.npy", allow_pickle=False)
        digests = np.load(folder / "digests.npy", allow_pickle=False)
        shape = (len(keys), k)
        if (
            meta.get("images") != len(keys)
            or rows.shape != shape
            or scores.shape != shape
            or digests.shape != (len(keys),)
            or rows.dtype != np.int64
            or scores.dtype != np.float32
            or digests.dtype != np.uint64
        ):
            raise ValueError(
                f"expected {shape} int64 rows, float32 scores and {len(keys)} uint64 digests "
                f"for {meta.get('images')} images, got {rows.shape} {rows.dtype}, "
                f"{scores.shape} {scores.dtype} and {digests.shape} {digests.dtype}"
            )
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        logger.warning("retrieval cache %s is unreadable (%s); retrieving again", folder, err)
        return None
    return keys, rows, scores, digests


def _write_entry(
    folder: Path,
    keys: list[str],
    rows: np.ndarray,
    scores: np.ndarray,
    digests: np.ndarray,
    meta: dict,
) -> None:
    """Write an entry atomically (temporary folder, then rename); stale temporaries go."""
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        pid = stale.name.split(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):  # a writer that was killed
            shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(folder, overwrite=True) as tmp:
        np.save(tmp / "rows.npy", rows, allow_pickle=False)
        np.save(tmp / "scores.npy", scores, allow_pickle=False)
        np.save(tmp / "digests.npy", digests, allow_pickle=False)
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


class RecordImages(Mapping):
    """Image key → image of the distinct images of some VQA record sequences, on access.

    Keys are :func:`~rvqa.reader.data.record_image_key` (``str(image_id)``), in
    order of first appearance. Holds one (sequence, position) per key, never an
    image: ``images[key]`` builds that record and returns its image (a path; a
    ``datasets`` source decodes it then, i.e. in the retrieval loader's workers).
    :meth:`token` gives an image's identity for the cache without decoding it.

    Args:
        record_seqs: VQA record sequences (:class:`~rvqa.data.VQADataset`, whose
            ``image_id_at`` / ``image_file_at`` build no record, or any sequence of
            records).
    """

    def __init__(self, *record_seqs: Sequence[Any]):
        self._seqs = record_seqs
        first: dict[str, tuple[int, int]] = {}
        for s, seq in enumerate(record_seqs):
            id_at = getattr(seq, "image_id_at", None)
            for pos in range(len(seq)):
                key = str(id_at(pos)) if id_at is not None else record_image_key(seq[pos])
                if key not in first:
                    first[key] = (s, pos)
        self._keys = list(first)
        self._index = {key: i for i, key in enumerate(self._keys)}
        self._where = np.array(list(first.values()), dtype=np.int64).reshape(-1, 2)
        self._identity: dict[int, str | None] = {}

    def _locate(self, key: str) -> tuple[Sequence[Any], int, int]:
        s, pos = self._where[self._index[key]]
        return self._seqs[int(s)], int(s), int(pos)

    def __getitem__(self, key: str) -> Any:
        seq, _, pos = self._locate(key)
        return seq[pos].image

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def token(self, key: str) -> str:
        """The image's identity: its file's path, size and modification time; for an
        image without a file, its data source's ``data_identity``; else its pixels' hash."""
        seq, s, pos = self._locate(key)
        file_at = getattr(seq, "image_file_at", None)
        if file_at is not None:
            path = file_at(pos)
            if path is not None:
                return _file_token(path)
            if s not in self._identity:
                self._identity[s] = getattr(seq, "data_identity", None)
            if self._identity[s] is not None:
                return f"source\t{self._identity[s]}"
        return _image_token(seq[pos].image)


def _file_token(path: str | os.PathLike) -> str:
    """Path, size and modification time (a missing file: its path; loading it names it)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return f"path\t{path}\tmissing"
    return f"path\t{path}\t{st.st_size}\t{st.st_mtime_ns}"


def _image_token(image: Any) -> str:
    """An image reference's identity: a file's (:func:`_file_token`), else its pixels' hash."""
    if isinstance(image, (str, os.PathLike)):
        return _file_token(image)
    pil = load_image(image)
    return f"pixels\t{pil.mode}\t{pil.size}\t{hashlib.sha256(pil.tobytes()).hexdigest()}"


def _image_digests(images: Mapping[str, Any], keys: Sequence[str]) -> np.ndarray:
    """uint64 hash of each image's identity (``images.token(key)`` when it has one)."""
    token = getattr(images, "token", None)
    out = np.empty(len(keys), dtype=np.uint64)
    for j, key in enumerate(keys):
        t = token(key) if token is not None else _image_token(images[key])
        digest = hashlib.sha256(t.encode("utf-8", "surrogateescape")).digest()
        out[j] = int.from_bytes(digest[:8], "little")
    return out


class _KeyedImages(Sequence):
    """``images[keys[i]]`` on access (a loader's dataset over some keys of a mapping)."""

    def __init__(self, images: Mapping[str, Any], keys: Sequence[str]):
        self.images = images
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self.images[self.keys[i]]


@torch.inference_mode()
def _retrieve_shard(
    retriever: Any,
    index: Any,
    images: Mapping[str, Any],
    keys: Sequence[str],
    width: int,
    k: int,
    exclude_ids: dict[str, set] | None,
    batch_size: int,
    num_workers: int,
    show_progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores), each (len(keys), k), of one process's images ``keys``."""
    rows_out = np.full((len(keys), k), -1, dtype=np.int64)
    scores_out = np.zeros((len(keys), k), dtype=np.float32)
    if not keys:
        return rows_out, scores_out
    device = next(retriever.parameters()).device
    dtype = next(retriever.vision_model.parameters()).dtype
    dataset, collate = carry_errors(
        # float32 pixels: the captions are those inference retrieves for the image
        ImagePixels(_KeyedImages(images, keys), retriever.image_processor, torch.float32),
        torch.stack,
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        **loader_options(num_workers, device),
    )
    was_training = retriever.training
    retriever.eval()
    start = 0
    try:
        # One iterator: tqdm.auto's asyncio variant calls iter() on what it wraps, and a
        # second iter() of a DataLoader would start a second, idle set of workers.
        batches = iter(loader)
        for batch in tqdm(
            batches,
            total=len(loader),
            desc="retrieving captions",
            unit="batch",
            disable=not show_progress,
        ):
            pixels = raise_carried(batch)
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
    images: Mapping[str, Any],
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
            reference (path, PIL, array), read on access in the loader's workers:
            a :class:`RecordImages` holds none (a plain dict of decoded images is
            digested by hashing their pixels).
        k: Captions per image.
        exclude_ids: image key → caption ids never to return for that image (its own
            captions, so training does not learn to copy them).
        cache_dir: Folder of the cache entries (None: no disk cache).
        batch_size: Images per retriever forward.
        num_workers: ``DataLoader`` workers fetching, decoding and preprocessing images.
        accelerator: The run's ``Accelerator``: with several processes each retrieves
            a contiguous shard and every process gets the whole result; all must call.
        show_progress: Progress bar (on the main process).

    Returns:
        A read-only mapping image key → ``[(caption, score, caption id), ...]`` best
        first (≤ k; fewer when exclusions or the index leave fewer), over exactly the
        keys of ``images`` (:class:`RetrievedCaptions`).

    Raises:
        ImageLoadError: An image cannot be read (naming the file), also from a worker.
    """
    keys = list(images)
    fingerprint = index_fingerprint(index)
    store = _CaptionStore(index, fingerprint)
    if k <= 0:
        empty = np.zeros((len(keys), 0))
        return RetrievedCaptions(keys, empty.astype(np.int64), empty.astype(np.float32), store)
    tag = cache_tag(retriever, index, k, exclude_ids)
    entry = Path(cache_dir) / f"retrieval-{tag}" if cache_dir is not None else None
    digests = _image_digests(images, keys) if entry is not None else None
    cached = _read_entry(entry, k) if entry is not None else None
    if cached is None:
        old_keys: list[str] = []
        old_rows = np.zeros((0, k), dtype=np.int64)
        old_scores = np.zeros((0, k), dtype=np.float32)
        old_digests = np.zeros(0, dtype=np.uint64)
    else:
        old_keys, old_rows, old_scores, old_digests = cached
    old_pos = {key: i for i, key in enumerate(old_keys)}
    todo = [
        key
        for j, key in enumerate(keys)
        if key not in old_pos or old_digests[old_pos[key]] != digests[j]  # type: ignore[index]
    ]
    changed = sum(key in old_pos for key in todo)
    rank, world = process_rank(accelerator)
    main = rank == 0
    if todo and main:
        logger.info(
            "retrieving top-%d captions for %d images (%d cached, %d of them changed since) "
            "on %d process(es)",
            k,
            len(todo),
            len(old_keys),
            changed,
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
            images,
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
    # The entry's unchanged rows, then the new ones (the cache may hold more images).
    redone = set(todo)
    kept = np.array([i for i, key in enumerate(old_keys) if key not in redone], dtype=np.int64)
    all_keys = [old_keys[i] for i in kept] + todo
    rows = np.concatenate([old_rows[kept], new_rows])
    scores = np.concatenate([old_scores[kept], new_scores])
    if entry is not None and todo:
        if main:
            pos = {key: j for j, key in enumerate(keys)}
            new_digests = np.array([digests[pos[key]] for key in todo], dtype=np.uint64)
            meta = {"k": k, "index_fingerprint": fingerprint, "index_path": str(index.path)}
            all_digests = np.concatenate([old_digests[kept], new_digests])
            _write_entry(entry, all_keys, rows, scores, all_digests, meta)
        if accelerator is not None and world > 1:
            accelerator.wait_for_everyone()
    if all_keys != keys:  # the asked images, in the asked order
        pos = {key: i for i, key in enumerate(all_keys)}
        take = np.array([pos[key] for key in keys], dtype=np.int64)
        rows, scores = rows[take], scores[take]
    return RetrievedCaptions(keys, rows, scores, store)


def own_caption_ids(captions: Sequence[Any]) -> dict[str, set]:
    """image key → the ids of that image's own captions (for ``exclude_ids``).

    Keys are :func:`~rvqa.reader.data.record_image_key` of the captions' image ids,
    the keys VQA records of the same image ids have. A
    :class:`~rvqa.data.CaptionCorpus` is read from its ``ids`` and ``image_ids``
    columns (no record built, no image opened); any other sequence of caption
    records record by record.
    """
    if isinstance(captions, CaptionCorpus):
        pairs = zip(captions.image_ids, captions.ids)
    else:
        pairs = ((r.image_id, r.caption_id) for r in captions)
    out: dict[str, set] = {}
    for image_id, caption_id in pairs:
        if image_id is not None:
            out.setdefault(str(image_id), set()).add(caption_id)
    return out
