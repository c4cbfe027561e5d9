"""Tiny models and generated data shared by the tests (no downloads, seconds on 2 cores)."""

from __future__ import annotations

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

    from retriever.towers import load_tokenizer

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
