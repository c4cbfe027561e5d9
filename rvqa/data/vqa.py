"""The VQA question container: :class:`VQADataset`, a lazy sequence of :class:`VQARecord`.

Every VQA adapter (:mod:`rvqa.data.official`, :mod:`rvqa.data.easy_vqa`,
:mod:`rvqa.data.hf_datasets`) parses (and checks) the question/answer metadata
once, up front, and keeps it in compact columns (:class:`ColumnRows` or a
row source of the same shape); :class:`VQARecord` objects are built on access
and images are opened only when asked to check them up front
(:meth:`VQADataset.check_images`, :meth:`VQADataset.without_unreadable_images`);
pass ``record.image`` to :func:`rvqa.data.images.load_image`. Nothing on disk is
written or modified.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rvqa.data.lazy import LazyRecords
from rvqa.data.records import VQARecord
from rvqa.errors import DataFormatError, UsageError

__all__ = ["VQADataset", "ColumnRows", "answer_strings"]


class _Rows(Protocol):
    """What :class:`VQADataset` needs of an adapter's parsed questions."""

    has_answers: bool

    def __len__(self) -> int: ...
    def record(self, i: int) -> VQARecord: ...
    def image_id(self, i: int) -> int | str: ...
    def question_id(self, i: int) -> int: ...
    def image_file(self, i: int) -> str | None: ...


@dataclass
class ColumnRows:
    """Parsed questions in columns; one :class:`VQARecord` is built per access.

    Adapters whose image paths follow from the image id subclass it and
    override :meth:`image` (``images`` is then ``None``).
    """

    question_ids: list[int]
    questions: list[str]
    images: list[Any] | None  # None when a subclass derives paths from image ids
    image_ids: list[int | str]
    answers: list[tuple[str, ...] | None] | None = None
    question_types: list[str | None] | None = None
    answer_types: list[str | None] | None = None
    mc_answers: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.question_ids)

    @property
    def has_answers(self) -> bool:
        return self.answers is not None

    def image(self, i: int) -> Any:
        return self.images[i]

    def image_id(self, i: int) -> int | str:
        return self.image_ids[i]

    def question_id(self, i: int) -> int:
        return self.question_ids[i]

    def image_file(self, i: int) -> str | None:
        image = self.image(i)
        return image if isinstance(image, str) else None

    def record(self, i: int) -> VQARecord:
        def get(column: list | None) -> Any:
            return None if column is None else column[i]

        return VQARecord(
            question_id=self.question_ids[i],
            question=self.questions[i],
            image=self.image(i),
            image_id=self.image_ids[i],
            answers=get(self.answers),
            question_type=get(self.question_types),
            answer_type=get(self.answer_types),
            multiple_choice_answer=get(self.mc_answers),
        )


class VQADataset(LazyRecords[VQARecord]):
    """A lazy, read-only sequence of :class:`VQARecord` (one split of one source).

    Holds the parsed question/answer metadata only; records are built on access
    and images are opened only by the up-front checks (``check_images``,
    ``without_unreadable_images``, from :class:`LazyRecords`). Indexing with a slice, :meth:`subset` and
    :meth:`from_records` give new datasets sharing the same parsed data.

    Attributes:
        split: Split name (e.g. ``"train"``, ``"val2014"``).
        source: ``"vqa"``, ``"easy_vqa"``, ``"datasets"`` or ``"records"``.
        location: Where the data came from (files, folder or package), for messages.
    """

    noun = "question"

    def __init__(
        self,
        rows: _Rows,
        *,
        split: str,
        source: str,
        location: str = "",
        positions: Sequence[int] | None = None,
    ):
        self._rows = rows
        self._positions = None if positions is None else list(positions)
        self.split = split
        self.source = source
        self.location = location

    @classmethod
    def from_records(
        cls, records: Sequence[VQARecord], split: str = "custom", source: str = "records"
    ) -> VQADataset:
        """Wrap in-memory records (e.g. in tests or after filtering) as a dataset.

        ``has_answers`` is True when every record has answers.
        """
        records = list(records)
        has_answers = bool(records) and all(r.answers is not None for r in records)
        rows = ColumnRows(
            question_ids=[r.question_id for r in records],
            questions=[r.question for r in records],
            images=[r.image for r in records],
            image_ids=[r.image_id for r in records],
            answers=[r.answers for r in records] if has_answers else None,
            question_types=[r.question_type for r in records],
            answer_types=[r.answer_type for r in records],
            mc_answers=[r.multiple_choice_answer for r in records],
        )
        return cls(rows, split=split, source=source, location="<records>")

    # ---------------------------------------------------------------- Sequence

    def __len__(self) -> int:
        return len(self._rows) if self._positions is None else len(self._positions)

    def _row(self, i: int) -> int:
        return i if self._positions is None else self._positions[i]

    def _record(self, i: int) -> VQARecord:
        return self._rows.record(self._row(i))

    def _image_key(self, i: int) -> Any:
        return self._rows.image_id(self._row(i))

    def _image(self, i: int) -> Any:
        row = self._row(i)
        path = self._rows.image_file(row)
        return path if path is not None else self._rows.record(row).image

    def image_id_at(self, i: int) -> int | str:
        return self._rows.image_id(self._row(i))

    def image_file_at(self, i: int) -> str | None:
        """The image file of record ``i``, or None when the source decodes its image
        (a ``datasets.Image`` column, an in-memory image): read from the columns,
        without building the record or opening the image."""
        return self._rows.image_file(self._row(i))

    @property
    def image_source_id(self) -> str | None:
        """What identifies the images that are not files, for caches keyed by content:
        ``datasets``' fingerprint of the rows and the image column (a ``datasets``
        source), else None (in-memory records: only their pixels identify them)."""
        return getattr(self._rows, "image_source_id", None)

    def _take(self, positions: Sequence[int]) -> VQADataset:
        return VQADataset(
            self._rows,
            split=self.split,
            source=self.source,
            location=self.location,
            positions=[self._row(i) for i in positions],
        )

    def __repr__(self) -> str:
        return (
            f"VQADataset(source={self.source!r}, split={self.split!r}, questions={len(self)}, "
            f"has_answers={self.has_answers})"
        )

    # ---------------------------------------------------------------- properties

    @property
    def has_answers(self) -> bool:
        """Whether records carry human answers (False for test splits without annotations)."""
        return self._rows.has_answers

    @property
    def image_ids(self) -> list[int | str]:
        """The distinct image ids, in order of first appearance."""
        return list(dict.fromkeys(self._rows.image_id(self._row(i)) for i in range(len(self))))

    @property
    def question_ids(self) -> list[int]:
        """The question ids, in order."""
        return [self._rows.question_id(self._row(i)) for i in range(len(self))]

    # ---------------------------------------------------------------- operations

    def subset(
        self, fraction: float | None = None, *, n: int | None = None, seed: int = 0
    ) -> VQADataset:
        """A deterministic random subset of the questions, in their original order.

        Give exactly one of ``fraction`` or ``n``. The same seed always picks the
        same questions, and a smaller subset is contained in a larger one (both are
        prefixes of one seeded shuffle).

        Args:
            fraction: Keep ``round(fraction × len)`` questions (at least one), ``0 < fraction ≤ 1``.
            n: Keep at most ``n`` questions.
            seed: Seed of the shuffle.

        Raises:
            UsageError: (a ``ValueError``) Neither or both given, or out of range.
        """
        if (fraction is None) == (n is None):
            raise UsageError("subset() takes exactly one of fraction=... or n=...")
        total = len(self)
        if fraction is not None:
            if isinstance(fraction, bool) or not 0 < fraction <= 1:
                raise UsageError(f"subset fraction must be in (0, 1], got {fraction!r}")
            k = max(1, round(fraction * total)) if total else 0
        else:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise UsageError(f"subset n must be a non-negative integer, got {n!r}")
            k = min(n, total)
        if k == total:
            return self._take(range(total))
        order = list(range(total))
        random.Random(seed).shuffle(order)
        return self._take(sorted(order[:k]))

    def missing_images(self, limit: int | None = None) -> list[str]:
        """Image files (path references) that do not exist, each listed once.

        Only whether the files exist (fast); :meth:`check_images` and
        :meth:`without_unreadable_images` decode every image.

        Args:
            limit: Stop after this many (``None``: check all).
        """
        missing: list[str] = []
        seen: set[Any] = set()
        for i in range(len(self)):
            row = self._row(i)
            key = self._rows.image_id(row)
            if key in seen:
                continue
            seen.add(key)
            path = self._rows.image_file(row)
            if path is not None and not os.path.isfile(path):
                missing.append(path)
                if limit is not None and len(missing) >= limit:
                    break
        return missing


def answer_strings(value: Any, where: str) -> list[str]:
    """Human answers as given: a list of ``{"answer": ...}`` objects (official) or of strings.

    Raises:
        DataFormatError: Not a non-empty list, or an item without an answer string
            (naming ``where`` and the item's index).
    """
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{where}: 'answers' must be a non-empty list, got {value!r}")
    out = []
    for j, item in enumerate(value):
        answer = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(answer, str):
            raise DataFormatError(
                f"{where}: answers[{j}] must be a string or an object with an 'answer' string, "
                f"got {item!r}"
            )
        out.append(answer)
    return out
