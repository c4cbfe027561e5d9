"""The retrieval-augmented multimodal reader, its answer vocabulary and training.

Names are imported lazily: ``from reader import AnswerVocab`` loads no torch, and
``reader.ReaderModel`` loads the model code on first use.
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
    "AnswerCoverage": "reader.answers",
    "AnswerVocab": "reader.answers",
    "build_vocab": "reader.answers",
    "soft_score": "reader.answers",
    "ReaderConfig": "reader.configuration",
    "ReaderModel": "reader.modeling",
    "ReaderOutput": "reader.modeling",
    "ReaderProcessor": "reader.processing",
}

if TYPE_CHECKING:  # pragma: no cover
    from rvqa.reader.answers import AnswerCoverage, AnswerVocab, build_vocab, soft_score
    from rvqa.reader.configuration import ReaderConfig
    from rvqa.reader.modeling import ReaderModel, ReaderOutput
    from rvqa.reader.processing import ReaderProcessor


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'reader' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
