"""Train the retriever: ``rvqa train-retriever --config FILE.yaml`` or :func:`train_retriever`.

Works unchanged on one CPU process, several CPU processes
(``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m rvqa train-retriever``)
and multi-GPU (``accelerate launch --multi_gpu -m rvqa train-retriever``).
Writes ``OUTPUT_DIR/retriever/``: ``final/`` and ``best/`` (``save_pretrained``
folders, tokenizer and image processor included), ``checkpoints/`` (resumable),
``config.yaml`` and two result files that do not overlap:

- ``train_result.json``: the training loop's record (steps, processes, the
  validation history, the best validation ``rsum``, wall time, resume point,
  last loss; :meth:`rvqa.training.TrainResult.to_json`);
- ``metrics.json``: the model the run hands on (``model_dir``: ``best/``, or
  ``final/`` without validation data) and its recall@K: ``val`` (its
  validation evaluation) and ``test`` (the test split, ``null`` without one).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from rvqa.config import RunConfig, save_config
from rvqa.data import has_split, holdout_by_image, load_caption_split
from rvqa.distributed import log_placement
from rvqa.errors import DataFormatError
from rvqa.io import write_json_atomic
from rvqa.retriever.data import PairCollator, PairDataset, check_labels, class_names_of
from rvqa.retriever.evaluation import evaluate_retriever
from rvqa.retriever.losses import LABEL_TERMS, TERMS_NEEDING_LABELS, parse_loss
from rvqa.retriever.modeling import RetrieverModel
from rvqa.run_layout import CONFIG_FILE, METRICS_FILE, RETRIEVER_DIR
from rvqa.training import TrainResult, make_accelerator, run_signature, train

logger = logging.getLogger(__name__)


def train_retriever(
    cfg: RunConfig,
    *,
    resume: bool | str = False,
    model: RetrieverModel | None = None,
    end_training: bool = True,
) -> dict[str, Any]:
    """Train the alignment model of ``cfg.retriever`` and report recall@K.

    Args:
        cfg: The run config (``retriever`` section and its ``captions`` source).
        resume: Continue from the newest (or the given) checkpoint.
        model: A pre-built model (tests pass tiny random ones); default:
            ``RetrieverModel.from_backbones(cfg.retriever)`` (the named backbones with
            their pretrained weights).
        end_training: Tear down the process group at the end.

    Returns:
        ``{"result": TrainResult, "model_dir": Path, "test": {recall...} | None}``.
    """
    s = cfg.retriever
    out = Path(cfg.output_dir) / RETRIEVER_DIR
    accelerator = make_accelerator(s, out)
    if accelerator.is_main_process:
        save_config(cfg, out / CONFIG_FILE)

    train_records = load_caption_split(s.captions, "train")
    if not train_records:
        raise DataFormatError(f"caption source {s.captions.source!r} gave no training captions")
    if has_split(s.captions, s.eval_split):
        val_records = load_caption_split(s.captions, s.eval_split)
    else:
        train_records, val_records = holdout_by_image(train_records, s.val_fraction, s.seed)
    test_records = (
        load_caption_split(s.captions, s.test_split) if has_split(s.captions, s.test_split) else []
    )
    logger.info(
        "retriever data: %d train pairs, %d val pairs, %d test pairs",
        len(train_records),
        len(val_records),
        len(test_records),
    )

    set_seed(s.seed)  # the same config gives the same initial weights
    if model is None:
        extra = {}
        terms = parse_loss(s.loss)
        if any(t in LABEL_TERMS for t in terms):
            if any(t in TERMS_NEEDING_LABELS for t in terms):
                check_labels(train_records, s.loss, f"caption source {s.captions.source!r}")
            names = class_names_of(train_records)
            if names:
                extra["class_names"] = names
                logger.info("semantic categories of the training captions: %d", len(names))
        model = RetrieverModel.from_backbones(s, **extra)
    elif model.config.needs_labels:
        check_labels(train_records, s.loss, f"caption source {s.captions.source!r}")
    # Images stream through the loader's workers (retriever.num_workers): none held in memory.
    dataset = PairDataset(train_records, model.image_processor)
    collate = PairCollator(
        model.tokenizer, s.max_caption_length, class_names=model.config.class_names
    )

    def evaluate(m: Any, acc: Any) -> dict[str, float]:
        return evaluate_retriever(acc.unwrap_model(m), val_records, accelerator=acc)

    result: TrainResult = train(
        model,
        dataset,
        collate,
        s,
        out,
        evaluate=evaluate if val_records else None,
        metric="rsum" if val_records else None,
        resume=resume,
        signature=run_signature(model.config, s, captions=dataclasses.asdict(s.captions)),
        accelerator=accelerator,
        desc="training retriever",
        end_training=False,
    )
    model_dir = result.best_model_dir or result.final_model_dir
    test_metrics = None
    unwrapped = accelerator.unwrap_model(model)
    if test_records:
        if model_dir != result.final_model_dir:  # best/ is evaluated on the run's device
            unwrapped = RetrieverModel.from_pretrained(model_dir).to(accelerator.device)
        test_metrics = evaluate_retriever(unwrapped, test_records, accelerator=accelerator)
        if accelerator.is_main_process:
            logger.info("test recall: %s", {k: round(v, 2) for k, v in test_metrics.items()})
    log_placement("train-retriever", accelerator, retriever=unwrapped)
    if accelerator.is_main_process:
        chosen = {"model_dir": str(model_dir), "val": _val_of(result), "test": test_metrics}
        write_json_atomic(out / METRICS_FILE, chosen)
    accelerator.wait_for_everyone()
    if end_training:
        accelerator.end_training()
    return {"result": result, "model_dir": model_dir, "test": test_metrics}


def _val_of(result: TrainResult) -> dict[str, float] | None:
    """The validation evaluation of the model the run hands on (best, else final)."""
    if result.best_model_dir is not None:
        # best/ was saved at the first evaluation that reached the best rsum
        return next((h for h in result.history if h.get("rsum") == result.best_metric), None)
    last = result.history[-1] if result.history else None
    return last if last is not None and last["step"] == result.steps else None
