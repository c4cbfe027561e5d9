"""Train the reader: ``rvqa train-reader --config FILE.yaml`` or :func:`train_reader`.

Captions for every training image come from the run's knowledge index through
the trained retriever, retrieved once per image and cached (see
:mod:`rvqa.reader.retrieval`). Same Accelerate loop as the retriever
(:func:`rvqa.training.train`): one CPU process, several (``torchrun``) or
multi-GPU (``accelerate launch -m rvqa train-reader``). Writes
``OUTPUT_DIR/reader/``: ``final/``, ``best/`` (model + processor + answer
vocabulary), ``checkpoints/``, ``train_result.json``, ``config.yaml``; and
``OUTPUT_DIR/rvqa_run.json``, which :meth:`rvqa.RVQA.from_pretrained` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import Dataset

from rvqa.config import RunConfig, save_config
from rvqa.data import holdout_by_image, load_captions, load_vqa
from rvqa.distributed import sharded_map
from rvqa.metrics import evaluate_vqa
from rvqa.pixels import PixelCache
from rvqa.reader.answers import AnswerVocab, build_vocab
from rvqa.reader.modeling import ReaderModel
from rvqa.reader.processing import ReaderProcessor
from rvqa.reader.retrieval import own_caption_ids, retrieve_for_images
from rvqa.retriever.index import KnowledgeIndex
from rvqa.retriever.modeling import RetrieverModel
from rvqa.run_layout import READER_DIR, RETRIEVER_DIR, retriever_dir, write_run_file
from rvqa.training import make_accelerator, run_signature, train

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- data


def image_key(record: Any) -> str:
    """The key retrieval results and pixel caches are stored under."""
    return str(record.image_id)


def load_reader_data(cfg: RunConfig) -> tuple[list, list]:
    """(train, validation) VQA records: validation = ``reader.eval_split`` or held-out images."""
    d, s = cfg.data, cfg.reader
    train_set = load_vqa(d, d.train_split)
    if d.train_fraction < 1.0:
        train_set = train_set.subset(d.train_fraction, seed=s.seed)
    train_records = list(train_set)
    if s.eval_split:
        val_records = list(load_vqa(d, s.eval_split))
    else:
        train_records, val_records = holdout_by_image(train_records, s.val_fraction, s.seed)
    if s.max_eval_questions and len(val_records) > s.max_eval_questions:
        val_records = val_records[: s.max_eval_questions]
    for r in train_records[:1]:
        if r.answers is None:
            raise ValueError(f"the training split {d.train_split!r} has no annotations (answers)")
    return train_records, val_records


def _k_for(question_id: Any, top_k: int, k_dropout: float, seed: int) -> int:
    """A per-question k: top_k, or with probability k_dropout a random k in [0, top_k].

    Derived from a hash (not the RNG), so the data loader's read-ahead never
    disturbs the RNG state that checkpoints save.
    """
    if k_dropout <= 0:
        return top_k
    h = int(hashlib.sha256(f"{seed}:{question_id}".encode()).hexdigest()[:12], 16)
    if (h % 10_000) / 10_000 >= k_dropout:
        return top_k
    return (h // 10_000) % (top_k + 1)


class VQADataset(Dataset):
    """Items: pixel values (or cached visual features), question, captions, scores, targets."""

    def __init__(
        self,
        records: Sequence[Any],
        pixels: PixelCache,
        retrieved: dict[str, list] | None,
        vocab: AnswerVocab,
        top_k: int,
        k_dropout: float = 0.0,
        rule: str = "min3",
        seed: int = 0,
        features: torch.Tensor | None = None,
    ):
        self.records = list(records)
        self.pixels = pixels
        self.features = features
        self.retrieved = retrieved
        self.vocab = vocab
        self.top_k = top_k
        self.k_dropout = k_dropout
        self.rule = rule
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        hits = (self.retrieved or {}).get(image_key(r), [])
        k = _k_for(r.question_id, self.top_k, self.k_dropout, self.seed) if self.retrieved else 0
        hits = hits[:k]
        visual = (
            {"visual_features": self.features[self.pixels.row(r.image)]}
            if self.features is not None
            else {"pixel_values": self.pixels[r.image]}
        )
        return {
            **visual,
            "question": r.question,
            "captions": [h[0] for h in hits],
            "scores": [h[1] for h in hits],
            "labels": self.vocab.soft_target_vector(r.answers or [], self.rule),
        }


class ReaderCollator:
    """Tokenises a batch with the reader's processor (cached per distinct string)."""

    def __init__(self, processor: ReaderProcessor, with_labels: bool = True):
        self.processor = processor
        self.with_labels = with_labels

    def __call__(self, items: list[dict]) -> dict:
        batch = self.processor(
            None,
            [it["question"] for it in items],
            captions=[it["captions"] for it in items],
            scores=[it["scores"] for it in items],
        )
        out = dict(batch)
        key = "visual_features" if "visual_features" in items[0] else "pixel_values"
        out[key] = torch.stack([it[key] for it in items])
        if self.with_labels:
            out["labels"] = torch.from_numpy(np.stack([it["labels"] for it in items]))
        return out


@torch.no_grad()
def visual_feature_cache(
    model: ReaderModel, pixels: PixelCache, batch_size: int = 256
) -> torch.Tensor:
    """A frozen image tower's tokens for every cached image, row i = pixels.index order."""
    was = model.training
    model.eval()
    out = [
        model.vision_features(pixels.pixels[s : s + batch_size].float())
        for s in range(0, len(pixels.pixels), batch_size)
    ]
    model.train(was)
    logger.info("cached frozen image-tower features of %d images", len(pixels.pixels))
    return torch.cat(out)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(
    model: ReaderModel,
    processor: ReaderProcessor,
    items: Sequence[dict],
    batch_size: int = 128,
    top: int = 1,
) -> list[list[tuple[int, float]]]:
    """Top answers (vocab index, probability) for dataset items (no labels needed)."""
    was = model.training
    model.eval()
    collate = ReaderCollator(processor, with_labels=False)
    out: list[list[tuple[int, float]]] = []
    device = next(model.parameters()).device
    for s in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(list(items[s : s + batch_size])).items()}
        probs = torch.sigmoid(model(**batch).logits.float())
        p, idx = probs.topk(min(top, probs.shape[-1]), dim=-1)
        out.extend([list(zip(i.tolist(), q.tolist())) for i, q in zip(idx, p)])
    model.train(was)
    return out


def evaluate_reader(
    model: ReaderModel,
    processor: ReaderProcessor,
    dataset: VQADataset,
    accelerator: Any = None,
    batch_size: int = 128,
) -> dict[str, float]:
    """Official VQA accuracy (×100) of the reader on a dataset (split across processes)."""
    vocab = dataset.vocab

    def run(idx: list[int]) -> np.ndarray:
        preds = predict(model, processor, [dataset[i] for i in idx], batch_size)
        return np.array([[p[0][0]] for p in preds], dtype=np.float32)

    pred_idx = sharded_map(run, list(range(len(dataset))), accelerator)[:, 0].astype(int)
    predictions = [
        {"question_id": r.question_id, "answer": vocab.decode(int(i))}
        for r, i in zip(dataset.records, pred_idx)
    ]
    result = evaluate_vqa(predictions, dataset.records)
    metrics = {"accuracy": result.overall}
    metrics.update({f"acc_{k}": v for k, v in result.per_answer_type.items()})
    return metrics


# --------------------------------------------------------------------------- training


def build_reader(
    cfg: RunConfig, vocab: AnswerVocab, retriever: Any = None
) -> tuple[ReaderModel, ReaderProcessor]:
    """A fresh reader (pretrained text backbone) and its processor."""
    s = cfg.reader
    tower = retriever.vision_model if s.vision_backbone == "retriever" else None
    model = ReaderModel.from_backbones(list(vocab), s, vision_tower=tower)
    processor = ReaderProcessor.from_config(
        model.config, image_processor=retriever.image_processor if tower is not None else None
    )
    return model, processor


def train_reader(
    cfg: RunConfig,
    *,
    resume: bool | str = False,
    retriever: Any = None,
    index: Any = None,
    model: ReaderModel | None = None,
    processor: ReaderProcessor | None = None,
    end_training: bool = True,
) -> dict[str, Any]:
    """Train the reader of ``cfg.reader`` with retrieval from ``cfg.index``.

    Args:
        cfg: The run config.
        resume: Continue from the newest (or the given) checkpoint.
        retriever: A loaded retriever (default: the run's trained one).
        index: A loaded :class:`KnowledgeIndex` (default: ``cfg.index.folder()``);
            ignored when ``reader.top_k == 0``.
        model, processor: Pre-built reader (tests pass tiny random ones). Its
            answer vocabulary must match the one built from the training data.
        end_training: Tear down the process group at the end.

    Returns:
        ``{"result": TrainResult, "model_dir": Path, "val": metrics | None}``.
    """
    s = cfg.reader
    run_dir = Path(cfg.output_dir)
    out = run_dir / READER_DIR
    accelerator = make_accelerator(s, out)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    set_seed(s.seed)

    train_records, val_records = load_reader_data(cfg)
    vocab = build_vocab(
        (r.answers for r in train_records), size=s.answer_vocab_size, min_count=s.min_answer_count
    )
    cover = vocab.coverage(r.answers for r in train_records)
    logger.info(
        "reader data: %d train / %d val questions; %d answers cover %.1f%% of training questions",
        len(train_records),
        len(val_records),
        len(vocab),
        100 * cover.question_coverage,
    )

    retrieved = None
    index_path = None
    if s.top_k > 0 or s.vision_backbone == "retriever":
        if retriever is None:
            retriever = RetrieverModel.from_pretrained(retriever_dir(run_dir))
    if s.top_k > 0:
        index_path = index.path if index is not None else Path(cfg.index.folder())
        if index is None:
            index = KnowledgeIndex.load(
                index_path,
                retriever=retriever,
                nprobe=cfg.index.nprobe,
                ef_search=cfg.index.ef_search,
            )
        exclude = None
        if s.exclude_own_captions:
            src = cfg.index.captions
            split = (
                "train"
                if src.source == "easy_vqa"
                else (list(src.splits) if src.source == "karpathy" else None)
            )
            exclude = own_caption_ids(load_captions(src, split=split))
        images = {image_key(r): r.image for r in [*train_records, *val_records]}
        retrieved = retrieve_for_images(
            retriever,
            index,
            images,
            s.top_k,
            exclude_ids=exclude,
            cache_dir=out / "retrieval_cache",
            show_progress=accelerator.is_local_main_process,
        )

    if model is None:
        model, processor = build_reader(cfg, vocab, retriever)
    elif processor is None:
        raise ValueError("a pre-built reader needs its processor")
    if list(model.config.answers) != list(vocab):
        raise ValueError(
            f"the reader's answer vocabulary ({len(model.config.answers)} answers) differs from "
            f"the one built from the training data ({len(vocab)}); build the model from this vocabulary"
        )
    all_images = [r.image for r in [*train_records, *val_records]]
    pixels = PixelCache(all_images, processor.image_processor, desc="preprocessing images")
    rule = model.config.soft_target_rule
    train_set = VQADataset(
        train_records, pixels, retrieved, vocab, s.top_k, s.k_dropout, rule, s.seed
    )
    val_set = VQADataset(val_records, pixels, retrieved, vocab, s.top_k, 0.0, rule, s.seed)

    def evaluate(m: Any, acc: Any) -> dict[str, float]:
        return evaluate_reader(
            acc.unwrap_model(m), processor, val_set, acc, batch_size=s.batch_size * 2
        )

    def save(m: Any, path: Path) -> None:
        m.save_pretrained(path)
        processor.save_pretrained(path)
        vocab.save(path / "answers.json")

    result = train(
        model,
        train_set,
        ReaderCollator(processor),
        s,
        out,
        evaluate=evaluate if val_records else None,
        metric="accuracy" if val_records else None,
        resume=resume,
        signature=run_signature(
            model.config, s, data=dataclasses.asdict(cfg.data), index=cfg.index.folder()
        ),
        save_fn=save,
        accelerator=accelerator,
        desc="training reader",
        end_training=False,
    )
    model_dir = result.best_model_dir or result.final_model_dir
    if accelerator.is_main_process:
        indices = {cfg.index.name: str(index_path)} if index_path is not None else {}
        ret_dir = retriever_dir(run_dir) if (run_dir / RETRIEVER_DIR).is_dir() else None
        if ret_dir is not None:
            write_run_file(run_dir, ret_dir, model_dir, indices, s.top_k)
    accelerator.wait_for_everyone()
    if end_training:
        accelerator.end_training()
    return {
        "result": result,
        "model_dir": model_dir,
        "val": result.history[-1] if result.history else None,
        "best_val_accuracy": result.best_metric,
    }
