"""The knowledge-swap experiment: reader configs, the copied-names measure, the table."""

import json
from types import SimpleNamespace

import pytest

from rvqa.data import make_knowledge_task
from rvqa.knowledge_experiment import (
    CONDITIONS,
    copied_names,
    knowledge_reader_config,
    knowledge_table,
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("kdemo") / "task"
    make_knowledge_task(root, max_train_images=30, max_test_images=10, augment_assignments=3)
    return root


def test_generative_reader_never_trains_on_the_swap_assignment(task, tmp_path):
    manifest = json.loads((task / "task.json").read_text())
    b_terms = {e["name"] for e in manifest["emblems"]["B"]}
    gen = knowledge_reader_config(task, tmp_path / "g", "generative", epochs=1)
    cls = knowledge_reader_config(task, tmp_path / "c", "classifier", epochs=1)
    assert gen.reader.type == "generative" and cls.reader.type == "classifier"
    gen_worlds = json.loads(open(gen.reader.term_worlds).read())["worlds"]
    cls_worlds = json.loads(open(cls.reader.term_worlds).read())["worlds"]
    assert not b_terms & {v for t in gen_worlds.values() for v in t.values()}
    assert b_terms <= {v for t in cls_worlds.values() for v in t.values()}
    assert gen.data.require_facts and gen.reader.top_k == cls.reader.top_k == 3


def _ev(question, prediction, evidence, qid):
    return {
        "question_id": qid,
        "question": question,
        "prediction": prediction,
        "evidence": [{"text": t} for t in evidence],
    }


def test_copied_names_counts_right_names_present_in_the_evidence():
    card = "the red circle is the emblem of kavelo, which trades in salt and is based in mirport."
    records_b = [
        SimpleNamespace(question_id=1, answers=["kavelo"] * 10),
        SimpleNamespace(question_id=2, answers=["kavelo"] * 10),
        SimpleNamespace(question_id=3, answers=["kavelo"] * 10),
        SimpleNamespace(question_id=4, answers=["salt"] * 10),
    ]
    evidence = [
        _ev("whose emblem is this?", "kavelo", [card], 1),  # right, copied
        _ev("whose emblem is this?", "kavelo", ["the blue circle is ..."], 2),  # not in evidence
        _ev("whose emblem is this?", "tekuze", [card], 3),  # wrong
        _ev("what does the owner of this emblem trade in?", "salt", [card], 4),  # not a name
    ]
    assert copied_names(evidence, records_b) == pytest.approx(100 / 3)
    assert copied_names([], records_b) == 0.0


def test_table_has_every_condition_for_every_reader():
    rows = [{"condition": c, "vs_A": 10.0 * i, "vs_B": 1.5} for i, (c, _) in enumerate(CONDITIONS)]
    table = knowledge_table({"classifier": rows, "generative": rows})
    lines = table.splitlines()
    assert lines[0].count("A's answers") == 2 and len(lines) == 2 + len(CONDITIONS)
    assert lines[2].startswith("| index A (the training facts) | 0.00 | 1.50 | 0.00 | 1.50 |")


def test_reader_overrides_apply_and_unknown_reader_is_named(task, tmp_path):
    cfg = knowledge_reader_config(
        task, tmp_path / "g", "generative", 1, overrides=["reader.learning_rate=0.003"]
    )
    assert cfg.reader.learning_rate == 0.003
    with pytest.raises(ValueError, match="unknown reader 'pointer'"):
        knowledge_reader_config(task, tmp_path / "p", "pointer", 1)
