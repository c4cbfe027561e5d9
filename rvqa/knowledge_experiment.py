"""The knowledge-swap experiment: answers that are not in the pixels, and a swap.

Run by ``benchmarks/knowledge_task.py`` and by ``rvqa demo`` (its stage 6):

1. the knowledge task (``rvqa.data.knowledge``): easy-vqa images, facts of
   assignment A (training) and B (the swap), official-format questions;
2. three fact indices with a trained retriever (one trained on the task's cards, or
   fine-tuned on them with ``card_steps``, reads with ``top_k`` 1): A, B and A's facts
   shuffled across emblems (a corrupted control);
3. two readers trained with index A and counterfactual term worlds
   (``reader.term_worlds``): the classifier (its vocabulary includes B's answers,
   which it can only output if it saw them: ``worlds-with-swap.json``) and the
   generative T5 reader (``worlds.json``: B's names never occur in its training);
4. each reader answers the held-out test images under each condition — index A,
   index B swapped in without retraining, shuffled facts, random captions, no
   retrieval — and every prediction is scored against A's answers and B's (the
   same questions): the answers follow the facts.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rvqa.config import RunConfig, apply_overrides, config_from_dict
from rvqa.data import load_vqa, make_knowledge_task
from rvqa.data.knowledge import knowledge_run_config
from rvqa.evaluation import RandomCaptions, evaluate_run
from rvqa.metrics import evaluate_vqa, normalize_answer
from rvqa.pipeline import RVQA
from rvqa.reader.auto import load_reader
from rvqa.reader.train import train_reader
from rvqa.retriever.index import KnowledgeIndex, build_index_from_embeddings
from rvqa.retriever.modeling import RetrieverModel
from rvqa.retriever.train import train_retriever
from rvqa.run_layout import write_run_file

logger = logging.getLogger(__name__)

READERS = ("classifier", "generative")


TOP_K = 1
"""Fact cards per question: a retriever trained on the task's cards
(``retriever_captions.jsonl``, ``rvqa train-retriever --config <task>/knowledge.yaml``) ranks
the image's own card first for 99.7 % of held-out images (the demo's easy-vqa retriever, 2
epochs: 81 %, within its top 3 for 99 %: fine-tune it on the cards first, ``card_steps``)."""

CONDITIONS = (
    ("index A (the training facts)", "A"),
    ("index B swapped in (no retraining)", "B"),
    ("A's facts shuffled across emblems", "shuffled"),
    ("random facts of index A", "random"),
    ("no retrieval", None),
)


def knowledge_reader_config(
    task_dir: Path,
    run_dir: Path,
    reader: str,
    epochs: int,
    seed: int = 42,
    overrides: Sequence[str] = (),
    top_k: int = TOP_K,
    mixed_precision: str = "no",
) -> RunConfig:
    """The run config of one knowledge reader: the task's config, this experiment's reader
    choices, then ``overrides`` (``reader.learning_rate=3e-3`` ...)."""
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; expected one of {', '.join(READERS)}")
    raw = knowledge_run_config(str(task_dir), output_dir=str(run_dir))
    r = raw["reader"]
    r.update(
        {
            "top_k": top_k,
            "num_epochs": epochs,
            "seed": seed,
            "eval_every": 0,
            "mixed_precision": mixed_precision,
        }
    )
    r["max_eval_questions"] = 300
    if reader == "generative":  # the classifier: the task's config as it is
        r.update(
            {
                "type": "generative",
                "term_worlds": str(task_dir / "worlds.json"),
                "learning_rate": 1e-3,
                "spm_vocab_size": 1000,
                # the scratch tokenizer's pieces: a card is up to ~30, a question up to 18
                "max_question_length": 20,
                "max_caption_length": 36,
                "max_input_length": 160,
                "max_answer_length": 8,
            }
        )
    return apply_overrides(config_from_dict(raw), list(overrides))


def fit_retriever_to_cards(
    retriever: Any,
    task_dir: Path,
    run_dir: Path,
    steps: int,
    learning_rate: float = 2e-4,
    seed: int = 42,
    mixed_precision: str = "no",
    train_text_tower: bool = True,
) -> tuple[Any, Path]:
    """Fine-tune a trained retriever on the task's fact cards for ``steps`` steps.

    The training pairs are ``retriever_captions.jsonl`` (each training image with its
    emblem's card under a random assignment, so names vary and colour + shape decide). The
    demo's easy-vqa retriever (2 epochs) ranks the image's own card first for 81 % of
    held-out images; 30 steps at 2e-4 bring it to 100 % (at 1e-3, the training rate,
    the same 30 steps wreck it: 6.7 %).

    ``train_text_tower`` decides whether the text tower trains too (the saved config
    says which). The demo's 20 steps at 2e-4 (bf16): 99.5 % recall@1 of the image's own
    card over 200 held-out images with both towers trained; 95.7 % over 300 with the
    text tower frozen (2026-12-03).

    Returns:
        The fine-tuned retriever (a copy; ``retriever`` is left as it was) and its folder.
    """
    raw = knowledge_run_config(str(task_dir), output_dir=str(run_dir))
    model = copy.deepcopy(retriever)
    model.config.freeze_text = not train_text_tower
    model.apply_freezing()
    # the run's config.yaml states the model's towers
    raw["retriever"]["freeze_text"] = model.config.freeze_text
    raw["retriever"]["freeze_vision"] = model.config.freeze_vision
    raw["retriever"].update(
        {
            "max_steps": steps,
            "learning_rate": learning_rate,
            "eval_every": 0,
            "seed": seed,
            "mixed_precision": mixed_precision,
        }
    )
    cfg = config_from_dict(raw)
    result = train_retriever(cfg, model=model, end_training=False)
    return RetrieverModel.from_pretrained(result["model_dir"]), Path(result["model_dir"])


def _build_fact_indices(task_dir: Path, retriever: Any, indices_dir: Path) -> dict[str, Path]:
    out = {}
    for key, file in (("A", "A"), ("B", "B"), ("shuffled", "A-shuffled")):
        rows = [json.loads(line) for line in (task_dir / "facts" / f"{file}.jsonl").open()]
        texts = [r["caption"] for r in rows]
        folder = indices_dir / f"knowledge-{file}"
        # a hashing retriever's codes go into a binary index, a PCME retriever's variances
        # beside its means: the metric and log sigma follow the retriever
        extra: dict[str, Any] = {"metric": getattr(retriever, "index_metric", "inner_product")}
        if getattr(retriever.config, "is_probabilistic", False):
            emb, extra["logsigma"] = retriever.embed_texts(texts, return_logsigma=True)
        else:
            emb = retriever.embed_texts(texts)
        build_index_from_embeddings(
            emb,
            texts,
            [r["id"] for r in rows],
            folder,
            retriever.fingerprint(),
            caption_source=f"knowledge task facts/{file}.jsonl",
            overwrite=True,
            show_progress=False,
            **extra,
        )
        out[key] = folder
    return out


def card_recall(
    retriever: Any, index_folder: Path, records: Sequence[Any], ks: Sequence[int] = (1, 3)
) -> dict[str, float]:
    """Percent of held-out images whose own fact card is among the top ``k`` of an index.

    An image's card is the one naming its owner (the answer of its "whose emblem is
    this?" question under the index's assignment); ``records`` carry those answers.
    """
    asked = [r for r in records if r.question.startswith("whose emblem")]
    if not asked:
        raise ValueError("no 'whose emblem is this?' question among the records")
    index = KnowledgeIndex.load(index_folder, retriever=retriever)
    found = index.search_images([r.image for r in asked], max(ks))
    out = {}
    for k in ks:
        hits = sum(
            any(r.answers[0] in re.findall(r"[a-z]+", h.text) for h in res.hits[:k])
            for r, res in zip(asked, found)
        )
        out[f"recall@{k}"] = 100.0 * hits / len(asked)
    return out


def _accuracy(predictions: list[dict], records: Sequence[Any]) -> float:
    return evaluate_vqa(predictions, records).overall


def copied_names(evidence: list[dict], records_b: Sequence[Any]) -> float:
    """Percent of the owner-name questions answered with assignment B's name, a word of the
    evidence the reader read (names of B never occur in the generative reader's training,
    so a right one was copied).

    Args:
        evidence: :attr:`rvqa.evaluation.EvalRun.evidence` of a run with index B.
        records_b: The same questions with B's answers (split ``test_B``).
    """
    truth = {r.question_id: normalize_answer(r.answers[0]) for r in records_b}
    hits = total = 0
    for ev in evidence:
        if not ev["question"].startswith("whose emblem"):
            continue
        total += 1
        answer = normalize_answer(ev["prediction"])
        words = {w for e in ev["evidence"] for w in re.findall(r"[a-z0-9]+", e["text"].lower())}
        hits += bool(answer) and answer == truth[ev["question_id"]] and answer in words
    return 100.0 * hits / total if total else 0.0


def run_knowledge_experiment(
    retriever: Any,
    work_dir: str | Path,
    *,
    readers: Sequence[str] = READERS,
    train_images: int | None = None,
    test_images: int | None = 300,
    epochs: int = 3,
    top_k: int = TOP_K,
    augment_assignments: int = 400,
    retriever_dir: str | Path | None = None,
    card_steps: int = 0,
    card_learning_rate: float = 2e-4,
    indices_dir: str | Path | None = None,
    overrides: dict[str, Sequence[str]] | None = None,
    mixed_precision: str = "no",
    say: Callable[[str], None] = print,
    examples: int = 2,
) -> dict[str, Any]:
    """Make the task in ``work_dir``, train each reader with index A, evaluate every condition.

    Args:
        retriever: A trained :class:`~rvqa.retriever.modeling.RetrieverModel`.
        work_dir: Gets ``knowledge-task/``, ``indices/knowledge-{A,B,A-shuffled}`` and one
            run folder per reader (``knowledge-{reader}``).
        readers: Which readers to train.
        train_images, test_images: Task size (``None``: every usable easy-vqa image).
        epochs: Training epochs of each reader.
        top_k: Fact cards each reader reads (:data:`TOP_K`).
        augment_assignments: Term worlds of training (more distinct names: copying, not
            memorising, is what fits them).
        retriever_dir: The retriever's folder: each reader's folder then gets an
            ``rvqa_run.json`` (retriever, reader, index A), so ``RVQA.from_pretrained``,
            ``rvqa ask`` and ``rvqa evaluate --model`` load it (``--index`` for B).
        card_steps: First fine-tune the retriever on the task's fact cards for this many
            steps (:func:`fit_retriever_to_cards`; into ``work_dir/retriever``, which then
            is the runs' retriever); 0: use ``retriever`` as it is.
        card_learning_rate: The fine-tuning's learning rate (2e-4 suits a trained
            retriever; a barely trained one, as ``rvqa demo --fast``'s, takes 1e-3).
        indices_dir: Where the fact indices go (default ``work_dir/indices``).
        overrides: Reader type → extra ``--set``-style overrides of its run config.
        mixed_precision: The card fine-tuning's and the readers' ``mixed_precision``
            (``bf16``: bfloat16 autocast, also on CPUs).
        say: Where progress lines go.
        examples: Questions each reader answers with index A and then B (the same questions
            for every reader; :func:`format_examples`).

    Returns:
        ``{"tables": {reader: rows}, "examples": [...], "chance": percent, "card_recall":
        {"recall@1": %, "recall@3": %}, "test_questions", "retriever_s": card fine-tuning
        seconds, "retriever_dir": the runs' retriever folder (the card-tuned one's),
        "index_folders": {"A"|"B"|"shuffled": folder}, "run_dirs": {reader: folder},
        "wall_time_s"}``;
        each row: ``condition``, ``vs_A`` / ``vs_B`` (official accuracy against A's / B's
        answers), ``train_s``, and for index B ``copied_B_names``.
    """
    t0 = time.time()
    work_dir = Path(work_dir)
    indices_dir = Path(indices_dir) if indices_dir is not None else work_dir / "indices"
    task_dir = work_dir / "knowledge-task"
    manifest = make_knowledge_task(
        task_dir,
        max_train_images=train_images,
        max_test_images=test_images,
        augment_assignments=augment_assignments,
        overwrite=True,
    )
    splits = manifest["splits"]
    chance = 100.0 * manifest["chance_accuracy"]["overall"]
    say(
        f"   task: {splits['train']['num_images']} training / {splits['test']['num_images']} "
        f"held-out images, {len(manifest['augment_assignments'])} augmentation worlds; "
        f"facts of assignment A={manifest['train_assignment']} for training, "
        f"B={manifest['swap_assignment']} for the swap; chance {chance:.2f} %"
    )
    retriever_s = 0.0
    if card_steps:
        t1 = time.time()
        retriever, retriever_dir = fit_retriever_to_cards(
            retriever,
            task_dir,
            work_dir,
            card_steps,
            learning_rate=card_learning_rate,
            mixed_precision=mixed_precision,
        )
        retriever_s = time.time() - t1
        say(
            f"   retriever fine-tuned on the task's fact cards: {card_steps} steps, {retriever_s:.0f} s"
        )
    folders = _build_fact_indices(task_dir, retriever, indices_dir)
    say(f"   fact indices: {', '.join(str(p) for p in folders.values())}")
    data = knowledge_reader_config(task_dir, work_dir, "classifier", 1).data  # both readers'
    records_a = list(load_vqa(data, "test"))
    records_b = list(load_vqa(data, "test_B"))
    recall = card_recall(retriever, folders["A"], records_a)
    say(
        "   the image's own card among the retrieved: "
        + ", ".join(f"{k} {v:.1f} %" for k, v in recall.items())
    )

    tables: dict[str, list[dict]] = {}
    run_dirs: dict[str, Path] = {}
    shown: list[dict] = []
    for kind in readers:
        t1 = time.time()
        cfg = knowledge_reader_config(
            task_dir,
            work_dir / f"knowledge-{kind}",
            kind,
            epochs,
            overrides=(overrides or {}).get(kind, ()),
            top_k=top_k,
            mixed_precision=mixed_precision,
        )
        index = KnowledgeIndex.load(folders["A"], retriever=retriever)
        rd = train_reader(  # both readers: one retrieval and one image-feature cache
            cfg, retriever=retriever, index=index, end_training=False, cache_dir=work_dir / "cache"
        )
        train_s = time.time() - t1
        run_dirs[kind] = work_dir / f"knowledge-{kind}"
        if retriever_dir is not None:
            write_run_file(
                work_dir / f"knowledge-{kind}",
                retriever_dir,
                rd["model_dir"],
                {folders["A"].name: folders["A"]},
                top_k,
            )
        reader, processor = load_reader(rd["model_dir"])
        model = RVQA(retriever, reader, processor, top_k=top_k, device="cpu")
        for key, folder in folders.items():
            model.load_index(folder, name=key)
        rows = []
        for label, key in CONDITIONS:
            control = RandomCaptions(model.registry, seed=0) if key == "random" else None
            index_name = "A" if key == "random" else key
            run = evaluate_run(
                model,
                records_a,
                index=index_name,
                condition=label,
                control=control,
                show_progress=False,
            )
            row = {
                "condition": label,
                "vs_A": run.accuracy.overall,
                "vs_B": _accuracy(run.predictions, records_b),
                "train_s": round(train_s, 1),
            }
            if key == "B":
                row["copied_B_names"] = copied_names(run.evidence, records_b)
            rows.append(row)
        tables[kind] = rows
        say(f"   {kind} reader: trained and evaluated in {time.time() - t1:.0f} s")
        shown += [{"reader": kind, **ex} for ex in _examples(model, records_a, records_b, examples)]
    return {
        "tables": tables,
        "examples": shown,
        "chance": chance,
        "card_recall": recall,
        "test_questions": len(records_a),
        "retriever_s": retriever_s,
        "retriever_dir": retriever_dir,
        "index_folders": folders,
        "run_dirs": run_dirs,
        "wall_time_s": time.time() - t0,
    }


def _examples(model: RVQA, records_a, records_b, n: int) -> list[dict]:
    out = []
    step = max(1, len(records_a) // max(n, 1))
    for ra, rb in list(zip(records_a, records_b))[::step][:n]:
        before = model.answer(ra.image, ra.question, index="A")
        after = model.answer(ra.image, ra.question, index="B")
        out.append(
            {
                "question": ra.question,
                "image": str(ra.image),
                "truth_A": ra.answers[0],
                "truth_B": rb.answers[0],
                "before": before,
                "after": after,
            }
        )
    return out


def copied_by_reader(tables: dict[str, list[dict]]) -> dict[str, float]:
    """Each reader's share of B's owner names copied with index B (:func:`copied_names`)."""
    return {
        kind: next(r["copied_B_names"] for r in rows if "copied_B_names" in r)
        for kind, rows in tables.items()
    }


def format_examples(examples: Sequence[dict]) -> str:
    """Each example (reader by reader, as :func:`run_knowledge_experiment` lists them): the
    question, then the reader's answer with index A and with B swapped in, with the card it
    read."""
    lines: list[str] = []
    for ex in examples:
        lines += ["", f"  Q: {ex['question']}   (image {Path(ex['image']).name})"]
        lines += _answer_lines(ex)
    return "\n".join(lines)


def _answer_lines(ex: dict) -> list[str]:
    lines = []
    for when, key, truth in (("index A", "before", "truth_A"), ("index B", "after", "truth_B")):
        a = ex[key]
        read = a.evidence[0].text if a.evidence else ""
        lines.append(
            f"  {ex['reader']:>10}, {when}: {a.answer!r} ({a.score:.2f}; truth {ex[truth]!r})"
            f"  read: {read!r}"
        )
    return lines


def knowledge_table(tables: dict[str, list[dict]]) -> str:
    """The markdown table: each condition, each reader, scored against A's and B's answers."""
    kinds = [k for k in READERS if k in tables]
    head = (
        "| condition | " + " | ".join(f"{k}: A's answers | {k}: B's answers" for k in kinds) + " |"
    )
    sep = "|---|" + "---:|---:|" * len(kinds)
    lines = [head, sep]
    for i, (label, _) in enumerate(CONDITIONS):
        cells = []
        for k in kinds:
            row = tables[k][i]
            cells += [f"{row['vs_A']:.2f}", f"{row['vs_B']:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
