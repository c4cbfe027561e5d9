"""How hard is the synthetic index benchmark set, next to real caption embeddings?

Compares, at the same N and query count, real all-MiniLM-L6-v2 caption embeddings
(``bench_index.real_embeddings``: template captions, held-out captions as queries)
with ``bench_index.synthetic_embeddings`` at several settings, on measures that
decide how hard approximate search is:

- ``ivf8``: recall@10 of ``IVF{nlist},Flat`` at nprobe 8 (coarse structure: how
  well k-means cells hold a query's neighbours);
- ``hnsw@ef``: recall@10 of HNSW32 (efConstruction 200) at efSearch 16/32/64/128
  (local structure: how easily a graph walk reaches them);
- ``LID``: local intrinsic dimensionality of the queries (Levina–Bickel maximum
  likelihood estimate from the distances to their 10 nearest database vectors;
  the harder-to-index high-dimensional noise shows up here);
- ``PCA90``: principal components holding 90 % of the database variance;
- ``cos1`` / ``cos10``: mean cosine of a query to its 1st / 10th neighbour.

Usage::

    python benchmarks/calibrate_synthetic.py [--n 50000] [--grid "1.6:0.5,1.7:0.5:16:0.3,..."]

``--grid`` lists ``noise:spectrum[:local_dim[:iso]]`` settings (within-cluster
noise, spectrum decay exponent, dimension of each cluster's own subspace and the
isotropic share of the noise; ``bench_index.py --noise/--spectrum/--local-dim/--iso``). Results go to
``benchmarks/_work/calibration.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_index import real_embeddings, synthetic_embeddings  # noqa: E402

from rvqa.retriever.index import exact_knn, knn_recall  # noqa: E402

EFS = (16, 32, 64, 128)
K = 10


def stats(xb: np.ndarray, xq: np.ndarray, nlist: int) -> dict:
    """The difficulty measures of the module docstring for one (database, queries) pair."""
    t0 = time.perf_counter()
    d = xb.shape[1]
    truth = exact_knn(xq, xb, K)[1]
    cos = np.einsum("qd,qkd->qk", xq, xb[truth])  # (nq, K), best first
    dist = np.sqrt(np.maximum(2.0 - 2.0 * cos, 1e-12))
    lid = -1.0 / np.mean(np.log(dist[:, :-1] / dist[:, -1:]), axis=1)
    sample = xb[np.random.default_rng(0).choice(len(xb), min(len(xb), 20000), replace=False)]
    var = np.linalg.svd(sample - sample.mean(0), compute_uv=False) ** 2
    pca90 = int(np.searchsorted(np.cumsum(var) / var.sum(), 0.9) + 1)

    ivf = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(xb)
    ivf.add(xb)
    ivf.nprobe = 8
    out = {"ivf8": knn_recall(ivf.search(xq, K)[1], truth)}
    hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 200
    hnsw.add(xb)
    for ef in EFS:
        hnsw.hnsw.efSearch = ef
        out[f"hnsw@{ef}"] = knn_recall(hnsw.search(xq, K)[1], truth)
    out.update(
        lid=float(np.median(lid)),
        pca90=pca90,
        cos1=float(cos[:, 0].mean()),
        cos10=float(cos[:, -1].mean()),
        seconds=time.perf_counter() - t0,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument(
        "--grid",
        default="1.6:0.5,1.45:0.5,1.7:0.5:16:0.3",  # the sets in benchmarks/README.md
        help="noise:spectrum[:local_dim[:iso]] settings, comma-separated",
    )
    ap.add_argument("--work", default=str(HERE / "_work" / "index"))
    ap.add_argument("--out", default=str(HERE / "_work" / "calibration.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    xb, xq, _ = real_embeddings(args.n, args.queries, work)
    rows["real MiniLM captions"] = stats(xb, xq, args.nlist)
    print("real", rows["real MiniLM captions"], flush=True)
    for item in args.grid.split(","):
        noise, spectrum, local_dim, iso = ([float(v) for v in item.split(":")] + [0, 0.3])[:4]
        xb, xq, _ = synthetic_embeddings(
            args.n,
            args.queries,
            384,
            0,
            noise=noise,
            spectrum=spectrum,
            local_dim=int(local_dim),
            iso=iso,
        )
        name = f"synthetic noise {noise:g}, spectrum {spectrum:g}"
        if local_dim:
            name += f", local dim {int(local_dim)}, iso {iso:g}"
        rows[name] = stats(xb, xq, args.nlist)
        print(name, rows[name], flush=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "rows": rows}, indent=2))
    cols = ["ivf8", *[f"hnsw@{ef}" for ef in EFS], "lid", "pca90", "cos1", "cos10"]
    print(f"\nN = {args.n:,}, {args.queries:,} held-out queries\n")
    print(
        "| data | IVF-Flat nprobe 8 | "
        + " | ".join(f"HNSW32 ef {ef}" for ef in EFS)
        + " | LID | PCA 90 % | cos 1st NN | cos 10th NN |"
    )
    print("| --- |" + " ---: |" * (len(cols)))
    for name, r in rows.items():
        vals = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        vals[cols.index("lid")] = f"{r['lid']:.1f}"
        print(f"| {name} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
