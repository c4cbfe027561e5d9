"""The reader's predictions and official VQA accuracy on a :class:`ReaderDataset`.

Items stream through a ``DataLoader`` (workers decode and preprocess images);
:func:`evaluate_reader` shards the batches across processes with Accelerate and
gathers the predictions with ``gather_for_metrics``. Both reader types: the
classifier's best vocabulary answer, or the generative reader's generated text
(the official metric normalises it like the human answers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, Dataset

from rvqa.metrics import evaluate_vqa
from rvqa.pixels import carry_errors, loader_options, raise_carried
from rvqa.reader.auto import is_generative, make_collator
from rvqa.reader.data import ReaderDataset
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
    dataset, collate = carry_errors(items, make_collator(processor, with_labels=False))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        generator=torch.Generator(),  # worker seeds: leave the global RNG alone
        **loader_options(num_workers, device),
    )


def _top(model: ReaderModel, batches: Any, top: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Classifier: (vocab indices, probabilities) of the ``top`` answers, (B, top) per batch."""
    device = next(model.parameters()).device
    for batch in batches:
        batch = {k: v.to(device) for k, v in raise_carried(batch).items()}
        probs = torch.sigmoid(model(**batch).logits.float())
        p, idx = probs.topk(min(top, probs.shape[-1]), dim=-1)
        yield idx, p


def _generated(model: Any, batches: Any, top: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Generative reader: (sequences (B, n, T), probabilities (B, n)) per batch,
    ``n = min(top, num_beams)``."""
    device = next(model.parameters()).device
    n = min(top, model.config.num_beams)
    for batch in batches:
        batch = {k: v.to(device) for k, v in raise_carried(batch).items()}
        out = model.generate_answers(**batch, num_return_sequences=n)
        yield out.sequences, out.probs


@torch.no_grad()
def predict(
    model: Any,
    processor: ReaderProcessor,
    items: Dataset | Sequence[dict],
    batch_size: int = 128,
    top: int = 1,
    num_workers: int = 0,
) -> list[list[tuple[Any, float]]]:
    """Top answers for dataset items (no labels needed): (vocab index, probability)
    pairs from the classifier, (generated text, sequence probability) pairs from the
    generative reader (at most ``num_beams`` of them).

    Items carry ``pixel_values`` or, from a dataset with cached features,
    ``visual_features`` (the frozen tower is then not run again). A dataset's
    items are built batch by batch (by ``num_workers`` loader workers).
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = _loader(items, processor, batch_size, num_workers, device)
    out: list[list[tuple[Any, float]]] = []
    if is_generative(model):
        for seqs, p in _generated(model, loader, top):
            texts = processor.decode(seqs.flatten(0, 1))
            n = seqs.shape[1]
            out.extend(list(zip(texts[i * n : (i + 1) * n], q)) for i, q in enumerate(p.tolist()))
    else:
        for idx, p in _top(model, loader, top):
            out.extend([list(zip(i.tolist(), q.tolist())) for i, q in zip(idx, p)])
    model.train(was)
    return out


@torch.no_grad()
def evaluate_reader(
    model: Any,
    processor: ReaderProcessor,
    dataset: ReaderDataset,
    accelerator: Any = None,
    batch_size: int = 128,
    num_workers: int = 0,
) -> dict[str, float]:
    """Official VQA accuracy (×100) of the reader (either type) on a dataset.

    With an accelerator, its processes each predict a share of the batches and
    gather the predictions (``gather_for_metrics``, which drops the padding of the
    last batches); every process returns the same metrics.
    """
    was = model.training
    model.eval()
    generative = is_generative(model)
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
    parts: list[Any] = []
    if generative:
        for seqs, _ in _generated(model, loader, 1):
            best = seqs[:, 0]  # (B, T)
            if accelerator is not None:  # sequences of processes differ in length
                best = accelerator.pad_across_processes(best, dim=1, pad_index=processor.pad_id)
                best = accelerator.gather_for_metrics(best)
            parts.extend(processor.decode(best.cpu()))
    else:
        for idx, _ in _top(model, loader, 1):
            idx = idx[:, 0]
            parts.append((accelerator.gather_for_metrics(idx) if accelerator else idx).cpu())
        parts = [dataset.vocab.decode(int(i)) for i in torch.cat(parts).tolist()] if parts else []
    model.train(was)
    if len(parts) != len(dataset):
        raise RuntimeError(f"evaluation gathered {len(parts)} predictions for {len(dataset)}")
    predictions = [
        {"question_id": r.question_id, "answer": a} for r, a in zip(dataset.records, parts)
    ]
    result = evaluate_vqa(predictions, dataset.records)
    metrics = {"accuracy": result.overall}
    metrics.update({f"acc_{k}": v for k, v in result.per_answer_type.items()})
    return metrics
