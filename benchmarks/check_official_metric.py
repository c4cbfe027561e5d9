"""Compare rvqa.metrics with the official VQA evaluation script on random questions.

The official evaluator is ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of
https://github.com/GT-Vision-Lab/VQA (Python 2.7 code). It is not shipped with rvqa:
clone that repository and point ``--official`` at the file. This script runs it
under Python 3 with the two changes Python 3 needs and nothing else:

* its two ``print "..."`` statements become calls;
* ``round`` is Python 2.7's (``round(x, n)`` of the float's exact value, halves away
  from zero), written here independently of rvqa with ``fractions.Fraction``,
  because the official numbers are what Python 2.7 printed.

It then scores the same generated questions with ``rvqa.metrics.evaluate_vqa`` and
reports every difference: per-question accuracy (``evalQA``) and the aggregates
(``accuracy``: overall, perQuestionType, perAnswerType).

Usage:
    git clone https://github.com/GT-Vision-Lab/VQA /tmp/VQA
    python benchmarks/check_official_metric.py \
        --official /tmp/VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py --n 60000

Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import random
import re
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

from rvqa.metrics import evaluate_vqa

# Answers chosen to hit every rule: punctuation next to spaces or not, digit commas,
# periods, number words, articles, contractions, whitespace, case, unicode.
BASE = [
    "yes", "no", "2", "two", "ten", "none", "zero", "1,000", "1000", "3.5", "3. 5",
    "dog", "a dog", "the dog", "dogs", "dog.", "dog!", "dog ?", "hot-dog", "hot dog",
    "dont", "don't", "isnt", "isn't", "its", "it's", "ow's'at", "yall'll", "Im",
    "red", "Red", "RED", "red/white", "red / white", "red, white", "(red)", "red;",
    "café", "naïve", "left", "on the left", "an apple", "apple", "$5", "5 dollars",
    "12:30", "12.30", "no one", "nobody", "somebodyd", "x-ray", "x_ray", "@home",
]  # fmt: skip
TYPES_Q = ["what is", "how many", "is the", "what color is the", "none of the above"]
TYPES_A = ["yes/no", "number", "other"]


def _perturb(rng: random.Random, text: str) -> str:
    r = rng.random()
    if r < 0.15:
        return " " + text + " "
    if r < 0.25:
        return text.replace(" ", "\t", 1) if " " in text else "\n" + text
    if r < 0.35:
        return text.upper()
    if r < 0.45:
        return text + rng.choice([".", "!", "?", ",", " .", " !"])
    if r < 0.5:
        return rng.choice(["a ", "the ", "an "]) + text
    return text


def make_questions(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``n`` annotations (10 answers each) and predictions, in the official formats."""
    rng = random.Random(seed)
    anns, preds = [], []
    for qid in range(n):
        mode = rng.random()
        if mode < 0.15:  # all ten answers identical: the exact-match rule
            answers = [_perturb(rng, rng.choice(BASE))] * 10
        else:
            pool = rng.sample(BASE, rng.randint(1, 4))
            answers = [_perturb(rng, rng.choice(pool)) for _ in range(10)]
        pred = (
            _perturb(rng, rng.choice(answers).strip())
            if rng.random() < 0.7
            else _perturb(rng, rng.choice(BASE))
        )
        anns.append(
            {
                "question_id": qid,
                "image_id": qid // 3,
                "question_type": rng.choice(TYPES_Q),
                "answer_type": rng.choice(TYPES_A),
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
            }
        )
        preds.append({"question_id": qid, "answer": pred})
    return anns, preds


def py27_round(x: float, n: int = 0) -> float:
    """Python 2.7's ``round``: the float's exact value, halves away from zero."""
    exact = Fraction(x) * 10**n
    magnitude = math.floor(abs(exact) + Fraction(1, 2))
    return float(Fraction(int(math.copysign(1, x)) * magnitude, 10**n))


def load_official(path: Path) -> type:
    """The official ``VQAEval`` class, run under Python 3 (see the module docstring)."""
    source = path.read_text(encoding="utf-8")
    source, count = re.subn(r'^(\s*)print (".*")\s*$', r"\1print(\2)", source, flags=re.M)
    if count != 2:
        raise SystemExit(f"{path}: expected 2 print statements to convert, found {count}")
    namespace: dict = {"__name__": "vqaEval", "round": py27_round}
    exec(compile(source, str(path), "exec"), namespace)
    return namespace["VQAEval"]


class _QA:
    """The two attributes of the official ``VQA`` helper that ``VQAEval`` uses."""

    def __init__(self, qa: dict):
        self.qa = qa

    def getQuesIds(self) -> list:  # noqa: N802 - the official name
        return list(self.qa)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="path to the official vqaEval.py")
    ap.add_argument("--n", type=int, default=60000, help="random questions (default 60000)")
    ap.add_argument("--seed", type=int, default=20261203)
    args = ap.parse_args(argv)

    anns, preds = make_questions(args.n, args.seed)
    official = load_official(args.official)(
        _QA({a["question_id"]: copy.deepcopy(a) for a in anns}),
        _QA({p["question_id"]: p for p in preds}),
        n=2,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bar
        official.evaluate()
    ours = evaluate_vqa(preds, {"annotations": anns})

    per_q = [q for q in official.evalQA if official.evalQA[q] != ours.per_question[q]]
    theirs_json, ours_json = official.accuracy, ours.to_json()
    agg = [
        k for k in ("overall", "perQuestionType", "perAnswerType") if theirs_json[k] != ours_json[k]
    ]
    levels = Counter(round(v / 100, 1) for v in official.evalQA.values())
    print(f"{args.n} questions (seed {args.seed}); accuracy levels {dict(sorted(levels.items()))}")
    print(f"official overall {theirs_json['overall']}  rvqa overall {ours_json['overall']}")
    print(f"per-question mismatches: {len(per_q)}   aggregate mismatches: {agg or 'none'}")
    for q in per_q[:10]:
        print(f"  question {q}: official {official.evalQA[q]} rvqa {ours.per_question[q]}")
    return 1 if per_q or agg else 0


if __name__ == "__main__":
    sys.exit(main())
