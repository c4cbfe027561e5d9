"""Configuration of the image-caption alignment model (the retriever)."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from rvqa.config import RetrieverSettings
from rvqa.errors import ConfigError
from rvqa.retriever.losses import TERMS_NEEDING_LABELS, parse_loss

# The defaults of the fields a run also sets are RetrieverSettings' (one place, the
# demo's values): a model built without settings is the model the demo trains.
_S = RetrieverSettings

# The options of each loss term: serialised only when the term is in the loss, so a
# model trained without it has the config.json (and the fingerprint, and the resume
# signature) it had before these terms existed.
TERM_FIELDS = {
    "pcme": ("pcme_num_samples", "pcme_init_scale", "pcme_init_shift", "pcme_vib_beta"),
    "center": ("center_weight", "center_mse_weight"),
    "gpl": ("gpl_heads", "gpl_margin", "gpl_diversity_weight"),
    "modality": ("modality_adversarial",),
    "crcgs": ("crcgs_temperature",),
    "support_set": ("support_temperature",),
    "hash": ("hash_bits", "hash_gamma", "hash_eta"),
}

POOLINGS_VISION = ("pooled", "cls", "mean")
POOLINGS_TEXT = ("mean", "cls")
PROJECTIONS = ("linear", "mlp")


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
        loss: The training objective: one term or several joined by ``+`` (summed,
            each times its ``loss_weights`` entry). Terms
            (:data:`rvqa.retriever.losses.LOSS_TERMS`): ``vse_max`` (VSE++ hinge,
            hardest negative — the DXR objective), ``vse_sum`` (sum of hinges),
            ``infonce`` (symmetric, learnable temperature), ``pcme`` (probabilistic
            embeddings), ``center`` (cross-modal centre loss), ``gpl`` (GPLDAN's
            graph pattern loss over ``gpl_heads`` representations), ``modality``
            (GPLDAN's modality classifier), ``crcgs`` (CRCGS's inter- and
            intra-modality contrastive terms), ``support_set`` (CRCGS's support-set
            term) and ``hash`` (DCMH hashing: a ``hash_bits`` binary code, searched
            in a binary FAISS index). E.g. ``"infonce+center"``, ``"gpl+modality"``,
            ``"crcgs+support_set"``, ``"infonce+hash"``.
        loss_weights: Weight of each term of ``loss`` (missing: 1.0).
        margin: Hinge margin of the VSE losses.
        max_violation_warmup: With a ``vse_max`` or ``gpl`` term, the first N training forward
            passes (micro-batches, counted by the model in its ``num_updates`` buffer;
            with gradient accumulation G that is N / G optimizer steps) use the sum
            of hinges: hardest negatives from a random initialisation tend to
            collapse all embeddings to one point (loss stuck at 2 × margin × batch),
            the known VSE++ failure that VSE∞ avoids the same way. ``0`` turns the
            warm-up off (only safe from a trained model).
        init_temperature: Initial InfoNCE temperature (learned as ``logit_scale``).
        pcme_num_samples: ``pcme``: Monte-Carlo samples per embedding, J (PCME: 7).
        pcme_init_scale: ``pcme``: initial ``a`` of ``σ(-a·d + b)``, learned (PCME COCO: 15).
        pcme_init_shift: ``pcme``: initial ``b``, learned (PCME COCO: 15).
        pcme_vib_beta: ``pcme``: weight of the KL (VIB) term (PCME COCO: 1e-5, CUB: 1e-3).
        center_weight: ``center``: λ of the centre term (official code: 10).
        center_mse_weight: ``center``: weight of the image–text MSE term (official code: 0.1).
        class_names: The semantic categories the ``center`` head classifies (set by
            training from the captions' labels; ``None`` without labels).
        gpl_heads: ``gpl``: representations per instance, K (not published: 4, our choice).
        gpl_margin: ``gpl``: hinge margin of the graph pattern loss (our choice: 0.2,
            VSE++'s).
        gpl_diversity_weight: ``gpl``: weight of the diversity of the K
            representations (our choice: 0.1).
        modality_adversarial: ``modality``: a gradient-reversal layer in front of the
            modality classifier (the towers learn modality-invariant features);
            ``False``: the plain classifier.
        crcgs_temperature: ``crcgs``: contrastive temperature (CRCGS code: 0.07; COCO 0.1).
        support_temperature: ``support_set``: temperature of the support weights
            (CRCGS code: 0.07; COCO 0.06).
        hash_bits: ``hash``: code length in bits, a multiple of 8 (DCMH: 16/32/64).
        hash_gamma: ``hash``: quantisation weight γ (DCMH: 1).
        hash_eta: ``hash``: bit-balance weight η (DCMH: 1).
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
        loss_weights: dict | None = None,
        pcme_num_samples: int = _S.pcme_num_samples,
        pcme_init_scale: float = _S.pcme_init_scale,
        pcme_init_shift: float = _S.pcme_init_shift,
        pcme_vib_beta: float = _S.pcme_vib_beta,
        center_weight: float = _S.center_weight,
        center_mse_weight: float = _S.center_mse_weight,
        class_names: list | None = None,
        gpl_heads: int = _S.gpl_heads,
        gpl_margin: float = _S.gpl_margin,
        gpl_diversity_weight: float = _S.gpl_diversity_weight,
        modality_adversarial: bool = _S.modality_adversarial,
        crcgs_temperature: float = _S.crcgs_temperature,
        support_temperature: float = _S.support_temperature,
        hash_bits: int = _S.hash_bits,
        hash_gamma: float = _S.hash_gamma,
        hash_eta: float = _S.hash_eta,
        freeze_vision: bool = _S.freeze_vision,
        freeze_text: bool = _S.freeze_text,
        augment: bool = _S.augment,
        **kwargs,
    ):
        _check_choice("vision_pooling", vision_pooling, POOLINGS_VISION)
        _check_choice("text_pooling", text_pooling, POOLINGS_TEXT)
        _check_choice("projection", projection, PROJECTIONS)
        terms = parse_loss(loss)
        loss_weights = dict(loss_weights or {})
        unknown = sorted(set(loss_weights) - set(terms))
        if unknown:
            raise ConfigError(
                f"loss_weights names {', '.join(map(repr, unknown))}, not a term of loss "
                f"{loss!r} (terms: {', '.join(terms)})"
            )
        for name, value in {
            "pcme_num_samples": pcme_num_samples,
            "gpl_heads": gpl_heads,
            "hash_bits": hash_bits,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if hash_bits % 8:
            raise ConfigError(
                f"hash_bits must be a multiple of 8 (FAISS binary indices store bytes), got {hash_bits}"
            )
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if len(set(class_names)) != len(class_names):
                raise ConfigError("class_names has duplicates")
        if "center" in terms and class_names is not None and len(class_names) < 2:
            raise ConfigError(
                f"loss term 'center' needs at least 2 classes, got class_names={class_names!r}"
            )
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
        self.loss_weights = loss_weights
        self.pcme_num_samples = pcme_num_samples
        self.pcme_init_scale = pcme_init_scale
        self.pcme_init_shift = pcme_init_shift
        self.pcme_vib_beta = pcme_vib_beta
        self.center_weight = center_weight
        self.center_mse_weight = center_mse_weight
        self.class_names = class_names
        self.gpl_heads = gpl_heads
        self.gpl_margin = gpl_margin
        self.gpl_diversity_weight = gpl_diversity_weight
        self.modality_adversarial = modality_adversarial
        self.crcgs_temperature = crcgs_temperature
        self.support_temperature = support_temperature
        self.hash_bits = hash_bits
        self.hash_gamma = hash_gamma
        self.hash_eta = hash_eta
        self.freeze_vision = freeze_vision
        self.freeze_text = freeze_text
        self.augment = augment
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        """The config as a dict, without the options of loss terms not in ``loss``
        (nor an empty ``loss_weights`` / unset ``class_names``)."""
        out = super().to_dict()
        terms = parse_loss(self.loss)
        for term, names in TERM_FIELDS.items():
            if term not in terms:
                for name in names:
                    out.pop(name, None)
        if not out.get("loss_weights"):
            out.pop("loss_weights", None)
        if out.get("class_names") is None:
            out.pop("class_names", None)
        return out

    @property
    def loss_terms(self) -> tuple[str, ...]:
        """The terms of ``loss`` (``"infonce+center"`` → ``("infonce", "center")``)."""
        return parse_loss(self.loss)

    @property
    def is_binary(self) -> bool:
        """A hashing retriever: its embeddings are ``hash_bits``-bit codes (Hamming)."""
        return "hash" in self.loss_terms

    @property
    def is_probabilistic(self) -> bool:
        """A PCME retriever: every embedding has a variance."""
        return "pcme" in self.loss_terms

    @property
    def needs_labels(self) -> bool:
        """Whether training needs a semantic category per caption."""
        return any(t in TERMS_NEEDING_LABELS for t in self.loss_terms)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# Registered here, next to the class (the model class is registered in modeling.py).
AutoConfig.register(RetrieverConfig.model_type, RetrieverConfig, exist_ok=True)
