"""The knowledge-swap experiment: reader configs, the copied-names measure, the table."""

import json
import re
from types import SimpleNamespace

import pytest

from rvqa.data import make_knowledge_task
from rvqa.knowledge_experiment import (
    CONDITIONS,
    TOP_K,
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
    assert gen.data.require_facts and gen.reader.top_k == cls.reader.top_k == TOP_K == 1
    assert (
        knowledge_reader_config(task, tmp_path / "g3", "generative", 1, top_k=3).reader.top_k == 3
    )


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


@pytest.mark.parametrize("train_text", [True, False])
def test_card_fine_tuning_trains_the_text_tower_only_when_asked(task, tmp_path, train_text):
    import torch

    from rvqa.config import load_config
    from rvqa.knowledge_experiment import fit_retriever_to_cards
    from rvqa.retriever.modeling import RetrieverModel
    from tests.tiny import tiny_run_config

    cfg = tiny_run_config(tmp_path)
    cfg.retriever.freeze_text = train_text  # the opposite of what is asked
    retriever = RetrieverModel.from_backbones(cfg.retriever)
    text = {n: p.detach().clone() for n, p in retriever.text_model.named_parameters()}
    tuned, folder = fit_retriever_to_cards(
        retriever, task, tmp_path / "run", steps=2, learning_rate=1e-2, train_text_tower=train_text
    )
    changed = [n for n, p in tuned.text_model.named_parameters() if not torch.equal(p, text[n])]
    assert bool(changed) == train_text
    assert tuned.config.freeze_text is (not train_text)
    saved = load_config(folder.parent / "config.yaml").retriever
    assert saved.freeze_text is (not train_text)
    assert retriever.config.freeze_text is train_text  # the given retriever is left as it was
    assert all(torch.equal(p, text[n]) for n, p in retriever.text_model.named_parameters())


@pytest.mark.slow
def test_whole_experiment_with_tiny_models(tmp_path):
    """Both readers (tiny towers) through the whole experiment; the card recall agrees with a
    brute-force ranking of the retriever's embeddings."""
    from pathlib import Path

    import numpy as np
    import torch

    from rvqa.data import load_vqa
    from rvqa.knowledge_experiment import (
        card_recall,
        copied_by_reader,
        format_examples,
        run_knowledge_experiment,
    )
    from rvqa.retriever.modeling import RetrieverModel
    from tests.tiny import tiny_run_config

    cfg = tiny_run_config(tmp_path)
    retriever = RetrieverModel.from_backbones(cfg.retriever)
    tiny_reader = [
        f"reader.text_backbone={cfg.reader.text_backbone}",
        "reader.num_text_layers=null",
        "reader.batch_size=16",
        "reader.max_eval_questions=16",
        "reader.max_question_length=8",
        "reader.max_caption_length=12",  # the tiny text backbone has 64 positions
    ]
    generative = [
        "reader.batch_size=16",
        "reader.t5_d_model=16",
        "reader.t5_num_heads=2",
        "reader.t5_d_ff=32",
        "reader.t5_num_layers=1",
        "reader.spm_vocab_size=120",
        "reader.num_beams=2",
    ]
    lines = []
    retriever.save_pretrained(tmp_path / "ret")
    res = run_knowledge_experiment(
        retriever,
        tmp_path / "exp",
        train_images=24,
        test_images=6,
        epochs=1,
        retriever_dir=tmp_path / "ret",
        card_steps=2,  # fine-tuned on the task's cards first: the runs use that retriever
        overrides={"classifier": tiny_reader, "generative": generative},
        say=lines.append,
        examples=1,
    )
    tuned = Path(res["retriever_dir"])
    assert tuned.is_relative_to(tmp_path / "exp" / "retriever") and res["retriever_s"] > 0
    tuned_model = RetrieverModel.from_pretrained(tuned)
    assert not torch.equal(  # a copy was trained; the given retriever is unchanged
        next(tuned_model.vision_model.parameters()), next(retriever.vision_model.parameters())
    )
    assert any("fine-tuned on the task's fact cards: 2 steps" in line for line in lines)
    assert set(res["tables"]) == {"classifier", "generative"}
    assert [e["reader"] for e in res["examples"]] == ["classifier", "generative"]
    assert "classifier, index B" in format_examples(res["examples"])
    for rows in res["tables"].values():
        assert [r["condition"] for r in rows] == [c for c, _ in CONDITIONS]
        assert all(0 <= r["vs_A"] <= 100 and 0 <= r["vs_B"] <= 100 for r in rows)
        assert 0 <= rows[1]["copied_B_names"] <= 100
    assert copied_by_reader(res["tables"]) == {
        k: rows[1]["copied_B_names"] for k, rows in res["tables"].items()
    }
    ex = res["examples"][0]
    assert ex["before"].evidence[0].index == "A" and ex["after"].evidence[0].index == "B"
    assert any("own card" in line for line in lines)
    # each reader's folder is a run: RVQA.from_pretrained loads it, with index A
    from rvqa.pipeline import RVQA

    run = RVQA.from_pretrained(tmp_path / "exp" / "knowledge-generative")
    assert run.retriever.fingerprint() == tuned_model.fingerprint()
    got = run.answer(ex["image"], ex["question"])
    assert got.evidence and {e.index for e in got.evidence} == {"knowledge-A"}

    # card recall: brute force over the index's 24 cards
    task = tmp_path / "exp" / "knowledge-task"
    records = list(load_vqa(knowledge_reader_config(task, tmp_path, "classifier", 1).data, "test"))
    cards = [json.loads(line)["caption"] for line in (task / "facts" / "A.jsonl").open()]
    asked = [r for r in records if r.question.startswith("whose emblem")]
    q = tuned_model.embed_images([r.image for r in asked])
    x = tuned_model.embed_texts(cards)
    order = np.argsort(-(q @ x.T), axis=1, kind="stable")
    words = [set(re.findall(r"[a-z]+", c)) for c in cards]
    want = 100 * np.mean(
        [any(r.answers[0] in words[j] for j in o[:3]) for r, o in zip(asked, order)]
    )
    got = card_recall(tuned_model, tmp_path / "exp" / "indices" / "knowledge-A", records, ks=(3,))
    assert got["recall@3"] == pytest.approx(want) == res["card_recall"]["recall@3"]
