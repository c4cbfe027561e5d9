"""The shared Accelerate training loop (retriever and reader).

:class:`Trainer` holds one run's parts (setup, resume, step, evaluate and keep
the best model, checkpoint, finalize); :class:`TrainHooks` is what it calls
out to; :func:`train` builds one and runs it. Every folder and file it writes
goes through :mod:`rvqa.io` (complete under its final name, or absent).

The shape of the ``accelerate`` no_trainer examples: ``prepare`` →
``accumulate`` → ``sync_gradients`` (clip, step, schedule) → periodic
evaluation (models gather their predictions with ``gather_for_metrics``) →
``save_state`` checkpoints written atomically → ``load_state`` +
``skip_first_batches`` on resume → ``unwrap_model(...).save_pretrained``.
Progress bar and logging on the main process only.

Gradient accumulation (``accumulate``) divides each micro-batch's loss by the
number of micro-batches and steps the optimiser and the schedule once per
``gradient_accumulation_steps`` batches (``steps_per_epoch`` counts optimizer
steps). For a loss that is a mean over independent examples (the reader's) that
is the update of one batch as large as all of them; for a loss whose negatives
come from the batch (the retriever's) it is the mean of the micro-batches'
gradients. Mixed precision: :func:`make_accelerator`.

Runs unchanged on one CPU process, several CPU processes (gloo; start them with
``ACCELERATE_USE_CPU=true torchrun --nproc_per_node N ...``) and multi-GPU
(``accelerate launch --multi_gpu ...``). The data order is a function of
``(seed, epoch)`` (accelerate's seedable sampler), which is what makes a
resumed run see exactly the batches the interrupted one had not seen yet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from rvqa.config import RunConfig, TrainSettings
from rvqa.errors import ConfigError, DataFormatError, ResumeError, RunFolderError, UsageError
from rvqa.io import atomic_directory, write_json_atomic
from rvqa.pixels import carry_errors, loader_options, raise_carried
from rvqa.run_layout import BEST, FINAL

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
RESULT_FILE = "train_result.json"
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

    def to_json(self, metric: str | None = None) -> dict[str, Any]:
        """The loop's record, as written to ``train_result.json``: steps, processes,
        the validation history and best ``metric``, wall time, resume point, last loss."""
        return {
            "steps": self.steps,
            "num_processes": self.num_processes,
            "best_metric": self.best_metric,
            "metric": metric,
            "history": self.history,
            "wall_time_s": round(self.wall_time_s, 2),
            "resumed_from_step": self.resumed_from_step,
            "final_loss": self.losses[-1] if self.losses else None,
        }


def make_accelerator(settings: TrainSettings, output_dir: str | Path) -> Accelerator:
    """An Accelerator for ``settings`` (mixed precision, accumulation, seedable data order).

    ``mixed_precision: bf16`` autocasts the forward pass to bfloat16 on GPUs and CPUs
    alike; the weights, optimiser state and saved models stay float32. ``fp16`` needs
    a GPU: on a CPU Accelerate (1.16) turns neither autocast nor loss scaling on and
    trains in float32 under an ``fp16`` label, so it is refused here, before any data is
    loaded. Accelerate keeps one precision per process; a run with another precision
    than the previous run in the same process (a bf16 retriever, then a reader with
    ``no``) resets that process-wide state, which is safe because runs do not overlap.

    Raises:
        ConfigError: ``mixed_precision: fp16`` on a CPU (naming the setting; use bf16 or no).
    """
    precision = settings.mixed_precision
    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and previous != precision:
        # Accelerate refuses to change the precision of an initialised state; the
        # process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        mixed_precision=precision,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=settings.seed
        ),
    )
    if precision == "fp16" and accelerator.device.type == "cpu":
        key = f"{_section_of(settings)}.mixed_precision".lstrip(".")
        raise ConfigError(
            f"{key}: fp16 needs a GPU, but this run is on the CPU, where Accelerate would "
            f"train in float32 without saying so; use bf16 (autocast on CPU) or no, "
            f"e.g. --set {key}=bf16"
        )
    return accelerator


def _section_of(settings: TrainSettings) -> str:
    """The run-config section that ``settings`` is (``retriever``, ``reader``), or ``""``."""
    for f in fields(RunConfig):
        if f.default_factory is type(settings):
            return f.name
    return ""


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
"""Model-config keys that are bookkeeping, not architecture: left out of the resume
signature (:func:`run_signature`) and of ``RetrieverModel.fingerprint``."""


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


# Model-config keys added after checkpoints were written, with the value a checkpoint
# without the key was trained with: such a run resumes when the config says that value.
ABSENT_MEANS: dict[str, Any] = {"model.copy_from_context": False}


def _check_signature(saved: dict, current: dict, ckpt: Path) -> None:
    """Refuse to resume when the model/run config differs from the checkpoint's.

    Raises:
        ResumeError: Naming up to 8 changed keys, old -> new.
    """
    a, b = _flatten(saved), _flatten(current)

    def old(k: str) -> Any:
        return a.get(k, ABSENT_MEANS.get(k, "<absent>"))

    changed = [k for k in sorted(set(a) | set(b)) if old(k) != b.get(k, "<absent>")]
    if changed:
        details = "; ".join(f"{k}: {old(k)!r} -> {b.get(k, '<absent>')!r}" for k in changed[:8])
        raise ResumeError(
            f"cannot resume from {ckpt}: the model/run config changed since the checkpoint "
            f"({details}{'; ...' if len(changed) > 8 else ''}). Resume with the original config "
            f"or start a new run in another output folder."
        )


@contextlib.contextmanager
def _shared_atomic_directory(accelerator: Accelerator, path: Path) -> Iterator[Path]:
    """:func:`rvqa.io.atomic_directory` for a folder that every process writes into.

    The main process makes the temporary folder and, once every process has
    left the block, renames it into place; the others are told its name.
    """
    with contextlib.ExitStack() as stack:
        tmp = None
        if accelerator.is_main_process:
            tmp = stack.enter_context(atomic_directory(path, overwrite=True))
        if accelerator.num_processes > 1:
            box = [str(tmp) if tmp is not None else None]
            broadcast_object_list(box, from_process=0)
            tmp = Path(box[0])
        yield tmp
        accelerator.wait_for_everyone()  # all writes done before the main process commits


def _save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, state: dict, keep: int
) -> Path:
    """``save_state`` (every process: each writes its own RNG state) plus the loop's
    state into ``checkpoints/step_N``, atomically; keeps the newest ``keep``."""
    root = output_dir / CHECKPOINTS
    final = root / f"step_{step:08d}"
    with _shared_atomic_directory(accelerator, final) as tmp:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / STATE_FILE, state)
    if accelerator.is_main_process:
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
    """``unwrap_model(...).save_pretrained`` (or ``save_fn``) into ``path``, atomically."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with atomic_directory(path, overwrite=True) as tmp:
            (save_fn or (lambda m, p: m.save_pretrained(p)))(unwrapped, tmp)
    accelerator.wait_for_everyone()


@dataclass
class TrainHooks:
    """What the loop calls out to: evaluation, best-model choice and saving.

    Attributes:
        evaluate: ``fn(model, accelerator) -> metrics``, called on every process
            every ``settings.eval_every`` steps and at the end of each epoch.
        metric: Key of ``evaluate``'s result that picks the best model (``best/``).
        greater_is_better: Direction of ``metric``.
        save_fn: How to save the unwrapped model (default ``save_pretrained``).
    """

    evaluate: Callable[[torch.nn.Module, Accelerator], dict[str, float]] | None = None
    metric: str | None = None
    greater_is_better: bool = True
    save_fn: Callable[[torch.nn.Module, Path], None] | None = None

    def improves(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of :attr:`metric` beats ``best`` (``None``: nothing yet)."""
        return best is None or (value > best if self.greater_is_better else value < best)


class Trainer:
    """One training run, in the order :meth:`run` calls its parts: :meth:`setup`
    (loader, optimiser, schedule, ``prepare``), :meth:`resume` (checkpoint and
    RNG state), then per optimizer step :meth:`_step`, :meth:`_maybe_evaluate`
    (and best-model save), :meth:`_maybe_checkpoint`, and :meth:`finalize`
    (final model, ``train_result.json``).

    Most callers use :func:`train`, which builds one and runs it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_dataset: Dataset,
        collate_fn: Callable[[list], dict],
        settings: TrainSettings,
        output_dir: str | Path,
        hooks: TrainHooks | None = None,
        *,
        signature: dict | None = None,
        accelerator: Accelerator | None = None,
        desc: str = "training",
    ):
        self.t0 = time.time()
        self.settings = settings
        self.output_dir = Path(output_dir)
        self.hooks = hooks or TrainHooks()
        self.desc = desc
        self.accelerator = accelerator or make_accelerator(settings, self.output_dir)
        set_seed(settings.seed)
        self.signature = json.loads(json.dumps(signature or {}, default=str))
        self.model = model
        self.train_dataset = train_dataset
        self.collate_fn = collate_fn
        # Progress, restored or made by this run.
        self.step = 0
        self.best_metric: float | None = None
        self.history: list[dict] = []
        self.losses: list[float] = []
        self.resumed_from = 0
        self._restored_rng: dict | None = None

    @property
    def best_dir(self) -> Path:
        return self.output_dir / BEST

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Data loader (``settings.num_workers`` workers; pinned batches on a GPU),
        optimiser and schedule, all through ``accelerator.prepare``."""
        s, acc = self.settings, self.accelerator
        if len(self.train_dataset) == 0:
            raise DataFormatError("the training set is empty (0 examples)")
        # Workers stream the items (images decoded and preprocessed there); an
        # RVQAError in a worker (e.g. an unreadable image) reaches _run_epoch as itself.
        dataset, collate_fn = carry_errors(self.train_dataset, self.collate_fn)
        loader = DataLoader(
            dataset,
            batch_size=s.batch_size,
            shuffle=True,
            collate_fn=collate_fn,
            # contrastive losses want full batches (never empties: only when len > batch)
            drop_last=len(self.train_dataset) > s.batch_size,
            **loader_options(s.num_workers, acc.device),
        )
        optimizer = _optimizer(self.model, s)
        self.model, self.optimizer, self.loader = acc.prepare(self.model, optimizer, loader)

        self.steps_per_epoch = math.ceil(len(self.loader) / s.gradient_accumulation_steps)
        self.total_steps = s.max_steps or self.steps_per_epoch * s.num_epochs
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        warmup = int(round(s.warmup_ratio * self.total_steps))
        # The prepared scheduler steps once per process per optimizer step (no_trainer examples).
        scheduler = get_scheduler(
            s.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=warmup * acc.num_processes,
            num_training_steps=self.total_steps * acc.num_processes,
        )
        self.scheduler = acc.prepare(scheduler)

    def resume(self, resume: bool | str | Path) -> None:
        """Load the newest (``True``) or the given checkpoint: weights, optimiser,
        schedule, RNG states, step, best metric and history.

        Raises:
            RunFolderError: No complete checkpoint (a ``FileNotFoundError``).
            ResumeError: The checkpoint was written with another model/run config.
        """
        ckpt = (
            Path(resume) if not isinstance(resume, bool) else find_last_checkpoint(self.output_dir)
        )
        if ckpt is None or not (ckpt / STATE_FILE).is_file():
            raise RunFolderError(
                f"--resume: no complete checkpoint found under {self.output_dir / CHECKPOINTS}"
                if ckpt is None
                else f"--resume: {ckpt} is not a complete checkpoint (no {STATE_FILE})"
            )
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        _check_signature(state.get("signature", {}), self.signature, ckpt)
        self.accelerator.load_state(str(ckpt))
        self.step = self.resumed_from = int(state["step"])
        # Creating the data iterator draws from the global RNG (its worker base
        # seed). Mid-epoch, the uninterrupted run did that at the epoch start, before
        # the checkpoint: re-apply the restored states once the first batch is out. At
        # an epoch's end it does so after the checkpoint, as the resumed run will.
        mid_epoch = self.step % self.steps_per_epoch != 0
        self._restored_rng = _rng_states() if mid_epoch else None
        self.best_metric = state.get("best_metric")
        self.history = state.get("history", [])
        logger.info("resumed from %s (step %d of %d)", ckpt, self.step, self.total_steps)

    # ------------------------------------------------------------------ loop

    def run(self, resume: bool | str | Path = False, end_training: bool = True) -> TrainResult:
        """Set up, optionally resume, train to ``total_steps``, save, report."""
        self.setup()
        if resume:
            self.resume(resume)
        s, acc = self.settings, self.accelerator
        logger.info(
            "%s: %d examples, %d processes, batch %d/process × %d accumulation, "
            "%d steps (%d epochs)",
            self.desc,
            len(self.train_dataset),
            acc.num_processes,
            s.batch_size,
            s.gradient_accumulation_steps,
            self.total_steps,
            self.num_epochs,
        )
        self.progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.desc,
            unit="step",
            disable=not acc.is_local_main_process,
        )
        self.model.train()
        for epoch in range(self.step // self.steps_per_epoch, self.num_epochs):
            if self.step >= self.total_steps:
                break
            self._run_epoch(epoch)
            end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps
            if end_of_epoch:
                # Each at most once per step: the periodic one may just have run.
                if not _every(s.eval_every, self.step):
                    self._evaluate()
                if not _every(s.checkpoint_every, self.step):
                    self._checkpoint()
        self.progress.close()
        return self.finalize(end_training)

    def _run_epoch(self, epoch: int) -> None:
        """The epoch's batches (those a resumed run has not seen yet), step by step."""
        s, acc = self.settings, self.accelerator
        self.loader.set_epoch(epoch)
        if hasattr(self.train_dataset, "set_epoch"):  # e.g. the reader's per-epoch term worlds
            self.train_dataset.set_epoch(epoch)  # before the epoch's workers copy the dataset
        epoch_loader = self.loader
        skip = (self.step - epoch * self.steps_per_epoch) * s.gradient_accumulation_steps
        if skip > 0:
            epoch_loader = acc.skip_first_batches(self.loader, skip)
        running, count = 0.0, 0
        for batch in epoch_loader:
            batch = raise_carried(batch)
            if self._restored_rng is not None:
                _set_rng_states(self._restored_rng)
                self._restored_rng = None
            running += self._step(batch)
            count += 1
            if not acc.sync_gradients:
                continue
            self._after_optimizer_step(running / count)
            running, count = 0.0, 0
            if self.step >= self.total_steps:
                break

    def _step(self, batch: dict) -> float:
        """Forward, backward and (when gradients sync) clip + optimiser + schedule; the loss."""
        s, acc = self.settings, self.accelerator
        with acc.accumulate(self.model):
            loss = self.model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {self.step}; lower the learning rate"
                )
            acc.backward(loss)
            if acc.sync_gradients and s.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return loss.detach().float().item()

    def _after_optimizer_step(self, loss: float) -> None:
        """Count the step, log, then evaluate and checkpoint when they are due."""
        s = self.settings
        self.step += 1
        self.losses.append(loss)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        if s.log_every and self.step % s.log_every == 0:
            logger.debug("step %d loss %.4f", self.step, loss)
        if _every(s.eval_every, self.step):
            self._evaluate()
        if _every(s.checkpoint_every, self.step):
            self._checkpoint()

    def _evaluate(self) -> None:
        """Run ``hooks.evaluate``; record it; save ``best/`` when the metric improves."""
        hooks, acc = self.hooks, self.accelerator
        if hooks.evaluate is None:
            return
        self.model.eval()
        with torch.no_grad():
            metrics = hooks.evaluate(self.model, acc)
        self.model.train()
        self.history.append({"step": self.step, **metrics})
        if acc.is_main_process:
            logger.info("step %d eval: %s", self.step, _fmt(metrics))
        if hooks.metric is None:
            return
        if hooks.metric not in metrics:
            raise KeyError(f"evaluation returned no {hooks.metric!r} (got {sorted(metrics)})")
        value = float(metrics[hooks.metric])
        if hooks.improves(value, self.best_metric):
            self.best_metric = value
            _save_model(acc, self.model, self.best_dir, hooks.save_fn)

    def _checkpoint(self) -> None:
        state = {
            "step": self.step,
            "best_metric": self.best_metric,
            "history": self.history,
            "signature": self.signature,
            "settings": asdict(self.settings),
        }
        _save_checkpoint(
            self.accelerator, self.output_dir, self.step, state, self.settings.keep_checkpoints
        )

    # ------------------------------------------------------------------ end

    def finalize(self, end_training: bool = True) -> TrainResult:
        """Save ``final/``, write ``train_result.json`` (main process), return the result."""
        acc = self.accelerator
        final_dir = self.output_dir / FINAL
        _save_model(acc, self.model, final_dir, self.hooks.save_fn)
        result = TrainResult(
            output_dir=self.output_dir,
            steps=self.step,
            final_model_dir=final_dir,
            best_model_dir=self.best_dir if self.best_dir.is_dir() else None,
            best_metric=self.best_metric,
            history=self.history,
            losses=self.losses,
            num_processes=acc.num_processes,
            wall_time_s=time.time() - self.t0,
            resumed_from_step=self.resumed_from,
        )
        if acc.is_main_process:
            write_json_atomic(self.output_dir / RESULT_FILE, result.to_json(self.hooks.metric))
        acc.wait_for_everyone()
        if end_training:
            acc.end_training()
        return result


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
    hooks: TrainHooks | None = None,
) -> TrainResult:
    """Train ``model`` (which returns an output with ``.loss``) on ``train_dataset``.

    Builds a :class:`Trainer` and runs it.

    Args:
        model: A module whose forward takes the collated batch as keyword arguments.
        train_dataset: Map-style dataset; ``collate_fn`` turns a list of items into a batch.
        settings: Optimiser, schedule, precision, accumulation, checkpointing.
        output_dir: Receives ``checkpoints/step_N`` (resumable ``save_state``),
            ``final/``, ``train_result.json`` and, with ``evaluate`` and ``metric``, ``best/``.
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
        hooks: ``evaluate``, ``metric``, ``greater_is_better`` and ``save_fn`` as
            one object (instead of those four arguments, not with them).

    Raises:
        UsageError: ``hooks`` given together with any of the four arguments it holds.
        RunFolderError: ``resume`` without a complete checkpoint.
        ResumeError: The checkpoint was written with another model/run config.
    """
    loose = TrainHooks(evaluate, metric, greater_is_better, save_fn)
    if hooks is not None and loose != TrainHooks():
        raise UsageError(
            "train(): pass evaluate/metric/greater_is_better/save_fn or hooks, not both"
        )
    trainer = Trainer(
        model,
        train_dataset,
        collate_fn,
        settings,
        output_dir,
        hooks or loose,
        signature=signature,
        accelerator=accelerator,
        desc=desc,
    )
    return trainer.run(resume=resume, end_training=end_training)


def _every(period: int, step: int) -> bool:
    """Whether a ``period``-step event (0 = never) falls on ``step``."""
    return bool(period) and step % period == 0


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
