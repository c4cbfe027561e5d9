"""rvqa: retrieval-augmented visual question answering.

The public API, imported lazily (the ``_import_structure`` pattern of
``transformers``): ``import rvqa`` loads no torch; ``rvqa.RVQA`` loads the model
code on first use, ``rvqa.load_config`` only the settings module.

    >>> from rvqa import RVQA
    >>> model = RVQA.from_pretrained("runs/demo")
    >>> model.answer("image.png", "what color is the shape?").answer
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rvqa.version import __version__

_ERRORS = [
    "RVQAError",
    "ConfigError",
    "DataFormatError",
    "ImageLoadError",
    "IndexFormatError",
    "IndexMismatchError",
    "UnknownIndexError",
    "RunFolderError",
    "ResumeError",
    "UsageError",
]

# Public name → the module that defines it (imported on first access).
_WHERE: dict[str, str] = {
    "RVQA": "rvqa.pipeline",
    "Answer": "rvqa.pipeline",
    "Evidence": "rvqa.pipeline",
    "ALL_INDICES": "rvqa.pipeline",
    "load_config": "rvqa.config",
    "RunConfig": "rvqa.config",
    **dict.fromkeys(_ERRORS, "rvqa.errors"),
}

__all__ = [
    "RVQA",
    "Answer",
    "Evidence",
    "ALL_INDICES",
    "load_config",
    "RunConfig",
    "RVQAError",
    "ConfigError",
    "DataFormatError",
    "ImageLoadError",
    "IndexFormatError",
    "IndexMismatchError",
    "UnknownIndexError",
    "RunFolderError",
    "ResumeError",
    "UsageError",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from rvqa.config import RunConfig, load_config
    from rvqa.errors import (
        ConfigError,
        DataFormatError,
        ImageLoadError,
        IndexFormatError,
        IndexMismatchError,
        ResumeError,
        RunFolderError,
        RVQAError,
        UnknownIndexError,
        UsageError,
    )
    from rvqa.pipeline import ALL_INDICES, RVQA, Answer, Evidence


def __getattr__(name: str) -> Any:
    # Lazy on purpose: importing rvqa must not load torch (only RVQA needs it).
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'rvqa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
