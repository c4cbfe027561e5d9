"""faiss operations on arrays: make an index from a factory string, train, add, search knobs;
faiss' BLAS threshold for exact search of a batch (:data:`FLAT_BLAS_THRESHOLD`).

A corpus too small for a requested IVF factory is an error (no silent change of
the user's factory string): ``IVF{nlist}`` needs at least 39·nlist vectors, a
product quantizer at least 2**nbits.

Binary indices (a hashing retriever's codes, Hamming distance): factory strings of
``faiss.index_binary_factory`` (``BFlat``, ``BHNSW32``, ``BIVF1024``). Codes travel
as ±1 float rows (what the retriever returns) and are packed 8 bits a byte
(:func:`pack_codes`) where they enter faiss; a hit's score is the cosine of the ±1
codes, ``1 − 2·hamming / bits`` (:func:`hamming_scores`), so higher is better as for
float indices — but the two are not comparable, and are never merged.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from rvqa.errors import UsageError
from rvqa.retriever.index.factory import MIN_POINTS_PER_CENTROID

__all__ = [
    "FAISS_BLAS_THRESHOLD",
    "FLAT_BLAS_THRESHOLD",
    "HNSW_EF_CONSTRUCTION",
    "apply_blas_threshold",
    "BINARY_SEARCH_DEFAULTS",
    "add_vectors",
    "hamming_scores",
    "is_binary",
    "is_binary_factory",
    "pack_codes",
    "unpack_codes",
    "build_params",
    "check_ef_construction",
    "core_index",
    "make_index",
    "min_training_size",
    "search_param_name",
    "set_search_params",
    "train_index",
]

logger = logging.getLogger(__name__)

HNSW_EF_CONSTRUCTION = 200
"""Default ``efConstruction`` of the HNSW graphs rvqa builds (faiss' own default is 40).
A better graph costs build time once and buys search speed at every query
(measured trade-off: benchmarks/README.md, "Figures behind the index code's defaults")."""
MAX_TRAIN_POINTS = 100_000
"""Training sample cap (raised to 256·nlist for large nlist, faiss' own subsampling limit)."""
ADD_CHUNK = 1 << 16


FAISS_BLAS_THRESHOLD = 128_000
"""faiss' own ``distance_compute_blas_threshold`` (faiss ≥ 1.14.2: exact search of ``nq``
queries of dimension ``d`` multiplies matrices (BLAS) when ``nq·d`` reaches it, else
scans the database once per query)."""
FLAT_BLAS_THRESHOLD = 2048
"""The ``distance_compute_blas_threshold`` rvqa sets: BLAS from 8 queries at d = 256.
On 2 cores (32 MB L3) a Flat search of 32 queries over 100,000 × 256 vectors takes 93 ms
scanning per query and 18 ms with BLAS; faiss' default scans batches of fewer than 500
(measured: benchmarks/README.md, "Figures behind the index code's defaults";
``benchmarks/flat_blas.py`` measures a machine). Applied when this module is imported
(:func:`apply_blas_threshold`)."""
MAX_BLAS_THRESHOLD = 2**31 - 1


BINARY_SEARCH_DEFAULTS = {"efSearch": 128, "nprobe": 16}
"""Search parameters of binary HNSW / IVF indices (set at build, not tuned: the float
tuner's exact kNN does not apply to Hamming distance)."""


def is_binary_factory(factory: str) -> bool:
    """``BFlat``, ``BHNSW32``, ``BIVF1024``...: a faiss binary index factory string."""
    return isinstance(factory, str) and factory.strip()[:1] == "B"


def is_binary(index: Any) -> bool:
    """Whether ``index`` is a faiss binary index."""
    return isinstance(index, faiss.IndexBinary)


def pack_codes(x: np.ndarray) -> np.ndarray:
    """(n, bits) codes (±1 floats; > 0 is a 1 bit) → (n, bits / 8) uint8, as faiss stores them."""
    return np.packbits(np.asarray(x) > 0, axis=1)


def unpack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(n, bits / 8) uint8 → (n, bits) float32 codes of ±1."""
    b = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1, count=bits)
    return b.astype(np.float32) * 2 - 1


def hamming_scores(distances: np.ndarray, bits: int) -> np.ndarray:
    """Hamming distances → scores ``1 − 2·d / bits`` (the cosine of the ±1 codes)."""
    return (1.0 - 2.0 * np.asarray(distances, dtype=np.float32) / bits).astype(np.float32)


def make_index(
    factory: str,
    d: int,
    ef_construction: int | None = HNSW_EF_CONSTRUCTION,
    metric: str = "inner_product",
) -> faiss.Index:
    """``faiss.index_factory`` with inner product (``metric="hamming"``:
    ``faiss.index_binary_factory`` over ``d`` bits); a clear error for a bad string or a
    factory of the other kind.

    ``ef_construction`` is set on every HNSW graph of the index (an HNSW index or an
    IVF's HNSW coarse quantizer); None keeps faiss' default (40).
    """
    if not isinstance(factory, str) or not factory.strip():
        raise UsageError(f"factory must be a faiss factory string like 'Flat', got {factory!r}")
    if metric == "hamming":
        return _make_binary_index(factory.strip(), d, ef_construction)
    if is_binary_factory(factory):
        raise UsageError(
            f"factory {factory!r} is a binary (Hamming) index, but this retriever's embeddings "
            "are float vectors (inner product): use a float factory such as 'Flat', 'HNSW32' "
            "or 'IVF1024,SQ8', or train a hashing retriever (retriever.loss with 'hash')"
        )
    try:
        index = faiss.index_factory(d, factory.strip(), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise UsageError(
            f"invalid faiss factory string {factory!r} for dim {d}: "
            f"{str(err).splitlines()[0][:300]}. Examples: 'Flat', 'HNSW32', "
            "'IVF1024,Flat', 'IVF4096,PQ32', 'OPQ16_64,IVF1024,PQ16'"
        ) from None
    if ef_construction is not None:
        for graph in _hnsw_graphs(index):
            graph.efConstruction = int(ef_construction)
    return index


def _make_binary_index(factory: str, bits: int, ef_construction: int | None) -> faiss.IndexBinary:
    if not is_binary_factory(factory):
        raise UsageError(
            f"factory {factory!r} is a float index, but a hashing retriever's codes are binary "
            "(Hamming distance): use a binary factory: 'BFlat', 'BHNSW32' or 'BIVF1024'"
        )
    if bits % 8:
        raise UsageError(f"binary codes need a multiple of 8 bits, got {bits}")
    try:
        index = faiss.index_binary_factory(bits, factory)
    except RuntimeError as err:
        raise UsageError(
            f"invalid faiss binary factory string {factory!r} for {bits} bits: "
            f"{str(err).splitlines()[0][:300]}. Examples: 'BFlat', 'BHNSW32', 'BIVF1024'"
        ) from None
    # (index_binary_factory already returns the subclass; a downcast proxy would not own it)
    if ef_construction is not None and isinstance(index, faiss.IndexBinaryHNSW):
        index.hnsw.efConstruction = int(ef_construction)
    return index


def check_ef_construction(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"ef_construction must be an integer ≥ 1, got {value!r}")
    return int(value)


def _hnsw_graphs(index: faiss.Index) -> list:
    """The HNSW graphs of an index: its own, or its IVF coarse quantizer's."""
    if is_binary(index):
        return [index.hnsw] if isinstance(index, faiss.IndexBinaryHNSW) else []
    core = core_index(index)
    if isinstance(core, faiss.IndexHNSW):
        return [core.hnsw]
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            return [quantizer.hnsw]
    return []


def build_params(index: faiss.Index) -> dict[str, int]:
    """Build settings worth recording in the manifest (``efConstruction`` of HNSW)."""
    graphs = _hnsw_graphs(index)
    return {"efConstruction": int(graphs[0].efConstruction)} if graphs else {}


def core_index(index: faiss.Index) -> faiss.Index:
    """Peel pre-transforms / refinement / id maps off an index (downcast)."""
    index = faiss.downcast_index(index)
    for _ in range(8):
        if isinstance(index, faiss.IndexPreTransform):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        elif isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            index = faiss.downcast_index(index.index)
        else:
            break
    return index


def min_training_size(index: faiss.Index) -> tuple[int, str]:
    """The fewest vectors that can train ``index``, and why (0 when no training is needed).

    IVF needs 39 points per list; a product quantizer (incl. OPQ's) at least 2**nbits.
    """
    if index.is_trained:
        return 0, ""
    need, why = 1, "training"
    if is_binary(index):
        nlist = getattr(index, "nlist", 1)
        return MIN_POINTS_PER_CENTROID * nlist, (
            f"BIVF{nlist} needs {MIN_POINTS_PER_CENTROID} training codes per list"
        )
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        need = MIN_POINTS_PER_CENTROID * ivf.nlist
        why = f"IVF{ivf.nlist} needs {MIN_POINTS_PER_CENTROID} training vectors per list"
    core = core_index(index)
    pq = getattr(core, "pq", None)
    if pq is not None and pq.ksub > need:
        need, why = pq.ksub, f"a {pq.nbits}-bit product quantizer needs {pq.ksub} training vectors"
    return need, why


def train_index(index: faiss.Index, x: np.ndarray, seed: int = 0) -> None:
    """Train ``index`` (if untrained) on a seeded sample of at most ``MAX_TRAIN_POINTS``.

    Raises:
        ValueError: Fewer vectors than the index needs (see :func:`min_training_size`).
    """
    if index.is_trained:
        return
    need, why = min_training_size(index)
    n = len(x)
    if is_binary(index):
        if n < need:
            raise UsageError(
                f"the corpus has {n} codes, too few to train this index: {why}, so it needs at "
                f"least {need}. Use 'BFlat', a smaller BIVF, or factory=None (automatic)"
            )
        logger.info("training %s on %d codes", type(index).__name__, n)
        index.train(pack_codes(x))
        return
    if n < need:
        ivf = faiss.try_extract_index_ivf(index)
        hint = ""
        if ivf is not None:
            fit = 2 ** int(math.log2(max(1, n // MIN_POINTS_PER_CENTROID)))
            hint = f" (e.g. IVF{fit} instead of IVF{ivf.nlist})"
        raise UsageError(
            f"the corpus has {n} vectors, too few to train this index: {why}, so it needs at "
            f"least {need}. Use a smaller factory{hint}, 'Flat', or factory=None (automatic)"
        )
    ivf = faiss.try_extract_index_ivf(index)
    cap = max(MAX_TRAIN_POINTS, 256 * (ivf.nlist if ivf is not None else 0))
    if n > cap:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))
        sample = np.ascontiguousarray(x[rows], dtype=np.float32)
    else:
        sample = np.ascontiguousarray(x, dtype=np.float32)
    logger.info("training %s on %d of %d vectors", type(index).__name__, len(sample), n)
    index.train(sample)


def add_vectors(index: faiss.Index, x: np.ndarray, show_progress: bool = False) -> None:
    """Add rows of ``x`` (any float dtype, may be a memmap) in chunks, with a progress bar."""
    starts = range(0, len(x), ADD_CHUNK)
    binary = is_binary(index)
    for s in tqdm(starts, desc="adding to index", unit="chunk", disable=not show_progress):
        if binary:
            index.add(pack_codes(x[s : s + ADD_CHUNK]))
        else:
            index.add(np.ascontiguousarray(x[s : s + ADD_CHUNK], dtype=np.float32))


def search_param_name(index: faiss.Index) -> str | None:
    """The speed/recall knob of an index: ``nprobe`` (IVF), ``efSearch`` (HNSW) or None."""
    if is_binary(index):
        if isinstance(index, faiss.IndexBinaryIVF):
            return "nprobe"
        return "efSearch" if isinstance(index, faiss.IndexBinaryHNSW) else None
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    if isinstance(core_index(index), faiss.IndexHNSW):
        return "efSearch"
    return None


def set_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Apply ``{"nprobe": 32}`` / ``{"efSearch": 64}`` via ``faiss.ParameterSpace``.

    Raises:
        ValueError: The index type has no such parameter, or a value is not a positive int.
    """
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UsageError(f"search parameter {name} must be a positive integer, got {value!r}")
        if is_binary(index):
            if search_param_name(index) != name:
                raise UsageError(
                    f"binary index type {type(index).__name__} has "
                    f"no search parameter {name!r} (it has: {search_param_name(index) or 'none'})"
                )
            if name == "nprobe":
                index.nprobe = int(value)
            else:
                index.hnsw.efSearch = int(value)
            continue
        try:
            ps.set_index_parameter(index, name, int(value))
        except RuntimeError:
            raise UsageError(
                f"index type {type(core_index(index)).__name__} has no search parameter {name!r} "
                f"(it has: {search_param_name(index) or 'none'})"
            ) from None
        ivf = faiss.try_extract_index_ivf(index)
        if name == "nprobe" and ivf is not None:
            quantizer = faiss.downcast_index(ivf.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):  # must explore >= nprobe lists
                quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, 2 * int(value))


def apply_blas_threshold() -> int:
    """Set faiss' ``distance_compute_blas_threshold``: to ``RVQA_FAISS_BLAS_THRESHOLD``
    when that is an integer (``faiss``: leave faiss' value), else to
    :data:`FLAT_BLAS_THRESHOLD` where faiss' default is still in force (not where
    someone set another, or an older faiss counts queries instead). Returns the value
    in force. A bad variable is logged and treated as unset."""
    current = int(faiss.cvar.distance_compute_blas_threshold)
    wanted = os.environ.get("RVQA_FAISS_BLAS_THRESHOLD", "").strip()
    if wanted == "faiss":
        return current
    if wanted:
        try:
            value = int(wanted)
        except ValueError:
            value = -1
        if 0 <= value <= MAX_BLAS_THRESHOLD:
            faiss.cvar.distance_compute_blas_threshold = value
            return value
        logger.warning(
            "RVQA_FAISS_BLAS_THRESHOLD=%r is not 'faiss' or an integer from 0 to %d; ignored",
            wanted,
            MAX_BLAS_THRESHOLD,
        )
    if current != FAISS_BLAS_THRESHOLD:
        return current
    faiss.cvar.distance_compute_blas_threshold = FLAT_BLAS_THRESHOLD
    return FLAT_BLAS_THRESHOLD


apply_blas_threshold()
