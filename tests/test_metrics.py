"""Official VQA accuracy: normalisation rules, scores, aggregation, evaluate module.

Expected values are worked out by hand from the rules of the official
``vqaEval.py`` (GT-Vision-Lab/VQA master); the comments show the working.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest

from rvqa.metrics import (
    VQAEvalResult,
    evaluate_module_path,
    evaluate_vqa,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    round_half_away,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------
# processPunctuation
# ---------------------------------------------------------------------------

# The official list, in its order.
PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]


@pytest.mark.parametrize("p", PUNCTUATION)
def test_punctuation_without_neighbouring_space_becomes_space(p):
    assert process_punctuation(f"x{p}y") == "x y"


@pytest.mark.parametrize("p", PUNCTUATION)
def test_punctuation_next_to_a_space_is_deleted(p):
    assert process_punctuation(f"x{p} y") == "x y"  # "p " present
    assert process_punctuation(f"x {p}y") == "x y"  # " p" present


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("t-shirt", "t shirt"),
        ("red,white", "red white"),
        ("red, white", "red white"),  # ", " occurs: every ',' deleted
        ("x ,y", "x y"),  # " ," occurs: deleted (the space stays)
        ("x,y x, z", "xy x z"),  # ", " occurs: BOTH commas deleted, "xy" joins
        # The neighbour check is per character and looks at the whole input:
        # '-' has "- " somewhere, so the '-' in "a-b" is deleted too.
        ("a-b c- d", "ab c d"),
        # '!' has no neighbouring space (replaced), ',' has one (deleted).
        ("hi!there, you", "hi there you"),
        ("(x)", " x "),
        ("@home", " home"),
        ("c++", "c  "),
        ("back\\slash", "back slash"),
        ("what?", "what "),
        # Not in the list: apostrophe, colon (and case is untouched).
        ("don't", "don't"),
        ("3:00", "3:00"),
        ("Yes!", "Yes "),
    ],
)
def test_punctuation_rules(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", "1000"),
        ("10,5", "105"),
        # A digit,digit anywhere deletes EVERY punctuation character instead
        # of replacing it with a space: compare "(approx)" alone below.
        ("1,000 (approx)", "1000 approx"),
        ("(approx)", " approx "),
        ("1,000-2,000", "10002000"),
        # "1, 000" has no digit,digit; ", " deletes the comma anyway.
        ("1, 000", "1 000"),
        # "a,1" is not digit,digit: the comma becomes a space.
        ("a,1", "a 1"),
    ],
)
def test_digit_comma_digit_rule(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes.", "yes"),  # final period
        ("a.b", "ab"),  # period between letters: deleted, no space
        ("mr. smith", "mr smith"),
        ("u.s.a.", "usa"),
        ("2.5", "2.5"),  # before a digit: kept
        (".5", ".5"),
        ("5.", "5"),  # after a digit, not before one: deleted (no lookbehind)
        ("3.14.15", "3.14.15"),
        ("1.5.", "1.5"),
        ("...", ""),
    ],
)
def test_period_rule(text, expected):
    assert process_punctuation(text) == expected


def test_period_rule_stops_after_32_periods():
    # The official call passes re.UNICODE (== 32) as sub()'s count.
    assert process_punctuation("a." * 33) == "a" * 32 + "a."
    assert process_punctuation("a." * 32) == "a" * 32


# ---------------------------------------------------------------------------
# processDigitArticle
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # number words -> digits (whole words only, lower-cased first)
        ("two", "2"),
        ("Ten", "10"),
        ("zero", "0"),
        ("none", "0"),  # quirk: "none" is the number 0
        ("one two three four five six seven eight nine", "1 2 3 4 5 6 7 8 9"),
        ("eleven", "eleven"),
        ("twenty", "twenty"),
        ("twofold", "twofold"),
        # articles
        ("a dog", "dog"),
        ("An apple", "apple"),
        ("the dog", "dog"),
        ("the an a", ""),
        ("athe", "athe"),
        # case and whitespace
        ("YES", "yes"),
        ("  two \t dogs\n", "2 dogs"),
    ],
)
def test_number_words_articles_case(text, expected):
    assert process_digit_article(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # apostrophe added: n't, 've, 'd, 'll, 're, 's, 'm ...
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("couldve", "could've"),
        ("youd", "you'd"),
        ("youll", "you'll"),
        ("theyre", "they're"),
        ("whats", "what's"),
        ("maam", "ma'am"),
        ("oclock", "o'clock"),
        # double contractions, from either half-spelled form
        ("shouldnt've", "shouldn't've"),
        ("shouldn'tve", "shouldn't've"),
        ("y'allll", "y'all'll"),
        ("yall'd've", "y'all'd've"),
        # already contracted forms that are not keys stay as they are
        ("don't", "don't"),
        ("shouldn't've", "shouldn't've"),
        # quirky entries
        ("somebody'd", "somebodyd"),  # mapped the other way round
        ("somebodyd", "somebodyd"),  # not a key
        ("hed", "he'd"),
        ("twas", "'twas"),
        ("ow's'at", "'ow's'at"),
        ("let's", "let's"),  # maps to itself
        ("she's", "she's"),
        ("Im", "im"),  # capitalised keys are dead: words are lower-cased first
        ("Ive", "ive"),
        ("I'dve", "i'dve"),
        ("ill", "ill"),  # not in the table
        ("shed", "shed"),
        # whole words only, after lower-casing
        ("DONT", "don't"),
        ("dontt", "dontt"),
        ("i dont know", "i don't know"),
    ],
)
def test_contractions(text, expected):
    assert process_digit_article(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\tTwo\nDogs. ", "2 dogs"),
        ("The T-Shirt!", "t shirt"),
        ("1,000 Dollars", "1000 dollars"),
        ("None.", "0"),
        ("a.m.", "am"),
        ("It's 2.5", "it's 2.5"),
        ("DONT", "don't"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_answer_type_error():
    with pytest.raises(TypeError, match="must be a str, got int"):
        normalize_answer(3)


# ---------------------------------------------------------------------------
# vqa_accuracy
# ---------------------------------------------------------------------------


def test_accuracy_levels_by_number_of_matches():
    # m matching answers out of 10; leaving out answer i, the other 9 hold
    # m - [i matches] matches, scoring min(1, that / 3):
    #   m=0: 0                                   -> 0
    #   m=1: 9 subsets x 1/3, 1 x 0              -> 3/10 = 0.3
    #   m=2: 8 x 2/3, 2 x 1/3                    -> 6/10 = 0.6
    #   m=3: 7 x 1, 3 x 2/3                      -> 9/10 = 0.9
    #   m=4: 6 x 1, 4 x min(1, 3/3) = 1          -> 1.0
    def answers(m):
        return ["yes"] * m + ["no"] * (10 - m)

    assert vqa_accuracy("yes", answers(0)) == 0.0
    assert vqa_accuracy("yes", answers(1)) == 0.3
    assert vqa_accuracy("yes", answers(2)) == 0.6
    assert vqa_accuracy("yes", answers(3)) == 0.9
    for m in range(4, 11):
        assert vqa_accuracy("yes", answers(m)) == 1.0


@pytest.mark.parametrize(
    ("positions", "expected"),
    [
        # The official tool sums the 10 subset scores left to right, so where
        # the matches sit changes the last bit:
        # 1/3 + 1/3 + 2/3 * 8 = 6.0 exactly -> 0.6
        ((0, 1), 0.6),
        # 2/3 * 3 + 1/3 + 1/3 + 2/3 * 5 -> 6.000000000000001
        ((3, 4), 0.6000000000000001),
        # 2/3 * 8 + 1/3 + 1/3 -> 5.999999999999999
        ((8, 9), 0.5999999999999999),
        # 2/3 * 3 + 1 * 7 -> 9.0
        ((0, 1, 2), 0.9),
        ((7, 8, 9), 0.9),
        # 2/3 + 1 + 2/3 + 1 * 6 + 2/3 -> 8.999999999999998
        ((0, 2, 9), 0.8999999999999998),
        # any single match: 1/3 nine times -> 3.0
        ((0,), 0.3),
        ((9,), 0.3),
    ],
)
def test_accuracy_sums_subsets_left_to_right(positions, expected):
    answers = ["yes" if i in positions else "no" for i in range(10)]
    acc = vqa_accuracy("yes", answers)
    assert acc == expected
    assert round(100 * acc, 2) == round(100 * round(expected, 1), 2)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # All 10 human answers identical: NO normalisation of anything
        # (only the newline/tab/strip cleaning), so case and punctuation count.
        ("yes", ["yes"] * 10, 1.0),
        ("Yes", ["yes"] * 10, 0.0),
        ("yes.", ["yes"] * 10, 0.0),
        ("two", ["2"] * 10, 0.0),
        (" yes\n", ["yes"] * 10, 1.0),
        ("yes\tplease", ["yes please"] * 10, 1.0),
        # identical after cleaning the human answers too -> still no normalisation
        ("Yes", ["yes"] * 9 + [" yes\t"], 0.0),
        # A mixed set switches normalisation on for the prediction and answers
        ("Yes", ["yes"] * 9 + ["Yes"], 1.0),
        ("yes.", ["yes"] * 9 + ["no"], 1.0),
        ("two", ["2"] * 9 + ["3"], 1.0),
    ],
)
def test_all_identical_answers_rule(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == expected


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # number words: "none" -> "0" and "zero" -> "0": 5 matches
        ("none", ["0"] * 3 + ["zero"] * 2 + ["no"] * 5, 1.0),
        # digit comma: "1,000" -> "1000", 3 matches at the front
        ("1,000", ["1000"] * 3 + ["many"] * 7, 0.9),
        # hyphen -> space: 2 matches at the front
        ("t-shirt", ["t shirt"] * 2 + ["shirt"] * 8, 0.6),
        # ", " deleted: "red white"
        ("red, white", ["red white"] * 4 + ["red"] * 6, 1.0),
        # contraction
        ("dont", ["don't"] * 5 + ["no"] * 5, 1.0),
        # article + case + '!' -> "dog", 1 match
        ("The Dog!", ["dog"] + ["cat"] * 9, 0.3),
        # period before a digit kept: "2.5" matches only "2.5"
        ("2.5", ["25"] * 5 + ["2.5"] * 5, 1.0),
        ("2.5", ["25"] * 8 + ["2.5"] * 2, 0.5999999999999999),
        # colon kept: "3:00" != "300"
        ("3:00", ["300"] * 8 + ["3:00"] * 2, 0.5999999999999999),
        # periods between letters deleted: "usa"
        ("u.s.a.", ["usa"] * 3 + ["us"] * 7, 0.9),
        # dead capitalised key: "Im" -> "im", never "i'm"
        ("Im", ["i'm"] * 5 + ["x"] * 5, 0.0),
        # reversed entry: "somebody'd" -> "somebodyd"
        ("somebody'd", ["somebodyd"] * 4 + ["x"] * 6, 1.0),
    ],
)
def test_normalisation_inside_accuracy(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == expected


def test_accuracy_accepts_tuple_and_does_not_modify_answers():
    answers = ["Yes", "yes."] + ["no"] * 8
    before = list(answers)
    assert vqa_accuracy("yes", tuple(answers)) == 0.6
    assert vqa_accuracy("yes", answers) == 0.6
    assert answers == before


def test_accuracy_bad_inputs():
    with pytest.raises(TypeError, match="prediction must be a str, got int"):
        vqa_accuracy(1, ["1"] * 10)
    with pytest.raises(TypeError, match="prediction must be a str, got NoneType"):
        vqa_accuracy(None, ["1"] * 10)
    with pytest.raises(TypeError, match="list or tuple of strings"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(TypeError, match="list or tuple of strings"):
        vqa_accuracy("yes", None)
    with pytest.raises(TypeError, match="list or tuple of strings"):
        vqa_accuracy("yes", {"yes"})
    with pytest.raises(TypeError, match="only strings, found int"):
        vqa_accuracy("yes", ["yes"] * 9 + [1])
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy("yes", [])


def test_accuracy_other_answer_counts_follow_official_tool_and_warn():
    # 3 answers: leave out each -> [1/3, 1/3, 2/3] -> (4/3) / 3
    with pytest.warns(UserWarning, match="other than 10"):
        assert vqa_accuracy("yes", ["yes", "yes", "no"]) == 0.4444444444444444
    # A single answer: leaving it out leaves nothing, so always 0.
    with pytest.warns(UserWarning, match="other than 10"):
        assert vqa_accuracy("yes", ["yes"]) == 0.0
    # 11 answers, 10 matching: every subset holds >= 9 matches -> 1
    with pytest.warns(UserWarning, match="other than 10"):
        assert vqa_accuracy("yes", ["yes"] * 10 + ["no"]) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vqa_accuracy("yes", ["yes"] * 10)  # no warning for 10


# ---------------------------------------------------------------------------
# evaluate_vqa
# ---------------------------------------------------------------------------

# (question_id, question_type, answer_type, human answers, prediction, accuracy)
QUESTIONS = [
    (101, "what color", "other", ["red"] * 10, "red", 1.0),
    (102, "how many", "number", ["2"] + ["3"] * 9, "two", 0.3),  # 1 match
    (103, "how many", "number", ["4"] * 2 + ["5"] * 8, "4", 0.6),  # 2 matches
    (104, "is the", "yes/no", ["yes"] * 10, "Yes", 0.0),  # identical -> no lower-casing
    (105, "is the", "yes/no", ["no"] * 3 + ["yes"] * 7, "no.", 0.9),  # 3 matches
    (106, "what is", "other", ["white"] * 4 + ["gray"] * 6, "White", 1.0),  # 4 matches
    (107, "what color", "other", ["blue"] * 10, "blue", 1.0),
]


def official_annotations(rows=QUESTIONS):
    return {
        "annotations": [
            {
                "question_id": qid,
                "image_id": 1000 + qid,
                "question_type": qtype,
                "answer_type": atype,
                "multiple_choice_answer": answers[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(answers)
                ],
            }
            for qid, qtype, atype, answers, _, _ in rows
        ]
    }


def official_results(rows=QUESTIONS):
    return [{"question_id": qid, "answer": pred} for qid, _, _, _, pred, _ in rows]


@dataclass
class Record:
    """Stands in for rvqa.data's VQA records (attributes, answers as strings)."""

    question_id: int
    question: str
    answers: list[str]
    question_type: str
    answer_type: str


# Hand computation for the fixture (each value = round(100 * sum / n, 2)):
#   overall: (1 + .3 + .6 + 0 + .9 + 1 + 1) / 7 = 4.8 / 7 = 0.685714... -> 68.57
#   what color {101, 107}: 2/2 -> 100.0      other {101, 106, 107}: 3/3 -> 100.0
#   how many {102, 103}: 0.9/2 -> 45.0       number {102, 103}: 45.0
#   is the {104, 105}: 0.9/2 -> 45.0         yes/no {104, 105}: 45.0
#   what is {106}: 100.0
EXPECTED_JSON = {
    "overall": 68.57,
    "perQuestionType": {"what color": 100.0, "how many": 45.0, "is the": 45.0, "what is": 100.0},
    "perAnswerType": {"other": 100.0, "number": 45.0, "yes/no": 45.0},
}
EXPECTED_PER_QUESTION = {
    101: 100.0,
    102: 30.0,
    103: 60.0,
    104: 0.0,
    105: 90.0,
    106: 100.0,
    107: 100.0,
}


def test_fixture_question_scores_match_vqa_accuracy():
    for _, _, _, answers, pred, acc in QUESTIONS:
        assert vqa_accuracy(pred, answers) == acc


def test_evaluate_vqa_matches_hand_computation():
    result = evaluate_vqa(official_results(), official_annotations())
    assert isinstance(result, VQAEvalResult)
    assert result.overall == 68.57
    assert result.per_question_type == EXPECTED_JSON["perQuestionType"]
    assert result.per_answer_type == EXPECTED_JSON["perAnswerType"]
    assert result.per_question == EXPECTED_PER_QUESTION
    assert list(result.per_question) == [101, 102, 103, 104, 105, 106, 107]
    assert (result.num_questions, result.num_missing) == (7, 0)


def test_results_json_schema():
    out = evaluate_vqa(official_results(), official_annotations()).to_json()
    assert out == EXPECTED_JSON
    assert list(out) == ["overall", "perQuestionType", "perAnswerType"]
    assert json.loads(json.dumps(out)) == out


def test_evaluate_vqa_input_forms_agree():
    reference = evaluate_vqa(official_results(), official_annotations())
    as_dict = {qid: pred for qid, _, _, _, pred, _ in QUESTIONS}
    records = [
        Record(qid, "?", answers, qtype, atype) for qid, qtype, atype, answers, _, _ in QUESTIONS
    ]
    for preds, anns in [
        (as_dict, official_annotations()),
        (official_results(), official_annotations()["annotations"]),
        (official_results(), records),
        (as_dict, records),
    ]:
        assert evaluate_vqa(preds, anns) == reference


def test_evaluate_vqa_does_not_modify_inputs():
    anns, preds = official_annotations(), official_results()
    before = json.dumps([anns, preds])
    evaluate_vqa(preds, anns)
    assert json.dumps([anns, preds]) == before


def test_missing_predictions():
    preds = official_results()[:-1]  # no prediction for 107
    with pytest.raises(ValueError, match=r"1 of 7 annotated questions have no prediction.*107"):
        evaluate_vqa(preds, official_annotations())

    skipped = evaluate_vqa(preds, official_annotations(), missing="skip")
    # (1 + .3 + .6 + 0 + .9 + 1) / 6 = 3.8 / 6 -> 63.33; what color = {101} only
    assert skipped.overall == 63.33
    assert skipped.per_question_type["what color"] == 100.0
    assert 107 not in skipped.per_question
    assert (skipped.num_questions, skipped.num_missing) == (6, 1)

    wrong = evaluate_vqa(preds, official_annotations(), missing="wrong")
    # 3.8 / 7 -> 54.29; what color (1 + 0) / 2 -> 50.0; other (1 + 1 + 0) / 3 -> 66.67
    assert wrong.overall == 54.29
    assert wrong.per_question_type["what color"] == 50.0
    assert wrong.per_answer_type["other"] == 66.67
    assert wrong.per_question[107] == 0.0
    assert (wrong.num_questions, wrong.num_missing) == (7, 1)

    with pytest.raises(ValueError, match="missing must be 'error', 'skip' or 'wrong'"):
        evaluate_vqa(preds, official_annotations(), missing="ignore")
    with pytest.raises(ValueError, match="no questions to evaluate"):
        evaluate_vqa([], official_annotations(), missing="skip")


def test_bad_prediction_inputs():
    anns = official_annotations()
    extra = official_results() + [
        {"question_id": 999, "answer": "x"},
        {"question_id": 998, "answer": "y"},
    ]
    with pytest.raises(
        ValueError,
        match=r"2 prediction\(s\) have question ids that are not in the annotations, e.g. \[999, 998\]",
    ):
        evaluate_vqa(extra, anns)
    as_str_keys = {str(qid): pred for qid, _, _, _, pred, _ in QUESTIONS}
    with pytest.raises(ValueError, match="the string '1' is not the int 1"):
        evaluate_vqa(as_str_keys, anns)
    bad = official_results()
    bad[2]["answer"] = 4
    with pytest.raises(TypeError, match="prediction for question_id 103 must be a str, got int"):
        evaluate_vqa(bad, anns)
    with pytest.raises(
        ValueError, match="prediction #0 must be a dict with 'question_id' and 'answer'"
    ):
        evaluate_vqa([{"id": 101, "answer": "red"}], anns)
    with pytest.raises(TypeError, match="official results list"):
        evaluate_vqa("results.json", anns)


def test_duplicate_predictions_last_wins_with_warning():
    preds = [{"question_id": 101, "answer": "green"}] + official_results()
    with pytest.warns(UserWarning, match="1 prediction.* repeat a question_id"):
        result = evaluate_vqa(preds, official_annotations())
    assert result.per_question[101] == 100.0


def test_bad_annotation_inputs():
    preds = official_results()
    anns = official_annotations()
    anns["annotations"][3]["answers"][5]["answer"] = None
    with pytest.raises(
        TypeError, match="question_id 104: human answers must be strings, found NoneType"
    ):
        evaluate_vqa(preds, anns)
    anns = official_annotations()
    anns["annotations"].append(dict(anns["annotations"][0]))
    with pytest.raises(ValueError, match="question_id 101 more than once"):
        evaluate_vqa(preds, anns)
    anns = official_annotations()
    del anns["annotations"][0]["answers"]
    with pytest.raises(ValueError, match="annotation #0 has no 'answers'"):
        evaluate_vqa(preds, anns)
    anns = official_annotations()
    anns["annotations"][0]["answers"] = []
    with pytest.raises(ValueError, match="question_id 101 has no answers"):
        evaluate_vqa(preds, anns)
    with pytest.raises(TypeError, match=r"official annotations JSON \{'annotations': \[...\]\}"):
        evaluate_vqa(preds, {"questions": []})
    with pytest.raises(ValueError, match="annotations are empty"):
        evaluate_vqa({}, [])


def test_answer_count_warning_is_issued_once_per_call():
    rows = [
        (1, "what", "other", ["a b", "c"], "c", None),
        (2, "what", "other", ["x"] * 3, "x", None),
        (3, "what", "other", ["y"] * 10, "y", None),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_vqa(official_results(rows), official_annotations(rows))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "2 question(s)" in messages[0] and "other than 10" in messages[0]
    # 1: ["a b", "c"], pred "c": leave out "a b" -> 1 match -> 1/3; leave out "c" -> 0
    #    -> (1/3) / 2 = 0.1666... -> 16.67
    # 2: 3 identical answers: each subset has 2 matches -> 2/3 -> 66.67
    assert result.per_question == {1: 16.67, 2: 66.67, 3: 100.0}


def test_identical_answer_dicts_warn_about_official_leave_one_out():
    # Without distinct answer_ids the official script's "item != gtAnsDatum"
    # drops every identical entry at once; rvqa counts each entry, and says so.
    anns = [
        {
            "question_id": 1,
            "question_type": "is the",
            "answer_type": "yes/no",
            "answers": [{"answer": "yes"}] * 10,
        }
    ]
    with pytest.warns(UserWarning, match="identical answer entries"):
        result = evaluate_vqa({1: "yes"}, anns)
    assert result.overall == 100.0


def test_questions_scope_and_multiple_choice():
    anns = official_annotations()
    # Only the listed questions, in this order (like VQAEval.evaluate(quesIds)):
    # (0.9 + 1) / 2 -> 95.0; predictions for other questions are ignored.
    result = evaluate_vqa(official_results(), anns, questions=[105, 101])
    assert list(result.per_question) == [105, 101]
    assert result.overall == 95.0
    questions_json = {
        "task_type": "Open-Ended",
        "questions": [{"question_id": 102, "question": "How many?", "image_id": 1102}],
    }
    assert evaluate_vqa(official_results(), anns, questions=questions_json).overall == 30.0
    # missing is checked within the scope only
    assert evaluate_vqa({101: "red"}, anns, questions=[101]).overall == 100.0
    with pytest.raises(
        ValueError, match=r"1 question id\(s\) in `questions` have no annotation, e.g. \[5\]"
    ):
        evaluate_vqa(official_results(), anns, questions=[5])

    mc = {
        "task_type": "Multiple Choice",
        "questions": [{"question_id": 101, "multiple_choices": ["red", "blue"]}],
    }
    assert evaluate_vqa({101: "red"}, anns, questions=mc).overall == 100.0
    with pytest.raises(
        ValueError, match="question_id 101 .'green'. is not one of its multiple choices"
    ):
        evaluate_vqa({101: "green"}, anns, questions=mc)


def test_missing_types_are_left_out_of_type_tables():
    records = [
        Record(1, "?", ["yes"] * 10, None, None),
        Record(2, "?", ["no"] * 10, "is the", None),
    ]
    result = evaluate_vqa({1: "yes", 2: "yes"}, records)
    assert result.overall == 50.0
    assert result.per_question_type == {"is the": 0.0}
    assert result.per_answer_type == {}


# ---------------------------------------------------------------------------
# The `evaluate` module and the light import
# ---------------------------------------------------------------------------


def test_evaluate_module_path_points_to_the_module():
    path = evaluate_module_path()
    assert os.path.isfile(path) and path.endswith(os.path.join("metrics_module", "vqa_accuracy.py"))


def test_evaluate_load_by_path_gives_identical_numbers():
    evaluate = pytest.importorskip("evaluate")
    predictions = [pred for _, _, _, _, pred, _ in QUESTIONS]
    references = [answers for _, _, _, answers, _, _ in QUESTIONS]
    question_types = [qtype for _, qtype, _, _, _, _ in QUESTIONS]
    answer_types = [atype for _, _, atype, _, _, _ in QUESTIONS]
    expected = evaluate_vqa(official_results(), official_annotations())

    for path in (evaluate_module_path(), os.path.dirname(evaluate_module_path())):
        metric = evaluate.load(path)
        out = metric.compute(
            predictions=predictions,
            references=references,
            question_types=question_types,
            answer_types=answer_types,
        )
        assert out == {
            "accuracy": expected.overall,
            "per_question_type": expected.per_question_type,
            "per_answer_type": expected.per_answer_type,
            "scores": list(expected.per_question.values()),
        }

    # Batches, without types
    metric = evaluate.load(evaluate_module_path())
    metric.add_batch(predictions=predictions[:3], references=references[:3])
    metric.add_batch(predictions=predictions[3:], references=references[3:])
    out = metric.compute()
    assert out["accuracy"] == 68.57
    assert out["per_question_type"] == {} and out["per_answer_type"] == {}


def test_import_stays_light():
    code = (
        "import sys, rvqa.metrics; "
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'evaluate', 'faiss') "
        "if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- Python 2.7 rounding


def test_round_half_away_matches_python27_round():
    # Exact binary halves go away from zero (Python 2.7); Python 3 goes to even.
    assert round_half_away(40.625) == 40.63 and round(40.625, 2) == 40.62
    assert round_half_away(0.125) == 0.13 and round_half_away(-0.125) == -0.13
    assert round_half_away(12.375) == 12.38 and round_half_away(12.365) == round(12.365, 2)
    # Decimal-looking ties are not binary ties: the exact value decides, as in both.
    assert round_half_away(2.675) == 2.67 == round(2.675, 2)
    assert round_half_away(68.5714285) == 68.57


def test_evaluate_vqa_group_of_exactly_40_625_reports_40_63():
    # 13 of 32 questions right: 100 * 13 / 32 = 40.625 exactly, per group and overall.
    anns, preds = [], []
    for qid in range(32):
        anns.append(
            {
                "question_id": qid,
                "image_id": qid,
                "question_type": "what is",
                "answer_type": "other",
                "answers": [{"answer": "cat", "answer_id": i} for i in range(1, 11)],
            }
        )
        preds.append({"question_id": qid, "answer": "cat" if qid < 13 else "dog"})
    result = evaluate_vqa(preds, {"annotations": anns})
    assert 100 * 13.0 / 32 == 40.625
    assert result.overall == 40.63
    assert result.per_answer_type == {"other": 40.63}
    assert result.per_question_type == {"what is": 40.63}
