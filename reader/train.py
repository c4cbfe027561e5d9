"""Train the reader: ``rvqa train-reader --config FILE.yaml`` or :func:`train_reader`.

Captions for every training image come from the run's knowledge index through
the trained retriever, retrieved once per image and cached (see
:mod:`rvqa.reader.retrieval`). Images stream through the loaders' workers
(``reader.num_workers``); none is held in memory. A frozen image tower
(``reader.freeze_vision``, the demo's) is run once per image before training into
a memory-mapped file, ``reader/feature_cache/KEY.npy``, reused by the next run with
the same tower and images, and training and evaluation read its rows
(:func:`rvqa.reader.data.visual_features_for`; over the disk budget the tower runs
per step). Data: :mod:`rvqa.reader.data`;
accuracy: :mod:`rvqa.reader.evaluation`. Same Accelerate loop as the retriever
(:func:`rvqa.training.train`): one CPU process, several (``torchrun``) or
multi-GPU (``accelerate launch -m rvqa train-reader``). Writes
``OUTPUT_DIR/reader/``: ``final/``, ``best/`` (model — its config holds the answer
vocabulary — and processor), ``checkpoints/``, ``train_result.json``, ``config.yaml``; and
``OUTPUT_DIR/rvqa_run.json``, which :meth:`rvqa.RVQA.from_pretrained` reads.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list, set_seed
from transformers import T5Tokenizer

from rvqa.config import RunConfig, save_config
from rvqa.data import check_index_facts, load_caption_corpus
from rvqa.distributed import log_placement
from rvqa.errors import ConfigError, UsageError
from rvqa.io import atomic_directory
from rvqa.reader.answers import AnswerVocab, build_vocab
from rvqa.reader.augmentation import TermWorlds
from rvqa.reader.auto import check_processor_answers, is_generative, make_collator
from rvqa.reader.data import (
    ReaderDataset,
    load_reader_data,
    record_image_key,
    visual_features_for,
)
from rvqa.reader.evaluation import evaluate_reader
from rvqa.reader.generative import SCRATCH, GenerativeReaderModel
from rvqa.reader.generative_processing import (
    SPM_FILE,
    GenerativeReaderProcessor,
    tokenizer_training_text,
    train_sentencepiece_tokenizer,
)
from rvqa.reader.modeling import ReaderModel
from rvqa.reader.processing import ReaderProcessor
from rvqa.reader.retrieval import RecordImages, own_caption_ids, retrieve_for_images
from rvqa.retriever.index import KnowledgeIndex
from rvqa.retriever.modeling import RetrieverModel
from rvqa.run_layout import (
    CONFIG_FILE,
    FEATURE_CACHE_DIR,
    READER_DIR,
    RETRIEVAL_CACHE_DIR,
    RETRIEVER_DIR,
    reranker_dir,
    retriever_dir,
    write_run_file,
)
from rvqa.training import make_accelerator, run_signature, train

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
"""``reader/tokenizer/``: the scratch generative reader's SentencePiece model of the run."""


def build_reader(
    cfg: RunConfig, vocab: AnswerVocab | None, retriever: Any = None, tokenizer: Any = None
) -> tuple[Any, Any]:
    """A fresh reader of ``reader.type`` and its processor: the classifier over
    ``vocab``, or the generative reader reading ``tokenizer`` (required for
    ``t5_backbone: scratch``; a checkpoint's own otherwise)."""
    s = cfg.reader
    tower = retriever.vision_model if s.vision_backbone == "retriever" else None
    image_processor = retriever.image_processor if tower is not None else None
    if s.type == "generative":
        model = GenerativeReaderModel.from_backbones(s, tokenizer=tokenizer, vision_tower=tower)
        processor = GenerativeReaderProcessor.from_config(
            model.config, tokenizer=tokenizer, image_processor=image_processor
        )
        fits = processor.max_captions()
        if s.top_k > fits:
            raise ConfigError(
                f"reader.top_k={s.top_k} captions do not fit reader.max_input_length="
                f"{s.max_input_length} text tokens (at most {fits} with max_question_length="
                f"{s.max_question_length}, max_caption_length={s.max_caption_length})"
            )
        return model, processor
    if vocab is None:
        raise UsageError("the classifier reader needs its answer vocabulary")
    model = ReaderModel.from_backbones(list(vocab), s, vision_tower=tower)
    processor = ReaderProcessor.from_config(model.config, image_processor=image_processor)
    return model, processor


def _scratch_tokenizer(
    cfg: RunConfig,
    out: Path,
    train_records: Any,
    retrieved: Any,
    accelerator: Any,
    resume: Any,
    worlds: Any = None,
) -> Any:
    """The scratch generative reader's SentencePiece tokenizer: trained by the main
    process on the run's training text into ``reader/tokenizer/`` (a resumed run
    reuses it), then loaded by every process."""
    folder = out / TOKENIZER_DIR
    failure: list[Any] = [None]
    if accelerator.is_main_process and not (resume and (folder / SPM_FILE).is_file()):
        try:
            texts = tokenizer_training_text(
                train_records,
                retrieved,
                record_image_key,
                worlds=worlds,
                top_k=cfg.reader.top_k,
                seed=cfg.reader.seed,
                # the worlds of the first epochs: enough to cover the terms' pieces
                # without multiplying the text by a long run's epoch count
                epochs=min(cfg.reader.num_epochs, 4),
            )
            with atomic_directory(folder, overwrite=True) as tmp:
                tok = train_sentencepiece_tokenizer(
                    texts, tmp, cfg.reader.spm_vocab_size, seed=cfg.reader.seed
                )
            logger.info("SentencePiece tokenizer: %d pieces from %d texts", len(tok), len(texts))
        except Exception as err:  # every process raises it, none waits for the others
            failure = [err]
    if accelerator.num_processes > 1:
        broadcast_object_list(failure, from_process=0)
    if failure[0] is not None:
        raise failure[0]
    accelerator.wait_for_everyone()
    return T5Tokenizer.from_pretrained(folder, extra_ids=0)


def train_reader(
    cfg: RunConfig,
    *,
    resume: bool | str = False,
    retriever: Any = None,
    index: Any = None,
    model: Any = None,
    processor: Any = None,
    end_training: bool = True,
    feature_cache_max_bytes: int | None = None,
    cache_dir: str | os.PathLike | None = None,
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
        feature_cache_max_bytes: Disk budget of the frozen image tower's feature
            cache (see :func:`rvqa.reader.data.visual_features_for`); None = the free
            space of its disk; 0 runs the tower on every step.
        cache_dir: Where the retrieval and image-feature caches go (default: the reader
            folder). Both are keyed by what they depend on (retriever, index, ``top_k``;
            image tower, image processor, images, precision). The retrieval cache keeps
            an entry per key; the feature cache keeps one file (a run with another key
            replaces it). So runs one after another with the same retriever, tower and
            images (the knowledge experiment's two readers) compute each only once; do
            not share the folder between runs at the same time.

    Returns:
        ``{"result": TrainResult, "model_dir": Path, "val": metrics | None,
        "best_val_accuracy": float | None}``.
    """
    s = cfg.reader
    run_dir = Path(cfg.output_dir)
    out = run_dir / READER_DIR
    caches = Path(cache_dir) if cache_dir is not None else out
    accelerator = make_accelerator(s, out)
    if accelerator.is_main_process:
        save_config(cfg, out / CONFIG_FILE)
    set_seed(s.seed)

    train_records, val_records = load_reader_data(cfg)
    generative = s.type == "generative"
    worlds = TermWorlds.load(s.term_worlds) if s.term_worlds else None
    if worlds is not None:
        n = min(len(train_records), 5000)
        worlds.check_applies(
            (r.answers or [] for r in train_records[:n]),
            f"the answers of the first {n} training questions",
        )
        logger.info("reader training rewrites its facts into %r", worlds)
    vocab = None
    if generative:
        logger.info(
            "reader data: %d train / %d val questions; generative reader (%s)",
            len(train_records),
            len(val_records),
            s.t5_backbone,
        )
    else:
        train_answers: Any = (r.answers for r in train_records)
        if worlds is not None:
            train_answers = worlds.answer_lists(train_answers)  # every world's answers
        vocab = build_vocab(train_answers, size=s.answer_vocab_size, min_count=s.min_answer_count)
        cover = vocab.coverage(r.answers for r in train_records)
        logger.info(
            "reader data: %d train / %d val questions; %d answers cover %.1f%% of training "
            "questions",
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
        retriever = retriever.to(accelerator.device)
    if s.top_k > 0:
        index_path = index.path if index is not None else Path(cfg.index.folder())
        if index is None:
            dev = accelerator.device  # several processes: each searches on its own GPU
            own_gpu = dev.type == "cuda" and accelerator.num_processes > 1
            index = KnowledgeIndex.load(
                index_path,
                retriever=retriever,
                nprobe=cfg.index.nprobe,
                ef_search=cfg.index.ef_search,
                use_gpu=cfg.index.use_gpu,
                gpus=[dev.index or 0] if own_gpu else None,
            )
        if cfg.data.require_facts:
            check_index_facts(index, f"index {index.name!r} ({index_path})")
        log_placement(
            "train-reader", accelerator, retriever=retriever, **{f"index.{index.name}": index}
        )
        exclude = None
        if s.exclude_own_captions:
            # The captions the index is built from (build-index's default split): ids
            # only, from the corpus's columns, no image opened.
            exclude = own_caption_ids(load_caption_corpus(cfg.index.captions, "train"))
        retrieved = retrieve_for_images(
            retriever,
            index,
            RecordImages(train_records, val_records),  # positions only; images fetched in workers
            s.top_k,
            exclude_ids=exclude,
            cache_dir=caches / RETRIEVAL_CACHE_DIR,
            batch_size=s.batch_size,
            num_workers=s.num_workers,
            accelerator=accelerator,
            show_progress=accelerator.is_local_main_process,
        )
        # Training reads captions from the index's memory-mapped caption store only:
        # free the faiss index and the exclusion sets before the reader is built.
        index = exclude = None
        gc.collect()

    extra_signature: dict[str, Any] = {}
    own_spm = False  # this run trained (or resumed) the scratch tokenizer in reader/tokenizer/
    if model is None:
        tokenizer = None
        if generative and s.t5_backbone == SCRATCH:
            own_spm = True
            tokenizer = _scratch_tokenizer(
                cfg, out, train_records, retrieved, accelerator, resume, worlds
            )
            extra_signature["tokenizer"] = _tokenizer_digest(tokenizer)
        model, processor = build_reader(cfg, vocab, retriever, tokenizer)
    elif processor is None:
        raise UsageError("a pre-built reader needs its processor")
    if is_generative(model) != generative:
        raise UsageError(
            f"reader.type is {s.type!r} but the pre-built reader is a {type(model).__name__}"
        )
    if vocab is not None and list(model.config.answers) != list(vocab):
        raise UsageError(
            f"the reader's answer vocabulary ({len(model.config.answers)} answers) differs from "
            f"the one built from the training data ({len(vocab)}); build the model from this vocabulary"
        )
    check_processor_answers(model, processor, "the reader to train")
    rule = getattr(model.config, "soft_target_rule", "min3")
    # A frozen image tower: its features once per image, on disk (memory-mapped), read
    # by training and evaluation; otherwise images stream through the loader's workers.
    features = visual_features_for(
        model,
        processor.image_processor,
        [train_records, val_records],
        caches / FEATURE_CACHE_DIR,
        accelerator=accelerator,
        num_workers=s.num_workers,
        max_bytes=feature_cache_max_bytes,
    )
    train_features, val_features = features or (None, None)
    image_processor = processor.image_processor
    train_set = ReaderDataset(
        train_records,
        image_processor,
        retrieved,
        vocab,
        s.top_k,
        s.k_dropout,
        rule,
        s.seed,
        train_features,
        worlds,
    )
    val_set = ReaderDataset(
        val_records, image_processor, retrieved, vocab, s.top_k, 0.0, rule, s.seed, val_features
    )

    def evaluate(m: Any, acc: Any) -> dict[str, float]:
        return evaluate_reader(
            acc.unwrap_model(m),
            processor,
            val_set,
            acc,
            batch_size=s.batch_size * 2,
            num_workers=s.num_workers,
        )

    def save(m: Any, path: Path) -> None:
        m.save_pretrained(path)
        # The classifier's vocabulary is config.answers (one copy); a scratch generative
        # reader's SentencePiece model is saved with its tokenizer.
        processor.save_pretrained(path)
        spm_file = out / TOKENIZER_DIR / SPM_FILE
        if own_spm and spm_file.is_file():
            shutil.copyfile(spm_file, path / SPM_FILE)

    result = train(
        model,
        train_set,
        make_collator(processor),
        s,
        out,
        evaluate=evaluate if val_records else None,
        metric="accuracy" if val_records else None,
        resume=resume,
        signature=run_signature(
            model.config,
            s,
            data=dataclasses.asdict(cfg.data),
            index=cfg.index.folder(),
            **extra_signature,
        ),
        save_fn=save,
        accelerator=accelerator,
        desc="training reader",
        end_training=False,
    )
    log_placement("train-reader", accelerator, reader=model)
    model_dir = result.best_model_dir or result.final_model_dir
    if accelerator.is_main_process:
        indices = {cfg.index.name: str(index_path)} if index_path is not None else {}
        ret_dir = retriever_dir(run_dir) if (run_dir / RETRIEVER_DIR).is_dir() else None
        if ret_dir is not None:
            write_run_file(
                run_dir, ret_dir, model_dir, indices, s.top_k, _run_reranker(run_dir, ret_dir)
            )
    accelerator.wait_for_everyone()
    if end_training:
        accelerator.end_training()
    return {
        "result": result,
        "model_dir": model_dir,
        "val": result.history[-1] if result.history else None,
        "best_val_accuracy": result.best_metric,
    }


def _tokenizer_digest(tokenizer: Any) -> str:
    """The identity of a tokenizer's pieces and scores (not of its files' paths)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _run_reranker(run_dir: Path, ret_dir: Path) -> Path | None:
    """The run's trained re-ranker, when it was trained for the run's retriever (one
    trained for an earlier retriever is not recorded: loading would refuse it)."""
    path = reranker_dir(run_dir)
    if path is None:
        return None
    try:
        recorded = json.loads((path / "config.json").read_text(encoding="utf-8"))
        fingerprint = recorded.get("retriever_fingerprint")
    except (OSError, ValueError):
        return None
    if fingerprint != RetrieverModel.from_pretrained(ret_dir).fingerprint():
        logger.warning(
            "not recording the re-ranker %s in %s: it was trained for another retriever "
            "(retrain it with rvqa train-reranker)",
            path,
            run_dir / "rvqa_run.json",
        )
        return None
    return path
