"""Inputs, targets and tokenizer of the generative reader.

The encoder reads ``question: Q context: caption_1 ; caption_2 ; ... </s>`` (no
``context:`` part without captions), with the classifier's budgets: up to
``max_question_length`` question tokens and ``max_caption_length`` tokens per
caption, each part tokenised once (the :class:`ReaderProcessor` cache); the
whole text may not pass ``max_input_length`` (:meth:`GenerativeReaderProcessor.max_captions`
says how many captions always fit). The target is the record's most common
answer after the official normalisation (:func:`answer_target`), ``</s>``-ended.

With ``t5_backbone: scratch`` the tokenizer is a SentencePiece model trained with
BPE on the text the reader reads (:func:`tokenizer_training_text`: at the frequencies it
reads it) by :func:`train_sentencepiece_tokenizer` (T5's special tokens:
``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), loaded as the ``transformers`` T5 tokenizer
and saved with the model. transformers' T5 tokenizer segments with the model's pieces
and scores as a unigram model does, not with the BPE merges: trained on deduplicated
text (dominated by a task's many names) "the" became ``▁t he`` although ``▁the`` is a
piece; with the text's real frequencies frequent words stay whole. Training and
inference use the same saved ``tokenizer.json``, so they agree.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BatchEncoding, T5Tokenizer

from rvqa.config import ReaderSettings
from rvqa.errors import ConfigError, DataFormatError, UsageError
from rvqa.metrics import normalize_answer
from rvqa.reader.processing import ReaderProcessor, image_processor_for
from rvqa.towers import load_tokenizer

SPM_FILE = "spiece.model"
"""The SentencePiece model file of a scratch tokenizer (the name T5 tokenizers use)."""

QUESTION_PROMPT = "question:"
CONTEXT_PROMPT = "context:"
CAPTION_SEPARATOR = ";"
IGNORE_INDEX = -100
"""Label of padding positions (ignored by the LM loss)."""


def answer_target(answers: Sequence[str]) -> str:
    """The training target of a question: its most common answer after the official
    normalisation (ties: the first given); ``""`` when none survives normalisation."""
    if isinstance(answers, str):
        raise TypeError(f"answers must be a list of strings, got the string {answers!r}")
    counts = Counter(a for a in map(normalize_answer, answers) if a)
    return counts.most_common(1)[0][0] if counts else ""


def train_sentencepiece_tokenizer(
    texts: Iterable[str],
    folder: str | os.PathLike,
    vocab_size: int = ReaderSettings.spm_vocab_size,
    max_sentences: int = 2_000_000,
    seed: int = 0,
) -> Any:
    """Train a SentencePiece BPE model on ``texts`` into ``folder/spiece.model`` and
    load it as the ``transformers`` T5 tokenizer.

    T5's special tokens: ``<pad>`` = 0 (also the decoder start), ``</s>`` = 1,
    ``<unk>`` = 2; no ``<s>``. Every character of the text is covered. The vocabulary
    is at most ``vocab_size`` pieces (fewer when the text has fewer).

    Args:
        texts: Training text, one sentence per item (questions, answers, captions).
        folder: Where ``spiece.model`` is written.
        vocab_size: Pieces, special tokens included.
        max_sentences: Sentences sampled when there are more.
        seed: Seed of SentencePiece's sampling.

    Raises:
        DataFormatError: No non-empty text.
        ConfigError: ``vocab_size`` too small for the text's characters (named).
    """
    import sentencepiece as spm

    lines = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not lines:
        raise DataFormatError("no text to train the SentencePiece tokenizer on")
    lines.append(f"{QUESTION_PROMPT} {CONTEXT_PROMPT} {CAPTION_SEPARATOR}")  # always covered
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(folder / Path(SPM_FILE).stem),
            vocab_size=vocab_size,
            # BPE: on a task's small, repetitive text (names seen a few times each) the
            # unigram trainer kept whole training names as pieces and split common words and
            # unseen names into single characters; BPE keeps frequent words whole and
            # splits every name into pieces shared by many names, which copying an unseen
            # name from the evidence needs.
            model_type="bpe",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            character_coverage=1.0,
            hard_vocab_limit=False,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=max(1, min(8, os.cpu_count() or 1)),
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ConfigError(
            f"cannot train the SentencePiece tokenizer with spm_vocab_size={vocab_size}: {err}"
        ) from None
    return T5Tokenizer.from_pretrained(folder, extra_ids=0)


class GenerativeReaderProcessor(ReaderProcessor):
    """Tokenizer + image processor + budgets of the generative reader (see the module docstring).

    Args:
        tokenizer: A T5 tokenizer (``</s>`` and ``<pad>`` needed).
        image_processor: The image tower's processor (``None``: pass ``pixel_values``).
        max_question_length: Question tokens kept.
        max_caption_length: Tokens kept per caption.
        max_input_length: Text tokens at most (prompts and ``</s>`` included).
        max_answer_length: Target tokens kept (``</s>`` excluded).
        cache_size: Distinct strings whose token ids are kept.
    """

    KIND = "generative"

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any = None,
        max_question_length: int = ReaderSettings.max_question_length,
        max_caption_length: int = ReaderSettings.max_caption_length,
        max_input_length: int = ReaderSettings.max_input_length,
        max_answer_length: int = ReaderSettings.max_answer_length,
        cache_size: int = 200_000,
    ):
        for name, value in (
            ("max_input_length", max_input_length),
            ("max_answer_length", max_answer_length),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.max_input_length = max_input_length
        self.max_answer_length = max_answer_length
        super().__init__(
            tokenizer,
            image_processor,
            max_question_length=max_question_length,
            max_caption_length=max_caption_length,
            cache_size=cache_size,
        )
        self._prompts = [
            list(ids)
            for ids in self.token_ids([QUESTION_PROMPT, CONTEXT_PROMPT, CAPTION_SEPARATOR])
        ]
        fixed = len(self._prompts[0]) + max_question_length + 1  # question part + </s>
        if fixed > max_input_length:
            raise ConfigError(
                f"max_input_length={max_input_length} does not hold a question of "
                f"max_question_length={max_question_length} tokens with its prompt and </s> "
                f"({fixed} tokens)"
            )

    def _special_ids(self, tokenizer: Any) -> None:
        for name in ("eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is None:
                raise ConfigError(f"the generative reader's tokenizer has no {name[:-9]} token")
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id

    def _budgets(self) -> dict[str, Any]:
        return {
            **super()._budgets(),
            "max_input_length": self.max_input_length,
            "max_answer_length": self.max_answer_length,
        }

    @classmethod
    def from_config(
        cls, config: Any, tokenizer: Any = None, image_processor: Any = None
    ) -> GenerativeReaderProcessor:
        """The processor of a :class:`~rvqa.reader.configuration.GenerativeReaderConfig`.

        Args:
            config: The reader's config.
            tokenizer: The tokenizer; required for ``t5_backbone: scratch`` (the
                trained SentencePiece one), else the checkpoint's is loaded.
            image_processor: As :meth:`ReaderProcessor.from_config`.
        """
        if tokenizer is None:
            if config.t5_backbone == "scratch":
                raise ConfigError(
                    "t5_backbone='scratch' has no tokenizer to load by name: pass tokenizer= "
                    "(train_sentencepiece_tokenizer) or load a saved reader folder"
                )
            tokenizer = load_tokenizer(config.t5_backbone)
        return cls(
            tokenizer,
            image_processor_for(config, image_processor),
            max_question_length=config.max_question_length,
            max_caption_length=config.max_caption_length,
            max_input_length=config.max_input_length,
            max_answer_length=config.max_answer_length,
        )

    def max_captions(self) -> int:
        """The most captions whose text always fits ``max_input_length`` (any lengths)."""
        q_prompt, c_prompt, sep = map(len, self._prompts)
        room = self.max_input_length - (q_prompt + self.max_question_length + 1)
        room -= c_prompt - len(self._prompts[2])  # the first caption has no separator
        return max(0, room // (self.max_caption_length + sep))

    def __call__(
        self,
        images: Sequence[Any] | None,
        questions: Sequence[str],
        captions: Sequence[Sequence[str]] | None = None,
        scores: Sequence[Sequence[float]] | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> BatchEncoding:
        """Build a padded batch: ``input_ids`` and ``attention_mask`` (B, L), and
        ``pixel_values`` when images are given. Arguments and errors as
        :meth:`ReaderProcessor.__call__`; ``scores`` are checked but not read (the
        generative reader sees the captions in retrieval order).

        Raises:
            UsageError: More captions than fit ``max_input_length`` (see :meth:`max_captions`).
        """
        q_ids = self._question_ids(questions)
        batch = len(q_ids)
        if batch == 0:
            raise UsageError("questions is empty; expected at least one question")
        c_ids, _ = self._caption_ids(captions, scores, batch)
        q_prompt, c_prompt, sep = self._prompts
        rows = []
        for i, (q, caps) in enumerate(zip(q_ids, c_ids)):
            ids = [*q_prompt, *q]
            for j, c in enumerate(caps):
                ids += [*(sep if j else c_prompt), *c]
            ids.append(self.eos_id)
            if len(ids) > self.max_input_length:
                raise UsageError(
                    f"example {i}: {len(caps)} captions make {len(ids)} text tokens, more than "
                    f"max_input_length={self.max_input_length}; at most {self.max_captions()} "
                    "captions always fit"
                )
            rows.append(ids)
        length = max(map(len, rows))
        data: dict[str, torch.Tensor] = {
            "input_ids": torch.tensor([r + [self.pad_id] * (length - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        }
        pixels = self._pixels(images, pixel_values, batch)
        if pixels is not None:
            data["pixel_values"] = pixels
        return BatchEncoding(data)

    def labels(self, answer_lists: Sequence[Sequence[str]]) -> torch.Tensor:
        """(B, T) target token ids of each question's :func:`answer_target` + ``</s>``,
        padded with ``-100`` (ignored by the loss)."""
        targets = [answer_target(a) for a in answer_lists]
        ids = [list(t)[: self.max_answer_length] + [self.eos_id] for t in self.token_ids(targets)]
        length = max(map(len, ids))
        return torch.tensor([r + [IGNORE_INDEX] * (length - len(r)) for r in ids])

    def decode(self, sequences: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Generated token ids → answer texts (special tokens dropped, spaces trimmed)."""
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [t.strip() for t in texts]


class GenerativeReaderCollator:
    """Tokenises a batch for the generative reader; ``labels`` from the items' ``answers``."""

    def __init__(self, processor: GenerativeReaderProcessor, with_labels: bool = True):
        self.processor = processor
        self.with_labels = with_labels

    def __call__(self, items: list[dict]) -> dict:
        out = dict(
            self.processor(
                None, [it["question"] for it in items], captions=[it["captions"] for it in items]
            )
        )
        key = "visual_features" if "visual_features" in items[0] else "pixel_values"
        out[key] = torch.stack([it[key] for it in items])
        if self.with_labels:
            out["labels"] = self.processor.labels([it["answers"] for it in items])
        return out


def tokenizer_training_text(
    train_records: Sequence[Any],
    retrieved: Any,
    image_key: Any,
    max_sentences: int = 2_000_000,
    worlds: Any = None,
    top_k: int | None = None,
    seed: int = 0,
    epochs: int = 1,
) -> list[str]:
    """The text the reader reads in training, at the frequencies it reads it: per
    question (an even sample when the texts would pass ``max_sentences``), the
    prompt words, the question, its image's first ``top_k`` retrieved captions and its
    target answer — each text a separate sentence, as the processor tokenises each part
    on its own. With term ``worlds`` (:class:`~rvqa.reader.augmentation.TermWorlds`)
    each question's texts are rewritten into its world of each of the first ``epochs``
    epochs (the choice :class:`~rvqa.reader.data.ReaderDataset` makes with ``seed``).

    Frequencies matter: deduplicated, a task's text is dominated by its many distinct
    names, and the pieces of frequent words ("the", "question") are then scored below
    their letters (transformers' T5 tokenizer segments by piece scores)."""
    n = len(train_records)
    rounds = max(1, epochs) if worlds is not None else 1
    per_question = 3 + (top_k if top_k is not None else 8)  # prompt, question, captions, target
    step = max(1, int(np.ceil(n * rounds / max(1, max_sentences // per_question))))
    texts: list[str] = []
    prompt = f"{QUESTION_PROMPT} {CONTEXT_PROMPT} {CAPTION_SEPARATOR}"
    for i in range(0, n, step):
        r = train_records[i]
        captions = [
            h[0] for h in (retrieved.get(image_key(r), []) if retrieved is not None else [])
        ]
        own = [prompt, r.question, *captions[:top_k], answer_target(list(r.answers or []))]
        if worlds is None:
            texts.extend(own)
            continue
        for epoch in range(rounds):
            w = worlds.world_of(r.question_id, epoch, seed)
            texts.extend(worlds.rewrite_all(own, w))
    return [t for t in texts if t][:max_sentences]
