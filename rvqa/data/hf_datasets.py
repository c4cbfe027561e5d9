"""``datasets`` datasets (save_to_disk folders, local data files, hub names) → :class:`VQADataset` / :class:`CaptionCorpus`.

One split is opened (memory-mapped when it is a save_to_disk folder), its
columns are mapped by a :class:`rvqa.config.ColumnMapping`, and records are
built from rows on access; image columns may hold file paths or decoded
``datasets.Image`` features. The ``datasets`` package is imported when a split
is first opened. Problems found in the data (a missing split or column, a
malformed cell) are :class:`rvqa.errors.DataFormatError` naming the dataset,
split, column and row.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rvqa.config import ColumnMapping
from rvqa.data._json import is_int, join_root, optional_str
from rvqa.data.captions import CaptionColumns, CaptionCorpus
from rvqa.data.records import NUM_HUMAN_ANSWERS, VQARecord
from rvqa.data.vqa import VQADataset, answer_strings
from rvqa.errors import ConfigError, DataFormatError

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = ["load_datasets_split", "read_captions_datasets", "read_vqa_datasets"]

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}


def load_datasets_split(path: str, split: str | None) -> datasets.Dataset:
    """One split of a ``datasets`` dataset: a save_to_disk folder, local files or a hub name.

    ``split=None`` takes the only split, or ``"train"``.

    Raises:
        DataFormatError: (a ``ValueError``) An unreadable file type, a path that is
            neither local nor loadable from the hub, an unknown split (listing the
            known ones), or several splits and none named.
    """
    import datasets

    local = Path(path)
    if local.is_dir() and (
        (local / "dataset_dict.json").is_file() or (local / "state.json").is_file()
    ):
        obj = datasets.load_from_disk(str(local))  # memory-mapped, read-only
    elif local.is_file():
        builder = _FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise DataFormatError(
                f"{path}: cannot read a datasets dataset from a {local.suffix!r} file; "
                f"expected one of {', '.join(sorted(_FILE_BUILDERS))} or a folder"
            )
        obj = datasets.load_dataset(builder, data_files=str(local))
    elif local.is_dir():
        obj = datasets.load_dataset(str(local))
    else:
        try:
            obj = datasets.load_dataset(path, split=split)
        except Exception as err:
            raise DataFormatError(
                f"could not load {path!r}: it is not a local folder or file, and loading it "
                f"as a datasets hub name failed (this needs network access or a cached "
                f"copy): {type(err).__name__}: {err}"
            ) from err
    if isinstance(obj, datasets.DatasetDict):
        names = list(obj)
        if split is None:
            if len(names) == 1 or "train" in names:
                split = names[0] if len(names) == 1 else "train"
            else:
                raise DataFormatError(f"{path} has several splits ({', '.join(names)}); name one")
        if split not in obj:
            raise DataFormatError(
                f"{path} has no split {split!r}; known splits: {', '.join(names) or 'none'}"
            )
        return obj[split]
    if split is not None and isinstance(obj, datasets.Dataset) and local.exists():
        logger.warning(
            "%s is a single dataset without named splits: using all %d rows as split %r",
            path,
            len(obj),
            split,
        )
    return obj


def _resolve_column(
    ds: datasets.Dataset, columns: ColumnMapping, field_name: str, where: str, required: bool
) -> str | None:
    """The dataset column for a ColumnMapping field, or None when absent and allowed.

    A column left at its default name may be absent (the field is then unknown);
    a column named explicitly (or a required one) must exist.
    """
    name = getattr(columns, field_name)
    if name is None:
        if required:
            raise ConfigError(f"{where}: columns.{field_name} must name a column")
        return None
    if name in ds.column_names:
        return name
    default = {f.name: f.default for f in fields(ColumnMapping)}[field_name]
    if required or name != default:
        raise DataFormatError(
            f"{where}: column {name!r} (columns.{field_name}) not found; available columns: "
            f"{', '.join(ds.column_names)}"
        )
    logger.debug("%s: no %r column; %s left unset", where, name, field_name)
    return None


def _image_column_kind(ds: datasets.Dataset, column: str, where: str) -> str:
    """``"decoded"`` for an Image feature, ``"path"`` for strings."""
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return "decoded"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "path"
    raise DataFormatError(
        f"{where}: image column {column!r} has feature {feature}; expected an Image feature "
        f"or file-path strings"
    )


def _int_id(value: Any, where: str, what: str) -> int:
    if is_int(value):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise DataFormatError(f"{where}: {what} must be an integer, got {value!r}")


def _parse_answers(value: Any, where: str) -> tuple[str, ...] | None:
    """A datasets answers cell → tuple of strings (None/empty: no answers).

    Accepts a list of strings, a list of ``{"answer": ...}`` dicts (VQAv2 on the
    hub), the dict-of-lists form ``datasets`` gives for a ``Sequence`` of dicts,
    or one string (repeated ``NUM_HUMAN_ANSWERS`` times, as for easy-vqa).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return (value,) * NUM_HUMAN_ANSWERS
    if isinstance(value, dict) and "answer" in value:
        value = value["answer"]
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        return tuple(answer_strings(list(value), where))
    raise DataFormatError(
        f"{where}: answers must be a list of strings or of {{'answer': ...}} objects, got {value!r}"
    )


class _DatasetsRows:
    """Rows of a ``datasets`` dataset, converted to records on access."""

    def __init__(
        self,
        ds: datasets.Dataset,
        columns: ColumnMapping,
        where: str,
        image_root: str | None = None,
    ):
        self.ds = ds
        self.where = where
        self.image_root = image_root
        self.col_image = _resolve_column(ds, columns, "image", where, required=True)
        self.col_question = _resolve_column(ds, columns, "question", where, required=True)
        self.col_qid = _resolve_column(ds, columns, "question_id", where, required=False)
        self.col_answers = _resolve_column(ds, columns, "answers", where, required=False)
        self.col_qtype = _resolve_column(ds, columns, "question_type", where, required=False)
        self.col_atype = _resolve_column(ds, columns, "answer_type", where, required=False)
        self.col_image_id = _resolve_column(ds, columns, "image_id", where, required=False)
        self.col_mc = (
            "multiple_choice_answer" if "multiple_choice_answer" in ds.column_names else None
        )
        self.image_kind = _image_column_kind(ds, self.col_image, where)
        if self.col_image_id is None:
            logger.warning(
                "%s: no image_id column; %s",
                where,
                "image paths serve as image ids"
                if self.image_kind == "path"
                else "each question counts as its own image (image_id = row index)",
            )
        self.has_answers = (
            self.col_answers is not None
            and len(ds) > 0
            and (_parse_answers(ds[self.col_answers][0], f"{where} row 0") is not None)
        )
        self._image_ids: list[int | str] | None = None
        self._paths: list[str | None] | None = None
        self._question_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ds)

    def _all_paths(self) -> list[str | None]:
        if self._paths is None:
            self._paths = [
                join_root(p, self.image_root) if isinstance(p, str) else None
                for p in self.ds[self.col_image]
            ]
        return self._paths

    def image_id(self, i: int) -> int | str:
        if self._image_ids is None:
            if self.col_image_id is not None:
                self._image_ids = list(self.ds[self.col_image_id])
            elif self.image_kind == "path":
                self._image_ids = [
                    p if p is not None else j for j, p in enumerate(self._all_paths())
                ]
            else:
                self._image_ids = list(range(len(self.ds)))
        return self._image_ids[i]

    def image_file(self, i: int) -> str | None:
        return self._all_paths()[i] if self.image_kind == "path" else None

    def identity(self) -> str:
        """The dataset's fingerprint (a hash of the source data and every transform after
        it, kept by ``save_to_disk``), the image column, and its Arrow files' path, size
        and mtime (see
        :attr:`VQADataset.data_identity`)."""
        files = []
        for f in self.ds.cache_files:
            try:
                st = os.stat(f["filename"])
                files.append([f["filename"], st.st_size, st.st_mtime_ns])
            except OSError:
                files.append([f["filename"], None, None])
        fingerprint = getattr(self.ds, "_fingerprint", None)
        return json.dumps({"fingerprint": fingerprint, "image": self.col_image, "files": files})

    def question_id(self, i: int) -> int:
        if self._question_ids is None:
            if self.col_qid is None:
                self._question_ids = list(range(len(self.ds)))
            else:
                self._question_ids = [
                    _int_id(v, f"{self.where} row {j}", "question_id")
                    for j, v in enumerate(self.ds[self.col_qid])
                ]
        return self._question_ids[i]

    def record(self, i: int) -> VQARecord:
        row = self.ds[i]
        where = f"{self.where} row {i}"
        image = row[self.col_image]
        if self.image_kind == "path":
            if not isinstance(image, str):
                raise DataFormatError(f"{where}: image path is {image!r}")
            image = join_root(image, self.image_root)
        elif image is None:
            raise DataFormatError(f"{where}: the image is missing (null)")
        question = row[self.col_question]
        if not isinstance(question, str):
            raise DataFormatError(f"{where}: question must be a string, got {question!r}")
        if self.col_image_id is not None:
            image_id = row[self.col_image_id]
        else:
            image_id = image if self.image_kind == "path" else i
        answers = None
        if self.has_answers:
            answers = _parse_answers(row[self.col_answers], where)

        def opt(column: str | None, key: str) -> str | None:
            return None if column is None else optional_str(row[column], where, key)

        return VQARecord(
            question_id=i
            if self.col_qid is None
            else _int_id(row[self.col_qid], where, "question_id"),
            question=question,
            image=image,
            image_id=image_id,
            answers=answers,
            question_type=opt(self.col_qtype, "question_type"),
            answer_type=opt(self.col_atype, "answer_type"),
            multiple_choice_answer=opt(self.col_mc, "multiple_choice_answer"),
        )


def read_vqa_datasets(
    path: str,
    split: str,
    columns: ColumnMapping | None = None,
    image_root: str | None = None,
) -> VQADataset:
    """Read a VQA split from a ``datasets`` dataset.

    ``path`` is a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder
    (opened with ``datasets.load_from_disk``, memory-mapped), a local data file or
    folder that ``datasets.load_dataset`` reads (JSON/JSONL, CSV, Parquet, ...),
    or a hub name (needs network access or a cached copy; failures are wrapped in
    a DataFormatError saying so).

    Columns are mapped by ``columns``: ``image`` and ``question`` must exist.
    The others (``question_id``, ``answers``, ``question_type``, ``answer_type``,
    ``image_id``) may be absent when left at their default names — the record field
    is then ``None`` (question_id: the row index; image_id: the image path, or the
    row index for decoded images) — but a column named explicitly must exist. A
    ``multiple_choice_answer`` column is used when present.

    The image column may be a ``datasets.Image`` feature (records get the decoded
    PIL image, decoded lazily per record) or file-path strings (relative paths are
    joined to ``image_root`` when given). The answers column may hold lists of
    strings, lists of ``{"answer": ...}`` dicts (VQAv2's hub format), or single
    strings (repeated ``NUM_HUMAN_ANSWERS`` = 10 times, as for easy-vqa).

    Raises:
        DataFormatError: (a ``ValueError``) Unknown split (listing the known ones),
            a missing column (naming it and the available columns), an unloadable
            path or hub name.
    """
    columns = columns or ColumnMapping()
    ds = load_datasets_split(path, split)
    where = f"datasets dataset {path!r} split {split!r}"
    rows = _DatasetsRows(ds, columns, where, image_root=image_root)
    return VQADataset(rows, split=split, source="datasets", location=path)


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
        path: Folder, file or hub name (see :func:`read_vqa_datasets`).
        split: Split name; ``None`` takes the only split, or ``"train"``.
        columns: Column names.
        image_root: Folder for relative image paths.

    Raises:
        DataFormatError: (a ``ValueError``) Unknown split (listing the known ones),
            a missing column (listing the available ones), a non-string or blank
            caption (naming the row), duplicate ids.
    """
    columns = columns or ColumnMapping()
    ds = load_datasets_split(path, split)
    where = f"datasets dataset {path!r}" + (f" split {split!r}" if split else "")
    col_caption = _resolve_column(ds, columns, "caption", where, required=True)
    col_id = _resolve_column(ds, columns, "caption_id", where, required=False)
    col_image_id = _resolve_column(ds, columns, "image_id", where, required=False)
    col_image = _resolve_column(ds, columns, "image", where, required=False)
    col_label = _resolve_column(ds, columns, "label", where, required=False)
    image_kind = None if col_image is None else _image_column_kind(ds, col_image, where)

    raw_labels = list(ds[col_label]) if col_label else None
    names = getattr(ds.features.get(col_label), "names", None) if col_label else None
    if raw_labels is not None and names:  # a ClassLabel column: its names, not 0, 1, ...
        raw_labels = [None if x is None or x < 0 else names[x] for x in raw_labels]
    raw_captions = list(ds[col_caption])
    raw_ids = list(ds[col_id]) if col_id else None
    raw_image_ids = list(ds[col_image_id]) if col_image_id else None
    raw_paths = list(ds[col_image]) if image_kind == "path" else None

    out = CaptionColumns()
    rows: list[int] = []  # the dataset row of each caption
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
            path_ = join_root(raw_paths[row], image_root)
        many = isinstance(value, (list, tuple))
        for j, caption in enumerate(value if many else [value]):
            caption_id = f"{row_id}-{j}" if many else row_id
            label = raw_labels[row] if raw_labels is not None else None
            out.add(
                caption, caption_id, f"{at} caption {j}" if many else at, image_id, path_, label
            )
            rows.append(row)
    images: Sequence[Any] | None
    if image_kind == "decoded":
        images = _RowImages(ds, col_image, rows)
    elif image_kind == "path":
        images = out.images
    else:
        images = None
    logger.info("%s: %d captions", where, len(out))
    return CaptionCorpus(
        out.texts,
        out.ids,
        out.image_ids,
        images,
        source="datasets",
        location=path,
        labels=out.labels,
    )
