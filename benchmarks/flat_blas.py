"""Exact (Flat) faiss search of a batch of queries: one database scan per query or a
matrix multiply (BLAS), side by side, on this machine.

faiss chooses by ``distance_compute_blas_threshold``: BLAS when ``nq·d`` reaches it.
Its default (128,000: fewer than 500 queries at d = 256 are scanned one by one) was
measured on a large server; rvqa sets ``FLAT_BLAS_THRESHOLD`` (2,048) from this
script's table on 2 cores. Run it to see which side of the crossover a machine is on
(``RVQA_FAISS_BLAS_THRESHOLD`` sets another value for rvqa).

    python benchmarks/flat_blas.py                     # d 128/256/512, N 10k/100k
    python benchmarks/flat_blas.py --dims 256 --sizes 100000 300000
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np


def timed(fn, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    saved = faiss.cvar.distance_compute_blas_threshold
    rng = np.random.default_rng(0)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; ms per search")
    print("| d | N | path | " + " | ".join(f"nq {q}" for q in args.queries) + " |")
    print("| ---: | ---: | --- | " + " | ".join("---:" for _ in args.queries) + " |")
    try:
        for d in args.dims:
            for n in args.sizes:
                x = rng.standard_normal((n, d), dtype=np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                index = faiss.IndexFlatIP(d)
                index.add(x)
                xq = rng.standard_normal((max(args.queries), d), dtype=np.float32)
                rows = {}
                for path, threshold in (("per-query scan", 2**31 - 1), ("BLAS", 0)):
                    faiss.cvar.distance_compute_blas_threshold = threshold
                    rows[path] = [
                        timed(lambda q=q, ix=index, x=xq: ix.search(x[:q], args.k), args.repeats)
                        for q in args.queries
                    ]
                for path, values in rows.items():
                    cells = []
                    for i, v in enumerate(values):
                        other = rows["BLAS" if path != "BLAS" else "per-query scan"][i]
                        cells.append(f"**{v:.2f}**" if v <= other else f"{v:.2f}")
                    print(f"| {d} | {n:,} | {path} | " + " | ".join(cells) + " |")
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


if __name__ == "__main__":
    main()
