"""Tiny models and generated data shared by the tests (no downloads, seconds on 2 cores)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 230, 20),
}
SHAPES = ("circle", "square")


def tiny_text_backbone(root: Path) -> Path:
    """A 2-layer, 32-hidden BERT saved with the packaged MiniLM tokenizer (a local folder)."""
    from transformers import BertConfig, BertModel

    from rvqa.towers import load_tokenizer

    path = Path(root) / "tiny-bert"
    if (path / "config.json").is_file():
        return path
    tok = load_tokenizer("minilm")
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    import torch

    torch.manual_seed(0)  # the same tiny backbone in every folder
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def draw_shape(color: str, shape: str, size: int = 32, offset: int = 0) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (4 + offset, 4 + offset, size - 6 + offset, size - 6 + offset)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    else:
        d.rectangle(box, fill=COLORS[color])
    return img


def coco_caption_fixture(
    root: Path, n_per_class: int = 4, split: str = "train2014"
) -> tuple[Path, Path]:
    """COCO-format captions JSON + image folder of coloured shapes (2 captions an image)."""
    root = Path(root)
    images_dir = root / split
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    image_id, ann_id = 1, 1
    for color in COLORS:
        for shape in SHAPES:
            for k in range(n_per_class):
                name = f"COCO_{split}_{image_id:012d}.jpg"
                draw_shape(color, shape, offset=k % 3).save(images_dir / name, quality=95)
                images.append({"id": image_id, "file_name": name, "width": 32, "height": 32})
                for text in (f"a {color} {shape}", f"a picture of a {color} {shape}"):
                    annotations.append({"id": ann_id, "image_id": image_id, "caption": text})
                    ann_id += 1
                image_id += 1
    path = root / f"captions_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, images_dir


def tiny_run_config(root: Path, **overrides):
    """A RunConfig for a whole tiny run on easy-vqa (tiny random towers, a few steps)."""
    from rvqa.config import config_from_dict

    root = Path(root)
    text = str(tiny_text_backbone(root))
    data = {
        "output_dir": str(root / "run"),
        "data": {"source": "easy_vqa", "train_fraction": 0.02, "max_eval_questions": 64},
        "retriever": {
            "vision_backbone": "cnn",
            "cnn_hidden_sizes": [8, 16],
            "text_backbone": text,
            "freeze_text": False,
            "embed_dim": 16,
            "image_size": 32,
            "max_caption_length": 8,
            "batch_size": 32,
            "max_steps": 3,
            "max_violation_warmup": 1,
            "test_split": None,
            "val_fraction": 0.02,
        },
        "index": {"name": "tiny-captions", "path": str(root / "indices" / "tiny-captions")},
        "reader": {
            "text_backbone": text,
            "num_text_layers": None,
            "vision_backbone": "retriever",
            "freeze_word_embeddings": False,
            "image_size": 32,
            "visual_grid": 2,
            "top_k": 2,
            "max_question_length": 12,
            "max_caption_length": 6,
            "answer_vocab_size": 16,
            "batch_size": 32,
            "max_steps": 3,
            "max_eval_questions": 32,
            "learning_rate": 1e-3,
        },
    }
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = value
    return config_from_dict(data)


def build_tiny_run(root: Path, **overrides) -> Path:
    """Train a tiny retriever, build its index, train a tiny reader: a loadable run folder."""
    from rvqa.indexing import build_index_from_config
    from rvqa.reader.train import train_reader
    from rvqa.retriever.train import train_retriever

    cfg = tiny_run_config(root, **overrides)
    train_retriever(cfg)
    build_index_from_config(cfg)
    train_reader(cfg)
    return Path(cfg.output_dir)


class Interrupted(RuntimeError):
    """Raised by :func:`interrupted_after_checkpoint` to simulate a killed run."""


@contextlib.contextmanager
def interrupted_after_checkpoint(monkeypatch, step: int):
    """Training inside the block stops with :class:`Interrupted` right after it saved
    the checkpoint of ``step`` (the block must raise it); afterwards saving is normal."""
    import pytest

    from rvqa import training

    original = training._save_checkpoint

    def save_then_stop(accelerator, output_dir, at, state, keep):
        path = original(accelerator, output_dir, at, state, keep)
        if at == step:
            raise Interrupted(f"simulated interruption after the step-{at} checkpoint")
        return path

    monkeypatch.setattr(training, "_save_checkpoint", save_then_stop)
    try:
        with pytest.raises(Interrupted):
            yield
    finally:
        monkeypatch.setattr(training, "_save_checkpoint", original)


def run_two_cpu_processes(args: list[str], cwd: Path, timeout: int = 300):
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`` on CPU
    (gloo; ``--standalone`` picks a free port, so parallel test runs do not collide)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def tiny_vit_config():
    """A 1-layer, 16-wide ViT config on 32-pixel images: 4 × 4 patches of 8 + CLS."""
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        image_size=32,
        patch_size=8,
    )
