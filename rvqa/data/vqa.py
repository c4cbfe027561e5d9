"""VQA adapters: official VQAv2 / OK-VQA JSON, easy-vqa and ``datasets`` → :class:`VQADataset`.

Every adapter parses (and checks) the question/answer metadata once, up front,
and keeps it in compact columns; :class:`VQARecord` objects are built on access
and images are never opened here (pass ``record.image`` to
:func:`rvqa.data.images.load_image`). Nothing on disk is written or modified.

Example:
    >>> ds = load_vqa(VQADataConfig(source="easy_vqa"), "train")
    >>> len(ds), ds[0].question, ds[0].answers[0]
    (38575, 'what is the blue shape?', 'rectangle')
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from rvqa.config import ColumnMapping, VQADataConfig
from rvqa.data.records import CaptionRecord, VQARecord
from rvqa.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "VQADataset",
    "read_vqa_files",
    "read_easy_vqa",
    "easy_vqa_captions",
    "read_vqa_datasets",
    "load_vqa",
    "coco_image_name",
    "easy_vqa_question_type",
    "EASY_VQA_SPLITS",
]

logger = logging.getLogger(__name__)

EASY_VQA_SPLITS = ("train", "test")
_YES_NO = ("yes", "no")
_N_HUMAN_ANSWERS = 10


# --------------------------------------------------------------------------- the dataset


@dataclass
class _ColumnRows:
    """Parsed questions in columns; one :class:`VQARecord` is built per access."""

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


@dataclass
class _OfficialRows(_ColumnRows):
    """Official VQA files: the image path is built from the image id when needed."""

    image_dir: str = ""
    image_subtype: str = ""

    def image(self, i: int) -> str:
        return os.path.join(self.image_dir, coco_image_name(self.image_subtype, self.image_ids[i]))


class VQADataset(Sequence[VQARecord]):
    """A lazy, read-only sequence of :class:`VQARecord` (one split of one source).

    Holds the parsed question/answer metadata only; records are built on access
    and images are never opened. Indexing with a slice, :meth:`subset` and
    :meth:`from_records` give new datasets sharing the same parsed data.

    Attributes:
        split: Split name (e.g. ``"train"``, ``"val2014"``).
        source: ``"vqa"``, ``"easy_vqa"``, ``"datasets"`` or ``"records"``.
        location: Where the data came from (files, folder or package), for messages.
    """

    def __init__(
        self,
        rows: Any,
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
        rows = _ColumnRows(
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

    @overload
    def __getitem__(self, index: int) -> VQARecord: ...

    @overload
    def __getitem__(self, index: slice) -> VQADataset: ...

    def __getitem__(self, index: int | slice) -> VQARecord | VQADataset:
        if isinstance(index, slice):
            return self._view(range(len(self))[index])
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"VQADataset indices must be integers or slices, not {type(index).__name__}"
            ) from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"question index {i} out of range for {n} questions")
        return self._rows.record(self._row(i % n))

    def __iter__(self) -> Iterator[VQARecord]:
        for i in range(len(self)):
            yield self._rows.record(self._row(i))

    def __repr__(self) -> str:
        return (
            f"VQADataset(source={self.source!r}, split={self.split!r}, questions={len(self)}, "
            f"has_answers={self.has_answers})"
        )

    def _view(self, local: Sequence[int]) -> VQADataset:
        return VQADataset(
            self._rows,
            split=self.split,
            source=self.source,
            location=self.location,
            positions=[self._row(i) for i in local],
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
            ValueError: Neither or both given, or out of range.
        """
        if (fraction is None) == (n is None):
            raise ValueError("subset() takes exactly one of fraction=... or n=...")
        total = len(self)
        if fraction is not None:
            if isinstance(fraction, bool) or not 0 < fraction <= 1:
                raise ValueError(f"subset fraction must be in (0, 1], got {fraction!r}")
            k = max(1, round(fraction * total)) if total else 0
        else:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"subset n must be a non-negative integer, got {n!r}")
            k = min(n, total)
        if k == total:
            return self._view(range(total))
        order = list(range(total))
        random.Random(seed).shuffle(order)
        return self._view(sorted(order[:k]))

    def missing_images(self, limit: int | None = None) -> list[str]:
        """Image files (path references) that do not exist, each listed once.

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

    def check_images(self, max_report: int = 5) -> None:
        """Check that every referenced image file exists (decoded images are skipped).

        Raises:
            FileNotFoundError: Naming how many are missing and the first ``max_report``.
        """
        missing = self.missing_images()
        if missing:
            n_images = len(self.image_ids)
            shown = "\n  ".join(missing[:max_report])
            more = (
                f"\n  ... and {len(missing) - max_report} more" if len(missing) > max_report else ""
            )
            raise FileNotFoundError(
                f"{len(missing)} of {n_images} images of split {self.split!r} "
                f"({self.source}: {self.location}) are missing:\n  {shown}{more}"
            )


# --------------------------------------------------------------------------- helpers


def _read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; every failure is a ValueError/FileNotFoundError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: malformed JSON in {what} file at line {err.lineno} column {err.colno} "
            f"(char {err.pos}): {err.msg}"
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: {what} file is not UTF-8 text ({err})") from None


def _require_keys(data: Any, keys: Sequence[str], path: str, what: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object at the top level of the {what} file, "
            f"got {type(data).__name__}"
        )
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(
            f"{path}: the {what} file has no top-level key {', '.join(map(repr, missing))} "
            f"(found: {', '.join(map(repr, data)) or 'none'}); is this the right file?"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_str(value: Any, where: str, key: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{where}: {key!r} must be a string, got {value!r}")


def coco_image_name(data_subtype: str, image_id: int | str) -> str:
    """Official COCO file name, e.g. ``COCO_val2014_000000000042.jpg``.

    ``test-dev2015`` questions use the ``test2015`` images, so the name uses ``test2015``.
    """
    subtype = re.sub(r"^test-dev", "test", data_subtype)
    return f"COCO_{subtype}_{int(image_id):012d}.jpg"


_SUBTYPE_RE = re.compile(r"(train|val|test|test-dev)\d{4}")


def _data_subtype(data: dict, questions_path: str, images: str) -> str:
    subtype = data.get("data_subtype")
    if isinstance(subtype, str) and subtype:
        return subtype
    folder = Path(os.path.abspath(images)).name
    if _SUBTYPE_RE.fullmatch(folder):
        logger.info("%s: no 'data_subtype'; using the image folder name %r", questions_path, folder)
        return folder
    raise ValueError(
        f"{questions_path}: the questions file has no 'data_subtype' (e.g. 'val2014') and the "
        f"image folder name {folder!r} is not a COCO split name either, so the image file names "
        f"COCO_<data_subtype>_<image_id:012d>.jpg cannot be built; add 'data_subtype' to the "
        f"file or name the folder after the split (e.g. val2014/)"
    )


# --------------------------------------------------------------------------- official VQA


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
        check_images: Check now that every image file exists (else only on load).

    Raises:
        FileNotFoundError: A JSON file is missing, or (``check_images``) images are.
        ValueError: Malformed JSON (with its position), a missing top-level key, a
            malformed question or annotation (named by index and question_id),
            annotations for unknown questions, questions without annotations,
            or an image_id that differs between question and annotation.
    """
    q_path = os.fspath(questions)
    images = os.fspath(images)
    data = _read_json(q_path, "questions")
    _require_keys(data, ["questions"], q_path, "questions")
    q_list = data["questions"]
    if not isinstance(q_list, list):
        raise ValueError(f"{q_path}: 'questions' must be a list, got {type(q_list).__name__}")
    subtype = _data_subtype(data, q_path, images)

    question_ids: list[int] = []
    texts: list[str] = []
    image_ids: list[int | str] = []
    index_of: dict[int, int] = {}
    for idx, q in enumerate(q_list):
        where = f"{q_path}: questions[{idx}]"
        if not isinstance(q, dict):
            raise ValueError(f"{where} must be an object, got {type(q).__name__}")
        where += f" (question_id={q.get('question_id')!r})"
        missing = [k for k in ("question_id", "image_id", "question") if k not in q]
        if missing:
            raise ValueError(f"{where} has no {', '.join(map(repr, missing))}")
        qid, image_id, text = q["question_id"], q["image_id"], q["question"]
        if not _is_int(qid):
            raise ValueError(f"{where}: 'question_id' must be an integer, got {qid!r}")
        if not _is_int(image_id):
            raise ValueError(f"{where}: 'image_id' must be an integer (COCO id), got {image_id!r}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string, got {text!r}")
        if qid in index_of:
            raise ValueError(f"{where}: duplicate question_id, also at questions[{index_of[qid]}]")
        index_of[qid] = idx
        question_ids.append(qid)
        texts.append(text)
        image_ids.append(image_id)
    del data, q_list

    rows = _OfficialRows(
        question_ids=question_ids,
        questions=texts,
        images=None,
        image_ids=image_ids,
        image_dir=images,
        image_subtype=subtype,
    )
    if annotations is not None:
        _read_annotations(os.fspath(annotations), rows, index_of)

    location = q_path if annotations is None else f"{q_path} + {os.fspath(annotations)}"
    dataset = VQADataset(rows, split=split_name or subtype, source="vqa", location=location)
    logger.info(
        "read %d questions about %d images (%s, answers: %s)",
        len(dataset),
        len(set(image_ids)),
        dataset.split,
        dataset.has_answers,
    )
    if check_images:
        dataset.check_images()
    return dataset


def _read_annotations(path: str, rows: _OfficialRows, index_of: dict[int, int]) -> None:
    """Parse an annotations file into the answer columns of ``rows`` (checked)."""
    data = _read_json(path, "annotations")
    _require_keys(data, ["annotations"], path, "annotations")
    a_list = data["annotations"]
    if not isinstance(a_list, list):
        raise ValueError(f"{path}: 'annotations' must be a list, got {type(a_list).__name__}")
    n = len(rows)
    answers: list[tuple[str, ...] | None] = [None] * n
    q_types: list[str | None] = [None] * n
    a_types: list[str | None] = [None] * n
    mc: list[str | None] = [None] * n
    seen: dict[int, int] = {}
    pool: dict[Any, Any] = {}  # one str object per distinct string (saves memory)
    for idx, a in enumerate(a_list):
        # Fast path for well-formed annotations (VQAv2 train has 443k); messages are
        # only formatted when something is wrong.
        if not isinstance(a, dict) or "question_id" not in a:
            where = f"{path}: annotations[{idx}]"
            if not isinstance(a, dict):
                raise ValueError(f"{where} must be an object, got {type(a).__name__}")
            raise ValueError(f"{where} has no 'question_id'")
        qid = a["question_id"]
        row = index_of.get(qid)
        if row is None or qid in seen or "answers" not in a:
            where = f"{path}: annotations[{idx}] (question_id={qid!r})"
            if row is None:
                raise ValueError(f"{where}: this question_id is not in the questions file")
            if qid in seen:
                raise ValueError(f"{where}: duplicate annotation, also at annotations[{seen[qid]}]")
            raise ValueError(f"{where} has no 'answers'")
        seen[qid] = idx
        if "image_id" in a and a["image_id"] != rows.image_ids[row]:
            raise ValueError(
                f"{path}: annotations[{idx}] (question_id={qid!r}): image_id {a['image_id']!r} "
                f"differs from the question's image_id {rows.image_ids[row]!r} (questions[{row}])"
            )
        raw = a["answers"]
        try:
            strings = [item["answer"] for item in raw] if isinstance(raw, list) else None
        except (TypeError, KeyError):
            strings = None
        if not strings or not all(type(x) is str for x in strings):
            strings = _answer_strings(raw, f"{path}: annotations[{idx}] (question_id={qid!r})")
        answers[row] = tuple([pool.setdefault(x, x) for x in strings])
        q_type, a_type, m = (
            a.get("question_type"),
            a.get("answer_type"),
            a.get("multiple_choice_answer"),
        )
        if not all(v is None or type(v) is str for v in (q_type, a_type, m)):
            where = f"{path}: annotations[{idx}] (question_id={qid!r})"
            _optional_str(q_type, where, "question_type")
            _optional_str(a_type, where, "answer_type")
            _optional_str(m, where, "multiple_choice_answer")
        q_types[row], a_types[row] = (
            pool.setdefault(q_type, q_type),
            pool.setdefault(a_type, a_type),
        )
        mc[row] = m if m is None else pool.setdefault(m, m)
    if len(seen) != n:
        lacking = [rows.question_ids[i] for i in range(n) if answers[i] is None]
        raise ValueError(
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


def _answer_strings(value: Any, where: str) -> list[str]:
    """Answers as given: a list of {"answer": ...} objects (official) or of strings."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: 'answers' must be a non-empty list, got {value!r}")
    out = []
    for j, item in enumerate(value):
        answer = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(answer, str):
            raise ValueError(
                f"{where}: answers[{j}] must be a string or an object with an 'answer' string, "
                f"got {item!r}"
            )
        out.append(answer)
    return out


# --------------------------------------------------------------------------- easy-vqa

# Question types of easy-vqa questions: their leading words, matched in this order
# (longest first), in the spirit of VQAv2's question types ("what color is the",
# "is there a", ...). Negated forms are their own types so that accuracy on
# negations shows up separately in per-question-type results.
_EASY_VQA_QUESTION_TYPES = (
    "what is the color of the",
    "what color is the",
    "what is the",
    "what shape",
    "does the image not contain",
    "does the image contain",
    "is there not a",
    "is there a",
    "is no",
    "is a",
)


def easy_vqa_question_type(question: str) -> str:
    """Question type of an easy-vqa question, from its leading words.

    The types (checked in this order) are ``"what is the color of the"``,
    ``"what color is the"``, ``"what is the"`` (e.g. "what is the blue shape?"),
    ``"what shape"``, ``"does the image not contain"``, ``"does the image contain"``,
    ``"is there not a"``, ``"is there a"``, ``"is no"``, ``"is a"``; any other
    question gets its first two words.
    """
    words = re.findall(r"[a-z0-9']+", question.lower())
    text = " ".join(words)
    for prefix in _EASY_VQA_QUESTION_TYPES:
        if text == prefix or text.startswith(prefix + " "):
            return prefix
    return " ".join(words[:2])


@functools.lru_cache(maxsize=2)
def _easy_vqa_raw(split: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...], str]:
    """(questions, answers, image_ids, images folder) of an easy-vqa split; read once."""
    import easy_vqa

    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    missing = sorted(set(image_ids) - set(paths))
    if missing:
        raise ValueError(
            f"easy-vqa {split}: no image file for image ids {missing[:5]} "
            f"(broken easy-vqa installation?)"
        )
    folders = {os.path.dirname(p) for p in paths.values()}
    if len(folders) != 1:  # pragma: no cover - the package keeps one folder per split
        raise ValueError(f"easy-vqa {split}: images are spread over {sorted(folders)}")
    return tuple(texts), tuple(answers), tuple(int(i) for i in image_ids), folders.pop()


def _check_easy_split(split: str) -> None:
    if split not in EASY_VQA_SPLITS:
        raise ConfigError(
            f"unknown easy-vqa split {split!r}; known splits: {', '.join(EASY_VQA_SPLITS)}"
        )


def _easy_image_path(folder: str, image_id: int) -> str:
    return os.path.join(folder, f"{image_id}.png")


@dataclass
class _EasyRows(_ColumnRows):
    image_dir: str = ""

    def image(self, i: int) -> str:
        return _easy_image_path(self.image_dir, int(self.image_ids[i]))


def read_easy_vqa(split: str) -> VQADataset:
    """Read the easy-vqa dataset (the ``easy-vqa`` PyPI package, offline).

    easy-vqa has one answer per question; it is repeated 10 times so that records
    look like VQAv2's 10 human answers and the official VQA accuracy applies
    unchanged (it is then 1 for the right answer and 0 otherwise).

    * ``question_id``: the question's index in the split's ``questions.json``
      (stable: the file ships inside the package).
    * ``image_id``: the easy-vqa image id (``int``); ``image``: the PNG's path.
    * ``question_type``: from the leading words, see :func:`easy_vqa_question_type`.
    * ``answer_type``: ``"yes/no"`` for yes/no answers, ``"other"`` for colours and
      shapes (VQAv2's answer-type names; easy-vqa has no counting questions).
    * ``multiple_choice_answer``: the answer.

    Args:
        split: ``"train"`` (38,575 questions, 4,000 images) or ``"test"``
            (9,673 questions, 1,000 images).

    Raises:
        ValueError: Unknown split.
    """
    _check_easy_split(split)
    texts, answers, image_ids, folder = _easy_vqa_raw(split)
    n = len(texts)
    type_of = {q: easy_vqa_question_type(q) for q in set(texts)}
    rows = _EasyRows(
        question_ids=list(range(n)),
        questions=list(texts),
        images=None,
        image_ids=list(image_ids),
        answers=[(a,) * _N_HUMAN_ANSWERS for a in answers],
        question_types=[type_of[q] for q in texts],
        answer_types=["yes/no" if a in _YES_NO else "other" for a in answers],
        mc_answers=list(answers),
        image_dir=folder,
    )
    return VQADataset(rows, split=split, source="easy_vqa", location=f"easy-vqa {split}")


# ------------------------------------------------------------ easy-vqa derived captions

_EASY_SHAPES = ("circle", "rectangle", "triangle")


def _easy_vqa_colors() -> tuple[str, ...]:
    import easy_vqa

    return tuple(
        a for a in easy_vqa.get_answers() if a and a not in _EASY_SHAPES and a not in _YES_NO
    )


@dataclass
class _Evidence:
    """What an image's question/answer pairs say about its one shape."""

    colors_yes: set[str]
    colors_no: set[str]
    shapes_yes: set[str]
    shapes_no: set[str]


def _add_evidence(ev: _Evidence, question: str, answer: str, colors: Sequence[str]) -> None:
    words = re.findall(r"[a-z]+", question.lower())
    said_colors = [w for w in words if w in colors]
    said_shapes = [w for w in words if w in _EASY_SHAPES]
    if answer in _YES_NO:
        # "is there a red shape?" yes -> red; "does the image not contain a circle?" yes
        # -> not a circle; "is no teal shape present?" no -> teal.
        negated = "not" in words or "no" in words
        holds = (answer == "yes") != negated
        (ev.colors_yes if holds else ev.colors_no).update(said_colors)
        (ev.shapes_yes if holds else ev.shapes_no).update(said_shapes)
    elif answer in colors:
        # "what color is the triangle?" blue -> blue (and a triangle)
        ev.colors_yes.add(answer)
        ev.shapes_yes.update(said_shapes)
    elif answer in _EASY_SHAPES:
        # "what is the blue shape?" rectangle -> rectangle (and blue)
        ev.shapes_yes.add(answer)
        ev.colors_yes.update(said_colors)


def _resolve(yes: set[str], no: set[str], universe: Sequence[str]) -> str | None:
    """The one value the evidence allows: stated directly, or by elimination."""
    if yes:
        return next(iter(yes)) if len(yes) == 1 and not yes & no else None
    left = [v for v in universe if v not in no]
    return left[0] if len(left) == 1 else None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def easy_vqa_captions(split: str = "train") -> list[CaptionRecord]:
    """One caption per easy-vqa image, derived from that image's own questions and answers.

    These are **not human captions**: easy-vqa has none. Each image shows one
    coloured shape, and its question/answer metadata states the colour and shape
    directly ("what color is the shape?" → blue, "what is the blue shape?" →
    rectangle) or through yes/no questions, including negations ("does the image
    not contain a gray shape?" → yes means *not* gray). A value is used when the
    answers name exactly one (and never contradict it), or when all but one value
    are ruled out. Captions read ``"a blue circle"``; with only one attribute known,
    ``"a blue shape"`` or ``"a circle"``; with neither, ``"a shape"``.

    Args:
        split: ``"train"`` (4,000 images) or ``"test"`` (1,000 images).

    Returns:
        Records sorted by image id, with ``caption_id = f"easyvqa-{split}-{image_id}"``,
        the easy-vqa ``image_id`` and the image's PNG path.

    Raises:
        ValueError: Unknown split.
    """
    _check_easy_split(split)
    texts, answers, image_ids, folder = _easy_vqa_raw(split)
    colors = _easy_vqa_colors()
    evidence: dict[int, _Evidence] = {}
    for question, answer, image_id in zip(texts, answers, image_ids):
        ev = evidence.setdefault(image_id, _Evidence(set(), set(), set(), set()))
        _add_evidence(ev, question, answer, colors)

    records = []
    n_full = 0
    for image_id in sorted(evidence):
        ev = evidence[image_id]
        color = _resolve(ev.colors_yes, ev.colors_no, colors)
        shape = _resolve(ev.shapes_yes, ev.shapes_no, _EASY_SHAPES)
        if color and shape:
            caption = f"{_article(color)} {color} {shape}"
            n_full += 1
        elif color:
            caption = f"{_article(color)} {color} shape"
        elif shape:
            caption = f"{_article(shape)} {shape}"
        else:
            caption = "a shape"
        records.append(
            CaptionRecord(
                caption=caption,
                caption_id=f"easyvqa-{split}-{image_id}",
                image_id=image_id,
                image=_easy_image_path(folder, image_id),
            )
        )
    logger.info(
        "easy-vqa %s: derived %d captions, %d with both colour and shape",
        split,
        len(records),
        n_full,
    )
    return records


# --------------------------------------------------------------------------- datasets

_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}


def _load_datasets_split(path: str, split: str | None) -> datasets.Dataset:
    """One split of a ``datasets`` dataset: a save_to_disk folder, local files or a hub name.

    ``split=None`` takes the only split, or ``"train"``.
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
            raise ValueError(
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
            raise ValueError(
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
                raise ValueError(f"{path} has several splits ({', '.join(names)}); name one")
        if split not in obj:
            raise ValueError(
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
            raise ValueError(f"{where}: columns.{field_name} must name a column")
        return None
    if name in ds.column_names:
        return name
    default = {f.name: f.default for f in fields(ColumnMapping)}[field_name]
    if required or name != default:
        raise ValueError(
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
    raise ValueError(
        f"{where}: image column {column!r} has feature {feature}; expected an Image feature "
        f"or file-path strings"
    )


def _join_root(path: str, root: str | None) -> str:
    return path if root is None or os.path.isabs(path) else os.path.join(root, path)


def _int_id(value: Any, where: str, what: str) -> int:
    if _is_int(value):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{where}: {what} must be an integer, got {value!r}")


def _parse_answers(value: Any, where: str) -> tuple[str, ...] | None:
    """A datasets answers cell → tuple of strings (None/empty: no answers).

    Accepts a list of strings, a list of ``{"answer": ...}`` dicts (VQAv2 on the
    hub), the dict-of-lists form ``datasets`` gives for a ``Sequence`` of dicts,
    or one string (repeated 10 times, as for easy-vqa).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return (value,) * _N_HUMAN_ANSWERS
    if isinstance(value, dict) and "answer" in value:
        value = value["answer"]
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        return tuple(_answer_strings(list(value), where))
    raise ValueError(
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
                _join_root(p, self.image_root) if isinstance(p, str) else None
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
                raise ValueError(f"{where}: image path is {image!r}")
            image = _join_root(image, self.image_root)
        elif image is None:
            raise ValueError(f"{where}: the image is missing (null)")
        question = row[self.col_question]
        if not isinstance(question, str):
            raise ValueError(f"{where}: question must be a string, got {question!r}")
        if self.col_image_id is not None:
            image_id = row[self.col_image_id]
        else:
            image_id = image if self.image_kind == "path" else i
        answers = None
        if self.has_answers:
            answers = _parse_answers(row[self.col_answers], where)

        def opt(column: str | None, key: str) -> str | None:
            return None if column is None else _optional_str(row[column], where, key)

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
    a ValueError saying so).

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
    strings (repeated 10 times, as for easy-vqa).

    Raises:
        ValueError: Unknown split (listing the known ones), a missing column (naming
            it and the available columns), an unloadable path or hub name.
    """
    columns = columns or ColumnMapping()
    ds = _load_datasets_split(path, split)
    where = f"datasets dataset {path!r} split {split!r}"
    rows = _DatasetsRows(ds, columns, where, image_root=image_root)
    return VQADataset(rows, split=split, source="datasets", location=path)


# --------------------------------------------------------------------------- dispatch


def load_vqa(cfg: VQADataConfig, split: str) -> VQADataset:
    """The VQA split ``split`` of the source a run config names.

    Dispatches on ``cfg.source``: ``"easy_vqa"`` (splits ``train`` / ``test``),
    ``"vqa"`` (the split names are the keys of ``cfg.splits``), ``"datasets"``
    (the dataset's own split names). Nothing else is applied: subsample with
    :meth:`VQADataset.subset` (``cfg.train_fraction``, ``cfg.max_eval_questions``).

    Raises:
        ValueError: Unknown source or split (listing the known names), or any
            error of the adapter.
    """
    if cfg.source == "easy_vqa":
        _check_easy_split(split)
        return read_easy_vqa(split)
    if cfg.source == "vqa":
        if split not in cfg.splits:
            raise ConfigError(
                f"unknown VQA split {split!r}; known splits (data.splits): "
                f"{', '.join(cfg.splits) or 'none configured'}"
            )
        files = cfg.splits[split]
        if not files.questions or not files.images:
            raise ValueError(
                f"data.splits.{split}: both 'questions' and 'images' must be set "
                f"(got questions={files.questions!r}, images={files.images!r})"
            )
        return read_vqa_files(files.questions, files.annotations, files.images, split_name=split)
    if cfg.source == "datasets":
        if not cfg.path:
            raise ValueError("data.source is 'datasets' but data.path is not set")
        return read_vqa_datasets(cfg.path, split, cfg.columns)
    raise ValueError(f"unknown VQA source {cfg.source!r}; known: easy_vqa, vqa, datasets")
