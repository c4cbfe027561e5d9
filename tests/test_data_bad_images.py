"""Bad images in a data set: named errors on load, or (skip_bad_images / --skip-bad-images) dropped with a count."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rvqa.cli import build_parser
from rvqa.config import CaptionDataConfig, SplitFiles, VQADataConfig, load_config
from rvqa.data import (
    CaptionCorpus,
    CaptionRecord,
    load_caption_split,
    load_image,
    load_vqa,
    read_vqa_files,
)
from rvqa.data.images import find_unreadable_images
from rvqa.errors import ImageLoadError, UsageError
from tests.data_fixtures import write_image, write_json

# image id -> what its file holds; every image has two questions.
KINDS = {1: "good", 2: "missing", 3: "truncated", 4: "text", 5: "gray16"}
BAD = {2: "file not found", 3: "corrupt or truncated", 4: "not an image file"}


def _name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / _name(1), size=(64, 48))
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(buf, "JPEG")
    (folder / _name(3)).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # cut JPEG
    (folder / _name(4)).write_text("not an image, a text file\n")
    values = np.array([[0, 257, 32768, 65535]] * 2, dtype=np.uint16)
    Image.fromarray(values).save(folder / _name(5), format="PNG")  # 16-bit gray, .jpg name


@pytest.fixture
def vqa_split(tmp_path: Path) -> SplitFiles:
    images = tmp_path / "val2014"
    _write_images(images)
    ids = [(image_id * 10 + k, image_id) for image_id in KINDS for k in range(2)]
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"question_id": q, "image_id": i, "question": f"What is in image {i}?"} for q, i in ids
        ],
    }
    answers = [{"answer": "yes", "answer_confidence": "yes", "answer_id": j} for j in range(10)]
    annotations = {
        "annotations": [
            {"question_id": q, "image_id": i, "answers": answers, "answer_type": "yes/no"}
            for q, i in ids
        ]
    }
    return SplitFiles(
        questions=str(write_json(tmp_path / "questions.json", questions)),
        annotations=str(write_json(tmp_path / "annotations.json", annotations)),
        images=str(images),
    )


def test_without_the_flag_records_load_and_images_fail_by_name(vqa_split: SplitFiles) -> None:
    ds = load_vqa(VQADataConfig(source="vqa", splits={"val": vqa_split}), "val")
    assert len(ds) == 10 and ds.image_ids == list(KINDS)  # nothing checked up front
    by_id = {r.image_id: r.image for r in ds}
    for image_id, reason in BAD.items():
        with pytest.raises(ImageLoadError, match=rf"{_name(image_id)}': {reason}") as err:
            load_image(by_id[image_id])
        assert err.value.path == by_id[image_id]
    gray = np.asarray(load_image(by_id[5]))  # I;16 converts, scaled to 8 bits
    assert gray.shape == (2, 4, 3) and list(gray[0, :, 0]) == [0, 1, 128, 255]
    assert load_image(by_id[1]).size == (64, 48)


def test_skip_bad_images_drops_their_questions_with_a_count(
    vqa_split: SplitFiles, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = VQADataConfig(source="vqa", splits={"val": vqa_split}, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="rvqa.data"):
        ds = load_vqa(cfg, "val")
    assert ds.image_ids == [1, 5] and ds.question_ids == [10, 11, 50, 51]
    assert all(load_image(r.image).mode == "RGB" for r in ds)
    (message,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert message.startswith("skipped 3 of 5 images of split 'val' (vqa: ")
    assert "that could not be read: " in message and message.endswith("dropped 6 of 10 questions")
    listed = message.split("that could not be read: ")[1].split("; ")
    assert [Path(item.split(" (")[0]).name for item in listed[:3]] == [_name(i) for i in BAD]
    for item, reason in zip(listed, BAD.values()):
        assert f"({reason}" in item


def test_check_images_is_the_same_check_and_fails(vqa_split: SplitFiles) -> None:
    ds = read_vqa_files(vqa_split.questions, vqa_split.annotations, vqa_split.images)
    bad = ds.unreadable_images(progress=False)
    assert sorted(bad) == sorted(BAD) and all(r.startswith(BAD[k]) for k, (_, r) in bad.items())
    with pytest.raises(
        ImageLoadError,
        match=rf"{_name(2)}': file not found; 3 of 5 images of split 'val2014' .* cannot be "
        rf"read: .*{_name(3)} \(corrupt or truncated.*{_name(4)} \(not an image file",
    ):
        read_vqa_files(
            vqa_split.questions, vqa_split.annotations, vqa_split.images, check_images=True
        )
    assert len(ds[:2].without_unreadable_images()) == 2  # nothing bad: unchanged
    with pytest.raises(ImageLoadError, match=r"1 of 1 images .*no question is left: is the image"):
        ds[2:4].without_unreadable_images()  # image 2 only, missing: nothing would be left


def test_skip_bad_images_for_captions(vqa_split: SplitFiles, tmp_path: Path) -> None:
    lines = [
        {"caption": f"caption {k} of image {i}", "id": i * 10 + k, "image": _name(i)}
        for i in KINDS
        for k in range(2)
    ]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = CaptionDataConfig(source="jsonl", path=str(path), images=vqa_split.images)
    assert len(load_caption_split(cfg, "train")) == 10
    cfg.skip_bad_images = True
    kept = load_caption_split(cfg, "train")
    assert [c.caption_id for c in kept] == [10, 11, 50, 51]
    # Captions without an image (e.g. COCO captions read without an image folder) are kept.
    text_only = CaptionCorpus.from_records(
        [CaptionRecord(caption="a dog", caption_id=1, image_id=7, image=None)]
    )
    assert len(text_only.without_unreadable_images()) == 1


def test_find_unreadable_images_in_a_bounded_pool(tmp_path: Path) -> None:
    # More images than the pool keeps in flight (4 per thread), bad ones scattered.
    paths = []
    for i in range(40):
        p = tmp_path / f"{i}.png"
        if i % 7 == 3:
            p.write_bytes(b"\x89PNG broken")
        elif i % 11 != 5:
            write_image(p, size=(8, 8))
        paths.append(str(p))
    bad = find_unreadable_images(iter(paths), num_threads=2, progress=False)
    assert bad == {
        i: ("not an image file PIL can identify" if i % 7 == 3 else "file not found")
        for i in range(40)
        if i % 7 == 3 or i % 11 == 5
    }
    assert find_unreadable_images([], progress=False) == {}


def test_premultiplied_la_converts_and_unsupported_modes_name_the_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    la = Image.fromarray(
        np.dstack([np.full((1, 2), 100, np.uint8), np.array([[255, 0]], np.uint8)]), mode="LA"
    ).convert("La")
    assert la.mode == "La" and tuple(np.asarray(load_image(la))[0, 0]) == (100, 100, 100)
    path = tmp_path / "cmyk.tif"
    Image.new("CMYK", (4, 4), (0, 255, 0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 0, 255)
    convert = Image.Image.convert

    def no_cmyk(self: Image.Image, mode: str | None = None, *args, **kwargs) -> Image.Image:
        if self.mode == "CMYK":  # a mode PIL cannot convert to RGB
            raise ValueError(f"conversion from {self.mode} to {mode} not supported")
        return convert(self, mode, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", no_cmyk)
    with pytest.raises(ImageLoadError, match=r"cmyk\.tif': image mode 'CMYK' has no conversion"):
        load_image(path)
    with pytest.raises(UsageError, match=r"PIL image of mode 'CMYK' cannot be converted to RGB"):
        load_image(Image.new("CMYK", (2, 2)))


@pytest.mark.parametrize(
    ("command", "key"),
    [
        ("train-reader", "data"),
        ("evaluate", "data"),
        ("train-retriever", "retriever.captions"),
        ("evaluate-retriever", "retriever.captions"),
    ],
)
def test_cli_flag_reaches_the_config(command: str, key: str) -> None:
    extra = {"evaluate": ["--model", "run", "--out", "o"], "evaluate-retriever": ["--model", "m"]}
    argv = [command, *extra.get(command, []), "--set", "reader.top_k=2", "--skip-bad-images"]
    args = build_parser().parse_args(argv)
    assert args.overrides == ["reader.top_k=2", f"{key}.skip_bad_images=true"]
    cfg = load_config(None, args.overrides)
    section = cfg.data if key == "data" else cfg.retriever.captions
    assert section.skip_bad_images is True
    other = cfg.retriever.captions if key == "data" else cfg.data
    assert other.skip_bad_images is False
    plain = build_parser().parse_args(argv[:-1])
    assert load_config(None, plain.overrides).data.skip_bad_images is False
