"""Caption files (rvqa.data.caption_files): COCO, Karpathy (COCO + Flickr30K), JSONL, text."""

from __future__ import annotations

from pathlib import Path

import pytest

from rvqa.config import ColumnMapping
from rvqa.data import (
    CaptionCorpus,
    CaptionRecord,
    read_coco_captions,
    read_jsonl_captions,
    read_karpathy_captions,
    read_text_captions,
)
from rvqa.errors import DataFormatError, UsageError
from tests.data_fixtures import (
    COCO_CAPTIONS,
    coco_captions_json,
    karpathy_json,
    snapshot,
    write_json,
)

# --------------------------------------------------------------------------- COCO


def test_coco_captions(tmp_path: Path) -> None:
    path = write_json(tmp_path / "captions_val2014.json", coco_captions_json())
    before = snapshot(tmp_path)
    corpus = read_coco_captions(path, images=tmp_path / "val2014")
    assert isinstance(corpus, CaptionCorpus) and len(corpus) == 4 and corpus.source == "coco"
    assert corpus.texts == [c.strip() for _, _, c in COCO_CAPTIONS]
    assert corpus.ids == [48, 67, 126, 219] and corpus.image_ids == [42, 42, 73, 9]
    assert corpus[0] == CaptionRecord(
        caption="A red bus driving down a city street.",
        caption_id=48,
        image_id=42,
        image=str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"),
    )
    assert read_coco_captions(path)[2].image is None  # no folder: no image path
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("annotations"), r"no top-level key 'annotations'"),
        (
            lambda d: d["annotations"][2].update(caption=17),
            r"annotations\[2\] \(id=126\): the caption must be a string, got 17",
        ),
        (
            lambda d: d["annotations"][1].update(caption="  \n"),
            r"annotations\[1\] \(id=67\): the caption is empty or whitespace only",
        ),
        (
            lambda d: d["annotations"][3].pop("caption"),
            r"annotations\[3\] \(id=219\) has no 'caption'",
        ),
        (
            lambda d: d["annotations"][3].update(image_id=5),
            r"annotations\[3\] \(id=219\): image_id 5 is not in the file's 'images'",
        ),
        (
            lambda d: d["annotations"][3].update(id=48),
            r"annotations\[3\] \(id=48\): duplicate caption id 48 \(also at .*annotations\[0\]",
        ),
    ],
)
def test_coco_errors(tmp_path: Path, mutate, message: str) -> None:
    data = coco_captions_json()
    mutate(data)
    path = write_json(tmp_path / "captions_val2014.json", data)
    with pytest.raises(DataFormatError, match=r"captions_val2014\.json: .*" + message):
        read_coco_captions(path)


def test_coco_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "captions.json"
    path.write_text('{"images": [], "annotations": [}')
    with pytest.raises(DataFormatError, match=r"captions\.json: malformed JSON .*line 1 column 32"):
        read_coco_captions(path)


# --------------------------------------------------------------------------- Karpathy


def test_karpathy_coco(tmp_path: Path) -> None:
    path = write_json(tmp_path / "dataset_coco.json", karpathy_json("coco"))
    before = snapshot(tmp_path)
    train = read_karpathy_captions(path, ["train", "restval"], images=tmp_path / "coco")
    assert train.texts == ["A red bus.", "A bus on a street.", "A dog on a couch."]
    assert train.ids == [100, 101, 102] and train.image_ids == [42, 42, 73]  # cocoid
    assert train[2].image == str(
        tmp_path / "coco" / "train2014" / "COCO_train2014_000000000073.jpg"
    )
    val = read_karpathy_captions(path, "val")
    assert val.texts == ["A pizza."] and val[0].image is None
    test = read_karpathy_captions(path, ["test"], images=tmp_path / "coco")
    assert test.image_ids == [11, 11] and test[0].image.endswith(
        "val2014/COCO_val2014_000000000011.jpg"
    )
    assert snapshot(tmp_path) == before


def test_karpathy_flickr(tmp_path: Path) -> None:
    path = write_json(tmp_path / "dataset_flickr30k.json", karpathy_json("flickr30k"))
    corpus = read_karpathy_captions(path, ["train"], images=tmp_path / "flickr30k-images")
    assert corpus.image_ids == [0, 0]  # imgid (no cocoid)
    assert corpus[0].image == str(tmp_path / "flickr30k-images" / "1000.jpg")


def test_karpathy_errors(tmp_path: Path) -> None:
    path = write_json(tmp_path / "dataset_coco.json", karpathy_json("coco"))
    with pytest.raises(
        UsageError,
        match=r"unknown Karpathy split\(s\) \['dev'\]; known splits: train, restval, val, test",
    ):
        read_karpathy_captions(path, ["train", "dev"])
    only_train = karpathy_json("coco")
    only_train["images"] = only_train["images"][:1]
    write_json(path, only_train)
    with pytest.raises(
        DataFormatError,
        match=r"dataset_coco\.json: no captions in split\(s\) val; the file has split\(s\): train",
    ):
        read_karpathy_captions(path, "val")
    bad = karpathy_json("coco")
    bad["images"][1]["sentences"][0]["raw"] = " "
    write_json(path, bad)
    with pytest.raises(
        DataFormatError,
        match=r"images\[1\] \(image_id=73\) sentences\[0\] \(sentid=102\): the caption is empty",
    ):
        read_karpathy_captions(path, ["train", "restval"])
    bad = karpathy_json("coco")
    del bad["images"][2]["filename"]
    write_json(path, bad)
    with pytest.raises(DataFormatError, match=r"images\[2\] has no 'filename'"):
        read_karpathy_captions(path)


# --------------------------------------------------------------------------- JSONL and text


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_text(
        '{"caption": " a red bus ", "id": "c1"}\n'
        "\n"
        '{"caption": "a dog", "image_id": 73, "image": "dog.jpg"}\n'
        '{"caption": "a pizza", "id": 7}\n'
    )
    before = snapshot(tmp_path)
    corpus = read_jsonl_captions(path, images=tmp_path / "imgs")
    assert corpus.texts == ["a red bus", "a dog", "a pizza"]
    assert corpus.ids == ["c1", 3, 7]  # missing id: the line number
    assert corpus.image_ids == [None, 73, None]
    assert corpus[1].image == str(tmp_path / "imgs" / "dog.jpg") and corpus[0].image is None
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            '{"caption": "ok"}\n{"caption": "x",,}\n',
            r"line 2: malformed JSON at column 17: Expecting property name",
        ),
        ('{"caption": "ok"}\n\n{"text": "x"}\n', r"line 3: no 'caption' key \(keys: 'text'\)"),
        ('{"caption": ""}\n', r"line 1: the caption is empty"),
        ('{"caption": ["a", "b"]}\n', r"line 1: the caption must be a string"),
        ('["a"]\n', r"line 1: expected a JSON object, got list"),
        (
            '{"caption": "a", "id": 1}\n{"caption": "b", "id": 1}\n',
            r"line 2: duplicate caption id 1 \(also at .*line 1\)",
        ),
        ("\n\n", r"the JSONL caption file has no \(non-blank\) line"),
    ],
)
def test_jsonl_errors(tmp_path: Path, lines: str, message: str) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_text(lines)
    with pytest.raises(DataFormatError, match=r"caps\.jsonl: " + message):
        read_jsonl_captions(path)


def test_jsonl_custom_keys(tmp_path: Path) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_text('{"text": "a cat", "sid": 5}\n')
    corpus = read_jsonl_captions(path, ColumnMapping(caption="text", caption_id="sid"))
    assert corpus.texts == ["a cat"] and corpus.ids == [5]


def test_text(tmp_path: Path) -> None:
    path = tmp_path / "caps.txt"
    path.write_text("\ufeffa red bus\n\n  a dog on a couch  \n   \na pizza")
    corpus = read_text_captions(path)
    assert corpus.texts == ["a red bus", "a dog on a couch", "a pizza"]
    assert corpus.ids == [1, 3, 5] and corpus.image_ids == [None] * 3 and corpus[0].image is None
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataFormatError, match=r"empty\.txt: the caption file has no"):
        read_text_captions(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(DataFormatError, match=r"bad\.txt: line 2: not UTF-8"):
        read_text_captions(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match=r"text captions file not found: .*nope\.txt"):
        read_text_captions(tmp_path / "nope.txt")
