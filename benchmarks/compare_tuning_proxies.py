"""How well do build-time proxy queries predict the recall of real held-out queries?

``tune_search_params`` picks ``efSearch`` on proxy queries when the user gives no
representative queries. This script builds one HNSW32 graph (efConstruction 200,
as rvqa does) on a data set, without its last 200 vectors, and prints recall@10 by
efSearch for:

- ``held-out A`` / ``held-out B``: two sets of 300 queries from the data's own
  query distribution (never in the index) — the truth the proxies should predict;
- ``noise 1.0`` / ``noise 1.2``: stored vectors + Gaussian noise of that norm
  (:func:`rvqa.retriever.index.proxy_queries`; rvqa uses 1.0);
- ``corpus tail``: the 200 vectors left out of the graph (what a build without
  tuning queries measures, next to noise 1.0);
- ``stored (LOO)``: 300 stored vectors, their own row left out of both results.

Usage::

    python benchmarks/compare_tuning_proxies.py --n 200000 --noise 1.7 --local-dim 16
    python benchmarks/compare_tuning_proxies.py --n 200000 --noise 1.45 --local-dim 0
    python benchmarks/compare_tuning_proxies.py --real --n 50000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_index as bi  # noqa: E402

EFS = [8, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192]
TAIL = 200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--noise", type=float, default=1.7)
    ap.add_argument("--local-dim", type=int, default=16)
    ap.add_argument("--iso", type=float, default=0.3)
    ap.add_argument("--real", action="store_true", help="MiniLM caption embeddings instead")
    ap.add_argument("--work", default=str(HERE / "_work" / "index"))
    args = ap.parse_args()

    from rvqa.retriever.index import (
        exact_knn,
        knn_recall,
        make_index,
        proxy_queries,
        set_search_params,
    )

    if args.real:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        xb, xt, _ = bi.real_embeddings(args.n, 1000, work)
    else:
        xb, _, xt = bi.synthetic_embeddings(
            args.n,
            1000,
            384,
            0,
            noise=args.noise,
            n_tune=1000,
            local_dim=args.local_dim,
            iso=args.iso,
        )
    held = {"held-out A": xt[:300], "held-out B": xt[300:600]}
    head, tail = xb[:-TAIL], xb[-TAIL:]
    t = time.perf_counter()
    index = make_index("HNSW32", xb.shape[1], ef_construction=200)
    index.add(head)
    bi.log(f"HNSW32 on {len(head):,} vectors built in {time.perf_counter() - t:.0f} s")
    rng = np.random.default_rng(5)
    own = np.sort(rng.choice(len(head), 300, replace=False))
    sets = {
        **held,
        "noise 1.0": proxy_queries(head, 300, 0),
        "noise 1.2": proxy_queries(head, 300, 0, noise=1.2),
        "corpus tail": tail,
        "stored (LOO)": head[own],
    }
    truth = {}
    for name, q in sets.items():
        k = 11 if name == "stored (LOO)" else 10
        rows = exact_knn(q, head, k)[1]
        truth[name] = drop_own(rows, own) if name == "stored (LOO)" else rows
    print("| query set | " + " | ".join(f"ef {e}" for e in EFS) + " |")
    print("| --- | " + " | ".join("---:" for _ in EFS) + " |")
    for name, q in sets.items():
        out = []
        for e in EFS:
            set_search_params(index, {"efSearch": e})
            if name == "stored (LOO)":
                found = drop_own(index.search(q, 11)[1], own)
            else:
                found = index.search(q, 10)[1]
            out.append(knn_recall(found, truth[name]))
        print(f"| {name} | " + " | ".join(f"{r:.3f}" for r in out) + " |", flush=True)


def drop_own(rows: np.ndarray, own: np.ndarray) -> np.ndarray:
    """(n, k+1) results without each query's own row (or the last entry) → (n, k)."""
    drop = rows == own[:, None]
    drop[~drop.any(axis=1), -1] = True
    drop &= np.cumsum(drop, axis=1) == 1
    return rows[~drop].reshape(len(rows), rows.shape[1] - 1)


if __name__ == "__main__":
    main()
