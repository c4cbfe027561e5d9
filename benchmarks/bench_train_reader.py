"""The real ``train-reader`` with and without the frozen image tower's feature cache.

Runs :func:`rvqa.reader.train.train_reader` (what ``rvqa train-reader`` calls) on
the demo's reader settings (``rvqa demo`` without ``--fast``: the retriever's
small-CNN image tower, frozen; 2 MiniLM layers; 3 captions; batch 64) for a
fixed number of steps, with the cache (the default) and with
``feature_cache_max_bytes=0`` (the tower runs on every step), alternating in
one process, into fresh run folders that link the given run's trained retriever
and read its index. Reports, per variant, the median of ``--repeats`` runs:
the whole ``train_reader`` call (data, retrieval, pixels, the feature cache,
loop, saves) and the training loop alone (``TrainResult.wall_time_s``), as
seconds, steps/s and the cache-on / cache-off ratio; and checks that both
variants give the same losses.

    rvqa demo --output-dir runs/demo --indices-dir indices     # once: a trained retriever + index
    python benchmarks/bench_train_reader.py --run runs/demo --index indices/easyvqa-captions --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def one_run(args: argparse.Namespace, root: Path, cache: bool, i: int) -> dict:
    from rvqa.demo import demo_config
    from rvqa.reader.train import train_reader

    out = root / f"{'cache' if cache else 'per-step'}-{i}"
    (out / "retriever").mkdir(parents=True)
    for entry in (Path(args.run) / "retriever").iterdir():
        (out / "retriever" / entry.name).symlink_to(entry.resolve())
    cfg = demo_config(out, fast=False)
    cfg.index.path = str(Path(args.index).resolve())
    s = cfg.reader
    s.max_steps, s.eval_every, s.checkpoint_every, s.log_every = args.steps, 0, 0, 0
    kw = {} if cache else {"feature_cache_max_bytes": 0}
    t = time.perf_counter()
    res = train_reader(cfg, end_training=False, **kw)["result"]
    total = time.perf_counter() - t
    return {"total_s": total, "loop_s": res.wall_time_s, "losses": res.losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", default="runs/demo", help="a run folder with a trained retriever")
    ap.add_argument("--index", default="indices/easyvqa-captions", help="its knowledge index")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    runs: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for cache in (False, True):
                runs[cache].append(one_run(args, Path(tmp), cache, i))
    same = all(
        np.allclose(a["losses"], b["losses"], rtol=1e-5, atol=1e-6)
        for a, b in zip(runs[True], runs[False])
    )
    result: dict = {"steps": args.steps, "repeats": args.repeats, "same_losses": same}
    for cache, name in ((False, "per_step_tower"), (True, "feature_cache")):
        total = statistics.median(r["total_s"] for r in runs[cache])
        loop = statistics.median(r["loop_s"] for r in runs[cache])
        result[name] = {
            "train_reader_s": round(total, 2),
            "loop_s": round(loop, 2),
            "loop_steps_per_s": round(args.steps / loop, 3),
        }
    off, on = result["per_step_tower"], result["feature_cache"]
    result["cache_speedup_train_reader"] = round(off["train_reader_s"] / on["train_reader_s"], 3)
    result["cache_speedup_loop"] = round(off["loop_s"] / on["loop_s"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
