"""The generative reader: a T5 encoder-decoder that writes the answer.

The encoder reads the image and the text at once::

    v_1 ... v_V | question: Q context: caption_1 ; caption_2 ... </s>

The visual tokens are the image tower's features (the same ``visual_features`` the
classifier reads and the feature cache stores: :mod:`rvqa.reader.vision`) projected
by a Linear layer to T5's ``d_model`` and prepended to the token embeddings
(``inputs_embeds``; the attention mask grows by V ones). The decoder is trained with
T5's LM loss on the most common human answer and generates the answer by greedy or
beam search (``num_beams``). Each generated answer's score is its sequence
probability ``exp(Σ log p(token))`` (``</s>`` included), recomputed by one
teacher-forced decoder pass over the returned sequences, so it is the probability
the model assigns, whatever the search's own ranking adjustments.

``t5_backbone: scratch`` builds a small T5 (``t5_*`` sizes) on a SentencePiece
vocabulary trained on the task's text; a checkpoint name (``google/flan-t5-base``)
starts from its weights and tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from rvqa.config import ReaderSettings, model_options
from rvqa.errors import ConfigError, UsageError
from rvqa.reader.configuration import GenerativeReaderConfig
from rvqa.reader.generative_processing import IGNORE_INDEX
from rvqa.reader.vision import (
    VisionTowerMixin,
    build_image_tower,
    start_vision_tower,
    vision_config_for,
)
from rvqa.towers import KeepsFrozenOnLoad, hidden_size_of

logger = logging.getLogger(__name__)

# Options from_backbones takes besides the GenerativeReaderConfig fields it fills itself.
_BUILD_KEYS = (
    "t5_d_model",
    "t5_num_layers",
    "t5_num_heads",
    "t5_d_ff",
    "t5_dropout",
    "cnn_hidden_sizes",
)
_FILLED_KEYS = ("t5_config", "vision_config")
SCRATCH = "scratch"
NO_COPY = -1
"""``copy_ids`` value of an encoder position that cannot be copied (a visual token, padding)."""


class CopyT5ForConditionalGeneration(T5ForConditionalGeneration):
    """T5 with a copy head (a pointer-generator, See et al. 2017, "Get To The Point").

    At each decoding step a pointer attention over the encoder states (its own query and
    key projections of the decoder's and encoder's last states) gives a distribution over
    the encoder positions; each position's weight goes to the token it holds
    (``copy_ids``). A gate ``g = σ(w·s_t + b)`` on the decoder state mixes the two::

        p(w) = g · softmax(lm_logits)(w) + (1 − g) · Σ_{i: copy_ids_i = w} a_i

    ``logits`` are ``log p`` (normalised: ``log_softmax`` leaves them unchanged, so
    greedy and beam search in ``generate`` and the sequence scores use ``p``) and the
    loss is the mean ``−log p`` of the label tokens. Copying a name never seen in
    training then needs only the attention to find it, not an output embedding trained
    on it: on the knowledge task a T5 trained from scratch copies 99.9 % of the unseen
    owner names after 636 steps, where the same reader without the head copies none
    (``benchmarks/README.md``). Without ``copy_ids`` it is the plain T5 distribution.
    """

    def __init__(self, config: T5Config):
        super().__init__(config)
        d = config.d_model
        self.copy_query = nn.Linear(d, d, bias=False)
        self.copy_key = nn.Linear(d, d, bias=False)
        self.copy_gate = nn.Linear(d, 1)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The copy head: normal(d^-0.5) (O(1) pointer scores and gate at the start), gate
        # bias 0 (half copy); T5's own init would draw std 1 here (a saturated softmax).
        if any(module is getattr(self, n, None) for n in ("copy_query", "copy_key", "copy_gate")):
            nn.init.normal_(
                module.weight, std=self.config.initializer_factor * module.in_features**-0.5
            )
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            return
        super()._init_weights(module)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        copy_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        # T5's parameters are named, not left to **kwargs: generate() checks its model
        # kwargs (encoder_outputs, copy_ids ...) against this signature.
        """T5's forward; with ``copy_ids`` ((B, S): the token id at each encoder position,
        :data:`NO_COPY` where nothing can be copied) the output distribution mixes in
        the pointer (see the class docstring)."""
        t5_inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask,
            "encoder_outputs": encoder_outputs,
            "cache": cache,
            "inputs_embeds": inputs_embeds,
            "decoder_inputs_embeds": decoder_inputs_embeds,
            "use_cache": use_cache,
            **kwargs,
        }
        if copy_ids is None:
            return super().forward(labels=labels, **t5_inputs)
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            t5_inputs["decoder_input_ids"] = self._shift_right(labels)
        t5_inputs.update(output_hidden_states=True, return_dict=True)
        out = super().forward(**t5_inputs)
        encoder_states = out.encoder_last_hidden_state  # (B, S, D)
        if tuple(copy_ids.shape) != tuple(encoder_states.shape[:2]):
            raise ValueError(
                f"copy_ids must have one id per encoder position {tuple(encoder_states.shape[:2])}, "
                f"got {tuple(copy_ids.shape)}"
            )
        # The head in float32 whatever the model's dtype or autocast (a bf16 gate and
        # mixture would leave p summing to 1 ± 0.003).
        with torch.autocast(device_type=encoder_states.device.type, enabled=False):
            state = out.decoder_hidden_states[-1].float()  # (B, T, D), after the final norm
            # q·(W_k e) = (q W_k)·e: the key projection folded into the query, so a
            # decoding step (T = 1) does not project every encoder state again
            query = F.linear(state, self.copy_query.weight.float()) @ self.copy_key.weight.float()
            scores = torch.einsum("btd,bsd->bts", query, encoder_states.float())
            scores = scores * state.shape[-1] ** -0.5
            copyable = copy_ids != NO_COPY
            scores = scores.masked_fill(~copyable[:, None, :], torch.finfo(scores.dtype).min)
            any_copyable = copyable.any(dim=-1)[:, None, None]  # (B, 1, 1)
            pointer = scores.softmax(dim=-1) * any_copyable
            copied = torch.zeros(
                (*pointer.shape[:2], out.logits.shape[-1]),
                dtype=pointer.dtype,
                device=pointer.device,
            )
            index = copy_ids.clamp(min=0)[:, None, :].expand(-1, pointer.shape[1], -1)
            copied.scatter_add_(2, index, pointer)
            gate = torch.sigmoid(
                F.linear(state, self.copy_gate.weight.float(), self.copy_gate.bias.float())
            )  # (B, T, 1)
            # nothing to copy (no text token read): the vocabulary alone, still normalised
            gate = torch.where(any_copyable, gate, torch.ones_like(gate))
            probs = gate * out.logits.float().softmax(dim=-1) + (1 - gate) * copied
            log_probs = probs.clamp(min=torch.finfo(probs.dtype).tiny).log()
        loss = None
        if labels is not None:
            loss = F.nll_loss(
                log_probs.reshape(-1, log_probs.shape[-1]),
                labels.reshape(-1).to(log_probs.device),
                ignore_index=IGNORE_INDEX,
            )
        return Seq2SeqLMOutput(
            loss=loss,
            logits=log_probs,
            cache=out.cache,
            encoder_last_hidden_state=encoder_states,
        )


@dataclass
class GeneratedAnswers:
    """What :meth:`GenerativeReaderModel.generate_answers` returns.

    Attributes:
        sequences: (B, n, T) generated token ids (decoder start first, padded), per
            question best first.
        log_probs: (B, n) each sequence's log-probability (sum over its tokens,
            ``</s>`` included).
    """

    sequences: torch.Tensor
    log_probs: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        """(B, n) sequence probabilities, ``exp(log_probs)``."""
        return self.log_probs.exp()


def scratch_t5_config(
    vocab_size: int,
    d_model: int,
    num_layers: int,
    num_heads: int,
    d_ff: int,
    dropout: float = 0.1,
) -> dict:
    """The config dict of a small T5 trained from scratch: gated GELU (T5 v1.1) with the
    output layer tied to the token embeddings (T5 v1.0; ``<pad>`` 0 = decoder start,
    ``</s>`` 1). Tied, the initial logits are O(1) (v1.1's untied layer starts with a
    loss near 50), and the decoder's output space is the input's embedding space, which
    copying a name from the evidence needs."""
    if d_model % num_heads:
        raise ConfigError(f"t5_d_model={d_model} is not a multiple of t5_num_heads={num_heads}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"t5_dropout must be a number in [0, 1), got {dropout!r}")
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        dropout_rate=float(dropout),
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    ).to_dict()


class GenerativeReaderModel(KeepsFrozenOnLoad, VisionTowerMixin, PreTrainedModel):
    """Image + question + retrieved captions → generated answer (see the module docstring)."""

    config_class = GenerativeReaderConfig
    base_model_prefix = "reader"
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []

    def __init__(self, config: GenerativeReaderConfig):
        super().__init__(config)
        if not config.t5_config or not config.vision_config:
            raise ConfigError(
                "GenerativeReaderConfig needs t5_config and vision_config dicts; build one "
                "with GenerativeReaderModel.from_backbones(...)"
            )
        t5_config = T5Config.from_dict(
            {k: v for k, v in config.t5_config.items() if k != "model_type"}
        )
        t5_class = (
            CopyT5ForConditionalGeneration
            if config.copy_from_context
            else T5ForConditionalGeneration
        )
        self.t5 = t5_class(t5_config)
        self.vision_model = build_image_tower(config.vision_config)
        self.visual_projection = nn.Linear(hidden_size_of(config.vision_config), t5_config.d_model)
        self.post_init()
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """A frozen image tower is a fixed feature extractor (see :meth:`freeze_vision_tower`)."""
        self.freeze_vision_tower()

    def _init_weights(self, module: nn.Module) -> None:
        # The visual projection: normal(initializer_range); T5 and the tower init themselves.
        if module is self.visual_projection:
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_backbones(
        cls,
        settings: Any | None = None,
        *,
        tokenizer: Any = None,
        vision_tower: PreTrainedModel | None = None,
        load_weights: bool = True,
        **overrides: Any,
    ) -> GenerativeReaderModel:
        """Build a generative reader from settings.

        Args:
            settings: A :class:`rvqa.config.ReaderSettings` (or any object): attributes
                named like an option are used; missing ones take the ``ReaderSettings``
                default (:func:`rvqa.config.model_options`).
            tokenizer: The tokenizer the model will read (its size is the scratch T5's
                vocabulary; for a checkpoint it must fit the checkpoint's vocabulary).
            vision_tower: An existing image tower (``vision_backbone="retriever"``).
            load_weights: Load pretrained T5 / image tower weights (False: random, tests).
            **overrides: ``t5_backbone``, ``t5_d_model``, ``t5_num_layers``,
                ``t5_num_heads``, ``t5_d_ff``, ``t5_dropout``, ``cnn_hidden_sizes`` and any
                :class:`GenerativeReaderConfig` field except the two config dicts.

        Raises:
            TypeError: An unknown option.
            ConfigError: Scratch without a tokenizer, a tokenizer larger than a
                checkpoint's vocabulary, ``vision_backbone="retriever"`` without
                ``vision_tower``, or a backbone that cannot be loaded.
        """
        opts = model_options(
            settings,
            ReaderSettings,
            GenerativeReaderConfig,
            overrides,
            build_keys=_BUILD_KEYS,
            filled_keys=_FILLED_KEYS,
            what="generative reader",
        )
        sizes = {k: opts.pop(k) for k in _BUILD_KEYS if k.startswith("t5_")}
        cnn_hidden_sizes = opts.pop("cnn_hidden_sizes")
        t5_backbone = opts["t5_backbone"]
        if t5_backbone == SCRATCH:
            if tokenizer is None:
                raise ConfigError(
                    "t5_backbone='scratch' needs tokenizer= (train one with "
                    "rvqa.reader.generative_processing.train_sentencepiece_tokenizer)"
                )
            t5_config = scratch_t5_config(
                len(tokenizer),
                sizes["t5_d_model"],
                sizes["t5_num_layers"],
                sizes["t5_num_heads"],
                sizes["t5_d_ff"],
                sizes["t5_dropout"],
            )
        else:
            t5_config = _checkpoint_t5_config(t5_backbone)
            if tokenizer is not None and len(tokenizer) > t5_config["vocab_size"]:
                raise ConfigError(
                    f"the tokenizer has {len(tokenizer)} tokens but {t5_backbone!r} has "
                    f"{t5_config['vocab_size']} embeddings"
                )
        vision_config = vision_config_for(
            opts["vision_backbone"],
            vision_tower,
            opts["image_size"],
            opts["visual_grid"],
            cnn_hidden_sizes,
        )
        model = cls(
            GenerativeReaderConfig(t5_config=t5_config, vision_config=vision_config, **opts)
        )
        start_vision_tower(model.vision_model, vision_tower, opts["vision_backbone"], load_weights)
        if load_weights and t5_backbone != SCRATCH:
            pretrained = T5ForConditionalGeneration.from_pretrained(t5_backbone)
            # the copy head (when on) is new: the rest must match exactly
            missing, unexpected = model.t5.load_state_dict(pretrained.state_dict(), strict=False)
            missing = [k for k in missing if not k.startswith("copy_")]
            if missing or unexpected:
                raise ConfigError(
                    f"{t5_backbone!r} does not fit a T5 of its own config: missing "
                    f"{missing[:3]}, unexpected {unexpected[:3]}"
                )
        model.freeze_vision_tower()
        return model

    # ------------------------------------------------------------------ forward

    def encoder_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds (B, V+L, d_model), attention mask (B, V+L)): the projected
        visual tokens, then the token embeddings of the text.

        Raises:
            TypeError / ValueError: Inputs of the wrong type or shape.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(
                f"input_ids must be integer token ids of shape (batch, length), got "
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
            )
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        feats = self.visual_inputs(pixel_values, visual_features)  # (B, V, C)
        if feats.shape[0] != batch:
            raise ValueError(f"{feats.shape[0]} images for {batch} questions")
        text = self.t5.get_input_embeddings()(input_ids)  # (B, L, D)
        visual = self.visual_projection(feats.to(self.visual_projection.weight.dtype))
        embeds = torch.cat([visual.to(text.dtype), text], dim=1)  # (B, V+L, D)
        mask = torch.cat(  # visual tokens are never padding
            [attention_mask.new_ones(batch, visual.shape[1]), attention_mask], dim=1
        )
        return embeds, mask

    def copy_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """(B, V+L) the token id at each encoder position for the copy head
        (:data:`NO_COPY` at the visual tokens and padding); None without a copy head.
        ``attention_mask`` is the full (B, V+L) mask of :meth:`encoder_inputs`."""
        if not self.config.copy_from_context:
            return None
        visual = attention_mask.shape[1] - input_ids.shape[1]
        ids = torch.cat([input_ids.new_full((input_ids.shape[0], visual), NO_COPY), input_ids], 1)
        return ids.masked_fill(attention_mask == 0, NO_COPY)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        """T5 on the image and text (the :class:`GenerativeReaderProcessor` output).

        Args:
            input_ids: (B, L) text token ids.
            attention_mask: (B, L) 1 for real tokens (None = all real).
            pixel_values: (B, 3, H, W) images, or
            visual_features: (B, V, C) precomputed :meth:`vision_features`.
            labels: (B, T) target ids, ``-100`` at padding; the loss is the mean token
                cross-entropy (of the copy-mixed distribution with ``copy_from_context``).
            decoder_input_ids: Instead of ``labels`` (shifted right inside T5).
        """
        embeds, mask = self.encoder_inputs(input_ids, attention_mask, pixel_values, visual_features)
        copy = self.copy_ids(input_ids, mask)
        return self.t5(
            inputs_embeds=embeds,
            attention_mask=mask,
            labels=labels,
            decoder_input_ids=decoder_input_ids,
            return_dict=True,
            **({"copy_ids": copy} if copy is not None else {}),
        )

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_answers(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        num_beams: int | None = None,
        num_return_sequences: int = 1,
        **kwargs: Any,
    ) -> GeneratedAnswers:
        """Generate answers: greedy (``num_beams=1``) or beam search.

        Args:
            input_ids, attention_mask, pixel_values, visual_features: As :meth:`forward`.
            num_beams: Beam width (default: ``config.num_beams``).
            num_return_sequences: Answers per question (the best beams; at most ``num_beams``).
            **kwargs: Ignored batch keys (e.g. ``labels``).

        Returns:
            Sequences and their log-probabilities, per question best first (by the
            sequence probability; beam search ranks by it too: no length penalty).

        Raises:
            UsageError: ``num_return_sequences`` above ``num_beams`` or below 1.
        """
        beams = self.config.num_beams if num_beams is None else int(num_beams)
        n = int(num_return_sequences)
        if beams < 1 or not 1 <= n <= beams:
            raise UsageError(
                f"num_return_sequences={n} must be between 1 and num_beams={beams} (≥ 1)"
            )
        embeds, mask = self.encoder_inputs(input_ids, attention_mask, pixel_values, visual_features)
        encoded = self.t5.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
        search: dict[str, Any] = {"num_beams": beams, "num_return_sequences": n}
        copy = self.copy_ids(input_ids, mask)
        if copy is not None:
            search["copy_ids"] = copy  # expanded per beam by generate
        if beams > 1:
            search.update(length_penalty=0.0, early_stopping=True)
        sequences = self.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoded.last_hidden_state),
            attention_mask=mask,
            max_new_tokens=self.config.max_answer_length + 1,  # + </s>
            do_sample=False,
            **search,
        )  # (B*n, T), decoder start first
        log_probs = self.sequence_log_probs(encoded.last_hidden_state, mask, sequences, n, copy)
        batch = input_ids.shape[0]
        sequences = sequences.view(batch, n, -1)
        log_probs = log_probs.view(batch, n)
        order = log_probs.argsort(dim=1, descending=True, stable=True)
        return GeneratedAnswers(
            sequences=sequences.gather(1, order[..., None].expand_as(sequences)),
            log_probs=log_probs.gather(1, order),
        )

    def sequence_log_probs(
        self,
        encoder_states: torch.Tensor,
        mask: torch.Tensor,
        sequences: torch.Tensor,
        n: int = 1,
        copy_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B*n,) log-probability of generated ``sequences`` (decoder start first):
        the sum of their tokens' log-probabilities up to and including the first
        ``</s>``, from one teacher-forced decoder pass."""
        labels = sequences[:, 1:].clone()
        eos = self.t5.config.eos_token_id
        is_eos = labels == eos
        # Positions after the first </s> are padding.
        after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
        labels[after] = IGNORE_INDEX
        out = self.t5(
            encoder_outputs=BaseModelOutput(
                last_hidden_state=encoder_states.repeat_interleave(n, dim=0)
            ),
            attention_mask=mask.repeat_interleave(n, dim=0),
            labels=labels,
            return_dict=True,
            **({"copy_ids": copy_ids.repeat_interleave(n, dim=0)} if copy_ids is not None else {}),
        )
        logp = F.log_softmax(out.logits.float(), dim=-1)
        keep = labels != IGNORE_INDEX
        token = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (token * keep).sum(dim=1)


def _checkpoint_t5_config(name: str) -> dict:
    """The config dict of a T5 checkpoint (a hub name or a local folder)."""
    try:
        cfg = AutoConfig.from_pretrained(name)
    except OSError as err:
        raise ConfigError(
            f"cannot load t5_backbone {name!r}: {str(err).splitlines()[0]} (use 'scratch' "
            "to train a small T5 from scratch, or a T5 checkpoint name or folder)"
        ) from None
    if cfg.model_type not in {"t5", "mt5"}:  # umt5: a bias table per layer, not T5's layout
        raise ConfigError(
            f"t5_backbone {name!r} is a {cfg.model_type!r} model; expected a T5 or mT5 checkpoint"
        )
    return cfg.to_dict()


AutoModel.register(GenerativeReaderConfig, GenerativeReaderModel, exist_ok=True)
