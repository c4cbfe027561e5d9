"""Build image and text towers (any ``transformers`` backbone, the small CNN, or the GCN
text tower).

Shared by the retriever and the reader. A tower is described by a plain config
dict (``PretrainedConfig.to_dict()``, with ``model_type``) so a composite model
can rebuild it from its own config in ``__init__`` — the ``transformers`` way —
while :func:`load_vision_tower` / :func:`load_text_tower` load pretrained
weights when a run starts from named checkpoints.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

try:  # transformers >= 5: the PIL backend, no torchvision needed
    from transformers import ViTImageProcessorPil as _CNNImageProcessor
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import ViTImageProcessor as _CNNImageProcessor

from rvqa.errors import ConfigError
from rvqa.towers.backbones import resolve_text_backbone
from rvqa.towers.cnn import SmallCNNConfig, SmallCNNModel
from rvqa.towers.gcn import GCNTextConfig, GCNTextModel

logger = logging.getLogger(__name__)

AutoConfig.register("rvqa-small-cnn", SmallCNNConfig, exist_ok=True)
AutoModel.register(SmallCNNConfig, SmallCNNModel, exist_ok=True)
AutoConfig.register("rvqa-gcn-text", GCNTextConfig, exist_ok=True)
AutoModel.register(GCNTextConfig, GCNTextModel, exist_ok=True)

BUILTIN_VISION = ("cnn",)
# Composite configs (CLIP, SigLIP, ...) whose image tower lives in `vision_config`.
_COMPOSITE_VISION = {"clip", "siglip", "siglip2", "blip", "align", "owlvit", "chinese_clip"}
_COMPOSITE_TEXT = {"clip", "siglip", "siglip2", "t5", "mt5", "umt5"}


class KeepsFrozenOnLoad:
    """Mixin of a ``PreTrainedModel`` with an ``apply_freezing()`` method: ``from_pretrained``
    applies it again after loading. ``transformers`` (5.x) materialises the loaded
    parameters with ``requires_grad=True``, so without this a frozen tower of a loaded
    model trains (and its optimizer state costs memory) when the model is trained further."""

    def apply_freezing(self) -> None:  # pragma: no cover - every model defines its own
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        out = super().from_pretrained(*args, **kwargs)  # type: ignore[misc]
        # (model, loading_info) with output_loading_info=True
        (out[0] if isinstance(out, tuple) else out).apply_freezing()
        return out


def tensor_state_key(*modules: nn.Module) -> tuple:
    """An identity of the modules' weights and buffers that changes when any is
    replaced, changed in place (its version counter), moved or cast: what a cache of
    values computed from them is keyed on."""
    key = []
    stack = list(modules)
    while stack:  # (walking the submodules directly: a third of ``parameters()``'s time)
        sub = stack.pop()
        for tensors in (sub._parameters, sub._buffers):
            key.extend(
                (id(t), t.data_ptr(), t._version, t.dtype, t.device)
                for t in tensors.values()
                if t is not None
            )
        stack.extend(m for m in sub._modules.values() if m is not None)
    return tuple(key)


def small_cnn_processor(image_size: int):
    """Resize to ``image_size``² and scale to [-1, 1]; saved/loaded like any HF processor."""
    return _CNNImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _from_pretrained(fn, name: str, what: str):
    try:
        return fn(name)
    except OSError as err:
        raise ConfigError(
            f"cannot load {what} {name!r}: {str(err).splitlines()[0]} "
            f"(known built-in names: 'cnn' for images, 'minilm' for text; any transformers "
            f"checkpoint name or local folder works where a model hub or the folder is reachable)"
        ) from None


def vision_config_from_name(name: str, image_size: int = 64, grid_size: int | None = 4) -> dict:
    """The config dict of a vision tower: ``'cnn'`` or a transformers checkpoint/folder."""
    if name == "cnn":
        return SmallCNNConfig(image_size=image_size, grid_size=grid_size).to_dict()
    cfg = _from_pretrained(AutoConfig.from_pretrained, name, "vision backbone")
    if cfg.model_type in _COMPOSITE_VISION and hasattr(cfg, "vision_config"):
        cfg = cfg.vision_config
    return cfg.to_dict()


def text_config_from_name(name: str, num_layers: int | None = None) -> dict:
    """The config dict of a text tower (BERT-like / MiniLM / ALBERT / T5 encoder)."""
    cfg = _backbone_text_config(name)
    if num_layers is not None:
        _set_num_layers(cfg, num_layers)
    return cfg.to_dict()


def _backbone_text_config(name: str) -> PretrainedConfig:
    cfg = _from_pretrained(AutoConfig.from_pretrained, resolve_text_backbone(name), "text backbone")
    if cfg.model_type in {"clip", "siglip", "siglip2"}:
        cfg = cfg.text_config
    return cfg


def gcn_text_config_from_name(name: str, **options: Any) -> dict:
    """The config dict of a GCN text tower whose word vectors (and tokenizer) are those of
    text backbone ``name`` (``'minilm'``: the packaged all-MiniLM-L6-v2's 30522 × 384).

    Args:
        name: The text backbone whose input embeddings the tower's word vectors copy.
        **options: :class:`~rvqa.towers.gcn.GCNTextConfig` fields (``hidden_size``,
            ``num_layers``, ``graph``, ``k``, ``threshold``, ``self_loops``, ``dropout``).
    """
    cfg = _backbone_text_config(name)
    word_dim = next(
        (
            getattr(cfg, a)
            for a in ("embedding_size", "hidden_size", "d_model", "dim")
            if isinstance(getattr(cfg, a, None), int)
        ),
        None,
    )
    if word_dim is None or not isinstance(getattr(cfg, "vocab_size", None), int):
        raise ConfigError(
            f"text backbone {name!r} ({cfg.model_type}): cannot tell its word vectors' size "
            f"for the GCN text tower"
        )
    return GCNTextConfig(
        vocab_size=cfg.vocab_size, word_dim=word_dim, pad_token_id=cfg.pad_token_id, **options
    ).to_dict()


def _set_num_layers(cfg: PretrainedConfig, num_layers: int) -> None:
    for attr in ("num_hidden_layers", "num_layers", "n_layers"):
        if hasattr(cfg, attr):
            if num_layers > getattr(cfg, attr):
                raise ConfigError(
                    f"num_text_layers={num_layers} but the backbone has only {getattr(cfg, attr)} layers"
                )
            setattr(cfg, attr, num_layers)
            return
    raise ConfigError(f"cannot truncate layers of a {cfg.model_type!r} text backbone")


def tower_config_from_dict(d: dict) -> PretrainedConfig:
    """Rebuild a backbone config from its dict (needs ``model_type``)."""
    if "model_type" not in d:
        raise ConfigError(f"tower config has no 'model_type': keys {sorted(d)[:10]}")
    d = dict(d)
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)


def build_tower(config_dict: dict) -> PreTrainedModel:
    """A randomly initialised tower from its config dict (weights loaded later)."""
    cfg = tower_config_from_dict(config_dict)
    if cfg.model_type in {"t5", "mt5", "umt5"}:
        from transformers import T5EncoderModel

        return T5EncoderModel(cfg)
    if cfg.model_type == "clip_text_model":
        from transformers import CLIPTextModel

        return CLIPTextModel(cfg)
    return AutoModel.from_config(cfg)


# Towers whose pooled output passes through a module that the token states skip:
# model_type -> that module's attribute (CLIP's post-LayerNorm of the CLS state).
_POOLED_ONLY_MODULES = {"clip_vision_model": "post_layernorm"}


def drop_unused_heads(tower: nn.Module, *, pooled: bool) -> None:
    """Remove the parameterised modules of ``tower`` whose output the model never reads.

    A model that reads token states (``pooled=False``) never reaches the tower's
    pooler head (BERT's and ViT's ``pooler``) nor, for a CLIP vision tower, the
    ``post_layernorm`` applied to the CLS state only: their weights would never get a
    gradient, which ``DistributedDataParallel`` rejects by default, and cost memory.
    With ``pooled=True`` nothing is removed. Parameter-free poolers (ResNet's average
    pool) are called unconditionally by their models and are kept.

    Args:
        tower: An image or text tower built by :func:`build_tower`.
        pooled: Whether the model reads the tower's ``pooler_output``.
    """
    pooler = getattr(tower, "pooler", None)
    if not pooled and isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        tower.pooler = None
    name = _POOLED_ONLY_MODULES.get(getattr(tower.config, "model_type", ""))
    if name is not None and not pooled:
        # transformers 5 holds it on the tower, 4.x on tower.vision_model
        owner = tower if hasattr(tower, name) else getattr(tower, "vision_model", None)
        if owner is not None and isinstance(getattr(owner, name, None), nn.Module):
            setattr(owner, name, nn.Identity())


def load_tower_weights(tower: nn.Module, name: str, text: bool) -> None:
    """Copy pretrained weights of checkpoint ``name`` into ``tower`` (layers may be fewer;
    a GCN text tower gets the checkpoint's input embeddings as its word vectors)."""
    if name == "cnn":
        return
    path = resolve_text_backbone(name) if text else name
    if isinstance(tower, GCNTextModel):
        _copy_word_vectors(tower, path, name)
        return
    # Load the full checkpoint, then copy what the (possibly truncated) tower has.
    pretrained = _from_pretrained(type(tower).from_pretrained, path, "backbone weights")
    missing, _unexpected = tower.load_state_dict(pretrained.state_dict(), strict=False)
    if missing:
        logger.warning(
            "%s: %d tower weights not in the checkpoint (e.g. %s)", name, len(missing), missing[:3]
        )


def _copy_word_vectors(tower: GCNTextModel, path: str, name: str) -> None:
    pretrained = _from_pretrained(AutoModel.from_pretrained, path, "backbone weights")
    source = pretrained.get_input_embeddings().weight
    target = tower.get_input_embeddings().weight
    if source.shape != target.shape:
        raise ConfigError(
            f"the GCN text tower has {tuple(target.shape)} word vectors but {name!r}'s input "
            f"embeddings are {tuple(source.shape)}; build its config with "
            f"gcn_text_config_from_name({name!r})"
        )
    with torch.no_grad():
        target.copy_(source)


def hidden_size_of(config_dict: dict) -> int:
    """Output width of a tower's features."""
    for key in ("hidden_size", "d_model", "dim"):
        if key in config_dict and isinstance(config_dict[key], int):
            return config_dict[key]
    if isinstance(config_dict.get("hidden_sizes"), list):
        return config_dict["hidden_sizes"][-1]
    raise ConfigError(f"cannot tell the output size of a {config_dict.get('model_type')!r} tower")


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a text backbone (``'minilm'`` = the packaged one)."""
    return _from_pretrained(AutoTokenizer.from_pretrained, resolve_text_backbone(name), "tokenizer")


def load_image_processor(name: str, image_size: int) -> Any:
    """The image processor of a vision backbone (``'cnn'`` = resize + [-1, 1])."""
    if name == "cnn":
        return small_cnn_processor(image_size)
    return _from_pretrained(AutoImageProcessor.from_pretrained, name, "image processor")
