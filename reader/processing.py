"""Turn (image, question, retrieved captions, scores) into reader inputs.

The text layout is ``[CLS] question [SEP] caption_1 [SEP] ... caption_k [SEP]``
with token type 0 for the question segment and 1 for the captions. Budgets are
per part — the question keeps up to ``max_question_length`` tokens and every
caption up to ``max_caption_length`` — so long captions can never push the
question out of the sequence. Each distinct string is tokenised once (a cache):
VQA datasets repeat questions and retrieved captions a lot, so a batch costs
little more than list concatenation.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoTokenizer, BatchEncoding

from rvqa.config import ReaderSettings
from rvqa.errors import ConfigError, UsageError
from rvqa.io import write_json_atomic
from rvqa.metrics import normalize_answer
from rvqa.towers import load_image_processor, load_tokenizer, small_cnn_processor

logger = logging.getLogger(__name__)

PROCESSOR_FILE = "reader_processor.json"

_WORD = re.compile(r"[^\W_]+")  # a word: letters and digits (answers match whole words)


class ReaderProcessor:
    """Tokenizer + image processor + token budgets of the reader.

    Args:
        tokenizer: A ``transformers`` tokenizer of the reader's text backbone.
        image_processor: A ``transformers`` image processor (``None``: text only;
            pass ``pixel_values`` yourself).
        max_question_length: Question tokens kept, excluding ``[CLS]``/``[SEP]``
            (default: ``ReaderSettings``', like ``ReaderConfig``'s).
        max_caption_length: Tokens kept per caption, excluding its ``[SEP]``.
        cache_size: Distinct strings whose token ids are kept; the cache is emptied
            when it grows past this.
        answers: The reader's answer vocabulary when it copies answers from its captions
            (``ReaderConfig.copy_from_context``): each batch then also marks where an
            answer of the vocabulary occurs in a caption (``context_answers``,
            ``context_positions``). Needs a fast tokenizer (offsets).
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any = None,
        max_question_length: int = ReaderSettings.max_question_length,
        max_caption_length: int = ReaderSettings.max_caption_length,
        cache_size: int = 200_000,
        answers: Sequence[str] | None = None,
    ):
        for name, value in (
            ("max_question_length", max_question_length),
            ("max_caption_length", max_caption_length),
            ("cache_size", cache_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_question_length = max_question_length
        self.max_caption_length = max_caption_length
        self.cache_size = cache_size
        self._ids: dict[str, tuple[int, ...]] = {}
        self._warned: set[str] = set()  # long questions already reported
        self._special_ids(tokenizer)
        self.answers = None if answers is None else list(answers)
        self._answer_ids: dict[tuple[str, ...], int] = {}
        self._in_caption: dict[str, tuple[tuple[int, int], ...]] = {}
        if self.answers is not None:
            self._start_answer_matching(tokenizer)

    KIND = "classifier"
    """The reader type this processor's layout is for (saved in ``reader_processor.json``)."""

    def _special_ids(self, tokenizer: Any) -> None:
        """The special tokens of the layout (``[CLS]``, ``[SEP]``, padding)."""
        # Like BERT; RoBERTa-style tokenizers have only <s> / </s>.
        self.cls_id = _first_id(tokenizer, ("cls_token_id", "bos_token_id"), "[CLS]/<s>")
        self.sep_id = _first_id(tokenizer, ("sep_token_id", "eos_token_id"), "[SEP]/</s>")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0

    def _budgets(self) -> dict[str, Any]:
        """The token budgets saved beside the tokenizer (``__init__`` keyword arguments)."""
        out: dict[str, Any] = {
            "max_question_length": self.max_question_length,
            "max_caption_length": self.max_caption_length,
        }
        if self.answers is not None:
            out["answers"] = self.answers
        return out

    def _start_answer_matching(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                "copy_from_context needs a fast tokenizer (character offsets) to find the "
                f"answers in the captions; {type(tokenizer).__name__} is not one (or set "
                "reader.copy_from_context=false)"
            )
        for i, a in enumerate(self.answers or []):
            if not isinstance(a, str):
                raise TypeError(f"answers[{i}] must be a string, got {type(a).__name__}")
            # the official normalisation (digits for number words, no articles, ...): a
            # caption's words go through it too, so "two" in a caption is the answer "2"
            words = tuple(normalize_answer(a).split())
            if words:
                self._answer_ids.setdefault(words, []).append(i)
        self._max_answer_words = max((len(w) for w in self._answer_ids), default=0)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_config(
        cls, config: Any, tokenizer: Any = None, image_processor: Any = None
    ) -> ReaderProcessor:
        """The processor matching a :class:`~rvqa.reader.configuration.ReaderConfig`.

        Args:
            config: The reader's config (backbone names, image size, budgets).
            tokenizer: Use this tokenizer instead of loading ``config.text_backbone``'s.
            image_processor: Use this image processor; needed when the vision tower is
                not the small CNN and ``config.vision_backbone`` is not loadable by name
                (e.g. ``"retriever"``: pass the retriever's image processor).
        """
        if tokenizer is None:
            tokenizer = load_tokenizer(config.text_backbone)
        return cls(
            tokenizer,
            image_processor_for(config, image_processor),
            max_question_length=config.max_question_length,
            max_caption_length=config.max_caption_length,
            answers=config.answers if getattr(config, "copy_from_context", False) else None,
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the tokenizer, the image processor and the budgets into a folder."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(path)
        budgets = {
            "kind": self.KIND,
            **self._budgets(),
            "has_image_processor": self.image_processor is not None,
        }
        write_json_atomic(path / PROCESSOR_FILE, budgets, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ReaderProcessor:
        """Load a processor written by :meth:`save_pretrained`.

        Raises:
            FileNotFoundError: The folder or its ``reader_processor.json`` is missing.
        """
        path = Path(directory)
        if not (path / PROCESSOR_FILE).is_file():
            raise FileNotFoundError(
                f"{path} holds no reader processor ({PROCESSOR_FILE} missing); "
                "write one with ReaderProcessor.save_pretrained"
            )
        budgets = json.loads((path / PROCESSOR_FILE).read_text(encoding="utf-8"))
        kind = budgets.pop("kind", ReaderProcessor.KIND)  # folders written before the field
        if kind != cls.KIND:
            raise ConfigError(
                f"{path / PROCESSOR_FILE} is the processor of a {kind!r} reader; load it with "
                f"rvqa.reader.auto.load_reader (not {cls.__name__})"
            )
        image_processor = None
        if budgets.pop("has_image_processor", True):
            image_processor = AutoImageProcessor.from_pretrained(path)
        return cls(AutoTokenizer.from_pretrained(path), image_processor, **budgets)

    # ------------------------------------------------------------------ tokens

    def token_ids(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        """Token ids (no special tokens, not truncated) of each text, through the cache."""
        self._encode([t for t in texts if t not in self._ids], texts)
        return [self._ids[t] for t in texts]

    def answers_in(self, captions: Sequence[str]) -> list[tuple[tuple[int, int, int], ...]]:
        """Where the vocabulary's answers occur in each caption: ``(answer id, first token,
        last token)`` triples, token indices into the caption's token ids (through the cache
        of :meth:`token_ids`, filled by the same tokenizer call). An answer matches whole
        words after the official answer normalisation of both sides (``"salt"`` in
        ``"trades in Salt."``, not in ``"salty"``; ``"2"`` in ``"two dogs"``); multi-word
        answers match word sequences."""
        if self.answers is None:
            raise UsageError("this processor has no answer vocabulary (answers=None)")
        self._encode([t for t in captions if t not in self._in_caption], captions)
        return [self._in_caption[t] for t in captions]

    def _encode(self, new: Sequence[str], texts: Sequence[str]) -> None:
        """Tokenise the ``new`` strings of ``texts`` once into the caches: token ids, and
        with an answer vocabulary where its answers occur (from the same call's offsets)."""
        new = list(dict.fromkeys(new))
        if not new:
            return
        if len(self._ids) + len(new) > self.cache_size:
            self._ids.clear()  # simple bound on memory; a cleared string is re-tokenised
            self._in_caption.clear()
            self._warned.clear()
            new = list(dict.fromkeys(texts))
        copy = self.answers is not None
        encoded = self.tokenizer(
            new,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            return_offsets_mapping=copy,
        )
        self._ids.update(zip(new, map(tuple, encoded["input_ids"])))
        if copy:
            for text, offsets in zip(new, encoded["offset_mapping"]):
                self._in_caption[text] = self._match_answers(text, offsets)

    def _match_answers(self, text: str, offsets: Sequence[Any]) -> tuple[tuple[int, int, int], ...]:
        words = list(_WORD.finditer(text))
        normal = [normalize_answer(w.group(0)) for w in words]
        ends = [end for _, end in offsets]

        def token_at(char: int) -> int | None:  # the token holding this character
            t = bisect.bisect_right(ends, char)
            return t if t < len(offsets) and offsets[t][0] <= char else None

        found = []
        for i, w in enumerate(words):
            for n in range(1, min(self._max_answer_words, len(words) - i) + 1):
                ids = self._answer_ids.get(tuple(normal[i : i + n]))
                if ids is None:
                    continue
                first, last = token_at(w.start()), token_at(words[i + n - 1].end() - 1)
                if first is not None and last is not None:
                    found += [(a, first, last) for a in ids]
        return tuple(found)

    def _question_ids(self, questions: Any) -> list[tuple[int, ...]]:
        if isinstance(questions, (str, bytes)) or not hasattr(questions, "__iter__"):
            raise TypeError(f"questions must be a list of strings, got {type(questions).__name__}")
        questions = list(questions)
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise TypeError(f"question {i} must be a string, got {type(q).__name__}: {q!r}")
        ids = self.token_ids(questions)
        limit = self.max_question_length
        for q, q_ids in zip(questions, ids):
            if not q_ids:
                raise UsageError(
                    f"question {q!r} has no tokens after tokenisation; expected a non-empty question"
                )
            if len(q_ids) > limit and q not in self._warned:
                self._warned.add(q)
                logger.warning(
                    "question of %d tokens truncated to max_question_length=%d: %r",
                    len(q_ids),
                    limit,
                    q if len(q) <= 120 else q[:120] + "...",
                )
        return [q_ids[:limit] for q_ids in ids]

    def _caption_ids(
        self, captions: Sequence[Sequence[str]] | None, scores: Any, batch: int
    ) -> tuple[list[list[tuple[int, ...]]], list[list[float]] | None]:
        if captions is None:
            if scores is not None:
                raise UsageError("scores were given without captions")
            return [[] for _ in range(batch)], None
        if isinstance(captions, str) or len(captions) != batch:
            raise UsageError(
                f"captions must be a list with one list of strings per question ({batch})"
            )
        if scores is not None and (isinstance(scores, str) or len(scores) != batch):
            raise UsageError(
                f"scores must be a list with one list of floats per question ({batch})"
            )
        flat: list[str] = []
        for i, caps in enumerate(captions):
            if isinstance(caps, str):
                raise TypeError(f"captions[{i}] must be a list of strings, got a string")
            for c in caps:
                if not isinstance(c, str):
                    raise TypeError(f"captions[{i}] holds a {type(c).__name__}, expected strings")
            if scores is not None:
                if len(scores[i]) != len(caps):
                    raise UsageError(
                        f"example {i}: {len(caps)} captions but {len(scores[i])} scores"
                    )
                if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores[i]):
                    raise UsageError(f"scores[{i}] must be finite numbers, got {list(scores[i])}")
            flat.extend(caps)
        # A caption that tokenises to nothing stays as a bare [SEP], so caption j still
        # lines up with score j.
        ids = iter(c[: self.max_caption_length] for c in self.token_ids(flat))
        per_example = [[next(ids) for _ in caps] for caps in captions]
        return per_example, ([list(map(float, s)) for s in scores] if scores is not None else None)

    # ------------------------------------------------------------------ batch

    def __call__(
        self,
        images: Sequence[Any] | None,
        questions: Sequence[str],
        captions: Sequence[Sequence[str]] | None = None,
        scores: Sequence[Sequence[float]] | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> BatchEncoding:
        """Build a padded batch.

        Args:
            images: PIL images (converted to RGB), or ``None`` when ``pixel_values`` are
                given or only text is wanted.
            questions: One question per example.
            captions: Retrieved captions per example, best first; lists may have
                different lengths (0..k). ``None`` = no retrieval.
            scores: Retrieval score of each caption (same shape as ``captions``).
            pixel_values: Pre-processed (B, 3, H, W) images instead of ``images``.

        Returns:
            ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``caption_index``
            (B, L) (-1 off captions; padded to the longest example); with an answer
            vocabulary, ``context_answers`` (B, C) (answer ids found in the captions, -1
            padding) and ``context_positions`` (B, C) (their first token in ``input_ids``);
            ``caption_scores``
            (B, k_max) when ``scores`` are given (0 where an example has fewer
            captions), ``pixel_values`` (B, 3, H, W) when images are given.

        Raises:
            TypeError: A question or caption that is not a string.
            ValueError: Mismatched lengths, a question with no tokens, bad scores.
        """
        q_ids = self._question_ids(questions)
        batch = len(q_ids)
        if batch == 0:
            raise UsageError("questions is empty; expected at least one question")
        c_ids, score_lists = self._caption_ids(captions, scores, batch)

        copy = self.answers is not None
        flat = [c for caps in captions for c in caps] if copy and captions is not None else []
        matched = iter(self.answers_in(flat)) if flat else None
        rows, found = [], []
        for q, caps in zip(q_ids, c_ids):
            ids = [self.cls_id, *q, self.sep_id]
            types = [0] * len(ids)
            index = [-1] * len(ids)
            here: list[tuple[int, int]] = []
            for j, c in enumerate(caps):
                if matched is not None:  # answers wholly inside the kept tokens, in the row
                    here += [(a, len(ids) + t) for a, t, last in next(matched) if last < len(c)]
                ids += [*c, self.sep_id]
                types += [1] * (len(c) + 1)
                index += [j] * (len(c) + 1)
            rows.append((ids, types, index))
            found.append(here)
        length = max(len(r[0]) for r in rows)
        # Pad as Python lists, then one tensor each: far cheaper than per-row tensors.
        pads = [length - len(r[0]) for r in rows]
        input_ids = torch.tensor([r[0] + [self.pad_id] * p for r, p in zip(rows, pads)])
        attention_mask = torch.tensor([[1] * len(r[0]) + [0] * p for r, p in zip(rows, pads)])
        token_type_ids = torch.tensor([r[1] + [0] * p for r, p in zip(rows, pads)])
        caption_index = torch.tensor([r[2] + [-1] * p for r, p in zip(rows, pads)])
        data: dict[str, torch.Tensor] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "caption_index": caption_index,
        }
        if copy:
            width = max(len(f) for f in found)
            data["context_answers"] = torch.tensor(
                [[a for a, _ in f] + [-1] * (width - len(f)) for f in found], dtype=torch.long
            ).view(batch, width)
            data["context_positions"] = torch.tensor(
                [[p for _, p in f] + [0] * (width - len(f)) for f in found], dtype=torch.long
            ).view(batch, width)
        if score_lists is not None:
            k_max = max(len(s) for s in score_lists)
            caption_scores = torch.zeros((batch, k_max), dtype=torch.float32)
            for i, s in enumerate(score_lists):
                caption_scores[i, : len(s)] = torch.tensor(s, dtype=torch.float32)
            data["caption_scores"] = caption_scores
        pixels = self._pixels(images, pixel_values, batch)
        if pixels is not None:
            data["pixel_values"] = pixels
        return BatchEncoding(data)

    def _pixels(self, images: Any, pixel_values: Any, batch: int) -> torch.Tensor | None:
        if images is not None and pixel_values is not None:
            raise UsageError("give images or pixel_values, not both")
        if pixel_values is not None:
            if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
                raise UsageError("pixel_values must be a (batch, 3, H, W) tensor")
            if pixel_values.shape[0] != batch:
                raise UsageError(f"{pixel_values.shape[0]} pixel_values rows for {batch} questions")
            return pixel_values
        if images is None:
            return None
        if self.image_processor is None:
            raise UsageError("this processor has no image processor; pass pixel_values")
        if len(images) != batch:
            raise UsageError(f"{len(images)} images for {batch} questions")
        rgb = [im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]


def image_processor_for(config: Any, image_processor: Any = None) -> Any:
    """The image processor of a reader config's image tower: ``image_processor`` when
    given, the small CNN's, or the named checkpoint's.

    Raises:
        ConfigError: ``vision_backbone='retriever'`` and no ``image_processor`` (the
            retriever's cannot be loaded by name).
    """
    if image_processor is not None:
        return image_processor
    vision_type = (config.vision_config or {}).get("model_type")
    if vision_type == "rvqa-small-cnn":
        return small_cnn_processor(config.image_size)
    if config.vision_backbone == "retriever":
        raise ConfigError(
            "vision_backbone='retriever': pass image_processor=<the retriever's image "
            "processor> (it cannot be loaded by name)"
        )
    return load_image_processor(config.vision_backbone, config.image_size)


def _first_id(tokenizer: Any, names: tuple[str, ...], what: str) -> int:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    raise ConfigError(f"the tokenizer has no {what} token ({' / '.join(names)})")
