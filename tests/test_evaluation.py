import dataclasses
import json

import pytest

from rvqa import RVQA
from rvqa.cli import main
from rvqa.config import load_config
from rvqa.data import load_vqa
from rvqa.evaluation import compare, evaluate_run
from rvqa.metrics import evaluate_vqa


@pytest.fixture(scope="module")
def model_and_records(tiny_run):
    model = RVQA.from_pretrained(tiny_run)
    records = list(load_vqa(load_config(None).data, "test"))[:40]
    return model, records


def test_evaluate_run_files(model_and_records, tmp_path):
    model, records = model_and_records
    run = evaluate_run(model, records, out_dir=tmp_path, split_name="test", show_progress=False)
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert preds == run.predictions and len(preds) == 40
    assert all(set(p) == {"question_id", "answer"} for p in preds)
    assert all(isinstance(p["question_id"], int) and isinstance(p["answer"], str) for p in preds)
    acc = json.loads((tmp_path / "accuracy.json").read_text())
    assert set(acc) == {"overall", "perQuestionType", "perAnswerType"}
    assert acc == evaluate_vqa(preds, records).to_json()
    lines = [json.loads(x) for x in (tmp_path / "evidence.jsonl").read_text().splitlines()]
    direct = model.answer(records[0].image, records[0].question)
    assert lines[0]["prediction"] == direct.answer
    assert [e["id"] for e in lines[0]["evidence"]] == [e.id for e in direct.evidence]
    assert "| overall |" in (tmp_path / "summary.md").read_text()


def test_split_without_annotations_gives_predictions_only(model_and_records, tmp_path):
    model, records = model_and_records
    unlabelled = [dataclasses.replace(r, answers=None) for r in records[:10]]
    run = evaluate_run(model, unlabelled, out_dir=tmp_path, show_progress=False)
    assert run.accuracy is None and len(run.predictions) == 10
    assert (tmp_path / "predictions.json").is_file() and not (tmp_path / "accuracy.json").exists()


def test_compare_one_row_per_condition(model_and_records, tmp_path):
    model, records = model_and_records
    name = model.registry.names[0]
    rows, table = compare(model, records, [(name, name), ("no retrieval", None)], out_dir=tmp_path)
    assert [r["condition"] for r in rows] == [name, "no retrieval"]
    assert table.splitlines()[0].startswith("| condition | overall |")
    assert "+0.00" in table.splitlines()[-1]
    assert json.loads((tmp_path / "compare.json").read_text()) == rows


def test_cli_compare_and_errors(tiny_run, tmp_path, capsys):
    rc = main(
        [
            "evaluate",
            "--model",
            str(tiny_run),
            "--split",
            "test",
            "--max-questions",
            "20",
            "--compare",
            "--out",
            str(tmp_path / "cmp"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "| tiny-captions |" in out and "| no retrieval |" in out
    rc = main(
        [
            "evaluate",
            "--model",
            str(tiny_run),
            "--split",
            "test",
            "--k",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--k must be ≥ 1" in err[0]
    rc = main(["evaluate", "--model", str(tiny_run), "--split", "nope", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "nope" in err[0]
