"""Caption files: COCO captions JSON, Karpathy split files, JSON Lines and plain text → :class:`CaptionCorpus`.

Each reader parses its file once and checks every caption (a string, not blank)
and id (unique); a malformed file is a :class:`rvqa.errors.DataFormatError`
naming the file and the record (index, id or line number). The COCO and Karpathy
JSON files are streamed (:func:`rvqa.data._json.stream_json`): memory holds the
caption columns, not the parsed document. Nothing on disk is written or modified.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from rvqa.config import ColumnMapping
from rvqa.data._json import decoded_lines, join_root, stream_json
from rvqa.data.captions import CaptionColumns, CaptionCorpus
from rvqa.errors import DataFormatError, UsageError

__all__ = [
    "KARPATHY_SPLITS",
    "read_coco_captions",
    "read_jsonl_captions",
    "read_karpathy_captions",
    "read_text_captions",
]

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def read_coco_captions(
    path: str | os.PathLike, images: str | os.PathLike | None = None
) -> CaptionCorpus:
    """Read a COCO captions file such as ``captions_train2014.json``.

    Format: ``{"images": [{"id", "file_name", ...}], "annotations": [{"id",
    "image_id", "caption"}]}``. ``caption_id`` is the annotation id; the image path
    is ``images/file_name`` when ``images`` is given (else ``None``).

    Raises:
        FileNotFoundError: The file is missing.
        DataFormatError: (a ``ValueError``) Malformed JSON, missing keys, a caption
            that is not a string or is blank, an annotation for an image not in
            ``images``, duplicate ids — each naming the file and the record.
    """
    path = os.fspath(path)
    file_of: dict[Any, str] = {}
    out = CaptionColumns()
    # stream_json gives every image (the first array) before the first annotation.
    for key, idx, item in stream_json(path, "COCO captions", ["images", "annotations"]):
        where = f"{path}: {key}[{idx}]"
        if key == "images":
            if not isinstance(item, dict) or "id" not in item or "file_name" not in item:
                raise DataFormatError(
                    f"{where} must be an object with 'id' and 'file_name', got {item!r}"
                )
            file_of[item["id"]] = item["file_name"]
            continue
        if not isinstance(item, dict):
            raise DataFormatError(f"{where} must be an object, got {type(item).__name__}")
        where += f" (id={item.get('id')!r})"
        missing = [k for k in ("id", "image_id", "caption") if k not in item]
        if missing:
            raise DataFormatError(f"{where} has no {', '.join(map(repr, missing))}")
        image_id = item["image_id"]
        if image_id not in file_of:
            raise DataFormatError(f"{where}: image_id {image_id!r} is not in the file's 'images'")
        image = None if images is None else os.path.join(os.fspath(images), file_of[image_id])
        out.add(item["caption"], item["id"], where, image_id, image)
    if not out:
        raise DataFormatError(f"{path}: the COCO captions file has no annotations")
    logger.info("%s: %d captions of %d images", path, len(out), len(set(out.image_ids)))
    return out.corpus(source="coco", location=path)


def _karpathy_splits(splits: str | Sequence[str]) -> list[str]:
    chosen = [splits] if isinstance(splits, str) else list(splits)
    unknown = [s for s in chosen if s not in KARPATHY_SPLITS]
    if unknown or not chosen:
        raise UsageError(
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
    * ``label``: an image's optional ``label`` key (not in Karpathy's own files;
      ``benchmarks/compositional_pairs.py`` writes one), for every caption of it.

    Args:
        path: The split file.
        splits: Which of ``train``, ``restval``, ``val``, ``test`` to read, e.g.
            ``["train", "restval"]`` (the usual training set), ``"val"``, ``"test"``.
        images: The image root folder.

    Raises:
        FileNotFoundError: The file is missing.
        UsageError: (a ``ValueError``) Unknown split name.
        DataFormatError: (a ``ValueError``) No image in the chosen splits, malformed
            JSON or records, blank captions, duplicate sentids (naming the file and record).
    """
    path = os.fspath(path)
    chosen = _karpathy_splits(splits)
    out = CaptionColumns()
    present: set[str] = set()
    for _, idx, im in stream_json(path, "Karpathy split", ["images"]):
        where = f"{path}: images[{idx}]"
        if not isinstance(im, dict):
            raise DataFormatError(f"{where} must be an object, got {type(im).__name__}")
        missing = [k for k in ("split", "filename", "sentences") if k not in im]
        if "cocoid" not in im and "imgid" not in im:
            missing.append("imgid")
        if missing:
            raise DataFormatError(f"{where} has no {', '.join(map(repr, missing))}")
        present.add(str(im["split"]))
        if im["split"] not in chosen:
            continue
        image_id = im["cocoid"] if "cocoid" in im else im["imgid"]
        where += f" (image_id={image_id!r})"
        image_path = None
        if images is not None:
            image_path = os.path.join(os.fspath(images), im.get("filepath") or "", im["filename"])
        if not isinstance(im["sentences"], list):
            raise DataFormatError(f"{where}: 'sentences' must be a list")
        for j, sent in enumerate(im["sentences"]):
            at = f"{where} sentences[{j}]"
            if not isinstance(sent, dict) or "raw" not in sent or "sentid" not in sent:
                raise DataFormatError(
                    f"{at} must be an object with 'raw' and 'sentid', got {sent!r}"
                )
            at += f" (sentid={sent['sentid']!r})"
            out.add(sent["raw"], sent["sentid"], at, image_id, image_path, im.get("label"))
    if not out:
        raise DataFormatError(
            f"{path}: no captions in split(s) {', '.join(chosen)}; the file has split(s): "
            f"{', '.join(sorted(present)) or 'none'}"
        )
    logger.info(
        "%s [%s]: %d captions of %d images",
        path,
        "+".join(chosen),
        len(out),
        len(set(out.image_ids)),
    )
    return out.corpus(source="karpathy", location=f"{path} [{'+'.join(chosen)}]")


def read_jsonl_captions(
    path: str | os.PathLike,
    columns: ColumnMapping | None = None,
    images: str | os.PathLike | None = None,
) -> CaptionCorpus:
    """Read captions from JSON Lines: one object per line, e.g. ``{"caption": ..., "id": ...}``.

    Keys follow ``columns`` (defaults: ``caption``, ``id``, ``image_id``,
    ``image``, ``label``). The id is optional (default: the 1-based line number);
    ``image_id``, ``image`` (a path, joined to ``images`` when relative) and
    ``label`` (a semantic category: string or integer) are optional too.
    Blank lines are skipped.

    Raises:
        FileNotFoundError: The file is missing.
        DataFormatError: (a ``ValueError``) Bad JSON, a non-object line, a missing
            or blank caption, duplicate ids — each naming the file and the line number.
    """
    path = os.fspath(path)
    columns = columns or ColumnMapping()
    root = None if images is None else os.fspath(images)
    out = CaptionColumns()
    for number, line in decoded_lines(path, "JSONL captions"):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{where}: malformed JSON at column {err.colno}: {err.msg}"
            ) from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if columns.caption not in obj:
            raise DataFormatError(
                f"{where}: no {columns.caption!r} key (keys: {', '.join(map(repr, obj)) or 'none'})"
            )
        caption_id = obj.get(columns.caption_id, number) if columns.caption_id else number
        image = obj.get(columns.image) if columns.image else None
        out.add(
            obj[columns.caption],
            caption_id,
            where,
            obj.get(columns.image_id) if columns.image_id else None,
            join_root(image, root) if isinstance(image, str) else None,
            obj.get(columns.label) if columns.label else None,
        )
        if image is not None and not isinstance(image, str):
            raise DataFormatError(f"{where}: {columns.image!r} must be a file path, got {image!r}")
    if not out:
        raise DataFormatError(f"{path}: the JSONL caption file has no (non-blank) line")
    logger.info("%s: %d captions", path, len(out))
    return out.corpus(source="jsonl", location=path)


def read_text_captions(path: str | os.PathLike) -> CaptionCorpus:
    """Read a plain-text file with one caption per line.

    Lines are stripped, blank lines skipped; the id is the 1-based line number.
    There are no images (text-only corpus, e.g. for a knowledge index).

    Raises:
        FileNotFoundError: The file is missing.
        DataFormatError: (a ``ValueError``) A line is not UTF-8 (naming the line),
            or the file has no caption.
    """
    path = os.fspath(path)
    texts: list[str] = []
    ids: list[int | str] = []
    for number, line in decoded_lines(path, "text captions"):
        if line.strip():
            texts.append(line.strip())
            ids.append(number)
    if not texts:
        raise DataFormatError(f"{path}: the caption file has no (non-blank) line")
    logger.info("%s: %d captions", path, len(texts))
    return CaptionCorpus(texts, ids, source="text", location=path)
