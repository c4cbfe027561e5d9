"""easy-vqa (the ``easy-vqa`` PyPI package, offline) → :class:`VQADataset`, its question types, and derived captions.

easy-vqa has one answer per question, repeated :data:`NUM_HUMAN_ANSWERS` times
so that the official VQA accuracy applies unchanged. It has no human captions;
:func:`easy_vqa_captions` derives one per image from that image's questions and
answers. The ``easy_vqa`` package is imported when a split is first read.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from rvqa.data.records import NUM_HUMAN_ANSWERS, CaptionRecord
from rvqa.data.vqa import ColumnRows, VQADataset
from rvqa.errors import DataFormatError, UsageError

__all__ = [
    "EASY_VQA_SHAPES",
    "EASY_VQA_SPLITS",
    "EasyVQAImage",
    "check_easy_vqa_split",
    "easy_vqa_captions",
    "easy_vqa_colors",
    "easy_vqa_images",
    "easy_vqa_question_type",
    "read_easy_vqa",
]

logger = logging.getLogger(__name__)

EASY_VQA_SPLITS = ("train", "test")
_YES_NO = ("yes", "no")


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
        raise DataFormatError(
            f"easy-vqa {split}: no image file for image ids {missing[:5]} "
            f"(broken easy-vqa installation?)"
        )
    folders = {os.path.dirname(p) for p in paths.values()}
    if len(folders) != 1:  # pragma: no cover - the package keeps one folder per split
        raise DataFormatError(f"easy-vqa {split}: images are spread over {sorted(folders)}")
    return tuple(texts), tuple(answers), tuple(int(i) for i in image_ids), folders.pop()


def check_easy_vqa_split(split: str, what: str = "easy-vqa") -> None:
    """Check that ``split`` is an easy-vqa split name.

    Args:
        split: The name to check.
        what: How messages name the data (e.g. ``"easy-vqa caption"``).

    Raises:
        UsageError: (a ``ValueError``) Unknown split, listing the known ones.
    """
    if split not in EASY_VQA_SPLITS:
        raise UsageError(
            f"unknown {what} split {split!r}; known splits: {', '.join(EASY_VQA_SPLITS)}"
        )


def _easy_image_path(folder: str, image_id: int) -> str:
    return os.path.join(folder, f"{image_id}.png")


@dataclass
class _EasyRows(ColumnRows):
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
        UsageError: (a ``ValueError``) Unknown split.
    """
    check_easy_vqa_split(split)
    texts, answers, image_ids, folder = _easy_vqa_raw(split)
    n = len(texts)
    type_of = {q: easy_vqa_question_type(q) for q in set(texts)}
    rows = _EasyRows(
        question_ids=list(range(n)),
        questions=list(texts),
        images=None,
        image_ids=list(image_ids),
        answers=[(a,) * NUM_HUMAN_ANSWERS for a in answers],
        question_types=[type_of[q] for q in texts],
        answer_types=["yes/no" if a in _YES_NO else "other" for a in answers],
        mc_answers=list(answers),
        image_dir=folder,
    )
    return VQADataset(rows, split=split, source="easy_vqa", location=f"easy-vqa {split}")


# ------------------------------------------------------------ easy-vqa derived captions

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
"""The shapes easy-vqa draws (one per image)."""


def easy_vqa_colors() -> tuple[str, ...]:
    """The colours easy-vqa draws, in the order of its answer list (8: green, red, ...)."""
    import easy_vqa

    return tuple(
        a for a in easy_vqa.get_answers() if a and a not in EASY_VQA_SHAPES and a not in _YES_NO
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
    said_shapes = [w for w in words if w in EASY_VQA_SHAPES]
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
    elif answer in EASY_VQA_SHAPES:
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


@dataclass(frozen=True)
class EasyVQAImage:
    """One easy-vqa image and what its questions and answers say it shows.

    Attributes:
        image_id: The easy-vqa image id (unique within a split only).
        image: The PNG's path.
        color: The shape's colour, or ``None`` when the answers do not determine it.
        shape: ``"circle"``, ``"rectangle"`` or ``"triangle"``, or ``None`` likewise.
    """

    image_id: int
    image: str
    color: str | None
    shape: str | None


def easy_vqa_images(split: str = "train") -> list[EasyVQAImage]:
    """Every image of an easy-vqa split with its colour and shape, read from its own answers.

    easy-vqa ships no labels beside its questions; each image shows one coloured
    shape, and its question/answer pairs state the colour and shape directly
    ("what color is the shape?" → blue, "what is the blue shape?" → rectangle) or
    through yes/no questions, including negations ("does the image not contain a
    gray shape?" → yes means *not* gray). A value is used when the answers name
    exactly one (and never contradict it), or when all but one value are ruled
    out; otherwise it is ``None``.

    Args:
        split: ``"train"`` (4,000 images) or ``"test"`` (1,000 images).

    Returns:
        One entry per image, sorted by image id.

    Raises:
        UsageError: (a ``ValueError``) Unknown split.
    """
    check_easy_vqa_split(split)
    texts, answers, image_ids, folder = _easy_vqa_raw(split)
    colors = easy_vqa_colors()
    evidence: dict[int, _Evidence] = {}
    for question, answer, image_id in zip(texts, answers, image_ids):
        ev = evidence.setdefault(image_id, _Evidence(set(), set(), set(), set()))
        _add_evidence(ev, question, answer, colors)
    return [
        EasyVQAImage(
            image_id=image_id,
            image=_easy_image_path(folder, image_id),
            color=_resolve(evidence[image_id].colors_yes, evidence[image_id].colors_no, colors),
            shape=_resolve(
                evidence[image_id].shapes_yes, evidence[image_id].shapes_no, EASY_VQA_SHAPES
            ),
        )
        for image_id in sorted(evidence)
    ]


def easy_vqa_captions(split: str = "train") -> list[CaptionRecord]:
    """One caption per easy-vqa image, derived from that image's own questions and answers.

    These are **not human captions**: easy-vqa has none. The colour and shape come
    from :func:`easy_vqa_images` (the image's answers, directly or by elimination).
    Captions read ``"a blue circle"``; with only one attribute known,
    ``"a blue shape"`` or ``"a circle"``; with neither, ``"a shape"``.

    Args:
        split: ``"train"`` (4,000 images) or ``"test"`` (1,000 images).

    Returns:
        Records sorted by image id, with ``caption_id = f"easyvqa-{split}-{image_id}"``,
        the easy-vqa ``image_id``, the image's PNG path and its ``label``, colour and
        shape (``"blue circle"``; ``unknown`` for an attribute that cannot be read).

    Raises:
        UsageError: (a ``ValueError``) Unknown split.
    """
    records = []
    n_full = 0
    for im in easy_vqa_images(split):
        color, shape = im.color, im.shape
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
                caption_id=f"easyvqa-{split}-{im.image_id}",
                image_id=im.image_id,
                image=im.image,
                label=f"{color or 'unknown'} {shape or 'unknown'}",
            )
        )
    logger.info(
        "easy-vqa %s: derived %d captions, %d with both colour and shape",
        split,
        len(records),
        n_full,
    )
    return records
