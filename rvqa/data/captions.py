"""The caption container: :class:`CaptionCorpus`, a lazy sequence of :class:`CaptionRecord`.

Captions feed retriever training (image–caption pairs) and knowledge indices
(text only). Every caption adapter (:mod:`rvqa.data.caption_files`,
:mod:`rvqa.data.hf_datasets`, easy-vqa via :mod:`rvqa.data.sources`) reads its
data once, checks every caption with :func:`caption_text` and its id with
:class:`UniqueIds`, and keeps texts, ids and image references in plain lists;
records are built on access. Image files are opened only by the up-front
checks (``check_images``, ``without_unreadable_images``, from
:class:`rvqa.data.lazy.LazyRecords`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rvqa.data.images import image_key
from rvqa.data.lazy import LazyRecords
from rvqa.data.records import CaptionRecord
from rvqa.errors import DataFormatError

__all__ = ["CaptionColumns", "CaptionCorpus", "UniqueIds", "caption_label", "caption_text"]


class CaptionCorpus(LazyRecords[CaptionRecord]):
    """A light, read-only sequence of :class:`CaptionRecord`.

    Attributes:
        texts: The captions, in order.
        ids: Their caption ids (unique).
        image_ids: The described image's id per caption (``None`` entries for
            text-only corpora).
        labels: The semantic category per caption (``None`` entries where unknown).
        source: The adapter (``"coco"``, ``"karpathy"``, ``"jsonl"``, ``"text"``,
            ``"datasets"``, ``"easy_vqa"``, ``"records"``).
        location: Where the captions came from, for messages.
    """

    noun = "caption"

    def __init__(
        self,
        texts: list[str],
        ids: list[int | str],
        image_ids: list[int | str | None] | None = None,
        images: Sequence[Any] | None = None,
        *,
        source: str,
        location: str = "",
        labels: list[str | None] | None = None,
    ):
        n = len(texts)
        image_ids = [None] * n if image_ids is None else image_ids
        labels = [None] * n if labels is None else labels
        if not len(ids) == len(image_ids) == len(labels) == n or (
            images is not None and len(images) != n
        ):
            raise ValueError("texts, ids, image_ids, labels and images must have the same length")
        self.texts = texts
        self.ids = ids
        self.image_ids = image_ids
        self.labels = labels
        self._images = images
        self.source = source
        self.location = location

    @classmethod
    def from_records(
        cls, records: Sequence[CaptionRecord], source: str = "records", location: str = ""
    ) -> CaptionCorpus:
        """Wrap in-memory records (e.g. easy-vqa captions, or a filtered corpus)."""
        records = list(records)
        return cls(
            [r.caption for r in records],
            [r.caption_id for r in records],
            [r.image_id for r in records],
            [r.image for r in records],
            source=source,
            location=location or "<records>",
            labels=[r.label for r in records],
        )

    def image(self, i: int) -> Any:
        """The image reference of caption ``i`` (path, decoded image or ``None``)."""
        return None if self._images is None else self._images[i]

    def __len__(self) -> int:
        return len(self.texts)

    def _record(self, i: int) -> CaptionRecord:
        return CaptionRecord(
            caption=self.texts[i],
            caption_id=self.ids[i],
            image_id=self.image_ids[i],
            image=self.image(i),
            label=self.labels[i],
        )

    def _image_key(self, i: int) -> Any:
        # By image id when known: stable, and no decoded image (a datasets column) is built.
        if self._images is None:
            return None
        if self.image_ids[i] is not None:
            return ("image_id", self.image_ids[i])
        image = self._images[i]
        return None if image is None else image_key(image)

    def _image(self, i: int) -> Any:
        return self.image(i)

    def image_id_at(self, i: int) -> int | str | None:
        return self.image_ids[i]

    def _take(self, positions: Sequence[int]) -> CaptionCorpus:
        return CaptionCorpus(
            [self.texts[i] for i in positions],
            [self.ids[i] for i in positions],
            [self.image_ids[i] for i in positions],
            None if self._images is None else [self._images[i] for i in positions],
            source=self.source,
            location=self.location,
            labels=[self.labels[i] for i in positions],
        )

    def __repr__(self) -> str:
        return f"CaptionCorpus(source={self.source!r}, captions={len(self)}, location={self.location!r})"


def caption_text(value: Any, where: str) -> str:
    """A checked, stripped caption.

    Raises:
        DataFormatError: Not a string, or blank (naming ``where``).
    """
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: the caption must be a string, got {value!r}")
    text = value.strip()
    if not text:
        raise DataFormatError(f"{where}: the caption is empty or whitespace only")
    return text


def caption_label(value: Any, where: str) -> str | None:
    """A checked category label: ``None``, or a non-blank string (integers become strings).

    Raises:
        DataFormatError: Any other type, or a blank string (naming ``where``).
    """
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # e.g. a pandas/Arrow int column with nulls
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(
            f"{where}: the label must be a string or an integer, got {type(value).__name__} {value!r}"
        )
    text = str(value).strip()
    if not text:
        raise DataFormatError(f"{where}: the label is blank")
    return text


class UniqueIds:
    """Collects caption ids and refuses duplicates, naming both records."""

    def __init__(self) -> None:
        self.first: dict[Any, str] = {}

    def add(self, caption_id: Any, where: str) -> None:
        """Record ``caption_id``, found at ``where``.

        Raises:
            DataFormatError: The id is not an integer or string, or was seen before.
        """
        if isinstance(caption_id, (list, dict)) or caption_id is None:
            raise DataFormatError(
                f"{where}: caption id must be an integer or string, got {caption_id!r}"
            )
        if caption_id in self.first:
            raise DataFormatError(
                f"{where}: duplicate caption id {caption_id!r} (also at {self.first[caption_id]})"
            )
        self.first[caption_id] = where


class CaptionColumns:
    """A caption adapter's output, collected one checked caption at a time.

    :meth:`add` checks the caption (:func:`caption_text`) and its id
    (:class:`UniqueIds`) and appends to the columns; :meth:`corpus` wraps them.

    Attributes:
        texts: The checked, stripped captions.
        ids: Their ids.
        image_ids: The described image's id per caption (or ``None``).
        images: The image reference per caption (a path, or ``None``).
        labels: The semantic category per caption (or ``None``).
    """

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.ids: list[int | str] = []
        self.image_ids: list[int | str | None] = []
        self.images: list[str | None] = []
        self.labels: list[str | None] = []
        self._unique = UniqueIds()

    def __len__(self) -> int:
        return len(self.texts)

    def add(
        self,
        caption: Any,
        caption_id: Any,
        where: str,
        image_id: int | str | None = None,
        image: str | None = None,
        label: Any = None,
    ) -> None:
        """Check and append one caption found at ``where``.

        Raises:
            DataFormatError: A bad or duplicate id, a caption that is not a string or
                is blank, or a label that is not a string or an integer (naming ``where``).
        """
        self._unique.add(caption_id, where)
        self.texts.append(caption_text(caption, where))
        self.ids.append(caption_id)
        self.image_ids.append(image_id)
        self.images.append(image)
        self.labels.append(caption_label(label, where))

    def corpus(self, *, source: str, location: str) -> CaptionCorpus:
        """The collected captions as a :class:`CaptionCorpus` (``source``: the adapter's name)."""
        return CaptionCorpus(
            self.texts,
            self.ids,
            self.image_ids,
            self.images,
            source=source,
            location=location,
            labels=self.labels,
        )
