"""The knowledge-swap experiment (issue 18): both readers on the knowledge task.

Makes the knowledge task, builds fact indices A / B / A-shuffled with a trained
retriever, trains the classifier and the generative reader with index A and
counterfactual term worlds, and evaluates each on the held-out test images under
five conditions (index A, index B swapped in without retraining, shuffled facts,
random facts, no retrieval), scoring every prediction against A's and B's answers.

    rvqa make-knowledge-task data/knowledge && rvqa train-retriever --config data/knowledge/knowledge.yaml
    python benchmarks/knowledge_task.py --retriever runs/knowledge/retriever/best --out runs/knowledge-exp \\
        --readers generative --epochs 4          # one card per question (--top-k, default 1)
    python benchmarks/knowledge_task.py --retriever runs/demo/retriever/best --out runs/k \\
        --card-steps 20 --test-images 200 --epochs 3 --mixed-precision bf16 \\
        --set classifier reader.max_steps=80 --set classifier reader.learning_rate=1e-3 \\
        --set generative reader.t5_dropout=0   # rvqa demo's stage 6 (its retriever, its budgets)
    python benchmarks/knowledge_task.py --retriever runs/knowledge/retriever/best --out runs/k2 \\
        --readers generative --set generative reader.copy_from_context=false   # an ablation

Prints the table (markdown) and writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from rvqa.io import write_json_atomic
    from rvqa.knowledge_experiment import (
        READERS,
        TOP_K,
        copied_by_reader,
        format_examples,
        knowledge_table,
        run_knowledge_experiment,
    )
    from rvqa.retriever.modeling import RetrieverModel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--retriever", required=True, help="a trained retriever folder")
    p.add_argument("--out", required=True, help="work folder (task, indices, reader runs)")
    p.add_argument("--readers", default=",".join(READERS), help="comma-separated")
    p.add_argument("--train-images", type=int, default=0, help="0 (default): all (3,578)")
    p.add_argument("--test-images", type=int, default=300, help="0: all (888)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--top-k", type=int, default=TOP_K, help="fact cards read per question")
    p.add_argument("--augment-assignments", type=int, default=400, help="term worlds")
    p.add_argument(
        "--card-steps",
        type=int,
        default=0,
        help="first fine-tune --retriever on the task's fact cards for this many steps",
    )
    p.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        default="no",
        help="card fine-tuning and readers: bf16 autocast (the demo's setting) or float32",
    )
    p.add_argument(
        "--set",
        nargs=2,
        action="append",
        default=[],
        metavar=("READER", "KEY=VALUE"),
        help="override one reader's run config, e.g. --set generative reader.learning_rate=3e-3",
    )
    args = p.parse_args(argv)
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    overrides: dict[str, list[str]] = {}
    for reader, kv in args.set:
        overrides.setdefault(reader, []).append(kv)
    for name in [*readers, *overrides]:
        if name not in READERS:
            p.error(f"unknown reader {name!r}; expected one of {', '.join(READERS)}")
    t0 = time.time()
    retriever = RetrieverModel.from_pretrained(args.retriever)
    res = run_knowledge_experiment(
        retriever,
        args.out,
        readers=readers,
        train_images=args.train_images or None,
        test_images=args.test_images or None,
        epochs=args.epochs,
        top_k=args.top_k,
        augment_assignments=args.augment_assignments,
        retriever_dir=args.retriever,
        card_steps=args.card_steps,
        overrides=overrides,
        mixed_precision=args.mixed_precision,
    )
    table = knowledge_table(res["tables"])
    recall = ", ".join(f"{k} {v:.1f} %" for k, v in res["card_recall"].items())
    print(f"\nthe image's own card retrieved from index A: {recall}")
    print(f"chance {res['chance']:.2f} %; official VQA accuracy on held-out images\n")
    print(table)
    for kind, copied in copied_by_reader(res["tables"]).items():
        print(
            f"{kind}: trained in {res['tables'][kind][0]['train_s']:.0f} s; with index B "
            f"{copied:.1f} % of "
            "owner names are B's, copied from the evidence"
        )
    print(format_examples(res["examples"]))
    wall = time.time() - t0
    print(f"\nwall time {wall:.0f} s")
    write_json_atomic(
        Path(args.out) / "results.json",
        {
            "argv": sys.argv[1:] if argv is None else argv,
            "tables": res["tables"],
            "chance": res["chance"],
            "card_recall": res["card_recall"],
            "wall_time_s": wall,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
