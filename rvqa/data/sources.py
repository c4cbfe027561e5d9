"""Which adapter a run config's data source names: :func:`load_vqa`, :func:`load_captions`, split names per source.

The run settings (:class:`rvqa.config.VQADataConfig`,
:class:`rvqa.config.CaptionDataConfig`) name a source and its files; these
functions dispatch to the adapter modules (:mod:`rvqa.data.official`,
:mod:`rvqa.data.easy_vqa`, :mod:`rvqa.data.hf_datasets`,
:mod:`rvqa.data.caption_files`) and check the names a config gives (source,
split, path) before any file is read.

Example:
    >>> ds = load_vqa(VQADataConfig(source="easy_vqa"), "train")
    >>> len(ds), ds[0].question, ds[0].answers[0]
    (38575, 'what is the blue shape?', 'rectangle')
    >>> corpus = load_captions(CaptionDataConfig(source="easy_vqa"), split="train")
    >>> len(corpus), corpus[0].caption
    (4000, 'a blue rectangle')
"""

from __future__ import annotations

from collections.abc import Sequence

from rvqa.config import CaptionDataConfig, VQADataConfig
from rvqa.data.caption_files import (
    KARPATHY_SPLITS,
    read_coco_captions,
    read_jsonl_captions,
    read_karpathy_captions,
    read_text_captions,
)
from rvqa.data.captions import CaptionCorpus
from rvqa.data.easy_vqa import (
    EASY_VQA_SPLITS,
    check_easy_vqa_split,
    easy_vqa_captions,
    read_easy_vqa,
)
from rvqa.data.hf_datasets import read_captions_datasets, read_vqa_datasets
from rvqa.data.official import read_vqa_files
from rvqa.data.vqa import VQADataset
from rvqa.errors import ConfigError, UsageError

__all__ = [
    "SOURCE_SPLITS",
    "has_split",
    "load_caption_corpus",
    "load_caption_split",
    "load_captions",
    "load_vqa",
]


def load_vqa(cfg: VQADataConfig, split: str) -> VQADataset:
    """The VQA split ``split`` of the source a run config names.

    Dispatches on ``cfg.source``: ``"easy_vqa"`` (splits ``train`` / ``test``),
    ``"vqa"`` (the split names are the keys of ``cfg.splits``), ``"datasets"``
    (the dataset's own split names). With ``cfg.skip_bad_images``, every image is
    decoded once and the questions of unreadable ones are dropped (logged; see
    :meth:`VQADataset.without_unreadable_images`). Nothing else is applied: subsample
    with :meth:`VQADataset.subset` (``cfg.train_fraction``, ``cfg.max_eval_questions``).

    Raises:
        ConfigError: (a ``ValueError``) Unknown source, or the files it needs not set.
        UsageError: (a ``ValueError``) Unknown split (listing the known names).
        DataFormatError: (a ``ValueError``) Any error the adapter finds in the data.
    """
    dataset = _read_vqa(cfg, split)
    return dataset.without_unreadable_images() if cfg.skip_bad_images else dataset


def _read_vqa(cfg: VQADataConfig, split: str) -> VQADataset:
    if cfg.source == "easy_vqa":
        return read_easy_vqa(split)
    if cfg.source == "vqa":
        if split not in cfg.splits:
            raise UsageError(
                f"unknown VQA split {split!r}; known splits (data.splits): "
                f"{', '.join(cfg.splits) or 'none configured'}"
            )
        files = cfg.splits[split]
        if not files.questions or not files.images:
            raise ConfigError(
                f"data.splits.{split}: both 'questions' and 'images' must be set "
                f"(got questions={files.questions!r}, images={files.images!r})"
            )
        return read_vqa_files(files.questions, files.annotations, files.images, split_name=split)
    if cfg.source == "datasets":
        if not cfg.path:
            raise ConfigError("data.source is 'datasets' but data.path is not set")
        return read_vqa_datasets(cfg.path, split, cfg.columns)
    raise ConfigError(f"unknown VQA source {cfg.source!r}; known: easy_vqa, vqa, datasets")


_SOURCES = ("easy_vqa", "coco", "karpathy", "jsonl", "text", "datasets")


def load_captions(
    cfg: CaptionDataConfig, split: str | Sequence[str] | None = None
) -> CaptionCorpus:
    """The captions a run config names, dispatching on ``cfg.source``.

    Args:
        cfg: Caption source settings (``source``, ``path``, ``images``, ``splits``,
            ``columns``).
        split: easy_vqa: ``"train"`` (default) or ``"test"``. karpathy: one split
            name or a list; overrides ``cfg.splits`` when given. datasets: the
            dataset split (default: the only one, or ``"train"``). Other sources
            have no splits and take ``None``.

    Raises:
        ConfigError: (a ``ValueError``) Unknown source, or a missing ``cfg.path``.
        UsageError: (a ``ValueError``) Unknown split (listing the known ones), or a
            split for a source that has none.
        DataFormatError: (a ``ValueError``) Any error the adapter finds in the data.
    """
    source = cfg.source
    if source not in _SOURCES:
        raise ConfigError(f"unknown caption source {source!r}; known: {', '.join(_SOURCES)}")
    if source == "easy_vqa":
        name = "train" if split is None else split
        check_easy_vqa_split(name, what="easy-vqa caption")
        return CaptionCorpus.from_records(
            easy_vqa_captions(name), source="easy_vqa", location=f"easy-vqa {name}"
        )
    if not cfg.path:
        raise ConfigError(f"captions source is {source!r} but its 'path' is not set")
    if source == "karpathy":
        return read_karpathy_captions(
            cfg.path, cfg.splits if split is None else split, images=cfg.images
        )
    if source == "datasets":
        if split is not None and not isinstance(split, str):
            raise UsageError(f"a datasets caption split must be one name, got {split!r}")
        return read_captions_datasets(cfg.path, split, cfg.columns, image_root=cfg.images)
    if split is not None:
        raise UsageError(
            f"caption source {source!r} has no splits (got split={split!r}); "
            f"splits exist for easy_vqa ({', '.join(EASY_VQA_SPLITS)}), karpathy "
            f"({', '.join(KARPATHY_SPLITS)}) and datasets"
        )
    if source == "coco":
        return read_coco_captions(cfg.path, images=cfg.images)
    if source == "jsonl":
        return read_jsonl_captions(cfg.path, cfg.columns, images=cfg.images)
    return read_text_captions(cfg.path)


# Caption sources that have named splits, and which.
SOURCE_SPLITS = {"easy_vqa": tuple(EASY_VQA_SPLITS), "karpathy": KARPATHY_SPLITS}


def load_caption_split(cfg: CaptionDataConfig, split: str) -> CaptionCorpus:
    """Caption records of ``split``, as a lazy :class:`CaptionCorpus` (records built on
    access, so a training set of 400k captions holds compact columns, not objects).

    ``"train"`` of a karpathy source is every split in ``cfg.splits`` (e.g. train +
    restval); sources without splits give all their captions for any ``split``.
    These are the captions whose images are used (retriever training and
    evaluation): with ``cfg.skip_bad_images``, every image is decoded once and the
    captions of unreadable ones are dropped (logged; see
    :meth:`CaptionCorpus.without_unreadable_images`).
    """
    corpus = load_caption_corpus(cfg, split)
    return corpus.without_unreadable_images() if cfg.skip_bad_images else corpus


def load_caption_corpus(cfg: CaptionDataConfig, split: str) -> CaptionCorpus:
    """The captions of ``split`` as a lazy :class:`CaptionCorpus`, no image opened.

    The split rule of :func:`load_caption_split` without its image check
    (``cfg.skip_bad_images`` is not applied): for what needs only the texts and
    ids (e.g. the ids of an image's own captions), read from the corpus's columns
    (``ids``, ``image_ids``) without building records.
    """
    if cfg.source == "karpathy":
        return load_captions(cfg, split=list(cfg.splits) if split == "train" else [split])
    return load_captions(cfg, split=split if cfg.source in SOURCE_SPLITS else None)


def has_split(cfg: CaptionDataConfig, split: str | None) -> bool:
    """Whether the caption source has a split of that name."""
    return split is not None and split in SOURCE_SPLITS.get(cfg.source, ())
