"""The reader's training data: VQA records → model inputs.

* :func:`load_reader_data` — a run config's (train, validation) VQA records, lazy.
* :class:`ReaderDataset` — items of pixels (decoded on access, in the loader's
  workers) or cached image-tower features, question, retrieved captions and
  soft answer targets.
* :class:`ReaderCollator` — tokenises a batch with the reader's processor.
* :func:`visual_features_for` — a frozen image tower's features, computed once
  per distinct image into a memory-mapped ``.npy`` file on disk
  (``reader/feature_cache/KEY.npy``), keyed by the tower, the image processor and
  the images, and reused by the next run with the same key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader, Dataset, Subset

from rvqa.config import RunConfig
from rvqa.data import holdout_by_image, load_image, load_vqa
from rvqa.distributed import shard_bounds
from rvqa.errors import DataFormatError
from rvqa.pixels import ImagePixels, carry_errors, image_pixels, loader_options, raise_carried
from rvqa.reader.answers import AnswerVocab
from rvqa.reader.augmentation import TermWorlds
from rvqa.reader.processing import ReaderProcessor
from rvqa.training import VOLATILE_CONFIG_KEYS

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".npy"
PARTIAL_SUFFIX = ".partial.npy"
"""A feature cache being written: ``.KEY.PID.partial.npy``, renamed to ``KEY.npy`` when
complete. Only ``KEY.npy`` files are ever read; partial files a killed writer left
behind are removed when the next cache is built."""


def record_image_key(record: Any) -> str:
    """The key a VQA record's image has in retrieval results: ``str(record.image_id)``.

    (Not :func:`rvqa.data.images.image_key`, which keys an image *object*.)
    """
    return str(record.image_id)


def load_reader_data(cfg: RunConfig) -> tuple[Sequence, Sequence]:
    """(train, validation) VQA records: validation = ``reader.eval_split`` or held-out images.

    Both are lazy record sequences (:class:`~rvqa.data.VQADataset`): subsets share
    the parsed columns, and records are built on access.

    Raises:
        DataFormatError: The training split has no answers.
    """
    d, s = cfg.data, cfg.reader
    train_records = load_vqa(d, d.train_split)
    if d.train_fraction < 1.0:
        train_records = train_records.subset(d.train_fraction, seed=s.seed)
    if s.eval_split:
        val_records = load_vqa(d, s.eval_split)
    else:
        train_records, val_records = holdout_by_image(train_records, s.val_fraction, s.seed)
    if s.max_eval_questions and len(val_records) > s.max_eval_questions:
        val_records = val_records[: s.max_eval_questions]
    if len(train_records) and not train_records.has_answers:
        raise DataFormatError(f"the training split {d.train_split!r} has no annotations (answers)")
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


class ReaderDataset(Dataset):
    """Items: pixel values (or cached visual features), question, captions, scores, answers, targets.

    Args:
        records: VQA records (``image``, ``image_id``, ``question``, ``question_id``,
            ``answers``); a lazy sequence stays lazy.
        image_processor: Turns a record's image into pixel values, on access (in the
            training loader's workers); float16, as they leave the workers.
        retrieved: :func:`record_image_key` → retrieved ``(caption, score, id)`` best
            first (any mapping with ``get``; None: no captions).
        vocab: The answer vocabulary (soft targets); None: no ``labels`` (the generative
            reader's collator makes its targets from the items' ``answers``).
        top_k: Captions per question.
        k_dropout: Probability of a random k in [0, top_k] per question (see :func:`_k_for`).
        rule: Soft-target rule of :meth:`AnswerVocab.soft_target_vector`.
        seed: Seed of the k-dropout hash.
        features: Cached image-tower features of these records (from
            :func:`visual_features_for`); given, items carry ``visual_features``
            instead of ``pixel_values`` and no image is read.
        worlds: Counterfactual term worlds (training only): each question's
            captions, question and answers are rewritten into the world a hash
            of its id and the epoch (:meth:`set_epoch`, called by the training
            loop) chooses (:class:`~rvqa.reader.augmentation.TermWorlds`).
    """

    def __init__(
        self,
        records: Sequence[Any],
        image_processor: Any,
        retrieved: Any,
        vocab: AnswerVocab | None,
        top_k: int,
        k_dropout: float = 0.0,
        rule: str = "min3",
        seed: int = 0,
        features: RecordFeatures | None = None,
        worlds: TermWorlds | None = None,
    ):
        if features is not None and len(features) != len(records):
            raise ValueError(
                f"features for {len(features)} records given with {len(records)} records"
            )
        self.records = records
        self.image_processor = image_processor
        self.features = features
        self.retrieved = retrieved
        self.vocab = vocab
        self.top_k = top_k
        self.k_dropout = k_dropout
        self.rule = rule
        self.seed = seed
        self.worlds = worlds
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The training epoch (``rvqa.training`` calls it before each epoch): with term
        worlds, each question is rewritten into another world in every epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        hits = self.retrieved.get(record_image_key(r), []) if self.retrieved is not None else []
        k = _k_for(r.question_id, self.top_k, self.k_dropout, self.seed) if self.retrieved else 0
        hits = hits[:k]
        visual = (
            {"visual_features": self.features[i]}
            if self.features is not None
            else {"pixel_values": image_pixels(r.image, self.image_processor)}
        )
        question, captions, answers = r.question, [h[0] for h in hits], list(r.answers or [])
        if self.worlds is not None:
            w = self.worlds.world_of(r.question_id, self.epoch, self.seed)
            question = self.worlds.rewrite(question, w)
            captions = self.worlds.rewrite_all(captions, w)
            answers = self.worlds.rewrite_all(answers, w)
        item = {
            **visual,
            "question": question,
            "captions": captions,
            "scores": [h[1] for h in hits],
            "answers": answers,
        }
        if self.vocab is not None:
            item["labels"] = self.vocab.soft_target_vector(item["answers"], self.rule)
        return item


class ReaderCollator:
    """Tokenises a batch with the reader's processor (cached per distinct string).

    Pixel values stay float16 (the model casts them to its image tower's dtype).
    """

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


# --------------------------------------------------------------------------- feature cache


class ImageTable(Sequence):
    """The distinct images of some record sequences, in order of first appearance.

    ``table[row]`` is an image reference; :meth:`rows` maps each record of one
    sequence to its row. One row per image file (by path), else per image id
    (records of one data source with one image id share a row), else per record.
    Building the table reads only the sequences' columns when they are lazy
    (:meth:`~rvqa.data.VQADataset.image_file_at`,
    :meth:`~rvqa.data.VQADataset.image_id_at`): no image is decoded. Holds
    positions only: ``table[row]`` builds the row's first record (in a loader
    worker, when streamed) and returns its image.
    """

    def __init__(self, *record_seqs: Sequence[Any]):
        self._seqs = record_seqs
        index: dict[Any, int] = {}
        first: list[tuple[int, int]] = []  # (sequence, position) of each row's first record
        self._keys: list[Any] = []  # each row's identity (see _image_identity)
        self._rows: list[np.ndarray] = []
        for s, seq in enumerate(record_seqs):
            rows = np.empty(len(seq), dtype=np.int64)
            for pos in range(len(seq)):
                key = _image_identity(seq, pos)
                row = index.get(key) if key is not None else None
                if row is None:
                    row = len(first)
                    first.append((s, pos))
                    self._keys.append(key)
                    if key is not None:
                        index[key] = row
                rows[pos] = row
            self._rows.append(rows)
        self._first = np.array(first, dtype=np.int64).reshape(-1, 2)
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        """A hash of every image's identity, in row order (see :func:`_image_token`);
        computed on first use (it may read files' metadata, or decode images whose
        source has no identity)."""
        if self._digest is None:
            h = hashlib.sha256()
            for row, key in enumerate(self._keys):
                h.update(
                    _image_token(key, lambda row=row: self[row]).encode("utf-8", "surrogateescape")
                    + b"\n"
                )
            self._digest = h.hexdigest()
        return self._digest

    def __len__(self) -> int:
        return len(self._first)

    def __getitem__(self, row: int) -> Any:  # type: ignore[override]
        s, pos = self._first[row]
        return self._seqs[int(s)][int(pos)].image

    def rows(self, seq: int) -> np.ndarray:
        """Row of every record of sequence ``seq`` (int64, one per record)."""
        return self._rows[seq]


_NO_SOURCE = "<records>"
"""The scope of image ids of records whose source has no identity (in-memory records)."""


def _image_identity(seq: Sequence[Any], pos: int) -> Any:
    """What makes record ``pos`` of ``seq`` the same image as another record, read
    without decoding an image where ``seq`` is lazy:

    * ``("path", path)`` for an image file;
    * ``("id", source, image_id)`` for an image decoded by its source: records of one
      source with one image id show one image. ``source`` is the sequence's
      ``data_identity`` (a ``datasets`` fingerprint and files), or ``"<records>"`` when
      it has none (in-memory records: their ids are taken to be shared, as
      :func:`record_image_key` takes them for retrieval);
    * None when the record has no image id (an image of its own).
    """
    file_at = getattr(seq, "image_file_at", None)
    id_at = getattr(seq, "image_id_at", None)
    if file_at is not None and id_at is not None:
        path, image_id = file_at(pos), id_at(pos)
        source = getattr(seq, "data_identity", None) or _NO_SOURCE
    else:  # a list of records (built in memory anyway)
        r = seq[pos]
        image = r.image
        path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
        image_id, source = getattr(r, "image_id", None), _NO_SOURCE
    if path is not None:
        return ("path", path)
    return None if image_id is None else ("id", source, image_id)


def _image_token(key: Any, image: Any) -> str:
    """An image's identity for the cache key, from its :func:`_image_identity` key:

    * a file: its path, size and modification time (a missing one: its path, and
      loading it later names it);
    * an image id of a source with an identity: the source's identity and the id
      (cheap; the source's identity changes when its data do);
    * otherwise (in-memory records, no id): the hash of the pixels, ``image()`` decoded.
    """
    if key is not None and key[0] == "path":
        path = key[1]
        try:
            st = os.stat(path)
        except OSError:
            return f"path\t{path}\tmissing"
        return f"path\t{path}\t{st.st_size}\t{st.st_mtime_ns}"
    if key is not None and key[1] != _NO_SOURCE:
        return f"id\t{key[1]}\t{type(key[2]).__name__}\t{key[2]}"
    pil = load_image(image())
    return f"pixels\t{pil.size}\t{hashlib.sha256(pil.tobytes()).hexdigest()}"


class RecordFeatures:
    """Cached image-tower features of one record sequence, read from the memory-mapped cache.

    ``features[i]`` is record i's (V, C) float32 tensor (one row copied out of the
    file; the file itself is never read into memory). Pickles without the mapping
    (loader workers reopen the file).

    Attributes:
        path: The cache file (``.npy``).
        rows: Row of the file for each record.
    """

    def __init__(self, path: Path, rows: np.ndarray):
        self.path = Path(path)
        self.rows = rows
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        """The whole cache, memory-mapped read-only: (images, V, C) float32."""
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[self.rows[i]]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def feature_cache_key(model: Any, image_processor: Any, table: ImageTable, precision: str) -> str:
    """The cache's key: a hash of the image tower (config and weights), what
    :meth:`ReaderModel.vision_features` does after it (``visual_grid``), the
    precision it runs in, the image processor's config and the images."""
    h = hashlib.sha256()
    tower = model.vision_model
    conf = tower.config.to_dict()
    for key in VOLATILE_CONFIG_KEYS:
        conf.pop(key, None)
    meta = {
        "tower": conf,
        "visual_grid": model.config.visual_grid,
        "dtype": str(next(tower.parameters()).dtype),
        "precision": precision,
        "image_processor": image_processor.to_dict(),
        "images": table.digest,
        "rows": len(table),
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().float().numpy().tobytes())
    return h.hexdigest()[:24]


def _valid_cache(path: Path, rows: int) -> bool:
    """Whether ``path`` is a complete cache of ``rows`` images (a readable float32 .npy)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        logger.warning("feature cache %s is unreadable (%s); rebuilding it", path, err)
        return False
    return arr.dtype == np.float32 and arr.ndim == 3 and arr.shape[0] == rows


@torch.no_grad()
def visual_features_for(
    model: Any,
    image_processor: Any,
    record_seqs: Sequence[Sequence[Any]],
    cache_dir: str | os.PathLike,
    *,
    accelerator: Any = None,
    batch_size: int = 256,
    num_workers: int = 0,
    max_bytes: int | None = None,
) -> list[RecordFeatures] | None:
    """A frozen image tower's features of every image of ``record_seqs``, on disk.

    A frozen tower stays in eval mode while the reader trains (no dropout, fixed
    normalisation statistics), so its output is a fixed function of the image and
    a cached row equals what :meth:`ReaderModel.vision_features` gives that image's
    pixels on any training step. The cache is ``cache_dir/KEY.npy`` (float32,
    (images, V, C)), KEY = :func:`feature_cache_key`; a complete file with the key
    is reused, else it is built: its size is logged first, then images stream
    through a ``DataLoader`` (``num_workers`` workers decode and preprocess) into
    the tower, under the accelerator's autocast on its device. With several
    processes the main process alone decides (reuse, build or skip over budget, and
    the file) and broadcasts the decision before any process acts on it, so every
    process follows the same one whatever its own view of the disk; each encodes
    its contiguous shard and writes its rows into one shared temporary file, which
    the main process renames to ``KEY.npy`` once every process is done. Images are
    keyed by path, or by image id within their source (:class:`ImageTable`): the
    key is computed by the main process only and decodes images only for in-memory
    records without a source identity. A killed build leaves only a ``*.partial.npy`` file, which is never read
    and is removed by the next build (as are caches of other keys: the folder holds
    one). Readers memory-map the file: no process holds it in memory.

    Args:
        model: A :class:`~rvqa.reader.modeling.ReaderModel`.
        image_processor: The reader's image processor (what training would apply).
        record_seqs: Record sequences (train, validation); their images are cached.
        cache_dir: The cache folder (``reader/feature_cache`` of the run).
        accelerator: The run's ``Accelerator`` (None: one process, the model's device).
        batch_size: Images per tower forward.
        num_workers: Loader workers that decode and preprocess images.
        max_bytes: Disk budget; None = the free space of ``cache_dir``'s disk. A cache
            over it is not built (logged) and the tower runs on every step; 0 never caches.

    Returns:
        Per sequence, its records' features; None when the tower is not frozen, there
        are no records, or the cache is over budget.

    Raises:
        ImageLoadError: An image cannot be read (naming the file).
        RuntimeError: (other processes) The main process failed while deciding; it
            raises its own error, and no process waits for it forever.
    """
    if not model.config.freeze_vision or max_bytes == 0:
        return None
    table = ImageTable(*record_seqs)
    n = len(table)
    if n == 0:
        return None
    device = accelerator.device if accelerator is not None else model.device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    is_main = rank == 0
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    dtype = next(model.vision_model.parameters()).dtype  # as forward casts pixel_values

    def encode(pixels: torch.Tensor) -> np.ndarray:
        with autocast():
            feats = model.vision_features(pixels.to(device).to(dtype))
        return feats.float().cpu().numpy()

    was = model.training
    model.eval()
    try:
        decision: dict[str, Any] = {}
        failure: BaseException | None = None
        if is_main:
            try:
                decision = _decide(
                    model, image_processor, table, cache_dir, accelerator, max_bytes, encode
                )
            except Exception as err:
                if world == 1:
                    raise
                failure = err
                decision = {"action": "error", "error": f"{type(err).__name__}: {err}"}
        if world > 1:
            box = [decision]
            broadcast_object_list(box, from_process=0)  # also: the partial file exists
            decision = box[0]
        if failure is not None:
            raise failure
        action = decision["action"]
        if action == "error":
            raise RuntimeError(
                f"feature cache: the main process failed ({decision['error']}); see its log"
            )
        if action == "skip":
            return None
        path = Path(decision["path"])
        if action == "build":
            _build_shard(
                table,
                image_processor,
                Path(decision["tmp"]),
                encode,
                model,
                device,
                rank,
                world,
                batch_size,
                num_workers,
            )
            if accelerator is not None:
                accelerator.wait_for_everyone()
            if is_main:
                tmp = Path(decision["tmp"])
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                logger.info("feature cache: wrote %s (%s)", path, _size(decision["nbytes"]))
            if accelerator is not None:
                accelerator.wait_for_everyone()
    finally:
        model.train(was)
    return [RecordFeatures(path, table.rows(s)) for s in range(len(record_seqs))]


def _decide(
    model: Any,
    image_processor: Any,
    table: ImageTable,
    cache_dir: str | os.PathLike,
    accelerator: Any,
    max_bytes: int | None,
    encode: Any,
) -> dict[str, Any]:
    """The main process's decision, which every process follows: ``{"action": "reuse",
    "path"}`` (a complete cache with the key), ``{"action": "skip"}`` (over budget) or
    ``{"action": "build", "path", "tmp", "nbytes"}`` (the partial file created)."""
    n = len(table)
    precision = str(accelerator.mixed_precision) if accelerator is not None else "no"
    cache_dir = Path(cache_dir)
    key = feature_cache_key(model, image_processor, table, precision)
    path = cache_dir / f"{key}{CACHE_SUFFIX}"
    if path.is_file() and _valid_cache(path, n):
        shape = np.load(path, mmap_mode="r").shape
        logger.info("feature cache: reusing %s (%d images × %d × %d)", path, *shape)
        return {"action": "reuse", "path": str(path)}
    model.to(accelerator.device if accelerator is not None else model.device)
    v, c = encode(image_pixels(table[0], image_processor)[None]).shape[1:]
    nbytes = n * v * c * 4
    cache_dir.mkdir(parents=True, exist_ok=True)
    budget = max_bytes if max_bytes is not None else shutil.disk_usage(cache_dir).free
    logger.info(
        "feature cache: %d images × %d × %d × 4 bytes = %s on disk at %s",
        n,
        v,
        c,
        _size(nbytes),
        path,
    )
    if nbytes > budget:
        logger.warning(
            "not caching frozen image-tower features: %s exceeds the %s %s; "
            "the tower runs on every step",
            _size(nbytes),
            _size(budget),
            "budget" if max_bytes is not None else "free on that disk",
        )
        return {"action": "skip"}
    tmp = _start_partial(cache_dir, path, (n, v, c))
    return {"action": "build", "path": str(path), "tmp": str(tmp), "nbytes": nbytes}


def _build_shard(
    table: ImageTable,
    image_processor: Any,
    tmp: Path,
    encode: Any,
    model: Any,
    device: Any,
    rank: int,
    world: int,
    batch_size: int,
    num_workers: int,
) -> None:
    """Encode this process's contiguous shard of ``table`` into its rows of ``tmp``."""
    lo, hi = shard_bounds(len(table), world, rank)
    if hi <= lo:
        return
    model.to(device)
    out = np.lib.format.open_memmap(tmp, mode="r+")
    loader = _image_loader(table, image_processor, lo, hi, batch_size, num_workers, device)
    at = lo
    for batch in loader:
        feats = encode(raise_carried(batch))
        out[at : at + len(feats)] = feats
        at += len(feats)
    out.flush()
    del out


def _size(nbytes: int) -> str:
    """Bytes in words: ``3.1 MB``, ``52.30 GB``."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _start_partial(cache_dir: Path, path: Path, shape: tuple[int, int, int]) -> Path:
    """Remove the folder's other caches and partial files; create the new partial file."""
    for old in cache_dir.iterdir():
        if old.name.endswith(CACHE_SUFFIX) and old != path:
            old.unlink(missing_ok=True)
    tmp = cache_dir / f".{path.stem}.{os.getpid()}{PARTIAL_SUFFIX}"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    del out  # header written, file sized; every process opens it r+
    return tmp


def _image_loader(
    table: ImageTable,
    image_processor: Any,
    lo: int,
    hi: int,
    batch_size: int,
    num_workers: int,
    device: Any,
) -> DataLoader:
    """Rows ``[lo, hi)`` of ``table`` as batches of float16 pixels, in order."""
    dataset, collate = carry_errors(
        Subset(ImagePixels(table, image_processor), range(lo, hi)), torch.stack
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        **loader_options(num_workers, device),
    )
