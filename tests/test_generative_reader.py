"""The generative reader (reader.type: generative): tokenizer, model, generation scores,
saving, training end to end, the RVQA API and ``rvqa ask`` / ``evaluate`` on its runs."""

from __future__ import annotations

import json

import pytest
import torch

from rvqa.data import load_image
from rvqa.errors import ConfigError, UsageError
from rvqa.reader.auto import load_reader, reader_type_of
from rvqa.reader.generative import GenerativeReaderModel
from rvqa.reader.generative_processing import (
    SPM_FILE,
    GenerativeReaderProcessor,
    answer_target,
    train_sentencepiece_tokenizer,
)
from rvqa.towers import small_cnn_processor
from tests.tiny import draw_shape

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square"]
TEXTS = (
    [f"what color is the {s}?" for s in SHAPES]
    + [f"is there a {c} shape?" for c in COLORS]
    + [f"a {c} {s}" for c in COLORS for s in SHAPES]
    + [f"a picture of a {c} {s}" for c in COLORS for s in SHAPES]
    + COLORS
    + SHAPES
    + ["yes", "no"]
)
TINY_T5 = {"t5_d_model": 32, "t5_num_layers": 1, "t5_num_heads": 2, "t5_d_ff": 64}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_sentencepiece_tokenizer(TEXTS, tmp_path_factory.mktemp("spm"), vocab_size=64)


def tiny_model(tokenizer, seed: int = 0, **kw) -> GenerativeReaderModel:
    torch.manual_seed(seed)
    opts = {
        "vision_backbone": "cnn",
        "cnn_hidden_sizes": [8, 16],
        "image_size": 32,
        "visual_grid": 2,
        "num_beams": 3,
        "max_answer_length": 4,
        **TINY_T5,
        **kw,
    }
    return GenerativeReaderModel.from_backbones(tokenizer=tokenizer, load_weights=False, **opts)


def processor_for(model, tokenizer) -> GenerativeReaderProcessor:
    return GenerativeReaderProcessor.from_config(model.config, tokenizer=tokenizer)


QUESTIONS = ["what color is the circle?", "what color is the square?", "is there a red shape?"]
CAPTIONS = [["a red circle", "a blue square"], ["a blue square"], []]
IMAGES = [("red", "circle"), ("blue", "square"), ("green", "circle")]


def batch(processor, answers=None):
    images = [draw_shape(c, s) for c, s in IMAGES]
    out = dict(processor(images, QUESTIONS, CAPTIONS))
    if answers is not None:
        out["labels"] = processor.labels(answers)
    return out


def overfit(model, processor, answers, steps: int = 40, lr: float = 3e-3) -> list[float]:
    """Fit one fixed batch (dropout off: memorising, not generalising, is the point)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    b = batch(processor, answers)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def inputs(b: dict) -> dict:
    return {k: v for k, v in b.items() if k != "labels"}


# ----------------------------------------------------------------------------- tokenizer


def test_sentencepiece_tokenizer_round_trips_and_saves(tokenizer, tmp_path):
    # T5's special tokens at T5's ids; no <s>.
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id is None and len(tokenizer) <= 64
    for text in ("a picture of a blue square", "is there a red shape?", "yellow"):
        ids = tokenizer(text).input_ids
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Words seen in training are single pieces (it learnt the task's vocabulary).
    assert tokenizer.tokenize("circle") == ["▁circle"]
    # Deterministic: the same text and seed give the same model file.
    a = train_sentencepiece_tokenizer(TEXTS * 3, tmp_path / "a", vocab_size=64, seed=1)
    b = train_sentencepiece_tokenizer(TEXTS * 3, tmp_path / "b", vocab_size=64, seed=1)
    import sentencepiece as spm

    pieces = [spm.SentencePieceProcessor(model_file=str(tmp_path / d / SPM_FILE)) for d in "ab"]
    assert [[(p.id_to_piece(i), p.get_score(i)) for i in range(len(p))] for p in pieces] == [
        [(pieces[0].id_to_piece(i), pieces[0].get_score(i)) for i in range(len(pieces[0]))]
    ] * 2
    assert a.get_vocab() == b.get_vocab()
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("a green circle?").input_ids == tokenizer("a green circle?").input_ids


def test_unseen_names_split_into_pieces_shared_with_training_names(tmp_path):
    # The knowledge task's text: cards naming invented entities. A name of another
    # assignment (never in training) must tokenize into multi-letter pieces that
    # training names share, not into single letters (which a unigram model trained on
    # such text did), and common words must stay whole.
    from rvqa.data import knowledge_assignment

    texts = [t for k in range(2, 12) for t in knowledge_assignment(k).facts()]
    texts += [e.name for k in range(2, 12) for e in knowledge_assignment(k).entities]
    tok = train_sentencepiece_tokenizer(texts, tmp_path, vocab_size=400, seed=0)
    assert "▁emblem" in tok.tokenize("the emblem of")
    unseen = [e.name for e in knowledge_assignment(1).entities]
    pieces = [tok.tokenize(n) for n in unseen]
    letters = sum(len(p.lstrip("▁")) for ps in pieces for p in ps)
    assert letters / sum(len(ps) for ps in pieces) >= 1.5, pieces[:3]  # unigram: 1.0
    for name in unseen:
        ids = tok(name).input_ids
        assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == name


def test_tokenizer_needs_text_and_a_large_enough_vocabulary(tmp_path):
    from rvqa.errors import DataFormatError

    with pytest.raises(DataFormatError, match="no text"):
        train_sentencepiece_tokenizer(["", "  "], tmp_path / "a")
    with pytest.raises(ConfigError, match="spm_vocab_size=5"):
        train_sentencepiece_tokenizer(TEXTS, tmp_path / "b", vocab_size=5)


def test_answer_target_is_the_most_common_normalised_answer():
    assert answer_target(["Two", "2", "two.", "three"]) == "2"
    assert answer_target(["red", "blue", "blue", "red"]) == "red"  # tie: the first
    assert answer_target(["a", "the"]) == "" and answer_target([]) == ""
    with pytest.raises(TypeError, match="list of strings"):
        answer_target("red")


# ----------------------------------------------------------------------------- processor


def test_processor_layout_and_caption_budget(tokenizer):
    model = tiny_model(tokenizer, max_question_length=16, max_caption_length=4)
    p = processor_for(model, tokenizer)

    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    b = p(None, ["is there a red shape?"], [["a red circle", "a blue square"]])
    want = (
        ids("question:")
        + ids("is there a red shape?")[:16]
        + ids("context:")
        + ids("a red circle")[:4]
        + ids(";")
        + ids("a blue square")[:4]
        + [tokenizer.eos_token_id]
    )
    assert b["input_ids"][0].tolist() == want
    assert p.decode([want]) == [
        "question: is there a red shape? context: a red circle ; a blue square"
    ]
    # k = max_captions always fits (longest captions); one more may not, and says so.
    k = p.max_captions()
    long = "a picture of a yellow square circle"
    assert len(ids(long)) > 4
    full = p(None, ["what color is the circle?"], [[long] * k])
    assert full["input_ids"].shape[1] <= p.max_input_length
    small = GenerativeReaderProcessor(
        tokenizer, max_question_length=8, max_caption_length=4, max_input_length=40
    )
    with pytest.raises(UsageError, match="max_input_length=40.*at most"):
        small(None, ["what color is the circle?"], [[long] * (small.max_captions() + 1)])
    with pytest.raises(ConfigError, match="max_input_length=5"):
        GenerativeReaderProcessor(tokenizer, max_question_length=8, max_input_length=5)


# ----------------------------------------------------------------------------- model


def test_loss_falls_until_greedy_generation_reproduces_the_targets(tokenizer):
    model = tiny_model(tokenizer)
    p = processor_for(model, tokenizer)
    answers = [["red", "red", "Red"], ["blue"], ["yes"]]
    losses = overfit(model, p, answers, steps=60)
    assert losses[-1] < 0.05 * losses[0], losses[::10]
    out = model.generate_answers(**inputs(batch(p)), num_beams=1)
    assert p.decode(out.sequences[:, 0]) == ["red", "blue", "yes"]
    assert (out.probs > 0.5).all() and (out.probs <= 1).all()


def test_beam_scores_are_sequence_probabilities_of_a_forward_pass(tokenizer):
    model = tiny_model(tokenizer, seed=1)
    p = processor_for(model, tokenizer)
    overfit(model, p, [["red"], ["blue"], ["yes"]], steps=8)  # peaked, but not one-hot
    b = inputs(batch(p))
    out = model.generate_answers(**b, num_return_sequences=3)
    assert out.sequences.shape[:2] == (3, 3)
    for i in range(3):
        probs = out.probs[i].tolist()
        assert probs == sorted(probs, reverse=True) and 0 < probs[-1] and sum(probs) <= 1 + 1e-5
        for j in range(3):
            seq = out.sequences[i, j, 1:].tolist()  # drop the decoder start
            if tokenizer.eos_token_id in seq:  # up to the first </s>; else max_answer_length + 1
                seq = seq[: seq.index(tokenizer.eos_token_id) + 1]
            one = {k: v[i : i + 1] for k, v in b.items()}
            loss = model(**one, labels=torch.tensor([seq])).loss  # mean token cross-entropy
            want = torch.exp(-loss * len(seq)).item()
            assert out.probs[i, j].item() == pytest.approx(want, rel=1e-4, abs=1e-7)
    # Greedy's answer is beam search's first when the model is this sure.
    greedy = model.generate_answers(**b, num_beams=1)
    assert p.decode(greedy.sequences[:, 0]) == p.decode(out.sequences[:, 0])
    with pytest.raises(UsageError, match="num_return_sequences=4.*num_beams=3"):
        model.generate_answers(**b, num_return_sequences=4)


def test_t5_dropout_sets_the_scratch_t5s_dropout_rate(tokenizer):
    answers = [["green"], ["square"], ["no"]]
    default = tiny_model(tokenizer).train()
    assert default.t5.config.dropout_rate == 0.1  # T5's default
    b = batch(processor_for(default, tokenizer), answers)
    assert default(**b).loss != default(**b).loss  # dropout draws differ
    model = tiny_model(tokenizer, t5_dropout=0.0).train()
    assert model.t5.config.dropout_rate == 0.0
    b = batch(processor_for(model, tokenizer), answers)
    assert model(**b).loss == model(**b).loss  # no dropout: training passes agree
    with pytest.raises(ConfigError, match=r"t5_dropout must be a number in \[0, 1\), got 1\.5"):
        tiny_model(tokenizer, t5_dropout=1.5)


def test_save_and_load_give_identical_generations(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    p = processor_for(model, tokenizer)
    overfit(model, p, [["green"], ["square"], ["no"]], steps=10)
    model.save_pretrained(tmp_path)
    p.save_pretrained(tmp_path)
    assert reader_type_of(tmp_path) == "generative"
    loaded, lp = load_reader(tmp_path)
    assert isinstance(loaded, GenerativeReaderModel) and isinstance(lp, GenerativeReaderProcessor)
    assert lp.max_input_length == p.max_input_length and lp.max_captions() == p.max_captions()
    b = inputs(batch(p))
    assert torch.equal(lp(None, QUESTIONS, CAPTIONS)["input_ids"], b["input_ids"])
    want = model.generate_answers(**b, num_return_sequences=2)
    got = loaded.eval().generate_answers(**b, num_return_sequences=2)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.log_probs, want.log_probs)
    assert lp.decode(got.sequences[:, 0]) == p.decode(want.sequences[:, 0])
    # A frozen image tower stays frozen through from_pretrained (transformers 5 loads
    # parameters with requires_grad=True).
    frozen = {n: q.requires_grad for n, q in model.named_parameters()}
    assert not any(v for n, v in frozen.items() if n.startswith("vision_model."))
    assert {n: q.requires_grad for n, q in loaded.named_parameters()} == frozen
    # The classifier's loader refuses the folder, naming the way to load it.
    from rvqa.reader.processing import ReaderProcessor

    with pytest.raises(ConfigError, match="generative.*load_reader"):
        ReaderProcessor.from_pretrained(tmp_path)


def test_checkpoint_backbone_loads_its_weights_and_tokenizer(tokenizer, tmp_path):
    """t5_backbone = a T5 checkpoint folder (a tiny random one here, never the hub)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(3)
    cfg = T5Config(
        vocab_size=len(tokenizer) + 4,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    ckpt = tmp_path / "tiny-t5"
    T5ForConditionalGeneration(cfg).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    model = GenerativeReaderModel.from_backbones(
        t5_backbone=str(ckpt), vision_backbone="cnn", cnn_hidden_sizes=[8, 16], image_size=32
    )
    saved = T5ForConditionalGeneration.from_pretrained(ckpt).state_dict()
    own = model.t5.state_dict()
    # every checkpoint weight loaded; the copy head (copy_from_context) is the only new part
    assert sorted(set(own) - set(saved)) == [
        "copy_gate.bias",
        "copy_gate.weight",
        "copy_key.weight",
        "copy_query.weight",
    ]
    for name, tensor in saved.items():
        assert torch.equal(own[name], tensor), name
    assert model.config.t5_config["d_model"] == 16  # the checkpoint's sizes, not t5_d_model
    p = GenerativeReaderProcessor.from_config(model.config)  # the checkpoint's tokenizer
    assert p.tokenizer("a red circle").input_ids == tokenizer("a red circle").input_ids
    out = model.eval().generate_answers(**inputs(batch(p)), num_return_sequences=2)
    assert out.probs.shape == (3, 2) and ((out.probs > 0) & (out.probs <= 1)).all()
    with pytest.raises(ConfigError, match="cannot load t5_backbone"):
        GenerativeReaderModel.from_backbones(
            t5_backbone=str(ckpt / "missing"), vision_backbone="cnn"
        )
    with pytest.raises(ConfigError, match="scratch.*tokenizer"):
        GenerativeReaderModel.from_backbones(vision_backbone="cnn")


# ----------------------------------------------------------------------------- a whole run


def _generative_overrides() -> dict:
    return {
        "reader.type": "generative",
        "reader.num_beams": 2,
        "reader.max_answer_length": 4,
        "reader.max_input_length": 64,
        "reader.spm_vocab_size": 120,
        "reader.learning_rate": 3e-3,
        "reader.max_steps": 4,
        **{f"reader.{k}": v for k, v in TINY_T5.items()},
    }


@pytest.fixture(scope="module")
def generative_run(tmp_path_factory):
    """A tiny easy-vqa run whose reader is generative (scratch T5 + SentencePiece)."""
    from tests.tiny import build_tiny_run

    root = tmp_path_factory.mktemp("generative")
    return build_tiny_run(root, **_generative_overrides())


def test_train_reader_writes_a_loadable_generative_run(generative_run):
    run = json.loads((generative_run / "rvqa_run.json").read_text())
    model_dir = generative_run / run["reader"]
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == (
        "rvqa-generative-reader"
    )
    for f in ("model.safetensors", "tokenizer.json", SPM_FILE, "reader_processor.json"):
        assert (model_dir / f).is_file(), f
    result = json.loads((generative_run / "reader" / "train_result.json").read_text())
    assert result["steps"] == 4 and result["metric"] == "accuracy"
    assert 0 <= result["best_metric"] <= 100 and result["history"]


@pytest.fixture(scope="module")
def rvqa_model(generative_run):
    from rvqa import RVQA

    return RVQA.from_pretrained(generative_run, device="cpu")


def test_rvqa_answers_with_sequence_probability_and_evidence(rvqa_model):
    import easy_vqa

    image = easy_vqa.get_test_image_paths()[0]
    model = rvqa_model
    assert model.generative and model.answers is None
    assert model.image_tower_shared  # its features read off the retriever's tower pass
    out = model.answer(image, "what color is the shape?", num_alternatives=1)
    assert isinstance(out.answer, str) and 0 < out.score <= 1
    assert len(out.evidence) == 2 and all(e.text for e in out.evidence)
    assert len(out.alternatives) <= 1  # num_beams = 2: at most one other beam
    assert all(0 < s <= out.score for _, s in out.alternatives)
    assert out.empty == (out.answer == "")
    # Same as the reader's own generation on the same inputs (its own tower run).
    p = model.processor
    b = p(None, [out.question], [[e.text for e in out.evidence]])
    pixels = p.image_processor(images=[load_image(image)], return_tensors="pt")["pixel_values"]
    gen = model.reader.generate_answers(**b, pixel_values=pixels, num_beams=2)
    assert p.decode(gen.sequences[:, 0]) == [out.answer]
    assert gen.probs[0, 0].item() == pytest.approx(out.score, rel=1e-4)
    # Swapping indices: the evidence follows the index.
    ev = model.retrieve([image], top_k=1)
    assert len(ev[0]) == 1
    none = model.answer(image, "what color is the shape?", index=None)
    assert none.evidence == [] and 0 < none.score <= 1


def test_top_k_beyond_the_input_length_is_refused(rvqa_model):
    import easy_vqa

    model = rvqa_model
    k = model.max_top_k
    assert k == model.processor.max_captions() and k >= 2
    image = easy_vqa.get_test_image_paths()[0]
    with pytest.raises(UsageError, match=rf"top_k={k + 1} .*max_input_length=64"):
        model.answer(image, "what color is the shape?", top_k=k + 1)


def test_training_refuses_a_top_k_that_does_not_fit(tmp_path):
    from rvqa.reader.train import build_reader
    from tests.tiny import tiny_run_config

    cfg = tiny_run_config(
        tmp_path,
        **{**_generative_overrides(), "reader.top_k": 50, "reader.vision_backbone": "cnn"},
    )
    tok = train_sentencepiece_tokenizer(TEXTS, tmp_path / "spm", vocab_size=64)
    with pytest.raises(ConfigError, match="reader.top_k=50 .*max_input_length=64"):
        build_reader(cfg, None, tokenizer=tok)


def test_empty_generation_is_reported(rvqa_model, tokenizer, caplog):
    """A reader that learnt to answer nothing: "" with its probability, flagged everywhere."""
    import copy

    import easy_vqa

    from rvqa.cli import _format_answer

    model = copy.copy(rvqa_model)  # the module's model stays as trained
    model.reader = copy.deepcopy(rvqa_model.reader)
    p = model.processor
    image = easy_vqa.get_test_image_paths()[0]
    question = "what color is the shape?"
    pixels = p.image_processor(images=[load_image(image)], return_tensors="pt")["pixel_values"]
    b = {**p(None, [question]), "pixel_values": pixels, "labels": p.labels([["a", "the"]])}
    assert b["labels"].tolist() == [[p.eos_id]]  # answers that normalise to nothing
    opt = torch.optim.AdamW(model.reader.parameters(), lr=1e-2)
    model.reader.train()
    for _ in range(30):
        loss = model.reader(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.reader.eval()
    with caplog.at_level("WARNING"):
        out = model.answer(image, question, index=None)
    assert out.answer == "" and out.empty and 0 < out.score <= 1
    assert "empty answer to 1 of 1 question(s)" in caplog.text  # one line per call
    assert out.to_dict()["empty"] is True and out.to_dict()["answer"] == ""
    assert "(empty answer" in _format_answer(out, retrieval=False)


def test_cli_ask_and_evaluate_on_a_generative_run(generative_run, rvqa_model, tmp_path, capsys):
    import easy_vqa

    from rvqa.cli import main

    image = easy_vqa.get_test_image_paths()[0]
    capsys.readouterr()
    assert main(["ask", "--model", str(generative_run), "--image", image,
                 "--question", "what color is the shape?", "--json", "--device", "cpu"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    want = rvqa_model.answer(image, "what color is the shape?")
    assert data["answer"] == want.answer and data["empty"] is want.empty
    assert data["score"] == pytest.approx(want.score, rel=1e-4)

    from rvqa.config import load_config
    from rvqa.data import load_vqa
    from rvqa.evaluation import evaluate_run
    from rvqa.metrics import evaluate_vqa

    records = list(load_vqa(load_config(None).data, "test"))[:12]
    run = evaluate_run(rvqa_model, records, out_dir=tmp_path, show_progress=False)
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert len(preds) == 12 and all(isinstance(p["answer"], str) for p in preds)
    assert preds[0]["answer"] == rvqa_model.answer(records[0].image, records[0].question).answer
    assert run.accuracy.overall == evaluate_vqa(preds, records).overall


def test_generative_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    """The shared loop's resume: the tokenizer is reused and the losses continue exactly."""
    from rvqa.indexing import build_index_from_config
    from rvqa.reader.train import train_reader
    from rvqa.retriever.train import train_retriever
    from rvqa.run_layout import retriever_dir
    from tests.tiny import interrupted_after_checkpoint, tiny_run_config

    kw = {**_generative_overrides(), "reader.checkpoint_every": 2, "reader.eval_every": 0}
    cfg = tiny_run_config(tmp_path, **kw)
    train_retriever(cfg)
    build_index_from_config(cfg)
    full = train_reader(cfg)["result"]
    # The interrupted run: another folder, the same retriever (linked).
    other = tiny_run_config(tmp_path, **kw)
    other.output_dir = str(tmp_path / "b")
    src = retriever_dir(cfg.output_dir)
    (tmp_path / "b" / "retriever").mkdir(parents=True)
    (tmp_path / "b" / "retriever" / src.name).symlink_to(src, target_is_directory=True)
    with interrupted_after_checkpoint(monkeypatch, 2):
        train_reader(other)
    spm_file = tmp_path / "b" / "reader" / "tokenizer" / SPM_FILE
    spm_bytes = spm_file.read_bytes()
    resumed = train_reader(other, resume=True)["result"]
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5, abs=1e-6)
    assert spm_file.read_bytes() == spm_bytes  # reused, not retrained


def test_processor_for_the_scratch_backbone_needs_the_tokenizer(tokenizer):
    model = tiny_model(tokenizer)
    with pytest.raises(ConfigError, match="scratch.*tokenizer="):
        GenerativeReaderProcessor.from_config(model.config)
    p = GenerativeReaderProcessor.from_config(
        model.config, tokenizer=tokenizer, image_processor=small_cnn_processor(32)
    )
    assert p.max_question_length == model.config.max_question_length


# --------------------------------------------------------------------------- copy head


def _copy_t5(seed: int = 0, vocab: int = 24, d: int = 16):
    from transformers import T5Config

    from rvqa.reader.generative import CopyT5ForConditionalGeneration, scratch_t5_config

    torch.manual_seed(seed)
    cfg = T5Config.from_dict(scratch_t5_config(vocab, d, 1, 2, 32))
    cfg.dropout_rate = 0.0
    return CopyT5ForConditionalGeneration(cfg).eval()


def test_copy_head_is_the_pointer_generator_mixture():
    """p(w) = g·softmax(lm)(w) + (1−g)·Σ_{i: id_i = w} a_i, written out with loops."""
    from transformers import T5ForConditionalGeneration

    from rvqa.reader.generative import NO_COPY

    model = _copy_t5()
    # the head's own init survives T5's post_init (std 1 would saturate the pointer)
    assert 0.1 < model.copy_query.weight.std() * 16**0.5 < 2
    assert float(model.copy_gate.bias) == 0.0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 24, (2, 7), generator=g)
    ids[0, 1] = ids[0, 4]  # a token at two positions: both pointer weights go to it
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    copy_ids = ids.masked_fill(mask == 0, NO_COPY)
    copy_ids[0, 0] = NO_COPY  # e.g. a visual token
    labels = torch.randint(3, 24, (2, 3), generator=g)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, copy_ids=copy_ids)
    plain = T5ForConditionalGeneration.forward(
        model, input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True
    )
    dec = plain.decoder_hidden_states[-1]
    enc = plain.encoder_last_hidden_state
    p_vocab = plain.logits.softmax(-1)
    want = torch.zeros_like(p_vocab)
    for b in range(2):
        for t in range(3):
            q = model.copy_query(dec[b, t])
            scores = [
                float(q @ model.copy_key(enc[b, i])) / 16**0.5 if copy_ids[b, i] >= 0 else None
                for i in range(7)
            ]
            valid = torch.tensor([s for s in scores if s is not None])
            att = iter(valid.softmax(0).tolist())
            gate = torch.sigmoid(model.copy_gate(dec[b, t]))[0]
            want[b, t] = gate * p_vocab[b, t]
            for i, s in enumerate(scores):
                if s is not None:
                    want[b, t, copy_ids[b, i]] += (1 - gate) * next(att)
    got = out.logits.exp()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(2, 3), atol=1e-5)
    nll = -want.log().gather(-1, labels[..., None]).mean()
    assert torch.allclose(out.loss, nll, atol=1e-5)
    # without copy_ids it is the plain T5 (same loss as T5's own forward)
    assert torch.allclose(model(input_ids=ids, attention_mask=mask, labels=labels).loss, plain.loss)
    with pytest.raises(ValueError, match="one id per encoder position"):
        model(input_ids=ids, attention_mask=mask, labels=labels, copy_ids=copy_ids[:, :3])
    # a row with nothing to copy: the vocabulary distribution alone, still normalised
    none = copy_ids.clone()
    none[1] = NO_COPY
    got = model(input_ids=ids, attention_mask=mask, labels=labels, copy_ids=none).logits.exp()
    assert torch.allclose(got.sum(-1), torch.ones(2, 3), atol=1e-5)
    assert torch.allclose(got[1], p_vocab[1], atol=1e-6)
    # under bf16 autocast the head and the mixture stay float32 (normalised to 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = model(input_ids=ids, attention_mask=mask, labels=labels, copy_ids=copy_ids).logits
    assert bf.dtype == torch.float32
    assert torch.allclose(bf.exp().sum(-1), torch.ones(2, 3), atol=1e-5)


def test_a_reader_saved_without_the_copy_option_loads_without_a_head(tokenizer, tmp_path):
    """Readers saved before copy_from_context existed load as trained (no random head)."""
    from transformers import T5ForConditionalGeneration

    from rvqa.reader.generative import CopyT5ForConditionalGeneration

    model = tiny_model(tokenizer, copy_from_context=False)
    model.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    cfg.pop("copy_from_context")
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    old = GenerativeReaderModel.from_pretrained(tmp_path / "old")
    assert not old.config.copy_from_context and type(old.t5) is T5ForConditionalGeneration
    assert isinstance(tiny_model(tokenizer).t5, CopyT5ForConditionalGeneration)  # the default


def test_copy_head_learns_to_copy_and_generate_passes_copy_ids_to_every_beam():
    """Answer = the token after a marker in a random sequence; held-out sequences are
    answered by greedy and beam search (copy_ids expanded per beam by generate)."""
    model = _copy_t5(seed=0, d=32).train()
    g = torch.Generator().manual_seed(0)
    marker = 3

    def make(n):
        ids = torch.randint(4, 24, (n, 8), generator=g)
        pos = torch.randint(0, 7, (n,), generator=g)
        ids[torch.arange(n), pos] = marker
        answer = ids[torch.arange(n), pos + 1]
        return ids, torch.stack([answer, torch.ones_like(answer)], 1)  # answer </s>

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        ids, labels = make(64)
        loss = model(input_ids=ids, labels=labels, copy_ids=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.1 * sum(losses[:10])
    model.eval()
    ids, labels = make(200)
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, copy_ids=ids, max_new_tokens=2, do_sample=False)
        beams = model.generate(
            input_ids=ids, copy_ids=ids, max_new_tokens=2, do_sample=False, num_beams=3
        )
    for out in (greedy, beams):
        accuracy = (out[:, 1] == labels[:, 0]).float().mean().item()
        assert accuracy >= 0.9, accuracy


def test_tokenizer_training_text_is_the_text_read_at_its_frequencies():
    """Per question: the prompt words, the question, its top_k captions and its target,
    rewritten into the question's world of each epoch (ReaderDataset's choice)."""
    from types import SimpleNamespace

    from rvqa.reader.augmentation import TermWorlds
    from rvqa.reader.generative_processing import tokenizer_training_text

    recs = [
        SimpleNamespace(
            question_id=i,
            image=f"im{i % 2}",
            question="whose emblem is this?",
            answers=["kavelo"] * 10,
        )
        for i in range(6)
    ]
    retrieved = {
        "im0": [("the red circle is the emblem of kavelo.", 0.9), ("other card", 0.5)],
        "im1": [("the blue circle is the emblem of kavelo.", 0.8), ("other card", 0.4)],
    }
    texts = tokenizer_training_text(recs, retrieved, lambda r: r.image, top_k=1)
    assert texts.count("question: context: ;") == 6  # once per question, not deduplicated
    assert texts.count("whose emblem is this?") == 6 and texts.count("kavelo") == 6
    assert "other card" not in texts  # beyond top_k: never read
    worlds = TermWorlds([{"kavelo": "bamoke"}, {"kavelo": "fudito"}])
    texts = tokenizer_training_text(
        recs, retrieved, lambda r: r.image, worlds=worlds, top_k=1, seed=3, epochs=2
    )
    want = [
        worlds.rewrite("kavelo", worlds.world_for(f"{i}@{e}", 3))
        for i in range(6)
        for e in range(2)
    ]
    assert [t for t in texts if t in {"kavelo", "bamoke", "fudito"}] == want
    assert len(texts) == 6 * 2 * 4
    # beyond max_sentences: an even sample of the questions, first to last
    many = [
        SimpleNamespace(question_id=i, image="im0", question=f"question {i}?", answers=["x"])
        for i in range(40)
    ]
    texts = tokenizer_training_text(many, retrieved, lambda r: r.image, max_sentences=40, top_k=1)
    asked = [t for t in texts if t.startswith("question ")]
    assert asked == [f"question {i}?" for i in range(0, 40, 4)]


def test_the_generative_reader_answers_under_bf16(generative_run):
    """Beam search runs under bfloat16 autocast; the answer is a string with a probability."""
    import easy_vqa

    from rvqa import RVQA
    from rvqa.distributed import bf16_supported

    if not bf16_supported("cpu"):
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    model = RVQA.from_pretrained(generative_run, device="cpu", precision="bf16")
    image = easy_vqa.get_test_image_paths()[0]
    out = model.answer(image, "what color is the shape?")
    assert isinstance(out.answer, str) and 0.0 <= out.score <= 1.0
    assert out.evidence and len(out.alternatives) <= model.reader.config.num_beams - 1
