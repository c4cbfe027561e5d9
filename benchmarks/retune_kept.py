"""Re-tune and re-measure the automatic index of a kept ``bench_index.py`` run.

A 1M HNSW32 build takes ~18 minutes here; the search-parameter tuning on top of it
takes seconds. After a change to ``tune_search_params`` this script re-runs only the
tuning on the graph a ``bench_index.py ... --keep`` run left in its work folder,
with the run's 1,000 held-out tuning queries (the "auto, tuned" row), and measures
it exactly as ``bench_index.py`` does (fresh subprocess, same queries and ground
truth), together with the kept exact Flat index (``--keep-flat``: reuse the run's
Flat row instead), printing the rows and the ratio to exact Flat. The "auto" row
(default proxy tuning) cannot be redone this way: a build tunes before adding the
corpus' last vectors.

Usage (the data flags must be those of the kept run)::

    python benchmarks/retune_kept.py --n 1000000 --noise 1.7 --local-dim 16 --iso 0.3 \\
        --results benchmarks/_work/index_results_1m_manifold.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_index as bi  # noqa: E402


def _spec(work: Path, folder: Path, load_kw: dict) -> dict:
    """A ``bench_index.measure`` spec for a kept rvqa folder (bench_index's defaults)."""
    return {
        "kind": "rvqa",
        "path": str(folder),
        "captions": str(folder / "captions"),
        "xq": str(work / "xq.npy"),
        "truth": str(work / "truth.npy"),
        "k": 10,
        "batch": 256,
        "batch1_queries": 500,
        "batch1_cap_s": 10.0,
        "sweep_cap_s": 1.5,
        "b1_threads": 1,
        "sweep": False,
        "index_param": None,
        "load_kw": load_kw,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--noise", type=float, default=1.6)
    ap.add_argument("--spectrum", type=float, default=0.5)
    ap.add_argument("--local-dim", type=int, default=0)
    ap.add_argument("--iso", type=float, default=0.3)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--tune-queries", type=int, default=1000)
    ap.add_argument("--results", required=True, help="the kept run's results JSON")
    ap.add_argument(
        "--keep-flat",
        action="store_true",
        help="use the kept run's exact Flat row instead of re-measuring it",
    )
    ap.add_argument("--work", default=str(HERE / "_work" / "index"))
    args = ap.parse_args()

    results = json.loads(Path(args.results).read_text())
    ((name, res),) = results["datasets"].items()
    kept = results["args"]
    for key in ("n", "noise", "spectrum", "local_dim", "iso", "queries", "tune_queries"):
        if key in kept and kept[key] != getattr(args, key):
            raise SystemExit(
                f"--{key.replace('_', '-')} {getattr(args, key)} != kept run's {kept[key]}"
            )
    work = Path(args.work) / f"{name}_{args.n}"
    folder = work / "auto"
    if not (folder / "manifest.json").is_file():
        raise SystemExit(f"{folder} is missing: run bench_index.py with --keep first")
    rows = {r["label"]: r for r in res["rows"]}
    bi.log(f"{name}: regenerating the data (seeded) for the tuning")
    xb, xq, xt = bi.synthetic_embeddings(
        args.n,
        args.queries,
        384,
        0,
        noise=args.noise,
        spectrum=args.spectrum,
        n_tune=args.tune_queries,
        local_dim=args.local_dim,
        iso=args.iso,
    )
    if not (bi.np.load(work / "xq.npy") == xq).all():
        raise SystemExit("regenerated queries differ from the kept run's xq.npy")
    new_rows = []
    flat = bi.exact_row(res["rows"])
    if not args.keep_flat and (work / "flat" / "manifest.json").is_file():
        # Re-measure the exact baseline in the same quiet run, with the same code.
        spec = {**_spec(work, work / "flat", {}), "label": "flat_remeasured"}
        m = bi.run_measure(spec, work)
        flat = {**flat, **m, "name": flat["name"] + " (re-measured)"}
        bi.log(f"flat: b=1 {m['qps1_api']:,.1f} API ({m['qps1_raw']:,.1f} raw) q/s")
    # Only the row tuned on given queries: the default (proxy) tuning of a build holds
    # out the corpus' last vectors until after tuning, which a finished index cannot
    # repeat — the auto row needs a fresh bench_index.py run.
    for label, queries in (("auto_tuned", xt),):
        old = rows[label]
        rec = bi.retune_rvqa(folder, xb, queries, old)  # the same tuning bench_index does
        params, tuning, load_kw = rec["search_params"], rec["tuning"], rec["load_kw"]
        bi.log(f"{label}: tuned {params} in {rec['tune_s']:.1f} s: {tuning}")
        spec = {**_spec(work, folder, load_kw), "label": label + "_retuned"}
        m = bi.run_measure(spec, work)
        title = "rvqa auto → HNSW32" + (
            ", tuned on 1,000 held-out queries" if queries is not None else ""
        )
        row = {
            **old,
            **m,
            "name": title + " (re-tuned)",
            "search_params": params,
            "tuning": tuning,
            "load_kw": load_kw,
            "tune_s": rec["tune_s"],  # build_s stays the kept run's (graph + its tuning)
        }
        new_rows.append(row)
        bi.log(
            f"{label}: recall@10 {m['recall']:.3f}, b=1 {m['qps1_api']:,.0f} API "
            f"({m['qps1_raw']:,.0f} raw) q/s = {m['qps1_api'] / flat['qps1_api']:.1f}x Flat API "
            f"({m['qps1_raw'] / flat['qps1_raw']:.1f}x raw)"
        )
    print(bi.table([flat, *new_rows]))
    out = Path(args.results).with_name(Path(args.results).stem + "_retuned.json")
    out.write_text(json.dumps({"rows": [flat, *new_rows]}, indent=2, default=str))
    bi.log(f"written {out}")


if __name__ == "__main__":
    main()
