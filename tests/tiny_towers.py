"""Tiny random Hugging Face towers saved as local checkpoint folders (ViT, CLIP, BERT
without dropout) and the checks the training tests share: the loss fell, the weights moved."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny import coco_caption_fixture, tiny_run_config, tiny_vit_config


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


def coco_retriever_config(root: Path, vision: str | Path, n_per_class: int = 2, **retriever):
    """A retriever run on 8 × ``n_per_class`` images of coloured shapes, 2 captions each,
    one image held out for validation. With the default 2: 30 training pairs in one
    batch of up to 32, so every step sees the same pairs."""
    captions, images = coco_caption_fixture(root / "coco", n_per_class=n_per_class)
    settings = {
        "vision_backbone": str(vision),
        "image_size": 32,
        "captions": {"source": "coco", "path": str(captions), "images": str(images)},
        "batch_size": 32,
        "max_steps": 8,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant_with_warmup",
        "augment": False,
        "max_violation_warmup": 0,  # hardest negatives from the first step
        **retriever,
    }
    return tiny_run_config(root, **{f"retriever.{k}": v for k, v in settings.items()})


def reader_for(cfg, **overrides):
    """The reader ``train_reader(cfg)`` would build (answer vocabulary from the training
    data), with ``overrides`` of its config (e.g. ``dropout=0.0``), and its processor."""
    from rvqa.reader.answers import build_vocab
    from rvqa.reader.data import load_reader_data
    from rvqa.reader.modeling import ReaderModel
    from rvqa.reader.processing import ReaderProcessor

    s = cfg.reader
    train_records, _ = load_reader_data(cfg)
    vocab = build_vocab(
        (r.answers for r in train_records), size=s.answer_vocab_size, min_count=s.min_answer_count
    )
    model = ReaderModel.from_backbones(list(vocab), s, **overrides)
    return model, ReaderProcessor.from_config(model.config)


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
