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
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

logger = logging.getLogger(__name__)

RUN_FILE = "rvqa_run.json"


class _AllIndices:
    def __repr__(self) -> str:
        return "ALL_INDICES"


ALL_INDICES: Any = _AllIndices()
"""Default of ``index=``: search every loaded index (merged by score)."""


class Evidence(NamedTuple):
    """One retrieved caption that the reader read."""

    text: str
    score: float
    index: str
    id: Any


@dataclass
class Answer:
    """The result of :meth:`RVQA.answer`.

    Attributes:
        answer: The predicted answer.
        score: Its probability (sigmoid of the reader's logit).
        alternatives: The next best answers with their probabilities.
        evidence: The captions the reader read: (text, score, index name, id).
        question: The question as asked.
    """

    answer: str
    score: float
    alternatives: list[tuple[str, float]] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    question: str = ""

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "question": self.question,
            "answer": self.answer,
            "score": self.score,
            "alternatives": [{"answer": a, "score": s} for a, s in self.alternatives],
            "evidence": [e._asdict() for e in self.evidence],
        }


def _require(path: Path, files: Sequence[str], what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} folder {path} is missing {', '.join(missing)}")


class RVQA:
    """Retriever + knowledge indices + reader, answering questions about images.

    Build with :meth:`from_pretrained` (a run folder written by training or
    ``rvqa demo``) or from loaded components.
    """

    def __init__(
        self,
        retriever: Any,
        reader: Any,
        processor: Any,
        *,
        top_k: int = 5,
        device: str | torch.device | None = None,
        run_dir: str | Path | None = None,
    ):
        from retriever.index import IndexRegistry

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.retriever = retriever.to(self.device).eval()
        self.reader = reader.to(self.device).eval()
        self.processor = processor
        self.answers = list(reader.config.answers)
        self.default_top_k = _check_top_k(top_k)
        self.run_dir = Path(run_dir) if run_dir else None
        self.registry = IndexRegistry()
        self._swap_lock = threading.Lock()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        run_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        load_indices: bool = True,
    ) -> RVQA:
        """Load a run folder: retriever, reader and its default knowledge index(es).

        Args:
            run_dir: Folder with ``rvqa_run.json`` (written by ``rvqa train-reader``
                and ``rvqa demo``).
            device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
            load_indices: Load the indices the run recorded.

        Raises:
            FileNotFoundError: The folder, ``rvqa_run.json`` or a component file is
                missing (named in the message).
        """
        from reader.modeling import ReaderModel
        from reader.processing import PROCESSOR_FILE, ReaderProcessor
        from retriever.modeling import RetrieverModel

        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder {run_dir} does not exist")
        run_file = run_dir / RUN_FILE
        if not run_file.is_file():
            raise FileNotFoundError(
                f"{run_file} is missing: not an rvqa run folder (train with `rvqa train-reader` "
                "or run `rvqa demo`)"
            )
        try:
            run = json.loads(run_file.read_text(encoding="utf-8"))
            retriever_path = run_dir / run["retriever"]
            reader_path = run_dir / run["reader"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{run_file} is malformed: {err}") from None
        _require(retriever_path, ("config.json", "model.safetensors"), "retriever")
        _require(reader_path, ("config.json", "model.safetensors", PROCESSOR_FILE), "reader")
        retriever = RetrieverModel.from_pretrained(retriever_path)
        reader = ReaderModel.from_pretrained(reader_path)
        processor = ReaderProcessor.from_pretrained(reader_path)
        model = cls(
            retriever,
            reader,
            processor,
            top_k=int(run.get("top_k") or 5),
            device=device,
            run_dir=run_dir,
        )
        if load_indices:
            for name, rel in (run.get("indices") or {}).items():
                model.load_index(run_dir / rel, name=name)
        return model

    # ------------------------------------------------------------------ indices

    @property
    def indices(self) -> dict[str, dict]:
        """Loaded indices: name → manifest."""
        return {n: self.registry.get(n).manifest for n in self.registry.names}

    def _load(self, path: str | Path, name: str) -> Any:
        from retriever.index import KnowledgeIndex

        return KnowledgeIndex.load(path, retriever=self.retriever, name=name)

    def load_index(self, path: str | Path, name: str | None = None) -> str:
        """Load a knowledge index folder under ``name`` (default: the folder name).

        Raises:
            ValueError: The index was built with another retriever (both fingerprints
                named), or ``name`` is already loaded (use :meth:`swap_index`).
        """
        name = name or Path(path).resolve().name
        with self._swap_lock:
            if name in self.registry:
                raise ValueError(f"an index named {name!r} is loaded already; use swap_index")
            self.registry.register(name, self._load(path, name))
        return name

    def swap_index(self, path: str | Path, name: str | None = None) -> None:
        """Replace the index ``name`` for subsequent calls (no retraining).

        The new index is loaded and checked against the retriever first; if that
        fails, the old index keeps serving and the error is raised.
        """
        name = name or Path(path).resolve().name
        new = self._load(path, name)  # validates before anything changes
        with self._swap_lock:
            self.registry.swap(name, new)

    def unload_index(self, name: str) -> None:
        """Stop using an index."""
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

        Raises:
            TypeError / ValueError: Bad image, question, top_k or index name.
        """
        return self.answer_batch([image], [question], top_k, index, num_alternatives)[0]

    @torch.inference_mode()
    def answer_batch(
        self,
        images: Sequence[Any],
        questions: Sequence[str],
        top_k: int | None = None,
        index: str | Sequence[str] | None = ALL_INDICES,
        num_alternatives: int = 4,
        batch_size: int = 64,
    ) -> list[Answer]:
        """Answer a batch: one retrieval search and one reader forward per ``batch_size``."""
        from rvqa.data.images import load_image

        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            raise TypeError("images must be a list (one image per question)")
        if isinstance(questions, str) or not isinstance(questions, Sequence):
            raise TypeError("questions must be a list of strings")
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        for i, q in enumerate(questions):
            _check_question(q, i)
        k = self.default_top_k if top_k is None else _check_top_k(top_k)
        names = self._resolve_index(index)
        out: list[Answer] = []
        for s in range(0, len(images), batch_size):
            pil = [load_image(im) for im in images[s : s + batch_size]]
            qs = list(questions[s : s + batch_size])
            evidence = self._retrieve(pil, k, names)
            out.extend(self._read(pil, qs, evidence, num_alternatives))
        return out

    def _resolve_index(self, index: Any) -> list[str] | None:
        if index is None or (isinstance(index, (list, tuple)) and not index):
            return None
        if index is ALL_INDICES:
            names = self.registry.names
            return names or None
        chosen = [index] if isinstance(index, str) else list(index)
        for n in chosen:
            if not isinstance(n, str):
                raise TypeError(f"index names must be strings, got {n!r}")
            if n not in self.registry:
                known = ", ".join(self.registry.names) or "none loaded"
                raise KeyError(f"unknown index {n!r} (loaded: {known})")
        return chosen

    def _retrieve(self, pil: list, k: int, names: list[str] | None) -> list[list[Evidence]]:
        if names is None:
            return [[] for _ in pil]
        emb = self.retriever.embed_images(pil, batch_size=len(pil))
        results = self.registry.search(emb, k, names)
        return [
            [Evidence(h.text, float(h.score), h.index_name, h.id) for h in res.hits]
            for res in results
        ]

    def _read(
        self, pil: list, questions: list[str], evidence: list[list[Evidence]], n_alt: int
    ) -> list[Answer]:
        batch = self.processor(
            pil,
            questions,
            captions=[[e.text for e in ev] for ev in evidence],
            scores=[[e.score for e in ev] for ev in evidence],
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        probs = torch.sigmoid(self.reader(**batch).logits.float())  # (B, A)
        p, idx = probs.topk(min(1 + max(n_alt, 0), probs.shape[-1]), dim=-1)
        answers = []
        for q, ev, pi, ii in zip(questions, evidence, p.tolist(), idx.tolist()):
            ranked = [(self.answers[j], float(v)) for j, v in zip(ii, pi)]
            answers.append(Answer(ranked[0][0], ranked[0][1], ranked[1:], ev, question=q))
        return answers


def _check_question(q: Any, i: int) -> None:
    if not isinstance(q, str):
        raise TypeError(f"question {i} must be a string, got {type(q).__name__}")
    if not q.strip():
        raise ValueError(f"question {i} is empty")


def _check_top_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"top_k must be an integer, got {k!r}")
    if k <= 0:
        raise ValueError(f"top_k must be ≥ 1, got {k} (use index=None to answer without retrieval)")
    return k
