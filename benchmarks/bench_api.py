"""RVQA.answer latency and answer_batch throughput with a 100k-caption index (CPU).

Uses the demo model (run ``rvqa demo`` first) and builds a 100k-caption index of
templated captions with the demo retriever (cached in benchmarks/_work/).
Latency is split into retrieval (image embedding + FAISS search) and reader time.

    python benchmarks/bench_api.py [--model runs/demo] [--n-captions 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np

COLORS = [
    "red",
    "green",
    "blue",
    "yellow",
    "teal",
    "gray",
    "brown",
    "black",
    "white",
    "orange",
    "pink",
    "purple",
]
SHAPES = ["circle", "rectangle", "triangle", "square", "star", "oval", "hexagon", "diamond"]
SIZES = ["small", "large", "tiny", "big", "medium-sized"]
PLACES = [
    "on a white background",
    "in the middle",
    "near the edge",
    "at the top",
    "at the bottom",
    "on the left",
    "on the right",
    "in a corner",
    "next to a line",
    "under a dot",
]
NEIGHBOURS = ["", " beside a dot", " and a line", " with a shadow", " with a thin border"]
LEADS = ["a", "one", "a single", "there is a", "an image of a", "a picture of a", "a drawing of a"]


def captions(n: int) -> list[str]:
    combos = itertools.product(LEADS, SIZES, COLORS, SHAPES, PLACES, NEIGHBOURS)
    out = [
        f"{lead} {size} {color} {shape} {place}{nb}"
        for lead, size, color, shape, place, nb in combos
    ]
    random.Random(0).shuffle(out)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct captions available")
    return out[:n]


def build_templated_index(model, texts: list[str], folder: Path) -> None:
    """Encode ``texts`` with ``model``'s retriever and write a knowledge index folder."""
    from rvqa.retriever.index import build_index_from_embeddings

    t = time.time()
    emb = model.retriever.embed_texts(texts, batch_size=512, show_progress=True)
    print(f"encoded {len(texts)} captions in {time.time() - t:.0f} s -> {folder}", flush=True)
    build_index_from_embeddings(
        emb,
        texts,
        list(range(len(texts))),
        folder,
        model.retriever.fingerprint(),
        caption_source="templated",
    )


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="runs/demo")
    ap.add_argument("--n-captions", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--work", default="benchmarks/_work")
    ap.add_argument(
        "--factory", default=None, help="rebuild the index with this FAISS factory, e.g. HNSW32"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch and faiss threads (default: theirs)"
    )
    args = ap.parse_args()
    if args.threads:
        import faiss
        import torch

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    import easy_vqa

    from rvqa import RVQA

    model = RVQA.from_pretrained(args.model, device="cpu")
    index_dir = Path(args.work) / f"api-index-{args.n_captions}"
    if not index_dir.exists():
        build_templated_index(model, captions(args.n_captions), index_dir)
    if args.factory:
        from rvqa.retriever.index import rebuild_index

        tag = args.factory.replace(",", "_")
        fdir = Path(args.work) / f"api-index-{args.n_captions}-{tag}"
        if not fdir.exists():
            rebuild_index(index_dir, fdir, args.factory)
        index_dir = fdir
    for name in list(model.registry.names):
        model.unload_index(name)
    model.load_index(index_dir, name="bench")
    manifest = model.indices["bench"]

    qs, _, ims = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    pairs = [(paths[ims[i]], qs[i]) for i in range(args.queries)]

    # Time retrieval and reading separately by wrapping the two stages.
    stage = {"retrieval": [], "reader": []}
    orig_r, orig_read = model._retrieve, model._read

    def timed(name, fn):
        def wrap(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            stage[name].append(time.perf_counter() - t)
            return out

        return wrap

    model._retrieve, model._read = timed("retrieval", orig_r), timed("reader", orig_read)
    for im, q in pairs[:10]:  # warm-up
        model.answer(im, q, top_k=5)
    stage = {"retrieval": [], "reader": []}
    total = []
    for im, q in pairs:
        t = time.perf_counter()
        model.answer(im, q, top_k=5)
        total.append(time.perf_counter() - t)
    lat = {
        "total": (pct(total, 50), pct(total, 95)),
        "retrieval": (pct(stage["retrieval"], 50), pct(stage["retrieval"], 95)),
        "reader": (pct(stage["reader"], 50), pct(stage["reader"], 95)),
    }
    model._retrieve, model._read = orig_r, orig_read
    images = [p for p, _ in pairs]
    questions = [q for _, q in pairs]
    model.answer_batch(images[: args.batch], questions[: args.batch], top_k=5)
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        model.answer_batch(images, questions, top_k=5, batch_size=args.batch)
        runs.append(time.perf_counter() - t)
    qps = len(images) / statistics.median(runs)
    import torch

    result = {
        "threads": torch.get_num_threads(),
        "index": {"count": manifest["count"], "factory": manifest["factory"]},
        "latency_ms_p50_p95": lat,
        "answer_batch_questions_per_s": qps,
        "single_answer_questions_per_s": len(total) / sum(total),
    }
    print(json.dumps(result, indent=1))
    print()
    print(f"index: {manifest['count']:,} captions, {manifest['factory']}")
    print("| stage | p50 (ms) | p95 (ms) |\n| --- | ---: | ---: |")
    for k, (a, b) in lat.items():
        print(f"| {k} | {a:.1f} | {b:.1f} |")
    print(
        f"\nanswer_batch (batch {args.batch}): {qps:.0f} questions/s "
        f"({qps / result['single_answer_questions_per_s']:.1f}× one-at-a-time answer())"
    )


if __name__ == "__main__":
    main()
