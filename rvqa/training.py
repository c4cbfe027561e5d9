"""The shared Accelerate training loop (retriever and reader).

The shape of the ``accelerate`` no_trainer examples: ``prepare`` →
``accumulate`` → ``sync_gradients`` (clip, step, schedule) → periodic
evaluation (models gather their predictions with ``gather_for_metrics``) →
``save_state`` checkpoints written atomically → ``load_state`` +
``skip_first_batches`` on resume → ``unwrap_model(...).save_pretrained``.
Progress bar and logging on the main process only.

Runs unchanged on one CPU process, several CPU processes (gloo; start them with
``ACCELERATE_USE_CPU=true torchrun --nproc_per_node N ...``) and multi-GPU
(``accelerate launch --multi_gpu ...``). The data order is a function of
``(seed, epoch)`` (accelerate's seedable sampler), which is what makes a
resumed run see exactly the batches the interrupted one had not seen yet.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from rvqa.config import TrainSettings
from rvqa.io import replace_directory, write_text_atomic

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainResult:
    """What a training run produced."""

    output_dir: Path
    steps: int
    final_model_dir: Path
    best_model_dir: Path | None = None
    best_metric: float | None = None
    history: list[dict] = field(default_factory=list)
    """Evaluations: [{"step": ..., **metrics}]."""
    losses: list[float] = field(default_factory=list)
    """Training loss per optimizer step (main process, this run)."""
    num_processes: int = 1
    wall_time_s: float = 0.0
    resumed_from_step: int = 0


def make_accelerator(settings: TrainSettings, output_dir: str | Path) -> Accelerator:
    """An Accelerator for ``settings`` (mixed precision, accumulation, seedable data order)."""
    return Accelerator(
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        mixed_precision=settings.mixed_precision,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=settings.seed
        ),
    )


def _optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (
            no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay
        ).append(p)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.learning_rate)


def find_last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``output_dir/checkpoints``, or None."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(steps)[1] if steps else None


VOLATILE_CONFIG_KEYS = (
    "transformers_version",
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
)


def run_signature(model_config: Any, settings: TrainSettings, **extra: Any) -> dict:
    """What a checkpoint must agree with to be resumed: the model config (minus
    bookkeeping keys), the settings that fix the data order, and ``extra``."""
    conf = model_config.to_dict()
    for key in VOLATILE_CONFIG_KEYS:
        conf.pop(key, None)
    return {
        "model": conf,
        "batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "seed": settings.seed,
        **extra,
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def _check_signature(saved: dict, current: dict, ckpt: Path) -> None:
    a, b = _flatten(saved), _flatten(current)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    if changed:
        details = "; ".join(
            f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in changed[:8]
        )
        raise ValueError(
            f"cannot resume from {ckpt}: the model/run config changed since the checkpoint "
            f"({details}{'; ...' if len(changed) > 8 else ''}). Resume with the original config "
            f"or start a new run in another output folder."
        )


def _save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, state: dict, keep: int
) -> Path:
    """save_state into a temporary folder, then rename it into place (main process)."""
    root = output_dir / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process: it writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        replace_directory(tmp, final)
        old = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
        for p in old[: max(0, len(old) - max(keep, 1))]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _save_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    path: Path,
    save_fn: Callable[[torch.nn.Module, Path], None] | None,
) -> None:
    """unwrap_model(...).save_pretrained into a temporary folder, renamed into place."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        tmp = path.parent / f".{path.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            (save_fn or (lambda m, p: m.save_pretrained(p)))(unwrapped, tmp)
            replace_directory(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()


def train(
    model: torch.nn.Module,
    train_dataset: Dataset,
    collate_fn: Callable[[list], dict],
    settings: TrainSettings,
    output_dir: str | Path,
    *,
    evaluate: Callable[[torch.nn.Module, Accelerator], dict[str, float]] | None = None,
    metric: str | None = None,
    greater_is_better: bool = True,
    resume: bool | str | Path = False,
    signature: dict | None = None,
    save_fn: Callable[[torch.nn.Module, Path], None] | None = None,
    accelerator: Accelerator | None = None,
    desc: str = "training",
    end_training: bool = True,
) -> TrainResult:
    """Train ``model`` (which returns an output with ``.loss``) on ``train_dataset``.

    Args:
        model: A module whose forward takes the collated batch as keyword arguments.
        train_dataset: Map-style dataset; ``collate_fn`` turns a list of items into a batch.
        settings: Optimiser, schedule, precision, accumulation, checkpointing.
        output_dir: Receives ``checkpoints/step_N`` (resumable ``save_state``),
            ``final/`` and, with ``evaluate`` and ``metric``, ``best/``.
        evaluate: ``fn(model, accelerator) -> metrics``, called on every process
            every ``settings.eval_every`` steps and at the end of each epoch.
        metric: Key of ``evaluate``'s result that picks the best model.
        greater_is_better: Direction of ``metric``.
        resume: True = continue from the newest checkpoint in ``output_dir``;
            a path = continue from that checkpoint.
        signature: JSON-able description of the model/run config; resuming with a
            different one is refused with a message naming what changed.
        save_fn: How to save the unwrapped model (default ``save_pretrained``).
        accelerator: Reuse an existing Accelerator (else one is made from settings).
        desc: Progress bar label.
        end_training: Call ``accelerator.end_training()`` at the end (tears down
            the process group; leave False when the caller still needs it).
    """
    t0 = time.time()
    output_dir = Path(output_dir)
    accelerator = accelerator or make_accelerator(settings, output_dir)
    set_seed(settings.seed)
    signature = json.loads(json.dumps(signature or {}, default=str))

    loader = DataLoader(
        train_dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=settings.num_workers,
        drop_last=len(train_dataset) > settings.batch_size,  # contrastive losses want full batches
    )
    if len(loader) == 0:
        raise ValueError(f"the training set is empty ({len(train_dataset)} examples)")
    optimizer = _optimizer(model, settings)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    steps_per_epoch = math.ceil(len(loader) / settings.gradient_accumulation_steps)
    total_steps = settings.max_steps or steps_per_epoch * settings.num_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = int(round(settings.warmup_ratio * total_steps))
    # The prepared scheduler steps once per process per optimizer step (no_trainer examples).
    scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=warmup * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    scheduler = accelerator.prepare(scheduler)

    step = 0
    restored_rng: dict | None = None
    best_metric: float | None = None
    history: list[dict] = []
    resumed_from = 0
    if resume:
        ckpt = Path(resume) if not isinstance(resume, bool) else find_last_checkpoint(output_dir)
        if ckpt is None or not (ckpt / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"--resume: no complete checkpoint found under {output_dir / CHECKPOINTS}"
                if ckpt is None
                else f"--resume: {ckpt} is not a complete checkpoint (no {STATE_FILE})"
            )
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        _check_signature(state.get("signature", {}), signature, ckpt)
        accelerator.load_state(str(ckpt))
        # Creating the data iterator draws from the global RNG (its worker base
        # seed); the uninterrupted run did that at the epoch start, before the
        # checkpoint. Re-apply the restored states once the first batch is out.
        restored_rng = _rng_states()
        step = resumed_from = int(state["step"])
        best_metric = state.get("best_metric")
        history = state.get("history", [])
        logger.info("resumed from %s (step %d of %d)", ckpt, step, total_steps)

    logger.info(
        "%s: %d examples, %d processes, batch %d/process × %d accumulation, %d steps (%d epochs)",
        desc,
        len(train_dataset),
        accelerator.num_processes,
        settings.batch_size,
        settings.gradient_accumulation_steps,
        total_steps,
        num_epochs,
    )
    progress = tqdm(
        total=total_steps,
        initial=step,
        desc=desc,
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    losses: list[float] = []
    best_dir = output_dir / "best"

    def run_eval() -> None:
        nonlocal best_metric
        if evaluate is None:
            return
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model, accelerator)
        model.train()
        history.append({"step": step, **metrics})
        if accelerator.is_main_process:
            logger.info("step %d eval: %s", step, _fmt(metrics))
        if metric is not None:
            if metric not in metrics:
                raise KeyError(f"evaluation returned no {metric!r} (got {sorted(metrics)})")
            value = float(metrics[metric])
            better = best_metric is None or (
                value > best_metric if greater_is_better else value < best_metric
            )
            if better:
                best_metric = value
                _save_model(accelerator, model, best_dir, save_fn)

    def checkpoint() -> None:
        state = {
            "step": step,
            "best_metric": best_metric,
            "history": history,
            "signature": signature,
            "settings": asdict(settings),
        }
        _save_checkpoint(accelerator, output_dir, step, state, settings.keep_checkpoints)

    model.train()
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, num_epochs):
        if step >= total_steps:
            break
        loader.set_epoch(epoch)
        epoch_loader = loader
        skip = (step - epoch * steps_per_epoch) * settings.gradient_accumulation_steps
        if skip > 0:
            epoch_loader = accelerator.skip_first_batches(loader, skip)
        running, count = 0.0, 0
        for batch in epoch_loader:
            if restored_rng is not None:
                _set_rng_states(restored_rng)
                restored_rng = None
            with accelerator.accumulate(model):
                out = model(**batch)
                loss = out.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {step}; lower the learning rate"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += loss.detach().float().item()
            count += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            losses.append(running / count)
            progress.update(1)
            progress.set_postfix(
                loss=f"{running / count:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}"
            )
            if settings.log_every and step % settings.log_every == 0:
                logger.debug("step %d loss %.4f", step, running / count)
            running, count = 0.0, 0
            if settings.eval_every and step % settings.eval_every == 0:
                run_eval()
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                checkpoint()
            if step >= total_steps:
                break
        end_of_epoch = step % steps_per_epoch == 0 or step >= total_steps
        if end_of_epoch and not (settings.eval_every and step % settings.eval_every == 0):
            run_eval()
        if end_of_epoch and not (
            settings.checkpoint_every and step % settings.checkpoint_every == 0
        ):
            checkpoint()
    progress.close()

    final_dir = output_dir / "final"
    _save_model(accelerator, model, final_dir, save_fn)
    result = TrainResult(
        output_dir=output_dir,
        steps=step,
        final_model_dir=final_dir,
        best_model_dir=best_dir if best_dir.is_dir() else None,
        best_metric=best_metric,
        history=history,
        losses=losses,
        num_processes=accelerator.num_processes,
        wall_time_s=time.time() - t0,
        resumed_from_step=resumed_from,
    )
    if accelerator.is_main_process:
        write_text_atomic(
            output_dir / "train_result.json",
            json.dumps(
                {
                    "steps": step,
                    "num_processes": accelerator.num_processes,
                    "best_metric": best_metric,
                    "metric": metric,
                    "history": history,
                    "wall_time_s": round(result.wall_time_s, 2),
                    "resumed_from_step": resumed_from,
                    "final_loss": losses[-1] if losses else None,
                },
                indent=1,
            ),
        )
    accelerator.wait_for_everyone()
    if end_training:
        accelerator.end_training()
    return result


def _rng_states() -> dict:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def _fmt(metrics: dict) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )
