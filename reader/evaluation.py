"""The reader's predictions and official VQA accuracy on a :class:`ReaderDataset`.

Items stream through a ``DataLoader`` (workers decode and preprocess images);
:func:`evaluate_reader` shards the batches across processes with Accelerate and
gathers the predictions with ``gather_for_metrics``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, Dataset

from rvqa.metrics import evaluate_vqa
from rvqa.pixels import carry_errors, loader_options, raise_carried
from rvqa.reader.data import ReaderCollator, ReaderDataset
from rvqa.reader.modeling import ReaderModel
from rvqa.reader.processing import ReaderProcessor


def _loader(
    items: Dataset | Sequence[dict],
    processor: ReaderProcessor,
    batch_size: int,
    num_workers: int,
    device: Any,
) -> DataLoader:
    """Batches of ``items`` in order, without labels (an error in a worker is carried)."""
    dataset, collate = carry_errors(items, ReaderCollator(processor, with_labels=False))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        generator=torch.Generator(),  # worker seeds: leave the global RNG alone
        **loader_options(num_workers, device),
    )


def _top(model: ReaderModel, batches: Any, top: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(vocab indices, probabilities) of the ``top`` answers, (B, top) per batch."""
    device = next(model.parameters()).device
    for batch in batches:
        batch = {k: v.to(device) for k, v in raise_carried(batch).items()}
        probs = torch.sigmoid(model(**batch).logits.float())
        p, idx = probs.topk(min(top, probs.shape[-1]), dim=-1)
        yield idx, p


@torch.no_grad()
def predict(
    model: ReaderModel,
    processor: ReaderProcessor,
    items: Dataset | Sequence[dict],
    batch_size: int = 128,
    top: int = 1,
    num_workers: int = 0,
) -> list[list[tuple[int, float]]]:
    """Top answers (vocab index, probability) for dataset items (no labels needed).

    Items carry ``pixel_values`` or, from a dataset with cached features,
    ``visual_features`` (the frozen tower is then not run again). A dataset's
    items are built batch by batch (by ``num_workers`` loader workers).
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = _loader(items, processor, batch_size, num_workers, device)
    out: list[list[tuple[int, float]]] = []
    for idx, p in _top(model, loader, top):
        out.extend([list(zip(i.tolist(), q.tolist())) for i, q in zip(idx, p)])
    model.train(was)
    return out


@torch.no_grad()
def evaluate_reader(
    model: ReaderModel,
    processor: ReaderProcessor,
    dataset: ReaderDataset,
    accelerator: Any = None,
    batch_size: int = 128,
    num_workers: int = 0,
) -> dict[str, float]:
    """Official VQA accuracy (×100) of the reader on a dataset.

    With an accelerator, its processes each predict a share of the batches and
    gather the predictions (``gather_for_metrics``, which drops the padding of the
    last batches); every process returns the same metrics.
    """
    was = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    loader = _loader(dataset, processor, batch_size, num_workers, device)
    if accelerator is not None:
        loader = prepare_data_loader(
            loader,
            device,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            put_on_device=True,
        )
    parts = []
    for idx, _ in _top(model, loader, 1):
        idx = idx[:, 0]
        parts.append((accelerator.gather_for_metrics(idx) if accelerator else idx).cpu())
    model.train(was)
    pred_idx = torch.cat(parts).tolist() if parts else []
    if len(pred_idx) != len(dataset):
        raise RuntimeError(f"evaluation gathered {len(pred_idx)} predictions for {len(dataset)}")
    vocab = dataset.vocab
    predictions = [
        {"question_id": r.question_id, "answer": vocab.decode(int(i))}
        for r, i in zip(dataset.records, pred_idx)
    ]
    result = evaluate_vqa(predictions, dataset.records)
    metrics = {"accuracy": result.overall}
    metrics.update({f"acc_{k}": v for k, v in result.per_answer_type.items()})
    return metrics
