"""Train and evaluate the cross-attention re-ranker: ``rvqa train-reranker`` / :func:`train_reranker`.

The re-ranker learns what the dual encoder confuses. Before training, the trained
retriever (frozen) embeds every training image and every distinct training caption
once; each image's top-``top_n`` captions by exact search (the ranking an exact
knowledge index over these captions returns) are its candidates, and the image
tower's tokens (the regions the re-ranker reads) go into one memory-mapped float16
file per split in ``reranker/mined/`` (each process writes its shard's rows; only
the vectors are gathered), removed when the run ends. The validation split is
mined once (the retriever is frozen) and its re-ranking sharded over the processes.
A training item is one caption record: its image, its
caption (the positive), ``num_negatives`` captions drawn from the image's
top-``top_n`` and ``num_random_negatives`` drawn from all the distinct captions,
none of them its own captions or identical texts (drawn uniformly by a generator
seeded with the run's seed, the epoch and the item: each epoch draws others, a
resumed run the same). The random
ones keep the re-ranker honest where the top-N's "negatives" are often valid
matches the data does not label (a partial caption such as "a blue shape at the
top" fits many images). The loss is the listwise softmax of
:class:`~rvqa.retriever.reranker.RerankerModel`; the shared loop
(:mod:`rvqa.training`) trains it, keeps the best by validation R@1 after
re-ranking, and checkpoints for resume.

Writes ``OUTPUT_DIR/reranker/``: ``best/`` and ``final/`` (``save_pretrained``
folders with the tokenizer), ``checkpoints/``, ``config.yaml``,
``train_result.json`` and ``metrics.json`` (validation and test image→text
recall@K of the dual encoder alone and re-ranked). An existing
``OUTPUT_DIR/rvqa_run.json`` gains the re-ranker when it serves the run's retriever
(fingerprints compared), so ``RVQA.from_pretrained`` loads it.

Captions are compared as a deduplicated gallery (distinct texts, compared ignoring
case and spacing, as the retriever's training batches compare them): an image→text
hit is any of the image's own caption texts.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset

from rvqa.config import RunConfig, save_config
from rvqa.data import has_split, holdout_by_image, load_caption_split
from rvqa.distributed import log_placement, shard_bounds, sharded_map
from rvqa.errors import DataFormatError, UsageError
from rvqa.io import write_json_atomic
from rvqa.pixels import ImagePixels, carry_errors, image_pixels, loader_options, raise_carried
from rvqa.retriever.modeling import RetrieverModel
from rvqa.retriever.reranker import RerankerModel, pack_candidates
from rvqa.run_layout import (
    CONFIG_FILE,
    METRICS_FILE,
    RERANKER_DIR,
    RUN_FILE,
    add_reranker_to_run,
    read_run_file,
    retriever_dir,
)
from rvqa.training import TrainResult, make_accelerator, run_signature, train

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


# --------------------------------------------------------------------------- candidates


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass
class Candidates:
    """A split's images, distinct captions and each image's top-N by the dual encoder.

    Attributes:
        images: One reference per distinct image (first appearance order).
        image_of_record: (records,) each record's image row.
        texts: The distinct caption texts (the gallery).
        gallery_of_record: (records,) each record's gallery row.
        positives: Per image, its own gallery rows.
        top: (U, N) gallery rows of each image's top-N, best first.
        top_scores: (U, N) their retrieval scores (an index's scores: inner product,
            or ``1 − 2·hamming/bits`` for a hashing retriever).
        image_emb / text_emb: The retriever's vectors.
        tokens: (U, R, H) float16 image-tower tokens (memory-mapped when large).
    """

    images: list
    image_of_record: np.ndarray
    texts: list[str]
    gallery_of_record: np.ndarray
    positives: list[set[int]]
    top: np.ndarray
    top_scores: np.ndarray
    image_emb: np.ndarray
    text_emb: np.ndarray
    tokens: np.ndarray
    binary: bool = False

    def scores_of(self, image: int, rows: Sequence[int]) -> np.ndarray:
        """Retrieval scores of gallery ``rows`` for ``image``."""
        return self.image_emb[image] @ self.text_emb[np.asarray(rows)].T / self._scale

    @property
    def _scale(self) -> float:
        # ±1 codes: inner product = bits − 2·hamming; the index reports 1 − 2·hamming/bits
        return float(self.image_emb.shape[1]) if self.binary else 1.0


def group_records(records: Sequence[Any]) -> tuple[list, np.ndarray, list[str], np.ndarray]:
    """Distinct images (by image id) and distinct caption texts of caption records."""
    images: list = []
    image_row: dict[Any, int] = {}
    texts: list[str] = []
    text_row: dict[str, int] = {}
    img_of = np.empty(len(records), dtype=np.int64)
    gal_of = np.empty(len(records), dtype=np.int64)
    for i, r in enumerate(records):
        key = str(r.image_id)
        if key not in image_row:
            image_row[key] = len(images)
            images.append(r.image)
        img_of[i] = image_row[key]
        t = _norm(r.caption)
        if t not in text_row:
            text_row[t] = len(texts)
            texts.append(r.caption)
        gal_of[i] = text_row[t]
    return images, img_of, texts, gal_of


def encode_images(
    retriever: RetrieverModel,
    images: Sequence[Any],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator: Any = None,
    out_dir: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(U, D) retrieval vectors and (U, R, H) float16 tokens of ``images``.

    Images stream through loader workers as float32 pixels, exactly as inference embeds
    them; each process embeds a contiguous shard. The tokens go batch by batch into one
    float16 memory-mapped file, ``out_dir/tokens.npy`` (created by the main process;
    each process writes its own rows, then every process opens it read-only), so memory
    holds a batch of tokens, never the split's; only the (U, D) vectors are gathered.
    Without ``out_dir`` (one process only) the tokens are kept in memory.

    Raises:
        UsageError: Several processes and no ``out_dir``.
    """
    images = list(images)
    device = next(retriever.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    if world > 1 and out_dir is None:
        raise UsageError("encode_images: several processes need an out_dir for the token file")
    with torch.inference_mode():  # the token shape: one image through the tower
        probe = image_pixels(images[0], retriever.image_processor, torch.float32)
        shape = tuple(
            retriever._image_parts(probe[None].to(device, retriever.dtype))["tokens"].shape[1:]
        )
    full = (len(images), *shape)
    path = None if out_dir is None else Path(out_dir) / "tokens.npy"
    if path is None:
        tokens = np.empty(full, dtype=np.float16)
    else:
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=full).flush()
        if accelerator is not None:
            accelerator.wait_for_everyone()
        tokens = np.load(path, mmap_mode="r+")
    lo, _ = shard_bounds(len(images), world, rank)

    def run(shard: list) -> np.ndarray:
        ds, collate = carry_errors(
            ImagePixels(shard, retriever.image_processor, torch.float32), torch.stack
        )
        loader = DataLoader(
            ds, batch_size=batch_size, collate_fn=collate, **loader_options(num_workers, device)
        )
        rows, at = [], lo
        with torch.inference_mode():
            for batch in loader:
                pixels = raise_carried(batch).to(device, retriever.dtype)
                parts = retriever._image_parts(pixels)
                rows.append(retriever._retrieval_vector(parts).float().cpu().numpy())
                tok = parts["tokens"].to(torch.float16).cpu().numpy()
                tokens[at : at + len(tok)] = tok
                at += len(tok)
        return np.concatenate(rows) if rows else np.zeros((0, retriever.embed_dim), np.float32)

    emb = np.ascontiguousarray(sharded_map(run, images, accelerator), dtype=np.float32)
    if path is not None:
        tokens.flush()
        del tokens
        if accelerator is not None:
            accelerator.wait_for_everyone()
        tokens = np.load(path, mmap_mode="r")
    return emb, tokens


def exact_top_n(
    image_emb: np.ndarray, text_emb: np.ndarray, n: int, *, binary: bool = False, device: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's ``n`` best gallery rows by inner product (exact), best first, with
    the index's scores (a hashing retriever: ``1 − 2·hamming/bits``). Chunked over the
    images and run on ``device`` (the retriever's GPU at scale), where
    :func:`rvqa.retriever.index.tuning.exact_knn` holds every query's scores per
    gallery chunk in numpy."""
    n = min(n, len(text_emb))
    txt = torch.as_tensor(text_emb, device=device)
    scale = float(image_emb.shape[1]) if binary else 1.0
    idx = np.empty((len(image_emb), n), dtype=np.int64)
    val = np.empty((len(image_emb), n), dtype=np.float32)
    for s in range(0, len(image_emb), 1024):
        q = torch.as_tensor(image_emb[s : s + 1024], device=device)
        v, i = (q @ txt.T / scale).topk(n, dim=1)
        idx[s : s + len(q)] = i.cpu().numpy()
        val[s : s + len(q)] = v.float().cpu().numpy()
    return idx, val


def mine_candidates(
    retriever: RetrieverModel,
    records: Sequence[Any],
    top_n: int,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator: Any = None,
    out_dir: Path | None = None,
) -> Candidates:
    """Embed a split's images and distinct captions with ``retriever`` and find each
    image's top-``top_n`` captions (see the module doc)."""
    images, img_of, texts, gal_of = group_records(records)
    if not images:
        raise DataFormatError("no caption records to mine candidates from")
    image_emb, tokens = encode_images(
        retriever,
        images,
        batch_size=batch_size,
        num_workers=num_workers,
        accelerator=accelerator,
        out_dir=out_dir,
    )
    text_emb = sharded_map(
        lambda shard: retriever.embed_texts(shard, batch_size=256), texts, accelerator
    )
    binary = retriever.index_metric == "hamming"
    top, scores = exact_top_n(
        image_emb, text_emb, top_n, binary=binary, device=next(retriever.parameters()).device
    )
    positives: list[set[int]] = [set() for _ in images]
    for u, g in zip(img_of.tolist(), gal_of.tolist()):
        positives[u].add(g)
    return Candidates(
        images, img_of, texts, gal_of, positives, top, scores, image_emb, text_emb, tokens, binary
    )


# --------------------------------------------------------------------------- training data


class RerankDataset(Dataset):
    """One item per caption record: its image's tokens, the positive caption,
    ``num_negatives`` hard negatives from the image's top-N and ``num_random_negatives``
    drawn from the whole gallery (never one of the image's own texts). The draws are
    uniform (the top-N's hardest are often unlabelled valid matches) and seeded by the
    run's seed, the epoch (:meth:`set_epoch`, called by the training loop) and the item,
    so every epoch sees other negatives and a resumed run the same ones."""

    def __init__(
        self, cands: Candidates, num_negatives: int, seed: int, num_random_negatives: int = 0
    ):
        self.cands = cands
        self.num_negatives = num_negatives
        self.num_random_negatives = num_random_negatives
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the negatives of ``epoch`` (the training loop calls it before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cands.image_of_record)

    def __getitem__(self, i: int) -> dict:
        c = self.cands
        u = int(c.image_of_record[i])
        pos = int(c.gallery_of_record[i])
        rng = np.random.default_rng([self.seed, self.epoch, i])
        pool = [g for g in c.top[u].tolist() if g not in c.positives[u]]
        if len(pool) > self.num_negatives:
            pick = np.sort(rng.choice(len(pool), self.num_negatives, replace=False))
            pool = [pool[j] for j in pick]
        taken = set(pool) | c.positives[u]
        extra: list[int] = []
        for _ in range(4 * self.num_random_negatives):  # a few draws; a tiny gallery runs out
            if len(extra) == self.num_random_negatives:
                break
            g = int(rng.integers(len(c.texts)))
            if g not in taken:
                taken.add(g)
                extra.append(g)
        rows = [pos, *pool, *extra]
        return {
            "image_tokens": torch.from_numpy(np.asarray(c.tokens[u], dtype=np.float32)),
            "captions": [c.texts[g] for g in rows],
            "retrieval_scores": torch.from_numpy(c.scores_of(u, rows).astype(np.float32)),
        }


class RerankCollator:
    """Pads each item's candidates to the batch's most and tokenises them; the first
    candidate of every item is its positive (``labels``)."""

    def __init__(self, tokenizer: Any, max_length: int, pad_token_id: int = 0):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        batch = pack_candidates(
            self.tokenizer,
            [it["captions"] for it in items],
            [it["retrieval_scores"] for it in items],
            self.max_length,
            self.pad,
        )
        labels = torch.zeros_like(batch["candidate_mask"])
        labels[:, 0] = True
        return {
            "image_tokens": torch.stack([it["image_tokens"] for it in items]),
            **batch,
            "labels": labels,
        }


def score_spread(top_scores: np.ndarray) -> float:
    """The median over images of the standard deviation of their top-N retrieval scores
    (the re-ranker's ``retrieval_score_scale``; 1.0 when it is 0 or undefined), to 3
    significant digits, so that a resumed run (part of its signature) computes the same."""
    if top_scores.shape[1] < 2:
        return 1.0
    spread = float(np.median(top_scores.std(axis=1)))
    return float(f"{spread:.3g}") if np.isfinite(spread) and spread > 1e-9 else 1.0


# --------------------------------------------------------------------------- evaluation


def rerank_candidates(
    reranker: RerankerModel,
    cands: Candidates,
    *,
    batch_size: int = 32,
    images: Sequence[int] | None = None,
) -> np.ndarray:
    """(U, N) each image's top-N gallery rows re-ordered by the re-ranker."""
    rows = range(len(cands.images)) if images is None else list(images)
    rows = list(rows)
    out = np.empty((len(rows), cands.top.shape[1]), dtype=np.int64)
    dev = reranker.device
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        toks = torch.from_numpy(np.asarray(cands.tokens[chunk], dtype=np.float32)).to(dev)
        caps = [[cands.texts[g] for g in cands.top[u]] for u in chunk]
        scores = [cands.top_scores[u] for u in chunk]
        logits = reranker.score(toks, caps, scores)
        for j, (u, lg) in enumerate(zip(chunk, logits)):
            out[s + j] = cands.top[u][np.argsort(-lg, kind="stable")]
    return out


def recall_of(
    ranked: np.ndarray, positives: Sequence[set[int]], ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """Image→text recall@K (%) of ranked gallery rows: a hit is any positive in the top K."""
    hits = {k: 0 for k in ks}
    for row, pos in zip(ranked, positives):
        first = next((j for j, g in enumerate(row.tolist()) if g in pos), None)
        for k in ks:
            hits[k] += first is not None and first < k
    n = max(len(ranked), 1)
    return {f"r{k}": 100.0 * hits[k] / n for k in ks}


def evaluate_candidates(
    reranker: RerankerModel, cands: Candidates, *, accelerator: Any = None, batch_size: int = 32
) -> dict[str, float]:
    """Image→text recall@1/5/10 (%) of mined candidates: the dual encoder alone
    (``dual_r*``) and re-ranked (``r*``); the re-ranking is sharded over the processes."""
    rows = list(range(len(cands.images)))
    ranked = sharded_map(
        lambda shard: rerank_candidates(reranker, cands, batch_size=batch_size, images=shard),
        rows,
        accelerator,
    )
    out = {f"dual_{k}": v for k, v in recall_of(cands.top, cands.positives).items()}
    out.update(recall_of(ranked, cands.positives))
    out["images"] = float(len(rows))
    out["top_n"] = float(cands.top.shape[1])
    return out


def evaluate_reranker(
    reranker: RerankerModel,
    retriever: RetrieverModel,
    records: Sequence[Any],
    top_n: int,
    *,
    accelerator: Any = None,
    max_images: int | None = None,
    batch_size: int = 32,
    out_dir: Path | None = None,
) -> dict[str, float]:
    """Image→text recall@1/5/10 (%) over ``records``' distinct captions: the dual
    encoder alone (``dual_r*``) and its top-``top_n`` re-ranked (``r*``). ``out_dir``:
    where the image tokens are memory-mapped (needed with several processes)."""
    if max_images is not None:
        records = _first_images(records, max_images)
    cands = mine_candidates(retriever, records, top_n, accelerator=accelerator, out_dir=out_dir)
    return evaluate_candidates(reranker, cands, accelerator=accelerator, batch_size=batch_size)


def _first_images(records: Sequence[Any], n: int) -> list:
    """The records of the first ``n`` distinct images."""
    seen: set[str] = set()
    out = []
    for r in records:
        key = str(r.image_id)
        if key not in seen:
            if len(seen) == n:
                continue
            seen.add(key)
        out.append(r)
    return out


# --------------------------------------------------------------------------- the run


def train_reranker(
    cfg: RunConfig,
    *,
    resume: bool | str = False,
    model: RerankerModel | None = None,
    retriever: RetrieverModel | None = None,
    end_training: bool = True,
) -> dict[str, Any]:
    """Train the re-ranker of ``cfg.reranker`` for the run's retriever.

    Args:
        cfg: The run config (``reranker`` section; its ``captions`` default to
            ``retriever.captions``, its ``retriever`` to the run's trained one).
        resume: Continue from the newest (or the given) checkpoint.
        model: A pre-built re-ranker (tests pass tiny ones); default:
            ``RerankerModel.from_retriever(retriever, cfg.reranker)``.
        retriever: A loaded retriever (default: loaded from ``reranker.retriever`` or
            the run folder).
        end_training: Tear down the process group at the end.

    Returns:
        ``{"result": TrainResult, "model_dir": Path, "val": {...}, "test": {...} | None}``.

    Raises:
        RunFolderError: No trained retriever in the run folder (and none named).
        IndexMismatchError: ``model`` was built for another retriever.
        DataFormatError: The caption source gave no training captions.
    """
    s = cfg.reranker
    out = Path(cfg.output_dir) / RERANKER_DIR
    accelerator = make_accelerator(s, out)
    if accelerator.is_main_process:
        save_config(cfg, out / CONFIG_FILE)
    if retriever is None:
        path = Path(s.retriever) if s.retriever else retriever_dir(cfg.output_dir)
        retriever = RetrieverModel.from_pretrained(path)
    retriever = retriever.to(accelerator.device).eval()
    captions = s.captions if s.captions is not None else cfg.retriever.captions
    train_records = load_caption_split(captions, "train")
    if not train_records:
        raise DataFormatError(f"caption source {captions.source!r} gave no training captions")
    if has_split(captions, s.eval_split):
        val_records = load_caption_split(captions, s.eval_split)
    else:
        train_records, val_records = holdout_by_image(train_records, s.val_fraction, s.seed)
    test_records = (
        load_caption_split(captions, s.test_split) if has_split(captions, s.test_split) else []
    )
    logger.info(
        "re-ranker data: %d train, %d val, %d test captions",
        len(train_records),
        len(val_records),
        len(test_records),
    )
    mined_dir = out / "mined"  # scratch: the image tokens, removed at the end
    cands = mine_candidates(
        retriever,
        train_records,
        s.top_n,
        batch_size=s.batch_size,
        num_workers=s.num_workers,
        accelerator=accelerator,
        out_dir=mined_dir / "train",
    )
    logger.info(
        "mined the top-%d of %d training images over %d distinct captions",
        cands.top.shape[1],
        len(cands.images),
        len(cands.texts),
    )
    set_seed(s.seed)
    if model is None:
        model = RerankerModel.from_retriever(
            retriever, s, retrieval_score_scale=score_spread(cands.top_scores)
        )
    val_cands = None
    if val_records:  # the retriever is frozen: the validation candidates are mined once
        val_cands = mine_candidates(
            retriever,
            _first_images(val_records, s.max_eval_images) if s.max_eval_images else val_records,
            s.eval_top_n,
            batch_size=s.batch_size,
            num_workers=s.num_workers,
            accelerator=accelerator,
            out_dir=mined_dir / "val",
        )
    model.check_retriever(retriever.fingerprint(), "the model passed to train_reranker")
    dataset = RerankDataset(cands, s.num_negatives, s.seed, s.num_random_negatives)
    collate = RerankCollator(
        model.tokenizer, model.config.max_caption_length, model.config.pad_token_id
    )

    def evaluate(m: Any, acc: Any) -> dict[str, float]:
        return evaluate_candidates(acc.unwrap_model(m), val_cands, accelerator=acc)

    result: TrainResult = train(
        model,
        dataset,
        collate,
        s,
        out,
        evaluate=evaluate if val_records else None,
        metric="r1" if val_records else None,
        resume=resume,
        signature=run_signature(
            model.config,
            s,
            captions=dataclasses.asdict(captions),
            top_n=s.top_n,
            num_negatives=s.num_negatives,
            num_random_negatives=s.num_random_negatives,
        ),
        accelerator=accelerator,
        desc="training re-ranker",
        end_training=False,
    )
    model_dir = result.best_model_dir or result.final_model_dir
    unwrapped = accelerator.unwrap_model(model)
    if model_dir != result.final_model_dir:
        unwrapped = RerankerModel.from_pretrained(model_dir).to(accelerator.device)
    val = None
    if val_records:
        val = next((h for h in result.history if h.get("r1") == result.best_metric), None)
    test = None
    if test_records:
        test = evaluate_reranker(
            unwrapped,
            retriever,
            test_records,
            s.eval_top_n,
            accelerator=accelerator,
            out_dir=mined_dir / "test",
        )
        if accelerator.is_main_process:
            logger.info("test recall (i2t): %s", {k: round(v, 2) for k, v in test.items()})
    log_placement("train-reranker", accelerator, reranker=unwrapped, retriever=retriever)
    if accelerator.is_main_process:
        write_json_atomic(
            out / METRICS_FILE, {"model_dir": str(model_dir), "val": val, "test": test}
        )
        _record_in_run(Path(cfg.output_dir), model_dir, unwrapped)
    accelerator.wait_for_everyone()
    cands = val_cands = dataset = None  # drop their memory maps before the files go
    if accelerator.is_main_process:
        shutil.rmtree(mined_dir, ignore_errors=True)
    if end_training:
        accelerator.end_training()
    return {"result": result, "model_dir": model_dir, "val": val, "test": test}


def _record_in_run(run_dir: Path, model_dir: Path, reranker: RerankerModel) -> None:
    """Record the re-ranker in the run's ``rvqa_run.json`` when it serves the run's
    retriever (one trained for another retriever would make the run unloadable)."""
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        return
    run = read_run_file(run_dir)
    theirs = RetrieverModel.from_pretrained(run.retriever).fingerprint()
    if theirs != reranker.config.retriever_fingerprint:
        logger.warning(
            "not recording the re-ranker in %s: it was trained for retriever %s, the run's is "
            "%s (load it with --reranker %s beside that retriever)",
            run_file,
            reranker.config.retriever_fingerprint,
            theirs,
            model_dir,
        )
        return
    add_reranker_to_run(run_dir, model_dir)


__all__ = [
    "Candidates",
    "RerankCollator",
    "RerankDataset",
    "evaluate_candidates",
    "evaluate_reranker",
    "exact_top_n",
    "group_records",
    "mine_candidates",
    "recall_of",
    "rerank_candidates",
    "train_reranker",
]
