"""The reader's VQA accuracy with and without re-ranking, on the demo and knowledge tasks.

For each trained run given (``--run NAME=RUN_FOLDER[:SPLIT[,SPLIT...]]``; e.g. the
easy-vqa run of ``objectives_vqa.py`` and a knowledge-task reader of
``knowledge_task.py``):

1. a re-ranker is trained for the run's retriever on the retriever's own training
   captions (``rvqa.retriever.rerank_train.train_reranker``; the retriever's
   ``config.yaml`` names them) into ``WORK/NAME/reranker``;
2. ``WORK/NAME/rvqa_run.json`` names the run's retriever, reader and indices (in place,
   not copied) and the new re-ranker;
3. ``rvqa evaluate --compare --rerank N`` (:func:`rvqa.evaluation.evaluate_split`):
   official VQA accuracy on each split, each index alone, re-ranked, and without
   retrieval. A split is ``SPLIT`` or ``SPLIT@INDEX`` (evaluate that split with that
   index only: the name of one of the run's indices or an index folder, e.g. the
   knowledge task's ``test_B@.../indices/knowledge-B``).

Writes ``WORK/results.json`` and prints the tables.

Usage::

    python benchmarks/rerank_vqa.py --work /work/bench/rerank-vqa --rerank 20 \\
        --run demo=/work/bench/objectives-vqa/vse_max:test \\
        --run knowledge=/work/bench/objectives-kn/vse_max/knowledge-classifier:test@knowledge-A,test_B@/work/bench/objectives-kn/vse_max/indices/knowledge-B
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("rerank_vqa")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--run", action="append", required=True, metavar="NAME=RUN[:SPLITS]")
    p.add_argument("--rerank", type=int, default=20)
    p.add_argument("--steps", type=int, default=300, help="re-ranker training steps")
    p.add_argument("--max-questions", type=int, default=1000)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="re-ranker settings, e.g. reranker.top_n=20",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from rvqa.config import apply_overrides, load_config
    from rvqa.evaluation import evaluate_split, load_run_config
    from rvqa.retriever.modeling import RetrieverModel
    from rvqa.retriever.rerank_train import train_reranker
    from rvqa.run_layout import read_run_file, write_run_file

    work = Path(a.work)
    out: dict = {"args": vars(a), "runs": {}}
    t_all = time.perf_counter()
    for spec in a.run:
        name, rest = spec.split("=", 1)
        src, _, splits = rest.partition(":")
        run = read_run_file(src)
        dest = work / name
        cfg = load_config(run.retriever.parent / "config.yaml")
        cfg.output_dir = str(dest)
        cfg.reranker.retriever = str(run.retriever)
        cfg.reranker.max_steps = a.steps
        cfg.reranker.eval_every = a.steps
        cfg.reranker.test_split = None
        cfg.reranker.eval_top_n = a.rerank
        cfg = apply_overrides(cfg, a.set)
        t0 = time.perf_counter()
        res = train_reranker(cfg, retriever=RetrieverModel.from_pretrained(run.retriever))
        train_s = time.perf_counter() - t0
        write_run_file(dest, run.retriever, run.reader, run.indices, run.top_k, res["model_dir"])
        reader_cfg = load_run_config(src)
        rows = {}
        for split_spec in (splits or "test").split(","):
            split, _, index = split_spec.partition("@")
            ev = evaluate_split(
                dest,
                dest / "eval" / (f"{split}_{Path(index).name}" if index else split),
                cfg=reader_cfg,
                split=split,
                max_questions=a.max_questions,
                indices=[index] if index else (),
                compare_indices=True,
                rerank=a.rerank,
            )
            rows[split_spec] = ev.rows
            print(f"\n{name} {split_spec} ({ev.questions} questions)\n{ev.table}")
        out["runs"][name] = {
            "source": str(src),
            "reranker": str(res["model_dir"]),
            "reranker_val": res["val"],
            "train_s": round(train_s, 1),
            "rows": rows,
        }
    out["commit"] = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    out["date"] = time.strftime("%Y-%m-%d %H:%M")
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwall time {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
