"""The readers' image tower: one implementation shared by the classifier and the generative reader.

Both readers hold an image tower (``vision_model``) built from a config dict —
the retriever's frozen tower (``vision_backbone="retriever"``), the small CNN
(``"cnn"``) or any ``transformers`` vision checkpoint — and read its token
features pooled to a ``visual_grid × visual_grid`` grid. :class:`VisionTowerMixin`
gives a model :meth:`~VisionTowerMixin.vision_features` (what the feature cache of
:func:`rvqa.reader.data.visual_features_for` stores), freezing and the frozen
tower's eval mode; :func:`vision_config_for` and :func:`start_vision_tower` are
the build steps of both ``from_backbones``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rvqa.errors import ConfigError
from rvqa.towers import build_tower, drop_unused_heads, load_tower_weights, vision_config_from_name


def build_image_tower(vision_config: dict) -> nn.Module:
    """A randomly initialised image tower whose token states the readers read (no pooler)."""
    tower = build_tower(vision_config)
    drop_unused_heads(tower, pooled=False)  # heads that would get no gradient go
    return tower


def vision_config_for(
    vision_backbone: str,
    vision_tower: nn.Module | None,
    image_size: int,
    grid: int | None,
    cnn_hidden_sizes: list[int] | None,
) -> dict:
    """The image tower's config dict: a given tower's, the small CNN's, or a checkpoint's.

    Raises:
        ConfigError: ``vision_backbone="retriever"`` without ``vision_tower``, or
            ``cnn_hidden_sizes`` with a given tower.
    """
    if vision_tower is not None:
        vision_config = vision_tower.config.to_dict()
    elif vision_backbone == "retriever":
        raise ConfigError(
            "vision_backbone='retriever' needs vision_tower=<the retriever's image tower>, "
            "e.g. RetrieverModel.from_pretrained(path).vision_model"
        )
    else:
        vision_config = vision_config_from_name(vision_backbone, image_size, grid)
    if vision_config["model_type"] == "rvqa-small-cnn":
        vision_config["grid_size"] = grid  # the CNN's weights do not depend on the grid
        if cnn_hidden_sizes is not None:
            if vision_tower is not None:
                raise ConfigError("cnn_hidden_sizes cannot change a given vision_tower")
            vision_config["hidden_sizes"] = list(cnn_hidden_sizes)
            vision_config["hidden_size"] = cnn_hidden_sizes[-1]
    return vision_config


def start_vision_tower(
    model_tower: nn.Module, vision_tower: nn.Module | None, vision_backbone: str, load_weights: bool
) -> None:
    """Give a freshly built reader's tower its starting weights: ``vision_tower``'s
    (e.g. the retriever's), else the named checkpoint's when ``load_weights``.

    Raises:
        ConfigError: ``vision_tower`` lacks weights the reader's tower has.
    """
    if vision_tower is not None:
        missing, _ = model_tower.load_state_dict(vision_tower.state_dict(), strict=False)
        if missing:
            raise ConfigError(f"vision_tower lacks weights the reader needs: {missing[:5]}")
    elif load_weights:
        load_tower_weights(model_tower, vision_backbone, text=False)


class VisionTowerMixin:
    """Image-tower behaviour of a reader (a ``PreTrainedModel`` with ``vision_model``
    and a config with ``visual_grid`` and ``freeze_vision``)."""

    vision_model: nn.Module
    config: Any

    def freeze_vision_tower(self) -> None:
        """A frozen image tower is a fixed feature extractor (its features can be cached
        per image): no gradients, and kept in eval mode by :meth:`train`."""
        for p in self.vision_model.parameters():
            p.requires_grad_(not self.config.freeze_vision)

    def train(self, mode: bool = True) -> Any:
        """Like ``nn.Module.train``; a frozen image tower stays in eval mode."""
        super().train(mode)  # type: ignore[misc]
        if mode and self.config.freeze_vision:
            self.vision_model.eval()
        return self

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels → (B, V, C) image-tower tokens (pooled to the grid).

        With ``freeze_vision`` these are a fixed function of the image, so training
        can compute them once per image and pass ``visual_features`` instead.
        """
        return self.features_from_tokens(
            self.vision_model(pixel_values=pixel_values).last_hidden_state
        )

    def features_from_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The image tower's output (``last_hidden_state``: (B, N, C) tokens or a (B, C,
        h, w) feature map) → (B, V, C) reader features, pooled to the grid.

        What :meth:`vision_features` does after the tower; :class:`rvqa.RVQA` calls it on
        the retriever's tokens when the reader's frozen tower is the retriever's (one
        image-tower pass per image, not two).
        """
        feats = hidden
        if feats.ndim == 4:  # conv feature map (ResNet, ConvNeXt): (B, C, h, w) → (B, h*w, C)
            feats = feats.flatten(2).transpose(1, 2)
        if self.config.visual_grid is not None:
            feats = pool_to_grid(feats, self.config.visual_grid)  # (B, V, C)
        return feats

    def visual_inputs(
        self, pixel_values: torch.Tensor | None, visual_features: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, V, C) features in the tower's dtype: ``visual_features`` as given (the
        feature cache's rows), else the tower run on ``pixel_values``.

        Raises:
            ValueError: Both or neither given, or features that are not (B, V, C).
        """
        dtype = next(self.vision_model.parameters()).dtype
        if visual_features is not None:
            check_visual_features(pixel_values, visual_features)
            return visual_features.to(dtype)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            raise ValueError(
                "pixel_values must be a (batch, 3, H, W) tensor, got "
                f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}"
            )
        return self.vision_features(pixel_values.to(dtype))


def check_visual_features(pixel_values: Any, visual_features: Any) -> None:
    """Given ``visual_features``: no ``pixel_values`` beside them, and a (B, V, C) tensor.

    Raises:
        ValueError: Naming what was given.
    """
    if pixel_values is not None:
        raise ValueError("give pixel_values or visual_features, not both")
    if not isinstance(visual_features, torch.Tensor) or visual_features.ndim != 3:
        raise ValueError(
            "visual_features must be a (batch, tokens, channels) tensor, got "
            f"{getattr(visual_features, 'shape', type(visual_features).__name__)}"
        )


def pool_to_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Average-pool a square patch grid (optionally after one CLS token) to grid × grid.

    (B, N, C) → (B, grid² [+1], C). Token sets that are not a square grid, and grids
    already no larger than ``grid``, pass through unchanged.
    """
    batch, n, channels = tokens.shape
    side = math.isqrt(n)
    has_cls = side * side != n
    if has_cls:
        side = math.isqrt(n - 1)
        if side * side != n - 1:
            return tokens
    if side <= grid:
        return tokens
    cls, patches = (tokens[:, :1], tokens[:, 1:]) if has_cls else (None, tokens)
    fmap = patches.transpose(1, 2).reshape(batch, channels, side, side)  # (B, C, s, s)
    patches = F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)  # (B, g², C)
    return torch.cat([cls, patches], dim=1) if cls is not None else patches


def visual_token_bound(vision_config: dict, grid: int | None, image_size: int) -> int:
    """An upper bound on the visual tokens a tower config gives (sizes the position table)."""
    if grid is not None:
        return grid * grid + 1
    if vision_config.get("model_type") == "rvqa-small-cnn":
        side = vision_config.get("grid_size") or image_size // 2 ** len(
            vision_config["hidden_sizes"]
        )
        return side * side
    patch = vision_config.get("patch_size")
    if isinstance(patch, int):
        side = vision_config.get("image_size", image_size) // patch
        return side * side + 1
    return 64
