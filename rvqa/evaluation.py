"""Evaluation runs: ``rvqa evaluate`` — official VQA accuracy over a split, with files.

For one model and one retrieval condition, :func:`evaluate_run` answers every
question of a split in batches and writes into ``out_dir``:

- ``predictions.json``: the official results format ``[{"question_id", "answer"}]``
  (ready for the challenge server);
- ``accuracy.json``: the official accuracy schema (overall / perQuestionType /
  perAnswerType, ×100, two decimals) — absent for splits without annotations;
- ``evidence.jsonl``: per question, the prediction, its score and the retrieved
  captions (text, score, index, id);
- ``summary.md``: a short human-readable summary;
- ``report.html`` (``report=N``): a self-contained page with a sample of N
  questions: image thumbnail (inlined), question, retrieved captions and
  scores, prediction marked correct / partly correct / wrong, human answers.

:func:`compare` runs several conditions (each index alone, no retrieval, and
optionally :class:`RandomCaptions`, a control) and returns one table with the
difference to no retrieval.

:func:`evaluate_split` is ``rvqa evaluate`` as a function (load a run, pick the
indices, answer a split, write the files and the resolved ``config.yaml``);
:func:`evaluate_retriever_split` is ``rvqa evaluate-retriever``.
"""

from __future__ import annotations

import json
import logging
import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from rvqa.config import RunConfig, load_config, save_config
from rvqa.data import check_index_facts, load_caption_split, load_vqa
from rvqa.data.images import load_image
from rvqa.distributed import log_placement, run_device
from rvqa.errors import UsageError
from rvqa.io import write_json_atomic, write_text_atomic
from rvqa.metrics import evaluate_vqa, normalize_answer
from rvqa.pipeline import ALL_INDICES, RVQA, Evidence
from rvqa.retriever.evaluation import evaluate_retriever
from rvqa.retriever.modeling import RetrieverModel
from rvqa.run_layout import CONFIG_FILE, METRICS_FILE, READER_DIR

logger = logging.getLogger(__name__)


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
    control: RandomCaptions | None = None,
    report: int = 0,
    report_errors: bool = False,
    seed: int = 0,
    rerank: int | None = None,
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
        control: Replace the retrieved captions before reading (:class:`RandomCaptions`).
        report: Write ``report.html`` with this many sampled questions (0: none).
        report_errors: Sample the report from questions not fully correct only.
        seed: Seed of the report's sample (the same questions for every condition).
        rerank: Re-rank each index's top-N with the model's re-ranker (``RVQA.answer``'s
            ``rerank``); the evidence records both scores and the retrieval rank.
    """
    from tqdm.auto import tqdm

    if not records:
        raise UsageError("no questions to evaluate")
    if isinstance(report, bool) or not isinstance(report, int) or report < 0:
        raise UsageError(f"report must be a number of questions >= 0, got {report!r}")
    if report and out_dir is None:
        raise UsageError("report= needs out_dir (the page is written there)")
    if isinstance(index, str) and index == "__all__":
        index = ALL_INDICES
    t0 = time.time()
    predictions, evidence = [], []
    notes: dict[str, int] = {}
    for s in tqdm(
        range(0, len(records), batch_size),
        desc=f"evaluating {condition}".strip(),
        unit="batch",
        disable=not show_progress,
    ):
        chunk = records[s : s + batch_size]
        images, questions = [r.image for r in chunk], [r.question for r in chunk]
        if control is None:
            outs = model.answer_batch(images, questions, top_k=top_k, index=index, rerank=rerank)
        else:
            found = model.retrieve(images, top_k=top_k, index=index, rerank=rerank)
            swapped = control(found, [r.question_id for r in chunk])
            outs = model.answer_batch(images, questions, evidence=swapped)
        for r, o in zip(chunk, outs):
            for note in o.notes:
                notes[note] = notes.get(note, 0) + 1
            predictions.append({"question_id": r.question_id, "answer": o.answer})
            evidence.append(
                {
                    "question_id": r.question_id,
                    "question": r.question,
                    "answers": list(r.answers) if r.answers is not None else None,
                    "prediction": o.answer,
                    "score": round(o.score, 6),
                    "evidence": [_evidence_row(e) for e in o.evidence],
                }
            )
    for note, count in notes.items():  # once per run, not once per question
        logger.warning(
            "%s (%s: %d of %d questions)", note, condition or "evaluation", count, len(records)
        )
    has_answers = all(r.answers is not None for r in records)
    accuracy = evaluate_vqa(predictions, records) if has_answers else None
    run = EvalRun(condition, predictions, accuracy, evidence, time.time() - t0)
    if out_dir is not None:
        write_run_files(run, Path(out_dir), split_name)
        if report:
            write_report(
                run, records, Path(out_dir) / "report.html", report, report_errors, seed, split_name
            )
    return run


def _evidence_row(e: Any) -> dict:
    """One evidence entry of ``evidence.jsonl`` (re-ranking's score and rank when there)."""
    row = {"text": e.text, "score": round(e.score, 6), "index": e.index, "id": e.id}
    if getattr(e, "rerank_score", None) is not None:
        row["rerank_score"] = round(e.rerank_score, 6)
        row["retrieval_rank"] = e.retrieval_rank
    return row


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
    report: int = 0,
    report_errors: bool = False,
    seed: int = 0,
) -> tuple[list[dict], str]:
    """Evaluate several retrieval conditions; return rows and a markdown table.

    Args:
        conditions: (label, index), (label, index, control) or (label, index, control,
            rerank) tuples; index as in :func:`evaluate_run`, control e.g. a
            :class:`RandomCaptions` (or None), rerank a re-ranking depth N (or None). The
            condition with index None is the baseline of the Δ column when present.
        report, report_errors, seed: As in :func:`evaluate_run`, one page per
            condition (in its sub-folder), all showing the same questions when
            ``report_errors`` is off.
    """
    rows = []
    for cond in conditions:
        label, index, control, rerank = (*cond, None, None)[:4]
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
            control=control,
            report=report,
            report_errors=report_errors,
            seed=seed,
            rerank=rerank,
        )
        if run.accuracy is None:
            raise UsageError("--compare needs a split with annotations")
        rows.append(
            {
                "condition": label,
                "overall": run.accuracy.overall,
                **dict(sorted(run.accuracy.per_answer_type.items())),
            }
        )
    base = next((r["overall"] for r, c in zip(rows, conditions) if c[1] is None), None)
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
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
    return "_".join(part for part in slug.split("_") if part) or "run"


# --------------------------------------------------------------------------- control


class RandomCaptions:
    """Control condition: retrieved captions replaced by random ones of the same length.

    Each retrieved caption is replaced by a caption drawn uniformly at random from
    the same index among those with the same number of words (the nearest number
    when none has it), never the retrieved caption itself when another exists.
    The number of captions, their order and their retrieval scores are kept, so
    the reader sees the same input shape and score signal as with real retrieval
    and only the content differs. Draws are seeded by ``seed`` and the question id,
    so they do not depend on batching or on the order of questions.

    Args:
        registry: The model's :class:`rvqa.retriever.index.IndexRegistry` (``model.registry``).
        seed: Random seed.
    """

    label = "random captions"

    def __init__(self, registry: Any, seed: int = 0) -> None:
        self.registry = registry
        self.seed = int(seed)
        self._pools: dict[str, tuple[Any, Any, Any]] = {}

    def _pool(self, name: str) -> tuple[Any, Any, Any]:
        import numpy as np

        index = self.registry.get(name)
        pool = self._pools.get(name)
        if pool is None or pool[0] is not index:  # first use, or the index was swapped
            counts = index.caption_word_counts()
            order = np.argsort(counts, kind="stable")
            pool = (index, order, counts[order])
            self._pools[name] = pool
        return pool

    def _draw(self, e: Any, rng: Any) -> Any:
        import numpy as np

        index, order, lengths = self._pool(e.index)
        n = len(e.text.split())
        lo, hi = np.searchsorted(lengths, n, "left"), np.searchsorted(lengths, n, "right")
        if lo == hi:  # no caption of this length: the nearest length present
            near = [i for i in (lo - 1, lo) if 0 <= i < len(lengths)]
            best = lengths[min(near, key=lambda i: abs(int(lengths[i]) - n))]
            lo, hi = np.searchsorted(lengths, best, "left"), np.searchsorted(lengths, best, "right")
        for _ in range(16):
            ids, caps = index.lookup([int(order[rng.integers(lo, hi)])])
            if caps[0] != e.text:
                break
        return Evidence(caps[0], e.score, e.index, ids[0])

    def __call__(self, evidence: Sequence[Sequence[Any]], question_ids: Sequence[Any]) -> list:
        """Per question (with its id), the retrieved :class:`Evidence` list → a random one."""
        import numpy as np

        out = []
        for ev, qid in zip(evidence, question_ids):
            rng = np.random.default_rng([self.seed, zlib.crc32(str(qid).encode())])
            out.append([self._draw(e, rng) for e in ev])
        return out


# --------------------------------------------------------------------------- report

_REPORT_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em}table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left}
.acc td:nth-child(2){text-align:right}.card{display:flex;gap:14px;background:#fff;
border:1px solid #ddd;border-left:6px solid #999;border-radius:4px;padding:10px;margin:10px 0}
.card.correct{border-left-color:#2a9d3a}.card.partial{border-left-color:#e0a100}
.card.wrong{border-left-color:#d33}.card img{width:160px;height:auto;flex:none;
image-rendering:auto;border:1px solid #ccc}.q{font-weight:600;font-size:1.05em}
.meta{color:#777;font-size:.85em}.mark{font-weight:700}.correct .mark{color:#2a9d3a}
.partial .mark{color:#b07d00}.wrong .mark{color:#d33}.ev td{border-top:1px solid #eee;
font-size:.92em}.ev td.s{text-align:right;font-variant-numeric:tabular-nums}
#only-errors:checked~.cards .card.correct{display:none}
"""


def _thumbnail(image: Any, size: int) -> str:
    import base64
    import io

    im = load_image(image).copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _answer_counts(answers: Sequence[str]) -> str:
    from collections import Counter

    counts = Counter(normalize_answer(a) for a in answers)
    return ", ".join(f"{a} ×{c}" if c > 1 else a for a, c in counts.most_common())


def write_report(
    run: EvalRun,
    records: Sequence[Any],
    path: str | Path,
    n: int,
    errors_only: bool = False,
    seed: int = 0,
    split_name: str = "",
    thumbnail_px: int = 160,
) -> Path:
    """A self-contained HTML page (no server, no network) with a sample of questions.

    Shows ``n`` questions sampled with ``seed`` (the same positions for every
    condition of a comparison), each with its image inlined as a JPEG thumbnail,
    the question, the retrieved captions with scores and index names, the
    prediction marked correct (VQA accuracy 100), partly correct or wrong (0), and
    the human answers (normalised, with counts). ``errors_only`` samples from the
    questions not fully correct. A checkbox on the page hides the correct ones.
    """
    import html

    from tqdm.auto import tqdm

    esc = html.escape
    path = Path(path)
    per_q = run.accuracy.per_question if run.accuracy is not None else None
    by_id = {e["question_id"]: e for e in run.evidence}
    pool = list(range(len(records)))
    if errors_only and per_q is not None:
        pool = [i for i in pool if per_q.get(records[i].question_id, 0.0) < 100.0]
    chosen = sorted(random.Random(seed).sample(pool, min(n, len(pool))))
    title = f"rvqa evaluation: {run.condition or 'default'}"
    head = [
        f"<h1>{esc(title)}</h1>",
        f"<p>split <b>{esc(split_name or '?')}</b> · {len(run.predictions)} questions · "
        f"{len(chosen)} shown (random sample, seed {seed}"
        f"{', questions not fully correct only' if errors_only and per_q is not None else ''})</p>",
    ]
    if run.accuracy is not None:
        acc = run.accuracy
        head.append('<table class="acc"><tr><th>answer type</th><th>VQA accuracy</th></tr>')
        head.append(f"<tr><td>overall</td><td>{acc.overall:.2f}</td></tr>")
        head += [
            f"<tr><td>{esc(str(t))}</td><td>{v:.2f}</td></tr>"
            for t, v in sorted(acc.per_answer_type.items())
        ]
        head.append("</table>")
        head.append(
            '<p>Marks: <span style="color:#2a9d3a">✔ correct</span> (accuracy 100) · '
            '<span style="color:#b07d00">◐ partly correct</span> · '
            '<span style="color:#d33">✘ wrong</span> (0).</p>'
        )
    else:
        head.append("<p>No annotations in this split: predictions only.</p>")
    cards = []
    thumbs: dict[Any, str] = {}
    for i in tqdm(chosen, desc="report", unit="question", disable=len(chosen) < 50):
        r = records[i]
        e = by_id[r.question_id]
        key = r.image_id if r.image_id is not None else id(r.image)
        if key not in thumbs:
            thumbs[key] = _thumbnail(r.image, thumbnail_px)
        if per_q is not None:
            a = per_q.get(r.question_id, 0.0)
            cls, mark = (
                ("correct", "✔") if a >= 100.0 else ("wrong", "✘") if a <= 0.0 else ("partial", "◐")
            )
            verdict = f'<span class="mark">{mark} {a:.2f}</span>'
            humans = f"<div>human answers: {esc(_answer_counts(r.answers))}</div>"
        else:
            cls, verdict, humans = "", "", ""
        ev_rows = "".join(
            f'<tr><td>{j}</td><td class="s">{x["score"]:.3f}</td><td>{esc(str(x["index"]))}</td>'
            f"<td>{esc(x['text'])}</td></tr>"
            for j, x in enumerate(e["evidence"], 1)
        )
        evidence = (
            f'<table class="ev"><tr><th>#</th><th>score</th><th>index</th><th>caption</th></tr>'
            f"{ev_rows}</table>"
            if ev_rows
            else "<div class='meta'>no retrieval</div>"
        )
        cards.append(
            f'<div class="card {cls}" data-question-id="{esc(str(r.question_id))}">'
            f'<img src="{thumbs[key]}" alt="image {esc(str(r.image_id))}">'
            f'<div><div class="q">{esc(r.question)}</div>'
            f'<div class="meta">question {esc(str(r.question_id))} · image '
            f"{esc(str(r.image_id))} · {esc(str(r.answer_type or ''))}</div>"
            f"<div>prediction: <b>{esc(e['prediction'])}</b> ({e['score']:.3f}) {verdict}</div>"
            f"{humans}{evidence}</div></div>"
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_REPORT_CSS}</style></head><body>\n"
        + "\n".join(head)
        + '\n<input type="checkbox" id="only-errors"> <label for="only-errors">hide correct '
        'answers</label>\n<div class="cards">\n' + "\n".join(cards) + "\n</div></body></html>\n"
    )
    write_text_atomic(path, page)
    return path


# --------------------------------------------------------------------------- commands


def load_run_config(
    run_dir: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """The run config an evaluation of ``run_dir`` uses.

    Args:
        run_dir: The run folder.
        config: A YAML file; default: the run's own resolved config
            (``RUN/reader/config.yaml``), else the defaults.
        overrides: ``KEY=VALUE`` overrides (``--set``).
    """
    own = Path(run_dir) / READER_DIR / CONFIG_FILE
    return load_config(config or (own if own.is_file() else None), list(overrides))


@dataclass
class EvaluationOutcome:
    """What :func:`evaluate_split` did.

    Attributes:
        split: The split evaluated.
        questions: How many questions.
        out_dir: The folder with the files.
        run: The single run (without ``compare``).
        table: The markdown table (with ``compare``).
        rows: The table's rows (with ``compare``).
    """

    split: str
    questions: int
    out_dir: Path
    run: EvalRun | None = None
    table: str | None = None
    rows: list[dict] = field(default_factory=list)


def evaluate_split(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    cfg: RunConfig | None = None,
    split: str | None = None,
    max_questions: int | None = None,
    indices: Sequence[str | Path] = (),
    no_retrieval: bool = False,
    compare_indices: bool = False,
    random_captions: bool = False,
    top_k: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    report: int = 0,
    report_errors: bool = False,
    seed: int = 0,
    batch_size: int = 128,
    device: str | None = None,
    use_gpu: bool | None = None,
    precision: str = "float32",
    rerank: int | None = None,
    reranker: str | Path | None = None,
) -> EvaluationOutcome:
    """``rvqa evaluate``: load a run, answer a VQA split, write the files and ``config.yaml``.

    Args:
        run_dir: The run folder (``rvqa_run.json``).
        out_dir: Output folder: the files of :func:`evaluate_run` (per condition with
            ``compare_indices``) and the resolved config, ``config.yaml``.
        cfg: The run config (default: :func:`load_run_config`); its ``data`` section
            says where the questions are.
        split: VQA split (default: ``cfg.data.eval_split``).
        max_questions: Evaluate only the first N (default: ``cfg.data.max_eval_questions``;
            0: every question).
        indices: Index folders or names of the run's indices (default: the run's).
        no_retrieval: Answer without retrieval.
        compare_indices: One table: each index alone, no retrieval, and the
            difference to no retrieval.
        random_captions: Add the :class:`RandomCaptions` control (with
            ``compare_indices``: one more row, for the first index).
        top_k: Captions per question (default: the run's).
        nprobe: IVF indices' ``nprobe`` (default: ``cfg.index.nprobe``; ``None``: as built).
        ef_search: HNSW indices' ``efSearch`` (default: ``cfg.index.ef_search``).
        report, report_errors, seed: As in :func:`evaluate_run`.
        batch_size: Questions per batch.
        device: Torch device (default: CUDA when available).
        use_gpu: Search the indices on GPU (default: ``cfg.index.use_gpu``; ``rvqa
            evaluate --gpu-index``).
        precision: ``"float32"`` or ``"bf16"`` (:class:`~rvqa.pipeline.RVQA`'s autocast).
        rerank: Re-rank each index's top-N (``rvqa evaluate --rerank N``); with
            ``compare_indices`` each index gets a row without and one with re-ranking.
        reranker: A re-ranker folder (default: the run's, recorded in ``rvqa_run.json``).

    Raises:
        UsageError: Contradicting or out-of-range arguments.
        UnknownIndexError: An index that is neither a folder nor one of the run's.
    """
    if top_k is not None and top_k <= 0:
        raise UsageError(f"--k must be ≥ 1, got {top_k} (use --no-retrieval for none)")
    if report < 0:
        raise UsageError(f"--report must be a number of questions ≥ 0, got {report}")
    if max_questions is not None and max_questions < 0:
        raise UsageError(f"--max-questions must be ≥ 0 (0: all), got {max_questions}")
    if no_retrieval and (indices or compare_indices or random_captions or rerank):
        raise UsageError(
            "--no-retrieval cannot be combined with --index, --compare, --random-captions "
            "or --rerank"
        )
    if rerank is not None and (
        isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 1
    ):
        raise UsageError(f"--rerank must be a number of captions ≥ 1, got {rerank!r}")
    cfg = cfg if cfg is not None else load_run_config(run_dir)
    split = split or cfg.data.eval_split
    limit = cfg.data.max_eval_questions if max_questions is None else max_questions
    out_dir = Path(out_dir)
    model = RVQA.from_pretrained(
        run_dir,
        device=device,
        load_indices=not no_retrieval,
        nprobe=nprobe if nprobe is not None else cfg.index.nprobe,
        ef_search=ef_search if ef_search is not None else cfg.index.ef_search,
        use_gpu=cfg.index.use_gpu if use_gpu is None else use_gpu,
        precision=precision,
        reranker=reranker,
    )
    if rerank:
        model._check_rerank(rerank, model.default_top_k if top_k is None else top_k)
    names = model.use_indices(indices)
    if cfg.data.require_facts:
        for name in model.registry.names:
            index = model.registry.get(name)
            check_index_facts(index, f"index {name!r} ({index.path})")
    log_placement("evaluate", **model.placement())
    if random_captions and not model.registry.names:
        raise UsageError("--random-captions needs an index (--index, or a run with indices)")
    records = list(load_vqa(cfg.data, split))
    if limit:
        records = records[:limit]
    save_config(cfg, out_dir / CONFIG_FILE)
    control = RandomCaptions(model.registry, seed=seed) if random_captions else None
    opts = {"report": report, "report_errors": report_errors, "seed": seed}
    if compare_indices:
        conditions: list[tuple] = []
        for n in names or model.registry.names:
            conditions.append((n, n))
            if rerank:
                conditions.append((f"{n} + rerank {rerank}", n, None, rerank))
        if control is not None:  # a control for the first index's retrieval
            first = conditions[0][1]
            label = control.label if len(conditions) == 1 else f"{control.label} ({first})"
            conditions.append((label, first, control))
        conditions.append(("no retrieval", None))
        rows, table = compare(
            model,
            records,
            conditions,
            out_dir=out_dir,
            split_name=split,
            top_k=top_k,
            batch_size=batch_size,
            **opts,
        )
        return EvaluationOutcome(split, len(records), out_dir, table=table, rows=rows)
    index = None if no_retrieval else (names or ALL_INDICES)
    label = "no retrieval" if index is None else ",".join(names) or "run indices"
    if rerank:
        label = f"{label} + rerank {rerank}"
    run = evaluate_run(
        model,
        records,
        index=index,
        rerank=rerank,
        condition=f"{control.label} ({label})" if control is not None else label,
        top_k=top_k,
        batch_size=batch_size,
        out_dir=out_dir,
        split_name=split,
        control=control,
        **opts,
    )
    return EvaluationOutcome(split, len(records), out_dir, run=run)


def evaluate_retriever_split(
    model: str | Path | Any,
    cfg: RunConfig,
    *,
    split: str | None = None,
    protocol: str = "all",
    batch_size: int = 128,
    out_dir: str | Path | None = None,
    accelerator: Any = None,
) -> dict[str, float]:
    """``rvqa evaluate-retriever``: recall@1/5/10 both ways and rsum on a caption split.

    The retriever runs on the accelerator's device (default: a new ``Accelerator``:
    the process's GPU under ``accelerate launch``, where every process encodes a
    shard of the images and captions, else CUDA when available, else the CPU).

    Args:
        model: A retriever folder or a loaded :class:`rvqa.retriever.modeling.RetrieverModel`.
        cfg: Run config; ``cfg.retriever.captions`` is the caption source.
        split: Caption split (default: ``cfg.retriever.test_split``, else ``test``).
        protocol: One of :data:`rvqa.retriever.evaluation.PROTOCOLS`: ``all`` (every
            image of the split), ``coco1k`` / ``coco5k`` (5,000 COCO test images:
            mean of 5 folds of 1,000, or all), ``f30k1k`` (1,000 Flickr30K test
            images); the named protocols check the image count and keep each
            image's first 5 captions (:func:`rvqa.retriever.evaluation.evaluate_retriever`).
        batch_size: Encoding batch size.
        out_dir: If given, write ``metrics.json`` and the resolved ``config.yaml`` there
            (by the main process).
        accelerator: The run's ``Accelerator`` (default: a new one).

    Raises:
        UsageError: An unknown protocol, or a split whose image count does not fit it.
    """
    split = split or cfg.retriever.test_split or "test"
    records = load_caption_split(cfg.retriever.captions, split)
    if isinstance(model, (str, Path)):
        model = RetrieverModel.from_pretrained(model)
    accelerator = accelerator if accelerator is not None else Accelerator()
    model = model.to(run_device(accelerator))
    log_placement("evaluate-retriever", accelerator, retriever=model)
    metrics = evaluate_retriever(
        model, records, protocol=protocol, batch_size=batch_size, accelerator=accelerator
    )
    if out_dir is not None and accelerator.is_main_process:
        write_json_atomic(Path(out_dir) / METRICS_FILE, metrics)
        save_config(cfg, Path(out_dir) / CONFIG_FILE)
    return metrics
