"""The reader's predictions and official VQA accuracy on a :class:`ReaderDataset`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rvqa.distributed import sharded_map
from rvqa.metrics import evaluate_vqa
from rvqa.reader.data import ReaderCollator, ReaderDataset
from rvqa.reader.modeling import ReaderModel
from rvqa.reader.processing import ReaderProcessor


@torch.no_grad()
def predict(
    model: ReaderModel,
    processor: ReaderProcessor,
    items: Sequence[dict],
    batch_size: int = 128,
    top: int = 1,
) -> list[list[tuple[int, float]]]:
    """Top answers (vocab index, probability) for dataset items (no labels needed).

    Items carry ``pixel_values`` or, from a dataset with cached features,
    ``visual_features`` (the frozen tower is then not run again).
    """
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
    dataset: ReaderDataset,
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
