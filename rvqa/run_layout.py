"""The run folder: what training writes where, and ``rvqa_run.json``.

A run folder (``output_dir``, e.g. ``runs/demo``) holds::

    rvqa_run.json          what RVQA.from_pretrained loads (this module's format)
    retriever/             train-retriever: best/, final/, checkpoints/, config.yaml
    reader/                train-reader:    best/, final/, checkpoints/, config.yaml,
                           feature_cache/ (a frozen image tower's features, memory-mapped),
                           retrieval_cache/ (captions retrieved for the training images)
    reranker/              train-reranker (optional): best/, final/, checkpoints/, config.yaml

``rvqa_run.json`` names the retriever, the reader, the knowledge indices and,
when one was trained, the re-ranker by paths relative to the run folder. An index inside the run folder is named
without climbing out of it; one elsewhere gets a relative path (``../../indices/x``)
and, on loading, is also looked for under its name in ``RUN/indices/`` and in an
``indices/`` folder beside or above the run folder, so a run folder moved
together with its indices still loads.

This module owns the layout; nothing else spells these names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from rvqa.errors import DataFormatError, RunFolderError
from rvqa.io import write_json_atomic

__all__ = [
    "RUN_FILE",
    "RETRIEVER_DIR",
    "READER_DIR",
    "RERANKER_DIR",
    "FEATURE_CACHE_DIR",
    "RETRIEVAL_CACHE_DIR",
    "BEST",
    "FINAL",
    "CONFIG_FILE",
    "METRICS_FILE",
    "RunFiles",
    "retriever_dir",
    "reranker_dir",
    "write_run_file",
    "add_reranker_to_run",
    "read_run_file",
]

RUN_FILE = "rvqa_run.json"
RETRIEVER_DIR = "retriever"
READER_DIR = "reader"
RERANKER_DIR = "reranker"
FEATURE_CACHE_DIR = "feature_cache"
"""In ``reader/``: the frozen image tower's feature cache (``rvqa.reader.data``)."""
RETRIEVAL_CACHE_DIR = "retrieval_cache"
"""In ``reader/``: captions retrieved for the training images (``rvqa.reader.retrieval``)."""
BEST = "best"
FINAL = "final"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
"""A retriever run's (and ``evaluate-retriever --out``'s) recall figures."""
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RunFiles:
    """What ``rvqa_run.json`` names, resolved to paths.

    Attributes:
        run_dir: The run folder.
        retriever: The retriever's ``save_pretrained`` folder.
        reader: The reader's ``save_pretrained`` folder.
        indices: Index name → index folder (the first candidate that exists; the
            recorded path when none does, so that loading names it).
        top_k: Captions the reader was trained with (``None``: not recorded).
        reranker: The re-ranker's ``save_pretrained`` folder (``None``: none recorded).
    """

    run_dir: Path
    retriever: Path
    reader: Path
    indices: dict[str, Path]
    top_k: int | None
    reranker: Path | None = None


def retriever_dir(run_dir: str | os.PathLike) -> Path:
    """The retriever a run trained: ``retriever/best`` if it exists, else ``retriever/final``.

    Raises:
        RunFolderError: Neither holds a ``config.json``.
    """
    run_dir = Path(run_dir)
    for name in (BEST, FINAL):
        p = run_dir / RETRIEVER_DIR / name
        if (p / "config.json").is_file():
            return p
    raise RunFolderError(
        f"no trained retriever under {run_dir / RETRIEVER_DIR} (expected {BEST}/ or {FINAL}/ "
        "with config.json); run `rvqa train-retriever` first or pass --retriever"
    )


def reranker_dir(run_dir: str | os.PathLike) -> Path | None:
    """The re-ranker a run trained (``reranker/best``, else ``reranker/final``), or None."""
    for name in (BEST, FINAL):
        p = Path(run_dir) / RERANKER_DIR / name
        if (p / "config.json").is_file():
            return p
    return None


def _relative(path: str | os.PathLike, run_dir: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), run_dir.resolve())).as_posix()


def write_run_file(
    run_dir: str | os.PathLike,
    retriever: str | os.PathLike,
    reader: str | os.PathLike,
    indices: dict[str, str | os.PathLike],
    top_k: int,
    reranker: str | os.PathLike | None = None,
) -> Path:
    """Write ``RUN/rvqa_run.json`` (atomically); paths are stored relative to the run.
    ``reranker``: a trained re-ranker's folder (left out when None)."""
    run_dir = Path(run_dir)
    data = {
        "format_version": FORMAT_VERSION,
        "retriever": _relative(retriever, run_dir),
        "reader": _relative(reader, run_dir),
        "indices": {name: _relative(path, run_dir) for name, path in indices.items()},
        "top_k": top_k,
    }
    if reranker is not None:
        data["reranker"] = _relative(reranker, run_dir)
    return write_json_atomic(run_dir / RUN_FILE, data)


def add_reranker_to_run(run_dir: str | os.PathLike, reranker: str | os.PathLike) -> Path | None:
    """Record ``reranker`` in an existing ``RUN/rvqa_run.json`` (atomically); a run
    without one yet (the reader not trained) is left alone and returns None:
    ``train-reader`` records the run's re-ranker when it writes the file."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        return None
    read_run_file(run_dir)  # its checks: a malformed file is not rewritten
    data = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    data["reranker"] = _relative(reranker, run_dir)  # the rest as recorded
    return write_json_atomic(run_dir / RUN_FILE, data)


def index_candidates(run_dir: Path, name: str, recorded: str) -> list[Path]:
    """Where index ``name`` of a run may be: as recorded, then by name in ``indices/``
    folders inside, beside and above the run folder (a run moved with its indices)."""
    out = [run_dir / recorded, run_dir / "indices" / name]
    for parent in list(run_dir.resolve().parents)[:2]:
        out.append(parent / "indices" / name)
    return out


def read_run_file(run_dir: str | os.PathLike) -> RunFiles:
    """Read and resolve ``RUN/rvqa_run.json``.

    Raises:
        RunFolderError: The folder or its ``rvqa_run.json`` is missing.
        DataFormatError: ``rvqa_run.json`` is malformed (named, with what is wrong; a
            ``ValueError``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise RunFolderError(
            f"{run_file} is missing: not an rvqa run folder (train with `rvqa train-reader` "
            "or run `rvqa demo`)"
        )
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
        retriever = run_dir / run["retriever"]
        reader = run_dir / run["reader"]
        recorded = dict(run.get("indices") or {})
        top_k = run.get("top_k")
        top_k = None if top_k is None else int(top_k)
        reranker = run.get("reranker")
        if reranker is not None and not isinstance(reranker, str):
            raise TypeError(f"reranker must be a path string, got {reranker!r}")
        reranker = None if reranker is None else run_dir / reranker
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataFormatError(f"{run_file} is malformed: {err}") from None
    indices: dict[str, Path] = {}
    for name, rel in recorded.items():
        if not isinstance(name, str) or not isinstance(rel, str):
            raise DataFormatError(f"{run_file} is malformed: index entry {name!r}: {rel!r}")
        candidates = index_candidates(run_dir, name, rel)
        indices[name] = next((p for p in candidates if p.is_dir()), candidates[0])
    return RunFiles(run_dir, retriever, reader, indices, top_k, reranker)
