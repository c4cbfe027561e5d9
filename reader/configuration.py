"""Configuration of the retrieval-augmented multimodal reader."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from rvqa.checks import check_int
from rvqa.config import ReaderSettings
from rvqa.errors import ConfigError, UsageError
from rvqa.reader.answers import SOFT_TARGET_RULES
from rvqa.towers import tower_config_from_dict

# The defaults of the fields a run also sets are ReaderSettings' (one place, the demo's
# values): a reader built without settings is the reader the demo trains.
_S = ReaderSettings


class ReaderConfig(PretrainedConfig):
    """Configuration of :class:`~rvqa.reader.modeling.ReaderModel`.

    The reader is a single-stream (VisualBERT / MMBT style) transformer: the text
    backbone's embeddings and layers read ``[CLS] question [SEP] caption_1 [SEP]
    ... caption_k [SEP]`` followed by projected visual tokens, and an MLP on the
    ``[CLS]`` state scores every answer of the vocabulary.

    Every field that :class:`rvqa.config.ReaderSettings` also has takes its default
    from there (the demo's values), except ``vision_backbone``: it names where the
    image weights came from, and a config built by hand has no retriever tower, so
    its default is ``"cnn"`` (from scratch). A saved ``config.json`` holds every
    field, so a saved model never depends on these defaults.

    Args:
        text_config: Config dict (with ``model_type``) of a BERT-like encoder that
            has ``embeddings`` and ``encoder`` modules (BERT, MiniLM, RoBERTa, ELECTRA...).
        vision_config: Config dict of the image tower: the small CNN
            (``"rvqa-small-cnn"``) or any ``transformers`` vision model (ViT,
            CLIP-vision, ResNet...). Its ``last_hidden_state`` gives the visual tokens.
        text_backbone: Name the text weights came from (provenance; ``"minilm"`` =
            the packaged all-MiniLM-L6-v2).
        vision_backbone: Name the image weights came from (``"cnn"`` = from
            scratch, ``"retriever"`` = the retriever's image tower).
        image_size: Side length the small CNN's image processor resizes to. For a
            transformers vision checkpoint its own image processor decides the size
            and this value is only recorded.
        visual_grid: Square patch grids (ViT/CLIP/CNN) are average-pooled to
            ``visual_grid × visual_grid`` tokens (a leading CLS token is kept), which
            keeps the joint sequence short; ``None`` uses the tower's tokens as they are.
        max_visual_tokens: Size of the visual position table; an image giving more
            tokens is an error (raise it or lower ``visual_grid``).
        top_k: Default number of retrieved captions per question (``0`` = no retrieval).
        max_question_length: Question tokens kept (excluding ``[CLS]``/``[SEP]``).
        max_caption_length: Tokens kept per caption (excluding its ``[SEP]``); the
            per-caption budget keeps long captions from pushing the question out.
        use_retrieval_scores: Add a learned function of each caption's retrieval
            score to the embeddings of that caption's tokens.
        classifier_hidden: Width of the answer MLP (``None`` = 2 × text hidden size,
            the VisualBERT/Pythia VQA head).
        dropout: Dropout of the visual embeddings and the answer MLP (the text
            backbone keeps its own dropout settings).
        answers: The answer vocabulary (normalised strings); ``num_answers = len(answers)``.
        soft_target_rule: How training targets are made from the human answers:
            ``"min3"`` = ``min(1, count / 3)`` (the standard VQA recipe),
            ``"loo"`` = the leave-one-out average the official metric uses.
        initializer_range: Std of the normal init of the reader's own weights.
        copy_from_context: Copy answers from the captions (an extractive pointer): an
            answer of the vocabulary that occurs in the retrieved captions gets, on top of
            its classifier logit, a pointer score from the ``[CLS]`` state and the state
            of its first token there. The answer a card names is then read, not learnt
            per class from its own few examples. ``False`` here (a config saved before the
            option loads as the model it was); ``from_backbones`` passes
            ``ReaderSettings.copy_from_context`` (True).
    """

    model_type = "rvqa-reader"

    # `top_k` is also a generation parameter name; PreTrainedConfig refuses to save
    # those unless they are declared fields of the config class, so declare it.
    top_k: int = _S.top_k

    def __init__(
        self,
        text_config: dict | None = None,
        vision_config: dict | None = None,
        text_backbone: str = _S.text_backbone,
        vision_backbone: str = "cnn",
        image_size: int = _S.image_size,
        visual_grid: int | None = _S.visual_grid,
        max_visual_tokens: int = 64,
        top_k: int = _S.top_k,
        max_question_length: int = _S.max_question_length,
        max_caption_length: int = _S.max_caption_length,
        use_retrieval_scores: bool = _S.use_retrieval_scores,
        classifier_hidden: int | None = None,
        dropout: float = 0.1,
        freeze_vision: bool = _S.freeze_vision,
        freeze_word_embeddings: bool = _S.freeze_word_embeddings,
        answers: Sequence[str] | None = None,
        soft_target_rule: str = "min3",
        initializer_range: float = 0.02,
        copy_from_context: bool = False,
        **kwargs: Any,
    ):
        optional = (("visual_grid", visual_grid), ("classifier_hidden", classifier_hidden))
        for name, value, low in (
            ("top_k", top_k, 0),
            ("max_question_length", max_question_length, 1),
            ("max_caption_length", max_caption_length, 1),
            ("max_visual_tokens", max_visual_tokens, 1),
            *((n, v, 1) for n, v in optional if v is not None),
        ):
            try:
                check_int(value, name, low)
            except (TypeError, UsageError) as err:  # a config value: always a ConfigError
                raise ConfigError(str(err)) from None
        if soft_target_rule not in SOFT_TARGET_RULES:
            raise ConfigError(
                f"soft_target_rule must be one of {', '.join(SOFT_TARGET_RULES)}; "
                f"got {soft_target_rule!r}"
            )
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
        answers = [] if answers is None else list(answers)
        if not all(isinstance(a, str) for a in answers):
            raise TypeError("answers must be a list of strings")
        if len(set(answers)) != len(answers):
            raise ConfigError("answers must be unique (the vocabulary has duplicates)")
        for name, value in (("text_config", text_config), ("vision_config", vision_config)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a config dict (with model_type), got {value!r}")

        self.text_config = dict(text_config) if text_config else None
        self.vision_config = dict(vision_config) if vision_config else None
        self.text_backbone = text_backbone
        self.vision_backbone = vision_backbone
        self.image_size = image_size
        self.visual_grid = visual_grid
        self.max_visual_tokens = max_visual_tokens
        self.top_k = top_k
        self.max_question_length = max_question_length
        self.max_caption_length = max_caption_length
        self.use_retrieval_scores = use_retrieval_scores
        self.classifier_hidden = classifier_hidden
        self.dropout = float(dropout)
        self.freeze_vision = bool(freeze_vision)
        self.freeze_word_embeddings = bool(freeze_word_embeddings)
        self.answers = answers
        self.soft_target_rule = soft_target_rule
        self.initializer_range = initializer_range
        self.copy_from_context = bool(copy_from_context)
        super().__init__(**kwargs)

    @property
    def num_answers(self) -> int:
        """Size of the answer vocabulary (the classifier's output width)."""
        return len(self.answers)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> Any:
        """The text tower's config as a ``PretrainedConfig`` (generic transformers code asks).

        The base implementation would hand back the plain ``text_config`` dict.
        """
        if not self.text_config:
            return self

        return tower_config_from_dict(self.text_config)


class GenerativeReaderConfig(PretrainedConfig):
    """Configuration of :class:`~rvqa.reader.generative.GenerativeReaderModel`.

    A T5 encoder-decoder reads the image tower's features (projected to ``d_model``)
    followed by the tokens of ``question: Q context: caption_1 ; caption_2 ...`` and
    generates the answer. Fields shared with :class:`rvqa.config.ReaderSettings` take
    their defaults from there, except ``vision_backbone`` (``"cnn"``, as
    :class:`ReaderConfig`'s: a config built by hand has no retriever tower).

    Args:
        t5_config: Config dict (``model_type`` ``"t5"``) of the encoder-decoder.
        vision_config: Config dict of the image tower (as :class:`ReaderConfig`'s).
        t5_backbone: ``"scratch"`` (trained from scratch, with a SentencePiece tokenizer
            trained on the task's text) or the T5 checkpoint the weights came from.
        vision_backbone: Name the image weights came from (``"cnn"``, ``"retriever"``, a
            checkpoint).
        image_size: The small CNN's input side (recorded only for checkpoints).
        visual_grid: Visual tokens per side (``None``: the tower's tokens as they are).
        top_k: Default number of retrieved captions per question.
        max_question_length: Question tokens kept.
        max_caption_length: Tokens kept per caption.
        max_input_length: Text tokens the encoder reads at most (prompt words,
            question, captions and end-of-sequence; the visual tokens come on top).
        max_answer_length: Answer tokens generated at most (end-of-sequence excluded).
        num_beams: Beam search width (1 = greedy).
        copy_from_context: A copy head (pointer-generator) mixes a pointer over the read
            text tokens into T5's output distribution
            (:class:`~rvqa.reader.generative.CopyT5ForConditionalGeneration`). False here
            (a reader saved before the head existed loads as it was trained);
            ``from_backbones`` passes ``ReaderSettings.copy_from_context`` (True).
        freeze_vision: Keep the image tower fixed (features cacheable per image).
        initializer_range: Std of the normal init of the visual projection.
    """

    model_type = "rvqa-generative-reader"

    # Generation parameter names: declared fields so that PreTrainedConfig saves them.
    top_k: int = _S.top_k
    num_beams: int = _S.num_beams

    def __init__(
        self,
        t5_config: dict | None = None,
        vision_config: dict | None = None,
        t5_backbone: str = _S.t5_backbone,
        vision_backbone: str = "cnn",
        image_size: int = _S.image_size,
        visual_grid: int | None = _S.visual_grid,
        top_k: int = _S.top_k,
        max_question_length: int = _S.max_question_length,
        max_caption_length: int = _S.max_caption_length,
        max_input_length: int = _S.max_input_length,
        max_answer_length: int = _S.max_answer_length,
        num_beams: int = _S.num_beams,
        copy_from_context: bool = False,
        freeze_vision: bool = _S.freeze_vision,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ):
        for name, value, low in (
            ("top_k", top_k, 0),
            ("max_question_length", max_question_length, 1),
            ("max_caption_length", max_caption_length, 1),
            ("max_input_length", max_input_length, 1),
            ("max_answer_length", max_answer_length, 1),
            ("num_beams", num_beams, 1),
            *((("visual_grid", visual_grid, 1),) if visual_grid is not None else ()),
        ):
            try:
                check_int(value, name, low)
            except (TypeError, UsageError) as err:  # a config value: always a ConfigError
                raise ConfigError(str(err)) from None
        for name, value in (("t5_config", t5_config), ("vision_config", vision_config)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a config dict (with model_type), got {value!r}")
        self.t5_config = dict(t5_config) if t5_config else None
        self.vision_config = dict(vision_config) if vision_config else None
        self.t5_backbone = t5_backbone
        self.vision_backbone = vision_backbone
        self.image_size = image_size
        self.visual_grid = visual_grid
        self.top_k = top_k
        self.max_question_length = max_question_length
        self.max_caption_length = max_caption_length
        self.max_input_length = max_input_length
        self.max_answer_length = max_answer_length
        self.num_beams = num_beams
        self.copy_from_context = bool(copy_from_context)
        self.freeze_vision = bool(freeze_vision)
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> Any:
        """The T5 config as a ``PretrainedConfig`` (generic transformers code asks)."""
        if not self.t5_config:
            return self
        return tower_config_from_dict(self.t5_config)


# The one registration of the reader configs (the model classes are registered in
# modeling.py and generative.py).
AutoConfig.register(ReaderConfig.model_type, ReaderConfig, exist_ok=True)
AutoConfig.register(GenerativeReaderConfig.model_type, GenerativeReaderConfig, exist_ok=True)
