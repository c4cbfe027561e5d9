"""``IndexRegistry``: several named knowledge indices, searched one at a time or merged.

:class:`IndexRegistry` snapshots its name → index mapping at the start of each
search, so every result comes from exactly one index state even while
:meth:`IndexRegistry.swap` runs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from rvqa.errors import IndexMismatchError, UnknownIndexError
from rvqa.retriever.index.knowledge_index import KnowledgeIndex, check_k
from rvqa.retriever.index.types import CaptionEncoder, SearchResult

__all__ = ["IndexRegistry", "merge_results"]

logger = logging.getLogger(__name__)


def merge_results(per_index: Sequence[Sequence[SearchResult]], k: int) -> list[SearchResult]:
    """Merge several indices' results query by query: top ``k`` by score overall.

    Ties keep the order of ``per_index`` and then rank (stable sort).

    Args:
        per_index: One list of SearchResults (one per query) per index, hits tagged.
        k: Hits per query after merging.
    """
    if not per_index:
        return []
    merged = []
    for results in zip(*per_index):
        hits = [h for r in results for h in r.hits]
        hits.sort(key=lambda h: -h.score)
        hits = hits[:k]
        merged.append(
            SearchResult(
                ids=[h.id for h in hits],
                scores=[h.score for h in hits],
                captions=[h.text for h in hits],
                index_names=[h.index_name for h in hits],
                uncertainties=(
                    [h.uncertainty for h in hits]
                    if any(h.uncertainty is not None for h in hits)
                    else None
                ),
            )
        )
    return merged


class IndexRegistry:
    """Several named knowledge indices, searched one at a time or merged; hot-swappable.

    All methods are thread-safe. A search snapshots the name → index mapping
    under the lock, then searches without it, so a concurrent :meth:`swap` never
    mixes two states of one name into one result. Searches of GPU indices run one at
    a time (each holds the process-wide faiss GPU lock of
    :mod:`~rvqa.retriever.index.knowledge_index`), merged searches included.

    Args:
        use_gpu: The default ``use_gpu`` of :meth:`load` (see :meth:`KnowledgeIndex.load`).
        gpus: The default ``gpus`` of :meth:`load`.
    """

    def __init__(self, *, use_gpu: bool = False, gpus: Sequence[int] | None = None) -> None:
        self._lock = threading.Lock()
        self._indices: dict[str, KnowledgeIndex] = {}
        self.use_gpu = use_gpu
        self.gpus = gpus

    @property
    def names(self) -> list[str]:
        """Registered names, in registration order."""
        with self._lock:
            return list(self._indices)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._indices

    def __len__(self) -> int:
        with self._lock:
            return len(self._indices)

    def register(self, name: str, index: KnowledgeIndex) -> None:
        """Add an index under ``name``.

        Raises:
            ValueError: The name is taken (use :meth:`swap`) or empty.
            TypeError: ``index`` is not a KnowledgeIndex.
        """
        _check_name(name)
        if not isinstance(index, KnowledgeIndex):
            raise TypeError(f"expected a KnowledgeIndex, got {type(index).__name__}")
        with self._lock:
            if name in self._indices:
                raise ValueError(f"an index named {name!r} is registered; use swap() to replace it")
            self._indices[name] = index

    def load(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        encoder: CaptionEncoder | str | None = None,
        **load_kwargs: Any,
    ) -> KnowledgeIndex:
        """Load an index folder (:meth:`KnowledgeIndex.load`) and register it.

        Args:
            path: Index folder.
            name: Registry name (default: the folder name).
            encoder: Retriever (or fingerprint) to check against.
            **load_kwargs: mmap, use_gpu, gpus, nprobe, ef_search, verify (``use_gpu`` and
                ``gpus`` default to the registry's).
        """
        load_kwargs.setdefault("use_gpu", self.use_gpu)
        load_kwargs.setdefault("gpus", self.gpus)
        index = KnowledgeIndex.load(path, encoder, name=name, **load_kwargs)
        self.register(name or index.name, index)
        return index

    def unload(self, name: str) -> KnowledgeIndex:
        """Remove and return the index named ``name``.

        Raises:
            UnknownIndexError: No index of that name (a ``KeyError``; the known ones listed).
        """
        with self._lock:
            if name not in self._indices:
                raise UnknownIndexError(_unknown(name, self._indices))
            return self._indices.pop(name)

    def get(self, name: str) -> KnowledgeIndex:
        """The index named ``name``.

        Raises:
            UnknownIndexError: No index of that name (a ``KeyError``; the known ones listed).
        """
        with self._lock:
            if name not in self._indices:
                raise UnknownIndexError(_unknown(name, self._indices))
            return self._indices[name]

    def swap(self, name: str, new_index: KnowledgeIndex) -> KnowledgeIndex | None:
        """Atomically put ``new_index`` under ``name``; returns the previous one (or None).

        Searches already running finish on the old index; the next ones use the new.
        """
        _check_name(name)
        if not isinstance(new_index, KnowledgeIndex):
            raise TypeError(f"expected a KnowledgeIndex, got {type(new_index).__name__}")
        with self._lock:
            old = self._indices.get(name)
            self._indices[name] = new_index
        logger.info("index %r swapped to %s", name, new_index.path)
        return old

    def search(
        self, query_embeddings: Any, k: int, names: str | Sequence[str] | None = None
    ) -> list[SearchResult]:
        """Search one named index, or several merged by score (top ``k`` overall).

        Args:
            query_embeddings: (n, d) or (d,) floats.
            k: Hits per query.
            names: One name, a list of names, or None for all registered indices.

        Returns:
            One :class:`SearchResult` per query; each hit tagged with its registry name.

        Raises:
            UnknownIndexError: Unknown name (a ``KeyError``; the known ones listed).
            IndexMismatchError: Indices of different retrievers, or a binary and a float
                index, merged.
            ValueError: Nothing to search.
        """
        with self._lock:
            snapshot = dict(self._indices)
        if names is None:
            chosen = list(snapshot)
        elif isinstance(names, str):
            chosen = [names]
        else:
            chosen = list(dict.fromkeys(names))
        if not chosen:
            raise ValueError("no knowledge index to search: register or load one first")
        for n in chosen:
            if n not in snapshot:
                raise UnknownIndexError(_unknown(n, snapshot))
        indices = [snapshot[n] for n in chosen]
        metrics = {ix.metric for ix in indices}
        if len(metrics) > 1:
            kinds = ", ".join(f"{n!r} ({ix.metric})" for n, ix in zip(chosen, indices))
            raise IndexMismatchError(
                f"cannot merge the results of binary (hamming) and float (inner_product) "
                f"indices in one query: {kinds}. Their scores are not comparable (a Hamming "
                "score and a cosine); search them in separate queries"
            )
        fps = {ix.fingerprint for ix in indices}
        if len(fps) > 1:
            raise IndexMismatchError(
                f"cannot merge indices built with different retrievers ({sorted(fps)}): "
                "their scores are not comparable"
            )
        k = check_k(k)
        per_index = [
            [r.renamed(n) for r in ix.search(query_embeddings, k)] for n, ix in zip(chosen, indices)
        ]
        return per_index[0] if len(per_index) == 1 else merge_results(per_index, k)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"index name must be a non-empty string, got {name!r}")


def _unknown(name: str, known: dict) -> str:
    return f"no knowledge index named {name!r}; loaded: {', '.join(known) or '(none)'}"
