"""Configuration of the image-caption alignment model (the retriever)."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from rvqa.config import RetrieverSettings
from rvqa.errors import ConfigError

# The defaults of the fields a run also sets are RetrieverSettings' (one place, the
# demo's values): a model built without settings is the model the demo trains.
_S = RetrieverSettings

POOLINGS_VISION = ("pooled", "cls", "mean")
POOLINGS_TEXT = ("mean", "cls")
PROJECTIONS = ("linear", "mlp")
LOSSES = ("vse_max", "vse_sum", "infonce")


class RetrieverConfig(PretrainedConfig):
    """Configuration of :class:`~rvqa.retriever.modeling.RetrieverModel`.

    Architecture plus the training choices the model applies itself (loss, warm-up,
    freezing, augmentation). Every field that :class:`rvqa.config.RetrieverSettings`
    also has takes its default from there (the demo's values); a saved
    ``config.json`` holds every field, so a saved model never depends on these
    defaults.

    Args:
        vision_config: Config dict (with ``model_type``) of the image tower: the
            small CNN (``"rvqa-small-cnn"``) or any ``transformers`` vision model.
        text_config: Config dict of the text tower (BERT/MiniLM/ALBERT/T5 encoder...).
        vision_backbone: Name the image tower was initialised from (provenance;
            ``"cnn"`` = trained from scratch).
        text_backbone: Name the text tower was initialised from (``"minilm"`` = the
            packaged all-MiniLM-L6-v2).
        vision_pooling: ``"pooled"`` (the backbone's pooler output), ``"cls"`` (first
            token) or ``"mean"`` (mean of all tokens).
        text_pooling: ``"mean"`` (masked mean over tokens) or ``"cls"``.
        embed_dim: Width of the shared, L2-normalised embedding space.
        projection: ``"linear"`` or ``"mlp"`` (Linear-GELU-Linear) heads.
        image_size: Side length the small CNN's image processor resizes to. For a
            transformers vision checkpoint its own image processor decides the size
            and this value is only recorded.
        max_caption_length: Tokens per caption (longer ones are truncated).
        loss: ``"vse_max"`` (VSE++ hinge, hardest negative — the DXR objective),
            ``"vse_sum"`` (sum of hinges) or ``"infonce"`` (symmetric, learnable
            temperature).
        margin: Hinge margin of the VSE losses.
        max_violation_warmup: With ``loss="vse_max"``, the first N training forward
            passes (micro-batches, counted by the model in its ``num_updates`` buffer;
            with gradient accumulation G that is N / G optimizer steps) use the sum
            of hinges: hardest negatives from a random initialisation tend to
            collapse all embeddings to one point (loss stuck at 2 × margin × batch),
            the known VSE++ failure that VSE∞ avoids the same way. ``0`` turns the
            warm-up off (only safe from a trained model).
        init_temperature: Initial InfoNCE temperature (learned as ``logit_scale``).
        freeze_vision: Do not train the image tower (projections still train).
        freeze_text: Do not train the text tower.
        augment: Random flips and small shifts of images in training forward passes.
    """

    model_type = "rvqa-retriever"

    def __init__(
        self,
        vision_config: dict | None = None,
        text_config: dict | None = None,
        vision_backbone: str = _S.vision_backbone,
        text_backbone: str = _S.text_backbone,
        vision_pooling: str = _S.vision_pooling,
        text_pooling: str = _S.text_pooling,
        embed_dim: int = _S.embed_dim,
        projection: str = _S.projection,
        image_size: int = _S.image_size,
        max_caption_length: int = _S.max_caption_length,
        loss: str = _S.loss,
        margin: float = _S.margin,
        max_violation_warmup: int = _S.max_violation_warmup,
        init_temperature: float = _S.init_temperature,
        freeze_vision: bool = _S.freeze_vision,
        freeze_text: bool = _S.freeze_text,
        augment: bool = _S.augment,
        **kwargs,
    ):
        _check_choice("vision_pooling", vision_pooling, POOLINGS_VISION)
        _check_choice("text_pooling", text_pooling, POOLINGS_TEXT)
        _check_choice("projection", projection, PROJECTIONS)
        _check_choice("loss", loss, LOSSES)
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ConfigError(f"embed_dim must be a positive integer, got {embed_dim!r}")
        if (
            isinstance(max_violation_warmup, bool)
            or not isinstance(max_violation_warmup, int)
            or max_violation_warmup < 0
        ):
            raise ConfigError(
                "max_violation_warmup must be an integer >= 0 (training forward passes), "
                f"got {max_violation_warmup!r}"
            )
        self.vision_config = dict(vision_config) if vision_config else None
        self.text_config = dict(text_config) if text_config else None
        self.vision_backbone = vision_backbone
        self.text_backbone = text_backbone
        self.vision_pooling = vision_pooling
        self.text_pooling = text_pooling
        self.embed_dim = embed_dim
        self.projection = projection
        self.image_size = image_size
        self.max_caption_length = max_caption_length
        self.loss = loss
        self.margin = margin
        self.max_violation_warmup = max_violation_warmup
        self.init_temperature = init_temperature
        self.freeze_vision = freeze_vision
        self.freeze_text = freeze_text
        self.augment = augment
        super().__init__(**kwargs)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# Registered here, next to the class (the model class is registered in modeling.py).
AutoConfig.register(RetrieverConfig.model_type, RetrieverConfig, exist_ok=True)
