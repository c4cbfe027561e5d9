"""Answer vocabulary and soft targets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from rvqa.metrics import vqa_accuracy
from rvqa.reader.answers import AnswerVocab, build_vocab, soft_score

# 10 annotators: "red" ×4 (spelled three ways), "blue" ×2, "green" ×1, 3 answers outside the vocab.
TEN = ["red", "Red", "red.", "red", "blue", "a blue", "green", "purple", "pink", "teal"]


@pytest.fixture
def vocab() -> AnswerVocab:
    return AnswerVocab(["red", "blue", "green", "2", "yes"])


def test_build_counts_normalised_answers_with_deterministic_ties():
    lists = [
        ["Two", "2", "two.", "yes"],
        ["yes", "Yes", "no"],
        ["no", "b", "c", "a"],  # "a" normalises to "" (an article): dropped
        ["c", "b"],
    ]
    vocab = build_vocab(lists)
    # counts: 2→3, yes→3, no→2, b→2, c→2: count desc, then string
    assert vocab.answers == ["2", "yes", "b", "c", "no"]
    assert vocab.counts == [3, 3, 2, 2, 2]
    assert build_vocab(lists, size=3).answers == ["2", "yes", "b"]
    assert build_vocab(lists, min_count=3).answers == ["2", "yes"]
    assert AnswerVocab.build(reversed(lists)) == vocab  # order of questions is irrelevant


def test_min3_soft_targets_match_hand_computation(vocab):
    targets = vocab.soft_targets(TEN)
    assert targets.keys() == {0, 1, 2}
    assert targets[0] == 1.0  # 4 of 10
    assert targets[1] == pytest.approx(2 / 3)  # 2 of 10
    assert targets[2] == pytest.approx(1 / 3)  # 1 of 10
    dense = vocab.soft_target_vector(TEN)
    assert dense.dtype == np.float32 and dense.shape == (5,)
    np.testing.assert_allclose(dense, [1.0, 0.667, 0.333, 0.0, 0.0], atol=1e-3)


def test_loo_soft_targets_equal_the_official_accuracy(vocab):
    targets = vocab.soft_targets(TEN, rule="loo")
    assert targets == pytest.approx({0: 1.0, 1: 0.6, 2: 0.3})
    for index, score in targets.items():
        assert score == pytest.approx(vqa_accuracy(vocab.decode(index), TEN))
    assert [soft_score(c, 10, "loo") for c in range(5)] == pytest.approx([0, 0.3, 0.6, 0.9, 1.0])


def test_answers_outside_the_vocab_are_other(vocab):
    assert vocab.soft_targets(["purple", "", "???", "teal"]) == {}
    assert not vocab.soft_target_vector(["purple"]).any()
    assert vocab.soft_targets([]) == {}
    stats = vocab.coverage([TEN, ["purple"] * 10, ["yes"] * 10])
    assert (stats.questions, stats.answers, stats.answers_in_vocab) == (3, 30, 17)
    assert stats.questions_with_target == 2
    assert stats.question_coverage == pytest.approx(2 / 3)
    assert stats.answer_coverage == pytest.approx(17 / 30)
    assert stats.max_accuracy == pytest.approx(2 / 3)


def test_encode_decode(vocab):
    assert vocab.encode("Two") == vocab.encode("2") == 3
    assert vocab.encode("the Red.") == 0
    assert vocab.encode("purple") is None
    assert "Yes" in vocab and "purple" not in vocab and 3 not in vocab
    assert vocab.decode(1) == "blue" and vocab.decode(np.int64(4)) == "yes"
    assert [vocab.decode(vocab.encode(a)) for a in vocab] == vocab.answers
    with pytest.raises(IndexError, match="outside 0..4"):
        vocab.decode(5)
    with pytest.raises(TypeError, match="integer"):
        vocab.decode("red")
    with pytest.raises(TypeError, match="string"):
        vocab.encode(2)


def test_save_load_round_trip(vocab, tmp_path):
    built = build_vocab([TEN, ["yes", "no"]])
    path = built.save(tmp_path / "sub" / "answers.json")
    loaded = AnswerVocab.load(path)
    assert loaded == built and loaded.counts == built.counts
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["answers.json"]  # no temporaries

    (tmp_path / "other.json").write_text(json.dumps({"answers": ["a"]}))
    with pytest.raises(ValueError, match="not an rvqa answer vocabulary"):
        AnswerVocab.load(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        AnswerVocab.load(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        AnswerVocab.load(tmp_path / "missing.json")


def test_bad_inputs_raise(vocab):
    with pytest.raises(TypeError, match="list of strings"):
        vocab.soft_targets("red")  # one string is not a list of answers
    with pytest.raises(TypeError, match="answer list 1"):
        build_vocab([["red"], "blue"])
    with pytest.raises(TypeError, match="int"):
        build_vocab([["red", 3]])
    # the list is named, also for a generator and for an unhashable entry
    with pytest.raises(TypeError, match=r"answer list 2 holds a int: 3"):
        build_vocab(iter([["red"], ["blue"], ["red", 3]]))
    with pytest.raises(TypeError, match=r"answer list 1 holds a list: \['red'\]"):
        build_vocab([["red"], ["blue", ["red"]]])
    with pytest.raises(ValueError, match="size"):
        build_vocab([["red"]], size=0)
    with pytest.raises(ValueError, match="empty"):
        build_vocab([["a", "the"]])
    with pytest.raises(ValueError, match="duplicate"):
        AnswerVocab(["red", "blue", "red"])
    with pytest.raises(ValueError, match="rule"):
        vocab.soft_targets(TEN, rule="min4")


def test_answers_module_does_not_import_torch():
    code = "import sys, reader, rvqa.reader.answers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
