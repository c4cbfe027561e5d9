"""Build knowledge indices from a run config (``rvqa build-index``).

Every index folder built here gets the resolved run config, ``config.yaml``,
beside its manifest (the index format ignores files it does not list).

The retriever encodes on the run's device (``Accelerator().device``: each
process's GPU under ``accelerate launch --multi_gpu``, where every process encodes
a contiguous shard of the captions; CUDA when available in a single process). The
faiss index is trained and filled on the CPU (``faiss-cpu`` in the placement line).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from rvqa.config import CaptionDataConfig, RunConfig, save_config
from rvqa.data import load_captions
from rvqa.distributed import log_placement, run_device
from rvqa.errors import DataFormatError, UsageError
from rvqa.retriever.index import build_index, rebuild_index
from rvqa.retriever.modeling import RetrieverModel
from rvqa.run_layout import CONFIG_FILE, retriever_dir

logger = logging.getLogger(__name__)


def caption_source_from_arg(arg: str) -> CaptionDataConfig:
    """``--captions`` → a caption source: easy_vqa, .jsonl, .txt, COCO/Karpathy .json, a datasets folder."""
    if arg == "easy_vqa":
        return CaptionDataConfig(source="easy_vqa")
    p = Path(arg)
    if not p.exists():
        raise FileNotFoundError(f"--captions: {arg} does not exist (or use 'easy_vqa')")
    if p.is_dir():
        return CaptionDataConfig(source="datasets", path=str(p))
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return CaptionDataConfig(source="jsonl", path=str(p))
    if suffix == ".txt":
        return CaptionDataConfig(source="text", path=str(p))
    if suffix == ".json":
        kind = "karpathy" if p.name.startswith("dataset_") else "coco"
        return CaptionDataConfig(source=kind, path=str(p))
    raise UsageError(
        f"--captions: cannot tell the format of {arg} (expected .jsonl, .txt, .json or a folder)"
    )


def load_query_file(path: str | Path) -> Any:
    """A ``.npy`` file of query embeddings, with an error that names the file."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tuning queries file {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        raise DataFormatError(f"{path} is not a numpy .npy array file: {err}") from None


def build_index_from_config(
    cfg: RunConfig,
    *,
    retriever: str | Path | Any | None = None,
    captions: str | CaptionDataConfig | None = None,
    out: str | Path | None = None,
    from_index: str | Path | None = None,
    factory: str | None = None,
    max_memory: str | None = None,
    dedupe: bool | None = None,
    ef_construction: int | None = None,
    tuning_queries: str | Path | Any | None = None,
    overwrite: bool = False,
    split: str | None = None,
) -> Path | None:
    """Encode a caption corpus with the retriever and write an index folder.

    The folder also gets ``config.yaml``, the resolved ``cfg`` (beside the manifest).

    Args:
        cfg: Run config; its ``index`` section gives the defaults.
        retriever: A retriever folder or model (default: the run's trained one).
        captions: A caption source (``--captions`` string or config); default ``cfg.index.captions``.
        out: Index folder (default ``cfg.index.folder()``).
        from_index: Rebuild from this index's stored embeddings instead of encoding.
        factory, max_memory, dedupe, ef_construction: Override ``cfg.index``.
        tuning_queries: Representative query embeddings (an (m, d) array or a ``.npy``
            file), e.g. the retriever's embeddings of held-out images, to tune
            ``efSearch``/``nprobe`` on instead of proxy queries.
        overwrite: Replace an existing folder.
        split: Caption split (easy_vqa: train/test; karpathy: a split name).

    Returns:
        The index folder (``None`` on the other processes of a distributed build).

    Raises:
        FileNotFoundError: The caption file or the retriever folder does not exist.
        UsageError: A caption file of unknown format.
        DataFormatError: An empty caption source; a tuning-queries file that is not ``.npy``.
    """
    s = cfg.index
    out = Path(out or s.folder())
    factory = factory if factory is not None else s.factory
    max_memory = max_memory or s.max_memory
    ef_construction = ef_construction if ef_construction is not None else s.ef_construction
    if isinstance(tuning_queries, (str, Path)):
        tuning_queries = load_query_file(tuning_queries)
    if from_index is not None:
        path = rebuild_index(
            from_index,
            out,
            factory,
            max_memory=max_memory,
            for_gpu=s.use_gpu,
            overwrite=overwrite,
            ef_construction=ef_construction,
            tuning_queries=tuning_queries,
        )
        log_placement("build-index", **{f"index.{out.name}": "faiss-cpu"})  # no retriever
        return _with_config(path, cfg)

    source = (  # checked first: a typo should not cost loading the retriever
        captions
        if isinstance(captions, CaptionDataConfig)
        else (caption_source_from_arg(captions) if captions else s.captions)
    )
    if retriever is None:
        retriever = retriever_dir(cfg.output_dir)
    if isinstance(retriever, (str, Path)):
        if not (Path(retriever) / "config.json").is_file():
            raise FileNotFoundError(
                f"retriever folder {retriever} does not exist or has no config.json "
                "(expected e.g. runs/demo/retriever/best)"
            )
        model = RetrieverModel.from_pretrained(retriever)
    else:
        model = retriever

    split_arg = split if split is not None else ("train" if source.source == "easy_vqa" else None)
    if source.source == "karpathy":
        split_arg = [split] if split else list(source.splits)
    corpus = load_captions(source, split=split_arg)
    if len(corpus) == 0:
        raise DataFormatError(f"the caption source {source.source} {source.path or ''} is empty")
    accelerator = Accelerator()  # one process, or one per GPU under accelerate launch
    model = model.to(run_device(accelerator))
    log_placement("build-index", accelerator, retriever=model, **{f"index.{out.name}": "faiss-cpu"})
    desc = f"{source.source}:{source.path or ''}{':' + str(split_arg) if split_arg else ''}"
    path = build_index(
        model,
        corpus,
        out,
        factory=factory,
        max_memory=max_memory,
        for_gpu=s.use_gpu,  # searched on GPUs: no HNSW in the automatic choice
        dedupe=s.dedupe if dedupe is None else dedupe,
        batch_size=s.batch_size,
        store_embeddings=s.store_embeddings,
        embeddings_dtype=s.embeddings_dtype,
        caption_source=desc,
        overwrite=overwrite,
        accelerator=accelerator,
        ef_construction=ef_construction,
        tuning_queries=tuning_queries,
    )
    if accelerator.num_processes > 1:
        accelerator.end_training()
    return _with_config(path, cfg)


def _with_config(path: Path | None, cfg: RunConfig) -> Path | None:
    """Write the resolved config beside the manifest (``path`` is None off the main process)."""
    if path is not None:
        save_config(cfg, Path(path) / CONFIG_FILE)
    return path
