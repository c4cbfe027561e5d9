"""Automatic faiss factory choice from corpus size, dimension and a memory budget.

Pure arithmetic (no faiss): N vectors of dimension d, budget B bytes, estimates
include 10% overhead:

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
IVF-PQ usually cannot. For an index that will be searched on GPUs
(``for_gpu``, set from ``index.use_gpu``) the HNSW tier is skipped: faiss has no
GPU HNSW, so such an index would stay on CPU; IVF-SQ8 / IVF-PQ and Flat move to
GPUs. ``np`` skips polysemous training (only useful with
polysemous search, and by far the slowest part of PQ training). The choice, its
reason and the estimate go into the manifest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from rvqa.errors import UsageError

__all__ = [
    "FLAT_MAX_VECTORS",
    "HNSW_M",
    "MIN_POINTS_PER_CENTROID",
    "AutoChoice",
    "auto_nlist",
    "choose_binary_factory",
    "choose_factory",
    "estimate_bytes",
    "parse_memory",
]

FLAT_MAX_VECTORS = 100_000
"""Automatic choice: exact search up to this many vectors."""
HNSW_M = 32
MEMORY_OVERHEAD = 1.1
MIN_POINTS_PER_CENTROID = 39
"""faiss' k-means warns below 39 training points per centroid; we refuse instead."""

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
            raise UsageError(
                f"max_memory {value!r} is not a size; use e.g. '4GB', '512MB', '2GiB' or bytes"
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise UsageError(f"max_memory must be positive, got {value!r}")
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


def choose_factory(
    n: int, d: int, max_memory: int | str = "4GB", *, for_gpu: bool = False
) -> AutoChoice:
    """Choose a faiss factory string for ``n`` vectors of dimension ``d`` within a budget.

    See the module docstring for the tiers and thresholds; ``for_gpu`` skips HNSW
    (faiss cannot search it on a GPU).

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
    if est <= budget and not for_gpu:
        why = f"HNSW{HNSW_M}: {n} vectors, ~{est / 1e6:.0f} MB (vectors + graph) fits {gb}"
        return AutoChoice(f"HNSW{HNSW_M}", why, est, budget)
    nlist = auto_nlist(n)
    est = estimate_bytes("sq8", n, d, nlist)
    if est <= budget:
        hnsw = (
            f"HNSW{HNSW_M} has no faiss GPU version (index.use_gpu)"
            if for_gpu
            else f"HNSW{HNSW_M} (~{estimate_bytes('hnsw', n, d) / 1e9:.2f} GB) exceeds {gb}"
        )
        why = f"IVF-SQ8: {hnsw}; 8-bit scalar codes ~{est / 1e6:.0f} MB fit; nlist ~ 4*sqrt(N)"
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
    raise UsageError(
        f"no index of {n} vectors (dim {d}) fits max_memory={max_memory!r}: even the "
        f"smallest IVF-PQ needs ~{estimate_bytes('pq', n, d, nlist, 1) / 1e9:.2f} GB; "
        "raise max_memory or pass a factory string"
    )


def _pq_sizes(d: int) -> list[int]:
    """PQ sub-quantizer counts m dividing d, with d/m = 2, 4, 8, ... (largest first)."""
    return [d // s for s in (2, 4, 8, 16, 32, 64) if d % s == 0 and d // s >= 1] or [1]


BINARY_FLAT_MAX_CODES = 2_000_000
"""Automatic choice for binary codes: exhaustive Hamming search up to this many codes
(a popcount scan of 8-byte codes; 2M × 64 bits is 16 MB)."""


def choose_binary_factory(n: int, bits: int, max_memory: int | str = "4GB") -> AutoChoice:
    """A faiss binary factory for ``n`` codes of ``bits`` bits: ``BFlat`` (exhaustive) up
    to :data:`BINARY_FLAT_MAX_CODES`, else ``BHNSW32`` where its graph fits, else
    ``BIVF{nlist}``.

    Raises:
        ValueError: Not even the codes fit the budget.
    """
    budget = parse_memory(max_memory)
    gb = f"{budget / 1e9:.3g} GB"
    code = bits // 8
    flat = int(MEMORY_OVERHEAD * n * code)
    if n <= BINARY_FLAT_MAX_CODES and flat <= budget:
        why = (
            f"exhaustive Hamming search: {n} codes <= {BINARY_FLAT_MAX_CODES}, ~{flat / 1e6:.0f} MB"
        )
        return AutoChoice("BFlat", why, flat, budget)
    hnsw = int(MEMORY_OVERHEAD * n * (code + 2 * HNSW_M * 4 + 16))
    if hnsw <= budget:
        why = f"BHNSW{HNSW_M}: {n} codes, ~{hnsw / 1e6:.0f} MB (codes + graph) fits {gb}"
        return AutoChoice(f"BHNSW{HNSW_M}", why, hnsw, budget)
    nlist = auto_nlist(n)
    ivf = int(MEMORY_OVERHEAD * (n * (code + 8) + nlist * code))
    if ivf <= budget:
        why = f"BIVF{nlist}: the HNSW graph (~{hnsw / 1e9:.2f} GB) exceeds {gb}"
        return AutoChoice(f"BIVF{nlist}", why, ivf, budget)
    raise UsageError(
        f"{n} codes of {bits} bits need ~{ivf / 1e9:.2f} GB even in BIVF{nlist}; "
        f"the memory budget is {gb}"
    )
