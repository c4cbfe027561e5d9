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

from rvqa import errors
from rvqa.errors import *  # noqa: F403 - the error classes: stdlib-only, imported eagerly
from rvqa.version import __version__

# Public name → the module that defines it, imported on first access (the laziness is
# the point: only RVQA needs torch).
_WHERE: dict[str, str] = {
    "RVQA": "rvqa.pipeline",
    "Answer": "rvqa.pipeline",
    "Evidence": "rvqa.pipeline",
    "ALL_INDICES": "rvqa.pipeline",
    "load_config": "rvqa.config",
    "RunConfig": "rvqa.config",
}

__all__ = [*_WHERE, *errors.__all__, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from rvqa.config import RunConfig as RunConfig
    from rvqa.config import load_config as load_config
    from rvqa.pipeline import ALL_INDICES as ALL_INDICES
    from rvqa.pipeline import RVQA as RVQA
    from rvqa.pipeline import Answer as Answer
    from rvqa.pipeline import Evidence as Evidence


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'rvqa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
