"""The image-caption alignment model (DXR / VSE++ style dual encoder).

Two towers — any ``transformers`` vision model (or the small CNN) and any text
encoder (or the GCN over each caption's graph of words, ``text_tower="gcn"``) — each
followed by a projection into one ``embed_dim`` space where embeddings are
L2-normalised, so the inner product is the cosine similarity that the FAISS knowledge
index searches with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, PreTrainedModel
from transformers.utils import ModelOutput

from rvqa.config import RetrieverSettings, model_options
from rvqa.data.images import load_image
from rvqa.errors import ConfigError, UsageError
from rvqa.retriever import losses as L
from rvqa.retriever.configuration import GCN_TOWER_KEYS, RetrieverConfig, check_gcn_options
from rvqa.towers import (
    KeepsFrozenOnLoad,
    build_tower,
    drop_unused_heads,
    gcn_text_config_from_name,
    hidden_size_of,
    load_image_processor,
    load_tokenizer,
    load_tower_weights,
    text_config_from_name,
    vision_config_from_name,
)
from rvqa.training import VOLATILE_CONFIG_KEYS

logger = logging.getLogger(__name__)

REQUIRED_FILES = ("config.json", "model.safetensors")
PCME_INIT_SIGMA_NORM = 0.25  # the initial ‖σ‖ of a PCME embedding (its mean has norm 1)

# Options from_backbones takes (from a RetrieverSettings or as keyword arguments) besides
# the RetrieverConfig fields it does not fill itself.
_BUILD_KEYS = ("num_text_layers", "cnn_hidden_sizes")
_FILLED_KEYS = ("vision_config", "text_config")


@dataclass
class RetrieverOutput(ModelOutput):
    """Output of :meth:`RetrieverModel.forward`.

    Attributes:
        loss: The configured contrastive loss (when ``return_loss``).
        image_embeds: (B, D) L2-normalised image embeddings.
        text_embeds: (B, D) L2-normalised caption embeddings.
        loss_terms: Each term of the objective (unweighted, detached 0-d tensors).
        image_logsigma / text_logsigma: ``pcme``: (B, D) log standard deviations.
        image_codes / text_codes: ``hash``: (B, bits) tanh-relaxed codes.
    """

    loss: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    loss_terms: dict | None = None
    image_logsigma: torch.FloatTensor | None = None
    text_logsigma: torch.FloatTensor | None = None
    image_codes: torch.FloatTensor | None = None
    text_codes: torch.FloatTensor | None = None


def _head(d_in: int, d_out: int, kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))
    return nn.Linear(d_in, d_out)


class DiversifiedAttention(nn.Module):
    """K attention poolings of a tower's tokens (GPLDAN's diversified attention projector).

    Head k weighs the tokens by ``softmax_n(w_k · tanh(W x_n))`` (padding masked),
    pools them, projects the pooled feature to the embedding space and adds it to
    the global embedding (before normalisation), as PVSE does: K representations
    that share the global view and differ in what they attend to. The graph
    pattern loss keeps them diverse.
    """

    def __init__(self, hidden: int, heads: int, embed_dim: int):
        super().__init__()
        attn = max(1, hidden // 2)
        self.key = nn.Linear(hidden, attn)
        self.query = nn.Linear(attn, heads, bias=False)
        self.proj = nn.Linear(hidden, embed_dim)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None, global_emb: torch.Tensor
    ) -> torch.Tensor:
        """(B, N, H) tokens, (B, N) mask or None, (B, D) global → (B, K, D) normalised."""
        scores = self.query(torch.tanh(self.key(tokens)))  # (B, N, K)
        if mask is not None:
            scores = scores.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
        weights = scores.softmax(dim=1)  # over tokens
        pooled = torch.einsum("bnk,bnh->bkh", weights, tokens)
        return F.normalize(global_emb.unsqueeze(1) + self.proj(pooled), dim=-1)


class RetrieverModel(KeepsFrozenOnLoad, PreTrainedModel):
    """Image tower + text tower → shared L2-normalised space.

    ``tokenizer`` and ``image_processor`` ride along: ``save_pretrained`` writes
    them into the same folder and ``from_pretrained`` restores them, so the
    convenience methods :meth:`embed_texts` / :meth:`embed_images` work on a
    loaded model with no extra set-up.
    """

    config_class = RetrieverConfig
    base_model_prefix = "retriever"
    main_input_name = "pixel_values"
    _no_split_modules: list[str] = []

    def __init__(self, config: RetrieverConfig):
        super().__init__(config)
        if not config.vision_config or not config.text_config:
            raise ConfigError(
                "RetrieverConfig needs vision_config and text_config dicts; build one with "
                "RetrieverModel.from_backbones(...) or rvqa.towers.*_config_from_name"
            )
        self.vision_model = build_tower(config.vision_config)
        self.text_model = build_tower(config.text_config)
        # Drop heads this model never reads (their weights would get no gradient).
        drop_unused_heads(self.text_model, pooled=False)
        drop_unused_heads(self.vision_model, pooled=config.vision_pooling == "pooled")
        self.vision_projection = _head(
            hidden_size_of(config.vision_config), config.embed_dim, config.projection
        )
        self.text_projection = _head(
            hidden_size_of(config.text_config), config.embed_dim, config.projection
        )
        # log(1/T), learned (InfoNCE only; unused by the hinge losses).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        # Training forward passes so far (drives max_violation_warmup; saved with the model).
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # The objective's heads draw their initial weights from a forked RNG: the rest of
        # the model (projections included) starts as it would under any other objective
        # with the same seed.
        with torch.random.fork_rng(devices=[]):
            self._build_objective_heads(config)
        self.tokenizer: Any = None
        self.image_processor: Any = None
        self.post_init()
        self.apply_freezing()

    def _build_objective_heads(self, config: RetrieverConfig) -> None:
        """The heads and parameters the objective's terms need (none for the VSE/InfoNCE
        losses, so those models are what they always were)."""
        terms = config.loss_terms
        d = config.embed_dim
        hv, ht = hidden_size_of(config.vision_config), hidden_size_of(config.text_config)
        if "pcme" in terms:
            # log σ heads beside the mean heads (PCME: a separate branch of the same features)
            self.vision_logsigma = _head(hv, d, config.projection)
            self.text_logsigma = _head(ht, d, config.projection)
            self.pcme_scale = nn.Parameter(torch.tensor(float(config.pcme_init_scale)))
            self.pcme_shift = nn.Parameter(torch.tensor(float(config.pcme_init_shift)))
        if "center" in terms:
            if not config.class_names:
                raise ConfigError(
                    "loss term 'center' needs class_names (the semantic categories of the "
                    "training captions): rvqa train-retriever sets them from the captions' "
                    "labels; in Python pass class_names=[...] to from_backbones"
                )
            c = len(config.class_names)
            self.class_centers = nn.Parameter(F.normalize(torch.randn(c, d), dim=-1))
            # Jing et al.'s shared head: Linear-ReLU-Linear (their 512 → 256 → C)
            self.class_head = nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, c))
        if "gpl" in terms:
            self.vision_attention = DiversifiedAttention(hv, config.gpl_heads, d)
            self.text_attention = DiversifiedAttention(ht, config.gpl_heads, d)
        if "modality" in terms:
            half = max(1, d // 2)
            self.modality_head = nn.Sequential(nn.Linear(d, half), nn.ReLU(), nn.Linear(half, 1))
        if "hash" in terms:
            self.vision_hash = nn.Linear(d, config.hash_bits)
            self.text_hash = nn.Linear(d, config.hash_bits)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and any(module is m for m in self._projection_modules()):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
            if any(module is m for m in self._logsigma_outputs()):
                # σ = 0.25 / sqrt(D) per dimension at the start, so ‖σ‖ = 0.25 beside the
                # unit-norm mean: samples are noisy but the means still show through
                # (σ = 1 would put every sample ~sqrt(2D) from every other)
                sigma = PCME_INIT_SIGMA_NORM / math.sqrt(self.config.embed_dim)
                nn.init.constant_(module.bias, math.log(sigma))

    def _projection_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = []
        for name in ("vision_projection", "text_projection", "vision_logsigma", "text_logsigma"):
            head = getattr(self, name, None)
            if head is not None:
                mods.extend(m for m in head.modules() if isinstance(m, nn.Linear))
        return mods

    def _logsigma_outputs(self) -> list[nn.Module]:
        outs = []
        for name in ("vision_logsigma", "text_logsigma"):
            head = getattr(self, name, None)
            if head is not None:
                outs.append(head[-1] if isinstance(head, nn.Sequential) else head)
        return outs

    def apply_freezing(self) -> None:
        """(Un)freeze towers as the config says; projections always train."""
        for p in self.vision_model.parameters():
            p.requires_grad_(not self.config.freeze_vision)
        for p in self.text_model.parameters():
            p.requires_grad_(not self.config.freeze_text)
        if self.config.text_tower == "gcn":
            # its graph convolutions (and input LayerNorm) start from scratch: freeze_text
            # keeps only the pretrained word vectors fixed
            words = self.text_model.get_input_embeddings().weight
            for p in self.text_model.parameters():
                if p is not words:
                    p.requires_grad_(True)
        # Only InfoNCE uses the temperature; DDP refuses parameters that get no gradient.
        self.logit_scale.requires_grad_("infonce" in self.config.loss_terms)

    def train(self, mode: bool = True) -> RetrieverModel:
        """Like ``nn.Module.train``, but frozen towers stay in eval mode (no dropout,
        fixed BatchNorm statistics): a frozen tower is a fixed feature extractor (not the
        GCN text tower, whose graph convolutions train whatever ``freeze_text`` says)."""
        super().train(mode)
        if mode and self.config.freeze_vision:
            self.vision_model.eval()
        if mode and self.config.freeze_text and self.config.text_tower != "gcn":
            self.text_model.eval()
        return self

    # ------------------------------------------------------------------ building

    @classmethod
    def from_backbones(
        cls,
        settings: Any | None = None,
        *,
        load_weights: bool = True,
        **overrides: Any,
    ) -> RetrieverModel:
        """Build from named backbones, with their pretrained weights and processors.

        The same mechanism as :meth:`rvqa.reader.modeling.ReaderModel.from_backbones`
        (:func:`rvqa.config.model_options`); ``RetrieverModel.from_backbones(cfg.retriever)``
        is what ``rvqa train-retriever`` trains.

        Args:
            settings: A :class:`rvqa.config.RetrieverSettings` (or any object): its
                attributes named like an option below are used (training fields are
                not); ``None`` or a missing attribute = the ``RetrieverSettings``
                default (so the vse_max warm-up is on by default).
            load_weights: Load pretrained tower weights (False: random init, for tests).
            **overrides: Options that win over ``settings``: ``num_text_layers`` (keep
                the first N text layers), ``cnn_hidden_sizes`` (small CNN stages) and
                any :class:`RetrieverConfig` field except ``vision_config`` /
                ``text_config`` (e.g. ``vision_backbone``, ``text_backbone``, ``loss``,
                ``text_tower="gcn"`` with its ``gcn_*`` options: a GCN text tower whose
                word vectors are ``text_backbone``'s input embeddings).

        Raises:
            TypeError: An unknown override name (named), or ``settings`` given as a
                string (backbone names are keywords: ``vision_backbone="cnn"``).
            ValueError: A backbone that cannot be loaded, an invalid config value, or
                ``num_text_layers`` with the GCN text tower (its depth is ``gcn_layers``).
        """
        opts = model_options(
            settings,
            RetrieverSettings,
            RetrieverConfig,
            overrides,
            build_keys=_BUILD_KEYS,
            filled_keys=_FILLED_KEYS,
            what="retriever",
        )
        num_text_layers = opts.pop("num_text_layers")
        cnn_hidden_sizes = opts.pop("cnn_hidden_sizes")
        vision_backbone, text_backbone = opts["vision_backbone"], opts["text_backbone"]
        image_size = opts["image_size"]
        # The CNN's natural grid: the retriever pools the whole feature map anyway.
        vision_config = vision_config_from_name(vision_backbone, image_size, grid_size=None)
        if vision_config["model_type"] == "rvqa-small-cnn" and cnn_hidden_sizes is not None:
            vision_config["hidden_sizes"] = list(cnn_hidden_sizes)
            vision_config["hidden_size"] = cnn_hidden_sizes[-1]
        if opts["text_tower"] == "gcn":
            check_gcn_options({name: opts[name] for name in GCN_TOWER_KEYS})  # keys named
            if num_text_layers is not None:
                raise ConfigError(
                    f"num_text_layers={num_text_layers} truncates a transformer text tower; "
                    f"with text_tower 'gcn' set gcn_layers instead"
                )
            text_config = gcn_text_config_from_name(
                text_backbone,
                **{key: opts[name] for name, key in GCN_TOWER_KEYS.items()},
            )
        else:
            text_config = text_config_from_name(text_backbone, num_text_layers)
        config = RetrieverConfig(vision_config=vision_config, text_config=text_config, **opts)
        model = cls(config)
        if load_weights:
            load_tower_weights(model.vision_model, vision_backbone, text=False)
            load_tower_weights(model.text_model, text_backbone, text=True)
            model.apply_freezing()
        model.tokenizer = load_tokenizer(text_backbone)
        model.image_processor = load_image_processor(vision_backbone, image_size)
        return model

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Save weights (safetensors), config, tokenizer and image processor."""
        super().save_pretrained(save_directory, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """Load a saved retriever (with its tokenizer and image processor)."""
        path = Path(pretrained_model_name_or_path)
        if path.exists():
            if not path.is_dir():
                raise NotADirectoryError(f"retriever checkpoint must be a folder, got file {path}")
            missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"retriever checkpoint {path} is missing {', '.join(missing)} "
                    f"(expected {', '.join(REQUIRED_FILES)}, tokenizer and preprocessor files)"
                )
        out = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out  # output_loading_info=True
        if path.is_dir():
            if (path / "tokenizer_config.json").is_file():
                model.tokenizer = AutoTokenizer.from_pretrained(path)
            if (path / "preprocessor_config.json").is_file():
                model.image_processor = AutoImageProcessor.from_pretrained(path)
        return out

    # ------------------------------------------------------------------ encoding

    def _image_parts(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the objective reads of a batch of images (see :meth:`_parts`)."""
        out = self.vision_model(pixel_values=pixel_values)
        hidden = out.last_hidden_state
        tokens = hidden if hidden.ndim == 3 else hidden.flatten(2).transpose(1, 2)  # (B, N, H)
        pooling = self.config.vision_pooling
        if pooling == "pooled" and getattr(out, "pooler_output", None) is not None:
            feats = out.pooler_output.flatten(1)  # ResNet pools to (B, C, 1, 1)
        elif pooling == "cls":
            feats = tokens[:, 0]
        else:  # "mean", or a backbone without a pooler
            feats = tokens.mean(dim=1)
        parts = self._parts("image", feats, tokens, None)
        parts["tokens"] = tokens  # the regions / patches a re-ranker reads
        return parts

    def _text_parts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Everything the objective reads of a batch of captions (see :meth:`_parts`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        if self.config.text_pooling == "cls":
            feats = hidden[:, 0]
        else:  # masked mean over real tokens (sentence-transformers' pooling)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            feats = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self._parts("text", feats, hidden, attention_mask)

    def _parts(
        self, what: str, feats: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Pooled tower features → ``emb`` (B, D) L2-normalised; with ``gpl`` also
        ``multi`` (B, K, D) and ``emb`` their normalised mean; with ``pcme``
        ``logsigma`` (B, D); with ``hash`` ``codes`` (B, bits), tanh-relaxed."""
        side = "vision" if what == "image" else "text"
        raw = self._project(getattr(self, f"{side}_projection"), feats, what)
        parts: dict[str, torch.Tensor] = {}
        if hasattr(self, f"{side}_attention"):
            parts["multi"] = getattr(self, f"{side}_attention")(tokens, mask, raw)
            parts["emb"] = F.normalize(parts["multi"].mean(1), dim=-1)
        else:
            parts["emb"] = F.normalize(raw, dim=-1)
        if hasattr(self, f"{side}_logsigma"):
            parts["logsigma"] = self._project(getattr(self, f"{side}_logsigma"), feats, what)
        if hasattr(self, f"{side}_hash"):
            # The unit-norm embedding scaled to unit variance per entry: the hash layer's
            # default initialisation then gives pre-activations of order 1, not 1/sqrt(D)
            # (tanh would start in its linear range, far from the ±1 codes).
            scaled = parts["emb"] * math.sqrt(parts["emb"].shape[-1])
            parts["codes"] = torch.tanh(getattr(self, f"{side}_hash")(scaled))
        return parts

    def _retrieval_vector(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """What an index holds: the embedding, or a hashing retriever's ±1 code."""
        if "codes" in parts:
            return torch.where(parts["codes"] >= 0, 1.0, -1.0).to(parts["codes"].dtype)
        return parts["emb"]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, D) L2-normalised image embeddings (a hashing retriever:
        (B, bits) codes of ±1)."""
        return self._retrieval_vector(self._image_parts(pixel_values))

    def encode_texts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) token ids → (B, D) L2-normalised caption embeddings (a hashing
        retriever: (B, bits) codes of ±1)."""
        return self._retrieval_vector(self._text_parts(input_ids, attention_mask))

    @staticmethod
    def _project(head: nn.Module, feats: torch.Tensor, what: str) -> torch.Tensor:
        first = head[0] if isinstance(head, nn.Sequential) else head
        if feats.shape[-1] != first.in_features:
            raise ConfigError(
                f"the {what} tower outputs {feats.shape[-1]} features but the {what} projection "
                f"expects {first.in_features}; the tower config and the projection disagree"
            )
        return head(feats)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positive_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_loss: bool = True,
        **kwargs: Any,
    ) -> RetrieverOutput:
        """Embed a batch of (image, caption) pairs; row i of each is a positive pair.

        Args:
            positive_mask: (B, B) bool, True where image i and caption j also match
                (same image id or identical caption): excluded from the negatives.
            labels: (B,) class indices into ``config.class_names`` (-1: unknown), for
                the terms that read semantic categories (``center`` needs them;
                ``crcgs`` and ``support_set`` use them where known).
        """
        if self.training and self.config.augment:
            pixel_values = augment_pixels(pixel_values)
        im = self._image_parts(pixel_values)
        txt = self._text_parts(input_ids, attention_mask)
        loss = terms = None
        if return_loss:
            # In float32 even under bf16/fp16 autocast: a half-precision similarity matrix
            # and hinge sum would round the loss (and its gradient) to 2-3 digits.
            with torch.autocast(im["emb"].device.type, enabled=False):
                loss, terms = self._objective(
                    {k: v.float() for k, v in im.items() if k != "tokens"},  # no loss reads them
                    {k: v.float() for k, v in txt.items()},
                    positive_mask,
                    labels,
                )
        return RetrieverOutput(
            loss=loss,
            image_embeds=im["emb"],
            text_embeds=txt["emb"],
            loss_terms=terms,
            image_logsigma=im.get("logsigma"),
            text_logsigma=txt.get("logsigma"),
            image_codes=im.get("codes"),
            text_codes=txt.get("codes"),
        )

    def _objective(
        self,
        im: dict[str, torch.Tensor],
        txt: dict[str, torch.Tensor],
        positive_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The configured terms, each times its weight, summed."""
        cfg = self.config
        weights = cfg.loss_weights or {}
        b = im["emb"].shape[0]
        if positive_mask is not None:
            positive_mask = positive_mask.to(im["emb"].device)
        # hardest negatives (vse_max, gpl) only after the warm-up
        warming = bool(self.training and self.num_updates < cfg.max_violation_warmup)
        same = None  # the batch's same-category mask, built once for crcgs and support_set
        if any(t in ("crcgs", "support_set") for t in cfg.loss_terms):
            same = self._same_category(labels, positive_mask, b, im["emb"].device)
        values: dict[str, torch.Tensor] = {}
        for term in cfg.loss_terms:
            if term in ("vse_max", "vse_sum", "infonce"):
                name = "vse_sum" if term == "vse_max" and warming else term
                values[term] = L.retrieval_loss(
                    name,
                    im["emb"],
                    txt["emb"],
                    margin=cfg.margin,
                    logit_scale=self.logit_scale,
                    positive_mask=positive_mask,
                )
            elif term == "pcme":
                values[term] = L.pcme_loss(
                    im["emb"],
                    im["logsigma"],
                    txt["emb"],
                    txt["logsigma"],
                    self.pcme_scale,
                    self.pcme_shift,
                    num_samples=cfg.pcme_num_samples,
                    vib_beta=cfg.pcme_vib_beta,
                    positive_mask=positive_mask,
                )
            elif term == "center":
                y = self._class_labels(labels, b)
                values[term] = L.cross_modal_center_loss(
                    im["emb"],
                    txt["emb"],
                    y,
                    self.class_centers,
                    self.class_head(im["emb"]),
                    self.class_head(txt["emb"]),
                    center_weight=cfg.center_weight,
                    mse_weight=cfg.center_mse_weight,
                )
            elif term == "gpl":
                values[term] = L.graph_pattern_loss(
                    im["multi"],
                    txt["multi"],
                    margin=cfg.gpl_margin,
                    diversity_weight=cfg.gpl_diversity_weight,
                    max_violation=not warming,
                    positive_mask=positive_mask,
                )
            elif term == "modality":
                fi, ft = im.get("multi", im["emb"]), txt.get("multi", txt["emb"])
                if cfg.modality_adversarial:
                    fi, ft = L.grad_reverse(fi), L.grad_reverse(ft)
                values[term] = L.modality_loss(
                    self.modality_head(fi).squeeze(-1), self.modality_head(ft).squeeze(-1)
                )
            elif term == "crcgs":
                values[term] = L.crcgs_contrastive_loss(
                    im["emb"],
                    txt["emb"],
                    same,
                    temperature=cfg.crcgs_temperature,
                    positive_mask=positive_mask,
                )
            elif term == "support_set":
                values[term] = L.support_set_loss(
                    im["emb"],
                    txt["emb"],
                    same,
                    temperature=cfg.support_temperature,
                )
            elif term == "hash":
                values[term] = L.hash_loss(
                    im["codes"],
                    txt["codes"],
                    gamma=cfg.hash_gamma,
                    eta=cfg.hash_eta,
                    positive_mask=positive_mask,
                )
            elif term == "pairwise":
                values[term] = L.pairwise_similarity_loss(
                    im["emb"],
                    txt["emb"],
                    lam=cfg.pairwise_lambda,
                    margin=cfg.pairwise_margin,
                    positive_mask=positive_mask,
                )
        if self.training:
            self.num_updates += 1
        total = sum(weights.get(t, 1.0) * v for t, v in values.items())
        # detached 0-d tensors: reading them as floats every step would sync a GPU per term
        return total, {t: v.detach() for t, v in values.items()}

    def _class_labels(self, labels: torch.Tensor | None, b: int) -> torch.Tensor:
        """The batch's class indices, checked (the ``center`` term needs every one)."""
        if labels is None:
            raise UsageError(
                "loss term 'center' needs a semantic category per caption: the training "
                "captions need labels (a Karpathy file's per-image 'label', a JSONL/datasets "
                "'label' column, easy-vqa's colour and shape)"
            )
        labels = labels.to(self.class_centers.device)
        if labels.shape != (b,):
            raise ValueError(f"labels must have shape ({b},), got {tuple(labels.shape)}")
        bad = (labels < 0) | (labels >= len(self.config.class_names))
        if bad.any():
            raise UsageError(
                f"loss term 'center': {int(bad.sum())} of {b} captions in the batch have no "
                f"label among the model's {len(self.config.class_names)} classes"
            )
        return labels

    @staticmethod
    def _same_category(
        labels: torch.Tensor | None, positive_mask: torch.Tensor | None, b: int, device: Any
    ) -> torch.Tensor:
        """(B, B) bool: the same image / identical caption, or the same known label."""
        same = L._positives(b, positive_mask, device)
        if labels is not None:
            labels = labels.to(same.device)
            known = labels >= 0
            same = same | ((labels[:, None] == labels[None, :]) & known[:, None] & known[None, :])
        return same

    # ------------------------------------------------------------------ convenience

    @property
    def embed_dim(self) -> int:
        """Width of what the index holds: the embedding space, or a hashing retriever's
        code length in bits."""
        return self.config.hash_bits if self.config.is_binary else self.config.embed_dim

    @property
    def index_metric(self) -> str:
        """How an index compares this retriever's vectors: ``"inner_product"``
        (L2-normalised embeddings: cosine) or ``"hamming"`` (binary codes)."""
        return "hamming" if self.config.is_binary else "inner_product"

    def _check_logsigma(self) -> None:
        if not self.config.is_probabilistic:
            raise UsageError(
                f"return_logsigma needs a probabilistic (PCME) retriever; this one is trained "
                f"with loss {self.config.loss!r}"
            )

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise captions with the model's tokenizer (padding, truncation)."""
        if self.tokenizer is None:
            raise UsageError("this retriever has no tokenizer attached (set model.tokenizer)")
        _check_texts(texts)
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_caption_length,
            return_tensors="pt",
        )

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Paths / PIL images / uint8 arrays → (B, 3, H, W) pixel values."""
        if self.image_processor is None:
            raise UsageError(
                "this retriever has no image processor attached (set model.image_processor)"
            )
        pil = [load_image(im) for im in images]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def embed_texts(
        self,
        texts: Sequence[str],
        batch_size: int = 256,
        show_progress: bool = False,
        return_logsigma: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Captions → (N, D) float32 L2-normalised numpy embeddings, batched (a hashing
        retriever: (N, bits) codes of ±1).

        ``return_logsigma=True`` (a PCME retriever): also the (N, D) log σ of each
        caption's Gaussian, as ``(embeddings, logsigma)``.
        """
        from tqdm.auto import tqdm

        texts = list(texts)
        _check_texts(texts)
        if return_logsigma:
            self._check_logsigma()
        was_training = self.training
        if was_training:  # train()/eval() walk every submodule: not on each inference call
            self.eval()
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        sig = (
            np.empty((len(texts), self.config.embed_dim), dtype=np.float32)
            if return_logsigma
            else None
        )
        starts = range(0, len(texts), batch_size)
        for s in tqdm(starts, desc="encoding captions", unit="batch", disable=not show_progress):
            enc = self.tokenize(texts[s : s + batch_size]).to(self.device)
            parts = self._text_parts(enc["input_ids"], enc["attention_mask"])
            emb = self._retrieval_vector(parts)
            out[s : s + len(emb)] = emb.float().cpu().numpy()
            if sig is not None:
                sig[s : s + len(emb)] = parts["logsigma"].float().cpu().numpy()
        if was_training:
            self.train()
        return (out, sig) if sig is not None else out

    @torch.inference_mode()
    def embed_images(
        self,
        images: Sequence[Any],
        batch_size: int = 64,
        show_progress: bool = False,
        return_logsigma: bool = False,
        return_tokens: bool = False,
    ) -> np.ndarray | tuple[Any, ...]:
        """Images (paths, PIL, uint8 arrays) → (N, D) float32 L2-normalised embeddings
        (a hashing retriever: (N, bits) codes of ±1).

        ``return_logsigma=True`` (a PCME retriever): also the (N, D) log σ of each
        image's Gaussian, as ``(embeddings, logsigma)``. ``return_tokens=True``: also
        the image tower's (N, R, H) tokens (regions / patches; a float32 tensor on the
        model's device), what a re-ranker reads, last in the tuple.
        """
        from tqdm.auto import tqdm

        images = list(images)
        if return_logsigma:
            self._check_logsigma()
        was_training = self.training
        if was_training:
            self.eval()
        out = np.empty((len(images), self.embed_dim), dtype=np.float32)
        sig = (
            np.empty((len(images), self.config.embed_dim), dtype=np.float32)
            if return_logsigma
            else None
        )
        tokens: list[torch.Tensor] = []
        starts = range(0, len(images), batch_size)
        for s in tqdm(starts, desc="encoding images", unit="batch", disable=not show_progress):
            pixels = self.preprocess_images(images[s : s + batch_size]).to(self.device)
            parts = self._image_parts(pixels.to(self.dtype))
            emb = self._retrieval_vector(parts)
            out[s : s + len(emb)] = emb.float().cpu().numpy()
            if sig is not None:
                sig[s : s + len(emb)] = parts["logsigma"].float().cpu().numpy()
            if return_tokens:
                tokens.append(parts["tokens"].float())
        if was_training:
            self.train()
        result: tuple[Any, ...] = (out,) if sig is None else (out, sig)
        if return_tokens:
            result = (*result, torch.cat(tokens) if tokens else torch.zeros(0))
        return result if len(result) > 1 else out

    def fingerprint(self) -> str:
        """A hash of the config and weights; knowledge indices record it and check it on load."""
        h = hashlib.sha256()
        cfg = self.config.to_dict()
        for key in VOLATILE_CONFIG_KEYS:
            cfg.pop(key, None)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu").contiguous().float().numpy().tobytes())
        return "sha256:" + h.hexdigest()[:24]


def augment_pixels(pixels: torch.Tensor, max_shift: float = 0.0625) -> torch.Tensor:
    """Random horizontal flips and small translations (reflect-padded), per image.

    Colour is left alone on purpose: it is often what captions are about. Uses
    the torch RNG only (restored exactly by checkpoint resume).
    """
    b, _, h, w = pixels.shape
    flip = torch.rand(b, device=pixels.device) < 0.5
    out = torch.where(flip.view(b, 1, 1, 1), pixels.flip(-1), pixels)
    pad = max(1, int(round(max_shift * h)))
    padded = F.pad(out, (pad, pad, pad, pad), mode="reflect")
    shifts = torch.randint(0, 2 * pad + 1, (b, 2))
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts.tolist())]
    )


def _check_texts(texts: Sequence[Any]) -> None:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"caption {i} must be a string, got {type(t).__name__}: {t!r}")
        if not t.strip():
            raise UsageError(f"caption {i} is empty")


AutoModel.register(RetrieverConfig, RetrieverModel, exist_ok=True)
