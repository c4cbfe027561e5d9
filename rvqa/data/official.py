"""The official VQAv2 / OK-VQA release (questions + annotations JSON, COCO images) → :class:`VQADataset`.

The JSON files are streamed and checked once, up front (every malformed question
or annotation is a :class:`rvqa.errors.DataFormatError` naming the file, the
index and the question id) into compact columns: the parsed document is never
held whole, so reading VQAv2 train (443,757 questions, ~330 MB of annotations)
peaks at the columns plus a constant; image paths are built from the image ids.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rvqa.data._json import is_int, optional_str, stream_json
from rvqa.data.vqa import ColumnRows, VQADataset, answer_strings
from rvqa.errors import DataFormatError

__all__ = ["read_vqa_files", "coco_image_name"]

logger = logging.getLogger(__name__)


def coco_image_name(data_subtype: str, image_id: int | str) -> str:
    """Official COCO file name, e.g. ``COCO_val2014_000000000042.jpg``.

    ``test-dev2015`` questions use the ``test2015`` images, so the name uses ``test2015``.
    """
    subtype = re.sub(r"^test-dev", "test", data_subtype)
    return f"COCO_{subtype}_{int(image_id):012d}.jpg"


_SUBTYPE_RE = re.compile(r"(train|val|test|test-dev)\d{4}")


def _data_subtype(subtype: Any, questions_path: str, images: str) -> str:
    if isinstance(subtype, str) and subtype:
        return subtype
    folder = Path(os.path.abspath(images)).name
    if _SUBTYPE_RE.fullmatch(folder):
        logger.info("%s: no 'data_subtype'; using the image folder name %r", questions_path, folder)
        return folder
    raise DataFormatError(
        f"{questions_path}: the questions file has no 'data_subtype' (e.g. 'val2014') and the "
        f"image folder name {folder!r} is not a COCO split name either, so the image file names "
        f"COCO_<data_subtype>_<image_id:012d>.jpg cannot be built; add 'data_subtype' to the "
        f"file or name the folder after the split (e.g. val2014/)"
    )


@dataclass
class _OfficialRows(ColumnRows):
    """Official VQA files: the image path is built from the image id when needed."""

    image_dir: str = ""
    image_subtype: str = ""

    def image(self, i: int) -> str:
        return os.path.join(self.image_dir, coco_image_name(self.image_subtype, self.image_ids[i]))


def read_vqa_files(
    questions: str | os.PathLike,
    annotations: str | os.PathLike | None,
    images: str | os.PathLike,
    split_name: str | None = None,
    check_images: bool = False,
) -> VQADataset:
    """Read one split of the official VQAv2 or OK-VQA release.

    Questions file: ``{"info", "task_type", "data_type", "data_subtype": "val2014",
    "questions": [{"image_id", "question", "question_id"}, ...]}``. Annotations file:
    ``{"annotations": [{"question_id", "image_id", "question_type", "answer_type",
    "multiple_choice_answer", "answers": [{"answer", "answer_confidence",
    "answer_id"}, ...]}, ...]}``. Images are ``images/COCO_{data_subtype}_{image_id:012d}.jpg``;
    when ``data_subtype`` is missing it is taken from the image folder's name.

    Every question must have exactly one annotation (when annotations are given)
    and vice versa: a partial annotation file is an error, not a silent subset.

    Args:
        questions: The questions JSON, e.g. ``v2_OpenEnded_mscoco_val2014_questions.json``.
        annotations: The annotations JSON, or ``None`` for splits without answers.
        images: The COCO image folder, e.g. ``val2014/``.
        split_name: Name of the split (default: the file's ``data_subtype``).
        check_images: Decode every image now (:meth:`VQADataset.check_images`),
            else they are only opened when loaded.

    Raises:
        FileNotFoundError: A JSON file is missing.
        ImageLoadError: (a ``ValueError``; ``check_images``) Images that cannot
            be read, the first named with why, and how many.
        DataFormatError: (a ``ValueError``) Malformed JSON (with its position), a
            missing top-level key, a malformed question or annotation (named by
            index and question_id), annotations for unknown questions, questions
            without annotations, or an image_id that differs between question and
            annotation.
    """
    q_path = os.fspath(questions)
    images = os.fspath(images)
    rows, index_of = _read_questions(q_path, images)
    if annotations is not None:
        _read_annotations(os.fspath(annotations), rows, index_of)

    location = q_path if annotations is None else f"{q_path} + {os.fspath(annotations)}"
    dataset = VQADataset(
        rows, split=split_name or rows.image_subtype, source="vqa", location=location
    )
    logger.info(
        "read %d questions about %d images (%s, answers: %s)",
        len(dataset),
        len(set(rows.image_ids)),
        dataset.split,
        dataset.has_answers,
    )
    if check_images:
        dataset.check_images()
    return dataset


def _read_questions(q_path: str, images: str) -> tuple[_OfficialRows, dict[int, int]]:
    """Parse a questions file into columns (checked), and each question_id's index."""
    rows = _OfficialRows(question_ids=[], questions=[], images=None, image_ids=[], image_dir=images)
    index_of: dict[int, int] = {}
    top: dict[str, Any] = {"data_subtype": None}
    for _, idx, q in stream_json(q_path, "questions", ["questions"], top):
        where = f"{q_path}: questions[{idx}]"
        if not isinstance(q, dict):
            raise DataFormatError(f"{where} must be an object, got {type(q).__name__}")
        where += f" (question_id={q.get('question_id')!r})"
        missing = [k for k in ("question_id", "image_id", "question") if k not in q]
        if missing:
            raise DataFormatError(f"{where} has no {', '.join(map(repr, missing))}")
        qid, image_id, text = q["question_id"], q["image_id"], q["question"]
        if not is_int(qid):
            raise DataFormatError(f"{where}: 'question_id' must be an integer, got {qid!r}")
        if not is_int(image_id):
            raise DataFormatError(
                f"{where}: 'image_id' must be an integer (COCO id), got {image_id!r}"
            )
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(f"{where}: 'question' must be a non-empty string, got {text!r}")
        if qid in index_of:
            raise DataFormatError(
                f"{where}: duplicate question_id, also at questions[{index_of[qid]}]"
            )
        index_of[qid] = idx
        rows.question_ids.append(qid)
        rows.questions.append(text)
        rows.image_ids.append(image_id)
    rows.image_subtype = _data_subtype(top["data_subtype"], q_path, images)
    return rows, index_of


def _read_annotations(path: str, rows: _OfficialRows, index_of: dict[int, int]) -> None:
    """Parse an annotations file into the answer columns of ``rows`` (checked)."""
    n = len(rows)
    answers: list[tuple[str, ...] | None] = [None] * n
    q_types: list[str | None] = [None] * n
    a_types: list[str | None] = [None] * n
    mc: list[str | None] = [None] * n
    seen: dict[int, int] = {}
    pool: dict[Any, Any] = {}  # one str object per distinct string (saves memory)
    for _, idx, a in stream_json(path, "annotations", ["annotations"]):
        # Fast path for well-formed annotations (VQAv2 train has 443k); messages are
        # only formatted when something is wrong.
        if not isinstance(a, dict) or "question_id" not in a:
            where = f"{path}: annotations[{idx}]"
            if not isinstance(a, dict):
                raise DataFormatError(f"{where} must be an object, got {type(a).__name__}")
            raise DataFormatError(f"{where} has no 'question_id'")
        qid = a["question_id"]
        row = index_of.get(qid)
        if row is None or qid in seen or "answers" not in a:
            where = f"{path}: annotations[{idx}] (question_id={qid!r})"
            if row is None:
                raise DataFormatError(f"{where}: this question_id is not in the questions file")
            if qid in seen:
                raise DataFormatError(
                    f"{where}: duplicate annotation, also at annotations[{seen[qid]}]"
                )
            raise DataFormatError(f"{where} has no 'answers'")
        seen[qid] = idx
        if "image_id" in a and a["image_id"] != rows.image_ids[row]:
            raise DataFormatError(
                f"{path}: annotations[{idx}] (question_id={qid!r}): image_id {a['image_id']!r} "
                f"differs from the question's image_id {rows.image_ids[row]!r} (questions[{row}])"
            )
        raw = a["answers"]
        try:
            strings = [item["answer"] for item in raw] if isinstance(raw, list) else None
        except (TypeError, KeyError):
            strings = None
        if not strings or not all(type(x) is str for x in strings):
            strings = answer_strings(raw, f"{path}: annotations[{idx}] (question_id={qid!r})")
        answers[row] = tuple([pool.setdefault(x, x) for x in strings])
        q_type, a_type, m = (
            a.get("question_type"),
            a.get("answer_type"),
            a.get("multiple_choice_answer"),
        )
        if not all(v is None or type(v) is str for v in (q_type, a_type, m)):
            where = f"{path}: annotations[{idx}] (question_id={qid!r})"
            optional_str(q_type, where, "question_type")
            optional_str(a_type, where, "answer_type")
            optional_str(m, where, "multiple_choice_answer")
        q_types[row], a_types[row] = (
            pool.setdefault(q_type, q_type),
            pool.setdefault(a_type, a_type),
        )
        mc[row] = m if m is None else pool.setdefault(m, m)
    if len(seen) != n:
        lacking = [rows.question_ids[i] for i in range(n) if answers[i] is None]
        raise DataFormatError(
            f"{path}: {len(lacking)} of {n} questions have no annotation, e.g. question_id "
            f"{', '.join(map(str, lacking[:5]))}; the questions and annotations files must "
            f"be of the same split"
        )
    rows.answers, rows.question_types, rows.answer_types, rows.mc_answers = (
        answers,
        q_types,
        a_types,
        mc,
    )
