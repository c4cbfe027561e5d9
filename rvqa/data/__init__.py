"""Data adapters: VQA questions, captions and images as plain typed records.

This layer depends on neither model package and does not import torch:
``import rvqa.data`` loads only the standard library, numpy and PIL
(``datasets`` and ``easy_vqa`` are imported when an adapter needs them).

* :func:`load_image` — paths, PIL images, arrays → RGB PIL images.
* :func:`load_vqa` — a run config's VQA split → :class:`VQADataset` of :class:`VQARecord`.
* :func:`load_captions` — a run config's captions → :class:`CaptionCorpus` of :class:`CaptionRecord`.
* :func:`make_knowledge_task` — the offline knowledge task folder (easy-vqa emblems + facts).

Malformed data is a :class:`rvqa.errors.DataFormatError` (a ``ValueError``)
naming the file or dataset and the record.
"""

from rvqa.data.caption_files import (
    KARPATHY_SPLITS,
    read_coco_captions,
    read_jsonl_captions,
    read_karpathy_captions,
    read_text_captions,
)
from rvqa.data.captions import CaptionCorpus
from rvqa.data.easy_vqa import (
    EASY_VQA_SHAPES,
    EASY_VQA_SPLITS,
    EasyVQAImage,
    easy_vqa_captions,
    easy_vqa_colors,
    easy_vqa_images,
    easy_vqa_question_type,
    read_easy_vqa,
)
from rvqa.data.hf_datasets import read_captions_datasets, read_vqa_datasets
from rvqa.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, image_key, load_image
from rvqa.data.knowledge import (
    EMBLEMS,
    KNOWLEDGE_QUESTIONS,
    Assignment,
    Emblem,
    Entity,
    Fact,
    check_facts,
    check_index_facts,
    knowledge_assignment,
    make_knowledge_task,
    num_assignments,
    parse_fact,
)
from rvqa.data.official import coco_image_name, read_vqa_files
from rvqa.data.records import CaptionRecord, VQARecord
from rvqa.data.sources import (
    SOURCE_SPLITS,
    has_split,
    load_caption_corpus,
    load_caption_split,
    load_captions,
    load_vqa,
)
from rvqa.data.splits import holdout_by_image
from rvqa.data.vqa import VQADataset

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "EASY_VQA_SHAPES",
    "EASY_VQA_SPLITS",
    "EMBLEMS",
    "KNOWLEDGE_QUESTIONS",
    "KARPATHY_SPLITS",
    "SOURCE_SPLITS",
    "Assignment",
    "CaptionCorpus",
    "CaptionRecord",
    "EasyVQAImage",
    "Emblem",
    "Entity",
    "Fact",
    "ImageLoadError",
    "VQADataset",
    "VQARecord",
    "check_facts",
    "check_index_facts",
    "coco_image_name",
    "easy_vqa_captions",
    "easy_vqa_colors",
    "easy_vqa_images",
    "easy_vqa_question_type",
    "has_split",
    "holdout_by_image",
    "image_key",
    "knowledge_assignment",
    "load_caption_corpus",
    "load_caption_split",
    "load_captions",
    "load_image",
    "load_vqa",
    "make_knowledge_task",
    "num_assignments",
    "parse_fact",
    "read_captions_datasets",
    "read_coco_captions",
    "read_easy_vqa",
    "read_jsonl_captions",
    "read_karpathy_captions",
    "read_text_captions",
    "read_vqa_datasets",
    "read_vqa_files",
]
