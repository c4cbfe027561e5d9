"""rvqa: retrieval-augmented visual question answering.

``from rvqa import RVQA`` is lazy: importing :mod:`rvqa` (or ``rvqa.metrics``,
``rvqa.config``, ``rvqa.data``) loads no model code, no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rvqa.version import __version__

__all__ = ["RVQA", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from rvqa.pipeline import RVQA


def __getattr__(name: str) -> Any:
    if name == "RVQA":
        from rvqa.pipeline import RVQA

        return RVQA
    raise AttributeError(f"module 'rvqa' has no attribute {name!r}")
