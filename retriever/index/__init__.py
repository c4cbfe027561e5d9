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

from rvqa.retriever.index.build import (
    IndexBuildOptions,
    build_index,
    build_index_from_embeddings,
    load_stored_embeddings,
    rebuild_index,
)
from rvqa.retriever.index.corpus import (
    check_embeddings,
    dedupe_captions,
    encode_captions,
    normalise_ids,
    prepare_corpus,
)
from rvqa.retriever.index.factory import (
    FLAT_MAX_VECTORS,
    HNSW_M,
    AutoChoice,
    auto_nlist,
    choose_factory,
    estimate_bytes,
    parse_memory,
)
from rvqa.retriever.index.faiss_ops import (
    HNSW_EF_CONSTRUCTION,
    add_vectors,
    build_params,
    make_index,
    min_training_size,
    search_param_name,
    set_search_params,
    train_index,
)
from rvqa.retriever.index.format import (
    CAPTIONS_DIR,
    EMBEDDINGS_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    IndexFormatError,
    check_files,
    make_manifest,
    read_captions,
    read_manifest,
    write_index_folder,
)
from rvqa.retriever.index.info import index_info
from rvqa.retriever.index.knowledge_index import KnowledgeIndex
from rvqa.retriever.index.registry import IndexRegistry, merge_results
from rvqa.retriever.index.tuning import (
    TARGET_RECALL,
    exact_knn,
    knn_recall,
    knn_recall_bound,
    proxy_queries,
    tune_search_params,
)
from rvqa.retriever.index.types import CaptionEncoder, Hit, SearchResult

__all__ = [
    "CAPTIONS_DIR",
    "EMBEDDINGS_FILE",
    "FLAT_MAX_VECTORS",
    "FORMAT_VERSION",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_M",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "TARGET_RECALL",
    "AutoChoice",
    "CaptionEncoder",
    "Hit",
    "IndexBuildOptions",
    "IndexFormatError",
    "IndexRegistry",
    "KnowledgeIndex",
    "SearchResult",
    "add_vectors",
    "auto_nlist",
    "build_index",
    "build_index_from_embeddings",
    "build_params",
    "check_embeddings",
    "check_files",
    "choose_factory",
    "dedupe_captions",
    "encode_captions",
    "estimate_bytes",
    "exact_knn",
    "index_info",
    "knn_recall",
    "knn_recall_bound",
    "load_stored_embeddings",
    "make_index",
    "make_manifest",
    "merge_results",
    "min_training_size",
    "normalise_ids",
    "parse_memory",
    "prepare_corpus",
    "proxy_queries",
    "read_captions",
    "read_manifest",
    "rebuild_index",
    "search_param_name",
    "set_search_params",
    "train_index",
    "tune_search_params",
    "write_index_folder",
]
