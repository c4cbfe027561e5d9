"""One default per setting: run settings against the model configs that also hold them.

The fields are found by introspection (the settings dataclasses' fields against the
``__init__`` parameters of the model configs and the reader's processor), so a field
added on both sides is checked without editing this file.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import torch

import rvqa.reader.modeling as reader_modeling
import rvqa.retriever.modeling as retriever_modeling
from rvqa.config import ReaderSettings, RerankerSettings, RetrieverSettings
from rvqa.pipeline import RVQA
from rvqa.reader.configuration import GenerativeReaderConfig, ReaderConfig
from rvqa.reader.generative_processing import GenerativeReaderProcessor
from rvqa.reader.modeling import ReaderModel
from rvqa.reader.processing import ReaderProcessor
from rvqa.retriever.configuration import RetrieverConfig
from rvqa.retriever.losses import retrieval_loss
from rvqa.retriever.modeling import RetrieverModel
from rvqa.retriever.reranker import RerankerConfig
from tests.tiny import draw_shape, tiny_text_backbone, tiny_vit_config

ANSWERS = ["red", "blue", "circle"]

# (settings class, class that reads the setting): the pairs that share fields.
PAIRS = [
    (RetrieverSettings, RetrieverConfig),
    (ReaderSettings, ReaderConfig),
    (ReaderSettings, ReaderProcessor),
    (ReaderSettings, GenerativeReaderConfig),
    (ReaderSettings, GenerativeReaderProcessor),
    (RerankerSettings, RerankerConfig),
]

# Intended differences between a settings default and the other side's default.
ALLOWED_DIFFERENCES = {
    (RetrieverSettings, RetrieverConfig, "loss_weights"): (
        "one value, two spellings: no weights is the settings' {} (a dataclass field "
        "cannot default to a shared dict) and the config's None (a mutable default argument)"
    ),
    (ReaderSettings, ReaderConfig, "vision_backbone"): (
        "provenance of the image weights: a run reuses the trained retriever's tower "
        "('retriever'); a ReaderConfig built by hand has no such tower, so its default "
        "is 'cnn' (from scratch)"
    ),
    (ReaderSettings, GenerativeReaderConfig, "vision_backbone"): (
        "as ReaderConfig's: a GenerativeReaderConfig built by hand has no retriever tower"
    ),
    (ReaderSettings, ReaderConfig, "copy_from_context"): (
        "a new run gets the extractive pointer (True); a config saved before the option "
        "existed has no key and must load as the classifier it was trained as (False)"
    ),
    (ReaderSettings, GenerativeReaderConfig, "copy_from_context"): (
        "a new run gets the copy head (True); a config saved before the option existed "
        "has no key and must load as the plain T5 it was trained as (False)"
    ),
}


def _settings_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _init_defaults(cls: type) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _shared(settings_cls: type, other: type) -> list[str]:
    return sorted(set(_settings_defaults(settings_cls)) & set(_init_defaults(other)))


@pytest.mark.parametrize(
    "settings_cls, other", PAIRS, ids=[f"{s.__name__}-{o.__name__}" for s, o in PAIRS]
)
def test_no_setting_has_two_defaults(settings_cls, other):
    shared = _shared(settings_cls, other)
    # The walk finds the fields the issue named (it is not vacuous).
    assert {"max_caption_length"} <= set(shared)
    ours, theirs = _settings_defaults(settings_cls), _init_defaults(other)
    differ = {name: (ours[name], theirs[name]) for name in shared if ours[name] != theirs[name]}
    allowed = {f for (s, o, f) in ALLOWED_DIFFERENCES if s is settings_cls and o is other}
    assert set(differ) == allowed, differ
    for key, reason in ALLOWED_DIFFERENCES.items():  # the allow-list is not stale
        s, o, f = key
        if s is settings_cls and o is other:
            assert f in differ and reason


def test_shared_fields_cover_the_known_duplicates():
    assert {
        "max_violation_warmup",
        "init_temperature",
        "freeze_text",
        "augment",
        "embed_dim",
        "margin",
        "loss",
        "vision_pooling",
        "text_pooling",
        "image_size",
    } <= set(_shared(RetrieverSettings, RetrieverConfig))
    assert {
        "top_k",
        "max_question_length",
        "visual_grid",
        "freeze_vision",
        "freeze_word_embeddings",
        "image_size",
    } <= set(_shared(ReaderSettings, ReaderConfig))
    assert set(_shared(ReaderSettings, ReaderProcessor)) == {
        "max_question_length",
        "max_caption_length",
    }
    # The one name of the InfoNCE temperature on both sides.
    assert "temperature" not in _settings_defaults(RetrieverSettings)


# --------------------------------------------------------------------------- built models


def _tiny_vit(root: Path) -> Path:
    """A 1-layer ViT checkpoint folder whose image processor resizes to 32 pixels."""
    from transformers import ViTImageProcessor, ViTModel

    path = Path(root) / "tiny-vit"
    torch.manual_seed(0)
    ViTModel(tiny_vit_config()).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _other_value(name: str, default: Any, hint: Any, strings: dict[str, str]) -> Any:
    """A valid value different from ``default``, from the field's type."""
    if name in strings:
        return strings[name]
    if get_origin(hint) is Literal:
        return next(c for c in get_args(hint) if c != default)
    if hint is bool:
        return not default
    if hint is int:
        return default + 1
    if hint is float:
        return default * 2
    raise AssertionError(f"no non-default value for {name} ({hint}): add one to `strings`")


def _non_default_settings(cls: type, other: type, strings: dict[str, str]):
    hints = typing.get_type_hints(cls)
    defaults = _settings_defaults(cls)
    values = {
        name: _other_value(name, defaults[name], hints[name], strings)
        for name in _shared(cls, other)
    }
    assert all(values[n] != defaults[n] for n in values)
    return cls(**values), values


def test_retriever_built_from_settings_gets_every_shared_value(tmp_path):
    text = str(tiny_text_backbone(tmp_path))
    vit = str(_tiny_vit(tmp_path))
    settings, values = _non_default_settings(
        RetrieverSettings,
        RetrieverConfig,
        {
            "text_backbone": text,
            "vision_backbone": vit,
            "loss": "infonce",
            "loss_weights": {"infonce": 2.0},
            "hash_bits": 32,  # a multiple of 8
        },
    )
    settings.learning_rate = 0.5  # a training field: not read
    model = RetrieverModel.from_backbones(settings, load_weights=False)
    got = {name: getattr(model.config, name) for name in values}
    assert got == values
    # The warm-up is one unit everywhere: forward passes, not multiplied by accumulation.
    settings.gradient_accumulation_steps = 4
    assert (
        RetrieverModel.from_backbones(settings, load_weights=False).config.max_violation_warmup
        == values["max_violation_warmup"]
    )


def test_from_backbones_build_options(tmp_path):
    """Options that are not config fields, for both models (one list each, checked)."""
    text = str(tiny_text_backbone(tmp_path))
    checks = {
        "num_text_layers": (1, lambda m: m.config.text_config["num_hidden_layers"] == 1),
        "cnn_hidden_sizes": ([8, 16], lambda m: m.config.vision_config["hidden_sizes"] == [8, 16]),
    }
    assert set(checks) == set(retriever_modeling._BUILD_KEYS) == set(reader_modeling._BUILD_KEYS)
    opts = {k: v for k, (v, _) in checks.items()}
    retriever = RetrieverModel.from_backbones(
        RetrieverSettings(text_backbone=text, **opts), load_weights=False
    )
    reader = ReaderModel.from_backbones(
        ANSWERS,
        ReaderSettings(text_backbone=text, vision_backbone="cnn", **opts),
        load_weights=False,
    )
    for model in (retriever, reader):
        for name, (_, check) in checks.items():
            assert check(model), name
    # Same mechanism: an unknown option is a TypeError naming it, on both models.
    with pytest.raises(TypeError, match="unknown retriever option.*grid_size"):
        RetrieverModel.from_backbones(text_backbone=text, grid_size=4)
    with pytest.raises(TypeError, match="unknown reader option.*num_layers"):
        ReaderModel.from_backbones(ANSWERS, text_backbone=text, num_layers=1)
    # The old positional backbone name is refused with a pointer to the keyword.
    with pytest.raises(TypeError, match=r"settings must be a RetrieverSettings.*vision_backbone="):
        RetrieverModel.from_backbones("cnn")


def test_reader_built_from_settings_gets_every_shared_value(tmp_path):
    text = str(tiny_text_backbone(tmp_path))
    settings, values = _non_default_settings(
        ReaderSettings, ReaderConfig, {"text_backbone": text, "vision_backbone": "cnn"}
    )
    settings.num_text_layers = 1
    settings.cnn_hidden_sizes = [8, 16]
    model = ReaderModel.from_backbones(ANSWERS, settings, load_weights=False)
    got = {name: getattr(model.config, name) for name in values}
    assert got == values
    processor = ReaderProcessor.from_config(model.config)
    for name in _shared(ReaderSettings, ReaderProcessor):
        assert (
            getattr(processor, name) == getattr(settings, name) != getattr(ReaderSettings, name)
        ), name


def test_from_backbones_without_settings_has_the_vse_warmup(tmp_path):
    text = str(tiny_text_backbone(tmp_path))
    model = RetrieverModel.from_backbones(
        text_backbone=text, cnn_hidden_sizes=[8, 16], image_size=32, load_weights=False
    )
    warmup = model.config.max_violation_warmup
    assert warmup == RetrieverSettings().max_violation_warmup > 0
    assert model.config.loss == "vse_max"
    images = [draw_shape(c, s) for c in ("red", "blue") for s in ("circle", "square")]
    captions = [f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square")]
    batch = {"pixel_values": model.preprocess_images(images), **model.tokenize(captions)}
    model.train()

    def loss_and(name: str) -> tuple[float, float]:
        out = model(**batch)
        ref = retrieval_loss(
            name, out.image_embeds, out.text_embeds, margin=0.2, logit_scale=model.logit_scale
        )
        return out.loss.item(), ref.item()

    got, summed = loss_and("vse_sum")  # a fresh model: sum of hinges (no collapse)
    assert got == pytest.approx(summed) and model.num_updates.item() == 1
    model.num_updates.fill_(warmup)
    got, hardest = loss_and("vse_max")  # after the warm-up: hardest negatives
    assert got == pytest.approx(hardest) and hardest < summed


def test_image_size_applies_to_the_cnn_only(tmp_path):
    """What the settings docstrings say: a checkpoint's own processor decides its size."""
    text = str(tiny_text_backbone(tmp_path))
    vit = str(_tiny_vit(tmp_path))
    image = [draw_shape("red", "circle", size=40)]
    cnn = RetrieverModel.from_backbones(text_backbone=text, image_size=48, load_weights=False)
    assert cnn.preprocess_images(image).shape[-2:] == (48, 48)
    hf = RetrieverModel.from_backbones(
        text_backbone=text, vision_backbone=vit, image_size=48, load_weights=False
    )
    assert hf.preprocess_images(image).shape[-2:] == (32, 32)  # the checkpoint's size
    assert hf.config.image_size == 48  # recorded only

    for backbone, side in (("cnn", 48), (vit, 32)):
        reader = ReaderModel.from_backbones(
            ANSWERS,
            text_backbone=text,
            vision_backbone=backbone,
            image_size=48,
            cnn_hidden_sizes=[8, 16] if backbone == "cnn" else None,
            load_weights=False,
        )
        processor = ReaderProcessor.from_config(reader.config)
        pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        assert pixels.shape[-2:] == (side, side), backbone


def test_rvqa_default_top_k_is_the_readers(tmp_path):
    text = str(tiny_text_backbone(tmp_path))
    retriever = RetrieverModel.from_backbones(text_backbone=text, load_weights=False)
    reader = ReaderModel.from_backbones(
        ANSWERS, text_backbone=text, vision_backbone="cnn", top_k=4, load_weights=False
    )
    processor = ReaderProcessor.from_config(reader.config)
    assert RVQA(retriever, reader, processor, device="cpu").default_top_k == 4
    assert RVQA(retriever, reader, processor, top_k=2, device="cpu").default_top_k == 2


# --------------------------------------------------------------------------- saved models


def test_configs_saved_before_the_change_keep_their_values(tmp_path):
    """Saved config.json files hold every field: new defaults never leak into them.

    The dicts are what the previous version's ``save_pretrained`` wrote for configs
    built with its own defaults (warm-up 0, trainable text, no augmentation; top_k 5,
    budgets 16/10, grid 4, nothing frozen).
    """
    old_retriever = {
        "model_type": "rvqa-retriever",
        "vision_backbone": "cnn",
        "text_backbone": "minilm",
        "vision_pooling": "pooled",
        "text_pooling": "mean",
        "embed_dim": 256,
        "projection": "linear",
        "image_size": 64,
        "max_caption_length": 16,
        "loss": "vse_max",
        "margin": 0.2,
        "max_violation_warmup": 0,
        "init_temperature": 0.07,
        "freeze_vision": False,
        "freeze_text": False,
        "augment": False,
    }
    old_reader = {
        "model_type": "rvqa-reader",
        "text_backbone": "minilm",
        "vision_backbone": "cnn",
        "image_size": 64,
        "visual_grid": 4,
        "max_visual_tokens": 64,
        "top_k": 5,
        "max_question_length": 16,
        "max_caption_length": 10,
        "use_retrieval_scores": True,
        "freeze_vision": False,
        "freeze_word_embeddings": False,
        "answers": ANSWERS,
    }
    for cls, old in ((RetrieverConfig, old_retriever), (ReaderConfig, old_reader)):
        folder = tmp_path / cls.__name__
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(old))
        loaded = cls.from_pretrained(folder)
        for key, value in old.items():
            assert getattr(loaded, key) == value, (cls.__name__, key)
