"""The knowledge index: FAISS over retriever caption embeddings, searched with image embeddings.

Build::

    build_index(retriever, captions, "indices/coco-captions")            # encode + write
    build_index(retriever, captions, out, factory="HNSW32", max_memory="8GB")
    rebuild_index("indices/coco-captions", "indices/coco-hnsw", "HNSW32")  # no re-encoding

Load and search::

    index = KnowledgeIndex.load("indices/coco-captions", retriever)   # fingerprint checked
    [result] = index.search(image_embedding, k=5)                      # ids, scores, captions
    registry = IndexRegistry(); registry.register("captions", index)
    registry.search(image_embeddings, k=5, names=["captions", "wiki"])  # merged, tagged

One job per module:

- :mod:`~rvqa.retriever.index.types` — ``CaptionEncoder``, ``Hit``, ``SearchResult``.
- :mod:`~rvqa.retriever.index.format` — the folder format (manifest, files, atomic write).
- :mod:`~rvqa.retriever.index.factory` — automatic factory choice by size and memory.
- :mod:`~rvqa.retriever.index.faiss_ops` — make, train, fill an index; its search knobs.
- :mod:`~rvqa.retriever.index.tuning` — exact kNN, ANN recall, search-parameter tuning.
- :mod:`~rvqa.retriever.index.corpus` — caption corpus preparation and (sharded) encoding.
- :mod:`~rvqa.retriever.index.build` — ``IndexBuildOptions`` and the build entry points.
- :mod:`~rvqa.retriever.index.knowledge_index` — ``KnowledgeIndex``.
- :mod:`~rvqa.retriever.index.registry` — ``IndexRegistry`` of named indices.
- :mod:`~rvqa.retriever.index.info` — the ``rvqa index-info`` report.

Every public name of those modules is importable from ``rvqa.retriever.index``.
"""

from rvqa.retriever.index import (
    build,
    corpus,
    factory,
    faiss_ops,
    format,
    info,
    knowledge_index,
    registry,
    tuning,
    types,
)
from rvqa.retriever.index.build import *  # noqa: F403 - each module's __all__
from rvqa.retriever.index.corpus import *  # noqa: F403
from rvqa.retriever.index.factory import *  # noqa: F403
from rvqa.retriever.index.faiss_ops import *  # noqa: F403
from rvqa.retriever.index.format import *  # noqa: F403
from rvqa.retriever.index.info import *  # noqa: F403
from rvqa.retriever.index.knowledge_index import *  # noqa: F403
from rvqa.retriever.index.registry import *  # noqa: F403
from rvqa.retriever.index.tuning import *  # noqa: F403
from rvqa.retriever.index.types import *  # noqa: F403

_MODULES = (
    types,
    format,
    factory,
    faiss_ops,
    tuning,
    corpus,
    build,
    knowledge_index,
    registry,
    info,
)
__all__ = sorted({name for module in _MODULES for name in module.__all__})
