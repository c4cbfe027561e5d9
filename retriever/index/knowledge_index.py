"""``KnowledgeIndex``: a loaded index folder — load, search, add, save, with swap-safe state.

Thread safety: :meth:`KnowledgeIndex.search` reads one immutable state snapshot
(faiss CPU search is read-only and releases the GIL), so many threads may search
one index at once. :meth:`KnowledgeIndex.add` builds a new state on an owned
in-memory copy and swaps it in with one assignment; searches running meanwhile
finish on the old state.

GPU (``use_gpu=True``): the index is cloned to the GPUs **sharded**
(``GpuMultipleClonerOptions.shard = True``): each GPU holds ``1/n`` of the vectors
and every query searches all shards, whose top-k lists faiss merges (exactly the
one-GPU result). Sharded, not replicated, because the index shares its GPUs with
the retriever and reader: a replica per GPU would cost the whole index on every
GPU (600k COCO captions × 256 dims = 0.6 GB each), while batch searches are
already fast on one GPU. A process of a multi-process run passes its own GPU
(``gpus=[local rank]``): every process of ``accelerate launch`` sees all GPUs, and
cloning to all of them from each of N processes would put N copies on every GPU.
faiss GPU indices and their ``StandardGpuResources`` are not thread-safe, so every
GPU operation (clone, search) holds one process-wide lock: concurrent searches on
GPU indices run one at a time. Without a faiss GPU build or visible GPU, search
stays on CPU and one warning is logged per process.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from rvqa.errors import IndexMismatchError, UsageError
from rvqa.retriever.index.corpus import check_embeddings, dedupe_captions, prepare_corpus
from rvqa.retriever.index.faiss_ops import (
    add_vectors,
    hamming_scores,
    is_binary,
    pack_codes,
    set_search_params,
    unpack_codes,
)
from rvqa.retriever.index.format import (
    CAPTIONS_DIR,
    EMBEDDINGS_FILE,
    HAMMING,
    INDEX_FILE,
    LOGSIGMA_FILE,
    IndexFormatError,
    check_files,
    owned_copy,
    read_captions,
    read_faiss_index,
    read_manifest,
    utc_now,
    write_index_folder,
)
from rvqa.retriever.index.types import CaptionEncoder, SearchResult

__all__ = ["KnowledgeIndex", "as_query_matrix", "check_fingerprint", "check_k"]

logger = logging.getLogger(__name__)


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
        raise UsageError(f"query embeddings must have shape (n, {dim}) or ({dim},), got {shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise UsageError(f"query embeddings contain NaN or inf (row {int(np.argmax(bad))})")
    return x


def check_k(k: Any) -> int:
    """``k`` must be a positive int."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a positive integer, got {k!r}")
    if k <= 0:
        raise UsageError(f"k must be a positive integer, got {k}")
    return int(k)


def check_fingerprint(manifest: dict, retriever: Any, path: Path) -> CaptionEncoder | None:
    """Compare the index's retriever fingerprint with ``retriever`` (encoder, str or None).

    Returns:
        The encoder when ``retriever`` is one, else None.

    Raises:
        IndexMismatchError: Fingerprints (or embedding dims) differ; both are named.
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
        raise IndexMismatchError(
            f"knowledge index {path} was built with retriever fingerprint "
            f"{manifest['retriever_fingerprint']}, but the retriever in use has fingerprint {fp}; "
            "rebuild the index with this retriever (rvqa build-index) or load the matching retriever"
        )
    metric = getattr(encoder, "index_metric", None)
    if metric is not None and metric != manifest["metric"]:
        raise IndexMismatchError(
            f"knowledge index {path} is a {manifest['metric']} index, but the retriever in use "
            f"gives {metric} {'codes' if metric == HAMMING else 'embeddings'}"
        )
    dim = getattr(encoder, "embed_dim", None)
    if dim is not None and dim != manifest["embed_dim"]:
        raise IndexMismatchError(
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
    logsigma: np.ndarray | None = None  # a PCME index's caption log σ (memmap)


_GPU_LOCK = threading.Lock()
"""Serialises every faiss GPU operation of this process (clone, search): faiss GPU
indices and their resources must not run concurrent calls."""

_warned_no_gpu = False
_warned_binary = False


def _to_gpu(index: faiss.Index, gpus: Sequence[int] | None = None) -> tuple[faiss.Index, bool]:
    """Clone to GPUs, sharded (module docstring): ``gpus``, or all GPUs faiss sees.

    Stays on CPU, with one warning per process, when faiss has no GPU support or
    sees no GPU; with a warning (every time) when this index type cannot move.
    """
    global _warned_no_gpu, _warned_binary
    if is_binary(index):
        if not _warned_binary:
            _warned_binary = True
            logger.warning("binary (Hamming) indices are searched on CPU; use_gpu ignored")
        return index, False
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if ngpu <= 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        if not _warned_no_gpu:
            _warned_no_gpu = True
            logger.warning(
                "use_gpu=True but faiss sees no GPU (faiss-cpu build or no device); "
                "searching on CPU"
            )
        return index, False
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True
    try:
        with _GPU_LOCK:
            if gpus is None:
                gpu = faiss.index_cpu_to_all_gpus(index, co=co)
            else:
                gpu = faiss.index_cpu_to_gpus_list(index, co=co, gpus=list(gpus))
    except (RuntimeError, AttributeError) as err:
        logger.warning(
            "this index type cannot move to GPU (%s); searching on CPU", str(err).splitlines()[0]
        )
        return index, False
    logger.info("index sharded over %s", f"GPUs {list(gpus)}" if gpus else f"{ngpu} GPU(s)")
    return gpu, True


def _make_state(
    cpu_index: faiss.Index,
    captions: Any,
    embeddings: np.ndarray | None,
    manifest: dict,
    overrides: dict,
    use_gpu: bool,
    memory_mapped: bool,
    gpus: Sequence[int] | None = None,
    logsigma: np.ndarray | None = None,
) -> _State:
    params = {**manifest["search_params"], **overrides}
    if params:
        set_search_params(cpu_index, params)
    index, on_gpu = _to_gpu(cpu_index, gpus) if use_gpu else (cpu_index, False)
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
        gpu_lock=_GPU_LOCK if on_gpu else None,
        logsigma=logsigma,
    )


def _load_state(
    path: Path,
    manifest: dict,
    mmap: bool,
    use_gpu: bool,
    overrides: dict,
    verify: bool,
    gpus: Sequence[int] | None = None,
) -> _State:
    check_files(path, manifest["files"], verify=verify)
    index, mapped = read_faiss_index(
        path / INDEX_FILE, mmap=mmap, binary=manifest["metric"] == HAMMING
    )
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
    logsigma = None
    if manifest.get("uncertainty"):
        if LOGSIGMA_FILE not in manifest["files"]:
            raise IndexFormatError(
                f"{path}: the manifest records caption uncertainties but lists no "
                f"{LOGSIGMA_FILE} (written by an rvqa that dropped it?); rebuild the index"
            )
        logsigma = np.load(path / LOGSIGMA_FILE, mmap_mode="r", allow_pickle=False)
        if logsigma.shape != (manifest["count"], manifest["embed_dim"]):
            raise IndexFormatError(
                f"{path / LOGSIGMA_FILE} has shape {logsigma.shape}, the manifest says "
                f"({manifest['count']}, {manifest['embed_dim']})"
            )
    return _make_state(
        index, captions, embeddings, manifest, overrides, use_gpu, mapped, gpus, logsigma
    )


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
        gpus: Sequence[int] | None = None,
    ):
        self._state = state
        self.path = path
        self.name = name
        self.encoder = encoder
        self._mmap = mmap
        self._use_gpu = use_gpu
        self._gpus = list(gpus) if gpus is not None else None
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
        gpus: Sequence[int] | None = None,
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
            use_gpu: Search on GPU: the index is sharded over ``gpus`` (module
                docstring); without a faiss GPU build or GPU, one warning per process
                and search stays on CPU.
            gpus: The GPU numbers to shard over (default: all GPUs faiss sees); a
                process of a multi-process run passes its own.
            nprobe: Override the manifest's IVF ``nprobe``.
            ef_search: Override the manifest's HNSW ``efSearch``.
            verify: Check every file's sha256 (sizes are always checked).

        Raises:
            FileNotFoundError: Missing folder, manifest or index file.
            IndexFormatError: Malformed manifest, newer format version, truncated file.
            IndexMismatchError: Retriever fingerprint mismatch (both named).
            ValueError: A search parameter not applicable to this index type.
        """
        path = Path(path)
        manifest = read_manifest(path)
        encoder = check_fingerprint(manifest, retriever, path)
        overrides = _overrides(nprobe, ef_search)
        state = _load_state(path, manifest, mmap, use_gpu, overrides, verify, gpus)
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
            gpus=gpus,
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
    def metric(self) -> str:
        """``"inner_product"`` (float embeddings) or ``"hamming"`` (binary codes)."""
        return self._state.manifest["metric"]

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
        """Whether searches run on GPU (False after a CPU fallback)."""
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

    def leading_vectors(self, n: int) -> tuple[np.ndarray, str] | None:
        """The vectors of the first ``n`` rows and where they came from.

        Returns:
            ``(vectors, source)``: the stored raw embeddings when the folder has them,
            else vectors reconstructed from the faiss index; None when neither is
            possible (e.g. a PQ index without stored embeddings).
        """
        st = self._state
        bits = st.manifest["embed_dim"]
        if st.embeddings is not None:
            if st.manifest["metric"] == HAMMING:
                return unpack_codes(st.embeddings[:n], bits), "stored codes"
            return np.asarray(st.embeddings[:n], dtype=np.float32), "stored embeddings"
        try:
            x = st.cpu_index.reconstruct_n(0, n)
        except RuntimeError:
            return None
        if is_binary(st.cpu_index):
            x = unpack_codes(x, bits)
        return x, "vectors reconstructed from the index"

    # ---------------------------------------------------------------- search

    def search(self, query_embeddings: Any, k: int) -> list[SearchResult]:
        """Top-k captions for each query embedding.

        Args:
            query_embeddings: (n, d) or (d,) float array (float64/float16 converted);
                L2-normalised for cosine scores. A binary index takes a hashing
                retriever's (n, bits) codes (> 0 is a 1 bit); its scores are
                ``1 − 2·hamming / bits``.
            k: Hits per query (fewer when the index holds fewer captions).

        Returns:
            One :class:`SearchResult` per query row (a list of one for a (d,) query).

        Raises:
            TypeError: Non-float queries, non-int k.
            ValueError: Wrong dim (expected and got shapes named), NaN/inf, k <= 0.
        """
        st = self._state  # one snapshot for the whole call
        xq = as_query_matrix(query_embeddings, st.manifest["embed_dim"])
        if len(xq) == 0:
            check_k(k)
            return []
        scores, rows = _search(st, xq, k)
        if rows.shape[1] == 0:
            return [SearchResult() for _ in range(len(xq))]
        return _results(st, scores, rows, self.name)

    def search_rows(self, query_embeddings: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k as arrays: ``(scores, rows)``, both (n, min(k, len(self))).

        ``rows`` are row numbers for :meth:`lookup` (-1 where the index returned no
        hit, e.g. an IVF index probing too few lists). Validation as :meth:`search`.
        """
        st = self._state
        xq = as_query_matrix(query_embeddings, st.manifest["embed_dim"])
        return _search(st, xq, k)

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
            if is_binary(st.cpu_index):
                try:  # shares a memory-mapped index's codes, as clone_index does
                    cpu = faiss.clone_binary_index(st.cpu_index)
                except RuntimeError:  # types faiss cannot clone: an owned copy
                    cpu = owned_copy(st.cpu_index)
            else:
                cpu = faiss.clone_index(st.cpu_index)
            self._state = _make_state(
                cpu,
                st.captions,
                st.embeddings,
                st.manifest,
                overrides,
                self._use_gpu,
                memory_mapped=st.memory_mapped,
                gpus=self._gpus,
                logsigma=st.logsigma,
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
            sig = None
            if self._state.logsigma is not None:
                x, sig = encoder.embed_texts(
                    texts, batch_size=batch_size, show_progress=show_progress, return_logsigma=True
                )
            else:
                x = encoder.embed_texts(texts, batch_size=batch_size, show_progress=show_progress)
            x = check_embeddings(x, len(texts), self.embed_dim, binary=self.metric == HAMMING)
            return self._append(x, texts, ids, n_in, save, sig)

    def add_embeddings(
        self,
        embeddings: np.ndarray,
        captions: Any,
        ids: Sequence[Any] | None = None,
        *,
        save: bool = True,
        logsigma: np.ndarray | None = None,
    ) -> int:
        """Append precomputed (n, d) L2-normalised embeddings of ``captions`` (array level;
        a binary index: (n, bits) codes of ±1; a probabilistic index also needs their
        (n, d) ``logsigma``)."""
        with self._write_lock:
            texts, ids, keep, n_in = self._prepare_new(captions, ids)
            binary = self.metric == HAMMING
            x = check_embeddings(embeddings, n_in, self.embed_dim, binary=binary)[keep]
            if (logsigma is None) != (self._state.logsigma is None):
                raise UsageError(
                    "this index stores caption uncertainties (PCME): pass logsigma= for the new "
                    "captions"
                    if logsigma is None
                    else "logsigma= is for probabilistic (PCME) indices; this one stores none"
                )
            sig = None
            if logsigma is not None:
                sig = np.asarray(logsigma, dtype=np.float32)
                if sig.shape != (n_in, self.embed_dim) or not np.isfinite(sig).all():
                    raise UsageError(
                        f"logsigma must be a finite ({n_in}, {self.embed_dim}) array, got "
                        f"shape {sig.shape}"
                    )
                sig = sig[keep]
            if not texts:
                logger.info("add: nothing new to add")
                return 0
            return self._append(x, texts, ids, n_in, save, sig)

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
                raise UsageError("this index has no folder yet: pass a path to save()")
            target, overwrite = self.path, True
        else:
            target = Path(path)
        st = self._state
        manifest = copy.deepcopy(st.manifest)
        write_index_folder(
            target,
            st.cpu_index,
            st.captions,
            None,
            manifest,
            st.embeddings,
            overwrite,
            logsigma=st.logsigma,
        )
        self.path = target
        self._state = _load_state(
            target, manifest, self._mmap, self._use_gpu, self._overrides, False, self._gpus
        )
        return target

    def _require_encoder(self, what: str) -> CaptionEncoder:
        if self.encoder is None:
            raise UsageError(
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
                raise UsageError("this index has string ids: pass ids= for the new captions")
            start = max(existing_ids, default=-1) + 1
            new_ids = list(range(start, start + len(texts)))
        if isinstance(new_ids[0], str) != str_ids:
            raise TypeError(
                f"this index has {'string' if str_ids else 'integer'} ids, got "
                f"{type(new_ids[0]).__name__} ids for the new captions"
            )
        clash = set(new_ids).intersection(existing_ids)
        if clash:
            raise UsageError(f"ids already in the index: {sorted(clash)[:5]}")
        return texts, new_ids, keep, n_in

    def _append(
        self,
        x: np.ndarray,
        texts: list[str],
        ids: list,
        n_in: int,
        save: bool,
        logsigma: np.ndarray | None = None,
    ) -> int:
        from datasets import Dataset, concatenate_datasets

        st = self._state
        cpu = owned_copy(st.cpu_index)
        add_vectors(cpu, x)
        new = Dataset.from_dict({"caption": texts, "id": ids}, features=st.captions.features)
        captions = concatenate_datasets([st.captions, new])
        embeddings = None
        if st.embeddings is not None:
            new_rows = pack_codes(x) if is_binary(cpu) else x.astype(st.embeddings.dtype)
            embeddings = np.concatenate([st.embeddings, new_rows])
        sigma = None
        if st.logsigma is not None:
            sigma = np.concatenate([st.logsigma, logsigma.astype(st.logsigma.dtype)])
        manifest = copy.deepcopy(st.manifest)
        manifest["count"] = cpu.ntotal
        manifest["updated"] = utc_now()
        if manifest.get("dedupe"):
            manifest["dedupe"]["input_count"] += n_in
            manifest["dedupe"]["removed"] += n_in - len(texts)
        self._state = _make_state(
            cpu,
            captions,
            embeddings,
            manifest,
            self._overrides,
            self._use_gpu,
            False,
            self._gpus,
            sigma,
        )
        logger.info("added %d captions (now %d)", len(texts), cpu.ntotal)
        if save and self.path is not None:
            self._save(None, overwrite=True)
        return len(texts)


class _Rows:
    """Row access to a (memory-mapped, many-chunk) Arrow column as Python values.

    ``ChunkedArray.take`` and even ``ChunkedArray.chunks`` (a new list of wrappers
    per call) cost time proportional to the number of chunks, per query. The chunk
    list and chunk offsets are built once; each row's chunk is found by binary
    search (measured: benchmarks/README.md, "Figures behind the index code's
    defaults").
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


def _search(st: _State, xq: np.ndarray, k: Any) -> tuple[np.ndarray, np.ndarray]:
    """faiss search of one state; GPU states hold the process-wide GPU lock."""
    k = min(check_k(k), st.index.ntotal)
    if k == 0 or len(xq) == 0:
        return np.zeros((len(xq), k), np.float32), np.full((len(xq), k), -1, np.int64)
    if is_binary(st.index):
        dist, rows = st.index.search(pack_codes(xq), k)
        return hamming_scores(dist, st.index.d), rows
    if st.gpu_lock is not None:
        with st.gpu_lock:
            return st.index.search(xq, k)
    return st.index.search(xq, k)


def _results(st: _State, scores: np.ndarray, rows: np.ndarray, name: str) -> list[SearchResult]:
    """faiss (scores, rows) → SearchResults, dropping the -1 rows of missing hits."""
    valid = rows >= 0
    flat = rows[valid]
    caps = st.caption_rows.take(flat)
    ids = st.id_rows.take(flat)
    values = scores[valid].tolist()
    names = [name] * rows.shape[1]
    unc = None
    if st.logsigma is not None:  # PCME: each caption's geometric mean of σ²
        sig = np.asarray(st.logsigma[flat], dtype=np.float32)
        unc = np.exp(2 * sig.mean(axis=1)).tolist()
    out, pos = [], 0
    for n in valid.sum(axis=1).tolist():
        end = pos + n
        out.append(
            SearchResult(
                ids[pos:end],
                values[pos:end],
                caps[pos:end],
                names[:n],
                None if unc is None else unc[pos:end],
            )
        )
        pos = end
    return out
