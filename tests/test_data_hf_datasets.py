"""`datasets` datasets (rvqa.data.hf_datasets): VQA splits and caption corpora from folders, files and hub names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from rvqa.config import ColumnMapping
from rvqa.data import (
    load_image,
    read_captions_datasets,
    read_vqa_datasets,
)
from rvqa.errors import DataFormatError
from tests.data_fixtures import (
    VQA_ANSWERS,
    VQA_IMAGE_IDS,
    hf_vqa_rows,
    snapshot,
    write_hf_captions_folder,
    write_hf_vqa_folder,
)

# --------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DatasetDict (train/validation) with an Image feature, as VQAv2 on the hub."""
    return write_hf_vqa_folder(tmp_path_factory.mktemp("hf"))


def test_datasets_folder_with_image_feature(hf_folder: Path) -> None:
    before = snapshot(hf_folder)
    ds = read_vqa_datasets(str(hf_folder), "train", ColumnMapping())
    assert len(ds) == 5 and ds.has_answers and ds.source == "datasets" and ds.split == "train"
    r = ds[1]
    assert r.question_id == 42001 and r.image_id == 42 and r.answers == tuple(VQA_ANSWERS[42001])
    assert r.question_type is None  # default-named column absent: field unknown
    assert r.answer_type == "other" and r.multiple_choice_answer == "4"
    assert isinstance(r.image, Image.Image) and load_image(r.image).size == (32, 24)
    assert ds.image_ids == list(VQA_IMAGE_IDS) and ds.missing_images() == []
    assert len(read_vqa_datasets(str(hf_folder), "validation")) == 2
    assert snapshot(hf_folder) == before


def test_datasets_unknown_split_and_columns(hf_folder: Path) -> None:
    with pytest.raises(
        DataFormatError, match="has no split 'test'; known splits: train, validation"
    ):
        read_vqa_datasets(str(hf_folder), "test", ColumnMapping())
    with pytest.raises(
        DataFormatError,
        match=r"column 'text' \(columns.question\) not found; available columns: question_id, question, image_id, image, answers",
    ):
        read_vqa_datasets(str(hf_folder), "train", ColumnMapping(question="text"))
    with pytest.raises(
        DataFormatError, match=r"column 'qtype' \(columns.question_type\) not found"
    ):
        read_vqa_datasets(str(hf_folder), "train", ColumnMapping(question_type="qtype"))


def test_datasets_single_dataset_with_paths_and_string_answers(tmp_path: Path) -> None:
    import datasets

    rows = hf_vqa_rows(tmp_path, embed_images=False)
    rows["answers"] = [[a["answer"] for a in ans] for ans in rows["answers"]]
    rows["path"] = rows.pop("image")
    rows["qid"] = [str(q) for q in rows.pop("question_id")]
    del rows["image_id"]
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "flat"))
    columns = ColumnMapping(image="path", question_id="qid")
    ds = read_vqa_datasets(
        str(tmp_path / "flat"), "val", columns, image_root=str(tmp_path / "imgs")
    )
    r = ds[0]
    assert r.question_id == 42000 and r.answers == tuple(VQA_ANSWERS[42000])
    assert r.image == str(tmp_path / "imgs" / "42.png") and r.image_id == r.image  # path as id
    assert ds.image_ids == [str(tmp_path / "imgs" / f"{i}.png") for i in VQA_IMAGE_IDS]
    ds.check_images()


def test_datasets_dict_of_lists_answers_and_json_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    lines = [
        {
            "question": "what?",
            "image": "a.png",
            "answers": {"answer": ["x", "y"], "answer_id": [1, 2]},
        },
        {"question": "why?", "image": "b.png", "answers": {"answer": ["z"], "answer_id": [1]}},
    ]
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = read_vqa_datasets(str(path), "train", ColumnMapping())
    assert [r.answers for r in ds] == [("x", "y"), ("z",)]
    assert [r.question_id for r in ds] == [0, 1]  # no question_id column: row index
    with pytest.raises(DataFormatError, match="known splits: train"):
        read_vqa_datasets(str(path), "val", ColumnMapping())


def test_datasets_single_string_answers_repeated(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict(
        {"question": ["q?"], "image": ["a.png"], "answer": ["yes"]}
    ).save_to_disk(str(tmp_path / "d"))
    ds = read_vqa_datasets(str(tmp_path / "d"), "train", ColumnMapping(answers="answer"))
    assert ds[0].answers == ("yes",) * 10


def test_datasets_hub_name_offline_is_wrapped() -> None:
    with pytest.raises(
        DataFormatError,
        match=r"could not load 'no-such-user/no-such-vqa': it is not a local folder or file",
    ):
        read_vqa_datasets("no-such-user/no-such-vqa", "train", ColumnMapping())


# --------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def hf_captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_captions_folder(tmp_path_factory.mktemp("hfcap"))


def test_datasets_list_captions_with_images(hf_captions: Path) -> None:
    before = snapshot(hf_captions)
    columns = ColumnMapping(image_id="img_id")
    corpus = read_captions_datasets(str(hf_captions), None, columns)  # the only split
    assert corpus.texts == ["a red bus", "a bus", "a dog", "a pizza", "a pie"]
    assert corpus.ids == ["0-0", "0-1", "1-0", "2-0", "2-1"]  # no "id" column: row index
    assert corpus.image_ids == ["1000", "1000", "1001", "1002", "1002"]
    image = corpus[3].image
    assert isinstance(image, Image.Image) and load_image(image).getpixel((0, 0))[0] == 120
    assert snapshot(hf_captions) == before
    with pytest.raises(DataFormatError, match="has no split 'train'; known splits: test"):
        read_captions_datasets(str(hf_captions), "train", columns)
    with pytest.raises(
        DataFormatError,
        match=r"column 'text' \(columns.caption\) not found; available columns: caption, image, img_id",
    ):
        read_captions_datasets(str(hf_captions), "test", ColumnMapping(caption="text"))


def test_datasets_scalar_captions_and_bad_caption(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict(
        {"caption": ["a cat", "a dog"], "id": [10, 11], "image": ["c.jpg", "d.jpg"]}
    ).save_to_disk(str(tmp_path / "d"))
    corpus = read_captions_datasets(
        str(tmp_path / "d"), columns=ColumnMapping(), image_root="/data"
    )
    assert corpus.ids == [10, 11] and corpus.image_ids == ["c.jpg", "d.jpg"]
    assert corpus[1].image == "/data/d.jpg"
    datasets.Dataset.from_dict({"caption": ["a cat", "   "]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(
        DataFormatError, match=r"datasets dataset '.*bad' row 1: the caption is empty"
    ):
        read_captions_datasets(str(tmp_path / "bad"))
