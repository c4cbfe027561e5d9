"""A VQAv2-sized dry run: the whole ``configs/coco_vqav2.yaml`` recipe with tiny towers.

Runs, each as its own ``python -m rvqa`` process (through ``torchrun`` or
``accelerate launch`` with ``--num-processes`` > 1) with cwd = the data root, so
the config's relative paths (``data/vqav2/...``, ``data/coco/...``) resolve:

1. ``train-retriever``   (launched on P processes)
2. ``evaluate-retriever`` (one process; Karpathy test split, protocol ``all``)
3. ``build-index``       (launched; COCO ``captions_train2014.json``, 5 captions an image)
4. ``train-reader``      (launched; retrieval for every train + val image, then training)
5. ``evaluate``          (one process; the first ``--eval-questions`` val questions)

on a synthetic data set in the official formats (``benchmarks/synthetic_data.py``,
generated under ``--data`` when missing), with the recipe's hub towers replaced
by tiny random-initialised ones of the same classes, saved as local folders: a
ViT (``ViTModel``, 2 layers, hidden 64, patch 32 on 224² images, PIL-backend
``ViTImageProcessorPil``) and a BERT (``BertModel``, 2 layers, hidden 64) with the
packaged MiniLM's (BERT uncased) tokenizer. Everything else is the recipe's,
except what bounds the run (``--set`` overrides, listed in the report): training
steps (``max_steps``), batch size, DataLoader workers, validation and evaluation
question counts, ``embed_dim`` 64, mixed precision (``no`` unless ``--bf16``)
and ``index.use_gpu`` (false unless ``--gpu-index``). What stays unbounded is what
the recipe does once per image or caption: the retriever's validation and test
splits, the index's encoding of every caption, the reader's retrieval pass over
every training and validation image.

Per stage it reports: wall time; throughput (training: examples/s =
steps × batch × accumulation × processes / the loop's ``wall_time_s`` from
``train_result.json``; ``build-index``: captions/s; evaluations: images or
questions/s over the stage's wall time); peak resident memory, sampled with
psutil every ``--interval`` s: of the largest rank process, and summed over the
whole process tree (launcher, ranks, DataLoader workers; RSS counts pages shared
by forked workers once per process, so the tree's PSS — proportional set size,
sampled every 5th tick — is given too); bytes added under the output folders; and
the ``rvqa placement:`` / ``rvqa cuda-peak:`` lines the commands log (``n/a`` when
absent). A markdown table and JSON go to ``WORK/report.md`` / ``WORK/report.json``.

Usage::

    python benchmarks/scale_dry_run.py --images 5000 --work /work/scale/run5000
    python benchmarks/scale_dry_run.py --images 80000 --data /work/scale/n80000 --work /work/scale/run80000
    python benchmarks/scale_dry_run.py --images 2000 --num-processes 2 --launcher accelerate --bf16 --gpu-index
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = REPO / "configs" / "coco_vqav2.yaml"
sys.path.insert(0, str(HERE))
import synthetic_data  # noqa: E402  (a sibling script; benchmarks/ is not a package)

STAGES = ("train-retriever", "evaluate-retriever", "build-index", "train-reader", "evaluate")
LAUNCHED = ("train-retriever", "build-index", "train-reader")
"""Stages run on ``--num-processes`` processes; the evaluations run on one."""

PLACEMENT_RE = re.compile(r"rvqa placement: stage=(\S+) rank=(\d+)/(\d+)((?:\s+[\w.\-]+=\S+)*)")
CUDA_PEAK_RE = re.compile(r"rvqa cuda-peak: stage=(\S+) rank=(\d+) bytes=(\d+)")
MiB = 1024**2


# --------------------------------------------------------------------------- log lines


def parse_placement(text: str) -> list[dict]:
    """The ``rvqa placement:`` lines of a log: ``[{stage, rank, world, components}]``.

    A line is ``rvqa placement: stage=<stage> rank=<r>/<n> <component>=<device> ...``
    (anywhere in a log line, after a logging prefix).
    """
    out = []
    for m in PLACEMENT_RE.finditer(text):
        components = dict(kv.split("=", 1) for kv in m.group(4).split())
        out.append(
            {
                "stage": m.group(1),
                "rank": int(m.group(2)),
                "world": int(m.group(3)),
                "components": components,
            }
        )
    return out


def parse_cuda_peak(text: str) -> list[dict]:
    """The ``rvqa cuda-peak: stage=<stage> rank=<r> bytes=<n>`` lines of a log."""
    return [
        {"stage": m.group(1), "rank": int(m.group(2)), "bytes": int(m.group(3))}
        for m in CUDA_PEAK_RE.finditer(text)
    ]


# --------------------------------------------------------------------------- memory sampling


@dataclass
class Usage:
    """Peaks over one stage's process tree."""

    peak_rss_rank: int = 0
    """The largest single rank process (a top-level ``rvqa`` process, not a DataLoader worker)."""
    peak_rss_tree: int = 0
    peak_pss_tree: int | None = None
    max_processes: int = 0
    gpu_used_peak: list[int] | None = None
    """nvidia-smi ``memory.used`` per GPU, bytes (all processes on the GPU)."""
    samples: int = 0


class TreeMonitor:
    """Samples RSS (and every 5th tick PSS) of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.2, gpus: bool = False):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.usage = Usage()
        self.gpus = gpus and shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self.sample(pss=tick % 5 == 0)
            if self.gpus and tick % 5 == 0:
                self._sample_gpus()
            tick += 1
            self._stop.wait(self.interval)

    def sample(self, pss: bool = False) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        u = self.usage
        total, total_pss, rank_rss = 0, 0, {}
        pids = {p.pid for p in procs}
        for p in procs:
            try:
                if pss:
                    info = p.memory_full_info()
                    total_pss += info.pss
                else:
                    info = p.memory_info()
                total += info.rss
                if _is_rank(p, pids):
                    rank_rss[p.pid] = info.rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        u.samples += 1
        u.max_processes = max(u.max_processes, len(procs))
        u.peak_rss_tree = max(u.peak_rss_tree, total)
        if rank_rss:
            u.peak_rss_rank = max(u.peak_rss_rank, *rank_rss.values())
        if pss:
            u.peak_pss_tree = max(u.peak_pss_tree or 0, total_pss)

    def _sample_gpus(self) -> None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            used = [int(x) * MiB for x in out.split()]
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return
        peak = self.usage.gpu_used_peak or [0] * len(used)
        self.usage.gpu_used_peak = [max(a, b) for a, b in zip(peak, used)]


LAUNCHERS = ("torch.distributed.run", "torchrun", "accelerate.commands.launch", "accelerate")


def _is_rvqa(p: psutil.Process) -> bool:
    """A process running rvqa itself (not a launcher whose arguments name it)."""
    cmd = p.cmdline()
    return "rvqa" in cmd and not any(Path(c).name in LAUNCHERS for c in cmd[: cmd.index("rvqa")])


def _is_rank(p: psutil.Process, pids: set[int]) -> bool:
    """An rvqa process whose parent is not one (DataLoader workers are forks of a rank)."""
    try:
        if not _is_rvqa(p):
            return False
        parent = p.ppid()
        return parent not in pids or not _is_rvqa(psutil.Process(parent))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def tree_bytes(paths: list[Path]) -> int:
    """Bytes of every file under ``paths`` (missing paths count 0)."""
    return sum(synthetic_data._tree_bytes(p) for p in paths if p.exists())


# --------------------------------------------------------------------------- towers


def make_towers(root: Path, hidden: int = 64, layers: int = 2) -> tuple[Path, Path]:
    """Tiny random ViT and BERT folders (``save_pretrained``), made once under ``root``."""
    import torch
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    try:  # transformers >= 5: the PIL backend, no torchvision needed
        from transformers import ViTImageProcessorPil as ViTProcessor
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers import ViTImageProcessor as ViTProcessor

    from rvqa.towers import load_tokenizer

    vit, bert = root / f"tiny-vit-h{hidden}-l{layers}", root / f"tiny-bert-h{hidden}-l{layers}"
    heads = max(1, hidden // 32)
    if not (vit / "config.json").is_file():
        torch.manual_seed(0)
        cfg = ViTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=2 * hidden,
            image_size=224,
            patch_size=32,
        )
        tmp = vit.with_name(vit.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ViTModel(cfg, add_pooling_layer=True).save_pretrained(tmp)
        ViTProcessor(size={"height": 224, "width": 224}).save_pretrained(tmp)
        os.replace(tmp, vit)
    if not (bert / "config.json").is_file():
        torch.manual_seed(0)
        tok = load_tokenizer("minilm")  # the packaged all-MiniLM-L6-v2: a BERT uncased vocab
        cfg = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=2 * hidden,
        )
        tmp = bert.with_name(bert.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        BertModel(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, bert)
    return vit, bert


# --------------------------------------------------------------------------- stages


@dataclass
class StageResult:
    stage: str
    command: list[str]
    rc: int
    wall_s: float
    usage: Usage
    disk_bytes: int
    throughput: float | None = None
    unit: str = ""
    detail: dict = field(default_factory=dict)
    placement: list[dict] = field(default_factory=list)
    cuda_peak: list[dict] = field(default_factory=list)
    log: str = ""


def overrides(args: argparse.Namespace, work: Path, vit: Path, bert: Path) -> list[str]:
    """The ``--set`` overrides that bound the recipe (the rest is ``coco_vqav2.yaml``)."""
    precision = "bf16" if args.bf16 else '"no"'  # quoted: YAML reads a bare no as false
    sets = [
        f"output_dir={work / 'run'}",
        f"index.path={work / 'indices' / 'coco-captions'}",
        f"index.use_gpu={'true' if args.gpu_index else 'false'}",
        f"data.max_eval_questions={args.eval_questions}",
    ]
    for section in ("retriever", "reader"):
        sets += [
            f"{section}.vision_backbone={vit}",
            f"{section}.text_backbone={bert}",
            f"{section}.max_steps={args.steps}",
            f"{section}.batch_size={args.batch_size}",
            f"{section}.num_workers={args.num_workers}",
            f"{section}.mixed_precision={precision}",
        ]
    sets += ["retriever.embed_dim=64", f"reader.max_eval_questions={args.eval_questions}"]
    return sets + list(args.set)


def launch_prefix(args: argparse.Namespace, stage: str) -> list[str]:
    """How a stage's ``-m rvqa`` is started: plain, torchrun or accelerate launch."""
    py = sys.executable
    if stage not in LAUNCHED or args.num_processes == 1:
        return [py]
    n = str(args.num_processes)
    if args.launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n]
    return [py, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", n]


def stage_command(args: argparse.Namespace, stage: str, work: Path, sets: list[str]) -> list[str]:
    base = [*launch_prefix(args, stage), "-m", "rvqa", stage, "--config", str(CONFIG)]
    base += [x for s in sets for x in ("--set", s)]
    if stage == "evaluate-retriever":
        chosen = json.loads((work / "run" / "retriever" / "metrics.json").read_text())
        base += ["--model", chosen["model_dir"], "--out", str(work / "eval-retriever"), "--json"]
    elif stage == "build-index":
        base += ["--overwrite"]
    elif stage == "evaluate":
        # `rvqa evaluate` reads the run's resolved config; --config/--set apply on top
        base += [
            "--model",
            str(work / "run"),
            "--split",
            "val",
            "--max-questions",
            str(args.eval_questions),
            "--out",
            str(work / "eval"),
        ]
    return base


def run_stage(
    args: argparse.Namespace, stage: str, work: Path, data: Path, sets: list[str], env: dict
) -> StageResult:
    cmd = stage_command(args, stage, work, sets)
    outputs = [work / "run", work / "indices", work / "eval-retriever", work / "eval"]
    before = tree_bytes(outputs)
    log_path = work / "logs" / f"{stage}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT)
        with TreeMonitor(proc.pid, args.interval, gpus=args.gpu_monitor) as mon:
            rc = proc.wait()
            mon.sample()
    wall = time.perf_counter() - t0
    text = log_path.read_text(encoding="utf-8", errors="replace")
    res = StageResult(
        stage=stage,
        command=cmd,
        rc=rc,
        wall_s=round(wall, 2),
        usage=mon.usage,
        disk_bytes=tree_bytes(outputs) - before,
        placement=parse_placement(text),
        cuda_peak=parse_cuda_peak(text),
        log=str(log_path),
    )
    if rc == 0:
        _throughput(res, work, data, text)
    return res


def _throughput(res: StageResult, work: Path, data: Path, text: str) -> None:
    manifest = synthetic_data.read_manifest(data) or {}
    if res.stage in ("train-retriever", "train-reader"):
        folder = work / "run" / res.stage.split("-")[1]
        result = json.loads((folder / "train_result.json").read_text())
        settings = yaml.safe_load((folder / "config.yaml").read_text())[res.stage.split("-")[1]]
        examples = (
            result["steps"]
            * settings["batch_size"]
            * settings["gradient_accumulation_steps"]
            * result["num_processes"]
        )
        res.throughput = examples / max(result["wall_time_s"], 1e-9)
        res.unit = "train examples/s"
        res.detail = {
            "steps": result["steps"],
            "examples": examples,
            "loop_s": result["wall_time_s"],
            "final_loss": result["final_loss"],
            "best_metric": result["best_metric"],
        }
    elif res.stage == "evaluate-retriever":
        n = manifest.get("karpathy_splits", {}).get("test")
        metrics = json.loads((work / "eval-retriever" / "metrics.json").read_text())
        res.detail = {"test_images": n, "rsum": metrics.get("rsum")}
        if n:
            res.throughput, res.unit = n / res.wall_s, "test images/s"
    elif res.stage == "build-index":
        m = json.loads((work / "indices" / "coco-captions" / "manifest.json").read_text())
        res.throughput, res.unit = m["count"] / res.wall_s, "captions/s"
        res.detail = {"captions": m["count"], "factory": m.get("factory")}
    elif res.stage == "evaluate":
        m = re.search(r"VQA accuracy ([\d.]+) .* on (\d+) questions", text)
        if m:
            res.throughput, res.unit = int(m.group(2)) / res.wall_s, "questions/s"
            res.detail = {"questions": int(m.group(2)), "vqa_accuracy": float(m.group(1))}


# --------------------------------------------------------------------------- report


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / MiB:,.0f}"


def placement_summary(lines: list[dict]) -> str:
    """``retriever=cuda:0,cuda:1 index=faiss-gpu`` (the devices each component was on)."""
    if not lines:
        return "n/a"
    seen: dict[str, list[str]] = {}
    for line in lines:
        for comp, dev in line["components"].items():
            if dev not in seen.setdefault(comp, []):
                seen[comp].append(dev)
    ranks = sorted({line["rank"] for line in lines})
    return " ".join(f"{c}={','.join(d)}" for c, d in seen.items()) + f" (ranks {ranks})"


def markdown(report: dict) -> str:
    h = report["header"]
    lines = [
        f"N = {h['images']:,} train images ({h['val_images']:,} val), "
        f"{h['num_processes']} process(es) ({h['launcher']}), precision {h['precision']}, "
        f"index.use_gpu {h['gpu_index']}; {h['date']}, commit {h['commit']}, "
        f"{h['cpus']} CPUs, {h['device']}",
        "",
        "| stage | wall s | throughput | peak RSS, largest rank (MiB) | peak RSS, tree (MiB) "
        "| peak PSS, tree (MiB) | procs | disk written (MB) | placement | CUDA peak (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in report["stages"]:
        u = s["usage"]
        tp = f"{s['throughput']:,.1f} {s['unit']}" if s["throughput"] is not None else "n/a"
        if s["rc"] != 0:
            tp = f"FAILED (rc {s['rc']})"
        cuda = max((c["bytes"] for c in s["cuda_peak"]), default=None)
        lines.append(
            f"| {s['stage']} | {s['wall_s']:,.1f} | {tp} | {_mib(u['peak_rss_rank'])} "
            f"| {_mib(u['peak_rss_tree'])} | {_mib(u['peak_pss_tree'])} | {u['max_processes']} "
            f"| {s['disk_bytes'] / 1e6:,.1f} | {placement_summary(s['placement'])} | {_mib(cuda)} |"
        )
    lines += ["", "Overrides: `" + " ".join(h["overrides_short"]) + "`"]
    return "\n".join(lines)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, required=True, help="train2014 images (N)")
    ap.add_argument("--val-images", type=int, default=None, help="default max(N // 10, 50)")
    ap.add_argument("--work", default=None, help="output folder (default benchmarks/_work/scale-N)")
    ap.add_argument(
        "--data", default=None, help="data root (default WORK/data; generated when missing)"
    )
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--launcher", choices=["torchrun", "accelerate"], default="torchrun")
    ap.add_argument("--bf16", action="store_true", help="mixed_precision bf16 (default: no)")
    ap.add_argument("--gpu-index", action="store_true", help="index.use_gpu=true")
    ap.add_argument("--steps", type=int, default=20, help="max_steps of both trainings")
    ap.add_argument("--batch-size", type=int, default=32, help="per process, both trainings")
    ap.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    ap.add_argument(
        "--eval-questions",
        type=int,
        default=500,
        help="reader validation and `rvqa evaluate` questions",
    )
    ap.add_argument("--tower-hidden", type=int, default=64)
    ap.add_argument("--tower-layers", type=int, default=2)
    ap.add_argument("--gen-workers", type=int, default=2, help="processes generating the data")
    ap.add_argument(
        "--stages", default=",".join(STAGES), help="comma-separated subset, in recipe order"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides"
    )
    ap.add_argument("--interval", type=float, default=0.2, help="memory sampling period, s")
    ap.add_argument("--gpu-monitor", action="store_true", help="also sample nvidia-smi memory.used")
    ap.add_argument("--fresh", action="store_true", help="delete WORK's previous outputs first")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or args.num_processes < 1 or args.images < 1:
        raise SystemExit(
            f"bad arguments: unknown stage(s) {unknown} (known {', '.join(STAGES)}), "
            f"--num-processes {args.num_processes}, --images {args.images}"
        )
    work = Path(args.work or HERE / "_work" / f"scale-{args.images}").resolve()
    data = Path(args.data).resolve() if args.data else work / "data"
    if args.fresh:
        for sub in ("run", "indices", "eval-retriever", "eval", "logs"):
            shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    manifest = synthetic_data.read_manifest(data)
    params = manifest and manifest["params"]
    val_images = args.val_images if args.val_images is not None else max(args.images // 10, 50)
    generated = None
    if (
        not params
        or manifest.get("format_version") != synthetic_data.FORMAT_VERSION
        or (params["images"], params["val_images"]) != (args.images, val_images)
    ):
        print(f"generating {args.images} + {val_images} images under {data} ...", flush=True)
        manifest = synthetic_data.generate(data, args.images, val_images, workers=args.gen_workers)
        generated = {"seconds": manifest["seconds"], "images_per_s": manifest["images_per_s"]}
        print(f"generated in {manifest['seconds']:.1f} s", flush=True)
    vit, bert = make_towers(work / "towers", args.tower_hidden, args.tower_layers)
    sets = overrides(args, work, vit, bert)

    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TQDM_MININTERVAL", "5")
    if cuda == 0 and args.num_processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"  # gloo on CPU (README: "Several CPU processes")

    header = {
        "images": args.images,
        "val_images": val_images,
        "num_processes": args.num_processes,
        "launcher": args.launcher if args.num_processes > 1 else "none",
        "precision": "bf16" if args.bf16 else "no",
        "gpu_index": args.gpu_index,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "commit": _commit(),
        "cpus": os.cpu_count(),
        "device": f"{cuda} CUDA GPU(s)" if cuda else "no GPU",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "data": str(data),
        "data_manifest": manifest,
        "generated_now": generated,
        "overrides": sets,
        "overrides_short": [s for s in sets if not s.startswith(("output_dir", "index.path"))],
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    header["overrides_short"] = [
        re.sub(r"=/\S*/(tiny-\S+)$", r"=\1", s) for s in header["overrides_short"]
    ]
    report = {"header": header, "stages": []}
    ok = True
    for stage in stages:
        print(f"[{stage}] ...", flush=True)
        res = run_stage(args, stage, work, data, sets, env)
        d = asdict(res)
        report["stages"].append(d)
        tp = f"{res.throughput:,.1f} {res.unit}" if res.throughput is not None else "n/a"
        print(
            f"[{stage}] rc {res.rc}, {res.wall_s:.1f} s, {tp}, peak RSS rank "
            f"{_mib(res.usage.peak_rss_rank)} MiB / tree {_mib(res.usage.peak_rss_tree)} MiB, "
            f"disk {res.disk_bytes / 1e6:.1f} MB",
            flush=True,
        )
        _write_report(work, report)
        if res.rc != 0:
            tail = Path(res.log).read_text(encoding="utf-8", errors="replace")[-3000:]
            print(f"[{stage}] FAILED; log {res.log}:\n{tail}", file=sys.stderr, flush=True)
            ok = False
            break
    print(markdown(report))
    return 0 if ok else 1


def _write_report(work: Path, report: dict) -> None:
    (work / "report.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (work / "report.md").write_text(markdown(report) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
