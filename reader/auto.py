"""The one place that maps a reader type to its classes.

``reader.type`` (``classifier`` / ``generative``) and a saved reader's
``model_type`` (in its ``config.json``) choose the model, the processor and the
collator: :func:`load_reader` loads either kind of reader folder,
:func:`make_collator` batches for either, :func:`is_generative` tells them apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rvqa.errors import DataFormatError, RunFolderError
from rvqa.reader.configuration import GenerativeReaderConfig, ReaderConfig
from rvqa.reader.data import ReaderCollator
from rvqa.reader.generative import GenerativeReaderModel
from rvqa.reader.generative_processing import GenerativeReaderCollator, GenerativeReaderProcessor
from rvqa.reader.modeling import ReaderModel
from rvqa.reader.processing import ReaderProcessor

READER_TYPES: dict[str, tuple[str, type, type]] = {
    "classifier": (ReaderConfig.model_type, ReaderModel, ReaderProcessor),
    "generative": (
        GenerativeReaderConfig.model_type,
        GenerativeReaderModel,
        GenerativeReaderProcessor,
    ),
}
"""``reader.type`` → (saved ``model_type``, model class, processor class)."""


def is_generative(model: Any) -> bool:
    """Whether ``model`` (or an Accelerate-wrapped one's module) is the generative reader."""
    return isinstance(getattr(model, "module", model), GenerativeReaderModel)


def reader_type_of(path: str | os.PathLike) -> str:
    """The ``reader.type`` of a saved reader folder, from its ``config.json``'s ``model_type``.

    Raises:
        RunFolderError: No ``config.json``.
        DataFormatError: A malformed file or a ``model_type`` that is no reader's.
    """
    file = Path(path) / "config.json"
    if not file.is_file():
        raise RunFolderError(f"reader folder {Path(path)} is missing config.json")
    try:
        model_type = json.loads(file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise DataFormatError(f"{file} is malformed: {err}") from None
    for kind, (saved, _, _) in READER_TYPES.items():
        if model_type == saved:
            return kind
    known = ", ".join(repr(t[0]) for t in READER_TYPES.values())
    raise DataFormatError(f"{file}: model_type {model_type!r} is not a reader ({known})")


def load_reader(path: str | os.PathLike) -> tuple[Any, Any]:
    """(model, processor) of a saved reader folder of either type.

    Raises:
        DataFormatError: A classifier whose copy pointer and processor disagree on the
            answer vocabulary (the processor's answer ids would name other answers).
    """
    _, model_cls, processor_cls = READER_TYPES[reader_type_of(path)]
    model, processor = model_cls.from_pretrained(path), processor_cls.from_pretrained(path)
    check_processor_answers(model, processor, str(path))
    return model, processor


def check_processor_answers(model: Any, processor: Any, where: str) -> None:
    """A classifier that copies answers from its captions needs its processor to mark them
    with the model's own answer vocabulary (same answers, same order).

    Raises:
        DataFormatError: Naming ``where`` and what differs.
    """
    if not getattr(model.config, "copy_from_context", False) or not isinstance(model, ReaderModel):
        return
    answers = getattr(processor, "answers", None)
    if answers is None:
        raise DataFormatError(
            f"{where}: the reader copies answers from its captions (copy_from_context) but "
            "its processor has no answer vocabulary (reader_processor.json has no 'answers')"
        )
    if list(answers) != list(model.config.answers):
        raise DataFormatError(
            f"{where}: the processor's answer vocabulary ({len(answers)} answers) differs from "
            f"the model's ({len(model.config.answers)}); answer ids would name other answers"
        )


def make_collator(processor: Any, with_labels: bool = True) -> Any:
    """The collator of a reader's processor (labels: soft targets or answer tokens)."""
    if isinstance(processor, GenerativeReaderProcessor):
        return GenerativeReaderCollator(processor, with_labels)
    return ReaderCollator(processor, with_labels)
