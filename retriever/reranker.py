"""The cross-attention re-ranker: IMRAM-style iterative matching of regions and words.

A dual encoder compares one vector per image with one per caption; the re-ranker
compares an image's region (or patch) features with a caption's word features, for
the few captions the knowledge index returned (the top-N), and re-orders them.

Following IMRAM (Chen et al., CVPR 2020, "IMRAM: Iterative Matching with Recurrent
Attention Memory for Cross-Modal Image-Text Retrieval"), with regions ``v_1..v_R``
(the retriever's image-tower tokens, projected) and words ``w_1..w_L`` (the
re-ranker's text encoder):

* **Cross-modal attention**: for queries ``q_i`` and context ``u_j``,
  ``s_ij = cos(q_i, u_j)``, ``α_ij = softmax_j(λ s_ij)`` and the attended context
  ``c_i = Σ_j α_ij u_j``. With ``attention_norm: queries``, SCAN's form instead:
  ``s_ij = LeakyReLU_0.1(cos(q_i, u_j))`` normalised over the queries,
  ``s̄_ij = s_ij / sqrt(Σ_i s_ij²)``, ``α_ij = softmax_j(λ s̄_ij)``. That
  normalisation divides by ~sqrt(number of queries): with an image tower's grid
  (16–64 tokens, not SCAN's 36 object regions) the attention over words is nearly
  uniform and the model hardly learns (a fixed batch of three images: the loss
  stayed at ln 3 over 60 steps, and fell to 0.002 without it), so the default is
  ``none``.
* **Step score**: ``F_k = mean_i cos(q_i^k, c_i^k)``.
* **Recurrent attention memory** (the query refined between steps):
  ``g = σ(W_g [q; c] + b_g)``, ``o = tanh(W_o [q; c] + b_o)``,
  ``q^{k+1} = g ⊙ q^k + (1 − g) ⊙ o``.
* **Score**: ``S = Σ_k F_k`` per direction; ``directions: both`` sums the
  text-to-image (words query regions) and image-to-text (regions query words)
  scores, IMRAM's full model.

The logit the re-ranker orders by is ``exp(logit_scale) · S``, or, with
``fuse_retrieval_score``, ``w · retrieval_score / c + α · exp(logit_scale) · S`` (``w``
and ``α`` learned, ``w`` starting at 1 and ``α`` at 0; ``c`` the typical spread of the
retriever's top-N scores, measured when training starts): the re-ranker starts as the dual encoder's
order and corrects it as far as ``S`` earns it, instead of discarding what the dual
encoder knew. Training
(:mod:`rvqa.retriever.rerank_train`) is a listwise softmax over one positive and
hard negatives mined from the dual encoder's own top-N, ``−log Σ_pos softmax``, of
the fused logits plus (when fused) of the scaled matching score alone, so that
``S`` learns to rank by itself rather than leaving the work to the retrieval score.

The re-ranker belongs to one retriever: it reads that retriever's image-tower
features, tokenizer and word vectors, and records the retriever's fingerprint
(:meth:`RerankerModel.check_retriever` refuses another one).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from rvqa.config import RerankerSettings, model_options
from rvqa.errors import ConfigError, IndexMismatchError, UsageError
from rvqa.towers import KeepsFrozenOnLoad, hidden_size_of, tensor_state_key

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
DEFAULT_CAPTION_CACHE = 4096
"""Captions whose word features :meth:`RerankerModel.score` keeps, on the model's device
(at the default width 8 KB for a 16-token caption, 16 KB at 32 tokens: 30–64 MB)."""
DIRECTIONS = ("both", "t2i", "i2t")
ATTENTION_NORMS = ("none", "queries")
_S = RerankerSettings


class RerankerConfig(PretrainedConfig):
    """Configuration of :class:`RerankerModel` (defaults: :class:`rvqa.config.RerankerSettings`).

    Args:
        vision_hidden_size: Width of the retriever's image-tower tokens (the regions).
        vocab_size: The retriever tokenizer's vocabulary (the word vectors' rows).
        word_dim: Width of the word vectors (the retriever's text-tower input embeddings).
        hidden_size: Width of the matching space.
        num_steps: Matching steps K (IMRAM).
        directions: ``"both"``, ``"t2i"`` (words attend over regions) or ``"i2t"``.
        attention_lambda: Inverse temperature λ of the attention softmax.
        attention_norm: ``"none"`` or ``"queries"`` (SCAN's normalisation over the queries).
        text_layers: Transformer layers over the word vectors (0: none).
        num_heads: Attention heads of those layers.
        dropout: Dropout of the text encoder.
        freeze_word_embeddings: Keep the word vectors fixed.
        fuse_retrieval_score: Add ``w · retrieval score`` (``w`` learned) to the logit.
        max_caption_length: Tokens per caption (positions).
        pad_token_id: The tokenizer's padding id.
        retriever_fingerprint: The fingerprint of the retriever it was trained for.
        retriever_metric: That retriever's index metric (``inner_product`` / ``hamming``).
        retrieval_score_scale: The typical spread of the retriever's scores within an
            image's top-N (training sets it: the median over the training images of the
            standard deviation of their top-N scores); fused scores are divided by it,
            so ``w`` starts at a useful size whatever the retriever (a VSE++ retriever's
            top-50 cosines spread by a standard deviation of 0.0003 in the benchmark).
    """

    model_type = "rvqa-reranker"

    def __init__(
        self,
        vision_hidden_size: int = 128,
        vocab_size: int = 30522,
        word_dim: int = 384,
        hidden_size: int = _S.hidden_size,
        num_steps: int = _S.num_steps,
        directions: str = _S.directions,
        attention_lambda: float = _S.attention_lambda,
        attention_norm: str = _S.attention_norm,
        text_layers: int = _S.text_layers,
        num_heads: int = _S.num_heads,
        dropout: float = _S.dropout,
        freeze_word_embeddings: bool = _S.freeze_word_embeddings,
        fuse_retrieval_score: bool = _S.fuse_retrieval_score,
        max_caption_length: int = _S.max_caption_length,
        pad_token_id: int = 0,
        retriever_fingerprint: str = "",
        retriever_metric: str = "inner_product",
        retrieval_score_scale: float = 1.0,
        **kwargs: Any,
    ):
        for name, value, low in (
            ("vision_hidden_size", vision_hidden_size, 1),
            ("vocab_size", vocab_size, 1),
            ("word_dim", word_dim, 1),
            ("hidden_size", hidden_size, 1),
            ("num_steps", num_steps, 1),
            ("text_layers", text_layers, 0),
            ("num_heads", num_heads, 1),
            ("max_caption_length", max_caption_length, 2),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"reranker.{name} must be an integer ≥ {low}, got {value!r}")
        if directions not in DIRECTIONS:
            raise ConfigError(
                f"reranker.directions must be one of {', '.join(DIRECTIONS)}, got {directions!r}"
            )
        if text_layers and hidden_size % num_heads:
            raise ConfigError(
                f"reranker.hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})"
            )
        if attention_norm not in ATTENTION_NORMS:
            raise ConfigError(
                f"reranker.attention_norm must be one of {', '.join(ATTENTION_NORMS)}, "
                f"got {attention_norm!r}"
            )
        if not (isinstance(attention_lambda, (int, float)) and attention_lambda > 0):
            raise ConfigError(f"reranker.attention_lambda must be > 0, got {attention_lambda!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ConfigError(f"reranker.dropout must be in [0, 1), got {dropout!r}")
        self.vision_hidden_size = vision_hidden_size
        self.vocab_size = vocab_size
        self.word_dim = word_dim
        self.hidden_size = hidden_size
        self.num_steps = num_steps
        self.directions = directions
        self.attention_lambda = float(attention_lambda)
        self.attention_norm = attention_norm
        self.text_layers = text_layers
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.freeze_word_embeddings = bool(freeze_word_embeddings)
        self.fuse_retrieval_score = bool(fuse_retrieval_score)
        self.max_caption_length = max_caption_length
        self.retriever_fingerprint = retriever_fingerprint
        self.retriever_metric = retriever_metric
        if not (isinstance(retrieval_score_scale, (int, float)) and retrieval_score_scale > 0):
            raise ConfigError(
                f"reranker.retrieval_score_scale must be > 0, got {retrieval_score_scale!r}"
            )
        self.retrieval_score_scale = float(retrieval_score_scale)
        super().__init__(pad_token_id=pad_token_id, **kwargs)


AutoConfig.register("rvqa-reranker", RerankerConfig, exist_ok=True)


@dataclass
class RerankerOutput(ModelOutput):
    """Output of :meth:`RerankerModel.forward`.

    Attributes:
        loss: Listwise softmax cross-entropy over each image's candidates (with ``labels``).
        logits: (B, M) what candidates are ordered by (scaled matching score, plus the
            weighted retrieval score when fused).
        match_scores: (B, M) the matching score ``S`` (sum over steps and directions).
        step_scores: (B, M, K) each step's score, directions summed.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    match_scores: torch.FloatTensor | None = None
    step_scores: torch.FloatTensor | None = None


class MemoryUnit(nn.Module):
    """IMRAM's recurrent attention memory: ``q' = g ⊙ q + (1 − g) ⊙ tanh(W_o [q; c])``,
    ``g = σ(W_g [q; c])``."""

    def __init__(self, d: int):
        super().__init__()
        self.gate = nn.Linear(2 * d, d)
        self.update = nn.Linear(2 * d, d)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        both = torch.cat([query, context], dim=-1)
        g = torch.sigmoid(self.gate(both))
        return g * query + (1 - g) * torch.tanh(self.update(both))

    def split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weights acting on the query and on the context, gate and update stacked,
        the update's doubled: ``(W_q, W_c, b)`` of shapes (2d, d), (2d, d), (2d,) with
        ``W_q q + W_c c + b = [gate([q; c]); 2 · update([q; c])]`` (what
        :func:`_memory_update` reads: ``tanh(x) = 2σ(2x) − 1``, and one sigmoid over both
        halves is several times cheaper than ``tanh`` on CPU)."""
        d = self.gate.out_features
        w = torch.cat([self.gate.weight, 2 * self.update.weight], dim=0)  # (2d, 2d)
        return w[:, :d], w[:, d:], torch.cat([self.gate.bias, 2 * self.update.bias])


def _memory_update(
    source: torch.Tensor,
    query: torch.Tensor,
    context_projection: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    per_image: tuple[int, int] | None = None,
) -> torch.Tensor:
    """:class:`MemoryUnit`'s update from the projected attended context ``W_c c`` (the
    weights of :meth:`MemoryUnit.split`): ``z = W_q q + b + W_c c``, ``s = σ(z)``,
    ``q' = s_gate ⊙ q + (1 − s_gate) ⊙ (2 s_update − 1)``.

    ``source`` is the query before any expansion; with ``per_image = (B, M)`` it is one
    (B, 1, R, d) row per image, projected once and broadcast over its M candidates.
    """
    w_q, _, bias = weights
    z = F.linear(source, w_q, bias)
    if per_image is not None:
        b, m = per_image
        z = (z + context_projection.view(b, m, *context_projection.shape[1:])).view(
            context_projection.shape
        )
    else:
        z = z + context_projection
    g, h = torch.sigmoid(z).chunk(2, dim=-1)
    return g * query + (1 - g) * (2 * h - 1)


def _listwise_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """``−log Σ_pos softmax(logits)`` per image (the positives' share), averaged."""
    logits = logits.float()
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
    return (log_all - log_pos).mean()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(P, Q) → (P,): the mean over valid positions."""
    m = mask.to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class CaptionCache:
    """The word features of the last ``size`` distinct captions scored (least recently
    used dropped first), valid for one state of the text side's weights: :meth:`check`
    empties it when its key (the weights' identities and in-place versions, device, dtype,
    autocast) changes. Thread-safe; a copy of it (``copy.deepcopy`` of the model) starts
    empty."""

    def __init__(self, size: int):
        self.size = size
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._key: Any = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict:
        return {"size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"])

    def check(self, key: Any) -> None:
        with self._lock:
            if key != self._key:
                self._entries.clear()
                self._key = key

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._key = None

    def get(self, texts: Sequence[str]) -> list[torch.Tensor | None]:
        with self._lock:
            out = []
            for t in texts:
                f = self._entries.get(t)
                if f is not None:
                    self._entries.move_to_end(t)
                out.append(f)
            found = sum(f is not None for f in out)
            self.hits += found
            self.misses += len(out) - found
            return out

    def put(self, key: Any, features: dict[str, torch.Tensor]) -> None:
        """Store ``features`` computed under ``key`` (dropped if the weights moved since)."""
        with self._lock:
            if key != self._key:
                return
            for t, f in features.items():
                self._entries[t] = f
                self._entries.move_to_end(t)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


class RerankerModel(KeepsFrozenOnLoad, PreTrainedModel):
    """Scores (image, caption) candidates by iterative cross-attention (see the module doc).

    The tokenizer (the retriever's) rides along like the retriever's:
    ``save_pretrained`` writes it and ``from_pretrained`` restores it, so
    :meth:`score` works on a loaded model.
    """

    config_class = RerankerConfig
    base_model_prefix = "reranker"
    main_input_name = "image_tokens"
    _no_split_modules: list[str] = []

    def __init__(self, config: RerankerConfig):
        super().__init__(config)
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.word_dim, padding_idx=config.pad_token_id
        )
        self.word_projection = nn.Linear(config.word_dim, d)
        self.positions = nn.Embedding(config.max_caption_length, d)
        self.text_encoder = None
        if config.text_layers:
            layer = nn.TransformerEncoderLayer(
                d,
                config.num_heads,
                2 * d,
                config.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.text_encoder = nn.TransformerEncoder(
                layer, config.text_layers, enable_nested_tensor=False
            )
        self.text_norm = nn.LayerNorm(d)
        self.region_projection = nn.Sequential(
            nn.LayerNorm(config.vision_hidden_size), nn.Linear(config.vision_hidden_size, d)
        )
        self.directions = ("t2i", "i2t") if config.directions == "both" else (config.directions,)
        # one memory per direction, refining its queries between steps (none with one step:
        # parameters without a gradient would stop a multi-process run)
        self.memories = nn.ModuleDict(
            {k: MemoryUnit(d) for k in self.directions} if config.num_steps > 1 else {}
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        # fused: w · retrieval score + α · exp(logit_scale) · S, α starting at 0 (the
        # re-ranker starts as the dual encoder's order and departs from it as S learns)
        self.fuse_weight = None
        if config.fuse_retrieval_score:
            self.fuse_weight = nn.Parameter(torch.tensor(1.0))
            self.match_gate = nn.Parameter(torch.tensor(0.0))
        self.tokenizer: Any = None
        self.caption_cache: CaptionCache | None = None
        self.set_caption_cache(DEFAULT_CAPTION_CACHE)
        self.post_init()
        self.apply_freezing()

    def set_caption_cache(self, size: int) -> None:
        """Keep the word features of the last ``size`` distinct captions :meth:`score` saw
        (0: none). A caption scored again (a popular fact, the same caption under many
        images) then skips tokenising and the text encoder; the scores are those of
        encoding it afresh. Emptied when the model moves or changes dtype, and checked
        at every call against the text side's weights (their identities, storage and
        in-place versions: an optimiser step or ``load_state_dict`` empties it)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise UsageError(f"caption cache size must be an integer ≥ 0, got {size!r}")
        self.caption_cache = CaptionCache(size) if size else None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # .to(), .half(), .cuda(): cached features would stay behind (memory, precision)
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "caption_cache", None) is not None:
            self.caption_cache.clear()
        return out

    def apply_freezing(self) -> None:
        """Fix the word vectors when the config says so."""
        self.word_embeddings.weight.requires_grad_(not self.config.freeze_word_embeddings)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_retriever(
        cls, retriever: Any, settings: Any | None = None, **overrides: Any
    ) -> RerankerModel:
        """A re-ranker for ``retriever`` (a :class:`~rvqa.retriever.modeling.RetrieverModel`).

        Its region width, tokenizer and word vectors (the retriever text tower's input
        embeddings, copied) come from ``retriever``; its fingerprint is recorded.
        ``settings``: a :class:`rvqa.config.RerankerSettings` (or any object with some
        of its fields); ``overrides`` win over it.

        Raises:
            UsageError: The retriever has no tokenizer, or its text tower exposes no
                input embeddings.
        """
        opts = model_options(
            settings,
            RerankerSettings,
            RerankerConfig,
            overrides,
            filled_keys=(
                "vision_hidden_size",
                "vocab_size",
                "word_dim",
                "pad_token_id",
                "retriever_fingerprint",
                "retriever_metric",
            ),
            what="reranker",
        )
        if retriever.tokenizer is None:
            raise UsageError(
                "the retriever has no tokenizer attached; load it with from_pretrained"
            )
        words = retriever.text_model.get_input_embeddings()
        if words is None:
            raise UsageError("the retriever's text tower exposes no input embeddings")
        tok = retriever.tokenizer
        config = cls.config_class(
            vision_hidden_size=hidden_size_of(retriever.config.vision_config),
            vocab_size=words.weight.shape[0],
            word_dim=words.weight.shape[1],
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            retriever_fingerprint=retriever.fingerprint(),
            retriever_metric=retriever.index_metric,
            **opts,
        )
        model = cls(config)
        with torch.no_grad():
            model.word_embeddings.weight.copy_(words.weight.detach().float().cpu())
        model.tokenizer = tok
        return model

    def check_retriever(self, fingerprint: str, where: str = "") -> None:
        """Refuse a retriever other than the one this re-ranker was trained for.

        Raises:
            IndexMismatchError: The fingerprints differ (both named).
        """
        mine = self.config.retriever_fingerprint
        if mine != fingerprint:
            at = f" ({where})" if where else ""
            raise IndexMismatchError(
                f"the re-ranker{at} was trained for retriever {mine or 'unknown'} but the "
                f"retriever in use is {fingerprint}: train a re-ranker for this retriever "
                "(rvqa train-reranker)"
            )

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Save weights (safetensors), config and tokenizer."""
        super().save_pretrained(save_directory, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """Load a saved re-ranker (with its tokenizer).

        Raises:
            FileNotFoundError: The folder lacks a file it needs (named).
        """
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(f"re-ranker folder {path} does not exist")
        missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"re-ranker folder {path} is missing {', '.join(missing)} "
                f"(expected {', '.join(REQUIRED_FILES)})"
            )
        out = super().from_pretrained(path, *args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        model.tokenizer = AutoTokenizer.from_pretrained(path)
        return out

    # ------------------------------------------------------------------ scoring

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(P, L) tokens → (P, L, d) word features."""
        length = input_ids.shape[1]
        if length > self.config.max_caption_length:
            raise UsageError(
                f"captions of {length} tokens; the re-ranker reads at most "
                f"{self.config.max_caption_length} (tokenise with truncation)"
            )
        pos = torch.arange(length, device=input_ids.device)
        if torch.is_grad_enabled() or self.training:
            words = self.word_projection(self.word_embeddings(input_ids))
        else:  # inference: rows of the projected table (the same values, fewer products)
            words = F.embedding(input_ids, self._projected_words())
        x = words + self.positions(pos)
        if self.text_encoder is not None:
            x = self.text_encoder(x, src_key_padding_mask=~attention_mask.bool())
        return self.text_norm(x)

    def _projected_words(self) -> torch.Tensor:
        """``word_projection(word_embeddings.weight)``, computed once and kept while the
        weights, their device and dtype are unchanged (their in-place version counters
        move with every optimiser step)."""
        w, proj = self.word_embeddings.weight, self.word_projection
        key = (w.device, w.dtype, w._version, proj.weight._version, proj.bias._version)
        cached = self.__dict__.get("_word_table")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, proj(w))
            self.__dict__["_word_table"] = cached
        return cached[1]

    def _text_key(self) -> tuple:
        """The state of everything :meth:`encode_text` reads (in-place version counters
        move with every optimiser step) and the autocast it would run under."""
        mods = [self.word_embeddings, self.word_projection, self.positions, self.text_norm]
        if self.text_encoder is not None:
            mods.append(self.text_encoder)
        kind = self.word_embeddings.weight.device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return (autocast, tensor_state_key(*mods))

    def encode_captions(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → (P, L, d) word features and (P, L) bool mask; in inference (no
        gradient, eval mode) through the caption cache: only the captions it does not
        hold are tokenised and encoded. Padding positions are zeros."""
        cache = self.caption_cache
        if torch.is_grad_enabled() or self.training:
            cache = None  # features with a graph, or dropout's: not for keeping
        key = self._text_key() if cache is not None else None
        found: list[torch.Tensor | None] = [None] * len(texts)
        if cache is not None:
            cache.check(key)
            found = cache.get(texts)
        missing = list(dict.fromkeys(t for t, f in zip(texts, found) if f is None))
        if missing:
            enc = self.tokenize(missing)
            mask = enc["attention_mask"].to(self.device).bool()
            words = self.encode_text(enc["input_ids"].to(self.device), mask)
            if getattr(self.tokenizer, "padding_side", "right") == "right":
                lengths = enc["attention_mask"].sum(1).tolist()  # no device sync per caption
                new = {t: words[i, :n] for i, (t, n) in enumerate(zip(missing, lengths))}
            else:
                new = {t: words[i][mask[i]] for i, t in enumerate(missing)}
            if cache is not None:
                cache.put(key, new)
            found = [new[t] if f is None else f for t, f in zip(texts, found)]
        lengths = torch.tensor([len(f) for f in found], device=self.device)
        feats = nn.utils.rnn.pad_sequence(found, batch_first=True)  # type: ignore[arg-type]
        mask = torch.arange(feats.shape[1], device=self.device) < lengths[:, None]
        return feats, mask

    def encode_regions(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, R, H) retriever image-tower tokens → (B, R, d) region features."""
        if image_tokens.ndim != 3 or image_tokens.shape[-1] != self.config.vision_hidden_size:
            raise UsageError(
                f"image_tokens must have shape (B, R, {self.config.vision_hidden_size}), got "
                f"{tuple(image_tokens.shape)}"
            )
        return self.region_projection(image_tokens.to(self.dtype))

    def match(
        self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, R, d) regions, (B, M, L, d) words of each image's M candidates and their
        (B, M, L) mask → (B, M, K) step scores (directions summed).

        The formulas of the module doc, computed so that what one image's candidates
        share is computed once:

        * the memory unit's ``W [q; c]`` is split as ``W_q q + W_c c``; attention is
          linear in its context, so ``W_c c = Σ_j α_ij (W_c u_j)``: the context's
          projection is computed once per forward (per image for the regions, per
          caption for the words) and attended together with the context, instead of
          projecting every attended vector at every step;
        * the words of all M candidates attend over their image's regions in one
          product per image, and the regions' first-step queries (the same for every
          candidate) are projected once per image.
        """
        b, m, length, d = words.shape
        r = regions.shape[1]
        p = b * m
        lam, norm = self.config.attention_lambda, self.config.attention_norm
        k_steps = self.config.num_steps
        mask = word_mask.bool()
        flat_words, flat_mask = words.reshape(p, length, d), mask.reshape(p, length)
        memory = {k: self.memories[k].split() for k in self.directions} if k_steps > 1 else {}

        def projection(direction: str, context: torch.Tensor) -> torch.Tensor | None:
            # W_c u per context vector: attending over it gives W_c c
            return context @ memory[direction][1].T if direction in memory else None

        steps: list[torch.Tensor] = []
        # t2i (words query their image's regions): (B, M·L, d) queries, (B, R, ·) context
        q_t2i = words.reshape(b, m * length, d)
        regions_unit = F.normalize(regions, dim=-1)
        regions_proj = projection("t2i", regions)
        # i2t (regions query each candidate's words): (P, R, d) queries, (P, L, ·) context
        q_i2t = regions  # (B, R, d) until the first update makes it per candidate
        words_unit = F.normalize(flat_words, dim=-1)
        words_proj = projection("i2t", flat_words)
        for k in range(k_steps):
            last = k + 1 == k_steps
            # summed in float32 (under bf16 autocast the cosines would round together)
            total = torch.zeros(b, m, dtype=torch.float32, device=words.device)
            if "t2i" in self.directions:
                sim = torch.bmm(F.normalize(q_t2i, dim=-1), regions_unit.transpose(1, 2))
                if norm == "queries":  # over each candidate's words (its queries)
                    sim = F.leaky_relu(sim, 0.1).view(b, m, length, r) * mask.unsqueeze(-1)
                    sim = sim / sim.norm(dim=2, keepdim=True).clamp(min=1e-8)
                    sim = sim.view(b, m * length, r)
                attn = (lam * sim).softmax(dim=-1)
                c = torch.bmm(attn, regions)  # (B, M·L, d)
                cos = F.cosine_similarity(q_t2i, c, dim=-1).float().view(p, length)
                total = total + _masked_mean(cos, flat_mask).view(b, m)
                if not last:
                    c_proj = torch.bmm(attn, regions_proj)
                    q_t2i = _memory_update(q_t2i, q_t2i, c_proj, memory["t2i"])
            if "i2t" in self.directions:
                q = q_i2t if k else q_i2t.unsqueeze(1).expand(b, m, r, d).reshape(p, r, d)
                sim = torch.bmm(F.normalize(q, dim=-1), words_unit.transpose(1, 2))  # (P, R, L)
                if norm == "queries":
                    sim = F.leaky_relu(sim, 0.1)
                    sim = sim / sim.norm(dim=1, keepdim=True).clamp(min=1e-8)
                sim = (lam * sim).masked_fill(~flat_mask.unsqueeze(1), float("-inf"))
                attn = sim.softmax(dim=-1)
                c = torch.bmm(attn, flat_words)  # (P, R, d)
                cos = F.cosine_similarity(q, c, dim=-1).float()
                total = total + cos.mean(dim=1).view(b, m)
                if not last:
                    c_proj = torch.bmm(attn, words_proj)
                    # the first step's queries are the image's regions: projected once per image
                    if k:
                        q_i2t = _memory_update(q, q, c_proj, memory["i2t"])
                    else:
                        q_i2t = _memory_update(q_i2t.unsqueeze(1), q, c_proj, memory["i2t"], (b, m))
            steps.append(total)
        return torch.stack(steps, dim=-1)

    def forward(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        retrieval_scores: torch.Tensor | None = None,
        candidate_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        word_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RerankerOutput:
        """Score each image's candidate captions.

        Args:
            image_tokens: (B, R, H) the retriever image tower's tokens per image.
            input_ids / attention_mask: (B, M, L) each image's M candidate captions.
            retrieval_scores: (B, M) their retrieval scores (needed when fused).
            candidate_mask: (B, M) bool, False for padding candidates (scored -inf).
            labels: (B, M) bool/float, True for the positives: gives ``loss``.
            word_features: (B, M, L, d) the captions already encoded
                (:meth:`encode_captions`) instead of ``input_ids``; ``attention_mask``
                is their mask.
        """
        if attention_mask is None or (input_ids is None) == (word_features is None):
            raise UsageError("pass attention_mask and one of input_ids or word_features")
        if attention_mask.ndim != 3:
            raise UsageError(
                f"attention_mask must have shape (B, M, L), got {tuple(attention_mask.shape)}"
            )
        b, m, length = attention_mask.shape
        d = self.config.hidden_size
        if input_ids is not None and input_ids.shape != attention_mask.shape:
            raise UsageError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask "
                f"{tuple(attention_mask.shape)} differ in shape"
            )
        if word_features is not None and tuple(word_features.shape) != (b, m, length, d):
            raise UsageError(
                f"word_features must have shape {(b, m, length, d)} (the mask's (B, M, L) "
                f"and the hidden size), got {tuple(word_features.shape)}"
            )
        if image_tokens.shape[0] != b:
            raise UsageError(
                f"{image_tokens.shape[0]} images but candidates for {b}; one row per image"
            )
        regions = self.encode_regions(image_tokens)  # (B, R, d)
        mask = attention_mask.bool()
        if word_features is None:
            words = self.encode_text(input_ids.reshape(b * m, length), mask.reshape(b * m, length))
            word_features = words.view(b, m, length, -1)
        steps = self.match(regions, word_features.to(regions.dtype), mask)
        match = steps.sum(-1)
        # float32 even under bf16 autocast: the retrieval scores of one image's top N can
        # differ in their fourth digit, which bf16 would round away
        alone = self.logit_scale.exp() * match.float()
        logits = alone
        if self.fuse_weight is not None:
            if retrieval_scores is None:
                raise UsageError("this re-ranker fuses the retrieval scores: pass retrieval_scores")
            ret = retrieval_scores.float() / self.config.retrieval_score_scale
            logits = self.fuse_weight * ret + self.match_gate * alone
        if candidate_mask is not None:
            logits = logits.masked_fill(~candidate_mask.bool(), float("-inf"))
        loss = None
        if labels is not None:
            pos = labels.bool()
            if candidate_mask is not None:
                pos = pos & candidate_mask.bool()
            if not pos.any(dim=1).all():
                raise UsageError("labels: every image needs at least one positive candidate")
            loss = _listwise_loss(logits, pos)
            if self.fuse_weight is not None:
                # the matching score alone is trained to rank too: the fused logit starts
                # from the retrieval score (α = 0), so S learns from this term first
                if candidate_mask is not None:
                    alone = alone.masked_fill(~candidate_mask.bool(), float("-inf"))
                loss = loss + _listwise_loss(alone, pos)
        return RerankerOutput(loss=loss, logits=logits, match_scores=match, step_scores=steps)

    # ------------------------------------------------------------------ convenience

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise captions with the model's tokenizer (padding, truncation)."""
        if self.tokenizer is None:
            raise UsageError("this re-ranker has no tokenizer attached (set model.tokenizer)")
        return self.tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            max_length=self.config.max_caption_length,
            return_tensors="pt",
        )

    @torch.inference_mode()
    def score(
        self,
        image_tokens: torch.Tensor,
        captions: Sequence[Sequence[str]],
        retrieval_scores: Sequence[Sequence[float]] | None = None,
        max_pairs: int = 2048,
    ) -> list[np.ndarray]:
        """Re-ranking logits of each image's candidate captions (ragged lists).

        Args:
            image_tokens: (B, R, H) the retriever image tower's tokens (any device; moved
                to the model's).
            captions: Per image, its candidate captions (any number, 0 included).
            retrieval_scores: Per image, the candidates' retrieval scores (same shape).
            max_pairs: At most this many (image, caption) pairs per forward pass (memory
                is bounded by it, not by B × N).

        Returns:
            Per image, a float32 array of its candidates' logits (higher = better).
        """
        b = len(captions)
        if image_tokens.shape[0] != b:
            raise UsageError(f"{image_tokens.shape[0]} images but {b} caption lists")
        counts = [len(c) for c in captions]
        if self.fuse_weight is not None and any(counts):
            if retrieval_scores is None or [len(s) for s in retrieval_scores] != counts:
                raise UsageError("retrieval_scores: one score per candidate caption is needed")
        out: list[np.ndarray] = [np.zeros(0, dtype=np.float32) for _ in range(b)]
        was_training = self.training
        if was_training:
            self.eval()
        i = 0
        while i < b:  # images whose candidates fit max_pairs together (at least one image)
            j, pairs = i + 1, counts[i]
            while j < b and pairs + counts[j] <= max_pairs:
                pairs += counts[j]
                j += 1
            if any(counts[i:j]):
                scores = None if retrieval_scores is None else retrieval_scores[i:j]
                out[i:j] = self._score_chunk(image_tokens[i:j], captions[i:j], scores)
            i = j
        if was_training:
            self.train()
        return out

    def _score_chunk(
        self,
        image_tokens: torch.Tensor,
        captions: Sequence[Sequence[str]],
        retrieval_scores: Sequence[Sequence[float]] | None,
    ) -> list[np.ndarray]:
        counts = [len(c) for c in captions]
        feats, mask = self.encode_captions([c for caps in captions for c in caps])
        batch = candidate_layout(counts, retrieval_scores)
        dev = self.device
        words = by_image(feats, counts)
        word_mask = by_image(mask, counts)
        word_mask[..., 0] = True  # a padding candidate keeps one attended position
        logits = self(
            image_tokens.to(dev),
            attention_mask=word_mask,
            word_features=words,
            **{k: v.to(dev) for k, v in batch.items()},
        ).logits.float()
        logits = logits.cpu().numpy()
        return [logits[i, : len(c)].copy() for i, c in enumerate(captions)]


def by_image(flat: torch.Tensor, counts: Sequence[int], fill: Any = 0) -> torch.Tensor:
    """(P, ...) rows of per-image lists laid end to end → (B, M, ...), M the longest
    list, the rest filled with ``fill``."""
    return nn.utils.rnn.pad_sequence(flat.split(list(counts)), batch_first=True, padding_value=fill)


def candidate_layout(
    counts: Sequence[int], retrieval_scores: Sequence[Sequence[float]] | None
) -> dict[str, torch.Tensor]:
    """(B, M) ``candidate_mask`` and ``retrieval_scores`` of ragged per-image lists."""
    b, m = len(counts), max(counts)
    cand = torch.zeros((b, m), dtype=torch.bool)
    scores = torch.zeros((b, m), dtype=torch.float32)
    for i, n in enumerate(counts):
        cand[i, :n] = True
        if retrieval_scores is not None and n:
            scores[i, :n] = torch.as_tensor(
                np.asarray(retrieval_scores[i], dtype=np.float32), dtype=torch.float32
            )
    return {"retrieval_scores": scores, "candidate_mask": cand}


def pack_candidates(
    tokenizer: Any,
    captions: Sequence[Sequence[str]],
    retrieval_scores: Sequence[Sequence[float]] | None,
    max_length: int,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Ragged per-image candidate lists → the padded (B, M, L) inputs of
    :meth:`RerankerModel.forward` (``input_ids``, ``attention_mask``, ``retrieval_scores``,
    ``candidate_mask``): the layout of training batches (:meth:`~RerankerModel.score`
    lays out encoded captions the same way, :func:`by_image`). A padding candidate keeps
    one attended token (its logit is masked out)."""
    counts = [len(c) for c in captions]
    enc = tokenizer(
        [c for caps in captions for c in caps],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    mask = by_image(enc["attention_mask"], counts)
    mask[..., 0] = 1
    return {
        "input_ids": by_image(enc["input_ids"], counts, pad_token_id),
        "attention_mask": mask,
        **candidate_layout(counts, retrieval_scores),
    }


AutoModel.register(RerankerConfig, RerankerModel, exist_ok=True)
