"""Counterfactual term worlds: substitution, world choice, loading, and the reader data."""

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from rvqa.errors import DataFormatError
from rvqa.reader.answers import AnswerVocab
from rvqa.reader.augmentation import TermWorlds
from rvqa.reader.data import ReaderDataset

TABLES = [
    {"vardelo": "miskaro", "salt": "tin", "port lume": "oskar"},
    {"vardelo": "salt", "salt": "vardelo", "port lume": "ebb"},
]


def test_rewrite_is_whole_word_longest_first_and_simultaneous():
    w = TermWorlds(TABLES)
    assert len(w) == 3  # the base (identity) + 2
    text = "the red circle is the emblem of vardelo, which trades in salt. vardelos saltpeter port lume"
    assert w.rewrite(text, 0) == text
    assert w.rewrite(text, 1) == (
        "the red circle is the emblem of miskaro, which trades in tin. vardelos saltpeter oskar"
    )
    # a swap a <-> b happens in one pass, not a -> b -> a
    assert w.rewrite("vardelo trades in salt", 2) == "salt trades in vardelo"
    assert w.rewrite("VARDELO", 1) == "miskaro"


def test_world_choice_is_a_deterministic_hash_covering_every_world():
    w = TermWorlds(TABLES)
    picks = [w.world_for(q, seed=3) for q in range(3000)]
    assert picks == [w.world_for(q, seed=3) for q in range(3000)]
    counts = Counter(picks)
    assert set(counts) == {0, 1, 2}
    assert min(counts.values()) > 800  # about uniform
    assert [w.world_for(q, seed=4) for q in range(50)] != picks[:50]


def test_answer_lists_cover_every_world():
    w = TermWorlds(TABLES)
    assert list(w.answer_lists([["salt", "salt"]])) == [
        ["salt", "salt"],
        ["tin", "tin"],
        ["vardelo", "vardelo"],
    ]


def test_load_and_bad_files(tmp_path):
    p = tmp_path / "worlds.json"
    p.write_text(json.dumps({"base": 0, "worlds": {"7": TABLES[0], "9": TABLES[1]}}))
    w = TermWorlds.load(p)
    assert w.names == ["base", "7", "9"] and w.rewrite("salt", 2) == "vardelo"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        TermWorlds.load(tmp_path / "nope.json")
    p.write_text("{not json")
    with pytest.raises(DataFormatError, match="worlds.json: not a JSON file"):
        TermWorlds.load(p)
    p.write_text(json.dumps({"base": 0}))
    with pytest.raises(DataFormatError, match="'worlds' is missing"):
        TermWorlds.load(p)
    p.write_text(json.dumps({"worlds": {"7": TABLES[0], "8": {"vardelo": "x"}}}))
    with pytest.raises(DataFormatError, match="world 8: maps other terms"):
        TermWorlds.load(p)
    p.write_text(json.dumps({"worlds": {"7": {"vardelo": ""}}}))
    with pytest.raises(DataFormatError, match="world 7: every term"):
        TermWorlds.load(p)
    with pytest.raises(DataFormatError, match="no world"):
        TermWorlds([])


def _record(qid):
    return SimpleNamespace(
        image="unused",
        image_id=1,
        question="whose emblem is this?",
        question_id=qid,
        answers=["vardelo"] * 10,
    )


def _datasets(n: int) -> tuple[TermWorlds, AnswerVocab, ReaderDataset, ReaderDataset]:
    """n questions about one image whose retrieved card names vardelo: (worlds, vocab,
    the dataset rewriting into the worlds, the same dataset without them)."""
    worlds = TermWorlds(TABLES)
    vocab = AnswerVocab(["vardelo", "miskaro", "salt"])
    records = [_record(q) for q in range(n)]
    hits = {"1": [("the red circle is the emblem of vardelo.", 0.9, 1)]}
    features = np.zeros((n, 2, 3), dtype=np.float32)
    ds = ReaderDataset(records, None, hits, vocab, 1, seed=0, features=features, worlds=worlds)
    plain = ReaderDataset(records, None, hits, vocab, 1, seed=0, features=features)
    return worlds, vocab, ds, plain


def test_reader_dataset_rewrites_captions_and_answers_consistently():
    worlds, vocab, ds, plain = _datasets(40)
    seen = set()
    for i in range(40):
        item, base = ds[i], plain[i]
        w = worlds.world_for(f"{i}@0", 0)  # question id @ epoch
        seen.add(w)
        name = {0: "vardelo", 1: "miskaro", 2: "salt"}[w]
        assert item["captions"] == [f"the red circle is the emblem of {name}."]
        assert vocab.decode(int(np.argmax(item["labels"]))) == name
        assert base["captions"] == ["the red circle is the emblem of vardelo."]
        assert vocab.decode(int(np.argmax(base["labels"]))) == "vardelo"
    assert seen == {0, 1, 2}


def test_worlds_of_another_assignment_are_refused():
    w = TermWorlds(TABLES, source="old/worlds.json")
    w.check_applies([["yes"], ["vardelo"]], "the answers")
    with pytest.raises(DataFormatError, match=r"old/worlds.json: none of its 3 terms occurs in"):
        w.check_applies([["yes"], ["kavelo"]], "the answers of the first 2 training questions")


def test_a_question_gets_another_world_in_another_epoch():
    _, _, ds, _ = _datasets(60)

    def captions():
        return [ds[i]["captions"][0] for i in range(60)]

    first = captions()
    assert captions() == first  # deterministic within an epoch
    ds.set_epoch(1)
    second = captions()
    changed = sum(a != b for a, b in zip(first, second))
    assert changed > 25  # 2 of 3 worlds differ: ~40 of 60
    ds.set_epoch(0)
    assert captions() == first  # a resumed epoch rewrites as before
