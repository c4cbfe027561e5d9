"""One-command GPU smoke test: the dry run on every GPU, and a check that nothing ran on CPU.

For a machine with one or more GPUs where the README's install was done (CUDA
torch; ``faiss-gpu-cu12`` for ``index.use_gpu``); installs nothing. It counts
the GPUs (``torch.cuda.device_count()``, and ``nvidia-smi -L`` for the record),
runs ``benchmarks/scale_dry_run.py`` at a small N (default 2,000 train images)
with ``--num-processes`` = the GPUs (``accelerate launch --multi_gpu`` when more
than one), ``bf16`` and ``index.use_gpu=true``, and prints for every stage the
``rvqa placement:`` lines (the device of each model and the index), the GPU
memory peak (``rvqa cuda-peak:`` lines, and nvidia-smi's ``memory.used``) and
the throughput.

It exits 1 when a stage failed, when a stage logged no placement line, when a
launched stage lacks a rank's line, or when a line shows a model on ``cpu`` or an
index on ``faiss-cpu`` while GPUs exist; 2 when no GPU is found; 0 otherwise. About
3-5 minutes on one modern GPU (bounded: ``--timeout``, default 540 s).

The check alone, on CPU (what the tests run), reads recorded logs:
``--check-logs DIR`` (a dry run's ``WORK/logs``: one ``<stage>.log`` per stage),
with ``--expect-device cuda|cpu`` and ``--num-processes``.

Usage::

    python benchmarks/gpu_smoke.py                        # on the GPU machine
    python benchmarks/gpu_smoke.py --check-logs WORK/logs --expect-device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scale_dry_run import (  # noqa: E402  (a sibling script; benchmarks/ is not a package)
    LAUNCHED,
    STAGES,
    parse_cuda_peak,
    parse_placement,
)

NOT_APPLICABLE = {"none", "n/a", "-"}


def check_stage(stage: str, text: str, expect: str, num_processes: int) -> list[str]:
    """What is wrong with one stage's placement lines (an empty list: nothing).

    Args:
        stage: The stage (``train-reader``, ...).
        text: Its log.
        expect: ``"cuda"`` (models on ``cuda[:i]``, a searched index on ``faiss-gpu``;
            ``build-index`` writes its index with CPU faiss, so ``faiss-cpu`` there) or
            ``"cpu"`` (models on ``cpu``, the index on ``faiss-cpu``).
        num_processes: Processes of a launched stage (the evaluations run on one).
    """
    lines = parse_placement(text)
    if not lines:
        return [f"{stage}: no 'rvqa placement:' line in its log"]
    problems = []
    world = num_processes if stage in LAUNCHED else 1
    worlds = sorted({line["world"] for line in lines})
    if worlds != [world]:
        problems.append(f"{stage}: placement lines name {worlds} processes, expected {world}")
    missing = sorted(set(range(world)) - {line["rank"] for line in lines})
    if missing:
        problems.append(f"{stage}: no placement line from rank(s) {missing}")
    for line in lines:
        for comp, dev in line["components"].items():
            if dev.lower() in NOT_APPLICABLE:
                continue
            where = f"{stage}: rank {line['rank']}: {comp}={dev}"
            if dev.startswith("faiss-"):
                # build-index builds and writes the index with CPU faiss (GPUs encode the
                # captions); every stage that searches an index searches it on the GPUs.
                gpu_index = expect == "cuda" and stage != "build-index"
                want = "faiss-gpu" if gpu_index else "faiss-cpu"
                if dev != want:
                    problems.append(f"{where}, expected {want}")
            elif expect == "cuda" and not (dev == "cuda" or dev.startswith("cuda:")):
                problems.append(f"{where}, expected a GPU (cuda)")
            elif expect == "cpu" and dev != "cpu":
                problems.append(f"{where}, expected cpu")
    return problems


def check_logs(
    logs: dict[str, str], expect: str, num_processes: int, rcs: dict[str, int] | None = None
) -> list[str]:
    """Problems over every stage of the recipe (a stage without a log is a problem)."""
    problems = []
    for stage in STAGES:
        if stage not in logs:
            problems.append(f"{stage}: did not run (no log)")
            continue
        rc = (rcs or {}).get(stage, 0)
        if rc != 0:
            problems.append(f"{stage}: exited with {rc}")
        problems += check_stage(stage, logs[stage], expect, num_processes)
    return problems


def read_logs(folder: Path) -> dict[str, str]:
    """``<stage>.log`` files of a dry run's ``logs/`` folder, by stage."""
    return {
        s: (folder / f"{s}.log").read_text(encoding="utf-8", errors="replace")
        for s in STAGES
        if (folder / f"{s}.log").is_file()
    }


def print_stages(logs: dict[str, str], report: dict | None) -> None:
    """Per stage: placement lines, GPU memory peaks and throughput."""
    by_stage = {s["stage"]: s for s in (report or {}).get("stages", [])}
    for stage in STAGES:
        print(f"== {stage}")
        text = logs.get(stage, "")
        for line in parse_placement(text):
            comps = " ".join(f"{k}={v}" for k, v in line["components"].items())
            print(f"   placement rank {line['rank']}/{line['world']}: {comps}")
        peaks = parse_cuda_peak(text)
        if peaks:
            for p in peaks:
                print(f"   cuda peak rank {p['rank']}: {p['bytes'] / 2**20:,.0f} MiB")
        else:
            print("   cuda peak: n/a (no 'rvqa cuda-peak:' line)")
        s = by_stage.get(stage)
        if s is not None:
            used = s["usage"].get("gpu_used_peak")
            if used:
                print(
                    "   nvidia-smi memory.used peak: "
                    + ", ".join(f"{u / 2**20:,.0f} MiB" for u in used)
                )
            tp = f"{s['throughput']:,.1f} {s['unit']}" if s.get("throughput") else "n/a"
            print(f"   wall {s['wall_s']:.1f} s, throughput {tp}")


def count_gpus() -> int:
    """GPUs torch sees (nvidia-smi's list is printed for the record)."""
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        print(out.strip() or "nvidia-smi -L: no GPU listed")
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=2000, help="train images of the dry run")
    ap.add_argument(
        "--work", default=None, help="dry-run folder (default benchmarks/_work/gpu-smoke)"
    )
    ap.add_argument(
        "--check-logs",
        metavar="DIR",
        help="only check recorded stage logs (<stage>.log in DIR); run nothing",
    )
    ap.add_argument(
        "--expect-device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="where models and the index must be (cpu: models on cpu, index on faiss-cpu)",
    )
    ap.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="processes of the launched stages (default: the GPUs found; 1 with --check-logs)",
    )
    ap.add_argument("--timeout", type=int, default=540, help="seconds for the whole dry run")
    args = ap.parse_args(argv)

    if args.check_logs:
        folder = Path(args.check_logs)
        report_path = folder.parent / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        rcs = {s["stage"]: s["rc"] for s in (report or {}).get("stages", [])}
        logs = read_logs(folder)
        nproc = args.num_processes or 1
    else:
        gpus = count_gpus()
        print(f"GPUs found by torch: {gpus}")
        if gpus == 0 and args.expect_device == "cuda":
            print("gpu_smoke: no GPU found (torch.cuda.device_count() is 0)", file=sys.stderr)
            return 2
        nproc = args.num_processes or max(gpus, 1)
        work = Path(args.work or HERE / "_work" / "gpu-smoke").resolve()
        cmd = [
            sys.executable,
            str(HERE / "scale_dry_run.py"),
            "--images",
            str(args.images),
            "--work",
            str(work),
            "--fresh",
            "--num-processes",
            str(nproc),
            "--launcher",
            "accelerate",
            "--gen-workers",
            str(min(8, os.cpu_count() or 2)),
        ]
        if args.expect_device == "cuda":
            cmd += ["--bf16", "--gpu-index", "--gpu-monitor"]
        print("running: " + " ".join(cmd), flush=True)
        try:
            rc = subprocess.run(cmd, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            print(f"gpu_smoke: the dry run took over {args.timeout} s", file=sys.stderr)
            rc = 124
        report_path = work / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        rcs = {s["stage"]: s["rc"] for s in (report or {}).get("stages", [])}
        logs = read_logs(work / "logs")
        if rc != 0 and not rcs:
            print(f"gpu_smoke: the dry run failed (exit {rc}) before any stage", file=sys.stderr)
            return 1

    print_stages(logs, report)
    problems = check_logs(logs, args.expect_device, nproc, rcs)
    if problems:
        print(f"\ngpu_smoke: FAILED ({len(problems)} problem(s)):", file=sys.stderr)
        for p in problems:
            print("  - " + p, file=sys.stderr)
        return 1
    print(f"\ngpu_smoke: OK — every stage placed on {args.expect_device} ({nproc} process(es))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
