"""The answer vocabulary of the reader and its soft training targets.

VQA is trained as multi-label classification over the most frequent training
answers (3,129 for VQAv2 in Bottom-Up / Pythia / VisualBERT). Answers are first
normalised exactly like the official evaluation (:func:`rvqa.metrics.normalize_answer`),
so "Two", "two." and "2" are one class.

Soft targets, per question, from its human answers (10 in VQAv2 / OK-VQA):

* ``"min3"`` (default, the standard training recipe): ``score(a) = min(1, count(a) / 3)``
  — 1, 2, 3+ matching annotators give 0.333, 0.667, 1.0.
* ``"loo"``: the official metric's leave-one-out average, i.e. the accuracy the
  prediction ``a`` would get: ``[c · min(1, (c-1)/3) + (n-c) · min(1, c/3)] / n`` for
  ``c`` of ``n`` answers — 0.3, 0.6, 0.9, then 1.0 for 10 answers.

Answers outside the vocabulary are "other": they get no target (the question may
then have an all-zero target) and are counted by :meth:`AnswerVocab.coverage`.

Only the standard library, numpy, :mod:`rvqa.io` and :mod:`rvqa.metrics` are imported (no torch).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rvqa.errors import DataFormatError, UsageError
from rvqa.io import write_json_atomic
from rvqa.metrics import normalize_answer

FORMAT = "rvqa-answer-vocab"
VERSION = 1
SOFT_TARGET_RULES = ("min3", "loo")
"""The rules that turn human answers into training targets (see :func:`soft_score`);
``ReaderConfig.soft_target_rule`` is checked against this tuple."""


def soft_score(count: int, num_answers: int, rule: str = "min3") -> float:
    """The target of an answer given by ``count`` of ``num_answers`` annotators.

    Args:
        count: Annotators who gave this (normalised) answer.
        num_answers: All answers of the question (in and out of the vocabulary).
        rule: ``"min3"`` = ``min(1, count/3)``; ``"loo"`` = the official metric's
            leave-one-out average.

    Raises:
        ValueError: An unknown rule.
    """
    if rule == "min3":
        return min(1.0, count / 3.0)
    if rule == "loo":
        if num_answers <= 1:  # nothing to leave out: the plain rule
            return min(1.0, count / 3.0)
        matched = count * min(1.0, (count - 1) / 3.0)  # left-out answer was this one
        unmatched = (num_answers - count) * min(1.0, count / 3.0)
        return (matched + unmatched) / num_answers
    raise UsageError(f"rule must be one of {', '.join(SOFT_TARGET_RULES)}; got {rule!r}")


@dataclass
class AnswerCoverage:
    """How well a vocabulary covers a set of questions (see :meth:`AnswerVocab.coverage`).

    Attributes:
        questions: Questions looked at.
        answers: Human answers looked at.
        answers_in_vocab: Of those, answers in the vocabulary.
        questions_with_target: Questions with at least one answer in the vocabulary.
        max_accuracy: Mean over questions of the best soft score the vocabulary
            allows (an upper bound of the VQA accuracy under that rule).
    """

    questions: int
    answers: int
    answers_in_vocab: int
    questions_with_target: int
    max_accuracy: float

    @property
    def answer_coverage(self) -> float:
        """Fraction of human answers that are in the vocabulary."""
        return self.answers_in_vocab / self.answers if self.answers else 0.0

    @property
    def question_coverage(self) -> float:
        """Fraction of questions with a non-zero target."""
        return self.questions_with_target / self.questions if self.questions else 0.0


class AnswerVocab:
    """An ordered list of normalised answers: class index ↔ answer string.

    Args:
        answers: The answers, already normalised (:func:`build_vocab` makes them so),
            in class-index order.
        counts: Their training counts (kept for reference; optional).

    Raises:
        TypeError: Answers that are not strings.
        ValueError: Empty or duplicate answers, or counts of another length.
    """

    def __init__(self, answers: Sequence[str], counts: Sequence[int] | None = None):
        answers = list(answers)
        for i, a in enumerate(answers):
            if not isinstance(a, str):
                raise TypeError(f"answer {i} must be a string, got {type(a).__name__}: {a!r}")
            if not a:
                raise UsageError(f"answer {i} is empty")
        if len(set(answers)) != len(answers):
            dupes = sorted(a for a, c in Counter(answers).items() if c > 1)
            raise UsageError(f"duplicate answers in the vocabulary: {dupes[:5]}")
        if counts is not None and len(counts) != len(answers):
            raise UsageError(f"{len(counts)} counts for {len(answers)} answers")
        self.answers = answers
        self.counts = [int(c) for c in counts] if counts is not None else None
        self._index = {a: i for i, a in enumerate(answers)}

    @classmethod
    def build(
        cls, answer_lists: Iterable[Sequence[str]], size: int | None = None, min_count: int = 1
    ) -> AnswerVocab:
        """Same as :func:`build_vocab`."""
        return build_vocab(answer_lists, size=size, min_count=min_count)

    # ------------------------------------------------------------------ lookup

    def __len__(self) -> int:
        return len(self.answers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.answers)

    def __contains__(self, answer: object) -> bool:
        return isinstance(answer, str) and self.encode(answer) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnswerVocab) and self.answers == other.answers

    def __repr__(self) -> str:
        head = ", ".join(repr(a) for a in self.answers[:5])
        more = ", ..." if len(self) > 5 else ""
        return f"AnswerVocab({len(self)} answers: {head}{more})"

    def encode(self, answer: str) -> int | None:
        """Class index of an answer after normalisation; ``None`` if it is "other"."""
        if not isinstance(answer, str):
            raise TypeError(f"answer must be a string, got {type(answer).__name__}: {answer!r}")
        index = self._index.get(answer)
        return index if index is not None else self._index.get(normalize_answer(answer))

    def decode(self, index: int) -> str:
        """The answer string of a class index.

        Raises:
            TypeError: A non-integer index.
            IndexError: An index outside ``0 .. len(vocab) - 1``.
        """
        if not isinstance(index, int) and hasattr(index, "item"):  # numpy / 0-d torch scalars
            try:
                index = index.item()
            except (ValueError, RuntimeError):
                raise TypeError(f"index must be a single integer, got {index!r}") from None
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an integer, got {type(index).__name__}: {index!r}")
        if not 0 <= index < len(self.answers):
            raise IndexError(f"answer index {index} outside 0..{len(self.answers) - 1}")
        return self.answers[index]

    # ------------------------------------------------------------------ targets

    def _counts(self, answers: Sequence[str]) -> tuple[Counter[int], int]:
        """In-vocabulary class counts and the number of all answers."""
        if isinstance(answers, str) or not isinstance(answers, Sequence):
            raise TypeError(
                f"answers must be a list of strings (one per annotator), got {answers!r}"
            )
        counts: Counter[int] = Counter()
        for a in answers:
            if not isinstance(a, str):
                raise TypeError(f"answers must be strings, got {type(a).__name__}: {a!r}")
            index = self._index.get(normalize_answer(a))
            if index is not None:  # else "other": no target
                counts[index] += 1
        return counts, len(answers)

    def soft_targets(self, answers: Sequence[str], rule: str = "min3") -> dict[int, float]:
        """Sparse soft targets ``{class index: score}`` of one question.

        Args:
            answers: The question's human answers (raw; normalised here). Answers not
                in the vocabulary are ignored.
            rule: ``"min3"`` or ``"loo"`` (see the module docstring).
        """
        counts, total = self._counts(answers)
        return {i: soft_score(c, total, rule) for i, c in sorted(counts.items())}

    def soft_target_vector(self, answers: Sequence[str], rule: str = "min3") -> np.ndarray:
        """Dense soft targets, a float32 vector of ``len(vocab)`` (the ``labels`` row)."""
        out = np.zeros(len(self.answers), dtype=np.float32)
        for i, score in self.soft_targets(answers, rule).items():
            out[i] = score
        return out

    def coverage(self, answer_lists: Iterable[Sequence[str]], rule: str = "min3") -> AnswerCoverage:
        """Count how many answers / questions the vocabulary covers (the "other" stats)."""
        questions = answers = in_vocab = with_target = 0
        best = 0.0
        for answer_list in answer_lists:
            counts, total = self._counts(answer_list)
            questions += 1
            answers += total
            in_vocab += sum(counts.values())
            if counts:
                with_target += 1
                best += max(soft_score(c, total, rule) for c in counts.values())
        return AnswerCoverage(
            questions=questions,
            answers=answers,
            answers_in_vocab=in_vocab,
            questions_with_target=with_target,
            max_accuracy=best / questions if questions else 0.0,
        )

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as JSON (atomically), e.g. a vocabulary built once and shared.

        A trained reader does not need this file: its vocabulary is
        ``ReaderConfig.answers`` (in the model's ``config.json``), the one copy
        the pipeline reads.
        """
        data: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "normalization": "rvqa.metrics.normalize_answer (official VQA evaluation)",
            "answers": self.answers,
        }
        if self.counts is not None:
            data["counts"] = self.counts
        return write_json_atomic(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnswerVocab:
        """Read a vocabulary written by :meth:`save`.

        Raises:
            FileNotFoundError: No such file.
            ValueError: The file is not an rvqa answer vocabulary.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"answer vocabulary not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataFormatError(
                f"{path}: not an rvqa answer vocabulary (format {FORMAT!r} expected)"
            )
        if data.get("version") != VERSION:
            raise DataFormatError(f"{path}: unsupported vocabulary version {data.get('version')!r}")
        if not isinstance(data.get("answers"), list):
            raise DataFormatError(f"{path}: 'answers' must be a list of strings")
        return cls(data["answers"], data.get("counts"))


def _check_strings(i: int, answers: Sequence[Any]) -> None:
    for a in answers:
        if not isinstance(a, str):
            raise TypeError(f"answer list {i} holds a {type(a).__name__}: {a!r}")


def build_vocab(
    answer_lists: Iterable[Sequence[str]], size: int | None = None, min_count: int = 1
) -> AnswerVocab:
    """The ``size`` most frequent normalised answers of a training set.

    Every human answer counts once (all annotators' answers, so an answer given by
    several annotators of one question weighs more). To count one answer per
    question instead — e.g. VQAv2's ``multiple_choice_answer`` as Pythia does —
    pass ``[[mc_answer] for each question]``. Order: count descending, then the
    string, so the vocabulary (and the class indices) is deterministic. Answers that
    normalise to the empty string (e.g. ``"a"``) are dropped.

    Args:
        answer_lists: Each question's answers (raw strings).
        size: Keep at most this many answers (``None`` = all).
        min_count: Keep only answers seen at least this often.

    Raises:
        TypeError: An entry that is not a list of strings.
        ValueError: ``size`` or ``min_count`` < 1, or no answer survives.
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UsageError(f"size must be a positive integer or None, got {size!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise UsageError(f"min_count must be a positive integer, got {min_count!r}")
    # Answers repeat a lot (10 annotators; term worlds: millions of lists): count the raw
    # strings in C (Counter.update), then normalise each distinct one once.
    # A streaming pass (term worlds yield millions of lists): a list is type-checked
    # only when it brings a new distinct answer, which a non-string always is first.
    raw: Counter[Any] = Counter()
    for i, answers in enumerate(answer_lists):
        if isinstance(answers, str) or not isinstance(answers, Sequence):
            raise TypeError(
                f"answer list {i} must be a list of strings, got {type(answers).__name__}"
            )
        seen = len(raw)
        try:
            raw.update(answers)
        except TypeError:  # an unhashable entry
            _check_strings(i, answers)
            raise
        if len(raw) != seen:
            _check_strings(i, answers)
    counts: Counter[str] = Counter()
    for a, c in raw.items():
        norm = normalize_answer(a)
        if norm:
            counts[norm] += c
    ranked = sorted(
        ((a, c) for a, c in counts.items() if c >= min_count), key=lambda ac: (-ac[1], ac[0])
    )[:size]
    if not ranked:
        raise UsageError(
            f"no answer occurs at least min_count={min_count} times; the vocabulary would be empty"
        )
    return AnswerVocab([a for a, _ in ranked], [c for _, c in ranked])
