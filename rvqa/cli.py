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
    from retriever.train import train_retriever

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

    from retriever.data import load_caption_split
    from retriever.evaluation import evaluate_retriever
    from retriever.modeling import RetrieverModel

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
    from rvqa import __version__

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
