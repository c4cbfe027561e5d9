"""The multimodal reader: config, model and input processing (tiny random backbones)."""

from __future__ import annotations

import logging

import pytest
import torch

from rvqa.reader.configuration import ReaderConfig
from rvqa.reader.modeling import ReaderModel, ReaderOutput
from rvqa.reader.processing import ReaderProcessor
from rvqa.towers import load_tokenizer, small_cnn_processor
from rvqa.towers.cnn import SmallCNNConfig, SmallCNNModel
from tests.tiny import draw_shape, tiny_text_backbone, tiny_vit_config

ANSWERS = ["yes", "no", "red", "blue", "green", "circle", "square"]
QUESTIONS = ["what color is the shape?", "is there a circle?", "what shape is it?"]
CAPTIONS = [
    ["a red circle", "a picture of a red circle", "a blue square", "a green circle", "red"],
    ["a blue circle"],
    [],
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def tiny_config(tokenizer, **kw) -> ReaderConfig:
    text = {
        "model_type": "bert",
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "max_position_embeddings": 128,
    }
    vision = {"model_type": "rvqa-small-cnn", "hidden_sizes": [8, 16], "grid_size": 2}
    kw = {"image_size": 32, "visual_grid": 2, "max_visual_tokens": 8, "answers": ANSWERS, **kw}
    return ReaderConfig(text_config=text, vision_config=vision, classifier_hidden=24, **kw)


def tiny_model(tokenizer, seed: int = 0, **kw) -> ReaderModel:
    torch.manual_seed(seed)
    return ReaderModel(tiny_config(tokenizer, **kw)).eval()


@pytest.fixture
def processor(tokenizer):
    return ReaderProcessor(
        tokenizer, small_cnn_processor(32), max_question_length=8, max_caption_length=5
    )


def images(n: int):
    colors = ["red", "blue", "green", "yellow"]
    return [draw_shape(colors[i % 4], "circle" if i % 2 else "square") for i in range(n)]


def batch_with_k(processor, k: int):
    caps = [[f"a picture of a {c} shape" for c in ["red", "blue", "green", "red", "blue"][:k]]] * 3
    scores = [[0.9 - 0.1 * j for j in range(k)]] * 3
    return processor(images(3), QUESTIONS, caps if k else None, scores if k else None)


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("k", [0, 1, 5])
def test_output_shapes_for_k(tokenizer, processor, k):
    model = tiny_model(tokenizer)
    batch = batch_with_k(processor, k)
    # [CLS] question [SEP] + k × (caption + [SEP]); the question is never cut here
    q_len = max(len(tokenizer.tokenize(q)) for q in QUESTIONS)
    assert batch["input_ids"].shape[1] == q_len + 2 + k * 6
    assert int(batch["caption_index"].max()) == k - 1
    labels = torch.zeros(3, len(ANSWERS))
    out = model(**batch, labels=labels)
    assert isinstance(out, ReaderOutput)
    assert out.logits.shape == (3, len(ANSWERS))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_loss_is_summed_over_answers_and_averaged_over_batch(tokenizer, processor):
    model = tiny_model(tokenizer)
    batch = batch_with_k(processor, 2)
    labels = torch.rand(3, len(ANSWERS))
    out = model(**batch, labels=labels)
    p = torch.sigmoid(out.logits)
    manual = -(labels * p.log() + (1 - labels) * (1 - p).log()).sum(1).mean()
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-5)


def test_k0_is_plain_question_and_image(tokenizer, processor):
    none = processor(images(2), QUESTIONS[:2])
    empty = processor(images(2), QUESTIONS[:2], [[], []], [[], []])
    assert torch.equal(none["input_ids"], empty["input_ids"])
    assert (none["caption_index"] == -1).all() and (none["token_type_ids"] == 0).all()
    assert empty["caption_scores"].shape == (2, 0)
    model = tiny_model(tokenizer)
    torch.testing.assert_close(model(**none).logits, model(**empty).logits)


def test_padding_does_not_change_predictions(tokenizer, processor):
    model = tiny_model(tokenizer)
    scores = [[0.9 - 0.1 * j for j in range(len(c))] for c in CAPTIONS]
    batch = processor(images(3), QUESTIONS, CAPTIONS, scores)
    together = model(**batch).logits
    for i in range(3):
        alone = processor(
            images(3)[i : i + 1], QUESTIONS[i : i + 1], CAPTIONS[i : i + 1], [scores[i]]
        )
        assert alone["input_ids"].shape[1] <= batch["input_ids"].shape[1]
        torch.testing.assert_close(model(**alone).logits[0], together[i], rtol=1e-4, atol=1e-5)


def test_loss_decreases_on_fixed_batch(tokenizer, processor):
    model = tiny_model(tokenizer).train()
    batch = batch_with_k(processor, 2)
    labels = torch.zeros(3, len(ANSWERS))
    labels[0, 2], labels[1, 0], labels[2, 5], labels[2, 6] = 1.0, 1.0, 0.667, 0.333
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("k", [0, 2])
def test_every_parameter_gets_a_gradient(tokenizer, processor, k):
    # DistributedDataParallel (default settings) fails on parameters without gradients.
    model = tiny_model(tokenizer).train()
    batch = batch_with_k(processor, k)
    model(**batch, labels=torch.ones(3, len(ANSWERS))).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_save_load_gives_identical_logits(tokenizer, processor, tmp_path):
    model = tiny_model(tokenizer, top_k=3, soft_target_rule="loo")
    batch = batch_with_k(processor, 3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = ReaderModel.from_pretrained(tmp_path).eval()
    assert loaded.config.answers == ANSWERS and loaded.config.num_answers == len(ANSWERS)
    assert loaded.config.top_k == 3 and loaded.config.soft_target_rule == "loo"
    assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_retrieval_scores_change_logits_only_when_used(tokenizer, processor):
    caps = [["a red circle", "a blue square"]] * 3
    high = processor(images(3), QUESTIONS, caps, [[0.9, 0.8]] * 3)
    low = processor(images(3), QUESTIONS, caps, [[0.1, -0.2]] * 3)
    assert torch.equal(high["input_ids"], low["input_ids"])
    model = tiny_model(tokenizer)
    assert not torch.allclose(model(**high).logits, model(**low).logits, atol=1e-6)

    blind = tiny_model(tokenizer, use_retrieval_scores=False)
    assert blind.score_embedding is None
    no_scores = {k: v for k, v in high.items() if k != "caption_scores"}
    torch.testing.assert_close(blind(**high).logits, blind(**low).logits, rtol=0, atol=0)
    torch.testing.assert_close(blind(**high).logits, blind(**no_scores).logits, rtol=0, atol=0)


def test_from_backbones_loads_pretrained_text_weights(tmp_path):
    from transformers import BertModel

    from rvqa.config import ReaderSettings

    path = tiny_text_backbone(tmp_path)
    kw = dict(
        text_backbone=str(path),
        vision_backbone="cnn",
        image_size=32,
        visual_grid=2,
        max_question_length=8,
    )
    settings = ReaderSettings(**kw, learning_rate=0.5)  # training fields are not read
    model = ReaderModel.from_backbones(ANSWERS, settings, cnn_hidden_sizes=[8, 16])
    pretrained = BertModel.from_pretrained(path)
    for name, tensor in pretrained.state_dict().items():
        if not name.startswith("pooler"):
            assert torch.equal(model.text_model.state_dict()[name], tensor), name
    assert model.config.max_question_length == 8 and model.config.vision_backbone == "cnn"
    assert model.config.vision_config["grid_size"] == 2

    # Reuse an existing image tower (the retriever's): its config and weights.
    torch.manual_seed(1)
    tower = SmallCNNModel(SmallCNNConfig(hidden_sizes=[8, 16], grid_size=4))
    reused = ReaderModel.from_backbones(
        ANSWERS, vision_tower=tower, **{**kw, "vision_backbone": "retriever"}
    )
    for name, tensor in tower.state_dict().items():
        assert torch.equal(reused.vision_model.state_dict()[name], tensor), name
    assert reused.config.vision_config["grid_size"] == 2  # the reader's grid

    processor = ReaderProcessor.from_config(reused.config)
    batch = processor(images(2), QUESTIONS[:2], [["a red circle"], []], [[0.5], []])
    assert reused.eval()(**batch).logits.shape == (2, len(ANSWERS))

    with pytest.raises(TypeError, match="unknown reader option"):
        ReaderModel.from_backbones(ANSWERS, text_backbone=str(path), num_layers=1)
    with pytest.raises(ValueError, match="vision_tower"):
        ReaderModel.from_backbones(ANSWERS, **{**kw, "vision_backbone": "retriever"})


def test_vit_tower_patches_pooled_to_grid(tokenizer, processor):
    vit = tiny_vit_config().to_dict()  # 4 × 4 patches + CLS
    config = tiny_config(tokenizer, visual_grid=2)
    config.vision_config = vit
    torch.manual_seed(0)
    model = ReaderModel(config).eval()
    batch = batch_with_k(processor, 1)
    visual = model.embed_image(batch["pixel_values"])
    assert visual.shape == (3, 1 + 2 * 2, 32)  # CLS + 2 × 2 pooled patches
    assert model(**batch).logits.shape == (3, len(ANSWERS))
    config.visual_grid = None  # keep all 17 tokens: more than max_visual_tokens=8
    with pytest.raises(ValueError, match="max_visual_tokens"):
        model.embed_image(batch["pixel_values"])


# ----------------------------------------------------------------------------- processor


def test_question_survives_very_long_captions(tokenizer, processor):
    question = "what color is the big shape?"  # 7 tokens: within its budget of 8
    long_caption = " ".join(["a very long caption about many different red things"] * 20)
    batch = processor(images(1), [question], [[long_caption] * 5], [[0.5] * 5])
    ids = batch["input_ids"][0].tolist()
    sep = ids.index(tokenizer.sep_token_id)
    assert tokenizer.decode(ids[1:sep]) == question
    per_caption = torch.bincount(batch["caption_index"][0][batch["caption_index"][0] >= 0])
    assert per_caption.tolist() == [processor.max_caption_length + 1] * 5
    assert len(ids) == 1 + sep + 5 * (processor.max_caption_length + 1)


def test_long_question_truncated_to_its_own_budget_with_warning(processor, caplog):
    question = "is the shape in the upper left corner of the picture a red or a blue one?"
    with caplog.at_level(logging.WARNING, logger="rvqa.reader.processing"):
        batch = processor(None, [question, question], [["a red circle"]] * 2)
        processor(None, [question], [["a red circle"]])
    q_tokens = (batch["caption_index"][0] == -1) & (batch["attention_mask"][0] == 1)
    assert int(q_tokens.sum()) == processor.max_question_length + 2
    assert len([r for r in caplog.records if "truncated" in r.message]) == 1
    assert "pixel_values" not in batch


def test_variable_caption_counts_are_padded(tokenizer, processor):
    scores = [[0.9, 0.8, 0.7, 0.6, 0.5], [0.4], []]
    batch = processor(images(3), QUESTIONS, CAPTIONS, scores)
    assert batch["caption_scores"].shape == (3, 5)
    torch.testing.assert_close(batch["caption_scores"][1], torch.tensor([0.4, 0, 0, 0, 0]))
    mask, index, types = batch["attention_mask"], batch["caption_index"], batch["token_type_ids"]
    for i, caps in enumerate(CAPTIONS):
        real = index[i][mask[i] == 1]
        assert sorted(set(real.tolist()) - {-1}) == list(range(len(caps)))
        assert (index[i][mask[i] == 0] == -1).all() and (types[i][mask[i] == 0] == 0).all()
        assert torch.equal(types[i][mask[i] == 1] == 1, real >= 0)
    assert (batch["input_ids"][2][mask[2] == 0] == tokenizer.pad_token_id).all()


def test_each_distinct_string_is_tokenised_once(tokenizer):
    calls = []

    class CountingTokenizer:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, **kw):
            calls.append(list(texts))
            return tokenizer(texts, **kw)

    proc = ReaderProcessor(CountingTokenizer(), None, max_question_length=8, max_caption_length=5)
    questions = ["what color?", "what shape?"] * 32
    captions = [["a red circle", "a blue square"]] * 64
    first = proc(None, questions, captions)
    second = proc(None, questions, captions)
    assert calls == [["what color?", "what shape?"], ["a red circle", "a blue square"]]
    assert torch.equal(first["input_ids"], second["input_ids"])

    small = ReaderProcessor(
        tokenizer, None, max_question_length=8, max_caption_length=5, cache_size=3
    )
    small(None, ["is it red?"], [["x", "y"]])
    assert torch.equal(small(None, questions, captions)["input_ids"], first["input_ids"])
    assert len(small._ids) <= 4


def test_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = ReaderProcessor.from_pretrained(tmp_path)
    assert (loaded.max_question_length, loaded.max_caption_length) == (8, 5)
    scores = [[0.9, 0.8, 0.7, 0.6, 0.5], [0.4], []]
    a = processor(images(3), QUESTIONS, CAPTIONS, scores)
    b = loaded(images(3), QUESTIONS, CAPTIONS, scores)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="reader_processor.json"):
        ReaderProcessor.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("question", ["", "   ", "\x00\x01"])
def test_question_without_tokens_is_an_error(processor, question):
    with pytest.raises(ValueError, match="no tokens") as err:
        processor(None, ["what color?", question])
    assert repr(question) in str(err.value)


def test_processor_rejects_bad_inputs(processor):
    with pytest.raises(TypeError, match="list of strings"):
        processor(None, "what color?")
    with pytest.raises(TypeError, match="question 1"):
        processor(None, ["what color?", 3])
    with pytest.raises(ValueError, match="2 captions but 1 scores"):
        processor(None, ["q?"], [["a", "b"]], [[0.5]])
    with pytest.raises(ValueError, match="one list of strings per question"):
        processor(None, ["q?", "r?"], [["a"]])
    with pytest.raises(TypeError, match="got a string"):
        processor(None, ["q?"], ["a red circle"])
    with pytest.raises(ValueError, match="finite"):
        processor(None, ["q?"], [["a"]], [[float("nan")]])
    with pytest.raises(ValueError, match="without captions"):
        processor(None, ["q?"], None, [[0.5]])
    with pytest.raises(ValueError, match="1 images for 2 questions"):
        processor(images(1), ["q?", "r?"])
    with pytest.raises(ValueError, match="not both"):
        processor(images(1), ["q?"], pixel_values=torch.zeros(1, 3, 32, 32))


def test_model_rejects_bad_inputs(tokenizer, processor):
    model = tiny_model(tokenizer)
    batch = dict(batch_with_k(processor, 2))
    with pytest.raises(ValueError, match="shape \\(batch, num_answers\\)"):
        model(**batch, labels=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="no caption_scores"):
        model(**{k: v for k, v in batch.items() if k != "caption_scores"})
    with pytest.raises(ValueError, match="pixel_values"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:2]})
    with pytest.raises(ValueError, match="only 1 columns"):
        model(**{**batch, "caption_scores": batch["caption_scores"][:, :1]})
    with pytest.raises(TypeError, match="input_ids"):
        model(**{**batch, "input_ids": batch["input_ids"].tolist()})
    long = torch.ones(3, 200, dtype=torch.long)
    with pytest.raises(ValueError, match="128 positions"):
        model(pixel_values=batch["pixel_values"], input_ids=long)


def test_config_rejects_bad_values(tokenizer):
    with pytest.raises(ValueError, match="soft_target_rule"):
        tiny_config(tokenizer, soft_target_rule="min2")
    with pytest.raises(ValueError, match="top_k"):
        tiny_config(tokenizer, top_k=-1)
    with pytest.raises(ValueError, match="unique"):
        ReaderConfig(answers=["yes", "yes"])
    config = tiny_config(tokenizer)
    config.answers = []
    with pytest.raises(ValueError, match="answers is empty"):
        ReaderModel(config)
    with pytest.raises(ValueError, match="text_config and vision_config"):
        ReaderModel(ReaderConfig(answers=["yes"]))
