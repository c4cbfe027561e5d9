"""Evaluation runs: ``rvqa evaluate`` — official VQA accuracy over a split, with files.

For one model and one retrieval condition, :func:`evaluate_run` answers every
question of a split in batches and writes into ``out_dir``:

- ``predictions.json``: the official results format ``[{"question_id", "answer"}]``
  (ready for the challenge server);
- ``accuracy.json``: the official accuracy schema (overall / perQuestionType /
  perAnswerType, ×100, two decimals) — absent for splits without annotations;
- ``evidence.jsonl``: per question, the prediction, its score and the retrieved
  captions (text, score, index, id);
- ``summary.md``: a short human-readable summary.

:func:`compare` runs several conditions (each index alone, no retrieval) and
returns one table with the difference to no retrieval.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rvqa.io import write_text_atomic


@dataclass
class EvalRun:
    """The outcome of :func:`evaluate_run`."""

    condition: str
    predictions: list[dict]
    accuracy: Any | None  # rvqa.metrics.VQAEvalResult, None without annotations
    evidence: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0

    @property
    def questions_per_s(self) -> float:
        return len(self.predictions) / self.wall_time_s if self.wall_time_s else 0.0


def evaluate_run(
    model: Any,
    records: Sequence[Any],
    *,
    index: Any = "__all__",
    condition: str = "",
    top_k: int | None = None,
    batch_size: int = 128,
    out_dir: str | Path | None = None,
    split_name: str = "",
    show_progress: bool = True,
) -> EvalRun:
    """Answer every record with ``model`` (an :class:`rvqa.RVQA`) and score it.

    Args:
        model: The loaded pipeline.
        records: VQA records (``rvqa.data.load_vqa``); answers may be None (test splits).
        index: Index name(s), ``None`` (no retrieval), or the default: every index the
            model has loaded (``rvqa.pipeline.ALL_INDICES``).
        condition: Label of this condition (for the files and tables).
        top_k: Captions per question (default: the model's).
        batch_size: Questions per ``answer_batch`` call.
        out_dir: Write the files listed in the module docstring here.
        split_name: Recorded in the summary.
        show_progress: tqdm bar.
    """
    from tqdm.auto import tqdm

    from rvqa.metrics import evaluate_vqa

    if not records:
        raise ValueError("no questions to evaluate")
    if isinstance(index, str) and index == "__all__":
        from rvqa.pipeline import ALL_INDICES

        index = ALL_INDICES
    t0 = time.time()
    predictions, evidence = [], []
    for s in tqdm(
        range(0, len(records), batch_size),
        desc=f"evaluating {condition}".strip(),
        unit="batch",
        disable=not show_progress,
    ):
        chunk = records[s : s + batch_size]
        outs = model.answer_batch(
            [r.image for r in chunk], [r.question for r in chunk], top_k=top_k, index=index
        )
        for r, o in zip(chunk, outs):
            predictions.append({"question_id": r.question_id, "answer": o.answer})
            evidence.append(
                {
                    "question_id": r.question_id,
                    "question": r.question,
                    "answers": list(r.answers) if r.answers is not None else None,
                    "prediction": o.answer,
                    "score": round(o.score, 6),
                    "evidence": [
                        {"text": e.text, "score": round(e.score, 6), "index": e.index, "id": e.id}
                        for e in o.evidence
                    ],
                }
            )
    has_answers = all(r.answers is not None for r in records)
    accuracy = evaluate_vqa(predictions, records) if has_answers else None
    run = EvalRun(condition, predictions, accuracy, evidence, time.time() - t0)
    if out_dir is not None:
        write_run_files(run, Path(out_dir), split_name)
    return run


def write_run_files(run: EvalRun, out_dir: Path, split_name: str = "") -> None:
    """predictions.json, accuracy.json, evidence.jsonl and summary.md (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "predictions.json", json.dumps(run.predictions))
    write_text_atomic(
        out_dir / "evidence.jsonl",
        "".join(json.dumps(e, default=str) + "\n" for e in run.evidence),
    )
    lines = [
        f"# rvqa evaluation: {run.condition or 'default'}",
        "",
        f"- split: {split_name or '?'}",
        f"- questions: {len(run.predictions)}",
        f"- time: {run.wall_time_s:.1f} s ({run.questions_per_s:.1f} questions/s)",
    ]
    if run.accuracy is not None:
        acc = run.accuracy.to_json()
        write_text_atomic(out_dir / "accuracy.json", json.dumps(acc, indent=1))
        lines += [
            "",
            "| answer type | accuracy |",
            "| --- | ---: |",
            f"| overall | {acc['overall']:.2f} |",
        ]
        lines += [f"| {k} | {v:.2f} |" for k, v in sorted(acc["perAnswerType"].items())]
    else:
        lines += ["", "No annotations in this split: predictions only."]
    write_text_atomic(out_dir / "summary.md", "\n".join(lines) + "\n")


def compare(
    model: Any,
    records: Sequence[Any],
    conditions: Sequence[tuple[str, Any]],
    *,
    out_dir: str | Path | None = None,
    split_name: str = "",
    top_k: int | None = None,
    batch_size: int = 128,
) -> tuple[list[dict], str]:
    """Evaluate several retrieval conditions; return rows and a markdown table.

    Args:
        conditions: (label, index) pairs; index as in :func:`evaluate_run`. A
            condition labelled ``"no retrieval"`` (index None) is the baseline of
            the Δ column when present.
    """
    rows = []
    for label, index in conditions:
        sub = Path(out_dir) / _slug(label) if out_dir is not None else None
        run = evaluate_run(
            model,
            records,
            index=index,
            condition=label,
            top_k=top_k,
            batch_size=batch_size,
            out_dir=sub,
            split_name=split_name,
        )
        if run.accuracy is None:
            raise ValueError("--compare needs a split with annotations")
        rows.append(
            {
                "condition": label,
                "overall": run.accuracy.overall,
                **dict(sorted(run.accuracy.per_answer_type.items())),
            }
        )
    base = next((r["overall"] for r, (_, ix) in zip(rows, conditions) if ix is None), None)
    types = sorted({k for r in rows for k in r if k not in ("condition", "overall")})
    head = ["condition", "overall", *types] + (["Δ vs no retrieval"] if base is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [
            r["condition"],
            f"{r['overall']:.2f}",
            *(f"{r.get(t, float('nan')):.2f}" for t in types),
        ]
        if base is not None:
            cells.append(f"{r['overall'] - base:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if out_dir is not None:
        write_text_atomic(Path(out_dir) / "compare.md", table + "\n")
        write_text_atomic(Path(out_dir) / "compare.json", json.dumps(rows, indent=1))
    return rows, table


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label).strip("_") or "run"
