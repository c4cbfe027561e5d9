"""The read-only, lazily built record sequence that :class:`VQADataset` and :class:`CaptionCorpus` share.

A subclass keeps its parsed data in compact columns and says how to build the
record at a position and how to take a sub-sequence; this base gives the
``Sequence`` protocol on top: integer indexing (negative indices, clear
``IndexError``/``TypeError``), slicing, :meth:`~LazyRecords.take`, :meth:`~LazyRecords.image_id_at` and iteration.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

if TYPE_CHECKING:  # pragma: no cover - annotations only (typing.Self needs Python 3.11)
    from typing_extensions import Self

__all__ = ["LazyRecords"]

R = TypeVar("R")


class LazyRecords(Sequence[R]):
    """A read-only sequence whose records are built on access.

    Subclasses implement ``__len__``, :meth:`_record` and :meth:`_take`, and set
    :attr:`noun` (``"question"``, ``"caption"``) for error messages.
    """

    noun: ClassVar[str] = "record"

    def _record(self, i: int) -> R:
        """The record at position ``i`` (``0 <= i < len(self)``)."""
        raise NotImplementedError

    def _take(self, positions: Sequence[int]) -> Self:
        """A sequence of the same kind holding the records at ``positions``, in that order."""
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> R: ...

    @overload
    def __getitem__(self, index: slice) -> Self: ...

    def __getitem__(self, index: int | slice) -> R | Self:
        if isinstance(index, slice):
            return self._take(range(len(self))[index])
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"{type(self).__name__} indices must be integers or slices, "
                f"not {type(index).__name__}"
            ) from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.noun} index {i} out of range for {n} {self.noun}s")
        return self._record(i % n)

    def image_id_at(self, i: int) -> Any:
        """The image id of record ``i`` (``0 <= i < len(self)``); subclasses read it from
        their columns, without building the record (or decoding its image)."""
        return self._record(i).image_id

    def take(self, positions: Sequence[int]) -> Self:
        """The records at ``positions`` (in that order) as a sequence of the same kind,
        sharing the parsed data (a subset costs one integer per record).

        Raises:
            IndexError: A position out of range.
        """
        n = len(self)
        positions = [operator.index(i) for i in positions]
        bad = next((i for i in positions if not 0 <= i < n), None)
        if bad is not None:
            raise IndexError(f"{self.noun} index {bad} out of range for {n} {self.noun}s")
        return self._take(positions)

    def __iter__(self) -> Iterator[R]:
        for i in range(len(self)):
            yield self._record(i)
