"""The shared Accelerate training loop vs a bare PyTorch loop, and 1 vs 2 CPU processes.

What it measures: the loop's own cost. Same model (the demo reader
architecture: 2 MiniLM layers, 3 captions), same batches, same optimizer,
schedule and clipping; the batches carry random precomputed visual features
(4 tokens × 128 channels), as ``train-reader`` feeds when the image tower is
frozen and its feature cache fits (the demo), so the image tower never runs
here. Not measured: data loading, retrieval, pixel preprocessing, the feature
cache itself, or a tower run per step — ``benchmarks/bench_train_reader.py``
times the real ``train-reader`` with and without the cache.
Per-step time is measured as (time of N2 steps − time of N1 steps) / (N2 − N1),
which cancels the fixed costs (setup, final save) of both loops.

    python benchmarks/bench_training_loop.py                      # loop vs bare, 1 process
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 benchmarks/bench_training_loop.py --only-rvqa
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import numpy as np
import torch


def make_items(n: int, vocab_size: int, seed: int = 0) -> list[dict]:
    import easy_vqa

    qs, answers, _ = easy_vqa.get_train_questions()
    colors = ["red", "green", "blue", "yellow", "teal", "gray", "brown", "black"]
    shapes = ["circle", "rectangle", "triangle"]
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        labels = np.zeros(vocab_size, dtype=np.float32)
        labels[rng.randrange(vocab_size)] = 1.0
        items.append(
            {
                "visual_features": torch.randn(4, 128, generator=g),
                "question": qs[i % len(qs)],
                "captions": [f"a {rng.choice(colors)} {rng.choice(shapes)}" for _ in range(3)],
                "scores": [0.9, 0.7, 0.6],
                "labels": labels,
            }
        )
    return items


def build(args):
    from rvqa.config import ReaderSettings
    from rvqa.reader.modeling import ReaderModel
    from rvqa.reader.processing import ReaderProcessor
    from rvqa.towers.cnn import SmallCNNConfig, SmallCNNModel

    torch.manual_seed(0)
    answers = [f"a{i}" for i in range(13)]
    tower = SmallCNNModel(SmallCNNConfig(grid_size=4))
    settings = ReaderSettings()
    model = ReaderModel.from_backbones(answers, settings, vision_tower=tower)
    processor = ReaderProcessor.from_config(model.config, image_processor=None)
    return model, processor, settings


def rvqa_steps(steps: int, args) -> float:
    from rvqa.reader.data import ReaderCollator
    from rvqa.training import train

    model, processor, settings = build(args)
    settings.max_steps, settings.eval_every, settings.checkpoint_every = steps, 0, 10**9
    settings.batch_size, settings.log_every = args.batch, 0
    items = make_items(args.batch * (steps + 2) * 2, model.config.num_answers)
    with tempfile.TemporaryDirectory() as out:
        import rvqa.training as T

        saved = T._save_checkpoint
        T._save_checkpoint = lambda *a, **k: None  # time the steps, not the disk
        t = time.perf_counter()
        res = train(model, items, ReaderCollator(processor), settings, out, end_training=False)
        elapsed = time.perf_counter() - t
        T._save_checkpoint = saved
    return elapsed, res.num_processes


def bare_steps(steps: int, args) -> float:
    from transformers import get_scheduler

    from rvqa.reader.data import ReaderCollator
    from rvqa.training import _optimizer

    model, processor, settings = build(args)
    items = make_items(args.batch * (steps + 2) * 2, model.config.num_answers)
    torch.manual_seed(0)
    t = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        items,
        batch_size=args.batch,
        shuffle=True,
        collate_fn=ReaderCollator(processor),
        drop_last=True,
    )
    opt = _optimizer(model, settings)
    sched = get_scheduler(settings.lr_scheduler, opt, int(0.05 * steps), steps)
    model.train()
    done = 0
    while done < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
            done += 1
            if done >= steps:
                break
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n1", type=int, default=10)
    ap.add_argument("--n2", type=int, default=60)
    ap.add_argument("--only-rvqa", action="store_true")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")
    r1, procs = rvqa_steps(args.n1, args)
    r2, _ = rvqa_steps(args.n2, args)
    per_rvqa = (r2 - r1) / (args.n2 - args.n1)
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "processes": procs,
        "threads_per_process": torch.get_num_threads(),
        "batch_per_process": args.batch,
        "rvqa_s_per_step": per_rvqa,
        "rvqa_samples_per_s": args.batch * procs / per_rvqa,
    }
    if not args.only_rvqa:
        b1, b2 = bare_steps(args.n1, args), bare_steps(args.n2, args)
        per_bare = (b2 - b1) / (args.n2 - args.n1)
        result.update(
            bare_s_per_step=per_bare,
            overhead_pct=100 * (per_rvqa / per_bare - 1),
        )
    if rank == 0:
        print(json.dumps(result, indent=1))
    if procs > 1:
        from accelerate import PartialState

        PartialState().destroy_process_group()


if __name__ == "__main__":
    main()
