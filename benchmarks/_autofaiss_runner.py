"""Build an autofaiss index in its own virtual environment (autofaiss pins numpy<2).

Run by ``benchmarks/bench_index.py`` with ``benchmarks/.venv-autofaiss/bin/python``;
not meant to be imported. Reads the embeddings folder (``*.npy``), calls
``autofaiss.build_index`` with the automatic index choice, saves the index and
its infos, and writes a JSON report (its own build time included) to ``--report``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--embeddings", required=True, help="folder of .npy embedding files")
    ap.add_argument("--index-path", required=True)
    ap.add_argument("--infos-path", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--max-index-memory", required=True, help="autofaiss size string, e.g. 4e9 B")
    ap.add_argument("--current-memory", default="16G")
    ap.add_argument("--metric", default="ip")
    args = ap.parse_args()

    import autofaiss
    import faiss
    import numpy as np

    t = time.perf_counter()
    _, infos = autofaiss.build_index(
        embeddings=args.embeddings,
        index_path=args.index_path,
        index_infos_path=args.infos_path,
        save_on_disk=True,
        max_index_memory_usage=args.max_index_memory,
        current_memory_available=args.current_memory,
        metric_type=args.metric,
        verbose=logging.WARNING,
    )
    build_s = time.perf_counter() - t
    if not infos:
        raise SystemExit("autofaiss.build_index returned no index (see its log above)")
    report = {
        "build_s": build_s,
        "index_key": infos.get("index_key"),
        "index_param": infos.get("index_param"),
        "infos": infos,
        "autofaiss_version": getattr(autofaiss, "__version__", None)
        or __import__("importlib.metadata").metadata.version("autofaiss"),
        "faiss_version": faiss.__version__,
        "numpy_version": np.__version__,
        "omp_threads": faiss.omp_get_max_threads(),
    }
    with open(args.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    main()
