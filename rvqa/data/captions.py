"""Caption adapters: COCO, Karpathy splits, JSONL, text, ``datasets`` and easy-vqa → :class:`CaptionCorpus`.

Captions feed retriever training (image–caption pairs) and knowledge indices
(text only). Every adapter reads its file once, checks every caption (a string,
not blank) and keeps texts, ids and image references in plain lists; records are
built on access. Image files are never opened here, and nothing on disk is
written or modified.

Example:
    >>> corpus = load_captions(CaptionDataConfig(source="easy_vqa"), split="train")
    >>> len(corpus), corpus[0].caption
    (4000, 'a blue rectangle')
"""

from __future__ import annotations

import json
import logging
import operator
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from rvqa.config import CaptionDataConfig, ColumnMapping
from rvqa.data.records import CaptionRecord
from rvqa.data.vqa import (
    EASY_VQA_SPLITS,
    _image_column_kind,
    _join_root,
    _load_datasets_split,
    _read_json,
    _require_keys,
    _resolve_column,
    easy_vqa_captions,
)

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "CaptionCorpus",
    "KARPATHY_SPLITS",
    "read_coco_captions",
    "read_karpathy_captions",
    "read_jsonl_captions",
    "read_text_captions",
    "read_captions_datasets",
    "load_captions",
    "SOURCE_SPLITS",
    "load_caption_split",
    "has_split",
]

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "restval", "val", "test")


class CaptionCorpus(Sequence[CaptionRecord]):
    """A light, read-only sequence of :class:`CaptionRecord`.

    Attributes:
        texts: The captions, in order.
        ids: Their caption ids (unique).
        image_ids: The described image's id per caption (``None`` entries for
            text-only corpora).
        source: The adapter (``"coco"``, ``"karpathy"``, ``"jsonl"``, ``"text"``,
            ``"datasets"``, ``"easy_vqa"``, ``"records"``).
        location: Where the captions came from, for messages.
    """

    def __init__(
        self,
        texts: list[str],
        ids: list[int | str],
        image_ids: list[int | str | None] | None = None,
        images: Sequence[Any] | None = None,
        *,
        source: str,
        location: str = "",
    ):
        n = len(texts)
        image_ids = [None] * n if image_ids is None else image_ids
        if not len(ids) == len(image_ids) == n or (images is not None and len(images) != n):
            raise ValueError("texts, ids, image_ids and images must have the same length")
        self.texts = texts
        self.ids = ids
        self.image_ids = image_ids
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
        )

    def image(self, i: int) -> Any:
        """The image reference of caption ``i`` (path, decoded image or ``None``)."""
        return None if self._images is None else self._images[i]

    def __len__(self) -> int:
        return len(self.texts)

    @overload
    def __getitem__(self, index: int) -> CaptionRecord: ...

    @overload
    def __getitem__(self, index: slice) -> CaptionCorpus: ...

    def __getitem__(self, index: int | slice) -> CaptionRecord | CaptionCorpus:
        if isinstance(index, slice):
            keep = range(len(self))[index]
            return CaptionCorpus(
                [self.texts[i] for i in keep],
                [self.ids[i] for i in keep],
                [self.image_ids[i] for i in keep],
                None if self._images is None else [self._images[i] for i in keep],
                source=self.source,
                location=self.location,
            )
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"CaptionCorpus indices must be integers or slices, not {type(index).__name__}"
            ) from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"caption index {i} out of range for {n} captions")
        i %= n
        return CaptionRecord(
            caption=self.texts[i],
            caption_id=self.ids[i],
            image_id=self.image_ids[i],
            image=self.image(i),
        )

    def __iter__(self) -> Iterator[CaptionRecord]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"CaptionCorpus(source={self.source!r}, captions={len(self)}, location={self.location!r})"


# --------------------------------------------------------------------------- helpers


def _caption_text(value: Any, where: str) -> str:
    """A checked, stripped caption."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: the caption must be a string, got {value!r}")
    text = value.strip()
    if not text:
        raise ValueError(f"{where}: the caption is empty or whitespace only")
    return text


class _UniqueIds:
    """Collects caption ids and refuses duplicates, naming both records."""

    def __init__(self, path: str):
        self.path = path
        self.first: dict[Any, str] = {}

    def add(self, caption_id: Any, where: str) -> None:
        if isinstance(caption_id, (list, dict)) or caption_id is None:
            raise ValueError(
                f"{where}: caption id must be an integer or string, got {caption_id!r}"
            )
        if caption_id in self.first:
            raise ValueError(
                f"{where}: duplicate caption id {caption_id!r} (also at {self.first[caption_id]})"
            )
        self.first[caption_id] = where


# --------------------------------------------------------------------------- COCO


def read_coco_captions(
    path: str | os.PathLike, images: str | os.PathLike | None = None
) -> CaptionCorpus:
    """Read a COCO captions file such as ``captions_train2014.json``.

    Format: ``{"images": [{"id", "file_name", ...}], "annotations": [{"id",
    "image_id", "caption"}]}``. ``caption_id`` is the annotation id; the image path
    is ``images/file_name`` when ``images`` is given (else ``None``).

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Malformed JSON, missing keys, a caption that is not a string or
            is blank, an annotation for an image not in ``images``, duplicate ids —
            each naming the file and the record.
    """
    path = os.fspath(path)
    data = _read_json(path, "COCO captions")
    _require_keys(data, ["images", "annotations"], path, "COCO captions")
    for key in ("images", "annotations"):
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    file_of: dict[Any, str] = {}
    for idx, im in enumerate(data["images"]):
        where = f"{path}: images[{idx}]"
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise ValueError(f"{where} must be an object with 'id' and 'file_name', got {im!r}")
        file_of[im["id"]] = im["file_name"]
    texts: list[str] = []
    ids: list[int | str] = []
    image_ids: list[int | str | None] = []
    paths: list[str | None] = []
    unique = _UniqueIds(path)
    for idx, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{idx}]"
        if not isinstance(ann, dict):
            raise ValueError(f"{where} must be an object, got {type(ann).__name__}")
        where += f" (id={ann.get('id')!r})"
        missing = [k for k in ("id", "image_id", "caption") if k not in ann]
        if missing:
            raise ValueError(f"{where} has no {', '.join(map(repr, missing))}")
        image_id = ann["image_id"]
        if image_id not in file_of:
            raise ValueError(f"{where}: image_id {image_id!r} is not in the file's 'images'")
        unique.add(ann["id"], where)
        texts.append(_caption_text(ann["caption"], where))
        ids.append(ann["id"])
        image_ids.append(image_id)
        paths.append(None if images is None else os.path.join(os.fspath(images), file_of[image_id]))
    if not texts:
        raise ValueError(f"{path}: the COCO captions file has no annotations")
    logger.info("%s: %d captions of %d images", path, len(texts), len(set(image_ids)))
    return CaptionCorpus(texts, ids, image_ids, paths, source="coco", location=path)


# --------------------------------------------------------------------------- Karpathy


def _karpathy_splits(splits: str | Sequence[str]) -> list[str]:
    chosen = [splits] if isinstance(splits, str) else list(splits)
    unknown = [s for s in chosen if s not in KARPATHY_SPLITS]
    if unknown or not chosen:
        raise ValueError(
            f"unknown Karpathy split(s) {unknown or chosen!r}; known splits: "
            f"{', '.join(KARPATHY_SPLITS)}"
        )
    return chosen


def read_karpathy_captions(
    path: str | os.PathLike,
    splits: str | Sequence[str] = ("train", "restval"),
    images: str | os.PathLike | None = None,
) -> CaptionCorpus:
    """Read Karpathy's split file (``dataset_coco.json``, ``dataset_flickr30k.json``, ...).

    Format: ``{"images": [{"split", "filepath" (COCO only), "filename", "imgid",
    "cocoid" (COCO only), "sentids", "sentences": [{"raw", "tokens", "sentid",
    "imgid"}]}], "dataset": "coco" | "flickr30k"}``.

    * ``image_id``: ``cocoid`` when present (COCO), else ``imgid``.
    * ``caption_id``: ``sentid``; ``caption``: ``raw``, stripped.
    * image path: ``images/filepath/filename`` (COCO) or ``images/filename``
      (Flickr), when ``images`` is given (else ``None``).

    Args:
        path: The split file.
        splits: Which of ``train``, ``restval``, ``val``, ``test`` to read, e.g.
            ``["train", "restval"]`` (the usual training set), ``"val"``, ``"test"``.
        images: The image root folder.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Unknown split name, no image in the chosen splits, malformed
            JSON or records, blank captions, duplicate sentids (naming the file and record).
    """
    path = os.fspath(path)
    chosen = _karpathy_splits(splits)
    data = _read_json(path, "Karpathy split")
    _require_keys(data, ["images"], path, "Karpathy split")
    if not isinstance(data["images"], list):
        raise ValueError(f"{path}: 'images' must be a list, got {type(data['images']).__name__}")
    texts: list[str] = []
    ids: list[int | str] = []
    image_ids: list[int | str | None] = []
    paths: list[str | None] = []
    unique = _UniqueIds(path)
    present: set[str] = set()
    for idx, im in enumerate(data["images"]):
        where = f"{path}: images[{idx}]"
        if not isinstance(im, dict):
            raise ValueError(f"{where} must be an object, got {type(im).__name__}")
        missing = [k for k in ("split", "filename", "sentences") if k not in im]
        if "cocoid" not in im and "imgid" not in im:
            missing.append("imgid")
        if missing:
            raise ValueError(f"{where} has no {', '.join(map(repr, missing))}")
        present.add(str(im["split"]))
        if im["split"] not in chosen:
            continue
        image_id = im["cocoid"] if "cocoid" in im else im["imgid"]
        where += f" (image_id={image_id!r})"
        image_path = None
        if images is not None:
            image_path = os.path.join(os.fspath(images), im.get("filepath") or "", im["filename"])
        if not isinstance(im["sentences"], list):
            raise ValueError(f"{where}: 'sentences' must be a list")
        for j, sent in enumerate(im["sentences"]):
            at = f"{where} sentences[{j}]"
            if not isinstance(sent, dict) or "raw" not in sent or "sentid" not in sent:
                raise ValueError(f"{at} must be an object with 'raw' and 'sentid', got {sent!r}")
            at += f" (sentid={sent['sentid']!r})"
            unique.add(sent["sentid"], at)
            texts.append(_caption_text(sent["raw"], at))
            ids.append(sent["sentid"])
            image_ids.append(image_id)
            paths.append(image_path)
    if not texts:
        raise ValueError(
            f"{path}: no captions in split(s) {', '.join(chosen)}; the file has split(s): "
            f"{', '.join(sorted(present)) or 'none'}"
        )
    logger.info(
        "%s [%s]: %d captions of %d images",
        path,
        "+".join(chosen),
        len(texts),
        len(set(image_ids)),
    )
    return CaptionCorpus(
        texts, ids, image_ids, paths, source="karpathy", location=f"{path} [{'+'.join(chosen)}]"
    )


# --------------------------------------------------------------------------- JSONL and text


def _decoded_lines(path: str, what: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of a UTF-8 file, naming the line on a decoding error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: line {number}: not UTF-8 text ({err})") from None


def read_jsonl_captions(
    path: str | os.PathLike,
    columns: ColumnMapping | None = None,
    images: str | os.PathLike | None = None,
) -> CaptionCorpus:
    """Read captions from JSON Lines: one object per line, e.g. ``{"caption": ..., "id": ...}``.

    Keys follow ``columns`` (defaults: ``caption``, ``id``, ``image_id``,
    ``image``). The id is optional (default: the 1-based line number); ``image_id``
    and ``image`` (a path, joined to ``images`` when relative) are optional too.
    Blank lines are skipped.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Bad JSON, a non-object line, a missing or blank caption,
            duplicate ids — each naming the file and the line number.
    """
    path = os.fspath(path)
    columns = columns or ColumnMapping()
    root = None if images is None else os.fspath(images)
    texts: list[str] = []
    ids: list[int | str] = []
    image_ids: list[int | str | None] = []
    paths: list[str | None] = []
    unique = _UniqueIds(path)
    for number, line in _decoded_lines(path, "JSONL captions"):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: malformed JSON at column {err.colno}: {err.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if columns.caption not in obj:
            raise ValueError(
                f"{where}: no {columns.caption!r} key (keys: {', '.join(map(repr, obj)) or 'none'})"
            )
        caption_id = obj.get(columns.caption_id, number) if columns.caption_id else number
        unique.add(caption_id, where)
        texts.append(_caption_text(obj[columns.caption], where))
        ids.append(caption_id)
        image_ids.append(obj.get(columns.image_id) if columns.image_id else None)
        image = obj.get(columns.image) if columns.image else None
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{where}: {columns.image!r} must be a file path, got {image!r}")
        paths.append(None if image is None else _join_root(image, root))
    if not texts:
        raise ValueError(f"{path}: the JSONL caption file has no (non-blank) line")
    logger.info("%s: %d captions", path, len(texts))
    return CaptionCorpus(texts, ids, image_ids, paths, source="jsonl", location=path)


def read_text_captions(path: str | os.PathLike) -> CaptionCorpus:
    """Read a plain-text file with one caption per line.

    Lines are stripped, blank lines skipped; the id is the 1-based line number.
    There are no images (text-only corpus, e.g. for a knowledge index).

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: A line is not UTF-8 (naming the line), or the file has no caption.
    """
    path = os.fspath(path)
    texts: list[str] = []
    ids: list[int | str] = []
    for number, line in _decoded_lines(path, "text captions"):
        if line.strip():
            texts.append(line.strip())
            ids.append(number)
    if not texts:
        raise ValueError(f"{path}: the caption file has no (non-blank) line")
    logger.info("%s: %d captions", path, len(texts))
    return CaptionCorpus(texts, ids, source="text", location=path)


# --------------------------------------------------------------------------- datasets


class _RowImages(Sequence[Any]):
    """Decoded images of a datasets dataset, decoded on access (caption i → row)."""

    def __init__(self, ds: datasets.Dataset, column: str, rows: list[int]):
        self.ds = ds
        self.column = column
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        return self.ds[self.rows[i]][self.column]


def read_captions_datasets(
    path: str,
    split: str | None = None,
    columns: ColumnMapping | None = None,
    image_root: str | None = None,
) -> CaptionCorpus:
    """Read captions from a ``datasets`` dataset (save_to_disk folder, local files or hub name).

    Columns follow ``columns``: ``caption`` must exist and may hold one string or
    a list of strings per row (e.g. Flickr30K's five captions; each becomes a
    record, with id ``"{row id}-{j}"``). ``caption_id`` (default ``id``; else the
    row index), ``image_id`` and ``image`` are optional when left at their
    default names, required when named explicitly. The image column may be a
    ``datasets.Image`` feature (decoded lazily per record) or file paths (joined
    to ``image_root`` when relative). Without an ``image_id`` column the image
    path, or else the row index, identifies the image.

    Args:
        path: Folder, file or hub name (see :func:`rvqa.data.vqa.read_vqa_datasets`).
        split: Split name; ``None`` takes the only split, or ``"train"``.
        columns: Column names.
        image_root: Folder for relative image paths.

    Raises:
        ValueError: Unknown split (listing the known ones), a missing column
            (listing the available ones), a non-string or blank caption (naming
            the row), duplicate ids.
    """
    columns = columns or ColumnMapping()
    ds = _load_datasets_split(path, split)
    where = f"datasets dataset {path!r}" + (f" split {split!r}" if split else "")
    col_caption = _resolve_column(ds, columns, "caption", where, required=True)
    col_id = _resolve_column(ds, columns, "caption_id", where, required=False)
    col_image_id = _resolve_column(ds, columns, "image_id", where, required=False)
    col_image = _resolve_column(ds, columns, "image", where, required=False)
    image_kind = None if col_image is None else _image_column_kind(ds, col_image, where)

    raw_captions = list(ds[col_caption])
    raw_ids = list(ds[col_id]) if col_id else None
    raw_image_ids = list(ds[col_image_id]) if col_image_id else None
    raw_paths = list(ds[col_image]) if image_kind == "path" else None

    texts: list[str] = []
    ids: list[int | str] = []
    image_ids: list[int | str | None] = []
    rows: list[int] = []
    paths: list[str | None] = []
    unique = _UniqueIds(path)
    for row, value in enumerate(raw_captions):
        at = f"{where} row {row}"
        row_id = raw_ids[row] if raw_ids is not None else row
        if raw_image_ids is not None:
            image_id = raw_image_ids[row]
        elif raw_paths is not None:
            image_id = raw_paths[row]
        else:
            image_id = row if image_kind == "decoded" else None
        path_ = None
        if raw_paths is not None and raw_paths[row] is not None:
            path_ = _join_root(raw_paths[row], image_root)
        many = isinstance(value, (list, tuple))
        for j, caption in enumerate(value if many else [value]):
            caption_id = f"{row_id}-{j}" if many else row_id
            here = f"{at} caption {j}" if many else at
            unique.add(caption_id, here)
            texts.append(_caption_text(caption, here))
            ids.append(caption_id)
            image_ids.append(image_id)
            rows.append(row)
            paths.append(path_)
    images: Sequence[Any] | None
    if image_kind == "decoded":
        images = _RowImages(ds, col_image, rows)
    elif image_kind == "path":
        images = paths
    else:
        images = None
    logger.info("%s: %d captions", where, len(texts))
    return CaptionCorpus(texts, ids, image_ids, images, source="datasets", location=path)


# --------------------------------------------------------------------------- dispatch

_SOURCES = ("easy_vqa", "coco", "karpathy", "jsonl", "text", "datasets")


def load_captions(
    cfg: CaptionDataConfig, split: str | Sequence[str] | None = None
) -> CaptionCorpus:
    """The captions a run config names, dispatching on ``cfg.source``.

    Args:
        cfg: Caption source settings (``source``, ``path``, ``images``, ``splits``,
            ``columns``).
        split: easy_vqa: ``"train"`` (default) or ``"test"``. karpathy: one split
            name or a list; overrides ``cfg.splits`` when given. datasets: the
            dataset split (default: the only one, or ``"train"``). Other sources
            have no splits and take ``None``.

    Raises:
        ValueError: Unknown source, unknown split (listing the known ones), a
            missing ``cfg.path``, or any error of the adapter.
    """
    source = cfg.source
    if source not in _SOURCES:
        raise ValueError(f"unknown caption source {source!r}; known: {', '.join(_SOURCES)}")
    if source == "easy_vqa":
        name = "train" if split is None else split
        if name not in EASY_VQA_SPLITS:
            raise ValueError(
                f"unknown easy-vqa caption split {name!r}; known splits: {', '.join(EASY_VQA_SPLITS)}"
            )
        return CaptionCorpus.from_records(
            easy_vqa_captions(name), source="easy_vqa", location=f"easy-vqa {name}"
        )
    if not cfg.path:
        raise ValueError(f"captions source is {source!r} but its 'path' is not set")
    if source == "karpathy":
        return read_karpathy_captions(
            cfg.path, cfg.splits if split is None else split, images=cfg.images
        )
    if source == "datasets":
        if split is not None and not isinstance(split, str):
            raise ValueError(f"a datasets caption split must be one name, got {split!r}")
        return read_captions_datasets(cfg.path, split, cfg.columns, image_root=cfg.images)
    if split is not None:
        raise ValueError(
            f"caption source {source!r} has no splits (got split={split!r}); "
            f"splits exist for easy_vqa ({', '.join(EASY_VQA_SPLITS)}), karpathy "
            f"({', '.join(KARPATHY_SPLITS)}) and datasets"
        )
    if source == "coco":
        return read_coco_captions(cfg.path, images=cfg.images)
    if source == "jsonl":
        return read_jsonl_captions(cfg.path, cfg.columns, images=cfg.images)
    return read_text_captions(cfg.path)


# Caption sources that have named splits, and which.
SOURCE_SPLITS = {"easy_vqa": tuple(EASY_VQA_SPLITS), "karpathy": KARPATHY_SPLITS}


def load_caption_split(cfg: CaptionDataConfig, split: str) -> list[CaptionRecord]:
    """Caption records of ``split``, as a list.

    ``"train"`` of a karpathy source is every split in ``cfg.splits`` (e.g. train +
    restval); sources without splits give all their captions for any ``split``.
    """
    if cfg.source == "karpathy":
        splits = list(cfg.splits) if split == "train" else [split]
        return list(load_captions(cfg, split=splits))
    return list(load_captions(cfg, split=split if cfg.source in SOURCE_SPLITS else None))


def has_split(cfg: CaptionDataConfig, split: str | None) -> bool:
    """Whether the caption source has a split of that name."""
    return split is not None and split in SOURCE_SPLITS.get(cfg.source, ())
