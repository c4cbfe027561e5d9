"""Streaming JSON (rvqa.data._json.stream_json): same values as json.load, any key order, positions of errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rvqa.data import _json, read_vqa_files
from rvqa.errors import DataFormatError
from tests.data_fixtures import vqa_questions_json, write_vqa_split


@pytest.fixture
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read 7 bytes at a time, so items, keys and errors straddle chunk boundaries."""
    monkeypatch.setattr(_json, "_CHUNK", 7)


def test_items_and_values_as_json_load(tmp_path: Path, tiny_chunks: None) -> None:
    doc = {
        "questions": [{"question_id": i, "score": i / 4, "text": f"q é {i}"} for i in range(25)],
        "other": {"nested": [1, 2]},
        "data_subtype": "val2014",  # after the array: order of top-level keys is free
    }
    path = tmp_path / "q.json"
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    values = {"data_subtype": None, "absent": "kept"}
    got = list(_json.stream_json(path, "questions", ["questions"], values))
    assert got == [("questions", i, q) for i, q in enumerate(doc["questions"])]
    assert type(got[1][2]["score"]) is float and type(got[1][2]["question_id"]) is int
    assert values == {"data_subtype": "val2014", "absent": "kept"}


def test_arrays_come_one_after_the_other(tmp_path: Path, tiny_chunks: None) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"annotations": [1, 2, 3], "images": [{"id": 1}]}))
    got = list(_json.stream_json(path, "COCO captions", ["images", "annotations"]))
    assert got == [
        ("images", 0, {"id": 1}),
        ("annotations", 0, 1),
        ("annotations", 1, 2),
        ("annotations", 2, 3),
    ]


def test_items_arrive_before_the_end_of_the_file(tmp_path: Path, tiny_chunks: None) -> None:
    # Streaming, not load-then-iterate: the first items come out before the parser
    # reaches the broken tail of the file.
    path = tmp_path / "q.json"
    path.write_text('{"questions": [' + ", ".join(["1"] * 50) + ", }")
    seen = []
    with pytest.raises(DataFormatError, match=r"malformed JSON in questions file at line 1"):
        for _, _, item in _json.stream_json(path, "questions", ["questions"]):
            seen.append(item)
    assert len(seen) >= 40


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_error_position_matches_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(_json, "_CHUNK", chunk)
    text = '{"questions": [\n' + ",\n".join(['  {"a": 1}'] * 30) + ',\n  {"a": 1,,}\n]}'
    path = tmp_path / "q.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    e = ref.value
    with pytest.raises(
        DataFormatError,
        match=rf"q\.json: malformed JSON in questions file at line {e.lineno} column {e.colno} "
        rf"\(byte {e.pos}\): parse error: .* near '.*,,\}}",
    ):
        list(_json.stream_json(path, "questions", ["questions"]))


def test_not_utf8_names_the_byte(tmp_path: Path, tiny_chunks: None) -> None:
    path = tmp_path / "q.json"
    path.write_bytes(b'{"questions": [\n "ok", "caf\xe9"]}')
    with pytest.raises(
        DataFormatError,
        match=r"q\.json: questions file is not UTF-8 text: invalid bytes in the string ending at "
        r"line 2 column 13 \(byte 28\)",
    ):
        list(_json.stream_json(path, "questions", ["questions"]))


def test_official_questions_with_data_subtype_last(tmp_path: Path, tiny_chunks: None) -> None:
    data = vqa_questions_json()
    subtype = data.pop("data_subtype")
    data["data_subtype"] = subtype  # json.dumps keeps insertion order: now after "questions"
    paths = write_vqa_split(tmp_path, questions=data)
    assert list(json.loads(paths["questions"].read_text()))[-1] == "data_subtype"
    ds = read_vqa_files(paths["questions"], paths["annotations"], paths["images"])
    assert ds.split == "val2014" and ds[0].image.endswith("COCO_val2014_000000000042.jpg")
    assert len(ds) == len(data["questions"])
