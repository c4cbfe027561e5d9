"""Explore FAISS HNSW settings for the 1M hard synthetic benchmark (recall@10 >= 0.95, max b=1 QPS).

Data exactly as ``bench_index.py`` main(): ``synthetic_embeddings(N, 1000, 384, 0)``.
For each candidate index: build (2 threads, cached under benchmarks/_work/explore/*.faiss),
then sweep efSearch with 1 OpenMP thread: recall@10 on all queries, batch-1 QPS (median of
single-query times) and the ratio to exact IndexFlatIP batch-1 QPS re-measured in the same
process right before the sweep (the machine is shared; ratios are what to compare).

Usage::

    OMP_WAIT_POLICY=PASSIVE nohup python benchmarks/explore_hnsw.py \\
        > benchmarks/_work/explore/log.txt 2>&1 &
    python benchmarks/explore_hnsw.py --only hnsw32_efc40,hnswsq8_32_efc128   # subset
"""

from __future__ import annotations

import argparse
import gc
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
from bench_index import synthetic_embeddings  # noqa: E402

from rvqa.retriever.index import exact_knn, knn_recall  # noqa: E402

OUT = HERE / "_work" / "explore"
TRUTH_DIR = HERE / "_work" / "index"
EF_GRID = [16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 448, 512, 768]
K = 10
_T0 = time.perf_counter()

# name -> (kind, M, efConstruction, build-time factor relative to HNSW32 efC40 (estimate))
CANDIDATES = {
    "hnsw32_efc40": ("flat", 32, 40, 1.0),
    "hnsw32_efc128": ("flat", 32, 128, 2.6),
    "hnswsq8_32_efc128": ("sq8", 32, 128, 2.0),
    "hnsw32_efc256": ("flat", 32, 256, 4.5),
    "hnsw48_efc128": ("flat", 48, 128, 3.3),
    "hnswsq8_48_efc128": ("sq8", 48, 128, 2.6),
}


def log(msg: str) -> None:
    la = os.getloadavg()[0]
    print(f"[{time.perf_counter() - _T0:7.1f}s load {la:4.1f}] {msg}", flush=True)


def b1_qps(index, xq: np.ndarray, nq: int) -> tuple[float, float]:
    """Median single-query time over nq queries, 1 thread -> (qps, mean qps)."""
    faiss.omp_set_num_threads(1)
    for i in range(5):
        index.search(xq[i : i + 1], K)
    ts = np.empty(nq)
    for i in range(nq):
        q = xq[i : i + 1]
        t = time.perf_counter()
        index.search(q, K)
        ts[i] = time.perf_counter() - t
    return 1.0 / float(np.median(ts)), 1.0 / float(np.mean(ts))


def load_truth(xb: np.ndarray, xq: np.ndarray, n: int) -> np.ndarray:
    path = TRUTH_DIR / f"synthetic_{n}" / "truth.npy"
    xq_path = path.with_name("xq.npy")
    if path.is_file() and xq_path.is_file():
        truth = np.load(path)
        xq_old = np.load(xq_path)
        same_q = xq_old.shape == xq.shape and np.array_equal(xq_old, xq)
        fresh = exact_knn(xq[:8], xb, K)[1]
        same_t = truth.shape == (len(xq), K) and np.array_equal(fresh, truth[:8])
        log(f"cached truth {path}: xq identical={same_q}, top-{K} of 8 queries identical={same_t}")
        if same_q and same_t:
            return truth
    log("computing exact ground truth (numpy brute force)")
    return exact_knn(xq, xb, K)[1]


def build(name: str, xb: np.ndarray, threads: int):
    n = len(xb)
    kind, m, efc, _ = CANDIDATES[name]
    path = OUT / f"{name}_{n}.faiss"
    if path.is_file():
        t = time.perf_counter()
        index = faiss.read_index(str(path))
        log(f"{name}: loaded {path.name} in {time.perf_counter() - t:.1f} s")
        meta = (
            json.loads(path.with_suffix(".json").read_text())
            if path.with_suffix(".json").is_file()
            else {}
        )
        return index, meta.get("build_s")
    d = xb.shape[1]
    faiss.omp_set_num_threads(threads)
    t = time.perf_counter()
    if kind == "flat":
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, m, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(1).choice(len(xb), min(len(xb), 100_000), replace=False)
        index.train(xb[np.sort(sample)])
    index.hnsw.efConstruction = efc
    log(f"{name}: building ({kind}, M={m}, efConstruction={efc}, {threads} threads)")
    index.add(xb)
    build_s = time.perf_counter() - t
    log(f"{name}: built in {build_s:.1f} s; writing")
    faiss.write_index(index, str(path))
    path.with_suffix(".json").write_text(json.dumps({"build_s": build_s, "threads": threads}))
    return index, build_s


def sweep(label, index, set_ef, xq, truth, flat, b1_n, ef_grid, min_ef=0):
    flat_qps, _ = b1_qps(flat, xq, 50)
    log(f"{label}: Flat b=1 {flat_qps:.1f} q/s (re-measured)")
    rows = []
    for ef in ef_grid:
        if ef < min_ef:
            continue
        set_ef(ef)
        faiss.omp_set_num_threads(2)
        found = index.search(xq, K)[1]
        rec = knn_recall(found, truth)
        qps, qps_mean = b1_qps(index, xq, b1_n)
        rows.append(
            {
                "efSearch": ef,
                "recall": rec,
                "qps1": qps,
                "qps1_mean": qps_mean,
                "ratio": qps / flat_qps,
            }
        )
        log(
            f"{label}: ef {ef:4d} recall@10 {rec:.4f} b=1 {qps:8.1f} q/s ({qps / flat_qps:6.1f}x Flat)"
        )
        if rec >= 0.99:
            break
    best = next((r for r in rows if r["recall"] >= 0.95), None)
    return {"flat_qps1": flat_qps, "curve": rows, "best": best}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--only", default="", help="comma-separated candidate names")
    ap.add_argument(
        "--budget-min",
        type=float,
        default=62.0,
        help="skip building a candidate whose estimated build would end past this",
    )
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--b1-queries", type=int, default=200)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    names = [s for s in args.only.split(",") if s] or list(CANDIDATES)

    log(f"faiss {faiss.__version__} {faiss.get_compile_options()}; generating N={args.n:,}")
    xb, xq, _ = synthetic_embeddings(args.n, 1000, 384, 0)  # as bench_index.py main() defaults
    log(f"data {xb.shape} {xq.shape}")
    truth = load_truth(xb, xq, args.n)

    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    fq, fq_mean = b1_qps(flat, xq, 100)
    log(f"Flat b=1: median {fq:.1f} q/s (mean {fq_mean:.1f})")
    res_path = OUT / ("results.json" if args.n == 1_000_000 else f"results_{args.n}.json")
    results = {"n": args.n, "faiss": faiss.__version__, "indices": {}}
    if res_path.is_file():  # keep entries of earlier runs; re-measured ones are replaced
        results = json.loads(res_path.read_text())
    results["flat_qps1_initial"] = fq
    base_build = None  # measured build seconds of hnsw32_efc40 (for time estimates)

    for name in names:
        kind, m, efc, factor = CANDIDATES[name]
        path = OUT / f"{name}_{args.n}.faiss"
        elapsed_min = (time.perf_counter() - _T0) / 60
        if not path.is_file():
            est = (base_build or 340.0) * factor / 60
            if elapsed_min + est + 2 > args.budget_min:
                log(f"{name}: skipped (est. build {est:.0f} min, elapsed {elapsed_min:.0f} min)")
                continue
        index, build_s = build(name, xb, args.build_threads)
        if name == "hnsw32_efc40" and build_s:
            base_build = build_s
        entry = {"kind": kind, "M": m, "efConstruction": efc, "build_s": build_s}

        def set_ef(ef, index=index):
            index.hnsw.efSearch = ef

        entry["alone"] = sweep(name, index, set_ef, xq, truth, flat, args.b1_queries, EF_GRID)
        if kind == "sq8":
            for kf in (2, 4):
                ref = faiss.IndexRefine(index, flat)  # exact re-ranking with the float vectors
                ref.k_factor = kf
                entry[f"refine{kf}"] = sweep(
                    f"{name}+refine{kf}",
                    ref,
                    set_ef,
                    xq,
                    truth,
                    flat,
                    args.b1_queries,
                    EF_GRID,
                    min_ef=K * kf,
                )
                del ref
        results["indices"][name] = entry
        res_path.write_text(json.dumps(results, indent=2))
        del index
        gc.collect()

    print_table(results)
    log(f"results written to {res_path}")


def print_table(results: dict) -> None:
    print("\n| index | build s | efSearch | recall@10 | QPS b=1 | Flat QPS b=1 | ratio vs Flat |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, e in results["indices"].items():
        for variant in ("alone", "refine2", "refine4"):
            if variant not in e:
                continue
            s = e[variant]
            label = name if variant == "alone" else f"{name} + {variant}"
            b = s["best"]
            bs = f"{e['build_s']:.0f}" if e["build_s"] else "?"
            if b is None:
                top = s["curve"][-1]
                print(
                    f"| {label} | {bs} | >{top['efSearch']} | {top['recall']:.3f} | - | "
                    f"{s['flat_qps1']:.1f} | - |"
                )
            else:
                print(
                    f"| {label} | {bs} | {b['efSearch']} | {b['recall']:.3f} | {b['qps1']:.0f} | "
                    f"{s['flat_qps1']:.1f} | {b['ratio']:.1f}x |"
                )


if __name__ == "__main__":
    main()
