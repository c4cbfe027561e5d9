"""Official VQAv2/OK-VQA files (rvqa.data.official): reading, lazy or up-front image checks, every malformed-file error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from rvqa.data import (
    VQADataset,
    VQARecord,
    load_image,
    read_vqa_files,
)
from rvqa.errors import DataFormatError, ImageLoadError
from tests.data_fixtures import (
    VQA_ANSWERS,
    VQA_IMAGE_IDS,
    VQA_QUESTIONS,
    snapshot,
    vqa_annotations_json,
    vqa_questions_json,
    write_json,
    write_vqa_split,
)

# --------------------------------------------------------------------------- official files


@pytest.fixture
def split(tmp_path: Path) -> dict[str, Path]:
    return write_vqa_split(tmp_path)


def test_read_official_split(split: dict[str, Path]) -> None:
    ds = read_vqa_files(split["questions"], split["annotations"], split["images"])
    assert isinstance(ds, VQADataset) and len(ds) == len(VQA_QUESTIONS)
    assert ds.split == "val2014" and ds.source == "vqa" and ds.has_answers
    assert ds.image_ids == list(VQA_IMAGE_IDS)  # unique, in order of first appearance
    assert ds.question_ids == [q[0] for q in VQA_QUESTIONS]
    r = ds[1]
    assert r == VQARecord(
        question_id=42001,
        question="How many wheels are visible?",
        image=str(split["images"] / "COCO_val2014_000000000042.jpg"),
        image_id=42,
        answers=tuple(VQA_ANSWERS[42001]),  # all 10, in file order
        question_type="how many",
        answer_type="number",
        multiple_choice_answer="4",
    )
    assert ds[-1].question_id == 9001 and [x.question_id for x in ds] == ds.question_ids
    assert load_image(r.image).size == (32, 24)
    ds.check_images()  # all present: no error


def test_official_split_without_annotations(split: dict[str, Path]) -> None:
    ds = read_vqa_files(split["questions"], None, split["images"], split_name="my-test")
    assert ds.split == "my-test" and not ds.has_answers
    assert all(r.answers is None and r.answer_type is None for r in ds)


def test_ok_vqa_format(tmp_path: Path) -> None:
    # OK-VQA: same layout; answers carry "raw_answer" and repeat 5 answers twice.
    paths = write_vqa_split(tmp_path)
    ann = vqa_annotations_json()
    for a in ann["annotations"]:
        a["question_type"], a["answer_type"] = "one", "other"
        for ans in a["answers"]:
            ans["raw_answer"] = ans["answer"]
    write_json(paths["annotations"], ann)
    ds = read_vqa_files(paths["questions"], paths["annotations"], paths["images"])
    assert ds[0].question_type == "one" and len(ds[0].answers) == 10


def test_data_subtype_inferred_from_folder(tmp_path: Path) -> None:
    paths = write_vqa_split(tmp_path, questions=vqa_questions_json(subtype=None))
    ds = read_vqa_files(paths["questions"], None, paths["images"])
    assert ds.split == "val2014" and ds[0].image.endswith("COCO_val2014_000000000042.jpg")
    ds.check_images()
    odd = tmp_path / "my_images"
    odd.mkdir()
    with pytest.raises(DataFormatError, match=r"questions.json: .*no 'data_subtype'.*'my_images'"):
        read_vqa_files(paths["questions"], None, odd)


def test_test_dev_uses_test2015_images(tmp_path: Path) -> None:
    paths = write_vqa_split(tmp_path, subtype="test-dev2015")
    ds = read_vqa_files(paths["questions"], None, paths["images"], check_images=True)
    assert Path(ds[0].image).name == "COCO_test2015_000000000042.jpg"


def test_missing_images_checked_lazily_or_on_request(split: dict[str, Path]) -> None:
    (split["images"] / "COCO_val2014_000000000073.jpg").unlink()
    ds = read_vqa_files(split["questions"], split["annotations"], split["images"])  # lazy: fine
    assert ds.missing_images() == [str(split["images"] / "COCO_val2014_000000000073.jpg")]
    with pytest.raises(
        ImageLoadError,
        match=r"COCO_val2014_000000000073\.jpg': file not found; 1 of 3 images of split "
        r"'val2014' \(vqa: .*questions\.json \+ .*annotations\.json\) cannot be read$",
    ):
        ds.check_images()
    with pytest.raises(ImageLoadError, match="COCO_val2014_000000000073.jpg"):
        read_vqa_files(split["questions"], split["annotations"], split["images"], check_images=True)


def test_reading_modifies_nothing(split: dict[str, Path], tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    ds = read_vqa_files(split["questions"], split["annotations"], split["images"])
    ds.check_images()
    for r in ds:
        load_image(r.image)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- official: errors


def _write_questions(paths: dict[str, Path], mutate) -> Path:
    data = vqa_questions_json()
    mutate(data)
    return write_json(paths["questions"], data)


def _write_annotations(paths: dict[str, Path], mutate) -> Path:
    data = vqa_annotations_json()
    mutate(data)
    return write_json(paths["annotations"], data)


def test_malformed_json_names_file_and_position(split: dict[str, Path]) -> None:
    split["questions"].write_text('{"questions": [\n  {"image_id": 42,,}\n]}')
    with pytest.raises(
        DataFormatError, match=r"questions\.json: malformed JSON .* at line 2 column"
    ):
        read_vqa_files(split["questions"], None, split["images"])
    split["annotations"].write_text("")
    write_json(split["questions"], vqa_questions_json())
    with pytest.raises(
        DataFormatError, match=r"annotations\.json: malformed JSON .*line 1 column 1"
    ):
        read_vqa_files(split["questions"], split["annotations"], split["images"])


def test_missing_files(split: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="questions file not found: .*nope.json"):
        read_vqa_files(tmp_path / "nope.json", None, split["images"])
    with pytest.raises(FileNotFoundError, match="annotations file not found: .*nope.json"):
        read_vqa_files(split["questions"], tmp_path / "nope.json", split["images"])


def test_missing_top_level_keys(split: dict[str, Path]) -> None:
    _write_questions(split, lambda d: d.pop("questions"))
    with pytest.raises(
        DataFormatError,
        match=r"questions\.json: the questions file has no top-level key 'questions'",
    ):
        read_vqa_files(split["questions"], None, split["images"])
    write_json(split["questions"], vqa_questions_json())
    _write_annotations(split, lambda d: d.pop("annotations"))
    with pytest.raises(
        DataFormatError, match=r"annotations\.json: .*no top-level key 'annotations'"
    ):
        read_vqa_files(split["questions"], split["annotations"], split["images"])
    write_json(split["questions"], [1, 2])
    with pytest.raises(DataFormatError, match="expected a JSON object at the top level"):
        read_vqa_files(split["questions"], None, split["images"])


@pytest.mark.parametrize("key", ["question", "image_id", "question_id"])
def test_question_missing_key(split: dict[str, Path], key: str) -> None:
    _write_questions(split, lambda d: d["questions"][2].pop(key))
    qid = "None" if key == "question_id" else "73000"
    with pytest.raises(
        DataFormatError,
        match=rf"questions\.json: questions\[2\] \(question_id={qid}\) has no '{key}'",
    ):
        read_vqa_files(split["questions"], split["annotations"], split["images"])


def test_question_bad_values(split: dict[str, Path]) -> None:
    _write_questions(split, lambda d: d["questions"][1].update(question_id="x"))
    with pytest.raises(DataFormatError, match=r"questions\[1\].*'question_id' must be an integer"):
        read_vqa_files(split["questions"], None, split["images"])
    _write_questions(split, lambda d: d["questions"][3].update(question_id=42000))
    with pytest.raises(
        DataFormatError,
        match=r"questions\[3\] \(question_id=42000\): duplicate question_id, also at questions\[0\]",
    ):
        read_vqa_files(split["questions"], None, split["images"])


def test_annotation_without_answers(split: dict[str, Path]) -> None:
    _write_annotations(split, lambda d: d["annotations"][1].pop("answers"))
    with pytest.raises(
        DataFormatError,
        match=r"annotations\.json: annotations\[1\] \(question_id=42001\) has no 'answers'",
    ):
        read_vqa_files(split["questions"], split["annotations"], split["images"])
    _write_annotations(split, lambda d: d["annotations"][1]["answers"][3].pop("answer"))
    with pytest.raises(
        DataFormatError, match=r"annotations\[1\] \(question_id=42001\): answers\[3\] must be"
    ):
        read_vqa_files(split["questions"], split["annotations"], split["images"])


def test_annotation_for_unknown_question(split: dict[str, Path]) -> None:
    _write_annotations(split, lambda d: d["annotations"][4].update(question_id=123))
    with pytest.raises(
        DataFormatError,
        match=r"annotations\[4\] \(question_id=123\): this question_id is not in the questions file",
    ):
        read_vqa_files(split["questions"], split["annotations"], split["images"])


def test_questions_without_annotations(split: dict[str, Path]) -> None:
    _write_annotations(split, lambda d: d["annotations"].pop(1))
    with pytest.raises(
        DataFormatError,
        match=r"annotations\.json: 1 of 5 questions have no annotation, e\.g\. question_id 42001",
    ):
        read_vqa_files(split["questions"], split["annotations"], split["images"])


def test_image_id_mismatch(split: dict[str, Path]) -> None:
    _write_annotations(split, lambda d: d["annotations"][2].update(image_id=9))
    with pytest.raises(
        DataFormatError,
        match=r"annotations\[2\] \(question_id=73000\): image_id 9 differs from the question's image_id 73",
    ):
        read_vqa_files(split["questions"], split["annotations"], split["images"])


def test_duplicate_annotation(split: dict[str, Path]) -> None:
    _write_annotations(split, lambda d: d["annotations"].append(copy.deepcopy(d["annotations"][0])))
    with pytest.raises(
        DataFormatError,
        match=r"annotations\[5\] \(question_id=42000\): duplicate annotation, also at annotations\[0\]",
    ):
        read_vqa_files(split["questions"], split["annotations"], split["images"])
