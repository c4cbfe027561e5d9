"""Build entry points: caption corpus or embeddings → a knowledge index folder.

- :func:`build_index` — encode a caption corpus with the retriever, then build.
- :func:`build_index_from_embeddings` — array level: precomputed embeddings.
- :func:`rebuild_index` — a new factory string over another folder's stored embeddings.

The settings they share (factory choice, HNSW ``efConstruction``, search-parameter
tuning, stored embeddings, seed, progress) are one :class:`IndexBuildOptions`;
every entry point takes one as ``options=`` and also accepts its fields as
keywords (``factory="HNSW32"``), which override the object's values.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from rvqa.errors import UsageError
from rvqa.retriever.index.corpus import (
    check_embeddings,
    dedupe_captions,
    encode_captions,
    prepare_corpus,
)
from rvqa.retriever.index.factory import choose_binary_factory, choose_factory, parse_memory
from rvqa.retriever.index.faiss_ops import (
    BINARY_SEARCH_DEFAULTS,
    HNSW_EF_CONSTRUCTION,
    add_vectors,
    build_params,
    check_ef_construction,
    make_index,
    min_training_size,
    pack_codes,
    search_param_name,
    set_search_params,
    train_index,
    unpack_codes,
)
from rvqa.retriever.index.format import (
    CAPTIONS_DIR,
    EMBEDDINGS_FILE,
    HAMMING,
    LOGSIGMA_FILE,
    METRIC,
    PACKED_BITS,
    IndexFormatError,
    check_files,
    check_out_dir,
    make_manifest,
    read_captions,
    read_manifest,
    write_index_folder,
)
from rvqa.retriever.index.tuning import (
    MIN_HELD_OUT,
    TUNE_QUERIES,
    check_tuning_queries,
    tune_search_params,
)
from rvqa.retriever.index.types import CaptionEncoder

__all__ = [
    "IndexBuildOptions",
    "build_index",
    "build_index_from_embeddings",
    "load_stored_embeddings",
    "rebuild_index",
]

logger = logging.getLogger(__name__)

_EMBEDDINGS_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class IndexBuildOptions:
    """How an index is built, shared by every build entry point.

    Attributes:
        factory: A faiss factory string, or None to choose from N, d and ``max_memory``
            (:func:`~rvqa.retriever.index.factory.choose_factory`).
        max_memory: Budget of the automatic choice ("4GB", "512MiB", bytes).
        for_gpu: The index will be searched on GPUs (``index.use_gpu``): the automatic
            choice skips HNSW, which faiss cannot move to a GPU.
        ef_construction: ``efConstruction`` of HNSW graphs (ignored by other indices).
        tuning_queries: (m, d) representative queries (e.g. image embeddings of
            held-out images) to tune ``efSearch``/``nprobe`` on, instead of proxy
            queries made from the corpus (noisy stored vectors, and the last
            min(200, N/10) vectors when that is >= ``MIN_HELD_OUT``, left out of
            training when the rest suffices and added after tuning — representative
            only when the corpus is not sorted by source or topic;
            :func:`~rvqa.retriever.index.tuning.tune_search_params`).
        store_embeddings: Also store the raw embeddings (for :func:`rebuild_index`).
        embeddings_dtype: "float16" (half the disk) or "float32" (bit-exact rebuilds);
            None = float16 for a new build, the stored dtype for :func:`rebuild_index`.
        seed: Seed of the training sample and of the tuning queries.
        show_progress: tqdm progress bars (main process only).
    """

    factory: str | None = None
    max_memory: int | str = "4GB"
    for_gpu: bool = False
    ef_construction: int = HNSW_EF_CONSTRUCTION
    tuning_queries: np.ndarray | None = field(default=None, compare=False, repr=False)
    store_embeddings: bool = True
    embeddings_dtype: str | None = None
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.embeddings_dtype not in (None, *_EMBEDDINGS_DTYPES):
            raise UsageError(
                f"embeddings_dtype must be 'float16' or 'float32', got {self.embeddings_dtype!r}"
            )
        check_ef_construction(self.ef_construction)
        if self.factory is None:
            parse_memory(self.max_memory)

    def with_overrides(self, **fields: Any) -> IndexBuildOptions:
        """A copy with some fields replaced.

        Raises:
            TypeError: A name that is not a field (the fields are listed).
        """
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise TypeError(
                f"unknown index build option(s) {', '.join(unknown)}; "
                f"IndexBuildOptions has: {', '.join(known)}"
            )
        return dataclasses.replace(self, **fields) if fields else self


def _options(options: IndexBuildOptions | None, overrides: dict[str, Any]) -> IndexBuildOptions:
    if options is not None and not isinstance(options, IndexBuildOptions):
        raise TypeError(f"options must be an IndexBuildOptions, got {type(options).__name__}")
    return (options or IndexBuildOptions()).with_overrides(**overrides)


def build_index_from_embeddings(
    embeddings: np.ndarray,
    captions: Sequence[str],
    ids: Sequence[Any] | None,
    out_dir: str | os.PathLike,
    fingerprint: str,
    options: IndexBuildOptions | None = None,
    *,
    dedupe: bool = False,
    caption_source: str = "",
    overwrite: bool = False,
    normalize: bool = False,
    dedupe_info: dict | None = None,
    metric: str = METRIC,
    logsigma: np.ndarray | None = None,
    **option_fields: Any,
) -> Path:
    """Build a knowledge index folder from precomputed caption embeddings.

    Args:
        embeddings: (N, d) float L2-normalised caption embeddings, row i = caption i
            (``metric="hamming"``: a hashing retriever's (N, bits) codes of ±1).
        captions: N caption strings.
        ids: N ids (ints or strings) or None for 0..N-1.
        out_dir: The index folder to write (atomically).
        fingerprint: The retriever's fingerprint (checked when the index is loaded).
        options: How to build (:class:`IndexBuildOptions`; default: its defaults).
        dedupe: Drop exact duplicate captions (after strip), keeping the first. Off by
            default at this array level: the rows given are the rows indexed.
        caption_source: Free text recorded in the manifest (e.g. "coco:captions_train2017.json").
        overwrite: Replace an existing index folder.
        normalize: L2-normalise the rows first instead of requiring normalised input.
        dedupe_info: Dedupe record of an earlier stage (build_index), kept in the manifest.
        metric: ``"inner_product"`` (float embeddings, faiss ``index_factory``) or
            ``"hamming"`` (binary codes in a faiss binary index: ``BFlat``, ``BHNSW32``,
            ``BIVF{nlist}``; automatic: ``BFlat`` up to 2M codes; search parameters fixed,
            not tuned; stored embeddings are the packed codes).
        logsigma: A probabilistic (PCME) retriever's (N, d) caption log σ: stored beside
            the means (``logsigma.npy``), each hit's caption uncertainty at search time.
        **option_fields: :class:`IndexBuildOptions` fields, overriding ``options``
            (``factory=``, ``max_memory=``, ``ef_construction=``, ``tuning_queries=``,
            ``store_embeddings=``, ``embeddings_dtype=``, ``seed=``, ``show_progress=``).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: Bad embeddings/captions/ids, bad factory, corpus too small for it.
        TypeError: An unknown option name.
    """
    opts = _options(options, option_fields)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    binary = metric == HAMMING
    if metric not in (METRIC, HAMMING):
        raise UsageError(f"metric must be {METRIC!r} or {HAMMING!r}, got {metric!r}")
    texts, ids = prepare_corpus(captions, ids)
    x = np.asarray(embeddings)
    if x.dtype.kind == "f" and normalize and not binary:
        x = np.array(x, dtype=np.float32)
        faiss.normalize_L2(x)
    x = check_embeddings(x, len(texts), binary=binary)
    n, d = x.shape
    queries = None
    if opts.tuning_queries is not None:
        if binary:
            raise UsageError("tuning_queries apply to float indices; binary indices are not tuned")
        queries = check_tuning_queries(opts.tuning_queries, d)
    if logsigma is not None:
        logsigma = np.asarray(logsigma)
        if logsigma.shape != (n, d) or not np.isfinite(logsigma).all():
            raise UsageError(
                f"logsigma must be a finite ({n}, {d}) array like the embeddings, got "
                f"{logsigma.dtype} {logsigma.shape}"
            )
    if dedupe:
        texts, ids, keep = dedupe_captions(texts, ids)
        if len(keep) < n:
            logger.info("dedupe: removed %d duplicate captions of %d", n - len(keep), n)
            x = x[keep]
            logsigma = None if logsigma is None else logsigma[keep]
        dedupe_info = {"enabled": True, "input_count": n, "removed": n - len(keep)}
    elif dedupe_info is None:
        dedupe_info = {"enabled": False, "input_count": n, "removed": 0}

    factory, auto = opts.factory, None
    if factory is None:
        if binary:
            choice = choose_binary_factory(len(texts), d, opts.max_memory)
        else:
            choice = choose_factory(len(texts), d, opts.max_memory, for_gpu=opts.for_gpu)
        factory, auto = choice.factory, asdict(choice)
        logger.info("automatic index choice: %s (%s)", factory, choice.reason)
    index = make_index(factory, d, ef_construction=opts.ef_construction, metric=metric)
    if binary:
        train_index(index, x, seed=opts.seed)
        add_vectors(index, x, show_progress=opts.show_progress)
        name = search_param_name(index)
        params, tuning = ({name: BINARY_SEARCH_DEFAULTS[name]} if name else {}), None
        if params:
            set_search_params(index, params)
        if opts.embeddings_dtype not in (None, PACKED_BITS):
            logger.warning(
                "embeddings_dtype=%s is for float indices; a binary index stores its packed codes",
                opts.embeddings_dtype,
            )
        dtype, stored = PACKED_BITS, pack_codes(x)
    else:
        params, tuning = _fill_and_tune(index, x, queries, opts)
        dtype, stored = opts.embeddings_dtype or "float16", x
    manifest = make_manifest(
        fingerprint=fingerprint,
        embed_dim=d,
        factory=factory,
        count=len(texts),
        auto_choice=auto,
        caption_source=caption_source,
        search_params=params,
        search_tuning=tuning,
        build_params=build_params(index),
        dedupe=dedupe_info,
        id_type="str" if isinstance(ids[0], str) else "int",
        embeddings_dtype=dtype if opts.store_embeddings else None,
        metric=metric,
        uncertainty=logsigma is not None,
    )
    return write_index_folder(
        out_dir,
        index,
        texts,
        ids,
        manifest,
        stored if opts.store_embeddings else None,
        overwrite,
        logsigma=logsigma,
    )


def _fill_and_tune(
    index: faiss.Index, x: np.ndarray, queries: np.ndarray | None, opts: IndexBuildOptions
) -> tuple[dict[str, int], dict[str, Any] | None]:
    """Train ``index``, add the rows of ``x``, tune and set its search parameters.

    Without given queries, the last few vectors are added only after tuning: they
    are searched as new samples of the corpus (see ``tune_search_params``), so they
    stay out of the training sample too when the rest suffices.

    Returns:
        ``(params, tuning)`` of :func:`~rvqa.retriever.index.tuning.tune_search_params`.
    """
    n = len(x)
    tunable = search_param_name(index) is not None
    m = min(TUNE_QUERIES, n // 10) if queries is None and tunable else 0
    m = m if m >= MIN_HELD_OUT else 0
    enough = n - m >= min_training_size(index)[0]
    train_index(index, x[: n - m] if enough else x, seed=opts.seed)
    add_vectors(index, x[: n - m], show_progress=opts.show_progress)
    params, tuning = tune_search_params(
        index, x[: n - m], seed=opts.seed, queries=queries, held_out=x[n - m :] if m else None
    )
    if m:
        add_vectors(index, x[n - m :])
    if params:
        set_search_params(index, params)
        logger.info("search params %s: %s", params, tuning)
    return params, tuning


def build_index(
    encoder: CaptionEncoder,
    captions: Any,
    out_dir: str | os.PathLike,
    options: IndexBuildOptions | None = None,
    *,
    ids: Sequence[Any] | None = None,
    dedupe: bool = True,
    batch_size: int = 256,
    caption_source: str = "",
    overwrite: bool = False,
    accelerator: Any = None,
    **option_fields: Any,
) -> Path:
    """Encode a caption corpus with the retriever's text tower and build an index folder.

    Args:
        encoder: The retriever (:class:`~rvqa.retriever.index.CaptionEncoder`).
        captions: A list of strings, or objects with ``.caption`` and ``.caption_id``.
        out_dir: The index folder, e.g. ``indices/coco-captions``.
        options: How to build (:class:`IndexBuildOptions`; default: its defaults).
        ids: Caption ids for a list of strings (default 0..N-1, positions in ``captions``).
        dedupe: Drop exact duplicate captions (after strip) before encoding, keeping the
            first id; the count removed is logged and recorded.
        batch_size: Encoding batch size.
        caption_source: Recorded in the manifest.
        overwrite: Replace an existing index folder (else FileExistsError).
        accelerator: An ``accelerate.Accelerator``; with several processes each encodes a
            contiguous shard, only the main process writes, the others wait.
        **option_fields: :class:`IndexBuildOptions` fields, overriding ``options``.

    Returns:
        ``out_dir`` as a Path (on every process).
    """
    opts = _options(options, option_fields)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)  # every process: fail before hours of encoding
    binary = getattr(encoder, "index_metric", METRIC) == HAMMING
    if opts.factory is not None:  # the factory's kind must fit the retriever's vectors
        make_index(opts.factory, encoder.embed_dim, metric=HAMMING if binary else METRIC)
    if opts.tuning_queries is not None:
        if binary:
            raise UsageError("tuning_queries apply to float indices; binary indices are not tuned")
        check_tuning_queries(opts.tuning_queries, encoder.embed_dim)
    texts, ids = prepare_corpus(captions, ids)
    n_in = len(texts)
    if dedupe:
        texts, ids, _ = dedupe_captions(texts, ids)
        if len(texts) < n_in:
            logger.info("dedupe: removed %d duplicate captions of %d", n_in - len(texts), n_in)
    dedupe_info = {"enabled": bool(dedupe), "input_count": n_in, "removed": n_in - len(texts)}
    main = accelerator is None or accelerator.is_main_process
    if main:
        logger.info("encoding %d captions", len(texts))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    probabilistic = bool(getattr(getattr(encoder, "config", None), "is_probabilistic", False))
    x = encode_captions(
        encoder,
        texts,
        batch_size=batch_size,
        accelerator=accelerator,
        scratch_dir=out_dir.parent,
        show_progress=opts.show_progress,
        with_logsigma=probabilistic,
    )
    sigma = None
    if probabilistic and x is not None:
        x, sigma = x
    if main:
        build_index_from_embeddings(
            x,
            texts,
            ids,
            out_dir,
            encoder.fingerprint(),
            opts,
            caption_source=caption_source,
            overwrite=overwrite,
            dedupe_info=dedupe_info,
            metric=HAMMING if binary else METRIC,
            logsigma=sigma,
        )
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    return out_dir


def load_stored_embeddings(folder: Path, manifest: dict) -> np.ndarray:
    """The stored raw embeddings of an index folder, memory-mapped (read-only).

    Raises:
        ValueError: The folder was built without stored embeddings.
        IndexFormatError: The stored array's shape disagrees with the manifest.
    """
    if not manifest.get("embeddings"):
        raise UsageError(
            f"{folder} has no stored embeddings (built with store_embeddings=False); "
            "re-encode the captions with build_index instead"
        )
    x = np.load(folder / EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False)
    width = manifest["embed_dim"]
    if manifest["embeddings"].get("dtype") == PACKED_BITS:
        width //= 8  # packed codes: 8 bits a byte
    if x.shape != (manifest["count"], width):
        raise IndexFormatError(
            f"{folder / EMBEDDINGS_FILE} has shape {x.shape}, manifest says "
            f"({manifest['count']}, {width})"
        )
    return x


def rebuild_index(
    from_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    factory: str | None = None,
    options: IndexBuildOptions | None = None,
    *,
    overwrite: bool = False,
    **option_fields: Any,
) -> Path:
    """Build a new index folder from another one's stored embeddings (no re-encoding).

    Captions, ids, fingerprint, caption source and dedupe record are copied. float16
    embeddings are re-normalised after the cast; store float32 for bit-identical
    rebuilds. ``out_dir`` may equal ``from_dir`` (with ``overwrite=True``).

    Args:
        from_dir: An index folder built with ``store_embeddings=True``.
        out_dir: The new folder.
        factory: New faiss factory string (None = ``options.factory``, automatic by default).
        options: How to build (:class:`IndexBuildOptions`); ``embeddings_dtype`` None
            keeps the stored dtype.
        overwrite: Replace an existing ``out_dir``.
        **option_fields: :class:`IndexBuildOptions` fields, overriding ``options``.
    """
    opts = _options(options, option_fields)
    if factory is not None:
        opts = opts.with_overrides(factory=factory)
    from_dir = Path(from_dir)
    manifest = read_manifest(from_dir)
    check_files(from_dir, manifest["files"])
    stored = load_stored_embeddings(from_dir, manifest)
    binary = manifest["metric"] == HAMMING
    if binary:
        x = unpack_codes(stored, manifest["embed_dim"])
    else:
        x = np.array(stored, dtype=np.float32)
        if stored.dtype != np.float32:
            faiss.normalize_L2(x)
    logsigma = None
    if manifest.get("uncertainty"):
        logsigma = np.load(from_dir / LOGSIGMA_FILE, mmap_mode="r", allow_pickle=False)
    ds = read_captions(from_dir / CAPTIONS_DIR)
    captions = ds.data.column("caption").to_pylist()
    ids = ds.data.column("id").to_pylist()
    del stored
    if opts.embeddings_dtype is None and not binary:
        opts = opts.with_overrides(embeddings_dtype=manifest["embeddings"]["dtype"])
    return build_index_from_embeddings(
        x,
        captions,
        ids,
        out_dir,
        manifest["retriever_fingerprint"],
        opts,
        caption_source=manifest.get("caption_source", ""),
        overwrite=overwrite,
        dedupe_info=manifest.get("dedupe"),
        metric=manifest["metric"],
        logsigma=logsigma,
    )
