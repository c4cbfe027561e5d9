import dataclasses
import json
from pathlib import Path

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


# --------------------------------------------------------------------------- retrieve / evidence


def test_retrieve_then_read_equals_answer_batch(model_and_records):
    model, records = model_and_records
    images, questions = [r.image for r in records[:12]], [r.question for r in records[:12]]
    direct = model.answer_batch(images, questions)
    found = model.retrieve(images)
    assert found == [a.evidence for a in direct]
    again = model.answer_batch(images, questions, evidence=found)
    assert [a.answer for a in again] == [a.answer for a in direct]
    assert [a.score for a in again] == pytest.approx([a.score for a in direct], abs=1e-6)
    pairs = [[(e.text, e.score) for e in ev] for ev in found]
    as_pairs = model.answer_batch(images, questions, evidence=pairs)
    assert [a.answer for a in as_pairs] == [a.answer for a in direct]
    assert model.retrieve(images[:2], index=None) == [[], []]


def test_answer_batch_evidence_errors(model_and_records):
    model, records = model_and_records
    im, q = [records[0].image], [records[0].question]
    with pytest.raises(ValueError, match="do not pass top_k, index or rerank"):
        model.answer_batch(im, q, top_k=2, evidence=[[("a red circle", 0.5)]])
    with pytest.raises(ValueError, match="evidence for 2 questions but 1"):
        model.answer_batch(im, q, evidence=[[], []])
    with pytest.raises(TypeError, match=r"evidence\[0\]\[0\] must be an Evidence"):
        model.answer_batch(im, q, evidence=[["a red circle"]])
    with pytest.raises(ValueError, match=r"evidence\[0\]\[0\] is an empty caption"):
        model.answer_batch(im, q, evidence=[[(" ", 0.5)]])
    with pytest.raises(ValueError, match="fits at most"):
        model.answer_batch(im, q, evidence=[[("red", 0.1)] * (model.max_top_k + 1)])


def test_index_lookup_and_word_counts(model_and_records):
    import numpy as np

    model, _ = model_and_records
    index = model.registry.get(model.registry.names[0])
    q = np.random.default_rng(0).standard_normal((3, index.embed_dim)).astype("float32")
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores, rows = index._state.index.search(q, 4)
    res = index.search(q, 4)
    for r, hits in zip(rows, res):
        ids, caps = index.lookup(r)
        assert ids == hits.ids and caps == hits.captions
    counts = index.caption_word_counts()
    _, all_caps = index.lookup(range(len(index)))
    assert counts.tolist() == [len(c.split()) for c in all_caps]
    with pytest.raises(IndexError, match=f"row {len(index)} out of range"):
        index.lookup([0, len(index)])


# --------------------------------------------------------------------------- random control


class _FakeIndex:
    def __init__(self, captions):
        self.captions = captions

    def __len__(self):
        return len(self.captions)

    def caption_word_counts(self):
        import numpy as np

        return np.array([len(c.split()) for c in self.captions], dtype=np.int32)

    def lookup(self, rows):
        return [f"id{r}" for r in rows], [self.captions[r] for r in rows]


class _FakeRegistry:
    def __init__(self, **indices):
        self.indices = indices

    def get(self, name):
        return self.indices[name]


def test_random_captions_same_length_scores_kept_deterministic():
    from rvqa.evaluation import RandomCaptions
    from rvqa.pipeline import Evidence

    caps = [f"w{i} x" for i in range(50)] + [f"a b c {i}" for i in range(50)] + ["one"]
    reg = _FakeRegistry(A=_FakeIndex(caps), B=_FakeIndex(["p q r s t u", "p q"]))
    control = RandomCaptions(reg, seed=3)
    ev = [
        [Evidence("w3 x", 0.9, "A", "id3"), Evidence("a b c 7", 0.5, "A", "id57")],
        [Evidence("a b c d e f g", 0.4, "A", 1), Evidence("p q r", 0.3, "B", 0)],
        [Evidence("one", 0.2, "A", "id100")],
    ]
    out = control(ev, [10, 11, 12])
    assert [[(e.score, e.index) for e in row] for row in out] == [
        [(e.score, e.index) for e in row] for row in ev
    ]
    a, b = out[0]
    assert len(a.text.split()) == 2 and a.text != "w3 x" and a.text in caps
    assert len(b.text.split()) == 4 and b.text != "a b c 7"
    assert a.id == f"id{caps.index(a.text)}"
    # no 7-word caption in A: the nearest length (4); B has 6 and 2 words: 3 -> 2
    assert len(out[1][0].text.split()) == 4
    assert out[1][1].text == "p q"
    # the only 1-word caption is the retrieved one: it may come back
    assert out[2][0].text == "one"
    # per question id, independent of batch composition and order
    assert control(ev[::-1], [12, 11, 10]) == out[::-1]
    assert control(ev[:1], [10]) == out[:1]
    draws = {RandomCaptions(reg, seed=s)(ev[:1], [10])[0][0].text for s in range(10)}
    assert len(draws) > 3


def test_random_captions_on_real_index(model_and_records, tmp_path):
    from rvqa.evaluation import RandomCaptions

    model, records = model_and_records
    control = RandomCaptions(model.registry, seed=0)
    run = evaluate_run(
        model, records, control=control, out_dir=tmp_path, condition="rc", show_progress=False
    )
    real = model.retrieve([r.image for r in records])
    ev = [json.loads(x) for x in (tmp_path / "evidence.jsonl").read_text().splitlines()]
    index = model.registry.get(model.registry.names[0])
    lengths = set(index.caption_word_counts().tolist())
    changed = 0
    for row, true in zip(ev, real):
        assert [e["score"] for e in row["evidence"]] == [round(t.score, 6) for t in true]
        for e, t in zip(row["evidence"], true):
            assert (
                len(e["text"].split()) == len(t.text.split()) or len(t.text.split()) not in lengths
            )
            changed += e["text"] != t.text
    assert changed > 0.5 * sum(len(t) for t in real)
    swapped = control(real, [r.question_id for r in records])
    expect = model.answer_batch(
        [r.image for r in records], [r.question for r in records], evidence=swapped
    )
    assert [p["answer"] for p in run.predictions] == [a.answer for a in expect]


# --------------------------------------------------------------------------- report


class _Page:
    """Cards of a report page, parsed with the standard library."""

    def __init__(self, text):
        from html.parser import HTMLParser

        cards, srcs = [], []

        class P(HTMLParser):
            def handle_starttag(self, tag, attrs):
                a = dict(attrs)
                if tag == "div" and "card" in (a.get("class") or "").split():
                    cards.append((a["data-question-id"], a["class"].split()))
                for key in ("src", "href"):
                    if key in a:
                        srcs.append(a[key])

        P().feed(text)
        self.cards, self.srcs = cards, srcs


def test_report_self_contained_and_marked(model_and_records, tmp_path):
    import base64
    import io

    from PIL import Image

    model, records = model_and_records
    weird = dataclasses.replace(records[0], question="<script>alert(1)</script> what color?")
    recs = [weird, *records[1:]]
    run = evaluate_run(model, recs, out_dir=tmp_path, report=len(recs), show_progress=False)
    text = (tmp_path / "report.html").read_text()
    page = _Page(text)
    assert len(page.cards) == len(recs)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # only inlined images: no file, server or network reference
    assert page.srcs and all(s.startswith("data:image/jpeg;base64,") for s in page.srcs)
    im = Image.open(io.BytesIO(base64.b64decode(page.srcs[0].split(",", 1)[1])))
    assert im.format == "JPEG" and max(im.size) <= 160
    per_q = run.accuracy.per_question
    for qid, classes in page.cards:
        acc = per_q[int(qid)]
        want = "correct" if acc == 100 else "wrong" if acc == 0 else "partial"
        assert want in classes
    shown = {int(q) for q, _ in page.cards}
    assert shown == {r.question_id for r in recs}
    assert f"{run.accuracy.overall:.2f}" in text


def test_report_sample_and_errors_only(model_and_records, tmp_path):
    model, records = model_and_records
    evaluate_run(model, records, out_dir=tmp_path / "a", report=7, seed=1, show_progress=False)
    evaluate_run(
        model, records, index=None, out_dir=tmp_path / "b", report=7, seed=1, show_progress=False
    )
    a = _Page((tmp_path / "a" / "report.html").read_text()).cards
    b = _Page((tmp_path / "b" / "report.html").read_text()).cards
    assert len(a) == 7 and [q for q, _ in a] == [q for q, _ in b]  # same sample per seed
    run = evaluate_run(
        model, records, out_dir=tmp_path / "c", report=40, report_errors=True, show_progress=False
    )
    c = _Page((tmp_path / "c" / "report.html").read_text()).cards
    wrong = {q for q, a in run.accuracy.per_question.items() if a < 100}
    assert {int(q) for q, _ in c} == wrong
    assert all("correct" not in cls for _, cls in c)
    with pytest.raises(ValueError, match="report= needs out_dir"):
        evaluate_run(model, records, report=3, show_progress=False)
    with pytest.raises(ValueError, match="number of questions >= 0"):
        evaluate_run(model, records, out_dir=tmp_path, report=-1, show_progress=False)


def test_report_without_annotations(model_and_records, tmp_path):
    model, records = model_and_records
    unlabelled = [dataclasses.replace(r, answers=None) for r in records[:5]]
    evaluate_run(model, unlabelled, out_dir=tmp_path, report=5, show_progress=False)
    text = (tmp_path / "report.html").read_text()
    assert "predictions only" in text and len(_Page(text).cards) == 5
    assert "✔" not in text and "✘" not in text


def test_cli_compare_random_control_and_report(tiny_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["evaluate", "--model", str(tiny_run), "--split", "test", "--max-questions", "16"]
    rc = main([*args, "--compare", "--random-captions", "--report", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("|")]
    assert rows[:1] + rows[2:] == ["condition", "tiny-captions", "random captions", "no retrieval"]
    saved = json.loads((out / "compare.json").read_text())
    assert [r["condition"] for r in saved] == rows[2:]
    pages = sorted(p.parent.name for p in out.glob("*/report.html"))
    assert pages == ["no_retrieval", "random_captions", "tiny-captions"]
    assert "reports:" in text
    rc = main([*args, "--no-retrieval", "--random-captions", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--random-captions" in err[0]
    rc = main([*args, "--report", "-2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "--report must be" in err[0]


def test_cli_compare_two_indices_and_control_on_first(tiny_run, tmp_path, capsys):
    """Two index folders → one row each, the control replaces the first one's retrieval."""
    from tests.test_pipeline import OTHER_CAPTIONS, write_other_index

    model = RVQA.from_pretrained(tiny_run)
    first = Path(model.registry.get(model.registry.names[0]).path)
    other = write_other_index(tiny_run, tmp_path / "idx" / "other-captions", model.retriever)
    out = tmp_path / "cmp"
    args = ["evaluate", "--model", str(tiny_run), "--split", "test", "--max-questions", "12"]
    rc = main(
        [*args, "--compare", "--index", str(first), "--index", str(other), "--random-captions"]
        + ["--out", str(out)]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    text = captured.out
    rows = [r["condition"] for r in json.loads((out / "compare.json").read_text())]
    control = f"random captions ({first.name})"
    assert rows == [first.name, "other-captions", control, "no retrieval"]
    assert all(f"| {r} |" in text for r in rows)

    def evidence(sub):
        lines = (out / sub / "evidence.jsonl").read_text().splitlines()
        return [e for line in lines for e in json.loads(line)["evidence"]]

    assert {e["text"] for e in evidence("other-captions")} <= set(OTHER_CAPTIONS)
    drawn = evidence("random_captions_" + first.name)
    real = evidence(first.name)
    assert drawn and {e["index"] for e in drawn} == {first.name}
    assert [e["score"] for e in drawn] == [e["score"] for e in real]
    assert not set(OTHER_CAPTIONS) & {e["text"] for e in drawn}
