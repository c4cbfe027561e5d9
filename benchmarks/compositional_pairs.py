"""A generated image–caption set where every valid match is known (the one-to-many benchmark).

Each image shows 1–3 objects; each object has a shape (circle, square, triangle,
diamond), a colour (6), a size (small, large) and a cell of a 3 × 3 grid. Each image
gets 5 captions of varied wording **and completeness**, from full descriptions to a
single attribute::

    a large red circle in the middle left and a small blue diamond at the top center, nothing else
    only a red circle and a blue diamond
    a blue shape at the top
    two shapes, one of them red
    a red circle with a diamond at the top

A partial caption fits many images (``a blue shape at the top`` fits every image with
a blue object in the top row): the one-to-many problem PCME addresses. Every
caption is generated from **constraints** (a list of clauses, each "at least n" or
"exactly n" objects fitting a description, plus optionally the exact number of
objects), stored beside its text, and a caption is a valid match of an image when
every clause holds there. :func:`match_matrix` evaluates every caption against every
image of a split, so the ground truth is exhaustive (as the PCME paper does with
CUB's class labels), not only the image the caption was written for. Two clauses of
one caption always describe disjoint sets of objects (they differ in an attribute
both state), so counting per clause is the same as finding distinct objects. A text
means one thing wherever it appears: a place is a cell only when both its row and
column are named ("at the top center", "in the middle left"), a row or a column alone
otherwise ("at the top", "on the left"); a caption that claims to be complete says so
("only ...", "..., nothing else"), and one that does not is a lower bound.

Each image also has a ``label`` (its semantic category: the colour and shape of its
largest object, first by cell on a tie; 24 categories), for the objectives that pull
a category together (cross-modal centre loss, the support-set term).

Written under ``ROOT`` in Karpathy's split-file format (``rvqa``'s ``karpathy``
caption source reads it; ``scene`` and ``label`` on each image, ``constraints`` on
each sentence are extra keys it ignores)::

    ROOT/dataset_compositional.json
    ROOT/images/{train,val,test}/NNNNNN.png   (64 × 64 RGB)
    ROOT/manifest.json                       (parameters and counts; written last)

Deterministic from ``--seed``; every file is renamed into place when complete.

Usage::

    python benchmarks/compositional_pairs.py --root /tmp/comp --train 6000 --val 500 --test 1000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 2  # 2: one meaning per place phrase, complete captions say so
SPLIT_FILE = "dataset_compositional.json"
MANIFEST = "manifest.json"
IMAGE_SIZE = 64
CAPTIONS_PER_IMAGE = 5

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SIZES = ("small", "large")
HPOS = ("left", "center", "right")  # by column
VPOS = ("top", "middle", "bottom")  # by row
ATTRS = ("shape", "color", "size", "hpos", "vpos")
VALUES = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "hpos": HPOS,
    "vpos": VPOS,
}
NUMBER_WORDS = ("zero", "one", "two", "three")
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- scenes


def make_scene(rng: np.random.Generator) -> dict:
    """1–3 objects in distinct cells (sorted by cell)."""
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    objects = []
    for cell in cells:
        row, col = divmod(cell, 3)
        objects.append(
            {
                "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                "color": list(COLORS)[int(rng.integers(len(COLORS)))],
                "size": SIZES[int(rng.integers(len(SIZES)))],
                "hpos": HPOS[col],
                "vpos": VPOS[row],
                "cell": cell,
            }
        )
    return {"objects": objects}


def scene_label(scene: dict) -> str:
    """The image's semantic category: colour and shape of its largest object."""
    objs = scene["objects"]
    big = [o for o in objs if o["size"] == "large"] or objs
    return f"{big[0]['color']} {big[0]['shape']}"


def draw_scene(scene: dict, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene on a light grey, slightly noisy background."""
    noise = rng.normal(0.0, 5.0, size=(size, size, 1))
    pixels = np.clip(225 + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for o in scene["objects"]:
        row, col = divmod(o["cell"], 3)
        side = cell * (0.5 if o["size"] == "small" else 0.92)
        cx = (col + 0.5) * cell + rng.uniform(-0.04, 0.04) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.04, 0.04) * cell
        x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return img


# --------------------------------------------------------------------------- captions
#
# A caption's constraints: {"clauses": [{"desc": {attr: value}, "n": int, "exact": bool}],
# "total": int | None}. It matches an image when, for every clause, the number of the
# image's objects fitting ``desc`` is >= n (== n when exact), and the image has exactly
# ``total`` objects when ``total`` is set.


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _where(desc: dict) -> str:
    """The place words: a cell only when both are given, else a row or a column (each
    phrase has one meaning across the whole set)."""
    h, v = desc.get("hpos"), desc.get("vpos")
    if h and v:
        if h == "center" and v == "middle":
            return "in the very middle"
        if v == "middle":
            return f"in the middle {h}"
        return f"at the {v} {h}"  # "at the top center", "at the bottom left"
    if h:
        return "in the center column" if h == "center" else f"on the {h}"
    if v:
        return "in the middle row" if v == "middle" else f"at the {v}"
    return ""


def describe(desc: dict, n: int = 1) -> str:
    """Words for ``n`` objects fitting ``desc`` (``a large red circle on the left``)."""
    words = [desc[k] for k in ("size", "color") if k in desc]
    noun = desc.get("shape")
    if noun is None:
        noun = "shape" if words else "object"
        if not words and n == 1:
            noun = "something"
    if n > 1:
        noun += "s"
    head = " ".join([*words, noun])
    if noun == "something":
        head = "something"
    else:
        head = _a(head) if n == 1 else f"{NUMBER_WORDS[n]} {head}"
    where = _where(desc)
    return f"{head} {where}".strip()


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _exclusive(a: dict, b: dict) -> bool:
    """No object can fit both descriptions: they state different values of an attribute."""
    return any(k in b and a[k] != b[k] for k in a)


def _partial(obj: dict, keys: list[str]) -> dict:
    return {k: obj[k] for k in keys}


PREFIXES = ("", "a photo of ", "an image with ", "there is ", "a drawing of ", "we see ")


def make_captions(scene: dict, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """Five (text, constraints) pairs for one scene, from complete to partial."""
    objs = scene["objects"]
    n = len(objs)

    def pick(options):
        return options[int(rng.integers(len(options)))]

    out: list[tuple[str, dict]] = []
    # 1. Complete: every object with every attribute, and the total.
    full = [{k: o[k] for k in ATTRS} for o in objs]
    order = [int(i) for i in rng.permutation(n)]
    text = _join([describe(full[i]) for i in order])
    text = (
        pick(PREFIXES) + text + pick((", nothing else", " and nothing more", ", no other shapes"))
    )
    out.append((text, {"clauses": [{"desc": d, "n": 1, "exact": True} for d in full], "total": n}))
    # 2. Every object by colour and shape (counts merged), exact.
    groups: dict[tuple[str, str], int] = {}
    for o in objs:
        groups[(o["color"], o["shape"])] = groups.get((o["color"], o["shape"]), 0) + 1
    clauses = [
        {"desc": {"color": c, "shape": s}, "n": k, "exact": True} for (c, s), k in groups.items()
    ]
    listing = _join([describe(c["desc"], c["n"]) for c in clauses])
    if rng.random() < 0.5:
        text = pick(("only ", "just ", "a photo of only ")) + listing
    else:
        text = listing + pick((" and nothing else", ", nothing more"))
    out.append((text, {"clauses": clauses, "total": n}))
    # 3. One object, two or more of its attributes (at least one such object).
    obj = objs[int(rng.integers(n))]
    keys = [k for k in ATTRS if rng.random() < 0.5]
    if "hpos" in keys and "vpos" not in keys and rng.random() < 0.5:
        keys.remove("hpos")
    keys = keys or ["color", "shape"]
    if len(keys) == 1:
        keys.append(pick([k for k in ("shape", "color", "size") if k not in keys]))
    desc = _partial(obj, [k for k in ATTRS if k in keys])
    out.append(
        (
            pick(PREFIXES) + describe(desc),
            {"clauses": [{"desc": desc, "n": 1, "exact": False}], "total": None},
        )
    )
    # 4. The number of objects, and one attribute of one of them.
    obj = objs[int(rng.integers(n))]
    key = pick(("color", "shape", "size"))
    noun = "object" if n == 1 else pick(("shapes", "objects"))
    lead = f"{NUMBER_WORDS[n]} {noun}" if n > 1 else pick(("a single object", "just one shape"))
    value = obj[key] if key != "shape" else _a(obj[key])
    tail = f", one of them {value}" if n > 1 else f", {value}" if key != "shape" else f": {value}"
    out.append(
        (
            lead + tail,
            {"clauses": [{"desc": {key: obj[key]}, "n": 1, "exact": False}], "total": n},
        )
    )
    # 5. Two objects, partly described (disjoint descriptions), or one object with its place.
    if n >= 2:
        i, j = (int(x) for x in rng.choice(n, size=2, replace=False))
        da = _partial(objs[i], ["color", "shape"] if rng.random() < 0.5 else ["size", "shape"])
        db = _partial(objs[j], ["color"] if rng.random() < 0.5 else ["shape", "vpos"])
        if not _exclusive(da, db):  # colour, shape and cell: distinct cells differ
            da = _partial(objs[i], ["color", "shape", "hpos", "vpos"])
            db = _partial(objs[j], ["color", "shape", "hpos", "vpos"])
        clauses = [{"desc": da, "n": 1, "exact": False}, {"desc": db, "n": 1, "exact": False}]
        text = f"{describe(da)} {pick(('and', 'with', 'and also'))} {describe(db)}"
    else:
        desc = _partial(objs[0], ["shape", "hpos", "vpos"])
        clauses = [{"desc": desc, "n": 1, "exact": False}]
        text = pick(PREFIXES) + describe(desc)
    out.append((text, {"clauses": clauses, "total": None}))
    return [(t[0].upper() + t[1:] if rng.random() < 0.2 else t, c) for t, c in out]


# --------------------------------------------------------------------------- ground truth


def _scene_arrays(scenes: list[dict]) -> dict[str, np.ndarray]:
    """Per attribute an (images, 3) int array of value indices, -1 for an empty slot."""
    arrays = {k: np.full((len(scenes), 3), -1, dtype=np.int8) for k in ATTRS}
    for i, s in enumerate(scenes):
        for j, o in enumerate(s["objects"]):
            for k in ATTRS:
                arrays[k][i, j] = VALUES[k].index(o[k])
    return arrays


def match_matrix(constraints: list[dict], scenes: list[dict]) -> np.ndarray:
    """(captions, images) bool: caption c is a valid match of image i.

    Exhaustive: every caption's constraints evaluated on every scene.
    """
    arrays = _scene_arrays(scenes)
    present = arrays["shape"] >= 0  # (I, 3)
    totals = present.sum(1)
    out = np.zeros((len(constraints), len(scenes)), dtype=bool)
    cache: dict[str, np.ndarray] = {}
    for c, cons in enumerate(constraints):
        key = json.dumps(cons, sort_keys=True)
        row = cache.get(key)
        if row is None:
            row = np.ones(len(scenes), dtype=bool)
            if cons.get("total") is not None:
                row &= totals == cons["total"]
            for clause in cons["clauses"]:
                fits = present.copy()
                for k, v in clause["desc"].items():
                    fits &= arrays[k] == VALUES[k].index(v)
                count = fits.sum(1)
                row &= (count == clause["n"]) if clause["exact"] else (count >= clause["n"])
            cache[key] = row
        out[c] = row
    return out


def load_split(root: str | os.PathLike, split: str) -> dict[str, Any]:
    """One split of a generated set: image ids, scenes, labels, caption ids/texts/constraints,
    the image each caption was written for, and the exhaustive match matrix."""
    data = json.loads((Path(root) / SPLIT_FILE).read_text())
    images = [im for im in data["images"] if im["split"] == split]
    if not images:
        raise ValueError(f"{root}: no image in split {split!r}")
    scenes = [im["scene"] for im in images]
    sents = [(s, i) for i, im in enumerate(images) for s in im["sentences"]]
    constraints = [s["constraints"] for s, _ in sents]
    return {
        "image_ids": [im["imgid"] for im in images],
        "labels": [im["label"] for im in images],
        "scenes": scenes,
        "caption_ids": [s["sentid"] for s, _ in sents],
        "captions": [s["raw"] for s, _ in sents],
        "source_image": np.array([i for _, i in sents], dtype=np.int64),
        "matches": match_matrix(constraints, scenes),
    }


# --------------------------------------------------------------------------- writing


def generate(root: str | os.PathLike, counts: dict[str, int], seed: int = 0) -> dict:
    """Write the set under ``root`` (see the module docstring); returns the manifest."""
    t0 = time.perf_counter()
    root = Path(root)
    entries = []
    sentid = 0
    imgid = 0
    for s_index, split in enumerate(SPLITS):
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(counts.get(split, 0)):
            rng = np.random.default_rng([seed, s_index, i])
            scene = make_scene(rng)
            name = f"{i:06d}.png"
            # always drawn: a folder generated with another seed holds other scenes
            tmp = folder / f".{name}.tmp"
            draw_scene(scene, rng).save(tmp, format="PNG")
            os.replace(tmp, folder / name)
            sentences = []
            for text, cons in make_captions(scene, rng):
                sentences.append(
                    {
                        "raw": text,
                        "tokens": text.lower().split(),
                        "sentid": sentid,
                        "imgid": imgid,
                        "constraints": cons,
                    }
                )
                sentid += 1
            entries.append(
                {
                    "split": split,
                    "filepath": split,
                    "filename": name,
                    "imgid": imgid,
                    "sentids": [s["sentid"] for s in sentences],
                    "sentences": sentences,
                    "scene": scene,
                    "label": scene_label(scene),
                }
            )
            imgid += 1
    split_file = root / SPLIT_FILE
    tmp = root / f".{SPLIT_FILE}.tmp"
    tmp.write_text(json.dumps({"images": entries, "dataset": "compositional"}))
    os.replace(tmp, split_file)
    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "counts": {s: counts.get(s, 0) for s in SPLITS},
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "image_size": IMAGE_SIZE,
        "labels": sorted({e["label"] for e in entries}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, root / MANIFEST)
    return manifest


def ensure(root: str | os.PathLike, counts: dict[str, int], seed: int = 0) -> dict:
    """The manifest of ``root``, generating the set first unless it matches."""
    path = Path(root) / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        wanted = {s: counts.get(s, 0) for s in SPLITS}
        same = (manifest.get("format_version"), manifest.get("seed"), manifest.get("counts"))
        if same == (FORMAT_VERSION, seed, wanted):
            return manifest
    return generate(root, counts, seed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    manifest = generate(a.root, {"train": a.train, "val": a.val, "test": a.test}, a.seed)
    test = load_split(a.root, "test")
    per_caption = test["matches"].sum(1)
    print(json.dumps(manifest, indent=2))
    print(
        f"test: {len(test['captions'])} captions x {len(test['image_ids'])} images; valid matches "
        f"per caption: median {int(np.median(per_caption))}, mean {per_caption.mean():.1f}, "
        f"max {per_caption.max()}; captions with > 1 match: {np.mean(per_caption > 1):.1%}"
    )


if __name__ == "__main__":
    main()
