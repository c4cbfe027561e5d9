"""Retriever encoding throughput vs a bare ``transformers`` forward of the same backbone.

Same model weights, same batches, same thread count, interleaved repeats; the
ratio rvqa/bare is what matters (target: overhead ≤ 10 %).

    python benchmarks/bench_retriever_encoding.py [--n-captions 4096] [--n-images 2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from rvqa.retriever.modeling import RetrieverModel


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-captions", type=int, default=4096)
    ap.add_argument("--n-images", type=int, default=2048)
    ap.add_argument("--text-batch", type=int, default=256)
    ap.add_argument("--image-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", help="a saved retriever folder (default: the demo architecture)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model: RetrieverModel = (
        RetrieverModel.from_pretrained(args.model)
        if args.model
        else RetrieverModel.from_backbones()
    )
    model.eval()
    colors = ["red", "green", "blue", "yellow", "teal", "gray", "brown", "black"]
    shapes = ["circle", "rectangle", "triangle"]
    rng = np.random.default_rng(0)
    captions = [
        f"a {rng.choice(colors)} {rng.choice(shapes)} next to a {rng.choice(colors)} {rng.choice(shapes)}"
        for _ in range(args.n_captions)
    ]
    tok, text_model, proj = model.tokenizer, model.text_model, model.text_projection
    max_len = model.config.max_caption_length

    @torch.inference_mode()
    def bare_text():
        for s in range(0, len(captions), args.text_batch):
            enc = tok(
                captions[s : s + args.text_batch],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            h = text_model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            F.normalize(proj((h * m).sum(1) / m.sum(1)), dim=-1).numpy()

    def rvqa_text():
        model.embed_texts(captions, batch_size=args.text_batch)

    size = model.config.image_size
    pixels = torch.randn(args.n_images, 3, size, size)
    vision_model, vproj = model.vision_model, model.vision_projection

    @torch.inference_mode()
    def bare_image():
        for s in range(0, len(pixels), args.image_batch):
            out = vision_model(pixel_values=pixels[s : s + args.image_batch])
            F.normalize(vproj(out.pooler_output), dim=-1).numpy()

    @torch.inference_mode()
    def rvqa_image():
        for s in range(0, len(pixels), args.image_batch):
            model.encode_images(pixels[s : s + args.image_batch]).numpy()

    rows = {}
    for name, bare, ours, n in (
        ("captions", bare_text, rvqa_text, len(captions)),
        ("images (pixel tensors)", bare_image, rvqa_image, len(pixels)),
    ):
        tb, to = [], []
        for _ in range(args.repeats):  # interleave to share machine noise
            tb.append(_time(bare, 1))
            to.append(_time(ours, 1))
        b, o = statistics.median(tb), statistics.median(to)
        rows[name] = {
            "bare_items_per_s": n / b,
            "rvqa_items_per_s": n / o,
            "overhead_pct": 100 * (o / b - 1),
        }
    print(json.dumps({"threads": torch.get_num_threads(), **rows}, indent=1))
    print()
    print("| what | bare transformers (items/s) | rvqa (items/s) | rvqa / bare time |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(
            f"| {name} | {r['bare_items_per_s']:.0f} | {r['rvqa_items_per_s']:.0f} | {1 + r['overhead_pct'] / 100:.3f} |"
        )


if __name__ == "__main__":
    main()
