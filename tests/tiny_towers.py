"""Tiny random Hugging Face towers saved as local checkpoint folders (ViT, CLIP, BERT
without dropout) and the checks the training tests share: the loss fell, the weights moved."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny import tiny_vit_config


def tiny_vit_folder(root: Path) -> Path:
    """``tiny_vit_config`` (32-pixel images, no dropout) with its PIL image processor."""
    from transformers import ViTImageProcessorPil, ViTModel

    path = Path(root) / "tiny-vit"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        ViTModel(tiny_vit_config()).save_pretrained(path)
        ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def tiny_clip_folder(root: Path) -> Path:
    """A whole tiny CLIP checkpoint (text and vision; a composite config) whose image
    processor resizes and centre-crops to the vision config's 32 pixels."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    path = Path(root) / "tiny-clip"
    if not (path / "config.json").is_file():
        small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
        config = CLIPConfig(
            text_config={**small, "intermediate_size": 20, "vocab_size": 99},
            vision_config={**small, "intermediate_size": 20, "image_size": 32, "patch_size": 8},
            projection_dim=8,
        )
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(path)
        CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ).save_pretrained(path)
    return path


def tiny_text_backbone_without_dropout(root: Path) -> Path:
    """``tests.tiny.tiny_text_backbone``'s BERT with every dropout at 0 (deterministic
    training steps, for comparisons of two runs)."""
    from transformers import BertConfig, BertModel

    from tests.tiny import tiny_text_backbone

    path = Path(root) / "tiny-bert-no-dropout"
    if not (path / "config.json").is_file():
        source = tiny_text_backbone(root)
        config = BertConfig.from_pretrained(source)
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        BertModel.from_pretrained(source, config=config).save_pretrained(path)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


def assert_loss_fell(losses: list[float], margin: float = 0.05) -> None:
    """The mean of the last three losses is below the first three's by ``margin`` (relative)."""
    assert len(losses) >= 6, losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first * (1 - margin), f"loss did not fall: {losses}"


def assert_all_changed(before: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str):
    """Every parameter of ``model`` under ``prefix`` differs from its copy in ``before``
    (so each got gradients and the optimiser moved it)."""
    after = {n: p.detach() for n, p in model.named_parameters() if n.startswith(prefix)}
    assert after and set(after) == {n for n in before if n.startswith(prefix)}
    unchanged = [n for n, p in after.items() if torch.equal(p, before[n])]
    assert not unchanged, f"not trained: {unchanged}"


def parameters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}
