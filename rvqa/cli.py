"""The ``rvqa`` console script: subcommands that parse arguments and call plain functions.

Each subcommand is a parser (``_*_args``) and a small function (``_cmd_*``) that
calls what a Python user would call (``train_retriever``, ``build_index_from_config``,
``RVQA``, ``evaluate_split``, ...) and prints the result.

Errors: an :class:`rvqa.errors.RVQAError` (something the user got wrong) or an
``OSError`` of the path kind (missing, existing, not a folder, not permitted)
prints one line, ``rvqa COMMAND: error: ...``, and exits 1; ``--debug`` shows its
traceback. Any other exception is a bug in rvqa: its traceback is shown.

The command functions import their modules inside the function, on purpose:
``rvqa --help`` and building the parser must not import torch, transformers or
faiss (seconds), only the subcommand that runs loads what it needs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import traceback
from collections.abc import Callable
from typing import NamedTuple

from rvqa.config import RunConfig, config_to_dict, load_config
from rvqa.distributed import is_main_process
from rvqa.errors import RVQAError, UsageError
from rvqa.version import __version__

logger = logging.getLogger("rvqa")

ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (
    RVQAError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
"""Exceptions printed in one line: the user gave something wrong. Anything else is a bug."""


# --------------------------------------------------------------------------- shared arguments


def _add_config_args(
    p: argparse.ArgumentParser, default: str = "the defaults: easy-vqa on CPU"
) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help=f"run config (default: {default})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set reader.learning_rate=1e-4 (repeatable)",
    )


def _add_search_args(p: argparse.ArgumentParser, from_config: bool) -> None:
    def default(key: str) -> str:
        built = "the value tuned when the index was built"
        return f"the config's index.{key}, else {built}" if from_config else built

    p.add_argument(
        "--nprobe",
        type=int,
        default=None,
        help=f"IVF indices: inverted lists probed per query (default: {default('nprobe')})",
    )
    p.add_argument(
        "--ef-search",
        type=int,
        default=None,
        help=f"HNSW indices: efSearch, the search's candidate list (default: {default('ef_search')})",
    )


def _add_skip_bad_images(p: argparse.ArgumentParser, key: str) -> None:
    """``--skip-bad-images``: a shortcut for ``--set KEY.skip_bad_images=true``."""
    p.add_argument(
        "--skip-bad-images",
        dest="overrides",
        action="append_const",
        const=f"{key}.skip_bad_images=true",
        help=f"decode every image once up front and drop the records whose image cannot be "
        f"read, logging how many and which (sets {key}.skip_bad_images; default: the first "
        f"unreadable image stops the run, naming the file)",
    )


def _add_gpu_index_arg(p: argparse.ArgumentParser, config: bool) -> None:
    default = " (default: the config's index.use_gpu)" if config else ""
    p.add_argument(
        "--gpu-index",
        action="store_true",
        default=None,
        help="search the knowledge index on GPU: sharded over the GPUs faiss sees (one "
        f"process's own GPU in a multi-process run); CPU with a warning without them{default}",
    )


def _load_cfg(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "output_dir", None):
        cfg.output_dir = args.output_dir
    if getattr(args, "gpu_index", None):
        cfg.index.use_gpu = True
    return cfg


def _print_main(msg: str) -> None:
    """Print on the main process only (several may run under torchrun/accelerate)."""
    if is_main_process():
        print(msg)


# --------------------------------------------------------------------------- config


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = _load_cfg(args)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


# --------------------------------------------------------------------------- knowledge task


def _make_knowledge_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="the task folder to write, e.g. data/knowledge")
    p.add_argument(
        "--train-assignment",
        type=int,
        default=0,
        metavar="A",
        help="assignment of the training answers, the test split and facts/A.jsonl (default 0)",
    )
    p.add_argument(
        "--swap-assignment",
        type=int,
        default=1,
        metavar="B",
        help="assignment of the test_B answers and facts/B.jsonl; not A (default 1)",
    )
    p.add_argument(
        "--augment-assignments",
        type=int,
        default=40,
        metavar="N",
        help="assignments for retriever captions and worlds.json: the first N that are "
        "neither A nor B (default 40)",
    )
    p.add_argument(
        "--max-train-images", type=int, default=None, metavar="N", help="first N train images"
    )
    p.add_argument(
        "--max-test-images", type=int, default=None, metavar="N", help="first N test images"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the shuffled control and of the retriever captions' assignments",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing task folder")


def _cmd_make_knowledge_task(args: argparse.Namespace) -> int:
    import os
    import shlex

    from rvqa.data.knowledge import make_knowledge_task

    m = make_knowledge_task(
        args.out,
        train_assignment=args.train_assignment,
        swap_assignment=args.swap_assignment,
        augment_assignments=args.augment_assignments,
        max_train_images=args.max_train_images,
        max_test_images=args.max_test_images,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    out = os.path.abspath(args.out)
    print(
        f"wrote the knowledge task to {out} (A={m['train_assignment']}, "
        f"B={m['swap_assignment']}, {len(m['augment_assignments'])} augmentation assignments)"
    )
    for split, info in m["splits"].items():
        print(
            f"  {split:<7} {info['num_images']:>5} images  {info['num_questions']:>6} questions  "
            f"(answers of assignment {info['assignment']})"
        )
    skipped = ", ".join(f"{k} {v}" for k, v in m["skipped_images"].items())
    print(f"  skipped images (colour or shape unknown): {skipped}")
    print(
        f"  facts: A {m['num_facts']['A']}, B {m['num_facts']['B']}, A-shuffled "
        f"{m['num_facts']['A-shuffled']}; retriever captions {m['num_retriever_captions']}"
    )
    chance = "  ".join(f"{k} {100 * v:.2f}" for k, v in m["chance_accuracy"].items())
    print(f"  chance accuracy (%): {chance}")
    cfg = shlex.quote(os.path.join(out, "knowledge.yaml"))

    def index(label: str, name: str) -> str:
        path = shlex.quote(os.path.join(out, "facts", f"{label}.jsonl"))
        return (
            f"rvqa build-index --config {cfg} --set index.captions.source=jsonl "
            f"--set index.captions.path={path} --out indices/{name}"
        )

    print("next:")
    for line in (
        f"rvqa train-retriever --config {cfg}",
        index("A", "knowledge-A"),
        index("B", "knowledge-B"),
        index("A-shuffled", "knowledge-A-shuffled"),
        f"rvqa train-reader --config {cfg}",
        "rvqa evaluate --model runs/knowledge --split test --compare "
        "--index knowledge-A --index indices/knowledge-A-shuffled --out runs/knowledge/eval-A",
        "rvqa evaluate --model runs/knowledge --split test_B --index indices/knowledge-B "
        "--out runs/knowledge/eval-B",
    ):
        print(f"  {line}")
    return 0


# --------------------------------------------------------------------------- training


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--output-dir", help="override the config's output_dir")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in the output folder (or the one given)",
    )


def _train_retriever_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    _add_skip_bad_images(p, "retriever.captions")


def _train_reader_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    _add_skip_bad_images(p, "data")
    _add_gpu_index_arg(p, config=True)  # the retrieval pass searches the index


def _cmd_train_retriever(args: argparse.Namespace) -> int:
    from rvqa.retriever.train import train_retriever

    out = train_retriever(_load_cfg(args), resume=args.resume)
    _print_main(f"retriever saved to {out['model_dir']}")
    if out["test"]:
        _print_main("test " + _recall_line(out["test"]))
    return 0


def _train_reranker_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    _add_skip_bad_images(p, "retriever.captions")


def _cmd_train_reranker(args: argparse.Namespace) -> int:
    from rvqa.retriever.rerank_train import train_reranker

    cfg = _load_cfg(args)
    if cfg.reranker.captions is not None and "retriever.captions.skip_bad_images=true" in (
        args.overrides or []
    ):  # --skip-bad-images applies to the captions the re-ranker trains on
        cfg.reranker.captions.skip_bad_images = True
    out = train_reranker(cfg, resume=args.resume)
    _print_main(f"re-ranker saved to {out['model_dir']}")
    for name in ("val", "test"):
        t = out[name]
        if t:
            _print_main(
                f"{name} image→text recall@1/5/10 over the top {int(t['top_n'])}: dual encoder "
                f"{t['dual_r1']:.1f} / {t['dual_r5']:.1f} / {t['dual_r10']:.1f}, re-ranked "
                f"{t['r1']:.1f} / {t['r5']:.1f} / {t['r10']:.1f}"
            )
    return 0


def _add_rerank_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rerank",
        type=int,
        default=None,
        metavar="N",
        help="re-rank each index's top N captions with the cross-attention re-ranker and "
        "read the best k (N ≥ k; needs a re-ranker: the run's, or --reranker)",
    )
    p.add_argument(
        "--reranker",
        default=None,
        metavar="PATH",
        help="re-ranker folder (rvqa train-reranker's reranker/best; default: the run's)",
    )


def _recall_line(t: dict) -> str:
    return (
        "recall@1/5/10  image→text {:.1f} / {:.1f} / {:.1f}   "
        "text→image {:.1f} / {:.1f} / {:.1f}   rsum {:.1f}"
    ).format(
        t["i2t_r1"], t["i2t_r5"], t["i2t_r10"], t["t2i_r1"], t["t2i_r5"], t["t2i_r10"], t["rsum"]
    )


def _cmd_train_reader(args: argparse.Namespace) -> int:
    from rvqa.reader.train import train_reader

    out = train_reader(_load_cfg(args), resume=args.resume)
    acc = out["best_val_accuracy"]
    _print_main(
        f"reader saved to {out['model_dir']}"
        + (f" (best validation VQA accuracy {acc:.2f})" if acc is not None else "")
    )
    return 0


def _eval_retriever_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    _add_skip_bad_images(p, "retriever.captions")
    p.add_argument(
        "--model", required=True, help="retriever folder (e.g. runs/demo/retriever/best)"
    )
    p.add_argument(
        "--split", default=None, help="caption split to evaluate (default: retriever.test_split)"
    )
    p.add_argument(
        "--protocol",
        choices=["all", "coco1k", "coco5k", "f30k1k"],
        default="all",
        help="all: every image of the split with all its captions; coco1k: the 5,000 COCO "
        "test images in 5 folds of 1,000 (mean); coco5k: the same 5,000 as one gallery; "
        "f30k1k: the 1,000 Flickr30K test images. The named protocols check the image "
        "count and keep each image's first 5 captions",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--out", default=None, help="also write metrics.json and the resolved config.yaml here"
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _cmd_eval_retriever(args: argparse.Namespace) -> int:
    import json

    from rvqa.evaluation import evaluate_retriever_split

    metrics = evaluate_retriever_split(
        args.model,
        _load_cfg(args),
        split=args.split,
        protocol=args.protocol,
        batch_size=args.batch_size,
        out_dir=args.out,
    )
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        for k, v in metrics.items():
            print(f"{k:>14}  {v:.2f}")
    return 0


# --------------------------------------------------------------------------- indices


def _build_index_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument(
        "--retriever", help="retriever folder (default: OUTPUT_DIR/retriever/best or final)"
    )
    p.add_argument(
        "--captions",
        help="caption source: 'easy_vqa', a .jsonl (caption, id) or .txt (a caption a line) "
        "file, a COCO captions_*.json, a Karpathy dataset_*.json, or a datasets folder "
        "(default: the config's index.captions)",
    )
    p.add_argument(
        "--out",
        help="index folder (default: the config's index folder, indices/NAME); the resolved "
        "config is written into it as config.yaml",
    )
    p.add_argument(
        "--from-index", help="rebuild from this index's stored embeddings (no re-encoding)"
    )
    p.add_argument(
        "--factory",
        help="FAISS factory string, e.g. Flat, HNSW32, IVF4096,PQ32 (default: automatic)",
    )
    p.add_argument("--max-memory", help="memory budget of the automatic choice, e.g. 4GB")
    p.add_argument(
        "--ef-construction",
        type=int,
        help="HNSW indices: efConstruction of the graph (default 200; lower builds faster, "
        "higher searches faster at equal recall)",
    )
    p.add_argument(
        "--tuning-queries",
        metavar="FILE.npy",
        help="(m, d) query embeddings (e.g. held-out images through the retriever) to tune "
        "efSearch/nprobe on (default: proxy queries made from the captions)",
    )
    p.add_argument("--no-dedupe", action="store_true", help="keep duplicate captions")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index folder")


def _cmd_build_index(args: argparse.Namespace) -> int:
    from rvqa.indexing import build_index_from_config
    from rvqa.retriever.index import read_manifest

    path = build_index_from_config(
        _load_cfg(args),
        retriever=args.retriever,
        captions=args.captions,
        out=args.out,
        from_index=args.from_index,
        factory=args.factory,
        max_memory=args.max_memory,
        dedupe=False if args.no_dedupe else None,
        ef_construction=args.ef_construction,
        tuning_queries=args.tuning_queries,
        overwrite=args.overwrite,
    )
    if path is not None:  # None: not the main process of a distributed build
        m = read_manifest(path)
        _print_main(f"built {path}: {m['count']} captions, {m['factory']}, dim {m['embed_dim']}")
    return 0


def _index_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="index folder, e.g. indices/easyvqa-captions")
    p.add_argument(
        "--retriever", help="retriever folder: check the fingerprint and re-encode captions"
    )
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    _add_gpu_index_arg(p, config=False)


def _cmd_index_info(args: argparse.Namespace) -> int:
    import json

    from rvqa.retriever.index import index_info, read_manifest
    from rvqa.retriever.modeling import RetrieverModel

    if args.json:
        print(json.dumps(read_manifest(args.path), indent=1))
        return 0
    encoder = RetrieverModel.from_pretrained(args.retriever) if args.retriever else None
    print(index_info(args.path, encoder, use_gpu=bool(args.gpu_index)))
    return 0


# --------------------------------------------------------------------------- demo


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--indices-dir", default="indices", help="where the demo's indices go")
    p.add_argument("--fast", action="store_true", help="small data and few steps (about 3 minutes)")


def _cmd_demo(args: argparse.Namespace) -> int:
    from rvqa.demo import run_demo

    run_demo(args.output_dir, fast=args.fast, indices_dir=args.indices_dir)
    return 0


# --------------------------------------------------------------------------- ask


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=("float32", "bf16"),
        default="float32",
        help="bf16: run the retriever and reader under bfloat16 autocast (faster on GPUs "
        "and CPUs with AVX512-BF16/AMX; answers may differ slightly from float32)",
    )


def _ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="RUN",
        help="run folder with rvqa_run.json, e.g. runs/demo",
    )
    p.add_argument("--image", required=True, metavar="PATH", help="the image file")
    p.add_argument("--question", required=True, metavar="TEXT", help="the question to answer")
    p.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="PATH_OR_NAME",
        help="knowledge index to retrieve from: an index folder (loaded under its folder name) "
        "or the name of one of the run's indices; repeatable (hits merged by score); "
        "default: every index the run loads",
    )
    p.add_argument(
        "--no-retrieval", action="store_true", help="answer from the image and question alone"
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="captions to retrieve (default: the number the reader was trained with)",
    )
    _add_rerank_args(p)
    _add_search_args(p, from_config=False)
    _add_gpu_index_arg(p, config=False)
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)"
    )
    _add_precision_arg(p)


def _cmd_ask(args: argparse.Namespace) -> int:
    import json

    from rvqa.data.images import load_image
    from rvqa.distributed import log_placement
    from rvqa.pipeline import ALL_INDICES, RVQA

    # Cheap checks first: a typo should not cost loading the models.
    if args.no_retrieval and args.index:
        raise UsageError("--index and --no-retrieval exclude each other")
    if not args.question.strip():
        raise UsageError("--question is empty; expected e.g. --question 'what color is the shape?'")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(
            f"--top-k must be ≥ 1, got {args.top_k} (use --no-retrieval to answer without captions)"
        )
    if args.rerank is not None and args.rerank < 1:
        raise UsageError(f"--rerank must be a number of captions ≥ 1, got {args.rerank}")
    if args.no_retrieval and args.rerank:
        raise UsageError("--rerank and --no-retrieval exclude each other")
    image = load_image(args.image)
    with _QuietLoading(args.debug):
        model = RVQA.from_pretrained(
            args.model,
            device=args.device,
            load_indices=not args.no_retrieval,
            nprobe=args.nprobe,
            ef_search=args.ef_search,
            use_gpu=bool(args.gpu_index),
            precision=args.precision,
            reranker=args.reranker,
        )
        index = None if args.no_retrieval else (model.use_indices(args.index) or ALL_INDICES)
        log_placement("ask", **model.placement())
        out = model.answer(image, args.question, top_k=args.top_k, index=index, rerank=args.rerank)
    if args.json:
        print(json.dumps(out.to_dict(), indent=1, ensure_ascii=False, default=str))
    else:
        print(_format_answer(out, retrieval=index is not None and bool(model.indices)))
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="RUN", help="run folder with rvqa_run.json")
    p.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="PATH_OR_NAME",
        help="index folder to load (under its folder name) or a run index's name; repeatable "
        "(default: every index the run loads)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--indices-root",
        default=None,
        metavar="DIR",
        help="the folder index loads and swaps (PUT /v1/indices/NAME) may read from",
    )
    p.add_argument(
        "--admin-token-file",
        default=None,
        metavar="FILE",
        help="file holding the admin token for index management (or set RVQA_ADMIN_TOKEN); "
        "without one, PUT/DELETE /v1/indices are disabled",
    )
    p.add_argument("--max-batch", type=int, default=32, help="requests per reader batch (1: off)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more requests after taking those already queued "
        "(not after a batch of one)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload (413 above)")
    p.add_argument(
        "--max-queued-mpix",
        type=float,
        default=256.0,
        help="decoded megapixels the requests not answered yet may hold (503 above)",
    )
    p.add_argument(
        "--reranker",
        default=None,
        metavar="PATH",
        help="re-ranker folder for requests' rerank=N (rvqa train-reranker's reranker/best; "
        "default: the run's, if it records one; 'none': no re-ranking)",
    )
    p.add_argument(
        "--max-rerank",
        type=int,
        default=100,
        metavar="N",
        help="largest rerank a request may ask for (422 above; default 100)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)"
    )
    _add_precision_arg(p)


def _cmd_serve(args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    t0 = time.perf_counter()
    from rvqa.pipeline import RVQA
    from rvqa.server import create_app, require_serve_extra

    require_serve_extra()
    import uvicorn

    t_imports = time.perf_counter()

    token = os.environ.get("RVQA_ADMIN_TOKEN", "").strip() or None
    if args.admin_token_file:
        path = Path(args.admin_token_file)
        if not path.is_file():
            raise UsageError(f"--admin-token-file {path} does not exist")
        token = path.read_text().strip()
        if not token:
            raise UsageError(f"--admin-token-file {path} is empty")
    if args.indices_root is not None and not Path(args.indices_root).is_dir():
        raise UsageError(f"--indices-root {args.indices_root} is not a folder")
    reranker = args.reranker
    if reranker is not None and not reranker.strip():
        raise UsageError("--reranker needs a re-ranker folder, or 'none' for no re-ranking")
    if reranker is not None and reranker.strip().lower() == "none":
        reranker = False
    if args.max_rerank < 1:
        raise UsageError(f"--max-rerank must be a positive integer, got {args.max_rerank}")
    with _QuietLoading(args.debug):
        model = RVQA.from_pretrained(
            args.model, device=args.device, precision=args.precision, reranker=reranker
        )
        if args.index:
            keep = model.use_indices(args.index)
            for name in list(model.registry.names):
                if name not in keep:
                    model.unload_index(name)
    app = create_app(
        model,
        indices_root=args.indices_root,
        admin_token=token,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_upload_mb=args.max_upload_mb,
        max_queued_pixels=_queued_pixels(args.max_queued_mpix),
        max_rerank=args.max_rerank,
    )
    logger.info(
        "rvqa serve: imports %.2f s (torch, transformers, FastAPI, ...), model and indices %.2f s",
        t_imports - t0,
        time.perf_counter() - t_imports,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _queued_pixels(mpix: float) -> int:
    import math

    if not (mpix > 0 and math.isfinite(mpix)):
        raise UsageError(f"--max-queued-mpix must be a positive number, got {mpix}")
    return int(mpix * 1024 * 1024)


def _format_answer(out, retrieval: bool) -> str:
    """The human-readable ``rvqa ask`` result: answer, alternatives, evidence table."""
    shown = "(empty answer: the reader generated nothing)" if out.empty else out.answer
    lines = [f"Q: {out.question}", f"A: {shown}  (score {out.score:.3f})"]
    if out.alternatives:
        lines.append(
            "   also: " + ", ".join(f"{a or '(empty)'} {s:.3f}" for a, s in out.alternatives)
        )
    if not out.evidence:
        why = "no captions retrieved" if retrieval else "answered without retrieval"
        lines.append(f"Evidence: none ({why})")
        lines.extend(f"Note: {note}" for note in out.notes)
        return "\n".join(lines)
    reranked = out.evidence[0].rerank_score is not None
    order = "re-ranked, best first" if reranked else "best first"
    lines.append(f"Evidence ({len(out.evidence)} captions, {order}):")
    head = ("score", "rerank", "rank", "index", "id") if reranked else ("score", "index", "id")
    rows = [(*head, "caption")]
    for e in out.evidence:
        cells = (f"{e.score:.3f}",)
        if reranked:
            cells += (f"{e.rerank_score:.3f}", str(e.retrieval_rank))
        rows.append((*cells, e.index, str(e.id), e.text))
    n = len(head)
    widths = [max(len(r[c]) for r in rows) for c in range(n)]
    for r in rows:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r[:n], widths)) + "  " + r[n])
    lines.extend(f"Note: {note}" for note in out.notes)
    return "\n".join(lines)


class _QuietLoading:
    """Hide load-time chatter (progress bars, INFO logs); warnings and errors still show."""

    def __init__(self, debug: bool):
        self.debug = debug
        self.loggers = [logging.getLogger("rvqa")]

    def __enter__(self) -> None:
        if self.debug:
            return
        from transformers.utils import logging as hf_logging

        self.hf = hf_logging
        self.bars, self.verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        self.levels = [lg.level for lg in self.loggers]
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        for lg in self.loggers:
            lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))

    def __exit__(self, *exc: object) -> None:
        if self.debug:
            return
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
        self.hf.set_verbosity(self.verbosity)
        if self.bars:
            self.hf.enable_progress_bar()


# --------------------------------------------------------------------------- evaluate


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, default="the run's reader/config.yaml")
    _add_skip_bad_images(p, "data")
    p.add_argument("--model", required=True, help="run folder (with rvqa_run.json)")
    p.add_argument(
        "--split",
        default=None,
        help="VQA split, e.g. test (easy-vqa), val, test-dev (default: the config's "
        "data.eval_split)",
    )
    p.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="NAME_OR_PATH",
        help="a loaded index name or an index folder (repeatable; default: the run's indices)",
    )
    p.add_argument("--no-retrieval", action="store_true", help="answer without retrieval")
    p.add_argument("--k", type=int, default=None, help="captions per question (default: the run's)")
    p.add_argument(
        "--max-questions",
        type=int,
        default=None,
        help="evaluate only the first N (default: the config's data.max_eval_questions; 0: all)",
    )
    _add_search_args(p, from_config=True)
    _add_gpu_index_arg(p, config=True)
    p.add_argument(
        "--compare",
        action="store_true",
        help="one table: each index alone (and re-ranked, with --rerank) and no retrieval, "
        "with the difference to no retrieval",
    )
    _add_rerank_args(p)
    p.add_argument(
        "--random-captions",
        action="store_true",
        help="control: each retrieved caption replaced by a random caption of the same index "
        "with as many words (scores kept); with --compare, one more row, for the first index",
    )
    p.add_argument(
        "--report",
        type=int,
        default=0,
        metavar="N",
        help="write report.html: N sampled questions with image, captions, prediction, answers",
    )
    p.add_argument(
        "--report-errors", action="store_true", help="sample the report from wrong answers only"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the report sample and the control")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)"
    )
    _add_precision_arg(p)
    p.add_argument(
        "--out", required=True, help="output folder (also gets the resolved config.yaml)"
    )


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from rvqa.evaluation import evaluate_split, load_run_config

    cfg = load_run_config(args.model, args.config, args.overrides)
    with _QuietLoading(args.debug):  # loading chatter; the progress bars still show
        res = evaluate_split(
            args.model,
            args.out,
            cfg=cfg,
            split=args.split,
            max_questions=args.max_questions,
            indices=args.index,
            no_retrieval=args.no_retrieval,
            compare_indices=args.compare,
            random_captions=args.random_captions,
            top_k=args.k,
            nprobe=args.nprobe,
            ef_search=args.ef_search,
            report=args.report,
            report_errors=args.report_errors,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            use_gpu=True if args.gpu_index else None,
            precision=args.precision,
            rerank=args.rerank,
            reranker=args.reranker,
        )
    if res.table is not None:
        print(f"{res.questions} questions ({res.split})\n")
        print(res.table)
        if args.report:
            print(f"\nreports: {args.out}/<condition>/report.html")
        return 0
    acc = res.run.accuracy
    if acc is None:
        print(
            f"{res.questions} predictions written to {args.out}/predictions.json (no annotations)"
        )
    else:
        types = "  ".join(f"{k} {v:.2f}" for k, v in sorted(acc.per_answer_type.items()))
        print(
            f"VQA accuracy {acc.overall:.2f}  ({types})  on {res.questions} questions; "
            f"files in {args.out}"
        )
    if args.report:
        print(f"report: {args.out}/report.html")
    return 0


# --------------------------------------------------------------------------- the table


class Command(NamedTuple):
    """One subcommand: its one-line help, examples, argument builder and function."""

    help: str
    examples: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "config": Command(
        "print the resolved run config (defaults + YAML + --set overrides)",
        """
        rvqa config
        rvqa config --config configs/coco_vqav2.yaml --set reader.learning_rate=1e-4
        """,
        _add_config_args,
        _cmd_config,
    ),
    "make-knowledge-task": Command(
        "write the offline knowledge task: easy-vqa emblems whose answers are only in a fact corpus",
        """
        rvqa make-knowledge-task data/knowledge                       # all easy-vqa images
        rvqa make-knowledge-task /tmp/kt --max-train-images 200 --max-test-images 50 --overwrite
        rvqa make-knowledge-task data/knowledge-2-7 --train-assignment 2 --swap-assignment 7
        """,
        _make_knowledge_task_args,
        _cmd_make_knowledge_task,
    ),
    "train-retriever": Command(
        "train the image-caption alignment model (retriever)",
        """
        rvqa train-retriever                                   # the defaults (easy-vqa, CPU)
        rvqa train-retriever --config configs/tiny.yaml --set retriever.max_steps=20
        rvqa train-retriever --config configs/demo.yaml --resume
        ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m rvqa train-retriever --config configs/demo.yaml
        accelerate launch --multi_gpu --num_processes 8 -m rvqa train-retriever --config configs/coco_vqav2.yaml
        """,
        _train_retriever_args,
        _cmd_train_retriever,
    ),
    "evaluate-retriever": Command(
        "recall@1/5/10 (image→text, text→image, rsum) of a trained retriever",
        """
        rvqa evaluate-retriever --model runs/demo/retriever/best
        rvqa evaluate-retriever --config configs/coco_vqav2.yaml --model runs/coco_vqav2/retriever/best --protocol coco1k --out runs/coco_vqav2/retriever-eval
        """,
        _eval_retriever_args,
        _cmd_eval_retriever,
    ),
    "build-index": Command(
        "embed a caption corpus with the retriever and build a FAISS knowledge index",
        """
        rvqa build-index --retriever runs/demo/retriever/best --captions easy_vqa --out indices/easyvqa-captions
        rvqa build-index --retriever runs/demo/retriever/best --captions my_corpus.jsonl --out indices/mine --factory HNSW32
        rvqa build-index --from-index indices/easyvqa-captions --factory HNSW32 --out indices/easyvqa-hnsw
        accelerate launch --multi_gpu -m rvqa build-index --config configs/coco_vqav2.yaml   # every GPU encodes a shard
        """,
        _build_index_args,
        _cmd_build_index,
    ),
    "index-info": Command(
        "print a knowledge index's manifest and a sanity search",
        """
        rvqa index-info indices/easyvqa-captions
        rvqa index-info indices/easyvqa-captions --retriever runs/demo/retriever/best
        """,
        _index_info_args,
        _cmd_index_info,
    ),
    "train-reader": Command(
        "train the retrieval-augmented reader (needs a trained retriever and a built index)",
        """
        rvqa train-reader                                       # the defaults (easy-vqa, CPU)
        rvqa train-reader --set reader.top_k=0                  # no retrieval (ablation)
        rvqa train-reader --set data.train_fraction=0.1         # low-data run
        rvqa train-reader --config configs/demo.yaml --resume
        ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m rvqa train-reader
        accelerate launch --multi_gpu --num_processes 8 -m rvqa train-reader --config configs/coco_vqav2.yaml
        """,
        _train_reader_args,
        _cmd_train_reader,
    ),
    "train-reranker": Command(
        "train the cross-attention re-ranker for the run's retriever (rerank=N at inference)",
        """
        rvqa train-reranker                                     # runs/demo's retriever and captions
        rvqa train-reranker --set reranker.top_n=100 --set reranker.num_negatives=31
        rvqa train-reranker --config configs/demo.yaml --resume
        ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m rvqa train-reranker
        """,
        _train_reranker_args,
        _cmd_train_reranker,
    ),
    "demo": Command(
        "the offline demo: easy-vqa (train retriever, build indices, train reader, evaluate, "
        "answer), then the knowledge task (both readers, index A vs B swapped in)",
        """
        rvqa demo                       # ~8 minutes on 2 CPU cores, writes runs/demo and indices/
        rvqa demo --fast                # about 3 minutes: a smoke test of the whole chain
        """,
        _demo_args,
        _cmd_demo,
    ),
    "ask": Command(
        "answer one question about one image, with the retrieved evidence",
        """
        rvqa ask --model runs/demo --image shape.png --question "what color is the shape?"
        rvqa ask --model runs/demo --image shape.png --question "what shape is it?" --index indices/easyvqa-paraphrased --top-k 3
        rvqa ask --model runs/demo --image shape.png --question "what color is the shape?" --no-retrieval --json
        rvqa ask --model runs/demo --image shape.png --question "what color is the shape?" --rerank 50
        """,
        _ask_args,
        _cmd_ask,
    ),
    "evaluate": Command(
        "official VQA accuracy of a run on a split: predictions, accuracy JSON, evidence, ablation table",
        """
        rvqa evaluate --model runs/demo --out runs/demo/eval          # the config's data.eval_split
        rvqa evaluate --model runs/demo --split test --compare --index indices/easyvqa-paraphrased --out runs/demo/compare
        rvqa evaluate --model runs/demo --split test --no-retrieval --out runs/demo/eval-k0
        rvqa evaluate --model runs/demo --split test --compare --rerank 50 --out runs/demo/rerank
        rvqa evaluate --model runs/demo --split test --compare --random-captions --report 50 --out runs/demo/ablation
        rvqa evaluate --model runs/coco_vqav2 --split test-dev --ef-search 128 --out runs/coco_vqav2/test-dev   # predictions only
        """,
        _evaluate_args,
        _cmd_evaluate,
    ),
    "serve": Command(
        "serve a run over HTTP (FastAPI): answers with micro-batching, admin-only index swaps",
        """
        rvqa serve --model runs/demo                                   # http://127.0.0.1:8000/docs
        rvqa serve --model runs/demo --indices-root indices --admin-token-file token.txt
        """,
        _serve_args,
        _cmd_serve,
    ),
}


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The ``rvqa`` parser with every subcommand (imports no model code)."""
    parser = argparse.ArgumentParser(
        prog="rvqa",
        description=textwrap.dedent(
            """\
            rvqa: retrieval-augmented visual question answering.
            An image-caption retriever finds captions for the image in a FAISS knowledge
            index; a multimodal reader answers from the image, the question and the captions."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'rvqa COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"rvqa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=cmd.help,
            description=cmd.help,
            epilog="examples:\n" + textwrap.indent(textwrap.dedent(cmd.examples).strip(), "  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_args(p)
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``rvqa`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # The placement / cuda-peak lines stay at INFO while loading chatter is quieted.
    logging.getLogger("rvqa.placement").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        rc = int(COMMANDS[args.command].run(args) or 0)
        _log_cuda_peak(args.command)
        return rc
    except KeyboardInterrupt:
        print("rvqa: interrupted", file=sys.stderr)
        return 130
    except ONE_LINE_ERRORS as err:
        if args.debug:
            raise
        print(f"rvqa {args.command}: error: {err}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print(
            f"rvqa {args.command}: this is a bug in rvqa; please report it with the traceback above",
            file=sys.stderr,
        )
        return 1


PLACED_COMMANDS = (
    "train-retriever",
    "evaluate-retriever",
    "build-index",
    "train-reader",
    "evaluate",
    "ask",
)
"""The commands that log ``rvqa placement:`` and ``rvqa cuda-peak:`` lines
(:mod:`rvqa.distributed`)."""


def _log_cuda_peak(command: str) -> None:
    """The ``rvqa cuda-peak:`` line at the end of a command that ran models (on success)."""
    if command in PLACED_COMMANDS and "torch" in sys.modules:
        from rvqa.distributed import log_cuda_peak

        log_cuda_peak(command)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
