"""Every retrieval objective on one benchmark where every valid match is known.

Trains a retriever per objective with the same towers (the demo's: the small CNN from
scratch on 64 px images, the packaged MiniLM frozen), the same budget and the same seed
on the compositional image–caption set of ``benchmarks/compositional_pairs.py``
(generated under ``--data`` when missing), then evaluates each on the test split with
the project's metrics:

* R@1/5/10 both ways and rsum (:func:`rvqa.metrics.recall_at_k`: a caption's own image,
  an image's own five captions — the standard protocol);
* PMRP: R-Precision both ways over **every** valid match
  (:func:`rvqa.metrics.r_precision`, the exhaustive match matrix);
* training time (the loop's ``wall_time_s``);
* the knowledge index each retriever builds: bytes per caption and batch-1 queries per
  second of a FAISS index of ``--index-size`` entries of its kind (float: ``IndexFlatIP``
  over the embedding; hashing: ``IndexBinaryFlat`` over the codes, Hamming distance),
  measured once per kind on the same machine in the same run;

and, for the objective with the best validation rsum among those with the MiniLM text
encoder, the same run with that encoder tuned (``freeze_text: false``). The rows named
"GCN text" replace the text encoder by the GCN text tower (``text_tower: gcn``, over
MiniLM's frozen word vectors). Writes ``WORK/results.json`` and
``WORK/report.md``; each run folder stays under ``WORK/runs/NAME`` (``--fresh``
retrains).

Usage::

    python benchmarks/retrieval_objectives.py --data /work/bench/comp --work /work/bench/objectives
    python benchmarks/retrieval_objectives.py ... --objectives vse_max pcme hash --steps 50  # quick
    python benchmarks/retrieval_objectives.py ... --objectives "infonce, GCN text" --no-tuned-text
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compositional_pairs  # noqa: E402  (a sibling script; benchmarks/ is not a package)

logger = logging.getLogger("retrieval_objectives")

# name -> retriever settings beside the shared ones (each paper's defaults otherwise)
OBJECTIVES: dict[str, dict] = {
    "vse_max": {"loss": "vse_max"},  # the default (DXR)
    "infonce": {"loss": "infonce"},
    "pcme": {"loss": "pcme"},
    "center": {"loss": "center"},
    "infonce+center": {"loss": "infonce+center"},
    "gpl+modality": {"loss": "gpl+modality"},
    "crcgs+support_set": {"loss": "crcgs+support_set"},
    "hash": {"loss": "hash"},
    "infonce+hash": {"loss": "infonce+hash"},
    "pairwise": {"loss": "pairwise"},  # Yu et al.'s pairwise similarity loss
    # the GCN text path (rvqa.towers.gcn) in place of the frozen MiniLM encoder: MiniLM's
    # word vectors (frozen), a graph of each caption's words, two graph convolutions
    "infonce, GCN text": {"loss": "infonce", "text_tower": "gcn"},
    # Yu et al.'s whole dual path: GCN text, non-linear (MLP) heads, pairwise loss
    "pairwise, GCN text, MLP heads": {"loss": "pairwise", "text_tower": "gcn", "projection": "mlp"},
}


def shared_settings(data: Path, a: argparse.Namespace) -> dict:
    return {
        "vision_backbone": "cnn",
        "text_backbone": "minilm",
        "freeze_text": True,
        "image_size": compositional_pairs.IMAGE_SIZE,
        "embed_dim": 256,
        "max_caption_length": 32,
        "batch_size": a.batch,
        "max_steps": a.steps,
        "learning_rate": a.lr,
        "mixed_precision": "no",
        "num_workers": a.workers,
        "eval_every": 0,
        "log_every": 50,
        "seed": a.seed,
        "max_violation_warmup": min(100, a.steps // 5),
        "captions": {
            "source": "karpathy",
            "path": str(data / compositional_pairs.SPLIT_FILE),
            "images": str(data / "images"),
            "splits": ["train"],
        },
        "eval_split": "val",
        "test_split": None,  # the benchmark evaluates test itself (exhaustive matches)
    }


def train_one(name: str, settings: dict, work: Path, fresh: bool, data_id: str) -> Path:
    """Train one run, or reuse it when its settings and data are the same; returns its
    run folder."""
    from rvqa.config import config_from_dict
    from rvqa.retriever.train import train_retriever

    run = work / "runs" / name.replace("+", "_").replace(", ", "_").replace(" ", "_")
    result = run / "retriever" / "train_result.json"
    stamp = run / "benchmark_stamp.json"
    key = json.dumps({"settings": settings, "data": data_id}, sort_keys=True)
    if not fresh and result.is_file() and stamp.is_file() and stamp.read_text() == key:
        logger.info("%s: reusing %s (same settings and data)", name, run)
        return run
    if run.exists():
        shutil.rmtree(run)
    cfg = config_from_dict({"output_dir": str(run), "retriever": settings})
    logger.info("%s: training (%s)", name, settings["loss"])
    train_retriever(cfg)
    stamp.write_text(key)
    return run


def evaluate_one(run: Path, test: dict, data: Path) -> dict:
    """Recall@K, rsum and PMRP of one trained retriever on the test split."""
    from rvqa.metrics import r_precision, recall_at_k
    from rvqa.retriever.modeling import RetrieverModel

    metrics = json.loads((run / "retriever" / "metrics.json").read_text())
    train = json.loads((run / "retriever" / "train_result.json").read_text())
    model = RetrieverModel.from_pretrained(metrics["model_dir"]).eval()
    images = [str(data / "images" / "test" / f"{i:06d}.png") for i in range(len(test["image_ids"]))]
    t0 = time.perf_counter()
    img = model.embed_images(images, batch_size=128)
    txt = model.embed_texts(test["captions"], batch_size=256)
    encode_s = time.perf_counter() - t0
    out = recall_at_k(img, txt, test["source_image"])
    out.update(r_precision(img, txt, test["matches"]))
    out["pmrp"] = (out["i2t_rp"] + out["t2i_rp"]) / 2
    out.update(
        {
            "train_s": train["wall_time_s"],
            "steps": train["steps"],
            "val_rsum": (metrics.get("val") or {}).get("rsum"),
            "kind": "binary" if model.config.is_binary else "float",
            "dim": model.embed_dim,
            "encode_test_s": round(encode_s, 1),
            "final_loss": train.get("final_loss"),
        }
    )
    return out


def index_kind_figures(kind: str, dim: int, n: int, queries: int = 500, seed: int = 0) -> dict:
    """Bytes per entry and batch-1 QPS of a flat FAISS index of ``n`` random entries."""
    import faiss

    rng = np.random.default_rng(seed)
    if kind == "binary":
        codes = rng.integers(0, 256, size=(n, dim // 8), dtype=np.uint8)
        q = rng.integers(0, 256, size=(queries, dim // 8), dtype=np.uint8)
        index = faiss.IndexBinaryFlat(dim)
        index.add(codes)
        size = len(faiss.serialize_index_binary(index))
    else:
        x = rng.normal(size=(n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q = x[rng.integers(0, n, size=queries)]
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        size = len(faiss.serialize_index(index))
    for i in range(10):  # warm-up
        index.search(q[i : i + 1], 10)
    t0 = time.perf_counter()
    for i in range(queries):
        index.search(q[i : i + 1], 10)
    secs = time.perf_counter() - t0
    return {"bytes": size, "bytes_per_entry": size / n, "qps_batch1": queries / secs}


def table(rows: list[tuple[str, dict]], kinds: dict) -> str:
    head = (
        "| objective | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | PMRP i2t | PMRP t2i "
        "| train s | index | bytes / caption | QPS (batch 1) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"
    )
    lines = [head]
    for name, r in rows:
        k = kinds[(r["kind"], r["dim"])]
        kind = f"{'Hamming' if r['kind'] == 'binary' else 'float IP'} {r['dim']}"
        lines.append(
            f"| {name} | {r['i2t_r1']:.1f} | {r['i2t_r5']:.1f} | {r['i2t_r10']:.1f} "
            f"| {r['t2i_r1']:.1f} | {r['t2i_r5']:.1f} | {r['t2i_r10']:.1f} | {r['rsum']:.1f} "
            f"| {r['i2t_rp']:.1f} | {r['t2i_rp']:.1f} | {r['train_s']:.0f} | {kind} "
            f"| {k['bytes_per_entry']:.0f} | {k['qps_batch1']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="compositional set folder (generated if missing)")
    p.add_argument("--work", required=True)
    p.add_argument("--train", type=int, default=4000, help="training images (5 captions each)")
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="training seed (every objective)")
    p.add_argument("--data-seed", type=int, default=0, help="the generated set's seed")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--no-tuned-text", action="store_true", help="skip the MiniLM-tuned run")
    p.add_argument("--index-size", type=int, default=100_000)
    p.add_argument("--fresh", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data, work = Path(a.data), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    manifest = compositional_pairs.ensure(
        data, {"train": a.train, "val": a.val, "test": a.test}, seed=a.data_seed
    )
    data_id = json.dumps(
        {k: manifest[k] for k in ("format_version", "seed", "counts")}, sort_keys=True
    )
    test = compositional_pairs.load_split(data, "test")
    per_caption = test["matches"].sum(1)
    shared = shared_settings(data, a)

    results: dict[str, dict] = {}
    for name in a.objectives:
        run = train_one(name, {**shared, **OBJECTIVES[name]}, work, a.fresh, data_id)
        results[name] = evaluate_one(run, test, data)
        logger.info(
            "%s: %s",
            name,
            {k: round(v, 2) for k, v in results[name].items() if isinstance(v, float)},
        )
    encoders = [
        n for n in results if OBJECTIVES[n].get("text_tower", "transformer") == "transformer"
    ]
    if not a.no_tuned_text and encoders:
        best = max(encoders, key=lambda n: results[n]["val_rsum"] or -1)
        name = f"{best}, MiniLM tuned"
        run = train_one(
            name, {**shared, **OBJECTIVES[best], "freeze_text": False}, work, a.fresh, data_id
        )
        results[name] = evaluate_one(run, test, data)

    kinds = {}
    for r in results.values():
        key = (r["kind"], r["dim"])
        if key not in kinds:
            kinds[key] = index_kind_figures(r["kind"], r["dim"], a.index_size)
    rows = list(results.items())
    commit = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "data": {
            **manifest["counts"],
            "valid_matches_per_test_caption": {
                "median": float(np.median(per_caption)),
                "mean": float(per_caption.mean()),
                "max": int(per_caption.max()),
                "share_over_1": float((per_caption > 1).mean()),
            },
        },
        "settings": shared,
        "index_kinds": {f"{k[0]}-{k[1]}": v for k, v in kinds.items()},
        "index_size": a.index_size,
        "results": results,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    (work / "results.json").write_text(json.dumps(report, indent=2))
    md = table(rows, kinds)
    (work / "report.md").write_text(md + "\n")
    print(md)
    print(f"wall {report['wall_s']} s; results in {work / 'results.json'}")


if __name__ == "__main__":
    main()
