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
