"""What every data adapter shares: reading JSON and text files, checking values, joining paths.

Package-internal: the official VQA, caption-file and ``datasets`` adapters share
these, so a malformed file gets the same kind of message (file, key, index) from
each. Every failure is a :class:`rvqa.errors.DataFormatError` (a ``ValueError``)
or a ``FileNotFoundError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from rvqa.errors import DataFormatError

__all__ = ["read_json", "require_keys", "is_int", "optional_str", "decoded_lines", "join_root"]


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file.

    Args:
        path: The file.
        what: What the file holds (``"questions"``, ``"COCO captions"``), for messages.

    Raises:
        FileNotFoundError: The file is missing.
        DataFormatError: Malformed JSON (with its position) or not UTF-8.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}: malformed JSON in {what} file at line {err.lineno} column {err.colno} "
            f"(char {err.pos}): {err.msg}"
        ) from None
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: {what} file is not UTF-8 text ({err})") from None


def require_keys(data: Any, keys: Sequence[str], path: str, what: str) -> None:
    """Check that ``data`` is a JSON object with every key in ``keys``.

    Raises:
        DataFormatError: Not an object, or keys missing (naming them and the keys found).
    """
    if not isinstance(data, dict):
        raise DataFormatError(
            f"{path}: expected a JSON object at the top level of the {what} file, "
            f"got {type(data).__name__}"
        )
    missing = [k for k in keys if k not in data]
    if missing:
        raise DataFormatError(
            f"{path}: the {what} file has no top-level key {', '.join(map(repr, missing))} "
            f"(found: {', '.join(map(repr, data)) or 'none'}); is this the right file?"
        )


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (``bool`` is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def optional_str(value: Any, where: str, key: str) -> str | None:
    """``value`` when it is a string or ``None``.

    Raises:
        DataFormatError: Anything else, naming ``where`` and ``key``.
    """
    if value is None or isinstance(value, str):
        return value
    raise DataFormatError(f"{where}: {key!r} must be a string, got {value!r}")


def decoded_lines(path: str, what: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of a UTF-8 file (a leading BOM is dropped).

    Raises:
        FileNotFoundError: The file is missing.
        DataFormatError: A line is not UTF-8, naming the line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{path}: line {number}: not UTF-8 text ({err})") from None


def join_root(path: str, root: str | None) -> str:
    """``path`` joined to the folder ``root`` when relative (``root=None``: unchanged)."""
    return path if root is None or os.path.isabs(path) else os.path.join(root, path)
