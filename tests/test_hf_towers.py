"""Training with Hugging Face image towers (tiny random ViT and CLIP checkpoint folders).

Each test trains through the project's entry points (``train_retriever`` /
``train_reader``) and asserts that the loss fell and that every weight of the image
tower moved: gradients reach the tower, and nothing in it is left without one (which
``DistributedDataParallel`` would reject).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rvqa.reader.modeling import ReaderModel
from rvqa.reader.train import train_reader
from rvqa.retriever.modeling import RetrieverModel
from rvqa.retriever.train import train_retriever
from tests.tiny import draw_shape, tiny_run_config
from tests.tiny_towers import (
    assert_loss_fell,
    coco_retriever_config,
    parameters_of,
    tiny_clip_folder,
    tiny_vit_folder,
)


def _assert_tower_trained(initial: torch.nn.Module, trained: torch.nn.Module) -> None:
    """Every image-tower weight of ``trained`` differs from the freshly built model's."""
    start = parameters_of(initial.vision_model)
    end = parameters_of(trained.vision_model)
    assert start and set(start) == set(end)
    unchanged = [n for n, p in start.items() if torch.equal(end[n], p)]
    assert not unchanged, f"not trained: {unchanged}"


@pytest.mark.parametrize(
    ("tower", "pooling"), [("vit", "cls"), ("clip", "pooled"), ("clip", "mean")]
)
def test_retriever_trains_an_hf_image_tower(tmp_path, tower, pooling):
    vision = tiny_vit_folder(tmp_path) if tower == "vit" else tiny_clip_folder(tmp_path)
    cfg = coco_retriever_config(tmp_path, vision, vision_pooling=pooling)
    initial = RetrieverModel.from_backbones(cfg.retriever)  # what train_retriever builds
    expected = "ViTModel" if tower == "vit" else "CLIPVisionModel"  # CLIP's image half
    assert type(initial.vision_model).__name__ == expected
    # The checkpoint's own PIL image processor, at the vision config's size.
    processor = type(initial.image_processor).__name__
    assert processor == ("ViTImageProcessorPil" if tower == "vit" else "CLIPImageProcessorPil")
    pixels = initial.preprocess_images([draw_shape("red", "circle", size=50)])
    assert (
        pixels.shape == (1, 3, 32, 32) == (1, 3, *[initial.config.vision_config["image_size"]] * 2)
    )

    out = train_retriever(cfg, end_training=False)
    result = out["result"]
    assert result.steps == 8
    assert_loss_fell(result.losses)
    # The trained folder loads with its processor and embeds images.
    loaded = RetrieverModel.from_pretrained(result.final_model_dir)
    _assert_tower_trained(initial, loaded)
    emb = loaded.embed_images([draw_shape("blue", "square")])
    assert emb.shape == (1, cfg.retriever.embed_dim)
    assert torch.allclose(torch.from_numpy(emb).norm(dim=-1), torch.ones(1), atol=1e-5)


def test_clip_post_layernorm_kept_only_when_the_pooled_output_is_read(tmp_path):
    """CLIP's vision post-LayerNorm feeds only ``pooler_output``: with token-state
    pooling it would never get a gradient, so the model leaves it out."""
    clip = str(tiny_clip_folder(tmp_path))
    cfg = coco_retriever_config(tmp_path, Path(clip))
    names = {}
    for pooling in ("pooled", "cls", "mean"):
        model = RetrieverModel.from_backbones(cfg.retriever, vision_pooling=pooling)
        names[pooling] = {n for n, _ in model.named_parameters() if "post_layernorm" in n}
    assert names["pooled"] == {
        "vision_model.post_layernorm.weight",
        "vision_model.post_layernorm.bias",
    }
    assert names["cls"] == names["mean"] == set()
    reader = ReaderModel.from_backbones(["yes", "no"], cfg.reader, vision_backbone=clip)
    assert not [n for n, _ in reader.named_parameters() if "post_layernorm" in n]


def test_reader_trains_a_vit_image_tower(tmp_path):
    vit = str(tiny_vit_folder(tmp_path))
    cfg = tiny_run_config(
        tmp_path,
        **{
            "data.train_fraction": 0.004,
            "reader.vision_backbone": vit,
            "reader.freeze_vision": False,
            "reader.top_k": 0,  # no retriever or index needed
            "reader.batch_size": 16,
            "reader.max_steps": 8,
            "reader.warmup_ratio": 0.0,
            "reader.lr_scheduler": "constant_with_warmup",
            "reader.max_eval_questions": 16,
        },
    )
    out = train_reader(cfg, end_training=False)
    result = out["result"]
    assert result.steps == 8
    assert_loss_fell(result.losses)
    trained = ReaderModel.from_pretrained(result.final_model_dir)
    # The image tower starts from the ViT folder's weights.
    initial = ReaderModel.from_backbones(trained.config.answers, cfg.reader)
    assert type(initial.vision_model).__name__ == "ViTModel"
    _assert_tower_trained(initial, trained)
