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
    "pairwise": ("pairwise_lambda", "pairwise_margin"),
}

# The options of each text tower but the default transformer one: serialised, with
# ``text_tower`` itself, only for that tower (a transformer retriever's config.json and
# fingerprint are what they were before the GCN tower existed).
TEXT_TOWER_FIELDS = {
    "gcn": (
        "gcn_hidden_size",
        "gcn_layers",
        "gcn_graph",
        "gcn_k",
        "gcn_threshold",
        "gcn_self_loops",
        "gcn_dropout",
    ),
}
# The GCN tower config's field of each option (its text_config must agree).
GCN_TOWER_KEYS = {
    "gcn_hidden_size": "hidden_size",
    "gcn_layers": "num_layers",
    "gcn_graph": "graph",
    "gcn_k": "k",
    "gcn_threshold": "threshold",
    "gcn_self_loops": "self_loops",
    "gcn_dropout": "dropout",
}
TEXT_TOWERS = ("transformer", "gcn")
GCN_MODEL_TYPE = "rvqa-gcn-text"

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
        text_config: Config dict of the text tower (BERT/MiniLM/ALBERT/T5 encoder...,
            or the GCN tower's ``"rvqa-gcn-text"``).
        vision_backbone: Name the image tower was initialised from (provenance;
            ``"cnn"`` = trained from scratch).
        text_backbone: Name the text tower was initialised from (``"minilm"`` = the
            packaged all-MiniLM-L6-v2); with ``text_tower="gcn"`` the source of its
            tokenizer and word vectors.
        text_tower: ``"transformer"`` (the backbone's encoder) or ``"gcn"``
            (:class:`rvqa.towers.gcn.GCNTextModel`: a graph convolutional network over
            a graph of each caption's words, Yu et al. 2018). With ``"gcn"``,
            ``freeze_text`` freezes its word vectors only: its graph convolutions are
            new and always train.
        gcn_hidden_size: ``gcn``: width of each graph convolution (the tower's output).
        gcn_layers: ``gcn``: graph convolutions.
        gcn_graph: ``gcn``: ``"knn"`` (each token joined to its ``gcn_k`` most similar
            tokens by word-vector cosine, symmetrised) or ``"threshold"`` (joined at a
            cosine of ``gcn_threshold`` or more).
        gcn_k: ``gcn``, ``knn``: neighbours per token.
        gcn_threshold: ``gcn``, ``threshold``: the joining cosine, in [-1, 1].
        gcn_self_loops: ``gcn``: normalise ``A + I`` (Kipf & Welling), not ``A``.
        gcn_dropout: ``gcn``: dropout on each graph convolution's input.
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
            ``"crcgs+support_set"``, ``"infonce+hash"``; ``pairwise`` (Yu et al.'s
            pairwise similarity loss: the variances of matching and non-matching
            similarities plus a hinge on their means' gap).
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
        pairwise_lambda: ``pairwise``: weight λ of the mean-gap hinge (Yu et al.'s code: 0.35).
        pairwise_margin: ``pairwise``: margin m of the mean gap (Yu et al.'s code: 0.8).
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
        text_tower: str = _S.text_tower,
        gcn_hidden_size: int = _S.gcn_hidden_size,
        gcn_layers: int = _S.gcn_layers,
        gcn_graph: str = _S.gcn_graph,
        gcn_k: int = _S.gcn_k,
        gcn_threshold: float = _S.gcn_threshold,
        gcn_self_loops: bool = _S.gcn_self_loops,
        gcn_dropout: float = _S.gcn_dropout,
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
        pairwise_lambda: float = _S.pairwise_lambda,
        pairwise_margin: float = _S.pairwise_margin,
        freeze_vision: bool = _S.freeze_vision,
        freeze_text: bool = _S.freeze_text,
        augment: bool = _S.augment,
        **kwargs,
    ):
        _check_choice("vision_pooling", vision_pooling, POOLINGS_VISION)
        _check_choice("text_pooling", text_pooling, POOLINGS_TEXT)
        _check_choice("projection", projection, PROJECTIONS)
        _check_choice("text_tower", text_tower, TEXT_TOWERS)
        gcn_options = {
            "gcn_hidden_size": gcn_hidden_size,
            "gcn_layers": gcn_layers,
            "gcn_graph": gcn_graph,
            "gcn_k": gcn_k,
            "gcn_threshold": gcn_threshold,
            "gcn_self_loops": gcn_self_loops,
            "gcn_dropout": gcn_dropout,
        }
        check_gcn_options(gcn_options)
        _check_text_config(text_tower, text_config, gcn_options)
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
        self.text_tower = text_tower
        for name, value in gcn_options.items():
            setattr(self, name, value)
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
        self.pairwise_lambda = pairwise_lambda
        self.pairwise_margin = pairwise_margin
        self.freeze_vision = freeze_vision
        self.freeze_text = freeze_text
        self.augment = augment
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        """The config as a dict, without the options of loss terms not in ``loss``
        nor of text towers not in use (no ``text_tower`` for the default transformer
        one), nor an empty ``loss_weights`` / unset ``class_names``."""
        out = super().to_dict()
        terms = parse_loss(self.loss)
        for term, names in TERM_FIELDS.items():
            if term not in terms:
                for name in names:
                    out.pop(name, None)
        for tower, names in TEXT_TOWER_FIELDS.items():
            if tower != self.text_tower:
                for name in names:
                    out.pop(name, None)
        if self.text_tower == "transformer":
            out.pop("text_tower", None)
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


def check_gcn_options(options: dict) -> None:
    """The GCN tower's options (``gcn_*`` name → value), checked whichever tower is in use
    (a bad value fails when the config is built, not when the tower is switched on).

    Raises:
        ConfigError: A bad value, naming its ``gcn_*`` key.
    """
    for name in ("gcn_hidden_size", "gcn_layers", "gcn_k"):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    _check_choice("gcn_graph", options["gcn_graph"], ("knn", "threshold"))
    threshold = options["gcn_threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ConfigError(f"gcn_threshold must be a number, got {threshold!r}")
    if not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"gcn_threshold is a cosine similarity, in [-1, 1]; got {threshold!r}")
    if not isinstance(options["gcn_self_loops"], bool):
        raise ConfigError(
            f"gcn_self_loops must be true or false, got {options['gcn_self_loops']!r}"
        )
    dropout = options["gcn_dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"gcn_dropout must be a number in [0, 1), got {dropout!r}")


def _check_text_config(text_tower: str, text_config: dict | None, gcn_options: dict) -> None:
    """A text tower config that is not the tower ``text_tower`` names (or, for the GCN,
    disagrees with a ``gcn_*`` option) is an error naming the key."""
    if not text_config:
        return
    is_gcn = text_config.get("model_type") == GCN_MODEL_TYPE
    if is_gcn != (text_tower == "gcn"):
        raise ConfigError(
            f"text_tower is {text_tower!r} but text_config is a "
            f"{text_config.get('model_type')!r} tower; build the config with "
            f"RetrieverModel.from_backbones(text_tower=...)"
        )
    if is_gcn:
        for name, key in GCN_TOWER_KEYS.items():
            if key in text_config and text_config[key] != gcn_options[name]:
                raise ConfigError(
                    f"{name}={gcn_options[name]!r} but the GCN text_config has "
                    f"{key}={text_config[key]!r}"
                )


# Registered here, next to the class (the model class is registered in modeling.py).
AutoConfig.register(RetrieverConfig.model_type, RetrieverConfig, exist_ok=True)
