"""Evaluation metrics: the official VQA accuracy and cross-modal Recall@K.

This module is deliberately light: it imports only the standard library and
numpy, so ``import rvqa.metrics`` never loads torch or model code.

VQA accuracy
------------
:func:`normalize_answer`, :func:`vqa_accuracy` and :func:`evaluate_vqa`
reproduce the official VQA evaluation tool (``GT-Vision-Lab/VQA``,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, master, with the Python 2.7
``round`` it was written for), quirks included, so that scores match it bit for bit:

1. Prediction and human answers: ``"\\n"`` and ``"\\t"`` become spaces, then
   surrounding whitespace is stripped.
2. If the human answers of a question are all the same string (after step 1),
   nothing else is normalised: the prediction must equal that string exactly
   (case and punctuation included).
3. Otherwise prediction and human answers go through
   :func:`process_punctuation` then :func:`process_digit_article`
   (together: :func:`normalize_answer`).
4. Each human answer is left out in turn; against the other answers the
   prediction scores ``min(1, matches / 3)``. The question's accuracy is the
   mean over the leave-one-out subsets (with 10 answers and ``m`` matches:
   0, 0.3, 0.6, 0.9, then 1.0 for ``m >= 4``).
5. Aggregates are ``round(100 * sum / count, 2)`` over questions, per question
   type and per answer type; per-question scores are ``round(100 * acc, 2)``.
   ``round`` is the official script's, Python 2.7's: the float's exact binary
   value rounded to 2 decimals, halves away from zero (a group at exactly
   40.625 is 40.63; Python 3's ``round`` would give 40.62). See :func:`round_half_away`.

Recall@K
--------
:func:`recall_at_k` and :func:`recall_at_k_folds` implement the standard
image–caption retrieval protocol (VSE++; COCO 1K / 5K, Flickr30K) exactly,
with bounded memory and deterministic tie handling; :func:`recall_at_k_multi`
is its many-to-many form (a text shared by several images). All three rank
with one core: the rank of a query's best positive in a stable descending
sort of the gallery.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

import numpy as np

__all__ = [
    "NUM_HUMAN_ANSWERS",
    "VQAEvalResult",
    "evaluate_module_path",
    "evaluate_vqa",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "r_precision",
    "recall_at_k",
    "recall_at_k_folds",
    "recall_at_k_multi",
    "round_half_away",
    "vqa_accuracy",
]

NUM_HUMAN_ANSWERS = 10
"""Human answers per question in VQA v1/v2 and OK-VQA (the official format)."""

# ---------------------------------------------------------------------------
# Answer normalisation (official vqaEval.py rules)
# ---------------------------------------------------------------------------

# Characters handled by the punctuation rule, in the official order. The order
# does not change the result (each character is replaced independently), but
# it is kept for clarity. Note what is *not* here: the apostrophe (so "don't"
# survives to meet the contraction table), ':' and '.' (periods have their own
# rule below).
_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# A digit, a comma, a digit ("1,000"). If this occurs anywhere in the text,
# every punctuation character is deleted rather than replaced by a space.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")

# The official pattern is "(?!<=\d)(\.)(?!\d)": the first group is a *negative
# lookahead* for the literal text "<=" + digit (a typo for a lookbehind), which
# can never match where a '.' starts. So the effective rule is: delete every
# '.' that is not followed by a digit ("yes." -> "yes", "a.b" -> "ab",
# "2.5" and ".5" kept, "5." -> "5").
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# The official call is ``periodStrip.sub("", text, re.UNICODE)``: re.UNICODE
# lands in the positional *count* argument (re.UNICODE == 32), so at most the
# first 32 such periods are deleted.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

_NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The official contraction table, entry for entry (120 entries), sorted here
# by spelling. It maps whole lower-cased words, after article removal. Its
# quirks are kept on purpose:
# - the capitalised keys ("Id've", "I'dve", "Im", "Ive") can never match,
#   because words are lower-cased first;
# - "somebody'd" maps *to* "somebodyd" (the reverse of every other entry);
# - "let's" and "she's" map to themselves;
# - "hed" becomes "he'd" and "twas" becomes "'twas"; "ow's'at" gains a
#   leading apostrophe;
# - many forms are simply absent (e.g. "shed", "wed", "ill"): only the words
#   listed here change.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "couldve": "could've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadn'tve": "hadn't've",
    "hadnt've": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "he'dve": "he'd've",
    "hed've": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "I'dve": "I'd've",
    "Id've": "I'd've",
    "Im": "I'm",
    "isnt": "isn't",
    "itd": "it'd",
    "it'dve": "it'd've",
    "itd've": "it'd've",
    "itll": "it'll",
    "Ive": "I've",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightn'tve": "mightn't've",
    "mightnt've": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "'ow'sat": "'ow's'at",
    "'ows'at": "'ow's'at",
    "ow's'at": "'ow's'at",
    "shant": "shan't",
    "she'dve": "she'd've",
    "shed've": "she'd've",
    "she's": "she's",
    "shouldnt": "shouldn't",
    "shouldn'tve": "shouldn't've",
    "shouldnt've": "shouldn't've",
    "shouldve": "should've",
    "somebody'd": "somebodyd",
    "somebody'dve": "somebody'd've",
    "somebodyd've": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someone'dve": "someone'd've",
    "someoned've": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "something'dve": "something'd've",
    "somethingd've": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "there'dve": "there'd've",
    "thered've": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "they'dve": "they'd've",
    "theyd've": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "we'dve": "we'd've",
    "wed've": "we'd've",
    "werent": "weren't",
    "weve": "we've",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "who'dve": "who'd've",
    "whod've": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "wouldn'tve": "wouldn't've",
    "wouldnt've": "wouldn't've",
    "wouldve": "would've",
    "yall": "y'all",
    "y'all'dve": "y'all'd've",
    "y'alld've": "y'all'd've",
    "yall'd've": "y'all'd've",
    "y'allll": "y'all'll",
    "yall'll": "y'all'll",
    "youd": "you'd",
    "you'dve": "you'd've",
    "youd've": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip (done to every answer first)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation`` step.

    For each punctuation character ``p`` (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``):
    if ``p + " "`` or ``" " + p`` occurs in the *input* text, or the input
    contains a digit-comma-digit pattern (``"1,000"``) anywhere, every ``p`` is
    deleted; otherwise every ``p`` is replaced by a space. Then each ``.`` not
    followed by a digit is deleted (at most 32 of them, as in the official
    call). Case, apostrophes and colons are left alone.

    Examples: ``"t-shirt"`` -> ``"t shirt"``, ``"x, y"`` -> ``"x y"``,
    ``"1,000"`` -> ``"1000"``, ``"yes."`` -> ``"yes"``, ``"2.5"`` -> ``"2.5"``.

    Args:
        text: The answer (already whitespace-cleaned in the official flow).

    Returns:
        The text with punctuation processed.
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        # The neighbour check looks at the original text, not at ``out``.
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle`` step.

    Lower-cases the text, splits it on whitespace, maps number words to digits
    (``"none"``/``"zero"`` -> ``"0"``, ``"one"`` -> ``"1"`` ... ``"ten"`` ->
    ``"10"``), drops the articles ``a``, ``an``, ``the``, replaces whole words
    found in the official contraction table (``"dont"`` -> ``"don't"``), and
    joins the words with single spaces.

    Args:
        text: The answer after :func:`process_punctuation`.

    Returns:
        The normalised text.
    """
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Normalise an answer exactly as the official VQA evaluation does.

    Whitespace cleaning (newlines/tabs to spaces, strip), then
    :func:`process_punctuation`, then :func:`process_digit_article`. This is
    the one implementation for the whole code base (answer vocabularies use
    it too). Note that :func:`vqa_accuracy` applies it only when a question's
    human answers are not all identical (the official rule).

    Args:
        text: A predicted or human answer.

    Returns:
        The normalised answer, e.g. ``"Two dogs."`` -> ``"2 dogs"``.

    Raises:
        TypeError: If ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}: {text!r}")
    return _normalized(_clean_whitespace(text))


@functools.lru_cache(maxsize=1 << 16)
def _normalized(text: str) -> str:
    """:func:`process_punctuation` then :func:`process_digit_article`, cached.

    Takes whitespace-cleaned text. Answers repeat a lot across a dataset, so
    the cache saves most of the work of a full evaluation.
    """
    return process_digit_article(process_punctuation(text))


def _question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy of one (type-checked) prediction against its human answers.

    Each answer counts as one human answer (the official tool's answers carry
    distinct ``answer_id``s, so its leave-one-out removes exactly one entry).
    """
    pred = _clean_whitespace(prediction)
    gts = [_clean_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [_normalized(a) for a in gts]
        pred = _normalized(pred)
    n_match = sum(1 for a in gts if a == pred)
    # Left-to-right float sum, as Python's sum() of floats up to 3.11 (and the
    # official Python 2 tool) does it; 3.12's compensated sum() can differ in
    # the last bit.
    total: float = 0
    for a in gts:
        others = n_match - (a == pred)
        total += min(1, others / 3)
    return float(total) / len(gts)


def _check_answers(answers: Any, what: str = "answers") -> list[str]:
    if isinstance(answers, str) or not isinstance(answers, (list, tuple)):
        raise TypeError(
            f"{what} must be a list or tuple of strings (the human answers), "
            f"got {type(answers).__name__}"
        )
    if len(answers) == 0:
        raise ValueError(f"{what} is empty: need the human answers (10 in VQA)")
    for a in answers:
        if not isinstance(a, str):
            raise TypeError(f"{what} must contain only strings, found {type(a).__name__}: {a!r}")
    return list(answers)


def _warn_answer_count(num_questions: int, counts: set[int]) -> None:
    warnings.warn(
        f"{num_questions} question(s) have a number of human answers other than "
        f"{NUM_HUMAN_ANSWERS} (seen: {sorted(counts)}); scoring them as the official "
        "tool does, leaving out each of the given answers in turn",
        UserWarning,
        stacklevel=3,
    )


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy of one prediction against its human answers.

    See the module docstring for the rules. With 10 human answers of which
    ``m`` match the (normalised) prediction the result is 0.0 (m=0),
    0.3 (m=1), 0.6 (m=2), 0.9 (m=3) or 1.0 (m>=4), to the last bit as the
    official tool computes it: the ten subset scores are summed left to
    right, so which answers match matters in the last bit (m=2 gives 0.6,
    0.6000000000000001 or 0.5999999999999999; m=3 gives 0.9 or
    0.8999999999999998).

    Args:
        prediction: The predicted answer.
        answers: The human answers (10 in VQA v2 / OK-VQA). Other lengths are
            scored the way the official tool would (leave-one-out over the
            given answers; a single answer always scores 0) with a warning.

    Returns:
        The accuracy in [0, 1] (not multiplied by 100).

    Raises:
        TypeError: If ``prediction`` is not a string, or ``answers`` is not a
            list/tuple of strings.
        ValueError: If ``answers`` is empty.
    """
    if not isinstance(prediction, str):
        raise TypeError(
            f"prediction must be a str, got {type(prediction).__name__}: {prediction!r}"
        )
    answers = _check_answers(answers)
    if len(answers) != NUM_HUMAN_ANSWERS:
        _warn_answer_count(1, {len(answers)})
    return _question_accuracy(prediction, answers)


# ---------------------------------------------------------------------------
# Dataset-level VQA evaluation (official aggregation)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VQAEvalResult:
    """VQA accuracies as the official tool reports them (percentages, 2 decimals).

    Attributes:
        overall: Mean accuracy ×100 over the evaluated questions
            (``VQAEval.accuracy["overall"]``).
        per_answer_type: Answer type -> accuracy ×100 (``"perAnswerType"``).
        per_question_type: Question type -> accuracy ×100 (``"perQuestionType"``).
        per_question: Question id -> accuracy ×100 (``VQAEval.evalQA``), in
            evaluation order.
        num_questions: Questions scored (including missing ones scored 0 with
            ``missing="wrong"``).
        num_missing: Questions in scope without a prediction (skipped with
            ``missing="skip"``, scored 0 with ``missing="wrong"``).
    """

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[Any, float]
    num_questions: int
    num_missing: int = 0

    def to_json(self) -> dict[str, Any]:
        """The official accuracy JSON object.

        Returns:
            ``{"overall": ..., "perQuestionType": {...}, "perAnswerType": {...}}``,
            ready for ``json.dump`` (what the official demo writes to its
            ``*_accuracy.json`` file).
        """
        return {
            "overall": self.overall,
            "perQuestionType": dict(self.per_question_type),
            "perAnswerType": dict(self.per_answer_type),
        }


@dataclass
class _Annotation:
    question_id: Any
    answers: list[str]
    question_type: str | None
    answer_type: str | None
    # False when the answer entries are dicts of which some are identical
    # (see _entries_distinct).
    distinct_entries: bool = True


def _field(entry: Any, name: str, index: int, default: Any = ...) -> Any:
    if isinstance(entry, Mapping):
        if name in entry:
            return entry[name]
    elif hasattr(entry, name):
        return getattr(entry, name)
    if default is not ...:
        return default
    raise ValueError(
        f"annotation #{index} has no {name!r}; expected the official format "
        "{'question_id', 'question_type', 'answer_type', 'answers': [{'answer': ...}]} "
        "or a record with .question_id/.answers/.question_type/.answer_type"
    )


def _entries_distinct(entries: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> bool:
    """Whether the official leave-one-out would remove exactly one entry each time.

    The official tool leaves an answer out with ``item != gtAnsDatum``, i.e. by
    dict equality after normalising the ``"answer"`` fields in place. Official
    annotations carry distinct ``answer_id``s, so this removes one entry; answer
    dicts without distinguishing fields would all be removed together.
    """
    ids = [e.get("answer_id", None) for e in entries]
    try:
        if None not in ids and len(set(ids)) == len(ids):
            return True
    except TypeError:  # unhashable ids: fall through to the full comparison
        pass
    cleaned = [_clean_whitespace(a) for a in answers]
    if len(set(cleaned)) > 1:
        cleaned = [_normalized(a) for a in cleaned]
    dicts = [{**e, "answer": a} for e, a in zip(entries, cleaned)]
    return all(dicts[i] != dicts[j] for i in range(len(dicts)) for j in range(i))


def _parse_annotations(annotations: Any) -> list[_Annotation]:
    if isinstance(annotations, Mapping):
        if "annotations" not in annotations:
            raise TypeError(
                "annotations mapping must be the official annotations JSON "
                "{'annotations': [...]}; got keys " + repr(sorted(map(str, annotations))[:5])
            )
        annotations = annotations["annotations"]
    if isinstance(annotations, (str, bytes)) or not isinstance(annotations, Iterable):
        raise TypeError(
            "annotations must be the official annotations JSON, its 'annotations' list, "
            f"or a sequence of VQA records; got {type(annotations).__name__}"
        )
    parsed: list[_Annotation] = []
    seen: set[Any] = set()
    for i, entry in enumerate(annotations):
        qid = _field(entry, "question_id", i)
        if qid in seen:
            raise ValueError(f"annotations contain question_id {qid!r} more than once")
        seen.add(qid)
        raw = _field(entry, "answers", i)
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise TypeError(
                f"annotation for question_id {qid!r}: 'answers' must be a list of "
                f"{{'answer': str}} dicts or of strings, got {type(raw).__name__}"
            )
        if len(raw) == 0:
            raise ValueError(f"annotation for question_id {qid!r} has no answers")
        answers: list[str] = []
        dict_entries: list[Mapping[str, Any]] = []
        for a in raw:
            if isinstance(a, Mapping):
                if "answer" not in a:
                    raise ValueError(
                        f"annotation for question_id {qid!r}: answer entry {dict(a)!r} "
                        "has no 'answer'"
                    )
                dict_entries.append(a)
                a = a["answer"]
            if not isinstance(a, str):
                raise TypeError(
                    f"annotation for question_id {qid!r}: human answers must be "
                    f"strings, found {type(a).__name__}: {a!r}"
                )
            answers.append(a)
        distinct = len(dict_entries) < len(answers) or _entries_distinct(dict_entries, answers)
        parsed.append(
            _Annotation(
                question_id=qid,
                answers=answers,
                question_type=_field(entry, "question_type", i, None),
                answer_type=_field(entry, "answer_type", i, None),
                distinct_entries=distinct,
            )
        )
    if not parsed:
        raise ValueError("annotations are empty: nothing to evaluate")
    return parsed


def _parse_predictions(predictions: Any) -> dict[Any, Any]:
    if isinstance(predictions, Mapping):
        return dict(predictions)
    if isinstance(predictions, (str, bytes)) or not isinstance(predictions, Iterable):
        raise TypeError(
            "predictions must be the official results list [{'question_id': int, "
            "'answer': str}, ...] or a dict question_id -> answer; got "
            + type(predictions).__name__
        )
    out: dict[Any, Any] = {}
    duplicates = 0
    for i, p in enumerate(predictions):
        if not isinstance(p, Mapping) or "question_id" not in p or "answer" not in p:
            raise ValueError(
                f"prediction #{i} must be a dict with 'question_id' and 'answer' "
                f"(the official results format), got {p!r}"
            )
        if p["question_id"] in out:
            duplicates += 1
        out[p["question_id"]] = p["answer"]
    if duplicates:
        warnings.warn(
            f"{duplicates} prediction(s) repeat a question_id; the last one is used "
            "(as the official tool's index does)",
            UserWarning,
            stacklevel=3,
        )
    return out


def _parse_questions(questions: Any, annotated: Mapping[Any, _Annotation]) -> tuple[list, dict]:
    """Question ids in scope (in order) and their multiple choices, if any."""
    choices: dict[Any, Any] = {}
    multiple_choice = False
    if isinstance(questions, Mapping):
        if "questions" not in questions:
            raise TypeError(
                "questions mapping must be the official questions JSON {'questions': [...]}"
            )
        multiple_choice = questions.get("task_type") == "Multiple Choice"
        questions = questions["questions"]
    if isinstance(questions, (str, bytes)) or not isinstance(questions, Iterable):
        raise TypeError(
            "questions must be the official questions JSON, a list of question dicts "
            f"or a list of question ids; got {type(questions).__name__}"
        )
    ids = []
    for q in questions:
        qid = q["question_id"] if isinstance(q, Mapping) else getattr(q, "question_id", q)
        if multiple_choice and isinstance(q, Mapping) and "multiple_choices" in q:
            choices[qid] = q["multiple_choices"]
        ids.append(qid)
    unknown = [q for q in ids if q not in annotated]
    if unknown:
        raise ValueError(
            f"{len(unknown)} question id(s) in `questions` have no annotation, e.g. {unknown[:5]}"
        )
    if len(set(ids)) != len(ids):
        raise ValueError("`questions` lists some question ids more than once")
    return ids, choices


def evaluate_vqa(
    predictions: Sequence[Mapping[str, Any]] | Mapping[Any, str],
    annotations: Any,
    questions: Any = None,
    *,
    missing: Literal["error", "skip", "wrong"] = "error",
) -> VQAEvalResult:
    """Evaluate predictions like the official VQA tool (``VQAEval.evaluate``).

    Questions are scored with :func:`vqa_accuracy`'s rules and aggregated in
    annotation order, overall, per answer type and per question type, each as
    ``round(100 * sum / count, 2)`` (left-to-right sum, as the official
    ``setAccuracy``), with the official script's Python 2.7 ``round``: exact
    binary ties such as 40.625 go away from zero (:func:`round_half_away`).

    Args:
        predictions: The official results format
            ``[{"question_id": int, "answer": str}, ...]`` (a repeated id: the
            last one wins, with a warning) or a dict ``question_id -> answer``.
            Ids are compared as given (``"1"`` is not ``1``).
        annotations: The official annotations JSON (``{"annotations": [...]}``),
            its list, or records with ``.question_id``, ``.answers`` (strings or
            ``{"answer": ...}`` dicts), ``.question_type`` and ``.answer_type``.
            A question whose type is ``None``/absent is left out of that
            per-type table.
        questions: Optional scope, like ``VQAEval.evaluate(quesIds)``: the
            official questions JSON (``{"questions": [...]}``), a list of
            question dicts, or a list of question ids. Only these questions are
            evaluated, in this order. If the questions JSON says
            ``"task_type": "Multiple Choice"``, every answer must be one of the
            question's ``multiple_choices`` (as the official loader asserts).
        missing: What to do with in-scope questions that have no prediction.
            ``"error"`` (default; the official tool refuses such results):
            raise; ``"skip"``: evaluate only the predicted ones; ``"wrong"``:
            score them 0.

    Returns:
        A :class:`VQAEvalResult`; ``to_json()`` gives the official accuracy JSON.

    Raises:
        ValueError: Predictions for unannotated question ids (lists a few),
            missing predictions with ``missing="error"``, duplicate annotated
            ids, malformed entries, nothing to evaluate, or a bad ``missing``.
        TypeError: Non-string answers (names the question id) or inputs of
            the wrong kind.
    """
    if missing not in ("error", "skip", "wrong"):
        raise ValueError(f"missing must be 'error', 'skip' or 'wrong', got {missing!r}")
    anns = _parse_annotations(annotations)
    by_id = {a.question_id: a for a in anns}
    preds = _parse_predictions(predictions)

    unknown = [q for q in preds if q not in by_id]
    if unknown:
        hint = ""
        if any(isinstance(q, str) for q in unknown) and not any(isinstance(q, str) for q in by_id):
            hint = " (question ids are compared as given: the string '1' is not the int 1)"
        raise ValueError(
            f"{len(unknown)} prediction(s) have question ids that are not in the annotations, "
            f"e.g. {unknown[:5]!r}{hint}"
        )

    choices: dict[Any, Any] = {}
    if questions is None:
        scope = [a.question_id for a in anns]
    else:
        scope, choices = _parse_questions(questions, by_id)

    for qid, answer in preds.items():
        if not isinstance(answer, str):
            raise TypeError(
                f"prediction for question_id {qid!r} must be a str, "
                f"got {type(answer).__name__}: {answer!r}"
            )
        if qid in choices and answer not in choices[qid]:
            raise ValueError(
                f"prediction for question_id {qid!r} ({answer!r}) is not one of its "
                "multiple choices (task_type 'Multiple Choice')"
            )

    absent = [q for q in scope if q not in preds]
    if absent and missing == "error":
        raise ValueError(
            f"{len(absent)} of {len(scope)} annotated questions have no prediction "
            f"(e.g. question ids {absent[:5]!r}); the official tool requires one for "
            "every question. Pass missing='skip' to evaluate only the predicted "
            "questions or missing='wrong' to score the missing ones 0"
        )
    if missing == "skip":
        scope = [q for q in scope if q in preds]
    if not scope:
        raise ValueError("no questions to evaluate (no annotated question has a prediction)")

    per_question: dict[Any, float] = {}
    all_acc: list[float] = []
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    odd_counts: set[int] = set()
    num_odd = 0
    num_shared_entries = 0
    for qid in scope:
        ann = by_id[qid]
        if len(ann.answers) != NUM_HUMAN_ANSWERS:
            num_odd += 1
            odd_counts.add(len(ann.answers))
        if not ann.distinct_entries:
            num_shared_entries += 1
        acc = _question_accuracy(preds[qid], ann.answers) if qid in preds else 0.0
        per_question[qid] = round_half_away(100 * acc, 2)
        all_acc.append(acc)
        if ann.question_type is not None:
            by_qtype.setdefault(ann.question_type, []).append(acc)
        if ann.answer_type is not None:
            by_atype.setdefault(ann.answer_type, []).append(acc)

    if num_odd:
        _warn_answer_count(num_odd, odd_counts)
    if num_shared_entries:
        warnings.warn(
            f"{num_shared_entries} question(s) have identical answer entries (no distinct "
            "'answer_id'); rvqa counts each entry as one human answer, whereas the "
            "official script's leave-one-out (dict inequality) would drop all identical "
            "entries at once and score these questions differently",
            UserWarning,
            stacklevel=2,
        )

    return VQAEvalResult(
        overall=_percent(all_acc),
        per_answer_type={k: _percent(v) for k, v in by_atype.items()},
        per_question_type={k: _percent(v) for k, v in by_qtype.items()},
        per_question=per_question,
        num_questions=len(scope),
        num_missing=len(absent),
    )


def round_half_away(x: float, ndigits: int = 2) -> float:
    """Python 2.7's ``round(x, ndigits)``, which the official VQA evaluation runs on.

    The float's exact binary value is rounded to ``ndigits`` decimals with ties
    away from zero: ``40.625`` (exactly representable) → ``40.63``, ``-0.125`` →
    ``-0.13``. Python 3's ``round`` sends such ties to the even digit
    (``40.62``). Values that only look like ties in decimal (``2.675`` is stored
    as 2.67499999...) round by their exact value, the same in both.
    """
    q = Decimal(x).quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP)
    return float(q)


def _percent(values: Sequence[float]) -> float:
    """``round(100 * sum / count, 2)`` with a left-to-right sum (official ``setAccuracy``)."""
    total: float = 0
    for v in values:
        total += v
    return round_half_away(100 * float(total) / len(values), 2)


def evaluate_module_path() -> str:
    """Path of the Hugging Face ``evaluate`` metric module for VQA accuracy.

    ``evaluate.load(evaluate_module_path())`` works offline and returns the
    same numbers as :func:`evaluate_vqa` (it delegates to it). The folder
    (``os.path.dirname`` of this path) can be loaded as well.

    Returns:
        Absolute path of ``rvqa/metrics_module/vqa_accuracy.py``.
    """
    return os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "metrics_module", "vqa_accuracy.py"
    )


# ---------------------------------------------------------------------------
# Cross-modal retrieval: Recall@K
# ---------------------------------------------------------------------------

# Upper bound on one block of similarity scores (the block of ``chunk_size``
# queries shrinks when it would exceed this).
_MAX_BLOCK_BYTES = 128 * 2**20


def _ranks_of_targets(
    scores: np.ndarray, target_score: np.ndarray, target_col: np.ndarray
) -> np.ndarray:
    """0-based rank of each row's target in a stable descending sort of that row.

    rank = #(scores > target) + #(scores == target at a lower column index).
    """
    target_score = target_score[:, None]
    ranks = np.count_nonzero(scores > target_score, axis=1)
    equal = scores == target_score
    # The target ties with itself; only rows with other equal scores need the
    # index comparison (rare, so a loop keeps the temporaries small).
    for row in np.flatnonzero(np.count_nonzero(equal, axis=1) > 1):
        ranks[row] += np.count_nonzero(equal[row, : target_col[row]])
    return ranks


def _block_rows(chunk_size: int, n_candidates: int, itemsize: int) -> int:
    """Queries per block: ``chunk_size``, fewer if the scores would pass the cap."""
    return max(1, min(chunk_size, _MAX_BLOCK_BYTES // (n_candidates * itemsize)))


def _check_embeddings(image_embeddings: Any, text_embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two 2-D numeric finite arrays of one dim, as contiguous arrays of one float dtype."""
    img = np.asarray(image_embeddings)
    txt = np.asarray(text_embeddings)
    if img.ndim != 2 or txt.ndim != 2:
        raise ValueError(
            "image_embeddings and text_embeddings must be 2-D (count, dim); got shapes "
            f"{img.shape} and {txt.shape}"
        )
    if img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"embedding dims differ: image_embeddings {img.shape} vs text_embeddings {txt.shape}"
        )
    if img.shape[0] == 0 or txt.shape[0] == 0:
        raise ValueError(
            f"need at least one image and one caption; got shapes {img.shape} and {txt.shape}"
        )
    for name, a in (("image_embeddings", img), ("text_embeddings", txt)):
        if a.dtype.kind not in "fiu":
            raise ValueError(f"{name} must be numeric, got dtype {a.dtype} (shape {a.shape})")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{name} (shape {a.shape}) contains NaN or infinite values")
    # Similarities in the inputs' precision (float32 stays float32), at least float32.
    dtype = np.promote_types(np.result_type(img, txt), np.float32)
    return np.ascontiguousarray(img, dtype=dtype), np.ascontiguousarray(txt, dtype=dtype)


def _check_ks_and_chunk(ks: Sequence[int], chunk_size: int) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(
        isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks
    ):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat, got {ks!r}")
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return tuple(int(k) for k in ks)


def _check_text_to_image(t2i: Any, img_shape: tuple, txt_shape: tuple) -> np.ndarray:
    n_img, n_txt = img_shape[0], txt_shape[0]
    t2i = np.asarray(t2i)
    if t2i.shape != (n_txt,):
        raise ValueError(
            f"text_to_image must have shape ({n_txt},), one image index per caption "
            f"of text_embeddings {txt_shape}; got shape {t2i.shape}"
        )
    if t2i.dtype.kind not in "iu":
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {t2i.dtype}")
    _check_index_range(t2i, n_img, "text_to_image", f"image_embeddings {img_shape}")
    t2i = t2i.astype(np.int64, copy=False)
    _check_every_index_used(
        t2i,
        n_img,
        "{count} of {n} images have no caption in text_to_image (e.g. image indices "
        "{examples}); image->text recall needs at least one caption per image",
    )
    return t2i


def _check_index_range(idx: np.ndarray, n: int, name: str, target: str) -> None:
    """Every entry of ``idx`` in ``[0, n)``, else a ValueError naming ``name`` and ``target``."""
    if idx.min() < 0 or idx.max() >= n:
        bad = idx[(idx < 0) | (idx >= n)]
        raise ValueError(
            f"{name} has {bad.size} indices outside [0, {n}) for {target}: "
            f"e.g. {np.unique(bad)[:5].tolist()}"
        )


def _check_every_index_used(idx: np.ndarray, n: int, message: str) -> None:
    """Every value in ``[0, n)`` occurs in ``idx``, else ``message`` (with ``{count}``,
    ``{n}`` and ``{examples}`` filled in) as a ValueError."""
    unused = np.flatnonzero(np.bincount(idx, minlength=n) == 0)
    if unused.size:
        raise ValueError(message.format(count=unused.size, n=n, examples=unused[:5].tolist()))


def _check_retrieval_inputs(
    image_embeddings: Any,
    text_embeddings: Any,
    text_to_image: Any,
    ks: Sequence[int],
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    img, txt = _check_embeddings(image_embeddings, text_embeddings)
    t2i = _check_text_to_image(text_to_image, img.shape, txt.shape)
    return img, txt, t2i, _check_ks_and_chunk(ks, chunk_size)


class _Positives:
    """Each query's positive gallery columns, CSR style: row ``q``'s columns are
    ``indices[indptr[q]:indptr[q + 1]]``, ascending, at least one per row."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray):
        self.indptr = indptr
        self.indices = indices

    @classmethod
    def single(cls, targets: np.ndarray) -> _Positives:
        """One positive per query: ``targets[q]``."""
        return cls(np.arange(targets.size + 1, dtype=np.int64), targets.astype(np.int64))

    @classmethod
    def grouped(cls, owner: np.ndarray, n_rows: int) -> _Positives:
        """Row ``r``'s positives: every column ``c`` with ``owner[c] == r``."""
        order = np.argsort(owner, kind="stable")  # columns ascending inside a row
        return cls(np.searchsorted(owner[order], np.arange(n_rows + 1)), order.astype(np.int64))


def _best_positive_ranks(
    queries: np.ndarray, gallery: np.ndarray, positives: _Positives, chunk: int
) -> np.ndarray:
    """0-based rank, in a stable descending sort of the gallery by score, of each
    query's best-ranked positive (highest score; ties -> lowest gallery index).

    The one ranking core: single-positive text->image recall, image->text
    recall over an image's captions, and many-to-many recall all use it.
    """
    indptr, indices = positives.indptr, positives.indices
    n_q = queries.shape[0]
    gallery_t = gallery.T
    ranks = np.empty(n_q, dtype=np.int64)
    chunk = _block_rows(chunk, gallery.shape[0], gallery.itemsize)
    for lo in range(0, n_q, chunk):
        hi = min(lo + chunk, n_q)
        scores = queries[lo:hi] @ gallery_t  # (B, n_gallery)
        cols = indices[indptr[lo] : indptr[hi]]  # positives of these queries
        starts = indptr[lo:hi] - indptr[lo]
        sizes = np.diff(indptr[lo : hi + 1])
        own = scores[np.repeat(np.arange(hi - lo), sizes), cols]
        # Best positive per query: highest score, ties -> lowest column index
        # (= the positive that comes first in the stable ranking).
        best = np.maximum.reduceat(own, starts)
        pos = np.where(own == np.repeat(best, sizes), np.arange(own.size), own.size)
        best_col = cols[np.minimum.reduceat(pos, starts)]
        ranks[lo:hi] = _ranks_of_targets(scores, best, best_col)
        del scores  # free this block before the next one is allocated
    return ranks


def _recall_both_ways(
    img: np.ndarray,
    txt: np.ndarray,
    texts_of_image: _Positives,
    images_of_text: _Positives,
    ks: tuple[int, ...],
    chunk: int,
) -> dict[str, float]:
    i2t = _best_positive_ranks(img, txt, texts_of_image, chunk)
    t2i = _best_positive_ranks(txt, img, images_of_text, chunk)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            # VSE++: 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
            out[f"{name}_r{k}"] = 100.0 * int(np.count_nonzero(ranks < k)) / len(ranks)
    rsum = 0.0
    for v in list(out.values()):
        rsum += v
    out["rsum"] = rsum
    return out


def _recall_from_ranks(
    img: np.ndarray, txt: np.ndarray, t2i: np.ndarray, ks: tuple[int, ...], chunk: int
) -> dict[str, float]:
    """Single-positive protocol: caption ``j`` belongs to image ``t2i[j]`` only."""
    return _recall_both_ways(
        img, txt, _Positives.grouped(t2i, img.shape[0]), _Positives.single(t2i), ks, chunk
    )


def recall_at_k(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Exact image<->text Recall@K (standard VSE++ protocol), in percent.

    Similarities are dot products (pass L2-normalised embeddings for cosine),
    computed by matrix products over blocks of ``chunk_size`` queries (fewer
    if a block would pass 128 MiB), so memory stays at about one block of
    ``chunk_size × max(n_images, n_captions)`` scores plus a boolean mask of
    the same shape (COCO 5K, float32: ~100 MB + 25 MB) instead of the full
    matrix.
    They are computed in the inputs' precision (float32 stays float32; float16
    and integers are promoted).

    - image -> text: a hit at K if ANY of the image's captions ranks in the top K.
    - text -> image: a hit at K if the caption's own image ranks in the top K.

    Ties are broken deterministically, as a stable descending sort would: the
    rank of a candidate is the number of candidates with a strictly higher
    score plus the number with an equal score and a lower index. So a tie
    between a correct and a wrong candidate counts as a hit only when the
    correct one has the lower index.

    COCO 5K is this function on all 5,000 test images; COCO 1K is
    :func:`recall_at_k_folds`.

    Args:
        image_embeddings: ``(n_images, dim)`` array.
        text_embeddings: ``(n_captions, dim)`` array.
        text_to_image: ``(n_captions,)`` integer array: the image index of each
            caption. Every image needs at least one caption.
        ks: The K values.
        chunk_size: Maximum number of queries per block of the similarity
            computation.

    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}``
        (keys follow ``ks``) as percentages; ``rsum`` is the sum of the others.

    Raises:
        ValueError: On bad shapes, mismatched dims, non-finite values, image
            indices out of range, images without captions, or bad ``ks`` /
            ``chunk_size`` (messages name the shapes).
    """
    img, txt, t2i, ks = _check_retrieval_inputs(
        image_embeddings, text_embeddings, text_to_image, ks, chunk_size
    )
    return _recall_from_ranks(img, txt, t2i, ks, int(chunk_size))


def recall_at_k_multi(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    texts_of_image: Sequence[Iterable[int]],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Exact image<->text Recall@K when a text may belong to several images, in percent.

    The many-to-many form of :func:`recall_at_k` (which is the case where
    every caption belongs to exactly one image), with the same ranking core,
    tie rule, memory bound and keys. Used for galleries of distinct caption
    strings that many images share (easy-vqa's derived captions).

    - image -> text: a hit at K if ANY text of ``texts_of_image[i]`` ranks in the top K.
    - text -> image: a hit at K if ANY image that has the text ranks in the top K.

    Args:
        image_embeddings: ``(n_images, dim)`` array.
        text_embeddings: ``(n_texts, dim)`` array.
        texts_of_image: For each image, the indices of its texts (at least one);
            every text must belong to at least one image.
        ks: The K values.
        chunk_size: Maximum number of queries per block of the similarity computation.

    Returns:
        ``{"i2t_r1", ..., "t2i_r10", "rsum"}`` as in :func:`recall_at_k`.

    Raises:
        ValueError: As :func:`recall_at_k`; or ``texts_of_image`` does not have one
            entry per image, an index is out of range, an image has no text or a
            text no image.
    """
    img, txt = _check_embeddings(image_embeddings, text_embeddings)
    ks = _check_ks_and_chunk(ks, chunk_size)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if len(texts_of_image) != n_img:
        raise ValueError(
            f"texts_of_image has {len(texts_of_image)} entries for image_embeddings "
            f"{img.shape}; one (non-empty) set of text indices per image expected"
        )
    rows = [np.unique(np.asarray(list(t), dtype=np.int64)) for t in texts_of_image]
    sizes = [r.size for r in rows]
    owner = np.repeat(np.arange(n_img, dtype=np.int64), sizes)  # the image of each link
    _check_every_index_used(
        owner,
        n_img,
        "{count} of {n} images have no text in texts_of_image (e.g. image indices {examples})",
    )
    flat = np.concatenate(rows)  # the text of each link
    _check_index_range(flat, n_txt, "texts_of_image", f"text_embeddings {txt.shape}")
    _check_every_index_used(
        flat,
        n_txt,
        "{count} of {n} texts belong to no image in texts_of_image (e.g. text indices {examples})",
    )
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    texts_pos = _Positives(indptr, flat)
    # The transpose: images of each text (images ascending inside a text).
    images_pos = _Positives.grouped(flat, n_txt)
    images_pos.indices = owner[images_pos.indices]
    return _recall_both_ways(img, txt, texts_pos, images_pos, ks, int(chunk_size))


def recall_at_k_folds(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    n_folds: int = 5,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K averaged over folds of the images (COCO 1K protocol).

    The images are split in order into ``n_folds`` equal folds (COCO 5K test:
    5 folds of 1,000); each fold is evaluated with :func:`recall_at_k` on its
    images and their captions only, and every metric (``rsum`` included) is
    the mean over the folds, as in VSE++.

    Args:
        image_embeddings: ``(n_images, dim)``; ``n_images`` divisible by ``n_folds``.
        text_embeddings: ``(n_captions, dim)``.
        text_to_image: ``(n_captions,)`` image index of each caption.
        ks: The K values.
        n_folds: Number of folds.
        chunk_size: Queries per block of the similarity computation.

    Returns:
        The same keys as :func:`recall_at_k`, averaged over the folds.

    Raises:
        ValueError: As :func:`recall_at_k`, or if ``n_folds`` is not a positive
            integer dividing the number of images.
    """
    img, txt, t2i, ks = _check_retrieval_inputs(
        image_embeddings, text_embeddings, text_to_image, ks, chunk_size
    )
    n_img = img.shape[0]
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 1:
        raise ValueError(f"n_folds must be a positive integer, got {n_folds!r}")
    if n_img % n_folds:
        raise ValueError(
            f"cannot split {n_img} images (image_embeddings {img.shape}) into {n_folds} "
            "equal folds; COCO 1K uses the 5,000 test images in 5 folds of 1,000"
        )
    size = n_img // n_folds
    results = []
    for f in range(n_folds):
        lo, hi = f * size, (f + 1) * size
        caps = np.flatnonzero((t2i >= lo) & (t2i < hi))
        results.append(
            _recall_from_ranks(img[lo:hi], txt[caps], t2i[caps] - lo, ks, int(chunk_size))
        )
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}


def r_precision(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    matches: np.ndarray,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """R-Precision both ways over every valid match, in percent (PMRP's measure).

    With the exhaustive ground truth ``matches`` ((n_captions, n_images) bool: caption
    c is a valid description of image i), a query with R valid matches scores the
    share of valid items among its top R. This is the Plausible Match R-Precision of
    PCME (Chun et al. 2021) where plausibility is known exactly rather than
    approximated from class labels. Ranking as in :func:`recall_at_k` (dot products;
    ties: the lower index first).

    Returns:
        ``{"i2t_rp", "t2i_rp"}``: image queries over captions, caption queries over
        images, each averaged over the queries.

    Raises:
        ValueError: Bad shapes, a ``matches`` matrix of another shape, or a query with
            no valid match (it would have no R).
    """
    img, txt = _check_embeddings(image_embeddings, text_embeddings)
    m = np.asarray(matches)
    if m.dtype != bool or m.shape != (txt.shape[0], img.shape[0]):
        raise ValueError(
            f"matches must be a bool array of shape (n_captions, n_images) = "
            f"{(txt.shape[0], img.shape[0])}, got {m.dtype} {m.shape}"
        )
    for name, counts in (("caption", m.sum(1)), ("image", m.sum(0))):
        if (counts == 0).any():
            raise ValueError(
                f"{name} {int(np.flatnonzero(counts == 0)[0])} has no valid match: R-Precision "
                "needs at least one per query"
            )
    _check_ks_and_chunk((1,), chunk_size)
    chunk = int(chunk_size)
    out = {}
    for key, queries, gallery, rel in (("i2t_rp", img, txt, m.T), ("t2i_rp", txt, img, m)):
        total = 0.0
        rows = _block_rows(chunk, gallery.shape[0], queries.dtype.itemsize)
        for s in range(0, queries.shape[0], rows):
            scores = queries[s : s + rows] @ gallery.T
            order = np.argsort(-scores, axis=1, kind="stable")
            relevant = rel[s : s + rows]
            r = relevant.sum(1)
            hits = np.take_along_axis(relevant, order, axis=1)
            upto = np.arange(gallery.shape[0])[None, :] < r[:, None]
            total += float(((hits & upto).sum(1) / r).sum())
        out[key] = 100.0 * total / queries.shape[0]
    return out
