"""The read-only, lazily built record sequence that :class:`VQADataset` and :class:`CaptionCorpus` share.

A subclass keeps its parsed data in compact columns and says how to build the
record at a position, how to take a sub-sequence and which image a record
refers to; this base gives the ``Sequence`` protocol on top (integer indexing
with negative indices and clear ``IndexError``/``TypeError``, slicing,
:meth:`~LazyRecords.take`, :meth:`~LazyRecords.image_id_at`, iteration) and the
one up-front image check both share: every distinct image decoded once
(:func:`rvqa.data.images.find_unreadable_images`), then
:meth:`LazyRecords.check_images` fails on unreadable ones or
:meth:`LazyRecords.without_unreadable_images` drops their records.
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Hashable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

from rvqa.data.images import find_unreadable_images
from rvqa.errors import ImageLoadError

if TYPE_CHECKING:  # pragma: no cover - annotations only (typing.Self needs Python 3.11)
    from typing_extensions import Self

__all__ = ["LazyRecords"]

logger = logging.getLogger(__name__)

R = TypeVar("R")


class LazyRecords(Sequence[R]):
    """A read-only sequence whose records are built on access.

    Subclasses implement ``__len__``, :meth:`_record`, :meth:`_take`,
    :meth:`_image_key` and :meth:`_image`, and set :attr:`noun` (``"question"``,
    ``"caption"``) for messages, and ``location`` (where the data came from).
    """

    noun: ClassVar[str] = "record"

    def _record(self, i: int) -> R:
        """The record at position ``i`` (``0 <= i < len(self)``)."""
        raise NotImplementedError

    def _take(self, positions: Sequence[int]) -> Self:
        """A sequence of the same kind holding the records at ``positions``, in that order."""
        raise NotImplementedError

    def _image_key(self, i: int) -> Hashable | None:
        """Equal for records of the same image; ``None``: record ``i`` has no image."""
        raise NotImplementedError

    def _image(self, i: int) -> Any:
        """The image reference of record ``i`` (what :func:`load_image` takes)."""
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

    # ---------------------------------------------------------------- image checks

    def unreadable_images(
        self, *, num_threads: int | None = None, progress: bool | None = None
    ) -> dict[Hashable, tuple[str, str]]:
        """Decode every distinct image once (a thread pool, a progress bar) and list the failures.

        Args:
            num_threads: Decoding threads (default: ``min(32, CPUs + 4)``).
            progress: A tqdm bar (default: on the main process only).

        Returns:
            ``{image key: (name, reason)}`` of the images that cannot be read (see
            :func:`rvqa.data.images.find_unreadable_images`); ``name`` is the file
            path (or a description of an in-memory image), in record order.
        """
        return self._scan_images(num_threads, progress)[0]

    def _scan_images(
        self, num_threads: int | None = None, progress: bool | None = None
    ) -> tuple[dict[Hashable, tuple[str, str]], int]:
        """:meth:`unreadable_images`, and how many distinct images were checked."""
        first: dict[Hashable, int] = {}
        for i in range(len(self)):
            key = self._image_key(i)
            if key is not None and key not in first:
                first[key] = i
        keys = list(first)
        bad = find_unreadable_images(
            (self._image(first[k]) for k in keys),
            total=len(keys),
            num_threads=num_threads,
            progress=progress,
        )
        out = {}
        for j in sorted(bad):
            image = self._image(first[keys[j]])
            if isinstance(image, (str, os.PathLike)):
                name = os.fspath(image)
            else:
                name = f"the {type(image).__name__} image of {self.noun} {first[keys[j]]}"
            out[keys[j]] = (name, bad[j])
        return out, len(keys)

    def check_images(self, max_report: int = 5) -> None:
        """Fail unless every image decodes (each distinct image is decoded once, up front).

        Raises:
            ImageLoadError: (a ``ValueError``) Naming the first unreadable file and
                why, how many of the distinct images cannot be read, and the first
                ``max_report`` of them.
        """
        bad, total = self._scan_images()
        if bad:
            (name, reason), *_ = bad.values()
            summary = self._summary(bad, total, max_report, "cannot be read", skip_first=True)
            raise ImageLoadError(name, f"{reason}; {summary}")

    def without_unreadable_images(self, max_report: int = 5) -> Self:
        """The records whose image decodes: each distinct image is decoded once, the rest dropped.

        Logs (a warning) how many images and records were dropped and the first
        ``max_report`` files with the reason. Records without an image are kept.

        Raises:
            ImageLoadError: (a ``ValueError``) No image can be read (a wrong image
                folder, most likely): nothing would be left.
        """
        bad, total = self._scan_images()
        if not bad:
            return self
        keep = [i for i in range(len(self)) if self._image_key(i) not in bad]
        if not keep:
            (name, reason), *_ = bad.values()
            summary = self._summary(bad, total, max_report, "cannot be read", skip_first=True)
            raise ImageLoadError(
                name, f"{reason}; {summary}; no {self.noun} is left: is the image folder right?"
            )
        logger.warning(
            "%s; dropped %s of %s %ss",
            self._summary(bad, total, max_report, "skipped", "that could not be read"),
            f"{len(self) - len(keep):,}",
            f"{len(self):,}",
            self.noun,
        )
        return self._take(keep)

    def _summary(
        self,
        bad: dict[Hashable, tuple[str, str]],
        total: int,
        max_report: int,
        verb: str,
        what: str = "",
        skip_first: bool = False,
    ) -> str:
        """``3 of 5,000 images of split 'train' (vqa: ...) ...: file (reason); ...``."""
        listed = list(bad.values())[int(skip_first) :]
        shown = "; ".join(f"{name} ({reason})" for name, reason in listed[:max_report])
        more = f"; ... and {len(listed) - max_report:,} more" if len(listed) > max_report else ""
        source = f"{getattr(self, 'source', '')}: {getattr(self, 'location', '')}".strip(": ")
        split = getattr(self, "split", None)
        where = f"split {split!r} ({source})" if split else source or type(self).__name__
        head = f"{len(bad):,} of {total:,} images of {where} {verb}"
        if what:  # "skipped 3 of 5,000 images ... that could not be read"
            head = f"{verb} {len(bad):,} of {total:,} images of {where} {what}"
        return f"{head}: {shown}{more}" if shown else head
