"""Search-parameter tuning: the smallest ``nprobe`` / ``efSearch`` reaching a kNN recall target.

The ANN recall here (:func:`knn_recall`, :func:`knn_recall_bound`) measures how
many of a query's exact nearest *stored vectors* (:func:`exact_knn`, numpy brute
force) an approximate index finds. It is not the cross-modal retrieval recall@K
of a retriever (:func:`rvqa.metrics.recall_at_k`), which counts the queries
whose *matching item* ranks in the top K.
"""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np

from rvqa.retriever.index.faiss_ops import core_index, search_param_name, set_search_params

__all__ = [
    "TARGET_RECALL",
    "TUNE_QUERIES",
    "check_tuning_queries",
    "exact_knn",
    "knn_recall",
    "knn_recall_bound",
    "proxy_queries",
    "tune_search_params",
]

logger = logging.getLogger(__name__)

TARGET_RECALL = 0.95
TUNE_QUERIES = 200
# A held-out tail smaller than this gives no usable recall estimate (its standard
# error is too coarse): builds of fewer than 10x this many vectors tune on noise only.
MIN_HELD_OUT = 30
# Held-out vectors this close to a stored one (cosine) are duplicates of it: searched,
# they land on their twin's node, whose edges lead to the answer (like a stored query).
DUPLICATE_COSINE = 1 - 1e-4


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


def knn_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """ANN recall: mean fraction of each row of ``truth`` present in the same row of ``found``.

    Args:
        found: (nq, k') rows returned by an approximate search (-1 = no hit), or one
            list of row ids per query.
        truth: (nq, k) exact nearest rows (:func:`exact_knn`).
    """
    return knn_recall_bound(found, truth)[0]


def knn_recall_bound(found: np.ndarray, truth: np.ndarray, z: float = 2.0) -> tuple[float, float]:
    """:func:`knn_recall` and its lower confidence bound, mean − z·stderr over query rows.

    z = 2 (one-sided ~97.7%): a target is "reached" only when a fresh set of
    queries from the same distribution would very likely reach it too.
    """
    k = truth.shape[1]
    per_query = []
    for f, t in zip(found, truth):
        f = np.asarray(f)  # a row of an (nq, k') array or a list of row ids
        per_query.append(len(set(f[f >= 0].tolist()) & set(t.tolist())) / k)
    per_query = np.array(per_query)
    if len(per_query) == 0:
        return 1.0, 1.0
    mean = float(per_query.mean())
    se = float(per_query.std(ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
    return mean, mean - z * se


def proxy_queries(xb: np.ndarray, n: int, seed: int = 0, noise: float = 1.0) -> np.ndarray:
    """Tuning queries: stored vectors plus Gaussian noise of norm ``noise``, renormalised.

    Real queries are image embeddings, unavailable at build time, and lie farther
    from the corpus than its own vectors (which trivially find themselves). Corpus
    vectors moved by noise of norm 1 (cosine ~0.7 to their source) stand in for
    them. It is only a proxy, wrong in either direction depending on the data's
    intrinsic dimension (measured: benchmarks/README.md, "Tuning proxies");
    prefer real queries.
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
    standard errors over the tuning queries, :func:`knn_recall_bound`) is >= ``target``:
    a point estimate just at the target would miss it on new queries about half the
    time. Walks a x1.5 grid up to the first value reaching the target, then bisects
    between it and the grid value below to within ~10%. Every measured point goes
    into the manifest record (``curve``: ``[value, recall, lower bound]``).

    Without ``queries``, the noise proxy (:func:`proxy_queries`) and, when given,
    ``held_out`` corpus vectors are measured and the worse of the two counts at every
    value (``proxies`` in the record: each one's recall and bound at the choice).
    Held-out vectors are what :func:`~rvqa.retriever.index.build.build_index_from_embeddings`
    passes: the corpus' last vectors, searched before they are added — new samples of
    the corpus' own distribution, which the noise proxy misjudges where the data has a
    low intrinsic dimension. A stored vector is no substitute: an HNSW node's own
    edges lead to its neighbours. (The measurements behind these rules:
    benchmarks/README.md, "Tuning proxies" and "Figures behind the index code's
    defaults".)

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
    if name is None and isinstance(core_index(index), faiss.IndexFlat):
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
            label: knn_recall_bound(index.search(xq, k_eff)[1], truth) for label, xq, truth in sets
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
