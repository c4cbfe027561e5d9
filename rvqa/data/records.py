"""Plain typed records that every data adapter produces.

Adapters turn the many on-disk formats (official VQAv2 / OK-VQA JSON, easy-vqa,
COCO and Karpathy caption files, JSONL, text, ``datasets`` datasets) into these
two frozen dataclasses, so that training, indexing and evaluation code never
sees a source-specific format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image as PILImage

from rvqa.metrics import NUM_HUMAN_ANSWERS

__all__ = ["VQARecord", "CaptionRecord", "ImageRef", "NUM_HUMAN_ANSWERS"]
# NUM_HUMAN_ANSWERS (from rvqa.metrics, the official format's count): single-answer
# sources repeat their answer this often.

ImageRef = Union[str, "PILImage"]
"""An image reference: normally a file path; a decoded PIL image for ``datasets`` sources."""


@dataclass(frozen=True)
class VQARecord:
    """One question about one image.

    Attributes:
        question_id: Unique id of the question within its split.
        question: The question text, as given by the source.
        image: A file path (str) or, for ``datasets`` sources with an ``Image``
            column, the decoded PIL image. Pass it to
            :func:`rvqa.data.images.load_image` to get RGB pixels.
        image_id: Id of the image (COCO id, easy-vqa id, ...); questions about the
            same picture share it.
        answers: The human answers in their original order (:data:`NUM_HUMAN_ANSWERS` for
            VQAv2 and OK-VQA), or ``None`` when the split has no annotations (e.g. test-dev).
        question_type: The source's question type (VQAv2: the leading words,
            e.g. ``"what color is the"``), or ``None`` when unknown.
        answer_type: ``"yes/no"``, ``"number"`` or ``"other"`` (VQAv2 names), or
            ``None`` when unknown.
        multiple_choice_answer: The most frequent answer, when the source gives it.
    """

    question_id: int
    question: str
    image: str | PILImage
    image_id: int | str
    answers: tuple[str, ...] | None = None
    question_type: str | None = None
    answer_type: str | None = None
    multiple_choice_answer: str | None = None


@dataclass(frozen=True)
class CaptionRecord:
    """One caption, optionally tied to the image it describes.

    Attributes:
        caption: The caption text (stripped, never empty).
        caption_id: Unique id of the caption within its corpus.
        image_id: Id of the described image, or ``None`` for text-only corpora.
        image: Path of the described image (``None`` when no image folder is
            known). ``datasets`` sources with an ``Image`` column give the
            decoded PIL image instead.
        label: The semantic category of the described image, when the source
            has one (a Karpathy file's per-image ``label``, a JSONL / ``datasets``
            ``label`` column, easy-vqa's colour and shape); read by the retrieval
            objectives that pull a category together (``center``, ``support_set``).
    """

    caption: str
    caption_id: int | str
    image_id: int | str | None = None
    image: str | PILImage | None = None
    label: str | None = None
