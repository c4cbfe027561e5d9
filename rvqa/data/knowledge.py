"""The knowledge task: easy-vqa images whose answers are not in the pixels but in a fact corpus.

Each easy-vqa image shows one shape (circle, rectangle, triangle) in one of 8
colours: 24 *emblems*. An *assignment* ``k`` maps every emblem to an invented
entity — a name, the good it trades in and the city it is based in — and the
task's questions ask about that entity ("whose emblem is this?", "what does the
owner of this emblem trade in?", "where is the owner of this emblem based?").
The image shows only the emblem; the answer is in the assignment's facts, one
*fact card* per emblem ("the red circle is the emblem of kavelo, which trades in
salt and is based in meseport."), so a reader can only answer from retrieved
facts — one retrieved card answers all three questions, the one hop (emblem →
name) and the two hops (emblem → owner → good or city) — and swapping the fact
corpus for another assignment's (``test_B``) must swap its answers.

:func:`make_knowledge_task` writes a self-contained task folder: JPEG images with
official COCO names, official-format questions and annotations (read unchanged
by :func:`rvqa.data.official.read_vqa_files`), fact corpora as JSON Lines (read
by the ``jsonl`` caption source), image–fact pairs for retriever training, term
substitution tables for reader augmentation, a manifest and a ready run config.
Everything is deterministic: the same options give byte-identical files.

Assignments are fixed identities: names and cities come from two universes of
invented words (disjoint from each other and from the goods), shuffled once with
a fixed seed; assignment ``k`` takes the slice ``[24k, 24k + 24)`` of each, so
the names and cities of different assignments are disjoint by construction.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import numbers
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from rvqa.checks import check_int
from rvqa.config import config_from_dict
from rvqa.data.easy_vqa import EASY_VQA_SHAPES, easy_vqa_colors, easy_vqa_images
from rvqa.data.official import coco_image_name
from rvqa.data.records import NUM_HUMAN_ANSWERS
from rvqa.errors import DataFormatError, KnowledgeTaskError
from rvqa.io import atomic_directory

__all__ = [
    "COLORS",
    "DEFAULT_AUGMENT_ASSIGNMENTS",
    "EMBLEMS",
    "FACT_KINDS",
    "GENERATOR_VERSION",
    "GOODS",
    "KNOWLEDGE_QUESTIONS",
    "READER_CAPTION_LENGTH",
    "SHAPES",
    "TEST_IMAGE_ID_OFFSET",
    "Assignment",
    "Emblem",
    "Entity",
    "Fact",
    "KnowledgeQuestion",
    "augment_assignment_numbers",
    "check_facts",
    "check_index_facts",
    "emblem_facts",
    "knowledge_assignment",
    "knowledge_run_config",
    "make_knowledge_task",
    "num_assignments",
    "parse_fact",
    "shuffled_assignment",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2
"""Bumped whenever the same options would give different files."""

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
"""easy-vqa's 8 colours, sorted (checked against the installed package when a task is made)."""

SHAPES = EASY_VQA_SHAPES
"""easy-vqa's 3 shapes."""

GOODS = (
    "amber", "barley", "brass", "bronze", "candles", "cedar", "cheese", "cinnamon",
    "clay", "cloves", "coal", "cocoa", "coffee", "copper", "coral", "cotton",
    "dates", "ebony", "figs", "flax", "ginger", "glass", "granite", "hemp",
    "honey", "incense", "indigo", "ink", "iron", "ivory", "jade", "lead",
    "leather", "linen", "marble", "nutmeg", "oats", "opal", "paper", "pearls",
    "pepper", "pottery", "quartz", "rice", "rope", "saffron", "salt", "silk",
    "silver", "soap", "sugar", "sulfur", "tar", "tea", "timber", "tin",
    "tobacco", "vanilla", "wax", "wheat", "wine", "wool", "zinc",
)  # fmt: skip
"""What entities trade in: single lowercase words; each assignment draws 24 distinct ones."""

FACT_KINDS = ("name", "good", "city")
"""What an emblem's fact card states about its owner, in card order: name, good, city
(each asked by one of :data:`KNOWLEDGE_QUESTIONS`)."""

TEST_IMAGE_ID_OFFSET = 100_000
"""Added to easy-vqa's test image ids (which repeat its train ids) in the task."""

DEFAULT_AUGMENT_ASSIGNMENTS = 40
"""Augmentation assignments by default: the first 40 numbers that are neither A nor B."""

READER_CAPTION_LENGTH = 28
"""MiniLM (all-MiniLM-L6-v2 WordPiece) tokens of the longest fact card of any assignment,
without special tokens: the reader's ``max_caption_length`` for the task (measured
over every assignment by ``tests/test_knowledge_task.py``)."""

_EMBLEMS_PER_ASSIGNMENT = len(COLORS) * len(SHAPES)

# Invented words: consonant-vowel syllables. Entity names are 3 syllables (6 letters,
# ending in a vowel), cities 2 syllables and a 4-letter suffix (8 letters, ending in
# a consonant): disjoint by construction. Each universe is shuffled once with a fixed
# seed; changing these lines changes every assignment (bump GENERATOR_VERSION).
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CITY_SUFFIXES = ("burg", "ford", "holm", "mark", "port", "wick")
_NAME_SEED = "rvqa-knowledge-names-v1"
_CITY_SEED = "rvqa-knowledge-cities-v1"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, order=True)
class Emblem:
    """A colour and a shape: what an image shows."""

    color: str
    shape: str

    def __str__(self) -> str:
        return f"{self.color} {self.shape}"


EMBLEMS = tuple(Emblem(c, s) for c in COLORS for s in SHAPES)
"""The 24 emblems, in the order of every table of the task."""


@dataclass(frozen=True)
class Entity:
    """What one assignment says about one emblem's owner."""

    emblem: Emblem
    name: str
    good: str
    city: str

    def value(self, kind: str) -> str:
        """The entity's ``"name"``, ``"good"`` or ``"city"``."""
        if kind not in FACT_KINDS:
            raise KnowledgeTaskError(f"unknown fact kind {kind!r}; known: {', '.join(FACT_KINDS)}")
        return getattr(self, kind)


@dataclass(frozen=True)
class Assignment:
    """Assignment ``number``: one :class:`Entity` per emblem, in :data:`EMBLEMS` order."""

    number: int
    entities: tuple[Entity, ...]

    def entity(self, emblem: Emblem) -> Entity:
        """The entity that owns ``emblem``."""
        for e in self.entities:
            if e.emblem == emblem:
                return e
        raise KnowledgeTaskError(
            f"unknown emblem {emblem!r}; known: {', '.join(map(str, EMBLEMS))}"
        )

    def facts(self) -> list[str]:
        """Every fact of the assignment: one card per emblem (:func:`emblem_facts`), emblem order."""
        return [emblem_facts(e) for e in self.entities]

    def terms(self) -> list[str]:
        """Every name, good and city of the assignment (emblem order, then kind)."""
        return [e.value(kind) for e in self.entities for kind in FACT_KINDS]

    def table(self) -> list[dict[str, str]]:
        """The assignment as rows ``{color, shape, name, good, city}`` (for manifests)."""
        return [
            {
                "color": e.emblem.color,
                "shape": e.emblem.shape,
                "name": e.name,
                "good": e.good,
                "city": e.city,
            }
            for e in self.entities
        ]


Fact = Entity
"""A parsed fact card (:func:`parse_fact`): what it states of its emblem's owner — the
same fields as an assignment's :class:`Entity`."""


@dataclass(frozen=True)
class KnowledgeQuestion:
    """One of the task's three questions: the fact kind it asks for and its VQA types."""

    kind: str
    text: str
    question_type: str
    answer_type: str = "other"


KNOWLEDGE_QUESTIONS = (
    KnowledgeQuestion("name", "whose emblem is this?", "whose emblem is"),
    KnowledgeQuestion(
        "good", "what does the owner of this emblem trade in?", "what does the owner"
    ),
    KnowledgeQuestion("city", "where is the owner of this emblem based?", "where is the owner"),
)
"""The questions asked about every image: one hop (the name) and two hops (good, city)."""


# --------------------------------------------------------------------------- assignments


@functools.lru_cache(maxsize=1)
def _universes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    taken = set(GOODS) | set(COLORS) | set(SHAPES)
    names = ["".join(p) for p in itertools.product(syllables, repeat=3)]
    cities = [
        "".join(p) + s for p in itertools.product(syllables, repeat=2) for s in _CITY_SUFFIXES
    ]
    names = [n for n in names if n not in taken]
    cities = [c for c in cities if c not in taken]
    random.Random(_NAME_SEED).shuffle(names)
    random.Random(_CITY_SEED).shuffle(cities)
    return tuple(names), tuple(cities)


def num_assignments() -> int:
    """How many assignments exist: the smaller universe's size // 24 (numbered from 0)."""
    names, cities = _universes()
    return min(len(names), len(cities)) // _EMBLEMS_PER_ASSIGNMENT


def _check_assignment(k: Any, what: str = "assignment") -> int:
    n = num_assignments()
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k < n:
        raise KnowledgeTaskError(
            f"{what} {k!r} does not exist: assignments are the integers 0 to {n - 1}"
        )
    return int(k)


def knowledge_assignment(k: int) -> Assignment:
    """Assignment ``k``: its 24 entities (names, goods, cities), always the same.

    Names and cities are the slice ``[24k, 24k + 24)`` of their shuffled universes
    (so different assignments share none); the goods are 24 distinct words of
    :data:`GOODS` drawn with a generator seeded by ``k`` (assignments may share goods).

    Raises:
        KnowledgeTaskError: (a ``ValueError``) ``k`` is not an integer in
            ``[0, num_assignments())``, naming it and the range.
    """
    return _assignment(_check_assignment(k))


@functools.lru_cache(maxsize=256)
def _assignment(k: int) -> Assignment:
    names, cities = _universes()
    lo, hi = k * _EMBLEMS_PER_ASSIGNMENT, (k + 1) * _EMBLEMS_PER_ASSIGNMENT
    goods = random.Random(f"rvqa-knowledge-goods-{k}").sample(GOODS, _EMBLEMS_PER_ASSIGNMENT)
    return Assignment(
        number=k,
        entities=tuple(
            Entity(emblem, name, good, city)
            for emblem, name, good, city in zip(EMBLEMS, names[lo:hi], goods, cities[lo:hi])
        ),
    )


def shuffled_assignment(assignment: Assignment, seed: int = 0) -> Assignment:
    """A control: ``assignment``'s entities moved to other emblems, none left in place.

    A random derangement (seeded by ``seed``) of the entities over the emblems, so
    that every emblem's name, good and city are another emblem's (within an
    assignment they are all distinct, so every part of every fact card is wrong).
    The result keeps ``assignment``'s number.
    """
    rng = random.Random(f"rvqa-knowledge-shuffle-{assignment.number}-{seed}")
    n = len(assignment.entities)
    order = list(range(n))
    while True:
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            break
    return Assignment(
        number=assignment.number,
        entities=tuple(
            Entity(e.emblem, src.name, src.good, src.city)
            for e, src in zip(assignment.entities, (assignment.entities[j] for j in order))
        ),
    )


def augment_assignment_numbers(
    augment: int | Sequence[int], train_assignment: int, swap_assignment: int
) -> list[int]:
    """The augmentation assignments: a count (the first N numbers that are neither A nor B) or a list.

    Raises:
        KnowledgeTaskError: (a ``ValueError``) Fewer than 1, more than exist, a
            number that does not exist, repeats, or A or B among them.
        TypeError: Neither an integer nor a list of integers.
    """
    if isinstance(augment, bool):
        raise TypeError(
            f"augment_assignments must be a count or a list of integers, got {augment!r}"
        )
    if isinstance(augment, int):
        count = augment
        available = num_assignments() - len({train_assignment, swap_assignment})
        if not 1 <= count <= available:
            raise KnowledgeTaskError(
                f"augment_assignments {count} is out of range: 1 to {available} "
                f"(the assignments that are neither A nor B)"
            )
        out = [k for k in range(count + 2) if k not in (train_assignment, swap_assignment)]
        return out[:count]
    if isinstance(augment, (str, bytes)) or not isinstance(augment, Sequence):
        raise TypeError(
            f"augment_assignments must be a count or a list of integers, got {augment!r}"
        )
    numbers = [_check_assignment(k, "augmentation assignment") for k in augment]
    if not numbers:
        raise KnowledgeTaskError("augment_assignments is an empty list; give at least one")
    repeated = sorted(k for k, c in Counter(numbers).items() if c > 1)
    if repeated:
        raise KnowledgeTaskError(f"augmentation assignments {repeated} are given more than once")
    clash = [k for k in numbers if k in (train_assignment, swap_assignment)]
    if clash:
        raise KnowledgeTaskError(
            f"augmentation assignment {clash[0]} is the train (A={train_assignment}) or swap "
            f"(B={swap_assignment}) assignment; augmentation must use other assignments"
        )
    return numbers


# --------------------------------------------------------------------------- facts

_CARD = (
    "the {color} {shape} is the emblem of {name}, which trades in {good} and is based in {city}."
)

_WORD = r"([a-z]+)"
_COLOR_RE = "(" + "|".join(COLORS) + ")"
_SHAPE_RE = "(" + "|".join(SHAPES) + ")"
_CARD_RE = re.compile(
    rf"the {_COLOR_RE} {_SHAPE_RE} is the emblem of {_WORD}, which trades in {_WORD} "
    rf"and is based in {_WORD}\."
)


def emblem_facts(entity: Entity) -> str:
    """The fact card of an entity: one sentence naming its emblem, name, good and city.

    It names the emblem, so that a query made from the image alone retrieves it, and
    it holds all three answers, so that one retrieved card answers the one-hop
    question (emblem → name) and both two-hop ones (emblem → owner → good, city).
    """
    return _CARD.format(
        color=entity.emblem.color,
        shape=entity.emblem.shape,
        name=entity.name,
        good=entity.good,
        city=entity.city,
    )


def parse_fact(text: str) -> Fact:
    """The inverse of :func:`emblem_facts`: a fact card's emblem, name, good and city.

    Raises:
        KnowledgeTaskError: (a ``ValueError``) ``text`` is not a fact of the task
            (named, with an example of one).
        TypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"a fact must be a string, got {type(text).__name__} {text!r}")
    m = _CARD_RE.fullmatch(text)
    if m is not None:
        color, shape, name, good, city = m.groups()
        return Fact(Emblem(color, shape), name, good, city)
    example = emblem_facts(knowledge_assignment(0).entities[0])
    raise KnowledgeTaskError(
        f"{text!r} is not a fact of the knowledge task (facts read e.g. {example!r})"
    )


def check_facts(
    texts: Iterable[str], where: str, assignment: Assignment | None = None
) -> list[Fact]:
    """Parse every text as a fact of the task, failing on the first that is not one.

    Args:
        texts: Fact texts, e.g. a knowledge index's captions.
        where: What holds them, for the message (e.g. the index folder).
        assignment: When given, each fact must also be true under it (name, good
            and city of its emblem's owner).

    Returns:
        The parsed facts, in order.

    Raises:
        KnowledgeTaskError: (a ``ValueError``) Naming ``where``, the text's position
            and the text: not a fact, or (with ``assignment``) a fact that the
            assignment contradicts.
    """
    out = []
    for i, text in enumerate(texts):
        try:
            fact = parse_fact(text)
        except (KnowledgeTaskError, TypeError) as err:
            raise KnowledgeTaskError(f"{where}: text {i}: {err}") from None
        if assignment is not None:
            entity = assignment.entity(fact.emblem)
            wrong = [k for k in FACT_KINDS if fact.value(k) != entity.value(k)]
            if wrong:
                raise KnowledgeTaskError(
                    f"{where}: text {i} {text!r} is not a fact of assignment "
                    f"{assignment.number} (wrong {', '.join(wrong)}; there the card of "
                    f"the {fact.emblem} reads {emblem_facts(entity)!r})"
                )
        out.append(fact)
    return out


def check_index_facts(index: Any, where: str) -> None:
    """Every caption of a knowledge index must parse as a fact card of the task.

    ``index`` is anything with ``len`` and ``lookup(rows) -> (ids, texts)`` (a
    :class:`~rvqa.retriever.index.KnowledgeIndex`), read in chunks.

    Raises:
        KnowledgeTaskError: Naming ``where``, the first offending row and its text.
    """
    n, chunk = len(index), 4096
    for start in range(0, n, chunk):
        _, texts = index.lookup(range(start, min(n, start + chunk)))
        for row, text in enumerate(texts, start):
            try:
                parse_fact(text)
            except (KnowledgeTaskError, TypeError) as err:
                raise KnowledgeTaskError(
                    f"{where}: row {row}: {err} (data.require_facts: the knowledge task "
                    "reads only its facts)"
                ) from None


# --------------------------------------------------------------------------- the task folder

_TRAIN, _TEST = "train", "test"
_FILES = {
    "train_questions": "OpenEnded_knowledge_train_questions.json",
    "train_annotations": "knowledge_train_annotations.json",
    "test_questions": "OpenEnded_knowledge_test_questions.json",
    "test_annotations": "knowledge_test_A_annotations.json",
    "test_B_annotations": "knowledge_test_B_annotations.json",
    "facts_A": "facts/A.jsonl",
    "facts_B": "facts/B.jsonl",
    "facts_A_shuffled": "facts/A-shuffled.jsonl",
    "retriever_captions": "retriever_captions.jsonl",
    "worlds": "worlds.json",
    "worlds_with_swap": "worlds-with-swap.json",
    "manifest": "task.json",
    "config": "knowledge.yaml",
}
_SPLITS = {  # split -> (questions, annotations, image split, assignment role)
    "train": ("train_questions", "train_annotations", _TRAIN, "A"),
    "test": ("test_questions", "test_annotations", _TEST, "A"),
    "test_B": ("test_questions", "test_B_annotations", _TEST, "B"),
}


@dataclass(frozen=True)
class _TaskImage:
    image_id: int
    source: str
    emblem: Emblem


def _task_images(split: str, limit: int | None) -> tuple[list[_TaskImage], int]:
    """The split's images with both colour and shape known (first ``limit``), and how many were skipped."""
    offset = TEST_IMAGE_ID_OFFSET if split == _TEST else 0
    usable, skipped = [], 0
    for im in easy_vqa_images(split):
        if im.color is None or im.shape is None:
            skipped += 1
            continue
        usable.append(_TaskImage(im.image_id + offset, im.image, Emblem(im.color, im.shape)))
    if limit is not None:
        usable = usable[:limit]
    return usable, skipped


def _check_colors() -> None:
    found = tuple(sorted(easy_vqa_colors()))
    if found != COLORS:
        raise DataFormatError(
            f"the installed easy-vqa draws the colours {found}, the knowledge task expects "
            f"{COLORS}; the task's emblems would not match its images"
        )


def _questions_json(subtype: str, images: list[_TaskImage]) -> dict:
    return {
        "info": {
            "description": "rvqa knowledge task (easy-vqa emblems)",
            "version": GENERATOR_VERSION,
        },
        "task_type": "Open-Ended",
        "data_type": "knowledge",
        "data_subtype": subtype,
        "license": {"name": "easy-vqa images (MIT); invented facts"},
        "questions": [
            {"image_id": im.image_id, "question": q.text, "question_id": im.image_id * 10 + j}
            for im in images
            for j, q in enumerate(KNOWLEDGE_QUESTIONS)
        ],
    }


def _annotations_json(subtype: str, images: list[_TaskImage], assignment: Assignment) -> dict:
    annotations = []
    for im in images:
        entity = assignment.entity(im.emblem)
        for j, q in enumerate(KNOWLEDGE_QUESTIONS):
            answer = entity.value(q.kind)
            annotations.append(
                {
                    "question_id": im.image_id * 10 + j,
                    "image_id": im.image_id,
                    "question_type": q.question_type,
                    "answer_type": q.answer_type,
                    "multiple_choice_answer": answer,
                    "answers": [
                        {"answer": answer, "answer_confidence": "yes", "answer_id": i + 1}
                        for i in range(NUM_HUMAN_ANSWERS)
                    ],
                }
            )
    return {
        "info": {"description": f"rvqa knowledge task, answers of assignment {assignment.number}"},
        "data_type": "knowledge",
        "data_subtype": subtype,
        "license": {"name": "easy-vqa images (MIT); invented facts"},
        "annotations": annotations,
    }


def _fact_lines(assignment: Assignment, label: str) -> list[dict]:
    return [
        {"caption": emblem_facts(e), "id": f"{label}-{e.emblem.color}-{e.emblem.shape}"}
        for e in assignment.entities
    ]


def _world(base: Assignment, other: Assignment) -> dict[str, str]:
    table = {}
    for b, o in zip(base.entities, other.entities):
        for kind in FACT_KINDS:
            table[b.value(kind)] = o.value(kind)
    return table


def _write_json(path: Path, data: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")


def _image_name(split: str, image_id: int) -> str:
    return f"images/{split}/{coco_image_name(split, image_id)}"


def _write_images(root: Path, split: str, images: list[_TaskImage]) -> None:
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for im in images:
        with Image.open(im.source) as src:
            # 4:4:4 chroma (no subsampling): 64-pixel shapes keep their colours at the edges.
            src.convert("RGB").save(
                root / _image_name(split, im.image_id), "JPEG", quality=95, subsampling=0
            )


def knowledge_run_config(root: str, output_dir: str = "runs/knowledge") -> dict:
    """The run config of a task folder, as a mapping (``knowledge.yaml``'s content).

    Data source ``vqa`` with the splits ``train`` (assignment A), ``test`` (held-out
    images, A) and ``test_B`` (the same questions, answers of B); the index of A's
    facts (``knowledge-A``); the retriever trained on ``retriever_captions.jsonl``;
    the classifier reader with ``top_k`` 1, a caption budget that fits every fact card and
    the term worlds with B (``worlds-with-swap.json``), every world's terms in its vocabulary.

    Args:
        root: The task folder as the config names it (absolute, or relative to the
            folder runs start in).
        output_dir: The run folder.
    """

    def at(rel: str) -> str:
        return f"{root.rstrip('/')}/{rel}"

    splits = {}
    for split, (q, a, images, _) in _SPLITS.items():
        splits[split] = {
            "questions": at(_FILES[q]),
            "annotations": at(_FILES[a]),
            "images": at(f"images/{images}"),
        }
    return {
        "output_dir": output_dir,
        "data": {
            "source": "vqa",
            "train_split": "train",
            "eval_split": "test",
            "splits": splits,
            "require_facts": True,
        },
        "retriever": {
            # + [CLS] and [SEP]: the retriever's budget counts the special tokens
            "max_caption_length": READER_CAPTION_LENGTH + 2,
            "captions": {
                "source": "jsonl",
                "path": at(_FILES["retriever_captions"]),
                "images": root,
            },
        },
        "index": {
            "name": "knowledge-A",
            "captions": {"source": "jsonl", "path": at(_FILES["facts_A"])},
        },
        "reader": {
            # one card: a retriever trained on the task's cards ranks the image's own first
            # (use 3 with a retriever that has not seen the cards)
            "top_k": 1,
            "max_caption_length": READER_CAPTION_LENGTH,
            # facts belong to no image: nothing to exclude
            "exclude_own_captions": False,
            # each training question rewritten into another assignment; the classifier
            # reader can only answer what is in its vocabulary, so its worlds include B
            # (worlds-with-swap.json; the generative reader's worlds.json never does)
            "term_worlds": at(_FILES["worlds_with_swap"]),
            # every world's terms are answers (~19,000 with 400 worlds): keep them all (a
            # frequency cut would drop terms at random among equal counts, B's too)
            "answer_vocab_size": 1_000_000,
        },
    }


_CONFIG_HEADER = """\
# The run config of this knowledge task (written by `rvqa make-knowledge-task`).
# Data paths are absolute (this folder); output_dir is relative to where you run rvqa.
#   rvqa train-retriever --config {cfg}
#   rvqa build-index --config {cfg}                     # facts/A.jsonl -> indices/knowledge-A
#   rvqa train-reader --config {cfg}
#   rvqa evaluate --model runs/knowledge --split test --out runs/knowledge/eval-A
"""


def make_knowledge_task(
    out_dir: str | os.PathLike,
    *,
    train_assignment: int = 0,
    swap_assignment: int = 1,
    augment_assignments: int | Sequence[int] = DEFAULT_AUGMENT_ASSIGNMENTS,
    max_train_images: int | None = None,
    max_test_images: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write the knowledge task folder ``out_dir`` (atomically: complete or absent).

    Files (paths relative to ``out_dir``):

    * ``images/train/COCO_train_<id:012d>.jpg`` (easy-vqa train images) and
      ``images/test/COCO_test_<id:012d>.jpg`` (easy-vqa test images, ids +
      :data:`TEST_IMAGE_ID_OFFSET`): RGB JPEG, quality 95, no chroma subsampling.
      Images whose colour or shape their easy-vqa answers do not determine are
      skipped (counted in the manifest).
    * Official-format questions and annotations (3 questions per image, 10
      identical answers each): ``OpenEnded_knowledge_train_questions.json`` +
      ``knowledge_train_annotations.json`` (answers of assignment A),
      ``OpenEnded_knowledge_test_questions.json`` + ``knowledge_test_A_annotations.json``
      (A) and ``knowledge_test_B_annotations.json`` (the same questions under B).
    * ``facts/A.jsonl``, ``facts/B.jsonl``, ``facts/A-shuffled.jsonl`` (A's
      entities deranged over the emblems: every card wrong): 24 fact cards each
      (:func:`emblem_facts`), ``{"caption", "id"}`` lines (ids ``A-red-circle``...)
      for the ``jsonl`` caption source.
    * ``retriever_captions.jsonl``: each train image's fact card under a random
      augmentation assignment (``caption``, ``id``, ``image_id``, ``image`` relative
      to ``out_dir``); never B's terms.
    * ``worlds.json``: ``{"base": A, "worlds": {"<k>": {A's term: k's term}}}`` for
      the augmentation assignments (whole-word substitution, applied simultaneously);
      ``worlds-with-swap.json``: the same plus B.
    * ``task.json``: the manifest (options, counts, chance levels, emblem tables).
    * ``knowledge.yaml``: a run config with absolute data paths
      (:func:`knowledge_run_config`).

    Args:
        out_dir: The task folder.
        train_assignment: A, the assignment of the training answers and ``test``.
        swap_assignment: B, the assignment of ``test_B``; not A.
        augment_assignments: A count (the first N assignments that are neither A nor
            B) or a list of assignment numbers.
        max_train_images: Use only the first N usable train images (fast runs).
        max_test_images: Use only the first N usable test images.
        seed: Seed of the shuffled control and of the retriever captions' assignments.
        overwrite: Replace an existing ``out_dir``.

    Returns:
        The manifest (``task.json``'s content).

    Raises:
        KnowledgeTaskError: (a ``ValueError``) An assignment that does not exist, A
            equal to B, bad augmentation assignments.
        UsageError: (a ``ValueError``) A limit below 1.
        TypeError: A limit or seed that is not an integer.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    a_num = _check_assignment(train_assignment, "train assignment (A)")
    b_num = _check_assignment(swap_assignment, "swap assignment (B)")
    if a_num == b_num:
        raise KnowledgeTaskError(
            f"the train assignment (A) and the swap assignment (B) are both {a_num}; "
            f"test_B must use other facts than A"
        )
    augment = augment_assignment_numbers(augment_assignments, a_num, b_num)
    limits = {}
    for name, value in (
        ("max_train_images", max_train_images),
        ("max_test_images", max_test_images),
    ):
        limits[name] = None if value is None else check_int(value, name, 1)
    seed = check_int(seed, "seed", 0)
    out = Path(out_dir)
    if out.exists() and not overwrite:  # before the slow part
        raise FileExistsError(
            f"{out} already exists (pass overwrite=True / --overwrite to replace it)"
        )
    _check_colors()

    A, B = knowledge_assignment(a_num), knowledge_assignment(b_num)
    shuffled = shuffled_assignment(A, seed)
    images = {}
    skipped = {}
    for split, limit in ((_TRAIN, limits["max_train_images"]), (_TEST, limits["max_test_images"])):
        images[split], skipped[split] = _task_images(split, limit)
        if not images[split]:
            raise DataFormatError(f"easy-vqa {split}: no image with a known colour and shape")
    assignments = {"A": A, "B": B}

    rng = random.Random(f"rvqa-knowledge-retriever-{seed}")
    retriever_rows = []
    for im in images[_TRAIN]:
        k = rng.choice(augment)
        retriever_rows.append(
            {
                "caption": emblem_facts(knowledge_assignment(k).entity(im.emblem)),
                "id": str(im.image_id),
                "image_id": im.image_id,
                "image": _image_name(_TRAIN, im.image_id),
            }
        )
    worlds = {str(k): _world(A, knowledge_assignment(k)) for k in augment}

    splits_info = {}
    for split, (q, a, image_split, role) in _SPLITS.items():
        split_images = images[image_split]
        per_type = {kq.question_type: len(split_images) for kq in KNOWLEDGE_QUESTIONS}
        splits_info[split] = {
            "questions": _FILES[q],
            "annotations": _FILES[a],
            "images": f"images/{image_split}",
            "assignment": assignments[role].number,
            "num_images": len(split_images),
            "num_questions": len(split_images) * len(KNOWLEDGE_QUESTIONS),
            "questions_per_type": per_type,
        }
    chance = 1 / _EMBLEMS_PER_ASSIGNMENT
    manifest = {
        "generator": "rvqa.data.knowledge",
        "generator_version": GENERATOR_VERSION,
        "train_assignment": a_num,
        "swap_assignment": b_num,
        "augment_assignments": augment,
        "num_assignments": num_assignments(),
        "seed": seed,
        "max_train_images": limits["max_train_images"],
        "max_test_images": limits["max_test_images"],
        "splits": splits_info,
        "questions": [
            {
                "question": q.text,
                "kind": q.kind,
                "question_type": q.question_type,
                "answer_type": q.answer_type,
            }
            for q in KNOWLEDGE_QUESTIONS
        ],
        "chance_accuracy": {q.question_type: chance for q in KNOWLEDGE_QUESTIONS}
        | {"overall": chance},
        # goods may repeat across assignments: test_B questions whose answer is A's too
        "test_B_answers_same_as_A": {
            q.question_type: sum(
                A.entity(im.emblem).value(q.kind) == B.entity(im.emblem).value(q.kind)
                for im in images[_TEST]
            )
            for q in KNOWLEDGE_QUESTIONS
        },
        "skipped_images": skipped,
        "skipped_images_reason": "their easy-vqa answers do not determine both colour and shape",
        "files": dict(_FILES),
        "num_facts": {
            "A": len(A.facts()),
            "B": len(B.facts()),
            "A-shuffled": len(shuffled.facts()),
        },
        "num_retriever_captions": len(retriever_rows),
        "reader_max_caption_length": READER_CAPTION_LENGTH,
        "emblems": {"A": A.table(), "B": B.table(), "A-shuffled": shuffled.table()},
    }
    root = os.path.abspath(out)
    run_config = knowledge_run_config(root)
    config_from_dict(run_config, source="knowledge.yaml")  # a typo here would fail the user's run
    config_text = _CONFIG_HEADER.format(cfg=f"{root}/{_FILES['config']}") + yaml.safe_dump(
        run_config, sort_keys=False
    )

    with atomic_directory(out, overwrite=overwrite) as tmp:
        for split in (_TRAIN, _TEST):
            _write_images(tmp, split, images[split])
            _write_json(tmp / _FILES[f"{split}_questions"], _questions_json(split, images[split]))
        _write_json(tmp / _FILES["train_annotations"], _annotations_json(_TRAIN, images[_TRAIN], A))
        _write_json(tmp / _FILES["test_annotations"], _annotations_json(_TEST, images[_TEST], A))
        _write_json(tmp / _FILES["test_B_annotations"], _annotations_json(_TEST, images[_TEST], B))
        _write_jsonl(tmp / _FILES["facts_A"], _fact_lines(A, "A"))
        _write_jsonl(tmp / _FILES["facts_B"], _fact_lines(B, "B"))
        _write_jsonl(tmp / _FILES["facts_A_shuffled"], _fact_lines(shuffled, "A-shuffled"))
        _write_jsonl(tmp / _FILES["retriever_captions"], retriever_rows)
        _write_json(tmp / _FILES["worlds"], {"base": a_num, "worlds": worlds}, indent=1)
        _write_json(
            tmp / _FILES["worlds_with_swap"],
            {"base": a_num, "worlds": worlds | {str(b_num): _world(A, B)}},
            indent=1,
        )
        _write_json(tmp / _FILES["manifest"], manifest, indent=1)
        (tmp / _FILES["config"]).write_text(config_text, encoding="utf-8")
    logger.info(
        "knowledge task in %s: %d train and %d test images (A=%d, B=%d, %d augmentation assignments)",
        out,
        len(images[_TRAIN]),
        len(images[_TEST]),
        a_num,
        b_num,
        len(augment),
    )
    return manifest
