"""The retrieval-augmented multimodal reader, its answer vocabulary and training.

Names are imported lazily (the laziness is the point of the function-level import
below): ``from rvqa.reader import AnswerVocab`` loads no torch, and
``rvqa.reader.ReaderModel`` loads the model code on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AnswerCoverage",
    "AnswerVocab",
    "ReaderConfig",
    "ReaderModel",
    "ReaderOutput",
    "ReaderProcessor",
    "build_vocab",
    "soft_score",
]

_WHERE = {
    "AnswerCoverage": "rvqa.reader.answers",
    "AnswerVocab": "rvqa.reader.answers",
    "build_vocab": "rvqa.reader.answers",
    "soft_score": "rvqa.reader.answers",
    "ReaderConfig": "rvqa.reader.configuration",
    "ReaderModel": "rvqa.reader.modeling",
    "ReaderOutput": "rvqa.reader.modeling",
    "ReaderProcessor": "rvqa.reader.processing",
}

if TYPE_CHECKING:  # pragma: no cover
    from rvqa.reader.answers import AnswerCoverage, AnswerVocab, build_vocab, soft_score
    from rvqa.reader.configuration import ReaderConfig
    from rvqa.reader.modeling import ReaderModel, ReaderOutput
    from rvqa.reader.processing import ReaderProcessor


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
