"""Building knowledge indices: array-level helpers and the build entry points.

Small functions over numpy arrays (faiss ``contrib`` style), each tested
against a brute-force numpy search:

- :func:`choose_factory` — automatic faiss factory string from corpus size,
  dimension and a memory budget (thresholds below).
- :func:`train_index` / :func:`add_vectors` — train on a seeded sample, add in chunks.
- :func:`exact_knn`, :func:`recall_at_k`, :func:`tune_search_params` — pick the
  smallest ``nprobe`` / ``efSearch`` reaching recall@10 >= 0.95 against exact search.
- :func:`prepare_corpus`, :func:`dedupe_captions`, :func:`encode_captions`.

Entry points: :func:`build_index` (encode + build), :func:`build_index_from_embeddings`
(array level) and :func:`rebuild_index` (new factory string, stored embeddings).

Automatic choice (``factory=None``), N vectors of dimension d, budget B bytes,
estimates include 10% overhead:

=====================  ==========================================  ==============================
factory                when                                        bytes per vector (estimate)
=====================  ==========================================  ==============================
``Flat``               N <= 100,000 and it fits                    4d
``HNSW32``             it fits                                     4d + 2·32·4 + 16 (graph)
``IVF{nlist},SQ8``     it fits                                     d + 8 (id) + centroids
``IVF{nlist},PQ{m}np`` largest m (d/m in 2, 4, 8, ...) that fits   m + 8 + centroids
=====================  ==========================================  ==============================

``nlist`` is the power of two nearest to 4·sqrt(N), capped so that every centroid
gets at least 39 training points (faiss' own minimum). IVF-SQ8 sits between HNSW
and PQ because it reaches recall@10 >= 0.95 at a quarter of HNSW's memory, which
IVF-PQ usually cannot. ``np`` skips polysemous training (only useful with
polysemous search, and by far the slowest part of PQ training). The choice, its
reason and the estimate go into the manifest.

A corpus too small for a requested IVF factory is an error (no silent change of
the user's factory string): ``IVF{nlist}`` needs at least 39·nlist vectors, a
product quantizer at least 2**nbits.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from rvqa.distributed import shard_bounds
from rvqa.retriever.index_format import (
    CAPTIONS_DIR,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    IndexFormatError,
    check_files,
    check_out_dir,
    make_manifest,
    read_captions,
    read_manifest,
    write_index_folder,
)

if TYPE_CHECKING:  # pragma: no cover
    from rvqa.retriever.index import CaptionEncoder

logger = logging.getLogger(__name__)

FLAT_MAX_VECTORS = 100_000
"""Automatic choice: exact search up to this many vectors."""
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
"""Default ``efConstruction`` of the HNSW graphs rvqa builds (faiss' own default is 40).
A better graph costs build time once and buys search speed at every query: at 1M
vectors (d=384, 2 cores) efConstruction 256 instead of 40 builds in ~5x the time
and needs efSearch 192 instead of 384 for recall@10 0.95, doubling batch-1 QPS
(benchmarks/README.md)."""
MEMORY_OVERHEAD = 1.1
MIN_POINTS_PER_CENTROID = 39
"""faiss' k-means warns below 39 training points per centroid; we refuse instead."""
MAX_TRAIN_POINTS = 100_000
"""Training sample cap (raised to 256·nlist for large nlist, faiss' own subsampling limit)."""
TARGET_RECALL = 0.95
TUNE_QUERIES = 200
# A held-out tail smaller than this gives no usable recall estimate (its standard
# error is too coarse): builds of fewer than 10x this many vectors tune on noise only.
MIN_HELD_OUT = 30
# Held-out vectors this close to a stored one (cosine) are duplicates of it: searched,
# they land on their twin's node, whose edges lead to the answer (like a stored query).
DUPLICATE_COSINE = 1 - 1e-4
ADD_CHUNK = 1 << 16

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


# --------------------------------------------------------------------------- sizes


def parse_memory(value: int | str) -> int:
    """Parse a memory budget: ``4GB`` (10**9), ``512MiB`` (2**20), ``1.5G``, or bytes.

    Raises:
        ValueError: Unparseable or not positive.
    """
    if isinstance(value, bool):
        raise TypeError(f"max_memory must be a size such as '4GB', got {value!r}")
    if isinstance(value, (int, np.integer)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"max_memory {value!r} is not a size; use e.g. '4GB', '512MB', '2GiB' or bytes"
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return n


def auto_nlist(n: int) -> int:
    """IVF list count: the power of two nearest 4·sqrt(n), with >= 39 points per list."""
    target = max(1.0, 4.0 * math.sqrt(n))
    nlist = 2 ** round(math.log2(target))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > n:
        nlist //= 2
    return nlist


@dataclass(frozen=True)
class AutoChoice:
    """The automatic factory choice, recorded in the manifest."""

    factory: str
    reason: str
    estimated_bytes: int
    max_memory_bytes: int


def estimate_bytes(factory_kind: str, n: int, d: int, nlist: int = 0, m: int = 0) -> int:
    """Estimated index size in bytes (with 10% overhead) for the automatic tiers."""
    per_vec = {
        "flat": 4 * d,
        "hnsw": 4 * d + 2 * HNSW_M * 4 + 16,
        "sq8": d + 8,
        "pq": m + 8,
    }[factory_kind]
    fixed = nlist * d * 4 + (256 * d * 4 if factory_kind == "pq" else 0)
    return int(MEMORY_OVERHEAD * (n * per_vec + fixed))


def choose_factory(n: int, d: int, max_memory: int | str = "4GB") -> AutoChoice:
    """Choose a faiss factory string for ``n`` vectors of dimension ``d`` within a budget.

    See the module docstring for the tiers and thresholds.

    Raises:
        ValueError: Not even the smallest IVF-PQ fits the budget.
    """
    budget = parse_memory(max_memory)
    gb = f"{budget / 1e9:.3g} GB"
    est = estimate_bytes("flat", n, d)
    if n <= FLAT_MAX_VECTORS and est <= budget:
        why = f"exact search: {n} vectors <= {FLAT_MAX_VECTORS} and ~{est / 1e6:.0f} MB fits {gb}"
        return AutoChoice("Flat", why, est, budget)
    est = estimate_bytes("hnsw", n, d)
    if est <= budget:
        why = f"HNSW{HNSW_M}: {n} vectors, ~{est / 1e6:.0f} MB (vectors + graph) fits {gb}"
        return AutoChoice(f"HNSW{HNSW_M}", why, est, budget)
    nlist = auto_nlist(n)
    est = estimate_bytes("sq8", n, d, nlist)
    if est <= budget:
        why = (
            f"IVF-SQ8: HNSW{HNSW_M} (~{estimate_bytes('hnsw', n, d) / 1e9:.2f} GB) exceeds {gb}; "
            f"8-bit scalar codes ~{est / 1e6:.0f} MB fit; nlist ~ 4*sqrt(N)"
        )
        return AutoChoice(f"IVF{nlist},SQ8", why, est, budget)
    for m in _pq_sizes(d):
        est = estimate_bytes("pq", n, d, nlist, m)
        if est <= budget:
            why = (
                f"IVF-PQ: 8-bit scalar codes (~{estimate_bytes('sq8', n, d, nlist) / 1e9:.2f} GB) "
                f"exceed {gb}; PQ{m} ({m} bytes/vector, ~{est / 1e6:.0f} MB) is the largest "
                "code that fits; nlist ~ 4*sqrt(N)"
            )
            return AutoChoice(f"IVF{nlist},PQ{m}np", why, est, budget)
    raise ValueError(
        f"no index of {n} vectors (dim {d}) fits max_memory={max_memory!r}: even the "
        f"smallest IVF-PQ needs ~{estimate_bytes('pq', n, d, nlist, 1) / 1e9:.2f} GB; "
        "raise max_memory or pass a factory string"
    )


def _pq_sizes(d: int) -> list[int]:
    """PQ sub-quantizer counts m dividing d, with d/m = 2, 4, 8, ... (largest first)."""
    return [d // s for s in (2, 4, 8, 16, 32, 64) if d % s == 0 and d // s >= 1] or [1]


# --------------------------------------------------------------------------- faiss


def make_index(
    factory: str, d: int, ef_construction: int | None = HNSW_EF_CONSTRUCTION
) -> faiss.Index:
    """``faiss.index_factory`` with inner product; a clear error for a bad string.

    ``ef_construction`` is set on every HNSW graph of the index (an HNSW index or an
    IVF's HNSW coarse quantizer); None keeps faiss' default (40).
    """
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(f"factory must be a faiss factory string like 'Flat', got {factory!r}")
    try:
        index = faiss.index_factory(d, factory.strip(), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(
            f"invalid faiss factory string {factory!r} for dim {d}: "
            f"{str(err).splitlines()[0][:300]}. Examples: 'Flat', 'HNSW32', "
            "'IVF1024,Flat', 'IVF4096,PQ32', 'OPQ16_64,IVF1024,PQ16'"
        ) from None
    if ef_construction is not None:
        for graph in _hnsw_graphs(index):
            graph.efConstruction = int(ef_construction)
    return index


def _check_ef_construction(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"ef_construction must be an integer ≥ 1, got {value!r}")
    return int(value)


def _hnsw_graphs(index: faiss.Index) -> list:
    """The HNSW graphs of an index: its own, or its IVF coarse quantizer's."""
    core = _core(index)
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


def _core(index: faiss.Index) -> faiss.Index:
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
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        need = MIN_POINTS_PER_CENTROID * ivf.nlist
        why = f"IVF{ivf.nlist} needs {MIN_POINTS_PER_CENTROID} training vectors per list"
    core = _core(index)
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
    if n < need:
        ivf = faiss.try_extract_index_ivf(index)
        hint = ""
        if ivf is not None:
            fit = 2 ** int(math.log2(max(1, n // MIN_POINTS_PER_CENTROID)))
            hint = f" (e.g. IVF{fit} instead of IVF{ivf.nlist})"
        raise ValueError(
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
    for s in tqdm(starts, desc="adding to index", unit="chunk", disable=not show_progress):
        index.add(np.ascontiguousarray(x[s : s + ADD_CHUNK], dtype=np.float32))


def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int, chunk: int = 1 << 16) -> tuple:
    """Brute-force inner-product top-k (numpy, chunked over ``xb``).

    Returns:
        ``(scores, rows)`` of shape (nq, min(k, len(xb))), best first.
    """
    k = min(k, len(xb))
    best_s = np.full((len(xq), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(xq), 0), dtype=np.int64)
    for s in range(0, len(xb), chunk):
        scores = xq @ np.asarray(xb[s : s + chunk], dtype=np.float32).T
        cand_s = np.concatenate([best_s, scores], axis=1)
        cand_i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(s, s + scores.shape[1]), scores.shape)], axis=1
        )
        top = np.argpartition(-cand_s, min(k, cand_s.shape[1]) - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, top, 1)
        best_i = np.take_along_axis(cand_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` present in the same row of ``found``."""
    return recall_bound(found, truth)[0]


def recall_bound(found: np.ndarray, truth: np.ndarray, z: float = 2.0) -> tuple[float, float]:
    """Mean recall over query rows and its lower confidence bound, mean − z·stderr
    (z = 2: one-sided ~97.7%), so a target is "reached" only when a fresh set of
    queries from the same distribution would very likely reach it too."""
    k = truth.shape[1]
    per_query = np.array(
        [len(set(f[f >= 0].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]
    )
    if len(per_query) == 0:
        return 1.0, 1.0
    mean = float(per_query.mean())
    se = float(per_query.std(ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
    return mean, mean - z * se


def search_param_name(index: faiss.Index) -> str | None:
    """The speed/recall knob of an index: ``nprobe`` (IVF), ``efSearch`` (HNSW) or None."""
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    if isinstance(_core(index), faiss.IndexHNSW):
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
            raise ValueError(f"search parameter {name} must be a positive integer, got {value!r}")
        try:
            ps.set_index_parameter(index, name, int(value))
        except RuntimeError:
            raise ValueError(
                f"index type {type(_core(index)).__name__} has no search parameter {name!r} "
                f"(it has: {search_param_name(index) or 'none'})"
            ) from None
        ivf = faiss.try_extract_index_ivf(index)
        if name == "nprobe" and ivf is not None:
            quantizer = faiss.downcast_index(ivf.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):  # must explore >= nprobe lists
                quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, 2 * int(value))


def proxy_queries(xb: np.ndarray, n: int, seed: int = 0, noise: float = 1.0) -> np.ndarray:
    """Tuning queries: stored vectors plus Gaussian noise of norm ``noise``, renormalised.

    Real queries are image embeddings, unavailable at build time, and lie farther
    from the corpus than its own vectors (which trivially find themselves). Corpus
    vectors moved by noise of norm 1 (cosine ~0.7 to their source) are a proxy whose
    recall tracked out-of-sample queries within ~0.01 on clustered test data, where
    noise 0.5 overestimated recall by up to 0.06. It is only a proxy: at 1M
    synthetic vectors (benchmarks/README.md) it underestimated recall on
    full-dimensional clusters and overestimated it (0.963 vs 0.909 at efSearch 16)
    on clusters lying near low-dimensional subspaces; prefer real queries.
    """
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(xb), size=min(n, len(xb)), replace=False)
    q = np.asarray(xb[np.sort(rows)], dtype=np.float32).copy()
    g = rng.standard_normal(q.shape).astype(np.float32)
    q += noise * g / np.linalg.norm(g, axis=1, keepdims=True)
    faiss.normalize_L2(q)
    return q


def _grid(lo: int, hi: int) -> list[int]:
    """Search-parameter grid from ``lo`` to ``hi`` in steps of x1.5 / x1.33 (1, 2, 3, 4,
    6, 8, 12, 16, 24, ...): a coarser x2 grid left up to 25% of the speed unused."""
    out, v = [], 1
    while v <= hi:
        for w in (v, v * 3 // 2):
            if lo <= w <= hi and w not in out:
                out.append(w)
        v *= 2
    return out


def tune_search_params(
    index: faiss.Index,
    xb: np.ndarray,
    k: int = 10,
    target: float = TARGET_RECALL,
    n_queries: int = TUNE_QUERIES,
    seed: int = 0,
    queries: np.ndarray | None = None,
    held_out: np.ndarray | None = None,
) -> tuple[dict[str, int], dict[str, Any] | None]:
    """Smallest ``nprobe`` / ``efSearch`` with recall@k >= ``target`` against exact search.

    "Reaching" the target means the recall's lower confidence bound (mean − 2
    standard errors over the tuning queries, :func:`recall_bound`) is >= ``target``:
    a point estimate just at the target would miss it on new queries about half the
    time (measured: 0.949 on held-out queries for 0.95 on the tuning set, 1M vectors).
    Walks a x1.5 grid up to the first value reaching the target, then bisects
    between it and the grid value below to within ~10%. Every measured point goes
    into the manifest record (``curve``: ``[value, recall, lower bound]``).

    Without ``queries``, the noise proxy (:func:`proxy_queries`) and, when given,
    ``held_out`` corpus vectors are measured and the worse of the two counts at every
    value (``proxies`` in the record: each one's recall and bound at the choice).
    Held-out vectors are what :func:`build_index_from_embeddings` passes: the corpus'
    last vectors, searched before they are added — new samples of the corpus'
    own distribution, which the noise proxy misjudges (it overestimated recall
    on real MiniLM captions and on manifold-like synthetic data: 0.975 where two
    held-out query sets got 0.947 / 0.940, HNSW32 efSearch 16, 200k vectors;
    benchmarks/README.md, "Tuning proxies"). A stored vector is no substitute: an
    HNSW node's own edges lead to its neighbours (0.989 there).

    Args:
        index: A trained, filled index holding the rows of ``xb``.
        xb: The indexed vectors (float32 or float16).
        k: Recall depth.
        target: Recall to reach; when no setting reaches it, the smallest setting within
            0.01 of the best recall is kept (warning logged).
        n_queries: Number of proxy queries (:func:`proxy_queries`).
        seed: Query sampling seed.
        queries: Representative queries, (m, d) L2-normalised (e.g. the retriever's
            embeddings of held-out images), used instead of the proxy queries: the
            proxy only approximates how far real queries lie from the corpus, and
            can err either way (:func:`proxy_queries`).
        held_out: (m, d) corpus vectors that are not (yet) in ``index``: a second
            proxy set, searched against ``xb`` (the vectors in the index). Rows that
            duplicate a stored vector (cosine >= ``DUPLICATE_COSINE``) are left out,
            and the set is skipped when fewer than ``MIN_HELD_OUT`` remain. Ignored
            when ``queries`` are given.

    Returns:
        ``(params, tuning)``: params for :func:`set_search_params` (empty for exact
        indices), and a record for the manifest (None for exact ``Flat``).
    """
    name = search_param_name(index)
    if name is None and isinstance(_core(index), faiss.IndexFlat):
        return {}, None
    # Query sets: (label, queries, exact top-k rows of xb).
    sets: list[tuple[str, np.ndarray, np.ndarray]] = []
    if queries is None:
        xq = proxy_queries(xb, n_queries, seed)
        sets.append(("noise", xq, exact_knn(xq, xb, k)[1]))
        proxy = "stored vectors + Gaussian noise of norm 1, renormalised"
        if held_out is not None and len(held_out):
            xh = check_tuning_queries(held_out, xb.shape[1], what="held-out vectors")
            top_scores, top_rows = exact_knn(xh, xb, k)
            fresh = top_scores[:, 0] < DUPLICATE_COSINE
            if fresh.sum() >= MIN_HELD_OUT:
                dupes = int(len(xh) - fresh.sum())
                sets.append(("held_out", xh[fresh], top_rows[fresh]))
                proxy = (
                    f"the worse of {len(xq)} {proxy} and the corpus' last {len(xh)} vectors, "
                    "searched before they were added"
                    + (f" ({dupes} duplicates of stored vectors left out)" if dupes else "")
                )
    else:
        xq = check_tuning_queries(queries, xb.shape[1])
        sets.append(("given", xq, exact_knn(xq, xb, k)[1]))
        proxy = "given queries"
    k_eff = sets[0][2].shape[1]
    if name is None:
        candidates: list[int] = [0]
    elif name == "nprobe":
        nlist = faiss.try_extract_index_ivf(index).nlist
        candidates = sorted({min(v, nlist) for v in _grid(1, 2 * nlist)})
    else:
        candidates = _grid(16, 1024)
    curve: list[tuple[int, float, float]] = []  # (value, recall, its lower bound)

    per_set: dict[int, dict[str, tuple[float, float]]] = {}

    def reaches(value: int) -> bool:
        if name is not None:
            set_search_params(index, {name: value})
        per_set[value] = {
            label: recall_bound(index.search(xq, k_eff)[1], truth) for label, xq, truth in sets
        }
        mean, lower = min(per_set[value].values(), key=lambda r: r[1])
        curve.append((value, mean, lower))
        return lower >= target

    for value in candidates:
        if reaches(value):
            break
    value, recall, lower = curve[-1]
    if lower >= target and len(curve) > 1:
        # Bisect between the last grid value that missed the target and the first
        # that reached it, to within ~10% (2-3 more searches): the grid's x1.5 steps
        # alone leave up to a third of the speed unused.
        lo = curve[-2][0]
        while value - lo > max(1, lo // 10):
            mid = (lo + value) // 2
            if reaches(mid):
                value, recall, lower = curve[-1]
            else:
                lo = mid
        if name is not None:
            set_search_params(index, {name: value})
    if lower < target:
        # Unreachable (e.g. PQ's quantisation error caps recall): take the smallest
        # setting within 0.01 of the best instead of the slowest one.
        best = max(r for _, r, _ in curve)
        value, recall, lower = next(c for c in sorted(curve) if c[1] >= best - 0.01)
        logger.warning(
            "recall@%d target %.2f is not reached with 2 standard errors to spare on %d "
            "queries (best recall %.3f, best bound %.3f); using %s",
            k,
            target,
            sum(len(q) for _, q, _ in sets),
            best,
            max(lb for _, _, lb in curve),
            f"{name}={value} (recall {recall:.3f})" if name else "its default search",
        )
        if name is not None:
            set_search_params(index, {name: value})
    params = {name: int(value)} if name is not None else {}
    tuning = {
        f"recall_at_{k}": round(recall, 4),
        "recall_lower_bound": round(lower, 4),
        "target": target,
        "queries": sum(len(q) for _, q, _ in sets),
        "query_proxy": proxy,
        "curve": [[int(v), round(r, 4), round(lb, 4)] for v, r, lb in sorted(curve)]
        if name
        else [],
    }
    if len(sets) > 1:  # each set's (recall, lower bound) at the chosen value
        tuning["proxies"] = {
            label: [round(r, 4), round(lb, 4)] for label, (r, lb) in per_set[value].items()
        }
    return params, tuning


def check_tuning_queries(queries: Any, d: int, what: str = "tuning queries") -> np.ndarray:
    """Validate tuning queries: a non-empty (m, d) float array of finite, non-zero rows;
    returned as L2-normalised float32. ``what`` names them in error messages."""
    if not isinstance(queries, np.ndarray) or queries.dtype.kind != "f":
        raise TypeError(
            f"{what} must be a float numpy array of shape (m, d), got "
            + (
                f"dtype {queries.dtype}"
                if isinstance(queries, np.ndarray)
                else type(queries).__name__
            )
        )
    if queries.ndim != 2 or queries.shape[1] != d or len(queries) == 0:
        raise ValueError(f"{what} must have shape (m >= 1, {d}), got {queries.shape}")
    q = np.array(queries, dtype=np.float32)
    norms = np.linalg.norm(q, axis=1)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError(f"{what} contain a zero, NaN or infinite row")
    return q / norms[:, None]


# --------------------------------------------------------------------------- corpus


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
        raise ValueError("the caption corpus is empty: nothing to index")
    if not isinstance(items[0], str) and hasattr(items[0], "caption"):
        if ids is not None:
            raise ValueError("ids given twice: the caption objects carry .caption_id already")
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
            raise ValueError(f"caption {i} is empty (or whitespace only)")
        texts.append(s)
    ids = list(range(len(texts))) if ids is None else normalise_ids(ids, len(texts))
    return texts, ids


def normalise_ids(ids: Sequence[Any], n: int) -> list:
    """Check ids: length ``n``, all ints or all strings, unique; numpy ints become ints."""
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} captions; they must match one to one")
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
        raise ValueError(f"caption ids must be unique; {dup!r} occurs more than once")
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


def check_embeddings(x: Any, n: int | None = None, d: int | None = None) -> np.ndarray:
    """Validate an (n, d) float embedding matrix; returns it as float32.

    Raises:
        TypeError: Not a float array.
        ValueError: Wrong shape, NaN/inf, or rows not L2-normalised (tolerance 1e-2).
    """
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"embeddings must be a float array, got dtype {x.dtype}")
    if x.ndim != 2 or (n is not None and x.shape[0] != n) or (d is not None and x.shape[1] != d):
        want = f"({n if n is not None else 'n'}, {d if d is not None else 'd'})"
        raise ValueError(f"embeddings must have shape {want}, got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    norms = np.linalg.norm(x, axis=1)
    if len(x) and np.abs(norms - 1).max() > 1e-2:
        raise ValueError(
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
) -> np.ndarray | None:
    """Encode captions, sharded over processes when an ``Accelerator`` has several.

    With ``accelerator.num_processes > 1`` each process encodes a contiguous
    shard and writes it as ``shard-RANK.npy`` into a folder shared by all
    processes (created by the main process under ``scratch_dir`` and broadcast);
    the main process concatenates them in rank order, which gives exactly the
    rows of a one-process run.

    Returns:
        (N, d) float32 on the main process; None on the other processes.
    """
    if accelerator is None or accelerator.num_processes <= 1:
        x = encoder.embed_texts(texts, batch_size=batch_size, show_progress=show_progress)
        return check_embeddings(x, len(texts), encoder.embed_dim)
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
        if hi > lo:
            x = encoder.embed_texts(
                texts[lo:hi], batch_size=batch_size, show_progress=show_progress and main
            )
            x = check_embeddings(x, hi - lo, d)
        else:
            x = np.zeros((0, d), dtype=np.float32)
        np.save(shards / f"shard-{rank:05d}.npy", x, allow_pickle=False)
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
        return np.concatenate(parts, axis=0)
    finally:
        if main:
            shutil.rmtree(shards, ignore_errors=True)


# --------------------------------------------------------------------------- builds


def build_index_from_embeddings(
    embeddings: np.ndarray,
    captions: Sequence[str],
    ids: Sequence[Any] | None,
    out_dir: str | os.PathLike,
    fingerprint: str,
    *,
    factory: str | None = None,
    max_memory: int | str = "4GB",
    dedupe: bool = False,
    store_embeddings: bool = True,
    embeddings_dtype: str = "float16",
    caption_source: str = "",
    overwrite: bool = False,
    normalize: bool = False,
    dedupe_info: dict | None = None,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    tuning_queries: np.ndarray | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    """Build a knowledge index folder from precomputed caption embeddings.

    Args:
        embeddings: (N, d) float L2-normalised caption embeddings, row i = caption i.
        captions: N caption strings.
        ids: N ids (ints or strings) or None for 0..N-1.
        out_dir: The index folder to write (atomically).
        fingerprint: The retriever's fingerprint (checked when the index is loaded).
        factory: A faiss factory string, or None to choose from N, d and ``max_memory``.
        max_memory: Budget for the automatic choice ("4GB", "512MiB", bytes).
        dedupe: Drop exact duplicate captions (after strip), keeping the first.
        store_embeddings: Also store the raw embeddings (for :func:`rebuild_index`).
        embeddings_dtype: "float16" (half the disk) or "float32" (bit-exact rebuilds).
        caption_source: Free text recorded in the manifest (e.g. "coco:captions_train2017.json").
        overwrite: Replace an existing index folder.
        normalize: L2-normalise the rows first instead of requiring normalised input.
        dedupe_info: Dedupe record of an earlier stage (build_index), kept in the manifest.
        ef_construction: ``efConstruction`` of HNSW graphs (ignored by other indices).
        tuning_queries: (m, d) representative queries (e.g. image embeddings of
            held-out images) to tune ``efSearch``/``nprobe`` on, instead of proxy
            queries made from the corpus (noisy stored vectors, and the last
            min(200, N/10) vectors when that is >= ``MIN_HELD_OUT``, left out of
            training when the rest suffices and added after tuning — representative
            only when the corpus is not sorted by source or topic;
            :func:`tune_search_params`).
        seed: Seed of the training sample and of the tuning queries.
        show_progress: tqdm progress bars.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: Bad embeddings/captions/ids, bad factory, corpus too small for it.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    if embeddings_dtype not in ("float16", "float32"):
        raise ValueError(
            f"embeddings_dtype must be 'float16' or 'float32', got {embeddings_dtype!r}"
        )
    texts, ids = prepare_corpus(captions, ids)
    x = np.asarray(embeddings)
    if x.dtype.kind == "f" and normalize:
        x = np.array(x, dtype=np.float32)
        faiss.normalize_L2(x)
    x = check_embeddings(x, len(texts))
    n, d = x.shape
    if tuning_queries is not None:
        tuning_queries = check_tuning_queries(tuning_queries, d)
    if dedupe:
        texts, ids, keep = dedupe_captions(texts, ids)
        if len(keep) < n:
            logger.info("dedupe: removed %d duplicate captions of %d", n - len(keep), n)
            x = x[keep]
        dedupe_info = {"enabled": True, "input_count": n, "removed": n - len(keep)}
    elif dedupe_info is None:
        dedupe_info = {"enabled": False, "input_count": n, "removed": 0}
    n = len(texts)

    auto = None
    if factory is None:
        choice = choose_factory(n, d, max_memory)
        factory, auto = choice.factory, asdict(choice)
        logger.info("automatic index choice: %s (%s)", factory, choice.reason)
    ef_construction = _check_ef_construction(ef_construction)
    index = make_index(factory, d, ef_construction=ef_construction)
    # Without given queries, the last few vectors are added only after tuning: they
    # are searched as new samples of the corpus (see tune_search_params), so they stay
    # out of the training sample too when the rest suffices.
    tunable = search_param_name(index) is not None
    m = min(TUNE_QUERIES, n // 10) if tuning_queries is None and tunable else 0
    m = m if m >= MIN_HELD_OUT else 0
    enough = n - m >= min_training_size(index)[0]
    train_index(index, x[: n - m] if enough else x, seed=seed)
    add_vectors(index, x[: n - m], show_progress=show_progress)
    params, tuning = tune_search_params(
        index, x[: n - m], seed=seed, queries=tuning_queries, held_out=x[n - m :] if m else None
    )
    if m:
        add_vectors(index, x[n - m :])
    if params:
        set_search_params(index, params)
        logger.info("search params %s: %s", params, tuning)
    manifest = make_manifest(
        fingerprint=fingerprint,
        embed_dim=d,
        factory=factory,
        count=n,
        auto_choice=auto,
        caption_source=caption_source,
        search_params=params,
        search_tuning=tuning,
        build_params=build_params(index),
        dedupe=dedupe_info,
        id_type="str" if isinstance(ids[0], str) else "int",
        embeddings_dtype=embeddings_dtype if store_embeddings else None,
    )
    return write_index_folder(
        out_dir, index, texts, ids, manifest, x if store_embeddings else None, overwrite
    )


def build_index(
    encoder: CaptionEncoder,
    captions: Any,
    out_dir: str | os.PathLike,
    *,
    ids: Sequence[Any] | None = None,
    factory: str | None = None,
    max_memory: int | str = "4GB",
    dedupe: bool = True,
    batch_size: int = 256,
    store_embeddings: bool = True,
    embeddings_dtype: str = "float16",
    caption_source: str = "",
    overwrite: bool = False,
    accelerator: Any = None,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    tuning_queries: np.ndarray | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    """Encode a caption corpus with the retriever's text tower and build an index folder.

    Args:
        encoder: The retriever (:class:`~rvqa.retriever.index.CaptionEncoder`).
        captions: A list of strings, or objects with ``.caption`` and ``.caption_id``.
        out_dir: The index folder, e.g. ``indices/coco-captions``.
        ids: Caption ids for a list of strings (default 0..N-1, positions in ``captions``).
        factory: faiss factory string; None = automatic (see module docstring).
        max_memory: Budget of the automatic choice.
        dedupe: Drop exact duplicate captions (after strip) before encoding, keeping the
            first id; the count removed is logged and recorded.
        batch_size: Encoding batch size.
        store_embeddings: Store raw embeddings for :func:`rebuild_index`.
        embeddings_dtype: "float16" or "float32".
        caption_source: Recorded in the manifest.
        overwrite: Replace an existing index folder (else FileExistsError).
        accelerator: An ``accelerate.Accelerator``; with several processes each encodes a
            contiguous shard, only the main process writes, the others wait.
        ef_construction: ``efConstruction`` of HNSW graphs.
        tuning_queries: Representative queries to tune search parameters on
            (:func:`build_index_from_embeddings`).
        seed: Training sample / tuning seed.
        show_progress: tqdm progress bars (main process only).

    Returns:
        ``out_dir`` as a Path (on every process).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)  # every process: fail before hours of encoding
    _check_ef_construction(ef_construction)
    if tuning_queries is not None:
        check_tuning_queries(tuning_queries, encoder.embed_dim)
    texts, ids = prepare_corpus(captions, ids)
    n_in = len(texts)
    if dedupe:
        texts, ids, _ = dedupe_captions(texts, ids)
        if len(texts) < n_in:
            logger.info("dedupe: removed %d duplicate captions of %d", n_in - len(texts), n_in)
    dedupe_info = {"enabled": bool(dedupe), "input_count": n_in, "removed": n_in - len(texts)}
    main = accelerator is None or accelerator.is_main_process
    if main:
        logger.info("encoding %d captions", len(texts))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    x = encode_captions(
        encoder,
        texts,
        batch_size=batch_size,
        accelerator=accelerator,
        scratch_dir=out_dir.parent,
        show_progress=show_progress,
    )
    if main:
        build_index_from_embeddings(
            x,
            texts,
            ids,
            out_dir,
            encoder.fingerprint(),
            factory=factory,
            max_memory=max_memory,
            store_embeddings=store_embeddings,
            embeddings_dtype=embeddings_dtype,
            caption_source=caption_source,
            overwrite=overwrite,
            dedupe_info=dedupe_info,
            ef_construction=ef_construction,
            tuning_queries=tuning_queries,
            seed=seed,
            show_progress=show_progress,
        )
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    return out_dir


def load_stored_embeddings(folder: Path, manifest: dict) -> np.ndarray:
    """The stored raw embeddings of an index folder, memory-mapped (read-only)."""
    if not manifest.get("embeddings"):
        raise ValueError(
            f"{folder} has no stored embeddings (built with store_embeddings=False); "
            "re-encode the captions with build_index instead"
        )
    x = np.load(folder / EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False)
    if x.shape != (manifest["count"], manifest["embed_dim"]):
        raise IndexFormatError(
            f"{folder / EMBEDDINGS_FILE} has shape {x.shape}, manifest says "
            f"({manifest['count']}, {manifest['embed_dim']})"
        )
    return x


def rebuild_index(
    from_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    factory: str | None = None,
    *,
    max_memory: int | str = "4GB",
    store_embeddings: bool = True,
    embeddings_dtype: str | None = None,
    overwrite: bool = False,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    tuning_queries: np.ndarray | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    """Build a new index folder from another one's stored embeddings (no re-encoding).

    Captions, ids, fingerprint, caption source and dedupe record are copied. float16
    embeddings are re-normalised after the cast; store float32 for bit-identical
    rebuilds. ``out_dir`` may equal ``from_dir`` (with ``overwrite=True``).

    Args:
        from_dir: An index folder built with ``store_embeddings=True``.
        out_dir: The new folder.
        factory: New faiss factory string (None = automatic).
        max_memory: Budget of the automatic choice.
        store_embeddings: Keep the embeddings in the new folder too.
        embeddings_dtype: Their dtype (None = as stored).
        overwrite: Replace an existing ``out_dir``.
        ef_construction: ``efConstruction`` of HNSW graphs.
        tuning_queries: Representative queries to tune search parameters on.
        seed: Training sample / tuning seed.
        show_progress: Progress bars.
    """
    from_dir = Path(from_dir)
    manifest = read_manifest(from_dir)
    check_files(from_dir, manifest["files"])
    stored = load_stored_embeddings(from_dir, manifest)
    x = np.array(stored, dtype=np.float32)
    if stored.dtype != np.float32:
        faiss.normalize_L2(x)
    ds = read_captions(from_dir / CAPTIONS_DIR)
    captions = ds.data.column("caption").to_pylist()
    ids = ds.data.column("id").to_pylist()
    del stored
    return build_index_from_embeddings(
        x,
        captions,
        ids,
        out_dir,
        manifest["retriever_fingerprint"],
        factory=factory,
        max_memory=max_memory,
        store_embeddings=store_embeddings,
        embeddings_dtype=embeddings_dtype or manifest["embeddings"]["dtype"],
        caption_source=manifest.get("caption_source", ""),
        overwrite=overwrite,
        dedupe_info=manifest.get("dedupe"),
        ef_construction=ef_construction,
        tuning_queries=tuning_queries,
        seed=seed,
        show_progress=show_progress,
    )


__all__ = [
    "FLAT_MAX_VECTORS",
    "AutoChoice",
    "INDEX_FILE",
    "add_vectors",
    "auto_nlist",
    "build_index",
    "build_index_from_embeddings",
    "check_embeddings",
    "choose_factory",
    "dedupe_captions",
    "encode_captions",
    "estimate_bytes",
    "exact_knn",
    "make_index",
    "min_training_size",
    "parse_memory",
    "prepare_corpus",
    "rebuild_index",
    "recall_at_k",
    "recall_bound",
    "search_param_name",
    "set_search_params",
    "shard_bounds",
    "train_index",
    "tune_search_params",
]
