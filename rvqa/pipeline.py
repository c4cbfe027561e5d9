"""The Python API: ``RVQA`` answers questions about images, with evidence.

    >>> from rvqa import RVQA
    >>> model = RVQA.from_pretrained("runs/demo")
    >>> out = model.answer("image.png", "What color is the shape?", top_k=5)
    >>> out.answer, out.score, out.evidence[0]

Knowledge indices live in a thread-safe registry: ``load_index`` / ``swap_index``
/ ``unload_index`` change it while other threads keep answering; every call
takes one snapshot of the registry, so each answer comes from exactly one index
state. A swap validates the new index against the loaded retriever before
anything changes: a bad index leaves the old one serving.

Placement: the retriever and reader live on ``device`` (default: CUDA when
available, as :func:`rvqa.distributed.run_device`); with ``use_gpu=True`` the
indices search on GPU (sharded over the GPUs faiss sees, or only ``device``'s
GPU when it names one; CPU with one warning where faiss has none; see
:mod:`rvqa.retriever.index.knowledge_index`). :meth:`RVQA.placement` says where
each component is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from rvqa.checks import check_int
from rvqa.config import ReaderSettings
from rvqa.data.images import ImageLoadError, image_key, load_image
from rvqa.distributed import bf16_supported
from rvqa.errors import DataFormatError, RunFolderError, UnknownIndexError, UsageError
from rvqa.reader.auto import is_generative, load_reader
from rvqa.reader.modeling import ReaderModel
from rvqa.reader.processing import PROCESSOR_FILE, ReaderProcessor
from rvqa.retriever.index import IndexRegistry, KnowledgeIndex, read_manifest
from rvqa.retriever.modeling import RetrieverModel
from rvqa.retriever.reranker import RerankerModel
from rvqa.run_layout import read_run_file
from rvqa.towers import tensor_state_key
from rvqa.training import VOLATILE_CONFIG_KEYS

logger = logging.getLogger(__name__)


class _AllIndices:
    def __repr__(self) -> str:
        return "ALL_INDICES"


ALL_INDICES: Any = _AllIndices()
"""Default of ``index=``: search every loaded index (merged by score)."""


class Evidence(NamedTuple):
    """One retrieved caption that the reader read.

    ``score`` is the retrieval score (what the reader was trained to read).
    ``uncertainty``: with a probabilistic (PCME) retriever, the caption's uncertainty
    stored in its index (the geometric mean of its Gaussian's σ²; larger = vaguer,
    e.g. a caption that fits many images); ``None`` otherwise. With re-ranking
    (``rerank=N``): ``rerank_score``, the re-ranker's logit (the order of the
    evidence), and ``retrieval_rank``, the caption's rank (1 = best) among the N its
    index returned; ``None`` otherwise.
    """

    text: str
    score: float
    index: str
    id: Any
    uncertainty: float | None = None
    rerank_score: float | None = None
    retrieval_rank: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict; ``uncertainty`` only where there is one (a PCME retriever),
        ``rerank_score`` / ``retrieval_rank`` only with re-ranking."""
        d = self._asdict()
        for key in ("uncertainty", "rerank_score", "retrieval_rank"):
            if d[key] is None:
                del d[key]
        return d


@dataclass
class Answer:
    """The result of :meth:`RVQA.answer`.

    Attributes:
        answer: The predicted answer.
        score: Its probability: the sigmoid of the classifier's logit, or the generative
            reader's sequence probability ``exp(Σ log p(token))``.
        alternatives: The next best answers with their probabilities (the generative
            reader's other beams).
        evidence: The captions the reader read: (text, score, index name, id).
        question: The question as asked.
        empty: The generative reader generated nothing but end-of-sequence: ``answer``
            is ``""`` (with its probability in ``score``), never silently.
        uncertainty: With a probabilistic (PCME) retriever, the query image's
            uncertainty: the geometric mean of σ² of its Gaussian embedding (larger =
            more ambiguous); ``None`` for other retrievers or without retrieval.
        notes: What the caller should know about how the answer was made, e.g. that
            ``rerank=N`` asked for more captions than the indices hold (then every
            caption they hold was re-ranked).
    """

    answer: str
    score: float
    alternatives: list[tuple[str, float]] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    question: str = ""
    empty: bool = False
    uncertainty: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict (``empty``: the answer is an empty generation; ``uncertainty``
        only with a probabilistic (PCME) retriever)."""
        d = {
            "question": self.question,
            "answer": self.answer,
            "empty": self.empty,
            "score": self.score,
            "alternatives": [{"answer": a, "score": s} for a, s in self.alternatives],
            "evidence": [e.to_dict() for e in self.evidence],
        }
        if self.uncertainty is not None:
            d["uncertainty"] = self.uncertainty
        if self.notes:
            d["notes"] = list(self.notes)
        return d


def _require(path: Path, files: Sequence[str], what: str) -> None:
    if not path.is_dir():
        raise RunFolderError(f"{what} folder {path} does not exist")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise RunFolderError(f"{what} folder {path} is missing {', '.join(missing)}")


class RVQA:
    """Retriever + knowledge indices + reader, answering questions about images.

    Build with :meth:`from_pretrained` (a run folder written by training or
    ``rvqa demo``) or from loaded components.

    Attributes:
        answers: The classifier reader's answer vocabulary (``None`` for the generative
            reader, whose answers are free text).
        generative: Whether the reader generates its answers (``reader.type: generative``).
        default_top_k: Captions retrieved when ``top_k`` is not given (the run's).
        max_top_k: The largest ``top_k`` whose captions always fit the reader's text
            positions (``None``: no known limit).
        registry: The loaded knowledge indices (:class:`rvqa.retriever.index.IndexRegistry`).
        use_gpu: Whether indices loaded by this model search on GPU (the default of
            :meth:`load_index`, :meth:`swap_index` and :meth:`use_indices`).
        nprobe: ``nprobe`` for the IVF indices this model loads (``None``: as built).
        ef_search: ``efSearch`` for the HNSW indices this model loads (``None``: as built).
        precision: ``"float32"``, or ``"bf16"``: retriever and reader run under bfloat16
            autocast (faster on GPUs and on CPUs with AVX512-BF16 / AMX; answers may
            differ from float32 ones in their last digits, rarely in their choice).
        reranker: The cross-attention re-ranker ``rerank=N`` uses
            (:class:`rvqa.retriever.reranker.RerankerModel`), or ``None``
            (:meth:`load_reranker` adds one).
        share_image_tower: Whether the reader may read its image features off the
            retriever's tower pass (default True; see :attr:`image_tower_shared`, which
            says whether it does).
    """

    def __init__(
        self,
        retriever: RetrieverModel,
        reader: Any,
        processor: ReaderProcessor,
        *,
        top_k: int | None = None,
        device: str | torch.device | None = None,
        run_dir: str | Path | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool = False,
        precision: str = "float32",
        reranker: RerankerModel | None = None,
    ):
        self.device = _resolve_device(device)
        self.precision = _check_precision(precision, self.device)
        self.retriever = retriever.to(self.device).eval()
        self.reader = reader.to(self.device).eval()
        self.processor = processor
        self.generative = is_generative(reader)
        self.answers = None if self.generative else list(reader.config.answers)
        self.max_top_k = _max_top_k(self.reader, processor)
        # A reader trained without retrieval (top_k 0) answers without captions; should an
        # index be loaded anyway, it reads the run settings' default number of captions.
        k = top_k if top_k is not None else (reader.config.top_k or ReaderSettings.top_k)
        self.default_top_k = _check_top_k(k)
        if self.max_top_k is not None and self.default_top_k > self.max_top_k:
            logger.warning(
                "top_k=%d may not fit the reader's text (at most %d captions always fit)",
                self.default_top_k,
                self.max_top_k,
            )
        self.run_dir = Path(run_dir) if run_dir else None
        for key, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None:
                check_int(value, key, minimum=1)
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.use_gpu = bool(use_gpu)
        self.registry = IndexRegistry(use_gpu=self.use_gpu, gpus=self._index_gpus())
        self._swap_lock = threading.Lock()
        # (retriever object, its fingerprint): hashing every weight once, not per index load.
        self._fingerprint: tuple[Any, str] | None = None
        self._tower_check = _SharedTowerCheck()
        self._share_image_tower = True
        if self.image_tower_shared:
            logger.info("the reader's image tower is the retriever's: one tower pass per image")
        self.reranker: RerankerModel | None = None
        if reranker is not None:
            self.load_reranker(reranker)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        run_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        load_indices: bool = True,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool = False,
        precision: str = "float32",
        reranker: str | Path | bool | None = None,
    ) -> RVQA:
        """Load a run folder: retriever, reader, its default knowledge index(es) and
        the re-ranker it recorded, if any.

        Args:
            run_dir: Folder with ``rvqa_run.json`` (written by ``rvqa train-reader``
                and ``rvqa demo``).
            device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
            load_indices: Load the indices the run recorded.
            nprobe: IVF indices: inverted lists probed per query, for every index this
                model loads that has the parameter (default: the value tuned at build
                time). Also the default of later :meth:`load_index` calls.
            ef_search: HNSW indices: ``efSearch``, likewise.
            use_gpu: Search the indices on GPU (``index.use_gpu`` / ``--gpu-index``):
                sharded over the GPUs faiss sees, or only ``device``'s GPU when it
                names one (``cuda:1``); CPU with one warning where faiss has no GPU.
            precision: ``"float32"`` (default) or ``"bf16"`` (bfloat16 autocast; see
                :class:`RVQA`).
            reranker: A re-ranker folder to load instead of the run's; ``False``: none;
                ``True``: the run's, which must exist (default ``None``: the one
                ``rvqa_run.json`` records, if any).

        Raises:
            RunFolderError: The folder, ``rvqa_run.json`` or a component file is
                missing (named in the message).
            IndexMismatchError: The re-ranker was trained for another retriever.
            RunFolderError: ``reranker=True`` and the run records none, or the re-ranker
                folder does not exist.
            ValueError: ``rvqa_run.json`` is malformed.
            UsageError: ``device`` is unknown or not available; ``nprobe`` /
                ``ef_search`` not a positive integer; ``precision`` unknown, or bf16
                on a device without bf16 support.
        """
        _check_precision(precision, _resolve_device(device))  # fail before loading anything
        for key, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None:
                check_int(value, key, minimum=1)
        run = read_run_file(run_dir)
        retriever_path, reader_path = run.retriever, run.reader
        # The retriever embeds the query images (its image processor is needed); the
        # reader reads text (its tokenizer is needed: without a vocabulary file
        # transformers silently builds a 5-token tokenizer) and pixels.
        _require(
            retriever_path,
            ("config.json", "model.safetensors", "preprocessor_config.json"),
            "retriever",
        )
        _require(reader_path, ("config.json", "model.safetensors", PROCESSOR_FILE), "reader")
        _require_tokenizer(reader_path, "reader")
        try:
            budgets = json.loads((reader_path / PROCESSOR_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataFormatError(f"{reader_path / PROCESSOR_FILE} is malformed: {err}") from None
        if budgets.get("has_image_processor", True):
            _require(reader_path, ("preprocessor_config.json",), "reader")
        retriever = RetrieverModel.from_pretrained(retriever_path)
        reader, processor = load_reader(reader_path)  # either type, by its saved model_type
        model = cls(
            retriever,
            reader,
            processor,
            top_k=run.top_k or None,  # None: the reader's own (0: trained without retrieval)
            device=device,
            run_dir=run.run_dir,
            nprobe=nprobe,
            ef_search=ef_search,
            use_gpu=use_gpu,
            precision=precision,
        )
        if reranker is True and run.reranker is None:
            raise RunFolderError(
                f"{run.run_dir / 'rvqa_run.json'} records no re-ranker (train one with "
                "`rvqa train-reranker`, or pass reranker=PATH)"
            )
        chosen = run.reranker if reranker in (None, True) else (reranker or None)
        if chosen is not None:
            if not Path(chosen).is_dir():
                raise RunFolderError(f"re-ranker folder {chosen} does not exist")
            model.load_reranker(chosen)
        if load_indices:
            for name, path in run.indices.items():
                model.load_index(path, name=name)
        return model

    def load_reranker(self, reranker: str | Path | RerankerModel) -> None:
        """Use a re-ranker for ``rerank=N`` (a folder written by ``rvqa train-reranker``,
        or a loaded model); replaces the current one for subsequent calls. By default
        it keeps the word features of the last 4,096 distinct captions it scored
        (``reranker.set_caption_cache(n)``; 0: none), so recurring captions are not
        encoded again.

        Raises:
            FileNotFoundError: The folder or one of its files is missing.
            IndexMismatchError: It was trained for another retriever (both fingerprints
                named); the current re-ranker stays.
            UsageError: A model without its tokenizer.
        """
        if isinstance(reranker, RerankerModel):
            model, where = reranker, ""
        else:
            model, where = RerankerModel.from_pretrained(reranker), str(reranker)
        if model.tokenizer is None:
            raise UsageError("the re-ranker has no tokenizer attached (set model.tokenizer)")
        model.check_retriever(self._retriever_fingerprint(), where)
        self.reranker = model.to(self.device).eval()

    @property
    def share_image_tower(self) -> bool:
        """Read the reader's image features off the retriever's tower pass where they
        are the same (:attr:`image_tower_shared`; default True). False: the reader always
        runs its own tower. Setting it (either way) also forgets the last check."""
        return self._share_image_tower

    @share_image_tower.setter
    def share_image_tower(self, value: bool) -> None:
        self._share_image_tower = bool(value)
        self._tower_check.forget()

    @property
    def image_tower_shared(self) -> bool:
        """Whether each image goes through one image tower, not two: the reader's
        features are read off the retriever's pass. True when :attr:`share_image_tower`
        is on and the reader's tower is the retriever's, as a reader trained with
        ``vision_backbone: retriever`` and ``freeze_vision`` has it: equal weights and
        config (but its output grid), equal image processing, both towers in eval mode,
        and on two probe images the features the reader reads equal those pooled from
        the retriever's tokens. Checked again when a weight of either tower is replaced,
        changed in place (its version counter: not by writing to ``.data``), moved or
        cast, when a tower's or image processor's setting changes, and when
        :attr:`share_image_tower` is set."""
        return self._share_image_tower and self._tower_check(
            self.retriever, self.reader, self.processor
        )

    # ------------------------------------------------------------------ indices

    @property
    def indices(self) -> dict[str, dict]:
        """Loaded indices, in loading order: name → manifest (a copy)."""
        out = {}
        for n in self.registry.names:
            try:
                out[n] = self.registry.get(n).manifest
            except KeyError:  # unloaded by another thread meanwhile
                pass
        return out

    def _retriever_fingerprint(self) -> str:
        cached = self._fingerprint
        if cached is None or cached[0] is not self.retriever:
            cached = (self.retriever, self.retriever.fingerprint())
            self._fingerprint = cached
        return cached[1]

    def _search_params(
        self, path: str | Path, nprobe: int | None, ef_search: int | None
    ) -> dict[str, int]:
        """The ``nprobe`` / ``ef_search`` overrides that apply to the index at ``path``.

        Values given for this index must fit its type; the model's defaults
        (:attr:`nprobe`, :attr:`ef_search`) apply to the indices that have that
        parameter and leave the others as built.
        """
        given = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
        defaults = {
            k: v
            for k, v in (("nprobe", self.nprobe), ("ef_search", self.ef_search))
            if v is not None and k not in given
        }
        if not given and not defaults:
            return {}
        for key, value in given.items():
            check_int(value, key, minimum=1)
        factory = read_manifest(Path(path))["factory"]
        knob = _search_knob(factory)
        for key in given.keys() - {knob}:
            what = f"its search parameter is {knob}" if knob else "exact search, no parameter"
            raise UsageError(f"{key} does not apply to index {path} ({factory}: {what})")
        for key in defaults.keys() - {knob}:  # a warning: --nprobe/--ef-search were asked for
            logger.warning("%s does not apply to index %s (%s); left as built", key, path, factory)
        return {k: int(v) for k, v in {**defaults, **given}.items() if k == knob}

    def _index_gpus(self) -> list[int] | None:
        """The GPUs indices shard over: ``device``'s when it names one, else all (None)."""
        if self.device.type == "cuda" and self.device.index is not None:
            return [self.device.index]
        return None

    def placement(self) -> dict[str, str]:
        """Where each component is: ``retriever``/``reader`` (and ``reranker`` when one is
        loaded) → torch device, and
        ``index.NAME`` → ``faiss-gpu`` / ``faiss-cpu`` for every loaded index."""
        from rvqa.distributed import device_name

        out = {"retriever": device_name(self.retriever), "reader": device_name(self.reader)}
        if self.reranker is not None:
            out["reranker"] = device_name(self.reranker)
        for name in self.registry.names:
            try:
                out[f"index.{name}"] = device_name(self.registry.get(name))
            except KeyError:  # unloaded by another thread meanwhile
                pass
        return out

    def _load(
        self,
        path: str | Path,
        name: str,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool | None = None,
    ) -> KnowledgeIndex:
        params = self._search_params(path, nprobe, ef_search)
        # Checked against the cached fingerprint (the check is the same as passing the
        # retriever, which would hash all its weights again on every load or swap).
        index = KnowledgeIndex.load(
            path,
            retriever=self._retriever_fingerprint(),
            name=name,
            use_gpu=self.use_gpu if use_gpu is None else bool(use_gpu),
            gpus=self._index_gpus(),
            **params,
        )
        index.encoder = self.retriever  # enables index.search_images / index.add
        return index

    def load_index(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool | None = None,
    ) -> str:
        """Load a knowledge index folder under ``name`` (default: the folder name).

        Args:
            path: The index folder.
            name: The name to load it under (default: the folder name).
            nprobe: IVF indices: inverted lists probed per query (default: the model's
                :attr:`nprobe`, else the value tuned at build time).
            ef_search: HNSW indices: ``efSearch`` (default: the model's
                :attr:`ef_search`, else the value tuned at build time).
            use_gpu: Search it on GPU (default: the model's :attr:`use_gpu`).

        Returns:
            The name it is loaded under.

        Raises:
            FileNotFoundError: The folder or one of its files is missing.
            IndexMismatchError: The index was built with another retriever (both
                fingerprints named).
            UsageError: ``name`` is already loaded (use :meth:`swap_index`), or
                ``nprobe`` / ``ef_search`` is given for an index without that parameter.
        """
        name = name or Path(path).resolve().name
        with self._swap_lock:
            if name in self.registry:
                raise UsageError(f"an index named {name!r} is loaded already; use swap_index")
            self.registry.register(name, self._load(path, name, nprobe, ef_search, use_gpu))
        return name

    def swap_index(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool | None = None,
    ) -> None:
        """Replace the index ``name`` for subsequent calls (no retraining).

        The new index is loaded and checked against the retriever first; if that
        fails, the old index keeps serving and the error is raised. Calls already
        running finish with the old index. A ``name`` that is not loaded yet is
        simply loaded. ``nprobe`` / ``ef_search`` / ``use_gpu`` as in :meth:`load_index`.

        Raises:
            FileNotFoundError: The folder or one of its files is missing.
            IndexMismatchError: The index was built with another retriever (both
                fingerprints named).
            UsageError: ``nprobe`` / ``ef_search`` given for an index without it.
        """
        name = name or Path(path).resolve().name
        new = self._load(path, name, nprobe, ef_search, use_gpu)  # validates first
        with self._swap_lock:
            self.registry.swap(name, new)

    def use_indices(self, specs: Sequence[str | Path], *, use_gpu: bool | None = None) -> list[str]:
        """Resolve index choices (``rvqa ask/evaluate --index``) to loaded index names.

        Each item is an index folder or the name of a loaded index. A folder is
        loaded under its folder name, replacing (:meth:`swap_index`) a loaded index
        of that name (e.g. a newer build of the run's own index). The model's
        :attr:`nprobe` / :attr:`ef_search` apply to the folders loaded here.

        Args:
            specs: Index folders and/or loaded index names.
            use_gpu: Search the folders loaded here on GPU (default: the model's
                :attr:`use_gpu`).

        Returns:
            The names, in order, without repeats; pass them as ``index=`` to
            :meth:`answer` (an empty ``specs`` gives ``[]``: use the default,
            :data:`ALL_INDICES`, to search every loaded index).

        Raises:
            UnknownIndexError: An item is neither a folder nor a loaded index name
                (the loaded ones are listed).
        """
        if isinstance(specs, (str, Path)):
            specs = [specs]
        names: list[str] = []
        for spec in specs:
            path = Path(spec)
            if path.is_dir():
                name = path.resolve().name
                if name in self.registry:
                    self.swap_index(path, name=name, use_gpu=use_gpu)
                else:
                    self.load_index(path, name=name, use_gpu=use_gpu)
            elif isinstance(spec, str) and spec in self.registry:
                name = spec
            else:
                known = ", ".join(self.registry.names) or "none"
                raise UnknownIndexError(
                    f"index {str(spec)!r} is neither an index folder nor the name of a loaded "
                    f"index (loaded: {known})"
                )
            if name not in names:
                names.append(name)
        return names

    def unload_index(self, name: str) -> None:
        """Stop using an index.

        Raises:
            KeyError: No index of that name is loaded (the loaded ones are listed).
        """
        with self._swap_lock:
            self.registry.unload(name)

    # ------------------------------------------------------------------ answering

    def answer(
        self,
        image: Any,
        question: str,
        top_k: int | None = None,
        index: str | Sequence[str] | None = ALL_INDICES,
        num_alternatives: int = 4,
        rerank: int | None = None,
    ) -> Answer:
        """Answer one question about one image.

        Args:
            image: A path, a ``PIL.Image`` or an H×W×C uint8 array.
            question: The question (a non-empty string).
            top_k: Captions to retrieve (default: what the reader was trained with).
            index: An index name, a list of names (results merged by score), the
                default (every loaded index), or ``None`` / ``[]`` to answer without
                retrieval.
            num_alternatives: How many runner-up answers to report.
            rerank: Retrieve the top ``rerank`` captions (N ≥ ``top_k``) from each index,
                re-order all of them with the re-ranker (:attr:`reranker`) and read the
                best ``top_k``; the evidence keeps both scores and each caption's rank in
                its index's top N. ``None`` / 0: no re-ranking. More than an index holds
                re-ranks what it holds (said in :attr:`Answer.notes`).

        Raises:
            TypeError: ``question`` is not a string, ``top_k`` not an int, ``image`` of
                an unsupported type or an array that is not uint8.
            ValueError: An empty question, ``top_k`` < 1 (``UsageError``), an image that cannot be
                loaded (missing, corrupt, not an image, wrong array shape, too large);
                ``rerank`` below ``top_k`` or without a re-ranker loaded (``UsageError``).
            UnknownIndexError: An unknown index name (the loaded ones are listed; a KeyError).
        """
        _check_question(question, "question")
        return self.answer_batch(
            [image], [question], top_k, index, num_alternatives, rerank=rerank
        )[0]

    @torch.inference_mode()
    def answer_batch(
        self,
        images: Sequence[Any],
        questions: Sequence[str],
        top_k: int | None = None,
        index: str | Sequence[str] | None = ALL_INDICES,
        num_alternatives: int = 4,
        batch_size: int = 64,
        evidence: Sequence[Sequence[Evidence | tuple[str, float]]] | None = None,
        rerank: int | None = None,
    ) -> list[Answer]:
        """Answer a batch: one retrieval search and one reader forward per ``batch_size``.

        Arguments and errors are those of :meth:`answer`, with one image per question
        (an image error in a batch names the image's position). The results equal
        calling :meth:`answer` for each question, up to float rounding (an exact index
        searches a batch of queries by matrix multiplication, one query by a scan).

        Args:
            evidence: Instead of retrieving, read these captions: per question a list
                of :class:`Evidence` or ``(text, score)`` pairs (e.g. from
                :meth:`retrieve`, edited; or oracle captions). Excludes ``top_k``,
                ``index`` and ``rerank``.
            rerank: As in :meth:`answer`.
        """
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            raise TypeError(
                f"images must be a list with one image per question, got {type(images).__name__}"
            )
        if isinstance(questions, str) or not isinstance(questions, Sequence):
            raise TypeError(f"questions must be a list of strings, got {type(questions).__name__}")
        if len(images) != len(questions):
            raise UsageError(f"got {len(images)} images but {len(questions)} questions")
        for i, q in enumerate(questions):
            _check_question(q, f"question {i}")
        n_alt = check_int(num_alternatives, "num_alternatives", minimum=0)
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        if evidence is not None:
            if top_k is not None or index is not ALL_INDICES or rerank:
                raise UsageError(
                    "evidence= replaces retrieval: do not pass top_k, index or rerank with it"
                )
            given = self._check_evidence(evidence, len(questions))
            k, names, n_rerank = 0, None, None
        else:
            k = self.default_top_k if top_k is None else self._check_top_k(top_k)
            names = self._resolve_index(index)
            n_rerank = self._check_rerank(rerank, k)
        out: list[Answer] = []
        with self._autocast():
            for s in range(0, len(images), batch_size):
                pil, rows = _distinct_images(images, s, batch_size)
                qs = list(questions[s : s + batch_size])
                unc: list = [None] * len(pil)
                notes: list[list[str]] = [[] for _ in pil]
                tokens = None
                if evidence is not None:
                    ev = given[s : s + batch_size]
                else:
                    shared = self.image_tower_shared
                    found, unc, notes, tokens = self._retrieve(
                        pil, k, names, n_rerank, return_tokens=shared
                    )
                    ev = [found[r] for r in rows]
                    if not shared:  # (a re-ranker reads them too: not the reader then)
                        tokens = None
                answers = self._read(pil, rows, qs, ev, n_alt, tokens)
                for a, r in zip(answers, rows):
                    a.uncertainty = unc[r]
                    a.notes = list(notes[r])
                out.extend(answers)
        return out

    @torch.inference_mode()
    def retrieve(
        self,
        images: Sequence[Any],
        top_k: int | None = None,
        index: str | Sequence[str] | None = ALL_INDICES,
        batch_size: int = 64,
        rerank: int | None = None,
    ) -> list[list[Evidence]]:
        """The captions :meth:`answer_batch` would read for each image, without reading.

        Arguments and errors are those of :meth:`answer_batch`; ``index=None`` gives
        empty lists. A ``rerank`` beyond what the indices hold is logged (no
        :class:`Answer` to note it in).
        """
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            raise TypeError(f"images must be a list of images, got {type(images).__name__}")
        k = self.default_top_k if top_k is None else self._check_top_k(top_k)
        names = self._resolve_index(index)
        n_rerank = self._check_rerank(rerank, k)
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        out: list[list[Evidence]] = []
        with self._autocast():
            for s in range(0, len(images), batch_size):
                pil, rows = _distinct_images(images, s, batch_size)
                found, _, notes, _ = self._retrieve(pil, k, names, n_rerank)
                for note in sorted({n for ns in notes for n in ns}):
                    logger.warning("%s", note)
                out.extend(list(found[r]) for r in rows)
        return out

    def _autocast(self) -> Any:
        """bfloat16 autocast when ``precision="bf16"``, else nothing."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_evidence(self, evidence: Any, n: int) -> list[list[Evidence]]:
        if isinstance(evidence, (str, bytes)) or not isinstance(evidence, Sequence):
            raise TypeError(
                f"evidence must be a list (one list of captions per question), "
                f"got {type(evidence).__name__}"
            )
        if len(evidence) != n:
            raise UsageError(f"got evidence for {len(evidence)} questions but {n} questions")
        out = []
        for i, ev in enumerate(evidence):
            if isinstance(ev, (str, bytes)) or not isinstance(ev, Sequence):
                raise TypeError(
                    f"evidence[{i}] must be a list of Evidence or (text, score) pairs, "
                    f"got {type(ev).__name__}"
                )
            if self.max_top_k is not None and len(ev) > self.max_top_k:
                raise UsageError(
                    f"evidence[{i}] has {len(ev)} captions; the reader fits at most {self.max_top_k}"
                )
            row = []
            for j, e in enumerate(ev):
                if isinstance(e, Evidence):
                    row.append(e)
                    continue
                ok = isinstance(e, (tuple, list)) and len(e) == 2
                if not ok or not isinstance(e[0], str) or not isinstance(e[1], (int, float)):
                    raise TypeError(
                        f"evidence[{i}][{j}] must be an Evidence or a (text, score) pair, got {e!r}"
                    )
                if not e[0].strip():
                    raise UsageError(f"evidence[{i}][{j}] is an empty caption")
                row.append(Evidence(e[0], float(e[1]), "", None))
            out.append(row)
        return out

    def _check_top_k(self, k: Any) -> int:
        k = _check_top_k(k)
        if self.max_top_k is not None and k > self.max_top_k:
            # Checked up front: whether k captions fit would otherwise depend on their
            # lengths, i.e. on the image.
            p = self.processor
            room = (
                f"max_input_length={p.max_input_length} text tokens"
                if self.generative
                else f"{_text_positions(self.reader)} positions"
            )
            raise UsageError(
                f"top_k={k} is more captions than the reader's text fits: at most "
                f"{self.max_top_k} ({room}, questions up to {p.max_question_length} tokens, "
                f"captions up to {p.max_caption_length})"
            )
        return k

    def _resolve_index(self, index: Any) -> list[str] | None:
        if index is None:
            return None
        if index is ALL_INDICES:
            names = self.registry.names
            return names or None
        if isinstance(index, str):
            chosen = [index]
        elif isinstance(index, (list, tuple)):
            chosen = list(index)
        else:
            raise TypeError(
                "index must be an index name, a list of names, None (no retrieval) or "
                f"ALL_INDICES, got {type(index).__name__}"
            )
        if not chosen:
            return None
        for n in chosen:
            if not isinstance(n, str):
                raise TypeError(f"index names must be strings, got {n!r}")
            if n not in self.registry:
                known = ", ".join(self.registry.names) or "none loaded"
                raise UnknownIndexError(f"unknown index {n!r} (loaded: {known})")
        return chosen

    def _check_rerank(self, rerank: Any, k: int) -> int | None:
        """``rerank`` checked: ``None`` (no re-ranking) or N ≥ ``k`` with a re-ranker loaded."""
        if rerank is None or (
            isinstance(rerank, int) and not isinstance(rerank, bool) and rerank == 0
        ):
            return None
        n = check_int(rerank, "rerank", minimum=1)
        if n < k:
            raise UsageError(
                f"rerank={n} re-ranks fewer captions than top_k={k} the reader reads; "
                f"use rerank ≥ {k} (e.g. 50)"
            )
        if self.reranker is None:
            raise UsageError(
                f"rerank={n} needs a re-ranker and none is loaded: train one for this "
                "retriever with `rvqa train-reranker --config CONFIG` (it is recorded in the "
                "run folder and loaded with it), or load a folder with "
                "RVQA.load_reranker(PATH) / `--reranker PATH`"
            )
        return n

    def _retrieve(
        self,
        pil: list,
        k: int,
        names: list[str] | None,
        rerank: int | None = None,
        return_tokens: bool = False,
    ) -> tuple[list[list[Evidence]], list[float | None], list[list[str]], torch.Tensor | None]:
        """Evidence per image, each image's uncertainty (PCME retrievers; else None),
        notes, and the retriever's image-tower tokens (with ``return_tokens`` or
        ``rerank``; None without retrieval). With ``rerank``: the top-``rerank``
        re-ordered by the re-ranker, top ``k`` kept."""
        notes: list[list[str]] = [[] for _ in pil]
        if names is None:
            return [[] for _ in pil], [None] * len(pil), notes, None
        unc: list[float | None] = [None] * len(pil)
        reranker = self.reranker  # one snapshot per call (load_reranker may swap it)
        tokens = None
        if rerank is not None and reranker is None:  # unloaded meanwhile
            raise UsageError("rerank needs a re-ranker and none is loaded")
        want_tokens = rerank is not None or return_tokens
        out = self.retriever.embed_images(
            pil,
            batch_size=len(pil),
            return_logsigma=self.retriever.config.is_probabilistic,
            return_tokens=want_tokens,
        )
        if want_tokens:
            *out, tokens = out
        else:
            out = [out] if isinstance(out, np.ndarray) else list(out)
        emb = out[0]
        if self.retriever.config.is_probabilistic:
            unc = np.exp(2 * out[1].mean(axis=1)).tolist()
        if rerank is None:
            found = [
                [_evidence(h) for h in res.hits] for res in self.registry.search(emb, k, names)
            ]
            return found, unc, notes, tokens
        # each index's own top N (a merged top N would let one index crowd out the others)
        found = [[] for _ in pil]
        for name in names:
            for i, res in enumerate(self.registry.search(emb, rerank, [name])):
                if len(res.hits) < rerank:
                    notes[i].append(
                        f"rerank={rerank} but index {name!r} returned {len(res.hits)} "
                        f"captions: all {len(res.hits)} were re-ranked"
                    )
                found[i].extend(
                    _evidence(h)._replace(retrieval_rank=r) for r, h in enumerate(res.hits, 1)
                )
        logits = reranker.score(
            tokens, [[e.text for e in ev] for ev in found], [[e.score for e in ev] for ev in found]
        )
        reranked = []
        for ev, lg in zip(found, logits):
            order = np.argsort(-lg, kind="stable")[:k]
            reranked.append([ev[j]._replace(rerank_score=float(lg[j])) for j in order])
        return reranked, unc, notes, tokens

    def _read(
        self,
        pil: list,
        rows: list[int],
        questions: list[str],
        evidence: list[list[Evidence]],
        n_alt: int,
        tokens: torch.Tensor | None = None,
    ) -> list[Answer]:
        """Reader forward; ``pil`` are the distinct images, ``rows[i]`` question i's image,
        ``tokens`` the retriever's tower tokens of ``pil`` (when the towers are shared)."""
        retrieved = any(evidence)  # no captions at all: the reader's k = 0 input
        if self.generative:
            return self._generate(pil, rows, questions, evidence, n_alt, tokens)
        batch = self.processor(
            None,
            questions,
            captions=[[e.text for e in ev] for ev in evidence] if retrieved else None,
            scores=[[e.score for e in ev] for ev in evidence] if retrieved else None,
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["visual_features"] = self._visual_features(pil, rows, tokens)  # (B, V, C)
        probs = torch.sigmoid(self.reader(**batch).logits.float())  # (B, A)
        p, idx = probs.topk(min(1 + max(n_alt, 0), probs.shape[-1]), dim=-1)
        answers = []
        for q, ev, pi, ii in zip(questions, evidence, p.tolist(), idx.tolist()):
            ranked = [(self.answers[j], float(v)) for j, v in zip(ii, pi)]
            answers.append(Answer(ranked[0][0], ranked[0][1], ranked[1:], ev, question=q))
        return answers

    def _visual_features(
        self, pil: list, rows: list[int], tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, V, C) image-tower features of each question's image (each distinct image
        once): read off the retriever's ``tokens`` of ``pil`` when given, else the
        reader's own tower run on ``pil``."""
        vision_dtype = next(self.reader.vision_model.parameters()).dtype
        if tokens is not None:
            feats = self.reader.features_from_tokens(tokens.to(vision_dtype))  # (U, V, C)
        else:
            pixels = self.processor.image_processor(images=pil, return_tensors="pt")
            feats = self.reader.vision_features(
                pixels["pixel_values"].to(self.device, vision_dtype)
            )
        return feats[torch.tensor(rows, device=self.device)]

    def _generate(
        self,
        pil: list,
        rows: list[int],
        questions: list[str],
        evidence: list[list[Evidence]],
        n_alt: int,
        tokens: torch.Tensor | None = None,
    ) -> list[Answer]:
        """The generative reader: beam search; score = sequence probability, alternatives =
        the other beams (at most ``num_beams - 1``); an empty generation is flagged."""
        batch = self.processor(None, questions, captions=[[e.text for e in ev] for ev in evidence])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        n = min(1 + n_alt, self.reader.config.num_beams)
        out = self.reader.generate_answers(
            **batch,
            visual_features=self._visual_features(pil, rows, tokens),
            num_return_sequences=n,
        )
        texts = self.processor.decode(out.sequences.flatten(0, 1))
        answers = []
        for i, (q, ev, probs) in enumerate(zip(questions, evidence, out.probs.tolist())):
            ranked: list[tuple[str, float]] = []
            for text, p in zip(texts[i * n : (i + 1) * n], probs):
                if text not in (a for a, _ in ranked):  # beams that decode alike: the best
                    ranked.append((text, float(p)))
            empty = ranked[0][0] == ""
            answers.append(
                Answer(ranked[0][0], ranked[0][1], ranked[1:], ev, question=q, empty=empty)
            )
        empties = [a.question for a in answers if a.empty]
        if empties:  # one line per call, not one per question of an evaluation
            logger.warning(
                "the generative reader generated an empty answer to %d of %d question(s), "
                "e.g. %r (Answer.empty)",
                len(empties),
                len(answers),
                empties[0],
            )
        return answers


class _SharedTowerCheck:
    """Whether a reader's image features can be read off a retriever's tower pass
    (:attr:`RVQA.image_tower_shared`), worked out again only when the towers' weights,
    configs or image processors change. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Any = None
        self._shared = False

    def forget(self) -> None:
        with self._lock:
            self._key = None

    def __call__(self, retriever: RetrieverModel, reader: Any, processor: Any) -> bool:
        ours = getattr(reader, "vision_model", None)
        if ours is None or not hasattr(reader, "features_from_tokens"):
            return False
        theirs = retriever.vision_model
        procs = (retriever.image_processor, getattr(processor, "image_processor", None))
        key = (  # (a weight, a tower setting or an image-processing setting changed: again)
            tensor_state_key(theirs, ours),
            *(_settings(x) for x in (theirs.config, ours.config, *procs)),
            reader.config.visual_grid,
            theirs.training,
            ours.training,
        )
        with self._lock:
            if key != self._key:
                self._shared = _same_image_features(retriever, reader, processor)
                self._key = key
            return self._shared


def _settings(obj: Any) -> Any:
    """A copy of an object's attributes, one level of dicts and lists deep (cheap to take
    and compare: what a config or an image processor is set to)."""
    if obj is None:
        return None
    return {
        k: dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
        for k, v in vars(obj).items()
    }


def _same_image_features(retriever: RetrieverModel, reader: Any, processor: Any) -> bool:
    """See :class:`_SharedTowerCheck`: equal weights (every one the reader's tower has,
    in the retriever's, equal in dtype, device and value), configs (but the output
    grid) and image processors, both towers in eval mode, and equal features of
    two probe images (a probe that fails: not shared)."""
    theirs, ours = retriever.vision_model, reader.vision_model
    procs = (retriever.image_processor, getattr(processor, "image_processor", None))
    if (
        ours.training
        or theirs.training
        or None in procs
        or procs[0].to_dict() != procs[1].to_dict()
    ):
        return False
    configs = [m.config.to_dict() for m in (theirs, ours)]
    for conf in configs:
        for key in (*VOLATILE_CONFIG_KEYS, "grid_size"):
            conf.pop(key, None)
    if configs[0] != configs[1]:
        return False
    mine, other = ours.state_dict(), theirs.state_dict()
    for name, t in mine.items():
        o = other.get(name)
        if o is None or (o.dtype, o.device, o.shape) != (t.dtype, t.device, t.shape):
            return False
        if not torch.equal(o, t):
            return False
    if not mine:
        return False
    # The grids: what the reader pools from its tower's output, pooled from the
    # retriever's tokens instead. Two noise images (a fixed seed) of the processor's size.
    size = getattr(procs[1], "size", None) or {}
    hw = (size.get("height", 64), size.get("width", 64)) if isinstance(size, dict) else (64, 64)
    rng = np.random.default_rng(0)
    probes = [Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)) for _ in range(2)]
    device = next(ours.parameters()).device
    try:
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            _, tokens = retriever.embed_images(probes, return_tokens=True)
            pixels = procs[1](images=probes, return_tensors="pt")["pixel_values"]
            own = reader.vision_features(pixels.to(device, next(ours.parameters()).dtype))
            shared = reader.features_from_tokens(tokens.to(own.dtype))
    except Exception as err:  # noqa: BLE001 - whatever the probe hits, the towers run apart
        logger.info("the reader runs its own image tower (the shared-tower probe failed: %s)", err)
        return False
    return own.shape == shared.shape and torch.allclose(own, shared, rtol=1e-4, atol=1e-5)


def _evidence(hit: Any) -> Evidence:
    return Evidence(hit.text, float(hit.score), hit.index_name, hit.id, hit.uncertainty)


def _distinct_images(images: Sequence[Any], s: int, batch_size: int) -> tuple[list, list[int]]:
    """Load the distinct images of ``images[s:s+batch_size]``; ``rows[i]``: item i's image.

    VQA asks several questions per image: each distinct image is loaded, embedded,
    searched for and run through the image tower once per batch.
    """
    chunk = images[s : s + batch_size]
    keys = [image_key(im) for im in chunk]
    unique: dict[Any, tuple[int, Any]] = {}
    for i, (key, im) in enumerate(zip(keys, chunk), start=s):
        if key not in unique:
            unique[key] = (len(unique), _load_image(im, i, len(images)))
    return [im for _, im in unique.values()], [unique[key][0] for key in keys]


def _require_tokenizer(path: Path, what: str) -> None:
    if not (path / "tokenizer_config.json").is_file():
        raise RunFolderError(f"{what} folder {path} is missing tokenizer_config.json")
    if not any((path / f).is_file() for f in _VOCAB_FILES):
        raise RunFolderError(
            f"{what} folder {path} has no tokenizer vocabulary (expected one of "
            f"{', '.join(_VOCAB_FILES)})"
        )


_VOCAB_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def _resolve_device(device: Any) -> torch.device:
    """``None`` → CUDA when available, else CPU; otherwise a checked ``torch.device``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(
            f"unknown device {device!r}; expected e.g. 'cpu', 'cuda' or 'cuda:1'"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {device!r} requested but CUDA is not available to torch "
                f"{torch.__version__}; use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {device!r} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
    return dev


PRECISIONS = ("float32", "bf16")


def _check_precision(precision: Any, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and not bf16_supported(device):
        what = "this GPU" if device.type == "cuda" else "this CPU (no AVX512-BF16 or AMX)"
        raise UsageError(f"precision 'bf16' is not supported on {what}; use 'float32'")
    return precision


def _load_image(image: Any, i: int, n: int) -> Image.Image:
    """``load_image``, with the image's position named in a batch of several."""
    try:
        return load_image(image)
    except ImageLoadError:
        raise  # names the file already
    except (TypeError, ValueError) as err:
        if n == 1:
            raise
        raise type(err)(f"image {i}: {err}") from None
    except OSError as err:  # a lazily opened PIL image whose data is corrupt or truncated
        where = f"image {i}" if n > 1 else "image"
        raise UsageError(f"{where}: cannot decode the PIL image ({err})") from None


def _check_question(q: Any, what: str) -> None:
    if not isinstance(q, str):
        raise TypeError(f"{what} must be a string, got {type(q).__name__}")
    if not q.strip():
        raise UsageError(
            f"{what} is empty or whitespace; expected a question such as 'what color is the shape?'"
        )


def _search_knob(factory: str) -> str | None:
    """The search parameter of a faiss factory string: ``nprobe`` (IVF), ``ef_search``
    (HNSW graph) or ``None`` (exact search)."""
    if "IVF" in factory:
        return "nprobe"
    if "HNSW" in factory:
        return "ef_search"
    return None


def _text_positions(reader: ReaderModel) -> int | None:
    text_model = getattr(reader, "text_model", None)
    return getattr(getattr(text_model, "config", None), "max_position_embeddings", None)


def _max_top_k(reader: ReaderModel, processor: ReaderProcessor) -> int | None:
    """Most captions that always fit: [CLS] question [SEP] (caption [SEP]) x k, or the
    generative reader's ``max_input_length`` (its processor knows its layout)."""
    if hasattr(processor, "max_captions"):
        return processor.max_captions()
    positions = _text_positions(reader)
    q_len = getattr(processor, "max_question_length", None)
    c_len = getattr(processor, "max_caption_length", None)
    if not all(isinstance(v, int) for v in (positions, q_len, c_len)):
        return None
    return max(0, (positions - q_len - 2) // (c_len + 1))


def _check_top_k(k: Any) -> int:
    try:
        return check_int(k, "top_k", 1)
    except UsageError:
        raise UsageError(
            f"top_k must be ≥ 1, got {k} (use index=None to answer without retrieval)"
        ) from None
