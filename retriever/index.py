"""The knowledge index: FAISS over retriever caption embeddings, searched with image embeddings.

Build (see :mod:`rvqa.retriever.index_build` for the automatic factory choice)::

    build_index(retriever, captions, "indices/coco-captions")            # encode + write
    rebuild_index("indices/coco-captions", "indices/coco-hnsw", "HNSW32")  # no re-encoding

Load and search::

    index = KnowledgeIndex.load("indices/coco-captions", retriever)   # fingerprint checked
    [result] = index.search(image_embedding, k=5)                      # ids, scores, captions
    registry = IndexRegistry(); registry.register("captions", index)
    registry.search(image_embeddings, k=5, names=["captions", "wiki"])  # merged, tagged

Folder format: :mod:`rvqa.retriever.index_format`.

Thread safety: :meth:`KnowledgeIndex.search` reads one immutable state snapshot
(faiss CPU search is read-only and releases the GIL), so many threads may search
one index at once. GPU searches are serialised by a lock (one faiss GPU resource
object must not run concurrent queries). :meth:`KnowledgeIndex.add` builds a new
state on an owned in-memory copy and swaps it in with one assignment; searches
running meanwhile finish on the old state. :class:`IndexRegistry` snapshots its
name → index mapping at the start of each search, so every result comes from
exactly one index state even while :meth:`IndexRegistry.swap` runs.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import faiss
import numpy as np

from rvqa.retriever.index_build import (
    add_vectors,
    build_index,
    build_index_from_embeddings,
    check_embeddings,
    choose_factory,
    dedupe_captions,
    prepare_corpus,
    rebuild_index,
    set_search_params,
)
from rvqa.retriever.index_format import (
    CAPTIONS_DIR,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    IndexFormatError,
    check_files,
    owned_copy,
    read_captions,
    read_faiss_index,
    read_manifest,
    utc_now,
    write_index_folder,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CaptionEncoder",
    "Hit",
    "IndexFormatError",
    "IndexRegistry",
    "KnowledgeIndex",
    "SearchResult",
    "build_index",
    "build_index_from_embeddings",
    "choose_factory",
    "index_info",
    "merge_results",
    "rebuild_index",
]


@runtime_checkable
class CaptionEncoder(Protocol):
    """What the index needs from the retriever (``rvqa.retriever.modeling.RetrieverModel``)."""

    embed_dim: int

    def fingerprint(self) -> str:
        """Hash of the retriever's config and weights."""
        ...

    def embed_texts(
        self, texts: list[str], batch_size: int = 256, show_progress: bool = False
    ) -> np.ndarray:
        """Captions → (n, d) float32 L2-normalised."""
        ...

    def embed_images(
        self, images: list, batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        """Images → (n, d) float32 L2-normalised."""
        ...


class Hit(NamedTuple):
    """One retrieved caption: the evidence tuple of ``RVQA.answer``."""

    text: str
    score: float
    index_name: str
    id: Any


@dataclass(frozen=True)
class SearchResult:
    """The hits of one query, best first (fewer than k when the index is smaller).

    Attributes:
        ids: Caption ids.
        scores: Inner products (cosine similarities for normalised queries).
        captions: Caption texts.
        index_names: The index each hit came from.
    """

    ids: list = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    index_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def hits(self) -> list[Hit]:
        """The hits as ``Hit(text, score, index_name, id)`` tuples."""
        return [Hit(*h) for h in zip(self.captions, self.scores, self.index_names, self.ids)]

    def renamed(self, name: str) -> SearchResult:
        """The same hits tagged with another index name."""
        return SearchResult(self.ids, self.scores, self.captions, [name] * len(self.ids))


# --------------------------------------------------------------------------- validation


def as_query_matrix(x: Any, dim: int) -> np.ndarray:
    """Validate query embeddings: (n, dim) or (dim,) floats → C-contiguous float32 (n, dim).

    Raises:
        TypeError: Not a float array (ints, objects, strings).
        ValueError: Wrong shape (expected and got named) or NaN/inf.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu().float().numpy()
    if isinstance(x, (list, tuple)):
        try:
            x = np.asarray(x)
        except ValueError:
            raise TypeError("query embeddings must be a float array, got a ragged list") from None
    if not isinstance(x, np.ndarray):
        raise TypeError(f"query embeddings must be a numpy float array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(
            f"query embeddings must be float32 (float64/float16 are converted), got dtype {x.dtype}"
        )
    shape = x.shape
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"query embeddings must have shape (n, {dim}) or ({dim},), got {shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"query embeddings contain NaN or inf (row {int(np.argmax(bad))})")
    return x


def check_k(k: Any) -> int:
    """``k`` must be a positive int."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a positive integer, got {k!r}")
    if k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    return int(k)


def check_fingerprint(manifest: dict, retriever: Any, path: Path) -> CaptionEncoder | None:
    """Compare the index's retriever fingerprint with ``retriever`` (encoder, str or None).

    Returns:
        The encoder when ``retriever`` is one, else None.

    Raises:
        ValueError: Fingerprints (or embedding dims) differ; both are named.
        TypeError: ``retriever`` is neither None, a string, nor an encoder.
    """
    if retriever is None:
        return None
    if isinstance(retriever, str):
        encoder, fp = None, retriever
    elif callable(getattr(retriever, "fingerprint", None)):
        encoder, fp = retriever, retriever.fingerprint()
    else:
        raise TypeError(
            "retriever must be None, a fingerprint string, or an encoder with .fingerprint(), "
            f"got {type(retriever).__name__}"
        )
    if fp != manifest["retriever_fingerprint"]:
        raise ValueError(
            f"knowledge index {path} was built with retriever fingerprint "
            f"{manifest['retriever_fingerprint']}, but the retriever in use has fingerprint {fp}; "
            "rebuild the index with this retriever (rvqa build-index) or load the matching retriever"
        )
    dim = getattr(encoder, "embed_dim", None)
    if dim is not None and dim != manifest["embed_dim"]:
        raise ValueError(
            f"knowledge index {path} has embedding dim {manifest['embed_dim']}, "
            f"the retriever produces {dim}"
        )
    return encoder


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class _State:
    """Everything one search needs; replaced as a whole, never mutated."""

    index: Any  # searched: CPU (maybe mmap'd) or GPU
    cpu_index: Any  # CPU version, for save/add
    captions: Any  # datasets.Dataset (memory-mapped Arrow)
    caption_col: Any  # pyarrow ChunkedArray
    id_col: Any
    embeddings: np.ndarray | None  # stored raw embeddings (memmap) or pending in memory
    manifest: dict
    params: dict
    memory_mapped: bool
    on_gpu: bool
    gpu_lock: Any = None
    caption_rows: _Rows | None = None  # row access to caption_col / id_col
    id_rows: _Rows | None = None


def _to_gpu(index: faiss.Index) -> tuple[faiss.Index, bool]:
    """Move to all GPUs faiss sees; stay on CPU (warning) without GPUs or support."""
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if ngpu <= 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        logger.warning(
            "use_gpu=True but faiss sees no GPU (faiss-cpu build or no device); searching on CPU"
        )
        return index, False
    try:
        gpu = faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as err:
        logger.warning(
            "this index type cannot move to GPU (%s); searching on CPU", str(err).splitlines()[0]
        )
        return index, False
    logger.info("index moved to %d GPU(s)", ngpu)
    return gpu, True


def _make_state(
    cpu_index: faiss.Index,
    captions: Any,
    embeddings: np.ndarray | None,
    manifest: dict,
    overrides: dict,
    use_gpu: bool,
    memory_mapped: bool,
) -> _State:
    params = {**manifest["search_params"], **overrides}
    if params:
        set_search_params(cpu_index, params)
    index, on_gpu = _to_gpu(cpu_index) if use_gpu else (cpu_index, False)
    caption_col, id_col = captions.data.column("caption"), captions.data.column("id")
    return _State(
        index=index,
        cpu_index=cpu_index,
        captions=captions,
        caption_col=caption_col,
        id_col=id_col,
        caption_rows=_Rows(caption_col),
        id_rows=_Rows(id_col),
        embeddings=embeddings,
        manifest=manifest,
        params=params,
        memory_mapped=memory_mapped,
        on_gpu=on_gpu,
        gpu_lock=threading.Lock() if on_gpu else None,
    )


def _load_state(
    path: Path, manifest: dict, mmap: bool, use_gpu: bool, overrides: dict, verify: bool
) -> _State:
    check_files(path, manifest["files"], verify=verify)
    index, mapped = read_faiss_index(path / INDEX_FILE, mmap=mmap)
    if index.ntotal != manifest["count"] or index.d != manifest["embed_dim"]:
        raise IndexFormatError(
            f"{path / INDEX_FILE} holds {index.ntotal} vectors of dim {index.d}, the manifest "
            f"says {manifest['count']} of dim {manifest['embed_dim']}"
        )
    captions = read_captions(path / CAPTIONS_DIR, mmap=mmap)
    if len(captions) != manifest["count"]:
        raise IndexFormatError(
            f"{path / CAPTIONS_DIR} holds {len(captions)} captions, manifest says {manifest['count']}"
        )
    embeddings = None
    if manifest.get("embeddings"):
        embeddings = np.load(path / EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False)
    return _make_state(index, captions, embeddings, manifest, overrides, use_gpu, mapped)


def _overrides(nprobe: int | None, ef_search: int | None) -> dict:
    out = {}
    if nprobe is not None:
        out["nprobe"] = nprobe
    if ef_search is not None:
        out["efSearch"] = ef_search
    return out


# --------------------------------------------------------------------------- index


class KnowledgeIndex:
    """A loaded knowledge index folder: search captions with image (or any) embeddings.

    Create with :meth:`load`. Searching is thread-safe; ``add``/``save`` build a new
    state and swap it in (see the module docstring).
    """

    def __init__(
        self,
        state: _State,
        *,
        path: Path | None,
        name: str,
        encoder: CaptionEncoder | None = None,
        mmap: bool = True,
        use_gpu: bool = False,
        overrides: dict | None = None,
    ):
        self._state = state
        self.path = path
        self.name = name
        self.encoder = encoder
        self._mmap = mmap
        self._use_gpu = use_gpu
        self._overrides = dict(overrides or {})
        self._write_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        retriever: CaptionEncoder | str | None = None,
        *,
        name: str | None = None,
        mmap: bool = True,
        use_gpu: bool = False,
        nprobe: int | None = None,
        ef_search: int | None = None,
        verify: bool = False,
    ) -> KnowledgeIndex:
        """Load an index folder.

        Args:
            path: The folder (``indices/NAME``).
            retriever: The encoder in use (fingerprint checked, enables ``search_images``
                and ``add``), a fingerprint string (checked only), or None (unchecked).
            name: Name that hits are tagged with (default: the folder name).
            mmap: Memory-map the faiss index (``IO_FLAG_MMAP_IFC`` / ``IO_FLAG_MMAP`` with
                ``IO_FLAG_READ_ONLY``) and the Arrow captions; index types that cannot be
                mapped are read into memory (logged).
            use_gpu: Move the index to all GPUs faiss sees (``index_cpu_to_all_gpus``);
                without GPUs a warning is logged and search stays on CPU.
            nprobe: Override the manifest's IVF ``nprobe``.
            ef_search: Override the manifest's HNSW ``efSearch``.
            verify: Check every file's sha256 (sizes are always checked).

        Raises:
            FileNotFoundError: Missing folder, manifest or index file.
            IndexFormatError: Malformed manifest, newer format version, truncated file.
            ValueError: Retriever fingerprint mismatch (both named); parameter not
                applicable to this index type.
        """
        path = Path(path)
        manifest = read_manifest(path)
        encoder = check_fingerprint(manifest, retriever, path)
        overrides = _overrides(nprobe, ef_search)
        state = _load_state(path, manifest, mmap, use_gpu, overrides, verify)
        logger.info(
            "loaded knowledge index %s: %d captions, %s%s",
            path,
            manifest["count"],
            manifest["factory"],
            " (memory-mapped)" if state.memory_mapped else "",
        )
        return cls(
            state,
            path=path,
            name=name or path.resolve().name,
            encoder=encoder,
            mmap=mmap,
            use_gpu=use_gpu,
            overrides=overrides,
        )

    # ---------------------------------------------------------------- properties

    @property
    def manifest(self) -> dict:
        """A copy of the manifest."""
        return copy.deepcopy(self._state.manifest)

    @property
    def embed_dim(self) -> int:
        return self._state.manifest["embed_dim"]

    @property
    def fingerprint(self) -> str:
        """The retriever fingerprint the index was built with."""
        return self._state.manifest["retriever_fingerprint"]

    @property
    def factory(self) -> str:
        return self._state.manifest["factory"]

    @property
    def search_params(self) -> dict:
        """The search parameters in effect (manifest defaults + load overrides)."""
        return dict(self._state.params)

    @property
    def memory_mapped(self) -> bool:
        """Whether the faiss index is memory-mapped from its file."""
        return self._state.memory_mapped

    @property
    def on_gpu(self) -> bool:
        return self._state.on_gpu

    def __len__(self) -> int:
        return self._state.manifest["count"]

    def __repr__(self) -> str:
        return (
            f"KnowledgeIndex(name={self.name!r}, path={str(self.path)!r}, count={len(self)}, "
            f"factory={self.factory!r})"
        )

    def info(self) -> dict:
        """The manifest plus runtime facts (path, name, mmap, GPU, search params)."""
        st = self._state
        return {
            **copy.deepcopy(st.manifest),
            "path": str(self.path) if self.path else None,
            "name": self.name,
            "memory_mapped": st.memory_mapped,
            "on_gpu": st.on_gpu,
            "search_params_in_effect": dict(st.params),
        }

    # ---------------------------------------------------------------- rows

    def lookup(self, rows: Sequence[int] | np.ndarray) -> tuple[list, list[str]]:
        """``(ids, captions)`` of the given row numbers (0 <= row < len(self)).

        Raises:
            IndexError: A row outside ``[0, len(self))`` (the first one is named).
        """
        st = self._state
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        bad = (r < 0) | (r >= len(st.caption_col))
        if bad.any():
            raise IndexError(
                f"row {int(r[bad][0])} out of range for index {self.name!r} "
                f"with {len(st.caption_col)} captions"
            )
        return st.id_rows.take(r), st.caption_rows.take(r)

    def caption_word_counts(self) -> np.ndarray:
        """Number of whitespace-separated words of every caption, by row (int32)."""
        import pyarrow.compute as pc

        col = self._state.caption_col
        counts = pc.list_value_length(pc.utf8_split_whitespace(col))
        return counts.to_numpy(zero_copy_only=False).astype(np.int32)

    # ---------------------------------------------------------------- search

    def search(self, query_embeddings: Any, k: int) -> list[SearchResult]:
        """Top-k captions for each query embedding.

        Args:
            query_embeddings: (n, d) or (d,) float array (float64/float16 converted);
                L2-normalised for cosine scores.
            k: Hits per query (fewer when the index holds fewer captions).

        Returns:
            One :class:`SearchResult` per query row (a list of one for a (d,) query).

        Raises:
            TypeError: Non-float queries, non-int k.
            ValueError: Wrong dim (expected and got shapes named), NaN/inf, k <= 0.
        """
        st = self._state  # one snapshot for the whole call
        xq = as_query_matrix(query_embeddings, st.manifest["embed_dim"])
        k = min(check_k(k), st.index.ntotal)
        if len(xq) == 0:
            return []
        if k == 0:
            return [SearchResult() for _ in range(len(xq))]
        if st.gpu_lock is not None:
            with st.gpu_lock:
                scores, rows = st.index.search(xq, k)
        else:
            scores, rows = st.index.search(xq, k)
        return _results(st, scores, rows, self.name)

    def search_images(
        self, images: Sequence[Any], k: int, batch_size: int = 64
    ) -> list[SearchResult]:
        """Encode images with the retriever's image tower, then :meth:`search`."""
        encoder = self._require_encoder("search_images")
        x = encoder.embed_images(list(images), batch_size=batch_size)
        return self.search(x, k)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change nprobe / efSearch for later searches (builds and swaps in a new state).

        Raises:
            ValueError: The index type has no such parameter.
        """
        with self._write_lock:
            overrides = {**self._overrides, **_overrides(nprobe, ef_search)}
            st = self._state
            # A clone (cheap for mmap'd storage: it shares the mapping) so the index
            # that running searches use is never mutated.
            cpu = faiss.clone_index(st.cpu_index)
            self._state = _make_state(
                cpu,
                st.captions,
                st.embeddings,
                st.manifest,
                overrides,
                self._use_gpu,
                memory_mapped=st.memory_mapped,
            )
            self._overrides = overrides

    # ---------------------------------------------------------------- add / save

    def add(
        self,
        captions: Any,
        ids: Sequence[Any] | None = None,
        *,
        batch_size: int = 256,
        save: bool = True,
        show_progress: bool = True,
    ) -> int:
        """Encode captions and append them; rewrites the folder atomically when ``save``.

        A memory-mapped index is read-only (faiss aborts on adding to it), so the
        vectors are added to an owned in-memory copy; after saving, the folder is
        memory-mapped again. Exact duplicates of indexed captions are skipped when
        the index was built with dedupe (this reads all captions into a set). If the
        save fails, the folder is unchanged, the error propagates, and this object
        keeps the additions in memory (call :meth:`save` again).

        Args:
            captions: Strings, or objects with ``.caption`` / ``.caption_id``.
            ids: Ids of the new captions; default: continuing after the largest int id
                (required for string ids). Must not collide with indexed ids.
            batch_size: Encoding batch size.
            save: Rewrite the index folder (``save()``) afterwards.
            show_progress: Encoding progress bar.

        Returns:
            The number of captions added.
        """
        encoder = self._require_encoder("add")
        with self._write_lock:
            texts, ids, _, n_in = self._prepare_new(captions, ids)
            if not texts:
                logger.info("add: nothing new to add")
                return 0
            x = encoder.embed_texts(texts, batch_size=batch_size, show_progress=show_progress)
            x = check_embeddings(x, len(texts), self.embed_dim)
            return self._append(x, texts, ids, n_in, save)

    def add_embeddings(
        self,
        embeddings: np.ndarray,
        captions: Any,
        ids: Sequence[Any] | None = None,
        *,
        save: bool = True,
    ) -> int:
        """Append precomputed (n, d) L2-normalised embeddings of ``captions`` (array level)."""
        with self._write_lock:
            texts, ids, keep, n_in = self._prepare_new(captions, ids)
            x = check_embeddings(embeddings, n_in, self.embed_dim)[keep]
            if not texts:
                logger.info("add: nothing new to add")
                return 0
            return self._append(x, texts, ids, n_in, save)

    def save(self, path: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
        """Write the current state as an index folder (atomically), then reload it from there.

        Args:
            path: Target folder; None = this index's own folder (always overwritten).
            overwrite: Replace an existing other folder.
        """
        with self._write_lock:
            return self._save(path, overwrite)

    def _save(self, path: str | os.PathLike | None, overwrite: bool) -> Path:
        if path is None:
            if self.path is None:
                raise ValueError("this index has no folder yet: pass a path to save()")
            target, overwrite = self.path, True
        else:
            target = Path(path)
        st = self._state
        manifest = copy.deepcopy(st.manifest)
        write_index_folder(
            target, st.cpu_index, st.captions, None, manifest, st.embeddings, overwrite
        )
        self.path = target
        self._state = _load_state(
            target, manifest, self._mmap, self._use_gpu, self._overrides, verify=False
        )
        return target

    def _require_encoder(self, what: str) -> CaptionEncoder:
        if self.encoder is None:
            raise ValueError(
                f"{what} needs the retriever: load the index with KnowledgeIndex.load(path, retriever)"
            )
        return self.encoder

    def _prepare_new(self, captions: Any, ids: Sequence[Any] | None) -> tuple:
        """Validate new captions/ids against the index.

        Returns:
            ``(texts, ids, keep, n_in)``: the captions and ids to add, the kept rows of
            the input (after dedupe against the index) and the input count.
        """
        st = self._state
        if isinstance(captions, (str, bytes)):
            raise TypeError("captions must be a list of strings, not a single string")
        items = list(captions)
        carry_ids = bool(items) and any(getattr(it, "caption_id", None) is not None for it in items)
        texts, new_ids = prepare_corpus(items, ids)
        n_in = len(texts)
        keep = np.arange(n_in)
        if (st.manifest.get("dedupe") or {}).get("enabled", False):
            seen = set(st.caption_col.to_pylist())
            texts, new_ids, keep = dedupe_captions(texts, new_ids, seen=seen)
            if len(keep) < n_in:
                logger.info("add: skipped %d duplicate captions of %d", n_in - len(keep), n_in)
        if not texts:
            return texts, new_ids, keep, n_in
        existing_ids = st.id_col.to_pylist()
        str_ids = st.manifest.get("id_type") == "str"
        if ids is None and not carry_ids:  # default: continue after the largest id
            if str_ids:
                raise ValueError("this index has string ids: pass ids= for the new captions")
            start = max(existing_ids, default=-1) + 1
            new_ids = list(range(start, start + len(texts)))
        if isinstance(new_ids[0], str) != str_ids:
            raise TypeError(
                f"this index has {'string' if str_ids else 'integer'} ids, got "
                f"{type(new_ids[0]).__name__} ids for the new captions"
            )
        clash = set(new_ids).intersection(existing_ids)
        if clash:
            raise ValueError(f"ids already in the index: {sorted(clash)[:5]}")
        return texts, new_ids, keep, n_in

    def _append(self, x: np.ndarray, texts: list[str], ids: list, n_in: int, save: bool) -> int:
        from datasets import Dataset, concatenate_datasets

        st = self._state
        cpu = owned_copy(st.cpu_index)
        add_vectors(cpu, x)
        new = Dataset.from_dict({"caption": texts, "id": ids}, features=st.captions.features)
        captions = concatenate_datasets([st.captions, new])
        embeddings = None
        if st.embeddings is not None:
            embeddings = np.concatenate([st.embeddings, x.astype(st.embeddings.dtype)])
        manifest = copy.deepcopy(st.manifest)
        manifest["count"] = cpu.ntotal
        manifest["updated"] = utc_now()
        if manifest.get("dedupe"):
            manifest["dedupe"]["input_count"] += n_in
            manifest["dedupe"]["removed"] += n_in - len(texts)
        self._state = _make_state(
            cpu, captions, embeddings, manifest, self._overrides, self._use_gpu, False
        )
        logger.info("added %d captions (now %d)", len(texts), cpu.ntotal)
        if save and self.path is not None:
            self._save(None, overwrite=True)
        return len(texts)


class _Rows:
    """Row access to a (memory-mapped, many-chunk) Arrow column as Python values.

    ``ChunkedArray.take`` and even ``ChunkedArray.chunks`` (a new list of wrappers
    per call) cost time proportional to the number of chunks: 3–4 ms per query at
    1M captions in 1,000 chunks. The chunk list and chunk offsets are built once;
    each row's chunk is found by binary search (10 random rows of 1M: ~13 µs).
    """

    __slots__ = ("chunks", "starts")

    def __init__(self, col: Any) -> None:
        self.chunks = col.chunks
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks[:-1]]).astype(np.int64)

    def take(self, rows: np.ndarray) -> list:
        if len(rows) == 0:
            return []
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        offsets = (rows - self.starts[which]).tolist()
        ch = self.chunks
        return [ch[c][o].as_py() for c, o in zip(which.tolist(), offsets)]


def _results(st: _State, scores: np.ndarray, rows: np.ndarray, name: str) -> list[SearchResult]:
    """faiss (scores, rows) → SearchResults, dropping the -1 rows of missing hits."""
    valid = rows >= 0
    flat = rows[valid]
    caps = st.caption_rows.take(flat)
    ids = st.id_rows.take(flat)
    values = scores[valid].tolist()
    names = [name] * rows.shape[1]
    out, pos = [], 0
    for n in valid.sum(axis=1).tolist():
        end = pos + n
        out.append(SearchResult(ids[pos:end], values[pos:end], caps[pos:end], names[:n]))
        pos = end
    return out


# --------------------------------------------------------------------------- registry


def merge_results(per_index: Sequence[Sequence[SearchResult]], k: int) -> list[SearchResult]:
    """Merge several indices' results query by query: top ``k`` by score overall.

    Ties keep the order of ``per_index`` and then rank (stable sort).

    Args:
        per_index: One list of SearchResults (one per query) per index, hits tagged.
        k: Hits per query after merging.
    """
    if not per_index:
        return []
    merged = []
    for results in zip(*per_index):
        hits = [h for r in results for h in r.hits]
        hits.sort(key=lambda h: -h.score)
        hits = hits[:k]
        merged.append(
            SearchResult(
                ids=[h.id for h in hits],
                scores=[h.score for h in hits],
                captions=[h.text for h in hits],
                index_names=[h.index_name for h in hits],
            )
        )
    return merged


class IndexRegistry:
    """Several named knowledge indices, searched one at a time or merged; hot-swappable.

    All methods are thread-safe. A search snapshots the name → index mapping
    under the lock, then searches without it, so a concurrent :meth:`swap` never
    mixes two states of one name into one result.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._indices: dict[str, KnowledgeIndex] = {}

    @property
    def names(self) -> list[str]:
        """Registered names, in registration order."""
        with self._lock:
            return list(self._indices)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._indices

    def __len__(self) -> int:
        with self._lock:
            return len(self._indices)

    def register(self, name: str, index: KnowledgeIndex) -> None:
        """Add an index under ``name``.

        Raises:
            ValueError: The name is taken (use :meth:`swap`) or empty.
            TypeError: ``index`` is not a KnowledgeIndex.
        """
        _check_name(name)
        if not isinstance(index, KnowledgeIndex):
            raise TypeError(f"expected a KnowledgeIndex, got {type(index).__name__}")
        with self._lock:
            if name in self._indices:
                raise ValueError(f"an index named {name!r} is registered; use swap() to replace it")
            self._indices[name] = index

    def load(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        encoder: CaptionEncoder | str | None = None,
        **load_kwargs: Any,
    ) -> KnowledgeIndex:
        """Load an index folder (:meth:`KnowledgeIndex.load`) and register it.

        Args:
            path: Index folder.
            name: Registry name (default: the folder name).
            encoder: Retriever (or fingerprint) to check against.
            **load_kwargs: mmap, use_gpu, nprobe, ef_search, verify.
        """
        index = KnowledgeIndex.load(path, encoder, name=name, **load_kwargs)
        self.register(name or index.name, index)
        return index

    def unload(self, name: str) -> KnowledgeIndex:
        """Remove and return the index named ``name``."""
        with self._lock:
            if name not in self._indices:
                raise KeyError(_unknown(name, self._indices))
            return self._indices.pop(name)

    def get(self, name: str) -> KnowledgeIndex:
        """The index named ``name`` (KeyError listing the known names)."""
        with self._lock:
            if name not in self._indices:
                raise KeyError(_unknown(name, self._indices))
            return self._indices[name]

    def swap(self, name: str, new_index: KnowledgeIndex) -> KnowledgeIndex | None:
        """Atomically put ``new_index`` under ``name``; returns the previous one (or None).

        Searches already running finish on the old index; the next ones use the new.
        """
        _check_name(name)
        if not isinstance(new_index, KnowledgeIndex):
            raise TypeError(f"expected a KnowledgeIndex, got {type(new_index).__name__}")
        with self._lock:
            old = self._indices.get(name)
            self._indices[name] = new_index
        logger.info("index %r swapped to %s", name, new_index.path)
        return old

    def search(
        self, query_embeddings: Any, k: int, names: str | Sequence[str] | None = None
    ) -> list[SearchResult]:
        """Search one named index, or several merged by score (top ``k`` overall).

        Args:
            query_embeddings: (n, d) or (d,) floats.
            k: Hits per query.
            names: One name, a list of names, or None for all registered indices.

        Returns:
            One :class:`SearchResult` per query; each hit tagged with its registry name.

        Raises:
            KeyError: Unknown name (the known ones listed).
            ValueError: Nothing to search, or indices of different retrievers merged.
        """
        with self._lock:
            snapshot = dict(self._indices)
        if names is None:
            chosen = list(snapshot)
        elif isinstance(names, str):
            chosen = [names]
        else:
            chosen = list(dict.fromkeys(names))
        if not chosen:
            raise ValueError("no knowledge index to search: register or load one first")
        for n in chosen:
            if n not in snapshot:
                raise KeyError(_unknown(n, snapshot))
        indices = [snapshot[n] for n in chosen]
        fps = {ix.fingerprint for ix in indices}
        if len(fps) > 1:
            raise ValueError(
                f"cannot merge indices built with different retrievers ({sorted(fps)}): "
                "their scores are not comparable"
            )
        k = check_k(k)
        per_index = [
            [r.renamed(n) for r in ix.search(query_embeddings, k)] for n, ix in zip(chosen, indices)
        ]
        return per_index[0] if len(per_index) == 1 else merge_results(per_index, k)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"index name must be a non-empty string, got {name!r}")


def _unknown(name: str, known: dict) -> str:
    return f"no knowledge index named {name!r}; loaded: {', '.join(known) or '(none)'}"


# --------------------------------------------------------------------------- info


def index_info(
    path: str | os.PathLike, encoder: CaptionEncoder | None = None, n_check: int = 3
) -> str:
    """A human-readable summary of an index folder plus a sanity search.

    Verifies every file's sha256, then searches the first ``n_check`` captions —
    re-encoded with ``encoder`` when given (the fingerprint is checked), else their
    stored embeddings, else vectors reconstructed from the index — and reports
    whether each finds itself at rank 1 (ties with an identical score count).

    Raises:
        The errors of :meth:`KnowledgeIndex.load`.
    """
    path = Path(path)
    index = KnowledgeIndex.load(path, encoder, verify=True)
    m = index.manifest
    dd = m.get("dedupe") or {}
    auto = m.get("auto_choice")
    tuning = m.get("search_tuning") or {}
    recall = {k: v for k, v in tuning.items() if k.startswith("recall_at_")}
    files = m["files"]
    caption_bytes = sum(v["bytes"] for k, v in files.items() if k.startswith(CAPTIONS_DIR + "/"))
    lines = [
        f"Knowledge index {path}",
        f"  format            version {m['format_version']} (written by rvqa {m.get('rvqa_version', '?')})",
        f"  created           {m.get('created')}"
        + (f", updated {m['updated']}" if m.get("updated") else ""),
        f"  retriever         {m['retriever_fingerprint']}",
        f"  captions          {m['count']:,} from {m.get('caption_source') or '(unspecified)'!s}",
        "  dedupe            "
        + (
            f"removed {dd.get('removed', 0):,} duplicates of {dd.get('input_count', 0):,}"
            if dd.get("enabled")
            else "off"
        ),
        f"  vectors           dim {m['embed_dim']}, inner product on L2-normalised vectors",
        f"  faiss             {m['factory']}"
        + (f" (automatic: {auto['reason']})" if auto else "")
        + "".join(f", {k}={v}" for k, v in (m.get("build_params") or {}).items()),
        "  search params     "
        + (", ".join(f"{k}={v}" for k, v in m["search_params"].items()) or "none (exact)")
        + (f"; measured {_fmt_recall(recall)}" if recall else ""),
    ]
    knob = next(iter(m["search_params"]), "value")
    if tuning.get("curve"):
        lines.append(
            f"  tuning            recall@10 by {knob} ({tuning.get('queries')} queries: "
            f"{tuning.get('query_proxy')}): "
            + ", ".join(f"{c[0]}: {c[1]:.3f}" for c in tuning["curve"])
        )
    if tuning.get("proxies"):
        names = {"held_out": "corpus tail"}
        lines.append(
            f"  proxies           at {knob}={m['search_params'].get(knob)}: "
            + ", ".join(
                f"{names.get(name, name)} {r:.3f} (bound {lb:.3f})"
                for name, (r, lb) in tuning["proxies"].items()
            )
        )
    lines += [
        f"  memory-mapped     {index.memory_mapped}",
        f"  files             {INDEX_FILE} {_mb(files[INDEX_FILE]['bytes'])}, {CAPTIONS_DIR}/ "
        f"{_mb(caption_bytes)}"
        + (
            f", {EMBEDDINGS_FILE} {_mb(files[EMBEDDINGS_FILE]['bytes'])} ({m['embeddings']['dtype']})"
            if m.get("embeddings")
            else ", no stored embeddings"
        )
        + " (sha256 verified)",
    ]
    lines += _sanity_lines(index, encoder, n_check)
    return "\n".join(lines)


def _fmt_recall(recall: dict) -> str:
    return ", ".join(f"{k.replace('_at_', '@')} {v}" for k, v in recall.items())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _sanity_lines(index: KnowledgeIndex, encoder: Any, n_check: int) -> list[str]:
    st = index._state
    n = min(n_check, len(index))
    if n == 0:
        return ["  sanity search     skipped (empty index)"]
    texts = st.caption_col.slice(0, n).to_pylist()
    ids = st.id_col.slice(0, n).to_pylist()
    if encoder is not None:
        q, how = encoder.embed_texts(texts), "re-encoded captions"
    elif st.embeddings is not None:
        q, how = np.asarray(st.embeddings[:n], dtype=np.float32), "stored embeddings"
    else:
        try:
            q, how = st.cpu_index.reconstruct_n(0, n), "vectors reconstructed from the index"
        except RuntimeError:
            return [
                "  sanity search     skipped (no encoder, no stored embeddings, not reconstructible)"
            ]
    results = index.search(q, 5)
    ok = 0
    details = []
    for text, cid, r in zip(texts, ids, results):
        top = r.scores[0] if r.scores else float("nan")
        tied = [i for i, s in zip(r.ids, r.scores) if s >= top - 1e-6]
        found = cid in tied
        ok += found
        rank = r.ids.index(cid) + 1 if cid in r.ids else None
        details.append(
            f"    {'ok ' if found else 'BAD'} id {cid!r} {text[:50]!r}: "
            + (f"rank {rank}, score {r.scores[rank - 1]:.3f}" if rank else "not in the top 5")
        )
    head = f"  sanity search     {ok}/{n} captions find themselves at rank 1 ({how})"
    return [head, *details]
