"""The errors rvqa raises for what a user got wrong.

Every class derives from :class:`RVQAError` and from the builtin a caller would
already catch (``ValueError``, ``FileNotFoundError``, ``KeyError``), so
``except ValueError`` code keeps working. The CLI prints an :class:`RVQAError`
(and the ``OSError`` family: a missing or unwritable path) in one line; any
other exception is a bug and shows its traceback.

This module imports nothing from the project and nothing heavy: every layer
may raise these.
"""

from __future__ import annotations

import os

__all__ = [
    "RVQAError",
    "ConfigError",
    "DataFormatError",
    "ImageLoadError",
    "IndexFormatError",
    "KnowledgeTaskError",
    "IndexMismatchError",
    "UnknownIndexError",
    "RunFolderError",
    "ResumeError",
    "UsageError",
]


class RVQAError(Exception):
    """Base of every error that means "the input was wrong", not "rvqa has a bug"."""


class ConfigError(RVQAError, ValueError):
    """A run config could not be loaded: unknown key, wrong type, bad value."""


class DataFormatError(RVQAError, ValueError):
    """A data file (questions, annotations, captions, a datasets folder) is malformed."""


class ImageLoadError(RVQAError, ValueError):
    """An image file could not be read: missing, empty, truncated or not an image.

    Attributes:
        path: The file that failed.
        reason: Why, in words.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path!r}: {reason}")

    def __reduce__(self) -> tuple:
        # Pickled with its two arguments (DataLoader workers hand it to the main process).
        return type(self), (self.path, self.reason)


class KnowledgeTaskError(RVQAError, ValueError):
    """The knowledge task (``rvqa make-knowledge-task``): an assignment that does not
    exist, contradicting assignments, or a text that is not a fact of the task."""


class IndexFormatError(RVQAError, ValueError):
    """A knowledge index folder is malformed, truncated, or from a newer rvqa."""


class IndexMismatchError(RVQAError, ValueError):
    """A knowledge index was built by another retriever than the one in use."""


class UnknownIndexError(RVQAError, KeyError):
    """A knowledge index name that is not loaded.

    ``str()`` gives the message itself (a plain ``KeyError`` would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RunFolderError(RVQAError, FileNotFoundError):
    """A run folder (``rvqa_run.json`` and what it names) is missing a part."""


class ResumeError(RVQAError, ValueError):
    """A training run cannot resume from the given checkpoint."""


class UsageError(RVQAError, ValueError):
    """Arguments that contradict each other or are out of range (API or CLI)."""
