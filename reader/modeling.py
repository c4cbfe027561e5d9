"""The retrieval-augmented multimodal reader (single-stream, VisualBERT / MMBT style).

One transformer reads everything at once::

    [CLS] question [SEP] caption_1 [SEP] ... caption_k [SEP] | v_1 ... v_V
    <-- type 0 ------><------------ type 1 ---------------->   <- visual type ->

The text half goes through the text backbone's own embeddings (word + position +
token type), so pretrained BERT / MiniLM weights mean what they were trained to
mean. The visual half is the image tower's patch/grid tokens, projected to the
text width, with its own position table and its own type vector (BERT has only
two token types). The concatenation runs through the text backbone's encoder
layers, and an MLP on the final ``[CLS]`` state scores every answer.

Each caption's retrieval score enters as ``score_embedding(score)`` added to the
embeddings of that caption's tokens, so the reader can learn how far to trust a
weakly matching caption. ``k = 0`` (no retrieval) is the same model reading
``[CLS] question [SEP]`` and the image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput

from rvqa.config import ReaderSettings, model_options
from rvqa.errors import ConfigError
from rvqa.reader.configuration import ReaderConfig
from rvqa.reader.vision import (
    VisionTowerMixin,
    build_image_tower,
    check_visual_features,
    start_vision_tower,
    vision_config_for,
    visual_token_bound,
)
from rvqa.towers import (
    KeepsFrozenOnLoad,
    build_tower,
    drop_unused_heads,
    hidden_size_of,
    load_tower_weights,
    text_config_from_name,
)

logger = logging.getLogger(__name__)

# Options from_backbones takes (from a ReaderSettings or as keyword arguments) besides
# the ReaderConfig fields it does not fill itself.
_BUILD_KEYS = ("num_text_layers", "cnn_hidden_sizes")
_FILLED_KEYS = ("answers", "text_config", "vision_config")


@dataclass
class ReaderOutput(ModelOutput):
    """Output of :meth:`ReaderModel.forward`.

    Attributes:
        loss: Soft-target BCE (when ``labels`` are given), see :meth:`ReaderModel.forward`.
        logits: (B, num_answers) answer scores (sigmoid → per-answer probability).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class ReaderModel(KeepsFrozenOnLoad, VisionTowerMixin, PreTrainedModel):
    """Question + retrieved captions + image → answer logits (see the module docstring)."""

    config_class = ReaderConfig
    base_model_prefix = "reader"
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []

    def __init__(self, config: ReaderConfig):
        super().__init__(config)
        if not config.text_config or not config.vision_config:
            raise ConfigError(
                "ReaderConfig needs text_config and vision_config dicts; build one with "
                "ReaderModel.from_backbones(...) or rvqa.towers.*_config_from_name"
            )
        if config.num_answers == 0:
            raise ConfigError("ReaderConfig.answers is empty; build the answer vocabulary first")
        self.text_model = build_tower(config.text_config)
        # The reader uses token states only: heads that would get no gradient go.
        drop_unused_heads(self.text_model, pooled=False)
        self.vision_model = build_image_tower(config.vision_config)
        if not all(hasattr(self.text_model, m) for m in ("embeddings", "encoder")):
            raise ConfigError(
                f"text backbone {config.text_backbone!r} ({config.text_config.get('model_type')}) "
                "has no `embeddings` + `encoder` modules; the single-stream reader needs a "
                "BERT-like encoder (BERT, MiniLM, RoBERTa, ELECTRA, ...)"
            )
        hidden = hidden_size_of(config.text_config)
        embed_dim = self.text_model.get_input_embeddings().embedding_dim  # = hidden for BERT

        # Visual tokens: Linear to the text width, + own positions + own type, LayerNorm.
        self.visual_projection = nn.Linear(hidden_size_of(config.vision_config), hidden)
        self.visual_position_embeddings = nn.Embedding(config.max_visual_tokens, hidden)
        self.visual_type_embedding = nn.Parameter(torch.zeros(hidden))
        self.visual_norm = nn.LayerNorm(hidden, eps=config.text_config.get("layer_norm_eps", 1e-12))
        self.visual_dropout = nn.Dropout(config.dropout)

        # Retrieval score → a vector added to every token of that caption (before the
        # backbone's LayerNorm, like BERT's own position and type embeddings).
        self.score_embedding = nn.Linear(1, embed_dim) if config.use_retrieval_scores else None

        # VQA head of VisualBERT / Pythia: Linear → GELU → LayerNorm → Linear.
        width = config.classifier_hidden or 2 * hidden
        self.classifier = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(hidden, width),
            nn.GELU(),
            nn.LayerNorm(width, eps=1e-12),
            nn.Dropout(config.dropout),
            nn.Linear(width, config.num_answers),
        )
        # Copying answers from the captions (an extractive pointer): the [CLS] state's
        # query against the state of each answer's first token in the captions.
        if config.copy_from_context:
            self.copy_query = nn.Linear(hidden, hidden)
            self.copy_key = nn.Linear(hidden, hidden)
        self.post_init()
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """A frozen image tower is a fixed feature extractor (its features can be
        cached per image); frozen word embeddings skip the vocabulary-sized update."""
        self.freeze_vision_tower()
        self.text_model.get_input_embeddings().weight.requires_grad_(
            not self.config.freeze_word_embeddings
        )

    def _init_weights(self, module: nn.Module) -> None:
        # Linear / Embedding / LayerNorm of the reader itself: the transformers default
        # (normal(initializer_range), zeros, ones). The towers init themselves.
        super()._init_weights(module)
        if module is self:
            nn.init.normal_(self.visual_type_embedding, std=self.config.initializer_range)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_backbones(
        cls,
        answers: Sequence[str],
        settings: Any | None = None,
        *,
        vision_tower: PreTrainedModel | None = None,
        load_weights: bool = True,
        **overrides: Any,
    ) -> ReaderModel:
        """Build a reader from named backbones, loading their pretrained weights.

        Args:
            answers: The answer vocabulary (e.g. ``AnswerVocab.answers``).
            settings: A :class:`rvqa.config.ReaderSettings` (or any object): its
                attributes named like an option below are used (training fields are
                not); ``None`` or a missing attribute = the ``ReaderSettings`` default
                (see :func:`rvqa.config.model_options`, shared with the retriever).
            vision_tower: An existing image tower (e.g. ``retriever.vision_model``) whose
                config and weights the reader starts from; required when
                ``vision_backbone == "retriever"``.
            load_weights: Load pretrained tower weights (False: random init, for tests).
            **overrides: Options that win over ``settings``: ``text_backbone``,
                ``vision_backbone``, ``num_text_layers`` (keep the first N text layers),
                ``cnn_hidden_sizes`` (small CNN stages) and any :class:`ReaderConfig`
                field except ``answers`` / ``text_config`` / ``vision_config``.

        Raises:
            TypeError: An unknown override name.
            ValueError: ``vision_backbone="retriever"`` without ``vision_tower``, or a
                backbone that cannot be loaded.
        """
        opts = model_options(
            settings,
            ReaderSettings,
            ReaderConfig,
            overrides,
            build_keys=_BUILD_KEYS,
            filled_keys=_FILLED_KEYS,
            what="reader",
        )
        text_backbone = opts.pop("text_backbone")
        vision_backbone = opts.pop("vision_backbone")
        num_text_layers = opts.pop("num_text_layers")
        cnn_hidden_sizes = opts.pop("cnn_hidden_sizes")
        image_size = opts["image_size"]
        grid = opts["visual_grid"]

        vision_config = vision_config_for(
            vision_backbone, vision_tower, image_size, grid, cnn_hidden_sizes
        )
        opts.setdefault(
            "max_visual_tokens", max(64, visual_token_bound(vision_config, grid, image_size))
        )
        config = ReaderConfig(
            text_config=text_config_from_name(text_backbone, num_text_layers),
            vision_config=vision_config,
            text_backbone=text_backbone,
            vision_backbone=vision_backbone,
            answers=list(answers),
            **opts,
        )
        model = cls(config)
        start_vision_tower(model.vision_model, vision_tower, vision_backbone, load_weights)
        if load_weights:
            load_tower_weights(model.text_model, text_backbone, text=True)
        model.apply_freezing()
        return model

    # ------------------------------------------------------------------ embeddings

    def embed_text(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        caption_index: torch.Tensor | None,
        caption_scores: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, L) token ids → (B, L, H) embeddings (word + score + position + type, LayerNorm)."""
        words = self.text_model.get_input_embeddings()(input_ids)  # (B, L, E)
        if self.score_embedding is not None:
            words = words + self._score_signal(caption_index, caption_scores, words.dtype)
        emb = self.text_model.embeddings(inputs_embeds=words, token_type_ids=token_type_ids)
        project = getattr(self.text_model, "embeddings_project", None)  # ELECTRA: E != H
        return project(emb) if project is not None else emb  # (B, L, H)

    def _score_signal(
        self, caption_index: torch.Tensor | None, scores: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """(B, L) caption index + (B, k) scores → (B, L, E), zero off the caption tokens."""
        if caption_index is None or scores is None or scores.shape[1] == 0:
            # Still run the layer (on zeros, masked out): DDP expects a gradient for every
            # parameter, also in batches without captions.
            ref = caption_index if caption_index is not None else scores
            shape = ref.shape[0] if ref is not None else 1
            token_scores = torch.zeros(shape, 1, device=self.device, dtype=dtype)
            is_caption = torch.zeros_like(token_scores)
        else:
            is_caption = (caption_index >= 0).to(dtype)  # (B, L)
            token_scores = scores.to(dtype).gather(1, caption_index.clamp(min=0)) * is_caption
        return self.score_embedding(token_scores.unsqueeze(-1)) * is_caption.unsqueeze(-1)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels → (B, V, H) visual token embeddings."""
        return self.embed_visual(self.vision_features(pixel_values))

    def embed_visual(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, V, C) image-tower tokens → (B, V, H) visual token embeddings."""
        num_tokens = feats.shape[1]
        if num_tokens > self.config.max_visual_tokens:
            raise ConfigError(
                f"the image tower gives {num_tokens} visual tokens but max_visual_tokens is "
                f"{self.config.max_visual_tokens}; raise max_visual_tokens or lower visual_grid"
            )
        positions = torch.arange(num_tokens, device=feats.device)
        x = (
            self.visual_projection(feats)  # (B, V, H)
            + self.visual_position_embeddings(positions)  # (V, H)
            + self.visual_type_embedding  # (H,)
        )
        return self.visual_dropout(self.visual_norm(x))

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        caption_index: torch.Tensor | None = None,
        caption_scores: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        context_answers: torch.Tensor | None = None,
        context_positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ReaderOutput:
        """Score every answer for a batch (the :class:`~rvqa.reader.processing.ReaderProcessor` output).

        Args:
            pixel_values: (B, 3, H, W) images.
            input_ids: (B, L) ``[CLS] question [SEP] caption_1 [SEP] ...`` token ids.
            attention_mask: (B, L) 1 for real tokens, 0 for padding (None = all real).
            token_type_ids: (B, L) 0 for the question segment, 1 for captions (None = all 0).
            caption_index: (B, L) which caption (0..k-1) a token belongs to, -1 elsewhere.
            caption_scores: (B, k) retrieval scores; needed when ``use_retrieval_scores``
                and the batch has captions, ignored otherwise.
            visual_features: (B, V, C) precomputed :meth:`vision_features` instead of
                ``pixel_values`` (a frozen image tower's output, cached by training).
            context_answers: (B, C) ids of vocabulary answers found in the captions (-1:
                padding); with ``context_positions`` (B, C), the position of each one's
                first token in ``input_ids``. Required by a reader with
                ``copy_from_context`` when the batch has captions (its processor makes
                them): answer ``a``'s logit gains the pointer score
                ``max_i (W_q h_CLS) · (W_k h_i) / sqrt(H)`` over its occurrences ``i``.
            labels: (B, num_answers) soft targets in [0, 1]. The loss is
                ``binary_cross_entropy_with_logits(logits, labels, reduction="mean") *
                num_answers`` — per question the *sum* over answers, averaged over the batch
                (Bottom-Up / Pythia), so the loss scale does not shrink with the vocabulary.

        Raises:
            TypeError / ValueError: Inputs of the wrong type, shape or range.
        """
        if visual_features is not None:  # checked before its shape gives the batch size
            check_visual_features(pixel_values, visual_features)
        batch, length = self._check_inputs(
            pixel_values if visual_features is None else visual_features,
            input_ids,
            attention_mask,
            token_type_ids,
            caption_index,
            caption_scores,
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        text = self.embed_text(
            input_ids, token_type_ids, caption_index, caption_scores
        )  # (B, L, H)
        feats = self.visual_inputs(pixel_values, visual_features)  # (B, V, C)
        visual = self.embed_visual(feats).to(text.dtype)  # (B, V, H)
        x = torch.cat([text, visual], dim=1)  # (B, L+V, H)
        mask = torch.cat(  # visual tokens are never padding
            [attention_mask, attention_mask.new_ones(batch, visual.shape[1])], dim=1
        )  # (B, L+V)
        # The mask in the form the backbone's attention implementation wants (eager/sdpa/...).
        mask = create_bidirectional_mask(
            config=self.text_model.config, inputs_embeds=x, attention_mask=mask
        )
        hidden = self.text_model.encoder(x, attention_mask=mask).last_hidden_state  # (B, L+V, H)
        logits = self.classifier(hidden[:, 0])  # (B, A): from the [CLS] state
        if self.config.copy_from_context:
            logits = logits + self.copy_scores(
                hidden, length, logits.shape[1], caption_index, context_answers, context_positions
            )

        loss = None
        if labels is not None:
            if labels.shape != logits.shape:
                raise ValueError(
                    f"labels must be soft targets of shape (batch, num_answers) = "
                    f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
                )
            loss = F.binary_cross_entropy_with_logits(
                logits, labels.to(logits.dtype), reduction="mean"
            )
            loss = loss * logits.shape[1]
        return ReaderOutput(loss=loss, logits=logits)

    def copy_scores(
        self,
        hidden: torch.Tensor,
        text_length: int,
        num_answers: int,
        caption_index: torch.Tensor | None,
        answers: torch.Tensor | None,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, A) pointer scores added to the logits: for each answer found in the captions,
        the best scaled dot product between the ``[CLS]`` query and the key of one of its
        occurrences; 0 for answers not in the captions. ``hidden`` is the encoder's output
        (text then visual tokens); positions index its first ``text_length`` (the text)."""
        if answers is None or positions is None:
            if caption_index is not None and bool((caption_index >= 0).any()):
                raise ValueError(
                    "this reader copies answers from its captions (copy_from_context=True) but "
                    "the batch has captions and no context_answers / context_positions; build "
                    "batches with the reader's own processor (ReaderProcessor.from_pretrained)"
                )
            answers = hidden.new_full((hidden.shape[0], 0), -1, dtype=torch.long)
            positions = torch.zeros_like(answers)
        batch, _, width = hidden.shape
        length = text_length
        for name, value in (("context_answers", answers), ("context_positions", positions)):
            if value.ndim != 2 or value.shape[0] != batch or value.dtype != torch.long:
                raise ValueError(
                    f"{name} must be int64 ids of shape (batch={batch}, C), got "
                    f"{value.dtype} {tuple(value.shape)}"
                )
        if answers.shape != positions.shape:
            raise ValueError(
                f"context_answers {tuple(answers.shape)} and context_positions "
                f"{tuple(positions.shape)} must have the same shape"
            )
        valid = answers >= 0
        if bool((answers >= num_answers).any()):
            raise ValueError(
                f"context_answers holds answer id {int(answers.max())} but the vocabulary has "
                f"{num_answers} answers"
            )
        if bool(((positions < 0) | (positions >= length))[valid].any()):
            raise ValueError(f"context_positions must lie in [0, {length}) (the text length)")
        keys = hidden.gather(1, positions.clamp(0, length - 1).unsqueeze(-1).expand(-1, -1, width))
        query = self.copy_query(hidden[:, 0])  # (B, H)
        scores = torch.einsum("bh,bch->bc", query, self.copy_key(keys)) / width**0.5  # (B, C)
        # Padding goes to an extra column, dropped; an answer found twice keeps its best.
        target = torch.where(valid, answers, num_answers)
        out = scores.new_zeros(batch, num_answers + 1)
        out = out.scatter_reduce(1, target, scores, reduce="amax", include_self=False)
        return out[:, :num_answers]

    def _check_inputs(
        self,
        pixel_values: Any,
        input_ids: Any,
        attention_mask: Any,
        token_type_ids: Any,
        caption_index: Any,
        caption_scores: Any,
    ) -> tuple[int, int]:
        for name, value in (("pixel_values", pixel_values), ("input_ids", input_ids)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(
                f"input_ids must be integer token ids of shape (batch, length), got "
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
            )
        batch, length = input_ids.shape
        if pixel_values.ndim == 3 and pixel_values.shape[0] == batch:
            pass  # visual_features (B, V, C)
        elif pixel_values.ndim != 4 or pixel_values.shape[0] != batch:
            raise ValueError(
                f"pixel_values must be (batch={batch}, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        for name, value in (
            ("attention_mask", attention_mask),
            ("token_type_ids", token_type_ids),
            ("caption_index", caption_index),
        ):
            if value is not None and tuple(value.shape) != (batch, length):
                raise ValueError(
                    f"{name} must have the shape of input_ids {(batch, length)}, "
                    f"got {tuple(value.shape)}"
                )
        max_positions = getattr(self.text_model.config, "max_position_embeddings", None)
        if max_positions is not None and length > max_positions:
            raise ConfigError(
                f"the text is {length} tokens but the text backbone has {max_positions} "
                "positions; lower top_k, max_question_length or max_caption_length"
            )
        if caption_scores is None:
            if self.score_embedding is not None and caption_index is not None:
                if bool((caption_index >= 0).any()):
                    raise ValueError(
                        "this reader uses retrieval scores (use_retrieval_scores=True) but the "
                        "batch has captions and no caption_scores"
                    )
            return batch, length
        if caption_index is None:
            raise ValueError("caption_scores needs caption_index (which caption each token is)")
        if caption_scores.ndim != 2 or caption_scores.shape[0] != batch:
            raise ValueError(
                f"caption_scores must be (batch={batch}, k), got {tuple(caption_scores.shape)}"
            )
        if bool((caption_index >= caption_scores.shape[1]).any()):
            raise ValueError(
                f"caption_index refers to caption {int(caption_index.max())} but caption_scores "
                f"has only {caption_scores.shape[1]} columns"
            )
        return batch, length


AutoModel.register(ReaderConfig, ReaderModel, exist_ok=True)
