"""``rvqa ask``: JSON and text output against RVQA.answer, and one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import easy_vqa
import pytest

from rvqa import RVQA
from rvqa.cli import main

QUESTION = "what color is the shape?"
RUN_INDEX = "tiny-captions"


@pytest.fixture(scope="module")
def model(tiny_run):
    return RVQA.from_pretrained(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def image():
    return easy_vqa.get_test_image_paths()[0]


@pytest.fixture(scope="module")
def other_index(tiny_run, model, tmp_path_factory):
    """A second index (other captions, same retriever), in a folder named other-captions."""
    from rvqa.indexing import build_index_from_config
    from tests.tiny import tiny_run_config

    d = tmp_path_factory.mktemp("cli-other")
    jsonl = d / "captions.jsonl"
    captions = ["a dog on a beach", "a bowl of soup", "two trains", "a red bicycle"]
    jsonl.write_text("".join(json.dumps({"caption": c}) + "\n" for c in captions))
    cfg = tiny_run_config(tiny_run.parent)
    return build_index_from_config(
        cfg, retriever=model.retriever, captions=str(jsonl), out=d / "other-captions"
    )


def ask(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["ask", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_matches(data: dict, want) -> None:
    assert data["question"] == want.question
    assert data["answer"] == want.answer
    assert data["score"] == pytest.approx(want.score, abs=1e-6)
    assert [a["answer"] for a in data["alternatives"]] == [a for a, _ in want.alternatives]
    got_ev = [(e["text"], e["index"], e["id"]) for e in data["evidence"]]
    assert got_ev == [(e.text, e.index, e.id) for e in want.evidence]
    assert [e["score"] for e in data["evidence"]] == pytest.approx(
        [e.score for e in want.evidence], abs=1e-6
    )


def test_ask_json_matches_the_api(capsys, tiny_run, model, image):
    rc, out, err = ask(
        capsys, "--model", tiny_run, "--image", image, "--question", QUESTION, "--json"
    )
    assert rc == 0, err
    data = json.loads(out)
    want = model.answer(image, QUESTION)
    assert_matches(data, want)
    assert len(data["evidence"]) == model.default_top_k
    assert {e["index"] for e in data["evidence"]} == {RUN_INDEX}


def test_ask_json_options(capsys, tiny_run, model, image, other_index):
    base = ["--model", tiny_run, "--image", image, "--question", QUESTION, "--json"]

    rc, out, _ = ask(capsys, *base, "--no-retrieval", "--device", "cpu")
    assert rc == 0
    assert_matches(json.loads(out), model.answer(image, QUESTION, index=None))
    assert json.loads(out)["evidence"] == []

    rc, out, _ = ask(capsys, *base, "--index", RUN_INDEX, "--top-k", "4")
    assert rc == 0
    assert_matches(json.loads(out), model.answer(image, QUESTION, top_k=4, index=RUN_INDEX))

    # A folder is loaded under its folder name; several --index are merged by score.
    m = RVQA.from_pretrained(tiny_run, device="cpu")
    m.load_index(other_index)
    rc, out, _ = ask(capsys, *base, "--index", other_index, "--top-k", "3")
    assert rc == 0
    data = json.loads(out)
    assert {e["index"] for e in data["evidence"]} == {"other-captions"}
    assert_matches(data, m.answer(image, QUESTION, top_k=3, index="other-captions"))
    rc, out, _ = ask(capsys, *base, "--index", other_index, "--index", RUN_INDEX, "--top-k", "5")
    assert rc == 0
    want = m.answer(image, QUESTION, top_k=5, index=["other-captions", RUN_INDEX])
    assert_matches(json.loads(out), want)


def test_ask_text_output(capsys, tiny_run, model, image):
    rc, out, err = ask(
        capsys, "--model", tiny_run, "--image", image, "--question", QUESTION, "--top-k", "3"
    )
    assert rc == 0, err
    want = model.answer(image, QUESTION, top_k=3)
    assert f"Q: {QUESTION}" in out
    assert f"A: {want.answer}  (score {want.score:.3f})" in out
    assert want.alternatives[0][0] in out
    evidence_lines = out.split("Evidence (3 captions, best first):\n", 1)[1].splitlines()[1:]
    assert len(evidence_lines) == 3
    for line, e in zip(evidence_lines, want.evidence):
        assert line.split()[:3] == [f"{e.score:.3f}", e.index, str(e.id)]
        assert line.endswith(e.text)

    rc, out, _ = ask(
        capsys, "--model", tiny_run, "--image", image, "--question", QUESTION, "--no-retrieval"
    )
    assert rc == 0
    assert "Evidence: none (answered without retrieval)" in out


@pytest.mark.parametrize(
    ("change", "extra", "match"),
    [
        ({"--image": "MISSING"}, [], r"cannot load image '.*missing\.png': file not found"),
        ({"--image": "BROKEN"}, [], r"cannot load image '.*broken\.png': corrupt"),
        ({"--question": "   "}, [], "--question is empty"),
        ({}, ["--top-k", "0"], "--top-k must be ≥ 1, got 0"),
        ({}, ["--top-k", "99"], "top_k=99 is more captions than the reader's text fits"),
        ({}, ["--index", "nope"], r"index 'nope' is neither .*\(loaded: tiny-captions\)"),
        ({}, ["--index", RUN_INDEX, "--no-retrieval"], "--index and --no-retrieval exclude"),
        ({"--model": "NOWHERE"}, [], "run folder .*nowhere does not exist"),
        ({}, ["--device", "gpu"], "unknown device 'gpu'"),
    ],
    ids=[
        "missing-image",
        "corrupt-image",
        "empty-question",
        "top-k-0",
        "top-k-too-big",
        "unknown-index",
        "index-and-no-retrieval",
        "missing-run",
        "bad-device",
    ],
)
def test_ask_errors_are_one_line(capsys, tiny_run, image, tmp_path, change, extra, match):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)
    placeholders = {
        "MISSING": tmp_path / "missing.png",
        "BROKEN": broken,
        "NOWHERE": tmp_path / "nowhere",
    }
    values = {"--model": tiny_run, "--image": image, "--question": QUESTION}
    values.update({k: placeholders.get(v, v) for k, v in change.items()})
    rc, out, err = ask(capsys, *[x for kv in values.items() for x in kv], *extra)
    assert rc == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rvqa ask: error: ")
    assert re.search(match, lines[0]), lines[0]


def test_ask_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ask", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--image", "--question", "--index", "--no-retrieval", "--top-k"):
        assert opt in out
    assert "--json" in out and "--device" in out


def test_ask_in_a_real_process_prints_only_the_result_or_one_error(tiny_run, image):
    """No loading bars or INFO logs around the answer (what a user's terminal shows),
    except the one placement line every model command logs (rvqa.distributed)."""
    base = [sys.executable, "-m", "rvqa", "ask", "--model", str(tiny_run), "--image", image]
    ok = subprocess.run(
        [*base, "--question", QUESTION, "--json"], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["question"] == QUESTION
    lines = ok.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        "rvqa placement: stage=ask rank=0/1 retriever=cpu reader=cpu index.tiny-captions=faiss-cpu"
    ), ok.stderr
    bad = subprocess.run(
        [*base, "--question", QUESTION, "--index", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "rvqa ask: error: index 'nope' is neither an index folder nor the name of a loaded "
        "index (loaded: tiny-captions)"
    ]
