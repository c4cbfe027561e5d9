"""The classifier reader's extractive pointer (``copy_from_context``): answers of the
vocabulary found in the captions, and the pointer score added to their logits."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from rvqa.errors import ConfigError
from rvqa.reader.modeling import ReaderModel
from rvqa.reader.processing import ReaderProcessor
from rvqa.towers import load_tokenizer
from tests.test_reader_model import tiny_config

NAMES = [f"{a}{b}" for a in ("ka", "lo", "mi", "ru", "te") for b in ("vel", "sor", "dun", "pim")]
ANSWERS = ["yes", "no", "new york", "salt", *NAMES]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def copy_processor(tokenizer, **kw) -> ReaderProcessor:
    kw = {"max_question_length": 8, "max_caption_length": 12, **kw}
    return ReaderProcessor(tokenizer, None, answers=ANSWERS, **kw)


def found(processor, batch, row: int) -> list[tuple[str, str]]:
    """(answer, token at its position) of one row."""
    ids, pos = batch["context_answers"][row].tolist(), batch["context_positions"][row].tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][row].tolist())
    return [(ANSWERS[a], tokens[p]) for a, p in zip(ids, pos) if a >= 0]


def test_processor_marks_whole_word_answers_at_their_first_token(tokenizer):
    p = copy_processor(tokenizer)
    batch = p(
        None,
        ["whose emblem is this?", "where?", "and this?"],
        captions=[
            ["kavel trades in Salt.", "salty and salted"],  # case-insensitive; not in "salty"
            ["based in New York, like lopim"],  # a two-word answer
            [],
        ],
    )
    assert found(p, batch, 0) == [("kavel", "ka"), ("salt", "salt")]
    assert found(p, batch, 1) == [("new york", "new"), ("lopim", "lo")]
    assert found(p, batch, 2) == []
    assert batch["context_answers"].shape == batch["context_positions"].shape == (3, 2)
    assert batch["context_answers"][2].tolist() == [-1, -1]


def test_answers_cut_off_by_the_caption_budget_are_not_marked(tokenizer):
    p = copy_processor(tokenizer, max_caption_length=3)
    batch = p(None, ["whose?"], captions=[["the emblem of kavel"]])  # kavel: tokens 4-5
    assert batch["context_answers"].shape == (1, 0)
    batch = p(None, ["whose?"], captions=[["of kavel"]])
    assert found(p, batch, 0) == [("kavel", "ka")]


def test_no_retrieval_gives_empty_candidates_and_the_model_runs(tokenizer):
    p = copy_processor(tokenizer)
    batch = p(None, ["whose?", "what?"])
    assert batch["context_answers"].shape == (2, 0)
    model = ReaderModel(tiny_config(tokenizer, copy_from_context=True)).eval()
    out = model(**batch, visual_features=torch.randn(2, 4, 16))
    assert out.logits.shape == (2, model.config.num_answers)


def test_processor_round_trip_keeps_the_vocabulary(tokenizer, tmp_path):
    p = copy_processor(tokenizer)
    p.save_pretrained(tmp_path)
    q = ReaderProcessor.from_pretrained(tmp_path)
    assert q.answers == ANSWERS
    caps = [["the emblem of mivel, who trades in salt"]]
    a, b = p(None, ["whose?"], captions=caps), q(None, ["whose?"], captions=caps)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_without_offsets_is_refused():
    # transformers' Python ("slow") tokenizers give no character offsets
    slow = SimpleNamespace(is_fast=False, cls_token_id=1, sep_token_id=2, pad_token_id=0)
    with pytest.raises(ConfigError, match="fast tokenizer"):
        ReaderProcessor(slow, None, answers=ANSWERS)


def test_pointer_scores_match_a_loop_reference(tokenizer):
    torch.manual_seed(0)
    model = ReaderModel(tiny_config(tokenizer, answers=ANSWERS, copy_from_context=True)).eval()
    p = copy_processor(tokenizer)
    batch = p(
        None,
        ["whose emblem is this?", "what?"],
        captions=[["kavel, kavel and salt", "mipim"], ["nothing here"]],
        scores=[[0.9, 0.5], [0.3]],
    )
    feats = torch.randn(2, 4, 16)
    captured = {}

    def keep(module, inputs, output):  # returns None: the output is left as it is
        captured["h"] = output.last_hidden_state

    hook = model.text_model.encoder.register_forward_hook(keep)
    with torch.no_grad():
        logits = model(**batch, visual_features=feats).logits
    hook.remove()
    h = captured["h"]
    width = h.shape[-1]
    with torch.no_grad():
        expected = model.classifier(h[:, 0]).clone()
        for b in range(2):
            best: dict[int, float] = {}
            for a, pos in zip(
                batch["context_answers"][b].tolist(), batch["context_positions"][b].tolist()
            ):
                if a < 0:
                    continue
                q = model.copy_query(h[b, 0])
                k = model.copy_key(h[b, pos])
                s = float(q @ k) / width**0.5
                best[a] = max(best.get(a, -float("inf")), s)
            for a, s in best.items():
                expected[b, a] += s
    assert sorted(ANSWERS[a] for a in set(batch["context_answers"][0].tolist())) == [
        "kavel",
        "mipim",
        "salt",
    ]
    assert torch.allclose(logits, expected, atol=1e-5)
    # row 1 has no answer in its captions: the plain classifier logits
    assert torch.allclose(logits[1], model.classifier(h[1:2, 0])[0].detach(), atol=1e-6)


def test_model_without_candidates_for_its_captions_is_a_clear_error(tokenizer):
    model = ReaderModel(tiny_config(tokenizer, answers=ANSWERS, copy_from_context=True)).eval()
    plain = ReaderProcessor(tokenizer, None, max_question_length=8, max_caption_length=12)
    batch = plain(None, ["whose?"], captions=[["kavel"]], scores=[[1.0]])
    with pytest.raises(ValueError, match="no context_answers"):
        model(**batch, visual_features=torch.randn(1, 4, 16))
    batch = copy_processor(tokenizer)(None, ["whose?"], captions=[["kavel"]], scores=[[1.0]])
    bad = dict(batch, context_answers=batch["context_answers"] + len(ANSWERS))
    with pytest.raises(ValueError, match="answer id"):
        model(**bad, visual_features=torch.randn(1, 4, 16))
    bad = dict(batch, context_positions=batch["context_positions"] + 100)
    with pytest.raises(ValueError, match="context_positions must lie"):
        model(**bad, visual_features=torch.randn(1, 4, 16))


def _reading_task(rng: random.Random, n: int):
    """The owner is whichever name the caption says; the image and question carry nothing."""
    rows = []
    for _ in range(n):
        owner, other = rng.sample(NAMES, 2)
        caption = f"the emblem of {owner}, a friend of {other}"
        rows.append(("whose emblem is this?", caption, owner))
    return rows


def _train_reader(tokenizer, copy: bool, train, test, steps: int = 60) -> float:
    torch.manual_seed(0)
    model = ReaderModel(tiny_config(tokenizer, answers=ANSWERS, copy_from_context=copy))
    p = ReaderProcessor(
        tokenizer,
        None,
        max_question_length=8,
        max_caption_length=12,
        answers=ANSWERS if copy else None,
    )
    opt = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=3e-3)

    def batch(rows):
        b = p(
            None,
            [q for q, _, _ in rows],
            captions=[[c] for _, c, _ in rows],
            scores=[[1.0]] * len(rows),
        )
        return b, torch.zeros(len(rows), 4, 16)

    for step in range(steps):
        rows = train[(step * 32) % len(train) :][:32]
        b, feats = batch(rows)
        labels = torch.zeros(len(rows), len(ANSWERS))
        labels[range(len(rows)), [ANSWERS.index(a) for _, _, a in rows]] = 1.0
        loss = model(**b, visual_features=feats, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        b, feats = batch(test)
        pred = model(**b, visual_features=feats).logits.argmax(-1).tolist()
    return sum(ANSWERS[i] == a for i, (_, _, a) in zip(pred, test)) / len(test)


def test_the_pointer_reads_the_answer_the_plain_classifier_cannot():
    tokenizer = load_tokenizer("minilm")
    rng = random.Random(0)
    train, test = _reading_task(rng, 1920), _reading_task(rng, 200)
    with_copy = _train_reader(tokenizer, True, train, test)
    without = _train_reader(tokenizer, False, train, test)
    assert with_copy >= 0.9, (with_copy, without)
    assert without <= 0.3, (with_copy, without)


@pytest.mark.parametrize("k", [0, 2])
def test_every_parameter_gets_a_gradient_with_or_without_captions(tokenizer, k):
    """DDP needs a gradient for every trainable parameter in every batch, also one with no
    captions (k = 0) and so no answer to point at."""
    model = ReaderModel(tiny_config(tokenizer, answers=ANSWERS, copy_from_context=True))
    p = copy_processor(tokenizer)
    caps = [["the emblem of kavel", "salt"][:k]] * 2 if k else None
    batch = p(None, ["whose?", "what?"], captions=caps, scores=[[1.0] * k] * 2 if k else None)
    labels = torch.zeros(2, len(ANSWERS))
    model(**batch, visual_features=torch.randn(2, 4, 16), labels=labels).loss.backward()
    missing = [n for n, w in model.named_parameters() if w.requires_grad and w.grad is None]
    assert not missing, missing


def test_caption_words_go_through_the_answer_normalisation(tokenizer):
    """VQA answers are normalised ("2", no articles): caption words are too."""
    p = ReaderProcessor(tokenizer, None, max_caption_length=12, answers=["2", "beatles", "yes"])
    batch = p(None, ["how many?"], captions=[["two dogs and The Beatles"]])
    assert [(p.answers[a], t) for a, t in zip(*_row(p, batch))] == [
        ("2", "two"),
        ("beatles", "beatles"),
    ]


def test_multi_word_answer_cut_by_the_budget_is_not_marked(tokenizer):
    p = copy_processor(tokenizer, max_caption_length=4)
    # tokens: based in the new | york (cut): "new" is kept, the answer is not whole
    batch = p(None, ["where?"], captions=[["based in the new york"]])
    assert found(p, batch, 0) == []
    batch = p(None, ["where?"], captions=[["in new york"]])
    assert found(p, batch, 0) == [("new york", "new")]


def test_reader_whose_processor_has_other_answers_is_refused(tokenizer, tmp_path):
    from rvqa.errors import DataFormatError
    from rvqa.reader.auto import load_reader

    model = ReaderModel(tiny_config(tokenizer, answers=ANSWERS, copy_from_context=True))
    model.save_pretrained(tmp_path)
    ReaderProcessor(tokenizer, None, answers=ANSWERS[::-1]).save_pretrained(tmp_path)
    with pytest.raises(DataFormatError, match="differs from the model's"):
        load_reader(tmp_path)
    copy_processor(tokenizer).save_pretrained(tmp_path)
    loaded, processor = load_reader(tmp_path)
    assert processor.answers == list(loaded.config.answers) == ANSWERS


def _row(processor, batch, row: int = 0):
    ids, pos = batch["context_answers"][row].tolist(), batch["context_positions"][row].tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][row].tolist())
    kept = [(a, tokens[p]) for a, p in zip(ids, pos) if a >= 0]
    return [a for a, _ in kept], [t for _, t in kept]
