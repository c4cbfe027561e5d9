"""The image-caption alignment model (DXR / VSE++ style dual encoder).

Two towers — any ``transformers`` vision model (or the small CNN) and any text
encoder — each followed by a projection into one ``embed_dim`` space where
embeddings are L2-normalised, so the inner product is the cosine similarity
that the FAISS knowledge index searches with.
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
from rvqa.retriever.configuration import RetrieverConfig
from rvqa.retriever.losses import retrieval_loss
from rvqa.towers import (
    KeepsFrozenOnLoad,
    build_tower,
    drop_unused_heads,
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
    """

    loss: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


def _head(d_in: int, d_out: int, kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))
    return nn.Linear(d_in, d_out)


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
        self.tokenizer: Any = None
        self.image_processor: Any = None
        self.post_init()
        self.apply_freezing()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and any(module is m for m in self._projection_modules()):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def _projection_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = []
        for name in ("vision_projection", "text_projection"):
            head = getattr(self, name, None)
            if head is not None:
                mods.extend(m for m in head.modules() if isinstance(m, nn.Linear))
        return mods

    def apply_freezing(self) -> None:
        """(Un)freeze towers as the config says; projections always train."""
        for p in self.vision_model.parameters():
            p.requires_grad_(not self.config.freeze_vision)
        for p in self.text_model.parameters():
            p.requires_grad_(not self.config.freeze_text)
        # Only InfoNCE uses the temperature; DDP refuses parameters that get no gradient.
        self.logit_scale.requires_grad_(self.config.loss == "infonce")

    def train(self, mode: bool = True) -> RetrieverModel:
        """Like ``nn.Module.train``, but frozen towers stay in eval mode (no dropout,
        fixed BatchNorm statistics): a frozen tower is a fixed feature extractor."""
        super().train(mode)
        if mode and self.config.freeze_vision:
            self.vision_model.eval()
        if mode and self.config.freeze_text:
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
                ``text_config`` (e.g. ``vision_backbone``, ``text_backbone``, ``loss``).

        Raises:
            TypeError: An unknown override name (named), or ``settings`` given as a
                string (backbone names are keywords: ``vision_backbone="cnn"``).
            ValueError: A backbone that cannot be loaded, or an invalid config value.
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
        config = RetrieverConfig(
            vision_config=vision_config,
            text_config=text_config_from_name(text_backbone, num_text_layers),
            **opts,
        )
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

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, D) L2-normalised image embeddings."""
        out = self.vision_model(pixel_values=pixel_values)
        pooling = self.config.vision_pooling
        if pooling == "pooled" and getattr(out, "pooler_output", None) is not None:
            feats = out.pooler_output.flatten(1)  # ResNet pools to (B, C, 1, 1)
        elif pooling == "cls":
            feats = out.last_hidden_state[:, 0]
        else:  # "mean", or a backbone without a pooler
            hidden = out.last_hidden_state
            feats = hidden.mean(dim=1) if hidden.ndim == 3 else hidden.flatten(2).mean(-1)
        return F.normalize(self._project(self.vision_projection, feats, "image"), dim=-1)

    def encode_texts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) token ids → (B, D) L2-normalised caption embeddings."""
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
        return F.normalize(self._project(self.text_projection, feats, "text"), dim=-1)

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
        return_loss: bool = True,
        **kwargs: Any,
    ) -> RetrieverOutput:
        """Embed a batch of (image, caption) pairs; row i of each is a positive pair.

        Args:
            positive_mask: (B, B) bool, True where image i and caption j also match
                (same image id or identical caption): excluded from the negatives.
        """
        if self.training and self.config.augment:
            pixel_values = augment_pixels(pixel_values)
        im = self.encode_images(pixel_values)  # (B, D)
        txt = self.encode_texts(input_ids, attention_mask)  # (B, D)
        loss = None
        if return_loss:
            name = self.config.loss
            if self.training:
                if name == "vse_max" and self.num_updates < self.config.max_violation_warmup:
                    name = "vse_sum"
                self.num_updates += 1
            # In float32 even under bf16/fp16 autocast: a half-precision similarity matrix
            # and hinge sum would round the loss (and its gradient) to 2-3 digits.
            with torch.autocast(im.device.type, enabled=False):
                loss = retrieval_loss(
                    name,
                    im.float(),
                    txt.float(),
                    margin=self.config.margin,
                    logit_scale=self.logit_scale,
                    positive_mask=positive_mask,
                )
        return RetrieverOutput(loss=loss, image_embeds=im, text_embeds=txt)

    # ------------------------------------------------------------------ convenience

    @property
    def embed_dim(self) -> int:
        """Width of the shared embedding space."""
        return self.config.embed_dim

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
        self, texts: Sequence[str], batch_size: int = 256, show_progress: bool = False
    ) -> np.ndarray:
        """Captions → (N, D) float32 L2-normalised numpy embeddings, batched."""
        from tqdm.auto import tqdm

        texts = list(texts)
        _check_texts(texts)
        was_training = self.training
        if was_training:  # train()/eval() walk every submodule: not on each inference call
            self.eval()
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        for s in tqdm(starts, desc="encoding captions", unit="batch", disable=not show_progress):
            enc = self.tokenize(texts[s : s + batch_size]).to(self.device)
            emb = self.encode_texts(enc["input_ids"], enc["attention_mask"])
            out[s : s + len(emb)] = emb.float().cpu().numpy()
        if was_training:
            self.train()
        return out

    @torch.inference_mode()
    def embed_images(
        self, images: Sequence[Any], batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        """Images (paths, PIL, uint8 arrays) → (N, D) float32 L2-normalised embeddings."""
        from tqdm.auto import tqdm

        images = list(images)
        was_training = self.training
        if was_training:
            self.eval()
        out = np.empty((len(images), self.embed_dim), dtype=np.float32)
        starts = range(0, len(images), batch_size)
        for s in tqdm(starts, desc="encoding images", unit="batch", disable=not show_progress):
            pixels = self.preprocess_images(images[s : s + batch_size]).to(self.device)
            emb = self.encode_images(pixels.to(self.dtype))
            out[s : s + len(emb)] = emb.float().cpu().numpy()
        if was_training:
            self.train()
        return out

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
