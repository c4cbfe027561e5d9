"""A synthetic VQAv2 + COCO data set in the exact official file formats, at any size.

Writes, under ``ROOT`` (the layout ``configs/coco_vqav2.yaml``'s relative paths
name, so its commands run with ``cwd = ROOT``)::

    data/vqav2/v2_OpenEnded_mscoco_{train,val}2014_questions.json
    data/vqav2/v2_mscoco_{train,val}2014_annotations.json
    data/coco/annotations/captions_{train,val}2014.json
    data/coco/dataset_coco.json              (Karpathy's split file)
    data/coco/train2014/COCO_train2014_%012d.jpg
    data/coco/val2014/COCO_val2014_%012d.jpg
    synthetic_manifest.json                  (parameters, counts, throughput)

The content is learnable, not noise: every image shows 1-4 coloured shapes
(circle, square, triangle; 8 colours) in cells of a 3 × 3 grid on a light,
slightly noisy background; its captions describe them (5 templates); its
questions (colour, shape, count, yes/no, like VQAv2's question types) have
answers that follow from the image, given by 10 simulated annotators with
realistic noise (a per-question reliability, confusable colours, counts off by
one, synonyms such as ``two`` / ``grey`` / ``rectangle``, ``maybe`` confidences).

Formats (what the official files hold): questions ``{info, task_type, data_type,
data_subtype, license, questions: [{image_id, question, question_id}]}``;
annotations ``{info, license, data_type, data_subtype, annotations:
[{question_type, multiple_choice_answer, answers: [{answer, answer_confidence,
answer_id}] × 10, image_id, answer_type, question_id}]}``; COCO captions ``{info,
licenses, images: [{license, file_name, coco_url, height, width, date_captured,
flickr_url, id}], annotations: [{image_id, id, caption}]}``; Karpathy ``{images:
[{filepath, sentids, filename, imgid, split, sentences: [{tokens, raw, imgid,
sentid}], cocoid}], dataset: "coco"}``. Image ids are unique over both splits
(train odd, val even), question ids are ``image_id * 1000 + k`` as in VQAv2.
Karpathy splits: every train2014 image is ``train``; of the val2014 images,
5000/40504 each (at least one) are ``val`` and ``test`` (the real proportion),
the rest ``restval``.

Deterministic from ``--seed``: each image is drawn from its own generator
(seed, split, index), so the output does not depend on the number of workers.
Images are drawn and encoded in ``--workers`` processes; the JSON files are
streamed (each record written as it arrives, COCO captions' second array through
a part file), so memory stays flat with N. Every file is written under a
temporary name and renamed when complete; the manifest is written last.

Usage::

    python benchmarks/synthetic_data.py --root /work/scale/n5000 --images 5000
    python benchmarks/synthetic_data.py --root /work/scale/n80000 --images 80000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

MANIFEST = "synthetic_manifest.json"
FORMAT_VERSION = 1

COLORS = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 215, 40),
    "orange": (240, 140, 30),
    "purple": (140, 60, 170),
    "black": (25, 25, 25),
    "white": (250, 250, 250),
}
# Colours an annotator may give instead (neighbours in hue / brightness).
CONFUSED_COLORS = {
    "red": ["orange", "pink"],
    "green": ["blue", "yellow"],
    "blue": ["purple", "green"],
    "yellow": ["orange", "green"],
    "orange": ["red", "yellow"],
    "purple": ["blue", "pink"],
    "black": ["gray", "blue"],
    "white": ["gray", "silver"],
}
COLOR_SYNONYMS = {"gray": "grey", "white": "white", "black": "dark"}
BACKGROUNDS = {
    "gray": (175, 175, 175),
    "beige": (225, 210, 180),
    "light blue": (185, 210, 235),
}
SHAPES = ("circle", "square", "triangle")
SHAPE_SYNONYMS = {"square": ["rectangle", "box"], "circle": ["ball", "oval"], "triangle": []}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")

INFO = {
    "description": "Synthetic VQAv2/COCO-format data (rvqa benchmarks/synthetic_data.py)",
    "url": "https://visualqa.org",
    "version": "2.0",
    "year": 2017,
    "contributor": "rvqa",
    "date_created": "2017-04-26 17:00:44",
}
LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons"}
SPLIT_CODE = {"train2014": 1, "val2014": 2}


# --------------------------------------------------------------------------- one image


def _position(cell: int) -> str:
    row, col = divmod(cell, 3)
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COLS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLS[col]}"


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _a(phrase: str) -> str:
    """``a red circle`` / ``an orange square``."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _listing(objects: list[dict]) -> str:
    """``a red circle, two blue squares and a green triangle``."""
    groups = Counter((o["color"], o["shape"]) for o in objects)
    parts = [
        _a(f"{c} {s}") if n == 1 else f"{NUMBER_WORDS[n]} {c} {_plural(s, n)}"
        for (c, s), n in groups.items()
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _scene(rng: np.random.Generator) -> dict:
    n = int(rng.choice([1, 2, 3, 4], p=[0.1, 0.3, 0.35, 0.25]))
    cells = rng.choice(9, size=n, replace=False)
    colors = list(COLORS)
    objects = [
        {
            "color": colors[int(rng.integers(len(colors)))],
            "shape": SHAPES[int(rng.integers(len(SHAPES)))],
            "cell": int(c),
            "scale": float(rng.uniform(0.55, 0.9)),
        }
        for c in cells
    ]
    objects.sort(key=lambda o: o["cell"])
    return {
        "background": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
        "objects": objects,
    }


def _draw(scene: dict, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    base = np.asarray(BACKGROUNDS[scene["background"]], dtype=np.int16)
    noise = rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.int16)
    pixels = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    cw, ch = width / 3, height / 3
    for o in scene["objects"]:
        row, col = divmod(o["cell"], 3)
        side = min(cw, ch) * o["scale"]
        cx = (col + 0.5) * cw + rng.uniform(-0.1, 0.1) * cw
        cy = (row + 0.5) * ch + rng.uniform(-0.1, 0.1) * ch
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        fill = COLORS[o["color"]]
        outline = (90, 90, 90) if o["color"] == "white" else None
        if o["shape"] == "circle":
            draw.ellipse(box, fill=fill, outline=outline)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=fill, outline=outline)
        else:
            draw.polygon(
                [(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill, outline=outline
            )
    return img


# Each caption is written by another "annotator": words drawn from these.
PICTURE = ("picture", "image", "photo", "frame")
ON = ("on", "against", "over")
BACKGROUND = ("background", "backdrop")
OBJECTS = ("shapes", "objects", "figures")
DRAWING = ("a simple drawing of", "a picture of", "an illustration of", "a plain image with")
NEXT_TO = ("next to", "beside", "near")


def _captions(scene: dict, k: int, rng: np.random.Generator) -> list[str]:
    objs, bg = scene["objects"], scene["background"]
    n = len(objs)

    def pick(words: tuple[str, ...]) -> str:
        return words[int(rng.integers(len(words)))]

    def placed(o: dict) -> str:
        size = "small " if o["scale"] < 0.65 else ("large " if o["scale"] > 0.8 else "")
        return _a(f"{size}{o['color']} {o['shape']} in the {_position(o['cell'])}")

    one = objs[int(rng.integers(n))]
    suffix = pick(("", f", {placed(one)}", f" in {_a(pick(PICTURE))}"))
    templates = [
        f"{', '.join(placed(o) for o in objs)} {pick(ON)} a {bg} {pick(BACKGROUND)}",
        f"{NUMBER_WORDS[n]} {pick(OBJECTS) if n > 1 else 'shape'} {pick(ON)} a {bg} "
        f"{pick(BACKGROUND)}{suffix}",
        f"{placed(one)} of the {pick(PICTURE)}",
    ]
    if n >= 2:
        a, b = (objs[i] for i in rng.choice(n, size=2, replace=False))
        where = "left of" if a["cell"] % 3 < b["cell"] % 3 else pick(NEXT_TO)
        if a["cell"] // 3 < b["cell"] // 3 and a["cell"] % 3 == b["cell"] % 3:
            where = "above"
        templates.append(f"{placed(a)} {where} {placed(b)}")
    else:
        templates.append(f"{placed(one)} and nothing else {pick(ON)} the {bg} {pick(BACKGROUND)}")
    shuffled = [objs[i] for i in rng.permutation(n)]
    templates.append(f"{pick(DRAWING)} {', '.join(placed(o) for o in shuffled)}")
    out = []
    for i in range(k):
        text = templates[i % len(templates)]
        if i >= len(templates):  # more captions than templates: another wording
            text = f"{_a(pick(PICTURE))} showing {_listing(shuffled)}"
        if rng.random() < 0.3:
            text = text[0].upper() + text[1:] + "."
        out.append(text)
    return out


def _question_pool(scene: dict, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """(question, answer, question_type, answer_type) candidates, answers true to the image."""
    objs = scene["objects"]
    shape_count = Counter(o["shape"] for o in objs)
    color_count = Counter(o["color"] for o in objs)
    pool = []
    for o in objs:
        if shape_count[o["shape"]] == 1:
            q = f"What color is the {o['shape']}?"
        else:
            q = f"What color is the {o['shape']} on the {_position(o['cell'])}?"
        pool.append((q, o["color"], "what color is the", "other"))
        if color_count[o["color"]] == 1:
            pool.append(
                (f"What shape is the {o['color']} object?", o["shape"], "what is the", "other")
            )
    for s in SHAPES:
        pool.append((f"How many {s}s are there?", str(shape_count[s]), "how many", "number"))
    pool.append(("How many shapes are in the picture?", str(len(objs)), "how many", "number"))
    pool.append(
        ("What color is the background?", scene["background"], "what color is the", "other")
    )
    present = {(o["color"], o["shape"]) for o in objs}
    for _ in range(2):
        c = list(COLORS)[int(rng.integers(len(COLORS)))]
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        if rng.random() < 0.5:  # half the yes/no questions about something present
            o = objs[int(rng.integers(len(objs)))]
            c, s = o["color"], o["shape"]
        yes = "yes" if (c, s) in present else "no"
        pool.append((f"Is there a {c} {s}?", yes, "is there a", "yes/no"))
    o = objs[int(rng.integers(len(objs)))]
    c = o["color"] if rng.random() < 0.5 else list(COLORS)[int(rng.integers(len(COLORS)))]
    if shape_count[o["shape"]] == 1:
        pool.append(
            (f"Is the {o['shape']} {c}?", "yes" if c == o["color"] else "no", "is the", "yes/no")
        )
    m = int(rng.integers(1, 4))
    pool.append(
        (
            f"Are there more than {m} shapes?",
            "yes" if len(objs) > m else "no",
            "are there",
            "yes/no",
        )
    )
    # one question per text (a VQA image never asks the same question twice)
    seen, unique = set(), []
    for item in pool:
        if item[0] not in seen:
            seen.add(item[0])
            unique.append(item)
    return unique


def _annotator_answer(answer: str, answer_type: str, rng: np.random.Generator) -> str:
    """A plausible wrong or differently worded answer."""
    if answer_type == "yes/no":
        return "no" if answer == "yes" else "yes"
    if answer_type == "number":
        n = int(answer)
        if rng.random() < 0.3:
            return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else answer  # same answer, spelled
        return str(max(0, n + (1 if rng.random() < 0.5 else -1)))
    if answer in CONFUSED_COLORS:
        if rng.random() < 0.2 and answer in COLOR_SYNONYMS:
            return COLOR_SYNONYMS[answer]
        options = CONFUSED_COLORS[answer]
        return options[int(rng.integers(len(options)))]
    if answer in SHAPE_SYNONYMS and SHAPE_SYNONYMS[answer] and rng.random() < 0.6:
        options = SHAPE_SYNONYMS[answer]
        return options[int(rng.integers(len(options)))]
    if answer in SHAPES:
        others = [s for s in SHAPES if s != answer]
        return others[int(rng.integers(len(others)))]
    if answer == "gray":
        return "grey" if rng.random() < 0.6 else "white"
    if answer == "light blue":
        return "blue"
    return "beige" if answer != "beige" else "white"


def _answers(answer: str, answer_type: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Ten (answer, answer_confidence) pairs from simulated annotators."""
    reliability = float(rng.uniform(0.75, 1.0))
    out = []
    for _ in range(10):
        right = rng.random() < reliability
        given = answer if right else _annotator_answer(answer, answer_type, rng)
        r = rng.random()
        if right:
            conf = "yes" if r < 0.88 else ("maybe" if r < 0.98 else "no")
        else:
            conf = "yes" if r < 0.55 else ("maybe" if r < 0.9 else "no")
        out.append((given, conf))
    return out


def _image_id(split: str, i: int) -> int:
    # unique over both splits, not contiguous (like COCO's): train odd, val even
    return 2 * i + (9 if split == "train2014" else 10)


def make_image(task: tuple) -> dict:
    """Draw, save and describe image ``i`` of ``split`` (run in a worker process).

    Args:
        task: ``(root, split, i, seed, questions_per_image, captions_per_image,
            min_side, max_side)``.

    Returns:
        The image's records: ids, file name, size, captions and questions.
    """
    root, split, i, seed, n_q, n_c, min_side, max_side = task
    rng = np.random.default_rng([seed, SPLIT_CODE[split], i])
    image_id = _image_id(split, i)
    width = int(rng.integers(min_side, max_side + 1))
    height = int(rng.integers(min_side, max_side + 1))
    scene = _scene(rng)
    name = f"COCO_{split}_{image_id:012d}.jpg"
    _draw(scene, width, height, rng).save(
        Path(root) / "data" / "coco" / split / name, format="JPEG", quality=90
    )
    pool = _question_pool(scene, rng)
    chosen = [
        pool[j] for j in sorted(rng.choice(len(pool), size=min(n_q, len(pool)), replace=False))
    ]
    questions = []
    for k, (text, answer, q_type, a_type) in enumerate(chosen):
        answers = _answers(answer, a_type, rng)
        counts = Counter(a for a, _ in answers)
        mc = max(counts, key=lambda a: (counts[a], a == answer))
        questions.append(
            {
                "question_id": image_id * 1000 + k,
                "question": text,
                "question_type": q_type,
                "answer_type": a_type,
                "multiple_choice_answer": mc,
                "answers": answers,
            }
        )
    return {
        "image_id": image_id,
        "file_name": name,
        "width": width,
        "height": height,
        "captions": _captions(scene, n_c, rng),
        "questions": questions,
    }


# --------------------------------------------------------------------------- streamed JSON


class _JsonArray:
    """Writes ``prefix [item, item, ...] suffix`` to an open file, one item at a time."""

    def __init__(self, f, prefix: str):
        self.f, self.first = f, True
        f.write(prefix + "[")

    def add(self, obj: Any) -> None:
        self.f.write(("" if self.first else ", ") + json.dumps(obj, separators=(", ", ": ")))
        self.first = False

    def close(self, suffix: str = "") -> None:
        self.f.write("]" + suffix)


def _head(obj: dict) -> str:
    """A JSON object's opening, without its closing brace: ``{"a": 1, ``."""
    return json.dumps(obj)[:-1] + (", " if obj else "")


class _SplitWriter:
    """The streamed official files of one COCO split (questions, annotations, captions)."""

    def __init__(self, root: Path, split: str):
        self.root, self.split = root, split
        vqa, ann = root / "data" / "vqav2", root / "data" / "coco" / "annotations"
        self.paths = {
            "questions": vqa / f"v2_OpenEnded_mscoco_{split}_questions.json",
            "annotations": vqa / f"v2_mscoco_{split}_annotations.json",
            "captions": ann / f"captions_{split}.json",
        }
        self.files = {k: open(_tmp(p), "w", encoding="utf-8") for k, p in self.paths.items()}
        self.caption_part_path = _tmp(self.paths["captions"]).with_suffix(".part")
        self.caption_part = open(self.caption_part_path, "w", encoding="utf-8")
        head = {"info": INFO, "task_type": "Open-Ended", "data_type": "mscoco"}
        self.questions = _JsonArray(
            self.files["questions"],
            _head({**head, "data_subtype": split, "license": LICENSE}) + '"questions": ',
        )
        self.annotations = _JsonArray(
            self.files["annotations"],
            _head({"info": INFO, "license": LICENSE, "data_type": "mscoco", "data_subtype": split})
            + '"annotations": ',
        )
        self.images = _JsonArray(
            self.files["captions"],
            _head({"info": INFO, "licenses": [{**LICENSE, "id": 1}]}) + '"images": ',
        )
        self.caption_anns = _JsonArray(self.caption_part, "")
        self.counts = Counter()

    def add(self, rec: dict) -> None:
        image_id = rec["image_id"]
        for q in rec["questions"]:
            self.questions.add(
                {"image_id": image_id, "question": q["question"], "question_id": q["question_id"]}
            )
            self.annotations.add(
                {
                    "question_type": q["question_type"],
                    "multiple_choice_answer": q["multiple_choice_answer"],
                    "answers": [
                        {"answer": a, "answer_confidence": c, "answer_id": j + 1}
                        for j, (a, c) in enumerate(q["answers"])
                    ],
                    "image_id": image_id,
                    "answer_type": q["answer_type"],
                    "question_id": q["question_id"],
                }
            )
        self.images.add(
            {
                "license": 1,
                "file_name": rec["file_name"],
                "coco_url": f"http://images.cocodataset.org/{self.split}/{rec['file_name']}",
                "height": rec["height"],
                "width": rec["width"],
                "date_captured": "2013-11-14 16:28:13",
                "flickr_url": "",
                "id": image_id,
            }
        )
        for j, text in enumerate(rec["captions"]):
            self.caption_anns.add({"image_id": image_id, "id": image_id * 10 + j, "caption": text})
        self.counts.update(images=1, questions=len(rec["questions"]), captions=len(rec["captions"]))

    def close(self) -> None:
        self.questions.close("}")
        self.annotations.close("}")
        self.caption_anns.close()
        self.caption_part.close()
        self.images.close(', "annotations": ')
        with open(self.caption_part_path, encoding="utf-8") as part:
            shutil.copyfileobj(part, self.files["captions"], 1 << 20)
        self.files["captions"].write("}")
        os.remove(self.caption_part_path)
        for key, f in self.files.items():
            f.close()
            os.replace(_tmp(self.paths[key]), self.paths[key])


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


class _KarpathyWriter:
    """The streamed ``dataset_coco.json`` over both splits."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(_tmp(path), "w", encoding="utf-8")
        self.images = _JsonArray(self.f, '{"images": ')
        self.imgid = self.sentid = 0
        self.splits = Counter()

    def add(self, rec: dict, split_dir: str, split: str) -> None:
        sentids = list(range(self.sentid, self.sentid + len(rec["captions"])))
        sentences = [
            {
                "tokens": text.lower().rstrip(".").replace(",", "").split(),
                "raw": text,
                "imgid": self.imgid,
                "sentid": s,
            }
            for s, text in zip(sentids, rec["captions"])
        ]
        self.images.add(
            {
                "filepath": split_dir,
                "sentids": sentids,
                "filename": rec["file_name"],
                "imgid": self.imgid,
                "split": split,
                "sentences": sentences,
                "cocoid": rec["image_id"],
            }
        )
        self.imgid += 1
        self.sentid += len(sentids)
        self.splits[split] += 1

    def close(self) -> None:
        self.images.close(', "dataset": "coco"}')
        self.f.close()
        os.replace(_tmp(self.path), self.path)


def karpathy_split(i: int, n_val: int) -> str:
    """Karpathy split of val2014 image ``i``: the real 5000/40504 each to val and test."""
    k = max(1, round(n_val * 5000 / 40504))
    return "val" if i < k else ("test" if i < 2 * k else "restval")


# --------------------------------------------------------------------------- driver


def generate(
    root: str | os.PathLike,
    images: int,
    val_images: int | None = None,
    *,
    questions_per_image: int = 5,
    captions_per_image: int = 5,
    seed: int = 0,
    workers: int = 2,
    min_side: int = 224,
    max_side: int = 320,
    progress: bool = False,
) -> dict:
    """Write the synthetic data set under ``root``; return its manifest.

    Args:
        root: Output folder (created; existing files of the same names are replaced).
        images: train2014 images (N).
        val_images: val2014 images (default ``max(N // 10, 50)``).
        questions_per_image: Questions per image (VQAv2 averages 5.4).
        captions_per_image: Captions per image (COCO: 5).
        seed: Everything follows from it.
        workers: Processes drawing and encoding images.
        min_side, max_side: Image width and height are drawn in this range (pixels).
        progress: Print a line every 5% of the images.

    Returns:
        The manifest also written to ``root/synthetic_manifest.json``: parameters,
        counts per split, bytes written, seconds and images/s.

    Raises:
        ValueError: A size or count out of range.
    """
    if images < 1:
        raise ValueError(f"images must be ≥ 1, got {images}")
    val_images = max(images // 10, 50) if val_images is None else val_images
    if val_images < 2:
        raise ValueError(f"val_images must be ≥ 2 (Karpathy val and test), got {val_images}")
    if min_side < 224 or max_side < min_side:
        raise ValueError(f"need 224 <= min_side <= max_side, got {min_side}, {max_side}")
    if not 1 <= questions_per_image <= 10 or not 1 <= captions_per_image <= 10:
        raise ValueError("questions_per_image and captions_per_image must be in 1..10")
    root = Path(root)
    (root / MANIFEST).unlink(missing_ok=True)  # incomplete until rewritten at the end
    for d in ("data/vqav2", "data/coco/annotations", "data/coco/train2014", "data/coco/val2014"):
        (root / d).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    karpathy = _KarpathyWriter(root / "data" / "coco" / "dataset_coco.json")
    writers = {}
    total = images + val_images
    done = 0
    with mp.get_context("fork").Pool(workers) as pool:
        for split, n in (("train2014", images), ("val2014", val_images)):
            writer = writers[split] = _SplitWriter(root, split)
            tasks = (
                (
                    str(root),
                    split,
                    i,
                    seed,
                    questions_per_image,
                    captions_per_image,
                    min_side,
                    max_side,
                )
                for i in range(n)
            )
            for i, rec in enumerate(pool.imap(make_image, tasks, chunksize=32)):
                writer.add(rec)
                ks = "train" if split == "train2014" else karpathy_split(i, n)
                karpathy.add(rec, split, ks)
                done += 1
                if progress and done % max(1, total // 20) == 0:
                    rate = done / (time.perf_counter() - t0)
                    print(f"{done}/{total} images ({rate:.0f}/s)", flush=True)
            writer.close()
    karpathy.close()
    seconds = time.perf_counter() - t0
    manifest = {
        "format_version": FORMAT_VERSION,
        "generator": "benchmarks/synthetic_data.py",
        "params": {
            "images": images,
            "val_images": val_images,
            "questions_per_image": questions_per_image,
            "captions_per_image": captions_per_image,
            "seed": seed,
            "min_side": min_side,
            "max_side": max_side,
        },
        "splits": {split: dict(w.counts) for split, w in writers.items()},
        "karpathy_splits": dict(karpathy.splits),
        "bytes": _tree_bytes(root / "data"),
        "seconds": round(seconds, 2),
        "images_per_s": round(total / seconds, 1),
        "workers": workers,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of a complete data set under ``root``, or None."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _tree_bytes(path: Path) -> int:
    return sum(_file_sizes(path))


def _file_sizes(path: Path) -> Iterator[int]:
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                yield os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", required=True, help="output folder")
    ap.add_argument("--images", type=int, required=True, help="train2014 images (N)")
    ap.add_argument("--val-images", type=int, default=None, help="default max(N // 10, 50)")
    ap.add_argument("--questions-per-image", type=int, default=5)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="image-drawing processes")
    ap.add_argument("--min-side", type=int, default=224)
    ap.add_argument("--max-side", type=int, default=320)
    args = ap.parse_args(argv)
    m = generate(
        args.root,
        args.images,
        args.val_images,
        questions_per_image=args.questions_per_image,
        captions_per_image=args.captions_per_image,
        seed=args.seed,
        workers=args.workers,
        min_side=args.min_side,
        max_side=args.max_side,
        progress=True,
    )
    print(
        f"wrote {args.root}: {m['splits']}; Karpathy {m['karpathy_splits']}; "
        f"{m['bytes'] / 1e6:.1f} MB in {m['seconds']:.1f} s ({m['images_per_s']:.0f} images/s, "
        f"{m['workers']} workers)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
