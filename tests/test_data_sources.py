"""Dispatch on a run config's source (rvqa.data.sources): load_vqa, load_captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rvqa.config import CaptionDataConfig, ColumnMapping, SplitFiles, VQADataConfig
from rvqa.data import (
    load_captions,
    load_vqa,
)
from rvqa.errors import ConfigError, DataFormatError, UsageError
from tests.data_fixtures import (
    coco_captions_json,
    karpathy_json,
    write_hf_captions_folder,
    write_hf_vqa_folder,
    write_json,
    write_vqa_split,
)


@pytest.fixture
def split(tmp_path: Path) -> dict[str, Path]:
    return write_vqa_split(tmp_path)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DatasetDict (train/validation) with an Image feature, as VQAv2 on the hub."""
    return write_hf_vqa_folder(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf_captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_captions_folder(tmp_path_factory.mktemp("hfcap"))


# --------------------------------------------------------------------------- load_vqa


def test_load_vqa_dispatch(split: dict[str, Path], hf_folder: Path) -> None:
    cfg = VQADataConfig(
        source="vqa",
        splits={
            "val": SplitFiles(
                questions=str(split["questions"]),
                images=str(split["images"]),
                annotations=str(split["annotations"]),
            )
        },
    )
    ds = load_vqa(cfg, "val")
    assert ds.split == "val" and len(ds) == 5 and ds.has_answers
    with pytest.raises(
        UsageError, match=r"unknown VQA split 'train'; known splits \(data.splits\): val"
    ):
        load_vqa(cfg, "train")
    cfg.splits["bad"] = SplitFiles()
    with pytest.raises(
        ConfigError, match="data.splits.bad: both 'questions' and 'images' must be set"
    ):
        load_vqa(cfg, "bad")
    assert len(load_vqa(VQADataConfig(), "test")) == 9673
    with pytest.raises(UsageError, match="known splits: train, test"):
        load_vqa(VQADataConfig(source="easy_vqa"), "validation")
    hf = VQADataConfig(source="datasets", path=str(hf_folder))
    assert len(load_vqa(hf, "validation")) == 2
    with pytest.raises(DataFormatError, match="known splits: train, validation"):
        load_vqa(hf, "test")
    with pytest.raises(ConfigError, match="data.path is not set"):
        load_vqa(VQADataConfig(source="datasets"), "train")


# --------------------------------------------------------------------------- load_captions


def test_load_captions_dispatch(tmp_path: Path, hf_captions: Path) -> None:
    coco = write_json(tmp_path / "captions_val2014.json", coco_captions_json())
    karpathy = write_json(tmp_path / "dataset_coco.json", karpathy_json("coco"))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"caption": "a cat"}) + "\n")
    text = tmp_path / "c.txt"
    text.write_text("a cat\na dog\n")

    assert len(load_captions(CaptionDataConfig(source="coco", path=str(coco)))) == 4
    k = CaptionDataConfig(source="karpathy", path=str(karpathy), images=str(tmp_path))
    assert len(load_captions(k)) == 3  # cfg.splits: train + restval
    assert load_captions(k, split="test").image_ids == [11, 11]  # split overrides cfg.splits
    assert len(load_captions(k, split=["val", "test"])) == 3
    assert load_captions(CaptionDataConfig(source="jsonl", path=str(jsonl))).texts == ["a cat"]
    assert load_captions(CaptionDataConfig(source="text", path=str(text))).ids == [1, 2]
    hf = CaptionDataConfig(
        source="datasets", path=str(hf_captions), columns=ColumnMapping(image_id="img_id")
    )
    assert len(load_captions(hf, split="test")) == 5

    easy = load_captions(CaptionDataConfig())  # default: easy_vqa train
    assert len(easy) == 4000 and easy.source == "easy_vqa" and easy.ids[0] == "easyvqa-train-0"
    assert easy[0].caption == "a blue rectangle" and Path(easy[0].image).is_file()
    assert len(load_captions(CaptionDataConfig(), split="test")) == 1000

    with pytest.raises(
        UsageError, match="unknown easy-vqa caption split 'val'; known splits: train, test"
    ):
        load_captions(CaptionDataConfig(), split="val")
    with pytest.raises(
        UsageError, match=r"caption source 'coco' has no splits \(got split='val'\)"
    ):
        load_captions(CaptionDataConfig(source="coco", path=str(coco)), split="val")
    with pytest.raises(ConfigError, match="captions source is 'text' but its 'path' is not set"):
        load_captions(CaptionDataConfig(source="text"))
    with pytest.raises(UsageError, match=r"unknown Karpathy split\(s\) \['dev'\]"):
        load_captions(k, split="dev")
