"""What every data adapter shares: streaming JSON files, reading UTF-8 text, checking values, joining paths.

Package-internal: the official VQA, caption-file and ``datasets`` adapters share
these, so a malformed file gets the same kind of message (file, key, index) from
each. The big official files (VQAv2 train annotations: ~330 MB of JSON) are
streamed with ``ijson`` (:func:`stream_json`): only the adapter's compact
columns and one chunk of items are in memory, never the whole parsed document.
Every failure is a :class:`rvqa.errors.DataFormatError` (a ``ValueError``) or a
``FileNotFoundError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import ijson

from rvqa.errors import DataFormatError

__all__ = [
    "stream_json",
    "is_int",
    "optional_str",
    "decoded_lines",
    "join_root",
]

_CHUNK = 1 << 16  # bytes read at a time (ijson's C parser is fastest around 64 KiB)
_NO_MATCH = "\x00"  # an ijson prefix no JSON key path has: parse, build nothing


def stream_json(
    path: str | os.PathLike,
    what: str,
    arrays: Sequence[str],
    values: dict[str, Any] | None = None,
) -> Iterator[tuple[str, int, Any]]:
    """Stream the items of top-level arrays of a JSON object file.

    Yields ``(key, index, item)`` for every item of the top-level arrays named in
    ``arrays``: all of the first array's items in file order, then the next
    array's (one parsing pass each, by ijson's C parser). Items are built as the
    file is read, so memory holds what the caller keeps, not the document.
    Numbers are ``int`` or ``float`` (as with ``json.load``).

    ``values`` (when given) is filled first (one more pass, building only those
    values): each of its keys that the file has at the top level maps to its
    value, e.g. ``{"data_subtype": None}`` → ``{"data_subtype": "val2014"}``; keys
    the file lacks keep their value. Top-level keys may come in any order.

    When the iterator is exhausted the file has been checked: well-formed UTF-8
    JSON whose top level is an object holding every key of ``arrays`` as a list.

    Args:
        path: The file.
        what: What the file holds (``"questions"``, ``"COCO captions"``), for messages.
        arrays: Top-level keys whose values must be lists, streamed item by item.
        values: Small top-level values to read too, filled in place.

    Raises:
        FileNotFoundError: The file is missing.
        DataFormatError: Malformed JSON (line, column and byte offset of where the
            parser stopped, with the text around it), not UTF-8, the top level not
            an object, a key of ``arrays`` missing or not a list.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    for key in values or {}:
        found = list(_items(path, what, key))
        if found:
            values[key] = found[-1]  # as json.load: the last of repeated keys
    empty = []
    for key in arrays:
        count = 0
        for count, item in enumerate(_items(path, what, f"{key}.item"), start=1):
            yield key, count - 1, item
        if count == 0:
            empty.append(key)
    # An absent, non-list or empty array yields nothing: find out which (one more pass,
    # only then — an empty list is fine).
    if empty:
        _check_top_level(path, what, empty)


def _items(path: str, what: str, prefix: str) -> Iterator[Any]:
    """ijson's items at ``prefix``, a malformed file raising a :class:`DataFormatError`."""
    with open(path, "rb") as f:
        try:
            yield from ijson.items(f, prefix, use_float=True, buf_size=_CHUNK)
        except ijson.JSONError as err:
            # The parser has read up to f.tell(): the failure is in the last chunk read.
            raise _malformed(path, what, max(0, -(-f.tell() // _CHUNK) - 1), err) from None


def _check_top_level(path: str, what: str, arrays: Sequence[str]) -> None:
    """Fail unless the (well-formed) file is an object with every key of ``arrays`` a list."""
    kinds: dict[str, str] = {}
    with open(path, "rb") as f:
        events = ijson.parse(f, use_float=True)
        prefix, event, value = next(events)
        if event != "start_map":
            raise DataFormatError(
                f"{path}: expected a JSON object at the top level of the {what} file, "
                f"got {_type_name(event, value)}"
            )
        key = None
        for prefix, event, value in events:
            if key is not None:  # the event right after a top-level key: its value's type
                kinds[key] = _type_name(event, value)
                key = None
            elif prefix == "" and event == "map_key":
                key = value
    missing = [k for k in arrays if k not in kinds]
    if missing:
        raise DataFormatError(
            f"{path}: the {what} file has no top-level key {', '.join(map(repr, missing))} "
            f"(found: {', '.join(map(repr, kinds)) or 'none'}); is this the right file?"
        )
    for k in arrays:
        if kinds[k] != "list":
            raise DataFormatError(f"{path}: {k!r} must be a list, got {kinds[k]}")


def _type_name(event: str, value: Any) -> str:
    """The Python type name ``json.load`` gives the value an ijson event starts."""
    if event == "number":
        return type(value).__name__
    names = {"start_map": "dict", "start_array": "list", "string": "str", "boolean": "bool"}
    return names.get(event, "NoneType")


def _malformed(path: str, what: str, chunk_index: int, err: Exception) -> DataFormatError:
    """The error for a parse failure in chunk ``chunk_index`` (or at the end), with its position.

    The parser reports what went wrong but not where; feeding the failing chunk
    again one byte at a time (after the chunks before it, a second pass that runs
    only on this error path) finds the byte at which it stops.
    """
    message = str(err)
    if message.startswith(("b'", 'b"')):  # yajl's UTF-8 errors come as a bytes repr
        message = message[2:-1].encode().decode("unicode_escape", errors="replace")
    head, _, rest = message.partition("\n")
    context = rest.partition("\n")[0].strip()
    offset, line, column = _error_position(path, chunk_index)
    at = f"line {line} column {column} (byte {offset:,})"
    if "UTF8" in head:  # found when the string ends
        return DataFormatError(
            f"{path}: {what} file is not UTF-8 text: invalid bytes in the string ending at {at}"
        )
    near = f" near {context!r}" if context else ""
    return DataFormatError(
        f"{path}: malformed JSON in {what} file at {at}: {head.rstrip('.')}{near}"
    )


def _error_position(path: str, chunk_index: int) -> tuple[int, int, int]:
    """(0-based byte offset, 1-based line, 1-based byte column) where the parser fails."""
    sink = ijson.sendable_list()
    coro = ijson.items_coro(sink, _NO_MATCH)
    offset, line, line_start = 0, 1, 0
    with open(path, "rb") as f:
        for _ in range(chunk_index):
            chunk = f.read(_CHUNK)
            coro.send(chunk)
            line += chunk.count(b"\n")
            if (nl := chunk.rfind(b"\n")) >= 0:
                line_start = offset + nl + 1
            offset += len(chunk)
        data = f.read(_CHUNK)  # the failing chunk; empty when the end of the file failed
    stop = len(data)
    try:
        for i in range(len(data)):
            stop = i
            coro.send(data[i : i + 1])
        stop = len(data)
        coro.close()
    except ijson.JSONError:
        pass
    before = data[:stop]
    line += before.count(b"\n")
    if (nl := before.rfind(b"\n")) >= 0:
        line_start = offset + nl + 1
    offset += stop
    return offset, line, offset - line_start + 1


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
