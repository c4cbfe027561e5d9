"""Tiny data fixtures in the exact official formats, written into a test's tmp_path.

Used by tests/test_data_*.py (and free for other tests that need real files):
VQAv2/OK-VQA questions and annotations with COCO-named JPEG images, COCO
captions, Karpathy split files (COCO and Flickr30K), JSONL and text captions,
and ``datasets`` folders written with ``save_to_disk``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

VQA_IMAGE_IDS = (42, 73, 9)
VQA_QUESTIONS = (
    # (question_id, image_id, question)
    (42000, 42, "What color is the bus?"),
    (42001, 42, "How many wheels are visible?"),
    (73000, 73, "Is there a dog?"),
    (9000, 9, "What is on the plate?"),
    (9001, 9, "Is the plate round?"),
)
# 10 human answers per question, deliberately not sorted (order must be kept).
VQA_ANSWERS = {
    42000: ["red", "red", "red and white", "red", "maroon", "red", "red", "red", "dark red", "red"],
    42001: ["4", "4", "four", "3", "4", "4", "4", "6", "4", "4"],
    73000: ["yes", "yes", "yes", "no", "yes", "yes", "yes", "yes", "yes", "yes"],
    9000: [
        "pizza",
        "food",
        "pizza",
        "pizza",
        "cheese pizza",
        "pizza",
        "pizza",
        "pizza",
        "pie",
        "pizza",
    ],
    9001: ["yes"] * 9 + ["no"],
}
VQA_TYPES = {
    42000: ("what color is the", "other"),
    42001: ("how many", "number"),
    73000: ("is there a", "yes/no"),
    9000: ("what is on the", "other"),
    9001: ("is the", "yes/no"),
}


def write_image(path: Path, size: tuple[int, int] = (32, 24), color=(200, 30, 30)) -> Path:
    """A small RGB image with a gradient (format from the suffix: .jpg or .png)."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[...] = color
    arr[:, :, 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def vqa_questions_json(subtype: str | None = "val2014") -> dict:
    """An official VQAv2 questions file (``v2_OpenEnded_mscoco_<subtype>_questions.json``)."""
    data = {
        "info": {"description": "This is v2.0 of the VQA dataset.", "version": "2.0"},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": {"name": "Creative Commons Attribution 4.0 International License"},
        "data_subtype": subtype,
        "questions": [
            {"image_id": image_id, "question": question, "question_id": qid}
            for qid, image_id, question in VQA_QUESTIONS
        ],
    }
    if subtype is None:
        del data["data_subtype"]
    return data


def vqa_annotations_json(subtype: str = "val2014") -> dict:
    """An official VQAv2 annotations file (``v2_mscoco_<subtype>_annotations.json``)."""
    annotations = []
    for qid, image_id, _ in VQA_QUESTIONS:
        answers = VQA_ANSWERS[qid]
        q_type, a_type = VQA_TYPES[qid]
        annotations.append(
            {
                "question_type": q_type,
                "multiple_choice_answer": max(set(answers), key=answers.count),
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                    for j, a in enumerate(answers)
                ],
                "image_id": image_id,
                "answer_type": a_type,
                "question_id": qid,
            }
        )
    return {
        "info": {"description": "This is v2.0 of the VQA dataset."},
        "license": {"name": "Creative Commons Attribution 4.0 International License"},
        "data_subtype": subtype,
        "annotations": annotations,
        "data_type": "mscoco",
    }


def write_vqa_split(
    root: Path, subtype: str = "val2014", questions: dict | None = None, images: bool = True
) -> dict[str, Path]:
    """Questions + annotations JSON and a COCO image folder named after ``subtype``."""
    image_dir = root / subtype
    image_dir.mkdir(parents=True, exist_ok=True)
    if images:
        image_subtype = subtype.replace("test-dev", "test")
        for k, image_id in enumerate(VQA_IMAGE_IDS):
            write_image(
                image_dir / f"COCO_{image_subtype}_{image_id:012d}.jpg", color=(40 * k, 90, 200)
            )
    q = write_json(
        root / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
        vqa_questions_json(subtype) if questions is None else questions,
    )
    a = write_json(root / f"v2_mscoco_{subtype}_annotations.json", vqa_annotations_json(subtype))
    return {"questions": q, "annotations": a, "images": image_dir}


# --------------------------------------------------------------------------- captions

COCO_CAPTIONS = (
    # (annotation id, image_id, caption) — captions as in the real file (trailing space/newline)
    (48, 42, "A red bus driving down a city street. "),
    (67, 42, "A double decker bus on the road.\n"),
    (126, 73, "A dog lying on a couch."),
    (219, 9, "A pizza on a white plate."),
)


def coco_captions_json() -> dict:
    """An official COCO captions file (``captions_val2014.json``)."""
    return {
        "info": {"description": "COCO 2014 Dataset", "year": 2014},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1}],
        "images": [
            {
                "license": 1,
                "file_name": f"COCO_val2014_{image_id:012d}.jpg",
                "coco_url": "",
                "height": 24,
                "width": 32,
                "date_captured": "2013-11-14 11:18:45",
                "flickr_url": "",
                "id": image_id,
            }
            for image_id in VQA_IMAGE_IDS
        ],
        "annotations": [
            {"image_id": image_id, "id": cid, "caption": caption}
            for cid, image_id, caption in COCO_CAPTIONS
        ],
    }


def karpathy_json(dataset: str = "coco") -> dict:
    """Karpathy's split file: ``dataset_coco.json`` or ``dataset_flickr30k.json``."""
    entries = [
        ("train", 0, 42, ["A red bus.", "A bus on a street."]),
        ("restval", 1, 73, ["A dog on a couch. "]),
        ("val", 2, 9, ["A pizza."]),
        ("test", 3, 11, ["A cat on a mat.", "A sleeping cat."]),
    ]
    images = []
    sentid = 100
    for split, imgid, cocoid, raws in entries:
        sentences = []
        for raw in raws:
            tokens = raw.lower().strip(" .").split()
            sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        entry = {
            "sentids": [s["sentid"] for s in sentences],
            "imgid": imgid,
            "sentences": sentences,
            "split": split,
        }
        if dataset == "coco":
            folder = "train2014" if split in ("train", "restval") else "val2014"
            entry.update(
                filepath=folder, filename=f"COCO_{folder}_{cocoid:012d}.jpg", cocoid=cocoid
            )
        else:
            entry["filename"] = f"{1000 + imgid}.jpg"
        images.append(entry)
    return {"images": images, "dataset": dataset}


# --------------------------------------------------------------------------- datasets folders


def hf_vqa_rows(tmp_path: Path, embed_images: bool) -> dict:
    """The VQA fixture as ``datasets`` columns (VQAv2's hub format), images written as PNGs.

    ``embed_images``: the image column holds absolute paths (to be cast to an
    ``Image`` feature); else paths relative to ``tmp_path / "imgs"``.
    """
    image_paths = {
        image_id: write_image(tmp_path / "imgs" / f"{image_id}.png", color=(k * 50, 0, 0))
        for k, image_id in enumerate(VQA_IMAGE_IDS)
    }
    rows = collections.defaultdict(list)
    for qid, image_id, question in VQA_QUESTIONS:
        rows["question_id"].append(qid)
        rows["question"].append(question)
        rows["image_id"].append(image_id)
        rows["image"].append(str(image_paths[image_id]) if embed_images else f"{image_id}.png")
        rows["answers"].append(
            [
                {"answer": a, "answer_confidence": "yes", "answer_id": j}
                for j, a in enumerate(VQA_ANSWERS[qid])
            ]
        )
        rows["multiple_choice_answer"].append(VQA_ANSWERS[qid][0])
        rows["answer_type"].append("other")
    return dict(rows)


def write_hf_vqa_folder(tmp: Path) -> Path:
    """A DatasetDict (train: 5 questions, validation: 2) with an Image feature, as VQAv2 on the hub."""
    import datasets

    rows = hf_vqa_rows(tmp, embed_images=True)
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "answers": datasets.List(
                {
                    "answer": datasets.Value("string"),
                    "answer_confidence": datasets.Value("string"),
                    "answer_id": datasets.Value("int64"),
                }
            ),
            "multiple_choice_answer": datasets.Value("string"),
            "answer_type": datasets.Value("string"),
        }
    )
    train = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": train, "validation": train.select([0, 1])}).save_to_disk(
        str(tmp / "vqa_hf")
    )
    return tmp / "vqa_hf"


def write_hf_captions_folder(tmp: Path) -> Path:
    """A DatasetDict (one split, ``test``) of Flickr-style caption lists with an Image feature."""
    import datasets

    images = [str(write_image(tmp / "imgs" / f"{i}.png", color=(i * 60, 0, 0))) for i in range(3)]
    features = datasets.Features(
        {
            "caption": datasets.List(datasets.Value("string")),
            "image": datasets.Image(),
            "img_id": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "caption": [["a red bus", "a bus"], ["a dog"], ["a pizza", " a pie "]],
            "image": images,
            "img_id": ["1000", "1001", "1002"],
        },
        features=features,
    )
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp / "flickr"))
    return tmp / "flickr"


# --------------------------------------------------------------------------- checks


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """(sha1, mtime_ns) of every file under ``root``: compare before/after reading."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p)] = (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out
