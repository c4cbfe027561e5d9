"""Process-level helpers for runs started by ``torchrun`` / ``accelerate launch``.

One sharding strategy everywhere: contiguous shards in rank order
(:func:`shard_bounds`), so gathering them back is a concatenation in rank order
and a several-process run yields exactly the rows of a one-process run.

Placement: :func:`run_device` is the device a command's models live on (the
``Accelerator``'s, else CUDA when available); :func:`log_placement` and
:func:`log_cuda_peak` write the two machine-readable lines every CLI command
emits on every process (``benchmarks/`` parses them)::

    rvqa placement: stage=build-index rank=0/2 retriever=cuda:0 index.coco=faiss-cpu
    rvqa cuda-peak: stage=build-index rank=0 bytes=123456789
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "bf16_supported",
    "device_name",
    "is_distributed_launch",
    "is_main_process",
    "log_cuda_peak",
    "log_placement",
    "placement_line",
    "process_rank",
    "run_device",
    "shard_bounds",
    "sharded_map",
]

placement_logger = logging.getLogger("rvqa.placement")
"""The logger of the placement and CUDA-peak lines (INFO); the CLI keeps it at INFO
while it quiets other loading chatter (``-q`` hides it)."""


def is_distributed_launch() -> bool:
    """True when started by torchrun / accelerate launch with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """True on the global rank-0 process (and in a plain, single-process run)."""
    return os.environ.get("RANK", "0") == "0"


def shard_bounds(n: int, num_shards: int, rank: int) -> tuple[int, int]:
    """Contiguous ``[lo, hi)`` of shard ``rank`` when ``n`` items are split ``num_shards`` ways."""
    return n * rank // num_shards, n * (rank + 1) // num_shards


def sharded_map(
    fn: Callable[[list], np.ndarray], items: Sequence[Any], accelerator: Any = None
) -> np.ndarray:
    """Apply ``fn`` (a list of items → an (n, d) array) to this process's shard of
    ``items`` and gather every process's rows, in item order, on every process."""
    items = list(items)
    if accelerator is None or accelerator.num_processes == 1:
        return fn(items)
    from accelerate.utils import gather_object

    lo, hi = shard_bounds(len(items), accelerator.num_processes, accelerator.process_index)
    part = fn(items[lo:hi]) if hi > lo else None
    gathered = gather_object([(lo, part)])
    parts = sorted((start, rows) for start, rows in gathered if rows is not None)
    if not parts:
        raise ValueError("sharded_map: no items to map")
    out = np.concatenate([rows for _, rows in parts], axis=0)
    if len(out) != len(items):
        raise RuntimeError(f"sharded_map gathered {len(out)} rows for {len(items)} items")
    return out


def process_rank(accelerator: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` of this process: the accelerator's, else the launcher's env."""
    if accelerator is not None:
        return int(accelerator.process_index), int(accelerator.num_processes)
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_device(accelerator: Any = None, device: Any = None) -> Any:
    """The device a command's models live on.

    ``device`` when given, else the accelerator's (``accelerator.device``: the
    process's GPU under ``accelerate launch``, the CPU with ``ACCELERATE_USE_CPU``),
    else CUDA when torch sees it, else the CPU — what ``Accelerator()`` picks in a
    single process, so commands with and without an accelerator agree.
    """
    import torch  # layer 2 may use torch; imported here so shard_bounds users need none

    if device is not None:
        return torch.device(device)
    if accelerator is not None:
        return accelerator.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: Any = None) -> bool:
    """Whether ``device`` (default: CUDA when available, else CPU) runs bfloat16 natively:
    a GPU with bf16 units (not emulated), or a CPU with AVX512-BF16 or AMX (x86 where Linux
    lists the CPU's flags; elsewhere oneDNN's own check, which on x86 accepts any AVX512
    CPU)."""
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(dev.index if dev.index is not None else torch.cuda.current_device()):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):  # a torch without the check: play safe
        return False
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # e.g. Arm with bf16: oneDNN's word
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8").split()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_name(component: Any) -> str:
    """What a placement line says about ``component``.

    A torch module → the device of its parameters (``cpu``, ``cuda:0``; ``mixed`` when
    they straddle devices); a knowledge index (has ``on_gpu``) → ``faiss-gpu`` /
    ``faiss-cpu``; a ``torch.device`` or string → itself.
    """
    if hasattr(component, "on_gpu"):
        return "faiss-gpu" if component.on_gpu else "faiss-cpu"
    params = getattr(component, "parameters", None)
    if callable(params):
        devices = {str(p.device) for p in params()} | {str(b.device) for b in component.buffers()}
        if not devices:
            return "none"
        return devices.pop() if len(devices) == 1 else "mixed"
    return str(component)


def placement_line(stage: str, rank: int, world: int, components: dict[str, Any]) -> str:
    """``rvqa placement: stage=STAGE rank=R/N name=device ...`` (see :func:`device_name`)."""
    parts = " ".join(f"{name}={device_name(c)}" for name, c in components.items())
    return f"rvqa placement: stage={stage} rank={rank}/{world} {parts}".rstrip()


def log_placement(stage: str, accelerator: Any = None, **components: Any) -> str:
    """Log (INFO, every process) where ``components`` live; returns the line.

    Args:
        stage: The CLI command (``build-index``, ``train-reader``, ...).
        accelerator: The run's accelerator (its rank and world size), else the env's.
        **components: name → module, knowledge index, device or string; names with
            dots are kept (``index.coco``).
    """
    rank, world = process_rank(accelerator)
    line = placement_line(stage, rank, world, components)
    placement_logger.info("%s", line)
    return line


def log_cuda_peak(stage: str) -> str | None:
    """Log ``rvqa cuda-peak: stage=STAGE rank=R bytes=B`` (INFO) when torch sees CUDA.

    ``B`` is ``torch.cuda.max_memory_allocated()`` of this process's current device.
    Returns the line (None without CUDA).
    """
    import torch

    if not torch.cuda.is_available():
        return None
    rank, _ = process_rank()
    line = f"rvqa cuda-peak: stage={stage} rank={rank} bytes={torch.cuda.max_memory_allocated()}"
    placement_logger.info("%s", line)
    return line
