"""The knowledge index's value types: the encoder it needs, and what a search returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

__all__ = ["CaptionEncoder", "Hit", "SearchResult"]


@runtime_checkable
class CaptionEncoder(Protocol):
    """What the index needs from the retriever (``rvqa.retriever.modeling.RetrieverModel``).

    Optional beside these: ``index_metric`` (``"hamming"``: the vectors are a hashing
    retriever's ±1 codes, indexed in a binary index) and, for a probabilistic (PCME)
    retriever, ``config.is_probabilistic`` with ``embed_texts(..., return_logsigma=True)``
    returning ``(embeddings, logsigma)``.
    """

    embed_dim: int

    def fingerprint(self) -> str:
        """Hash of the retriever's config and weights."""
        ...

    def embed_texts(
        self, texts: list[str], batch_size: int = 256, show_progress: bool = False
    ) -> np.ndarray:
        """Captions → (n, d) float32 L2-normalised (a hashing retriever: ±1 codes)."""
        ...

    def embed_images(
        self, images: list, batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        """Images → (n, d) float32 L2-normalised."""
        ...


class Hit(NamedTuple):
    """One retrieved caption: the evidence tuple of ``RVQA.answer``."""

    text: str
    score: float
    index_name: str
    id: Any
    uncertainty: float | None = None
    """A probabilistic (PCME) index's caption uncertainty (geometric mean of σ²); else None."""


@dataclass(frozen=True)
class SearchResult:
    """The hits of one query, best first (fewer than k when the index is smaller).

    Attributes:
        ids: Caption ids.
        scores: Inner products (cosine similarities for normalised queries).
        captions: Caption texts.
        index_names: The index each hit came from.
        uncertainties: Per hit, the caption's uncertainty in a probabilistic (PCME)
            index (the geometric mean of its σ²), ``None`` for other indices.
    """

    ids: list = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    index_names: list[str] = field(default_factory=list)
    uncertainties: list | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def hits(self) -> list[Hit]:
        """The hits as ``Hit(text, score, index_name, id, uncertainty)`` tuples."""
        unc = self.uncertainties or [None] * len(self.ids)
        return [Hit(*h) for h in zip(self.captions, self.scores, self.index_names, self.ids, unc)]

    def renamed(self, name: str) -> SearchResult:
        """The same hits tagged with another index name."""
        return SearchResult(
            self.ids, self.scores, self.captions, [name] * len(self.ids), self.uncertainties
        )
