"""The ``rvqa`` console script: subcommands that call plain Python functions.

Parsers are built here without importing torch or any model code, so
``rvqa --help`` is instant; each subcommand imports what it needs when it runs.
Errors print one line (``rvqa: error: ...``) and exit 1; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Callable

logger = logging.getLogger("rvqa")

# Exceptions that mean "the user gave something wrong": one clear line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    KeyError,
    NotADirectoryError,
    PermissionError,
    ImportError,
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="run config (defaults: the offline demo)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set reader.learning_rate=1e-4 (repeatable)",
    )


def _load_cfg(args: argparse.Namespace):
    from rvqa.config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "output_dir", None):
        cfg.output_dir = args.output_dir
    return cfg


# --------------------------------------------------------------------------- commands


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from rvqa.config import config_to_dict

    cfg = _load_cfg(args)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def _config_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)


COMMANDS["config"] = (
    "print the resolved run config (defaults + YAML + --set overrides)",
    """
    rvqa config
    rvqa config --config configs/coco_vqav2.yaml --set reader.learning_rate=1e-4
    """,
    _config_args,
    _cmd_config,
)


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


def _cmd_train_retriever(args: argparse.Namespace) -> int:
    from rvqa.retriever.train import train_retriever

    cfg = _load_cfg(args)
    out = train_retriever(cfg, resume=args.resume)
    _print_main(f"retriever saved to {out['model_dir']}")
    if out["test"]:
        t = out["test"]
        _print_main(
            "test recall@1/5/10  image→text {:.1f} / {:.1f} / {:.1f}   text→image {:.1f} / {:.1f} / {:.1f}   rsum {:.1f}".format(
                t["i2t_r1"],
                t["i2t_r5"],
                t["i2t_r10"],
                t["t2i_r1"],
                t["t2i_r5"],
                t["t2i_r10"],
                t["rsum"],
            )
        )
    return 0


def _eval_retriever_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
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
        help="coco1k: mean over 5 folds of 1,000 images; coco5k / f30k1k / all: every test image",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _cmd_eval_retriever(args: argparse.Namespace) -> int:
    import json

    from rvqa.data import load_caption_split
    from rvqa.retriever.evaluation import evaluate_retriever
    from rvqa.retriever.modeling import RetrieverModel

    cfg = _load_cfg(args)
    split = args.split or cfg.retriever.test_split or "test"
    records = load_caption_split(cfg.retriever.captions, split)
    model = RetrieverModel.from_pretrained(args.model)
    metrics = evaluate_retriever(
        model, records, batch_size=args.batch_size, folds=5 if args.protocol == "coco1k" else 1
    )
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        for k, v in metrics.items():
            print(f"{k:>14}  {v:.2f}")
    return 0


def _print_main(msg: str) -> None:
    """Print on the main process only (several may run under torchrun/accelerate)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(msg)


COMMANDS["train-retriever"] = (
    "train the image-caption alignment model (retriever)",
    """
    rvqa train-retriever                                   # the offline easy-vqa demo settings
    rvqa train-retriever --config configs/tiny.yaml --set retriever.max_steps=20
    rvqa train-retriever --config configs/demo.yaml --resume
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m rvqa train-retriever --config configs/demo.yaml
    accelerate launch --multi_gpu --num_processes 8 -m rvqa train-retriever --config configs/coco_vqav2.yaml
    """,
    _train_args,
    _cmd_train_retriever,
)
COMMANDS["evaluate-retriever"] = (
    "recall@1/5/10 (image→text, text→image, rsum) of a trained retriever",
    """
    rvqa evaluate-retriever --model runs/demo/retriever/best
    rvqa evaluate-retriever --config configs/coco_vqav2.yaml --model runs/coco_vqav2/retriever/best --protocol coco1k
    """,
    _eval_retriever_args,
    _cmd_eval_retriever,
)


def _build_index_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument(
        "--retriever", help="retriever folder (default: OUTPUT_DIR/retriever/best or final)"
    )
    p.add_argument(
        "--captions",
        help="caption source: a .jsonl / .txt file, a COCO captions .json, or 'easy_vqa' "
        "(default: the config's index.captions)",
    )
    p.add_argument("--out", help="index folder (default: the config's index folder, indices/NAME)")
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

    cfg = _load_cfg(args)
    path = build_index_from_config(
        cfg,
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
    if path is not None:
        from rvqa.retriever.index import read_manifest

        m = read_manifest(path)
        _print_main(f"built {path}: {m['count']} captions, {m['factory']}, dim {m['embed_dim']}")
    return 0


def _index_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="index folder, e.g. indices/easyvqa-captions")
    p.add_argument(
        "--retriever", help="retriever folder: check the fingerprint and re-encode captions"
    )
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _cmd_index_info(args: argparse.Namespace) -> int:
    import json

    from rvqa.retriever.index import index_info, read_manifest

    if args.json:
        print(json.dumps(read_manifest(args.path), indent=1))
        return 0
    encoder = None
    if args.retriever:
        from rvqa.retriever.modeling import RetrieverModel

        encoder = RetrieverModel.from_pretrained(args.retriever)
    print(index_info(args.path, encoder))
    return 0


def _cmd_train_reader(args: argparse.Namespace) -> int:
    from rvqa.reader.train import train_reader

    cfg = _load_cfg(args)
    out = train_reader(cfg, resume=args.resume)
    acc = out["best_val_accuracy"]
    _print_main(
        f"reader saved to {out['model_dir']}"
        + (f" (best validation VQA accuracy {acc:.2f})" if acc is not None else "")
    )
    return 0


COMMANDS["train-reader"] = (
    "train the retrieval-augmented reader (needs a trained retriever and a built index)",
    """
    rvqa train-reader                                       # the offline easy-vqa demo settings
    rvqa train-reader --set reader.top_k=0                  # no retrieval (ablation)
    rvqa train-reader --set data.train_fraction=0.1         # low-data run
    rvqa train-reader --config configs/demo.yaml --resume
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m rvqa train-reader
    accelerate launch --multi_gpu --num_processes 8 -m rvqa train-reader --config configs/coco_vqav2.yaml
    """,
    _train_args,
    _cmd_train_reader,
)
COMMANDS["build-index"] = (
    "embed a caption corpus with the retriever and build a FAISS knowledge index",
    """
    rvqa build-index --retriever runs/demo/retriever/best --captions easy_vqa --out indices/easyvqa-captions
    rvqa build-index --retriever runs/demo/retriever/best --captions my_corpus.jsonl --out indices/mine --factory HNSW32
    rvqa build-index --from-index indices/easyvqa-captions --factory HNSW32 --out indices/easyvqa-hnsw
    accelerate launch --multi_gpu -m rvqa build-index --config configs/coco_vqav2.yaml   # every GPU encodes a shard
    """,
    _build_index_args,
    _cmd_build_index,
)
COMMANDS["index-info"] = (
    "print a knowledge index's manifest and a sanity search",
    """
    rvqa index-info indices/easyvqa-captions
    rvqa index-info indices/easyvqa-captions --retriever runs/demo/retriever/best
    """,
    _index_info_args,
    _cmd_index_info,
)


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--indices-dir", default="indices", help="where the demo's indices go")
    p.add_argument("--fast", action="store_true", help="small data and few steps (about a minute)")


def _cmd_demo(args: argparse.Namespace) -> int:
    from rvqa.demo import run_demo

    run_demo(args.output_dir, fast=args.fast, indices_dir=args.indices_dir)
    return 0


COMMANDS["demo"] = (
    "the offline easy-vqa demo: train retriever, build indices, train reader, evaluate, answer",
    """
    rvqa demo                       # ~10 minutes on 2 CPU cores, writes runs/demo and indices/
    rvqa demo --fast                # about a minute: a smoke test of the whole chain
    """,
    _demo_args,
    _cmd_demo,
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
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)"
    )


def _cmd_ask(args: argparse.Namespace) -> int:
    import json

    from rvqa.data.images import load_image
    from rvqa.pipeline import RVQA

    # Cheap checks first: a typo should not cost loading the models.
    if args.no_retrieval and args.index:
        raise ValueError("--index and --no-retrieval exclude each other")
    if not args.question.strip():
        raise ValueError("--question is empty; expected e.g. --question 'what color is the shape?'")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(
            f"--top-k must be ≥ 1, got {args.top_k} (use --no-retrieval to answer without captions)"
        )
    image = load_image(args.image)
    with _QuietLoading(args.debug):
        model = RVQA.from_pretrained(
            args.model, device=args.device, load_indices=not args.no_retrieval
        )
        index = None if args.no_retrieval else _ask_indices(model, args.index)
        out = model.answer(image, args.question, top_k=args.top_k, index=index)
    if args.json:
        print(json.dumps(out.to_dict(), indent=1, ensure_ascii=False, default=str))
    else:
        print(_format_answer(out, retrieval=index is not None and bool(model.indices)))
    return 0


def _ask_indices(model, specs: list[str]):
    """``--index`` values → index names: folders are loaded, names must be loaded already."""
    from pathlib import Path

    from rvqa.pipeline import ALL_INDICES

    if not specs:
        return ALL_INDICES
    names: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            name = path.resolve().name
            if name in model.registry:  # e.g. the run's own index, or a newer build of it
                model.swap_index(path, name=name)
            else:
                model.load_index(path, name=name)
        elif spec in model.registry:
            name = spec
        else:
            known = ", ".join(model.indices) or "none"
            raise KeyError(
                f"--index {spec!r} is neither an index folder nor the name of one of the run's "
                f"indices (loaded: {known})"
            )
        if name not in names:
            names.append(name)
    return names


def _format_answer(out, retrieval: bool) -> str:
    """The human-readable ``rvqa ask`` result: answer, alternatives, evidence table."""
    lines = [f"Q: {out.question}", f"A: {out.answer}  (score {out.score:.3f})"]
    if out.alternatives:
        lines.append("   also: " + ", ".join(f"{a} {s:.3f}" for a, s in out.alternatives))
    if not out.evidence:
        why = "no captions retrieved" if retrieval else "answered without retrieval"
        lines.append(f"Evidence: none ({why})")
        return "\n".join(lines)
    lines.append(f"Evidence ({len(out.evidence)} captions, best first):")
    rows = [("score", "index", "id", "caption")] + [
        (f"{e.score:.3f}", e.index, str(e.id), e.text) for e in out.evidence
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3])
    return "\n".join(lines)


class _QuietLoading:
    """Hide load-time chatter (progress bars, INFO logs); warnings and errors still show."""

    def __init__(self, debug: bool):
        self.debug = debug
        self.loggers = [logging.getLogger(n) for n in ("rvqa", "retriever", "reader")]

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


COMMANDS["ask"] = (
    "answer one question about one image, with the retrieved evidence",
    """
    rvqa ask --model runs/demo --image shape.png --question "what color is the shape?"
    rvqa ask --model runs/demo --image shape.png --question "what shape is it?" --index indices/easyvqa-paraphrased --top-k 3
    rvqa ask --model runs/demo --image shape.png --question "what color is the shape?" --no-retrieval --json
    """,
    _ask_args,
    _cmd_ask,
)


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--model", required=True, help="run folder (with rvqa_run.json)")
    p.add_argument("--split", required=True, help="VQA split, e.g. test (easy-vqa), val, test-dev")
    p.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="NAME_OR_PATH",
        help="a loaded index name or an index folder (repeatable; default: the run's indices)",
    )
    p.add_argument("--no-retrieval", action="store_true", help="answer without retrieval")
    p.add_argument("--k", type=int, default=None, help="captions per question (default: the run's)")
    p.add_argument("--max-questions", type=int, default=None, help="evaluate only the first N")
    p.add_argument(
        "--compare",
        action="store_true",
        help="one table: each index alone and no retrieval, with the difference to no retrieval",
    )
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
    p.add_argument("--out", required=True, help="output folder")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rvqa.config import load_config
    from rvqa.data import load_vqa
    from rvqa.evaluation import RandomCaptions, compare, evaluate_run
    from rvqa.pipeline import ALL_INDICES, RVQA

    if args.k is not None and args.k <= 0:
        raise ValueError(f"--k must be ≥ 1, got {args.k} (use --no-retrieval for none)")
    if args.report < 0:
        raise ValueError(f"--report must be a number of questions ≥ 0, got {args.report}")
    if args.no_retrieval and (args.index or args.compare or args.random_captions):
        raise ValueError(
            "--no-retrieval cannot be combined with --index, --compare or --random-captions"
        )
    run_cfg = Path(args.model) / "reader" / "config.yaml"
    cfg = load_config(args.config or (run_cfg if run_cfg.is_file() else None), args.overrides)
    with _QuietLoading(args.debug):
        model = RVQA.from_pretrained(args.model)
    names = []
    for item in args.index:
        if Path(item).is_dir():
            name = Path(item).resolve().name
            if name in model.registry:
                model.swap_index(item, name=name)
            else:
                model.load_index(item, name=name)
            names.append(name)
        elif item in model.registry:
            names.append(item)
        else:
            loaded = ", ".join(model.registry.names) or "none"
            raise ValueError(
                f"--index {item!r} is neither an index folder nor a loaded index ({loaded})"
            )
    if args.random_captions and not model.registry.names:
        raise ValueError("--random-captions needs an index (--index, or a run with indices)")
    records = list(load_vqa(cfg.data, args.split))
    if args.max_questions:
        records = records[: args.max_questions]
    control = RandomCaptions(model.registry, seed=args.seed) if args.random_captions else None
    report = {"report": args.report, "report_errors": args.report_errors, "seed": args.seed}
    if args.compare:
        conditions: list[tuple] = [(n, n) for n in (names or model.registry.names)]
        if control is not None:  # a control for the first index's retrieval
            first = conditions[0][1]
            label = control.label if len(conditions) == 1 else f"{control.label} ({first})"
            conditions.append((label, first, control))
        conditions.append(("no retrieval", None))
        _rows, table = compare(
            model,
            records,
            conditions,
            out_dir=args.out,
            split_name=args.split,
            top_k=args.k,
            batch_size=args.batch_size,
            **report,
        )
        print(f"{len(records)} questions ({args.split})\n")
        print(table)
        if args.report:
            print(f"\nreports: {args.out}/<condition>/report.html")
        return 0
    index = None if args.no_retrieval else (names or ALL_INDICES)
    label = "no retrieval" if index is None else ",".join(names) or "run indices"
    run = evaluate_run(
        model,
        records,
        index=index,
        condition=f"{control.label} ({label})" if control is not None else label,
        top_k=args.k,
        batch_size=args.batch_size,
        out_dir=args.out,
        split_name=args.split,
        control=control,
        **report,
    )
    if run.accuracy is None:
        print(f"{len(records)} predictions written to {args.out}/predictions.json (no annotations)")
    else:
        acc = run.accuracy
        types = "  ".join(f"{k} {v:.2f}" for k, v in sorted(acc.per_answer_type.items()))
        print(
            f"VQA accuracy {acc.overall:.2f}  ({types})  on {len(records)} questions; files in {args.out}"
        )
    if args.report:
        print(f"report: {args.out}/report.html")
    return 0


COMMANDS["evaluate"] = (
    "official VQA accuracy of a run on a split: predictions, accuracy JSON, evidence, ablation table",
    """
    rvqa evaluate --model runs/demo --split test --out runs/demo/eval
    rvqa evaluate --model runs/demo --split test --compare --index indices/easyvqa-paraphrased --out runs/demo/compare
    rvqa evaluate --model runs/demo --split test --no-retrieval --out runs/demo/eval-k0
    rvqa evaluate --model runs/demo --split test --compare --random-captions --report 50 --out runs/demo/ablation
    rvqa evaluate --model runs/coco_vqav2 --split test-dev --out runs/coco_vqav2/test-dev   # predictions only
    """,
    _evaluate_args,
    _cmd_evaluate,
)


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
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
    from rvqa.version import __version__

    parser.add_argument("--version", action="version", version=f"rvqa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, examples, add_args, _fn) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_args(p)
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def main(argv: list[str] | None = None) -> int:
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
    fn = COMMANDS[args.command][3]
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print("rvqa: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.debug:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"rvqa {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
