"""Retrieval for VQA: the reader's accuracy with retrievers trained by different objectives.

For each objective, the demo's easy-vqa pipeline end to end with only
``retriever.loss`` changed (``rvqa.demo.demo_config``: the 2-epoch retriever, its
caption index, the 400-step reader that reads the retrieved captions and uses the
retriever's image tower, the first 1,000 test questions), evaluated with the project's
own code (:func:`rvqa.evaluation.compare`: official VQA accuracy) with retrieval and
without. Also the retriever's test recall (its own run's ``metrics.json``). Writes
``WORK/results.json`` and prints a table.

Usage::

    python benchmarks/objectives_vqa.py --work /work/bench/objectives-vqa
    python benchmarks/objectives_vqa.py --work /tmp/q --objectives vse_max --fast   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = ["vse_max", "infonce", "gpl+modality"]


def run_one(loss: str, work: Path, fast: bool) -> dict:
    from rvqa.data import load_vqa
    from rvqa.demo import demo_config
    from rvqa.evaluation import compare
    from rvqa.indexing import build_index_from_config
    from rvqa.pipeline import RVQA
    from rvqa.reader.train import train_reader
    from rvqa.retriever.modeling import RetrieverModel
    from rvqa.retriever.train import train_retriever

    name = loss.replace("+", "_")
    cfg = demo_config(work / name, fast=fast, indices_dir=work / name / "indices")
    cfg.retriever.loss = loss
    t0 = time.perf_counter()
    ret = train_retriever(cfg, end_training=False)
    retriever = RetrieverModel.from_pretrained(ret["model_dir"])
    build_index_from_config(cfg, retriever=retriever, overwrite=True)
    t1 = time.perf_counter()
    rd = train_reader(cfg, retriever=retriever, end_training=False)
    t2 = time.perf_counter()
    model = RVQA.from_pretrained(work / name)
    records = list(load_vqa(cfg.data, cfg.data.eval_split))
    if cfg.data.max_eval_questions:
        records = records[: cfg.data.max_eval_questions]
    index = cfg.index.name
    rows, table = compare(model, records, [("retrieval", index), ("no retrieval", None)])
    return {
        "loss": loss,
        "retriever_test": ret["test"],
        "reader_val": rd.get("best_val_accuracy"),
        "rows": rows,
        "table": table,
        "questions": len(records),
        "retriever_and_index_s": round(t1 - t0, 1),
        "reader_s": round(t2 - t1, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--objectives", nargs="+", default=DEFAULT)
    p.add_argument("--fast", action="store_true", help="the demo's --fast budgets (a smoke run)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = [run_one(loss, work, a.fast) for loss in a.objectives]
    commit = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    out = {
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "fast": a.fast,
        "results": results,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (work / "results.json").write_text(json.dumps(out, indent=2, default=str))
    print("| retriever loss | retriever test i2t R@1 | VQA accuracy, retrieval | no retrieval |")
    print("| --- | ---: | ---: | ---: |")
    for r in results:
        acc = {row["condition"]: row["overall"] for row in r["rows"]}
        r1 = (r["retriever_test"] or {}).get("i2t_r1", float("nan"))
        print(f"| {r['loss']} | {r1:.1f} | {acc['retrieval']:.2f} | {acc['no retrieval']:.2f} |")
    print(f"wall {out['wall_s']} s; {work / 'results.json'}")


if __name__ == "__main__":
    main()
