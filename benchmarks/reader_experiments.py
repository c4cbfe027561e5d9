"""Reader quality experiments on easy-vqa (held-out test split, official VQA accuracy).

Reuses the retriever and index of a demo run (``rvqa demo`` first) and trains
reader variants next to it:

- ``k0``: the demo reader trained without retrieval (top_k = 0);
- ``low``: trained on 10 % of the training questions, retrieval from the full index;
- ``low-k0``: 10 % of the questions, no retrieval.

Each is evaluated on the whole easy-vqa test split (9,673 questions) with and
(where trained with it) without retrieval.

    python benchmarks/reader_experiments.py --demo runs/demo --out benchmarks/_work/reader
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--demo", default="runs/demo")
    ap.add_argument("--indices", default="indices")
    ap.add_argument("--out", default="benchmarks/_work/reader")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--low-epochs", type=int, default=5)
    args = ap.parse_args()

    from rvqa import RVQA
    from rvqa.data import load_vqa
    from rvqa.demo import _accuracy, demo_config
    from rvqa.reader.train import train_reader
    from rvqa.run_layout import retriever_dir

    variants = {
        "k0": ["reader.top_k=0"],
        "low": [
            "data.train_fraction=0.1",
            f"reader.num_epochs={args.low_epochs}",
            "reader.eval_every=100",
        ],
        "low-k0": [
            "data.train_fraction=0.1",
            f"reader.num_epochs={args.low_epochs}",
            "reader.eval_every=100",
            "reader.top_k=0",
        ],
    }
    results = {}
    out_root = Path(args.out)
    for name, overrides in variants.items():
        if args.only and name not in args.only:
            continue
        from rvqa.config import apply_overrides

        cfg = apply_overrides(demo_config(out_root / name, indices_dir=args.indices), overrides)
        run = Path(cfg.output_dir)
        (run / "retriever").mkdir(parents=True, exist_ok=True)
        src = retriever_dir(args.demo).resolve()
        link = run / "retriever" / src.name
        if not link.exists():
            os.symlink(src, link, target_is_directory=True)
        t = time.time()
        trained = train_reader(cfg, end_training=False)
        wall = time.time() - t
        if cfg.reader.top_k == 0:  # a k = 0 run records no index; keep the run's for evaluation
            run_file = run / "rvqa_run.json"
            data = json.loads(run_file.read_text())
            data["indices"] = {
                cfg.index.name: os.path.relpath(Path(cfg.index.folder()).resolve(), run.resolve())
            }
            data["top_k"] = 3
            run_file.write_text(json.dumps(data, indent=1))
        model = RVQA.from_pretrained(run)
        records = list(load_vqa(cfg.data, "test"))
        row = {
            "train_questions": int(
                round(len(list(load_vqa(cfg.data, "train"))) * cfg.data.train_fraction)
            ),
            "top_k_trained": cfg.reader.top_k,
            "steps": trained["result"].steps,
            "wall_time_s": round(wall, 1),
            "val_accuracy": trained["best_val_accuracy"],
            "test_no_retrieval": _accuracy(model, records, None, "no retrieval").overall,
        }
        if cfg.reader.top_k > 0:
            row["test_with_retrieval"] = _accuracy(
                model, records, cfg.index.name, "retrieval"
            ).overall
        results[name] = row
        print(name, json.dumps(row))
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
