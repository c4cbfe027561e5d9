"""The installed rvqa version: one source of truth, ``pyproject.toml``'s ``version``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rvqa")
except PackageNotFoundError:  # pragma: no cover - a bare checkout, not installed
    __version__ = "0.0.0+unknown"
