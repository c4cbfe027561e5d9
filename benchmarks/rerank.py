"""Re-ranking with cross-attention: recall@K and added latency, dual encoder vs + re-ranker.

On the generated compositional set (``compositional_pairs.py``: 5 captions per image,
every valid match known), for each retriever objective given (trained by
``retrieval_objectives.py`` with the same settings, reused when its run exists):

1. a re-ranker is trained for the retriever with ``rvqa.retriever.rerank_train``
   (``train_reranker``: negatives from the retriever's own top-``--top-n`` of each
   training image), reused when its settings and data are unchanged;
2. on the test split, image→text recall@1/5/10 of the dual encoder alone and of its
   top-N re-ranked, N ∈ ``--ns`` (the project's own evaluation code:
   ``mine_candidates`` — exact search over the distinct test captions — then
   ``rerank_candidates`` and ``recall_of``). A hit is one of the image's own captions
   (the standard protocol); ``R@1 valid`` counts a top caption that is any valid
   match of the image (the exhaustive match matrix);
3. the latency the stage adds per query on this machine's CPU: the re-ranker scoring
   an image's top N (tokenising and encoding the N captions included: the caption
   cache off), at batch 1 (p50 / p95 over ``--latency-queries`` queries) and batched
   (``--latency-batch`` queries per call, p50 / p95 of the per-query time over calls);
   then batch 1 again with the caption cache on (``RerankerModel.set_caption_cache``,
   the default 4,096 captions, empty at the start of the stream of queries: a caption
   seen under an earlier query is not encoded again), with the share of captions it
   held; beside it the dual encoder's own per-query cost (image embedding + exact search
   over the test captions).

Writes ``WORK/results.json`` and ``WORK/report.md`` (the table of
``benchmarks/README.md``).

Usage::

    python benchmarks/rerank.py --data /work/bench/comp --work /work/bench/rerank \\
        --objectives-work /work/bench/objectives --objectives vse_max infonce
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compositional_pairs  # noqa: E402  (sibling scripts; benchmarks/ is not a package)
import retrieval_objectives  # noqa: E402

logger = logging.getLogger("rerank")


def reranker_settings(a: argparse.Namespace) -> dict:
    return {
        "max_steps": a.steps,
        "batch_size": a.batch,
        "learning_rate": a.lr,
        "top_n": a.top_n,
        "num_negatives": a.negatives,
        "eval_top_n": 50,
        "eval_every": a.steps,
        "max_eval_images": 300,
        "num_workers": 0,
        "log_every": 50,
        "seed": a.seed,
        "test_split": None,  # evaluated here, at every N
        # the model's size, when not the defaults (absent otherwise: the runs and stamps
        # of the default model keep their names)
        **{k: v for k, v in (("hidden_size", a.hidden_size), ("num_steps", a.num_steps)) if v},
    }


def run_name(name: str, a: argparse.Namespace) -> str:
    """The run folder of one retriever's re-ranker: ``vse_max``, or ``vse_max-h64-k2``
    for a non-default size."""
    suffix = (f"-h{a.hidden_size}" if a.hidden_size else "") + (
        f"-k{a.num_steps}" if a.num_steps else ""
    )
    return name.replace("+", "_").replace(", ", "_").replace(" ", "_") + suffix


def train_reranker_for(
    name: str, retriever_dir: Path, data: Path, work: Path, settings: dict, fresh: bool
) -> tuple[Path, float]:
    """Train (or reuse) the re-ranker of one retriever; returns its folder and training s."""
    from rvqa.config import config_from_dict
    from rvqa.retriever.rerank_train import train_reranker

    run = work / "runs" / name
    stamp = run / "benchmark_stamp.json"
    key = json.dumps(
        {"settings": settings, "retriever": str(retriever_dir), "data": str(data)}, sort_keys=True
    )
    result = run / "reranker" / "train_result.json"
    if not fresh and stamp.is_file() and stamp.read_text() == key and result.is_file():
        logger.info("%s: reusing the re-ranker in %s", name, run)
    else:
        if run.exists():
            shutil.rmtree(run)
        cfg = config_from_dict(
            {
                "output_dir": str(run),
                "retriever": {
                    "captions": {
                        "source": "karpathy",
                        "path": str(data / compositional_pairs.SPLIT_FILE),
                        "images": str(data / "images"),
                        "splits": ["train"],
                    }
                },
                "reranker": {"retriever": str(retriever_dir), **settings},
            }
        )
        train_reranker(cfg)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key)
    metrics = json.loads((run / "reranker" / "metrics.json").read_text())
    train = json.loads(result.read_text())
    return Path(metrics["model_dir"]), float(train["wall_time_s"])


def _percentiles(ms: list[float]) -> dict:
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95))}


def _one_at_a_time(reranker, tokens, caps: list, scores: list) -> list[float]:
    """Milliseconds of scoring each query's candidates alone (batch 1), in order."""
    out = []
    for u in range(len(caps)):
        t0 = time.perf_counter()
        reranker.score(tokens[u : u + 1], caps[u : u + 1], scores[u : u + 1])
        out.append(1000 * (time.perf_counter() - t0))
    return out


def evaluate(
    retriever, reranker, records, test: dict, ns: list[int], a: argparse.Namespace
) -> dict:
    """Recall at each N and the latency figures (module doc)."""
    import torch

    from rvqa.retriever.rerank_train import mine_candidates, recall_of, rerank_candidates
    from rvqa.retriever.reranker import DEFAULT_CAPTION_CACHE

    cands = mine_candidates(retriever, records, max(ns))
    # gallery row → one test caption with that text (its constraints: the valid matches)
    first = {}
    for i, g in enumerate(cands.gallery_of_record.tolist()):
        first.setdefault(g, i)
    valid = test["matches"][[first[g] for g in range(len(cands.texts))]]  # (G, images)
    image_of = {}
    for i, u in enumerate(cands.image_of_record.tolist()):
        image_of.setdefault(u, int(test["source_image"][i]))
    valid_sets = [
        set(np.flatnonzero(valid[:, image_of[u]]).tolist()) for u in range(len(cands.images))
    ]

    def figures(ranked: np.ndarray) -> dict:
        out = recall_of(ranked, cands.positives)
        out["r1_valid"] = recall_of(ranked[:, :1], valid_sets, ks=(1,))["r1"]
        return out

    rows = {"dual": figures(cands.top)}
    for n in ns:
        sub = dataclasses.replace(cands, top=cands.top[:, :n], top_scores=cands.top_scores[:, :n])
        ranked = rerank_candidates(reranker, sub, batch_size=64)
        rows[f"rerank_{n}"] = figures(ranked)
        logger.info("N=%d: %s", n, {k: round(v, 1) for k, v in rows[f"rerank_{n}"].items()})

    # latency (this machine's CPU, torch's default threads)
    torch.set_num_threads(a.threads)
    q = min(a.latency_queries, len(cands.images))
    tokens = torch.from_numpy(np.asarray(cands.tokens[:q], dtype=np.float32))
    lat: dict[str, dict] = {}
    for n in ns:
        caps = [[cands.texts[g] for g in cands.top[u, :n]] for u in range(q)]
        scores = [cands.top_scores[u, :n] for u in range(q)]
        reranker.set_caption_cache(0)  # every caption encoded
        reranker.score(tokens[:1], caps[:1], scores[:1])  # warm-up
        one = _one_at_a_time(reranker, tokens, caps, scores)
        b = a.latency_batch
        batched = []
        for s in range(0, q - b + 1, b):
            t0 = time.perf_counter()
            reranker.score(tokens[s : s + b], caps[s : s + b], scores[s : s + b])
            batched.append(1000 * (time.perf_counter() - t0) / b)
        reranker.set_caption_cache(DEFAULT_CAPTION_CACHE)  # empty: the stream's own reuse
        cached = _one_at_a_time(reranker, tokens, caps, scores)
        cache = reranker.caption_cache
        lat[str(n)] = {
            "batch1": _percentiles(one),
            f"batch{b}": _percentiles(batched),
            "batch1_cached": {
                **_percentiles(cached),
                "hit_rate": cache.hits / max(cache.hits + cache.misses, 1),
            },
        }
        logger.info("N=%d latency: %s", n, lat[str(n)])
    # the dual encoder's own per-query cost, for scale: embed one image + exact search
    images = cands.images[:q]
    text = torch.from_numpy(cands.text_emb)
    base = []
    retriever.embed_images(images[:1])
    for im in images:
        t0 = time.perf_counter()
        e = torch.from_numpy(retriever.embed_images([im]))
        (e @ text.T).topk(max(ns))
        base.append(1000 * (time.perf_counter() - t0))
    lat["dual_encoder_batch1"] = _percentiles(base)
    return {
        "recall": rows,
        "latency_ms": lat,
        "test_images": len(cands.images),
        "test_distinct_captions": len(cands.texts),
    }


def table(results: dict, ns: list[int], b: int) -> str:
    lines = [
        "| retriever | re-ranking | i2t R@1 | R@5 | R@10 | R@1 valid | ΔR@1 | added p50 / p95 ms (batch 1) "
        f"| added p50 / p95 ms per query (batch {b}) | added p50 / p95 ms, caption cache "
        "(batch 1; captions it held) | re-ranker training s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        dual = r["recall"]["dual"]
        base = r["latency_ms"]["dual_encoder_batch1"]
        lines.append(
            f"| {name} | none (dual encoder) | {dual['r1']:.1f} | {dual['r5']:.1f} | "
            f"{dual['r10']:.1f} | {dual['r1_valid']:.1f} | | (dual encoder itself: "
            f"{base['p50']:.1f} / {base['p95']:.1f}) | | | |"
        )
        for n in ns:
            x = r["recall"][f"rerank_{n}"]
            lat = r["latency_ms"][str(n)]
            one, many, hot = lat["batch1"], lat[f"batch{b}"], lat["batch1_cached"]
            lines.append(
                f"| {name} | top {n} | {x['r1']:.1f} | {x['r5']:.1f} | {x['r10']:.1f} | "
                f"{x['r1_valid']:.1f} | {x['r1'] - dual['r1']:+.1f} | "
                f"{one['p50']:.1f} / {one['p95']:.1f} | {many['p50']:.2f} / {many['p95']:.2f} | "
                f"{hot['p50']:.1f} / {hot['p95']:.1f} ({100 * hot['hit_rate']:.0f} %) | "
                f"{r['train_s']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="compositional set folder (generated if missing)")
    p.add_argument("--work", required=True, help="re-ranker runs and results")
    p.add_argument(
        "--objectives-work",
        required=True,
        help="retrieval_objectives.py's --work (its retriever runs are reused or trained there)",
    )
    p.add_argument(
        "--objectives",
        nargs="+",
        default=["vse_max", "infonce"],
        choices=list(retrieval_objectives.OBJECTIVES),
    )
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--retriever-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=600, help="re-ranker training steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--top-n", type=int, default=50, help="training candidates per image")
    p.add_argument("--negatives", type=int, default=15)
    p.add_argument("--ns", type=int, nargs="+", default=[20, 50, 100])
    p.add_argument("--latency-queries", type=int, default=256)
    p.add_argument("--latency-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hidden-size", type=int, help="re-ranker width (default: the reranker settings' 128)"
    )
    p.add_argument(
        "--num-steps", type=int, help="re-ranker matching steps (default: the settings' 3)"
    )
    p.add_argument("--fresh", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t_all = time.perf_counter()
    from rvqa.config import CaptionDataConfig
    from rvqa.data import load_caption_split
    from rvqa.retriever.modeling import RetrieverModel
    from rvqa.retriever.reranker import RerankerModel

    data, work = Path(a.data), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    manifest = compositional_pairs.ensure(
        data, {"train": a.train, "val": a.val, "test": a.test}, seed=0
    )
    data_id = json.dumps(
        {k: manifest[k] for k in ("format_version", "seed", "counts")}, sort_keys=True
    )
    obj_args = argparse.Namespace(batch=64, steps=a.retriever_steps, lr=1e-3, workers=1, seed=0)
    shared = retrieval_objectives.shared_settings(data, obj_args)
    test = compositional_pairs.load_split(data, "test")
    test_records = load_caption_split(
        CaptionDataConfig(
            source="karpathy",
            path=str(data / compositional_pairs.SPLIT_FILE),
            images=str(data / "images"),
        ),
        "test",
    )
    results = {}
    for name in a.objectives:
        run = retrieval_objectives.train_one(
            name,
            {**shared, **retrieval_objectives.OBJECTIVES[name]},
            Path(a.objectives_work),
            False,
            data_id,
        )
        retriever_dir = Path(
            json.loads((run / "retriever" / "metrics.json").read_text())["model_dir"]
        )
        model_dir, train_s = train_reranker_for(
            run_name(name, a), retriever_dir, data, work, reranker_settings(a), a.fresh
        )
        retriever = RetrieverModel.from_pretrained(retriever_dir).eval()
        reranker = RerankerModel.from_pretrained(model_dir).eval()
        reranker.check_retriever(retriever.fingerprint(), str(model_dir))
        results[run_name(name, a)] = evaluate(retriever, reranker, test_records, test, a.ns, a)
        results[run_name(name, a)]["train_s"] = train_s
        results[run_name(name, a)]["reranker"] = str(model_dir)
    commit = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    report = table(results, a.ns, a.latency_batch)
    out = {
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(a),
        "results": results,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    (work / "results.json").write_text(json.dumps(out, indent=1))
    (work / "report.md").write_text(report + "\n")
    print(report)
    print(f"\nwall time {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
