"""The on-disk format of a knowledge index folder (``indices/NAME/``).

::

    indices/NAME/
        manifest.json     format version, retriever fingerprint, dim, metric, factory,
                          count, search params, dedupe info, files (bytes + sha256)
        index.faiss       faiss.write_index of the (CPU) index; row i = caption i
                          (a hashing retriever's: faiss.write_index_binary, metric hamming)
        captions/         datasets Arrow store (save_to_disk): columns "caption", "id"
        embeddings.npy    optional raw L2-normalised embeddings (float16 by default;
                          binary indices: the packed codes, uint8, bits / 8 per row)
        logsigma.npy      a probabilistic (PCME) retriever's index: each caption's
                          log σ (float16, (count, dim)), its Gaussian beside the mean

The manifest is written last and the whole folder is renamed into place
(:func:`rvqa.io.atomic_directory`), so a folder with a manifest is complete.
Sizes of every file are checked on load (cheap: catches truncation); the
sha256 digests are checked when asked (``verify=True``, ``rvqa index-info``).

Memory mapping: faiss 1.15 has two mmap flags. ``IO_FLAG_MMAP_IFC`` maps the
codes of flat-code storage (Flat, HNSW's storage and graph, IVF lists) in place,
zero-copy; the legacy ``IO_FLAG_MMAP`` only maps IVF inverted lists. We use the
first where it exists, else the second, always with ``IO_FLAG_READ_ONLY``, and
fall back to a normal read (with a logged note) for index types that refuse.
A memory-mapped index is read-only: faiss *aborts the process* (not an
exception) when vectors are added to it, so :meth:`KnowledgeIndex.add` always
works on an owned in-memory copy (:func:`owned_copy`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from rvqa.errors import IndexFormatError, UsageError
from rvqa.io import atomic_directory
from rvqa.version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "INDEX_FILE",
    "CAPTIONS_DIR",
    "EMBEDDINGS_FILE",
    "LOGSIGMA_FILE",
    "METRIC",
    "METRICS",
    "HAMMING",
    "PACKED_BITS",
    "IndexFormatError",
    "utc_now",
    "rvqa_version",
    "sha256_file",
    "describe_files",
    "check_files",
    "make_manifest",
    "read_manifest",
    "write_captions",
    "write_embeddings",
    "write_index_folder",
    "check_out_dir",
    "mmap_flags",
    "read_faiss_index",
    "owned_copy",
    "read_captions",
]

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
CAPTIONS_DIR = "captions"
EMBEDDINGS_FILE = "embeddings.npy"
LOGSIGMA_FILE = "logsigma.npy"
METRIC = "inner_product"
HAMMING = "hamming"
METRICS = (METRIC, HAMMING)
"""``inner_product``: L2-normalised float embeddings (cosine); ``hamming``: a hashing
retriever's binary codes in a faiss binary index (``IndexBinaryFlat`` / ``HNSW`` / ``IVF``)."""
PACKED_BITS = "packed_bits"
"""The stored-embeddings dtype of a binary index: its codes packed 8 bits a byte (uint8)."""

_REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "retriever_fingerprint": str,
    "embed_dim": int,
    "metric": str,
    "factory": str,
    "count": int,
    "search_params": dict,
    "files": dict,
}


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string (seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def rvqa_version() -> str:
    """The installed rvqa version (recorded in every manifest)."""
    return __version__


# --------------------------------------------------------------------------- files


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative/path: {"bytes": n, "sha256": hex}}`` for every file except the manifest."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE:
            rel = p.relative_to(folder).as_posix()
            out[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def check_files(folder: Path, files: dict[str, Any], verify: bool = False) -> None:
    """Check that the files the manifest lists exist with the recorded size (and hash).

    Raises:
        FileNotFoundError: A listed file is missing (named).
        IndexFormatError: A file's size (or sha256 with ``verify``) differs: truncated
            or modified after the build (named).
    """
    for rel, rec in files.items():
        p = folder / rel
        if not p.is_file():
            raise FileNotFoundError(f"knowledge index {folder}: file {rel} is missing")
        try:
            size, digest = int(rec["bytes"]), rec.get("sha256")
        except (TypeError, KeyError, ValueError):
            raise IndexFormatError(
                f"malformed manifest in {folder}: files[{rel!r}] needs a 'bytes' entry"
            ) from None
        actual = p.stat().st_size
        if actual != size:
            raise IndexFormatError(
                f"knowledge index file {p} has {actual} bytes but the manifest records "
                f"{size}: the file is truncated or was modified after the build; rebuild the index"
            )
        if verify and digest and sha256_file(p) != digest:
            raise IndexFormatError(
                f"knowledge index file {p} does not match its sha256 in the manifest: "
                "the file is corrupted or was modified after the build; rebuild the index"
            )


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk before the rename."""
    for p in sorted(folder.rglob("*"), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:  # pragma: no cover - platforms without directory fds
            continue
        try:
            os.fsync(fd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- manifest


def make_manifest(
    *,
    fingerprint: str,
    embed_dim: int,
    factory: str,
    count: int,
    auto_choice: dict | None = None,
    caption_source: str = "",
    search_params: dict | None = None,
    search_tuning: dict | None = None,
    dedupe: dict | None = None,
    id_type: str = "int",
    embeddings_dtype: str | None = None,
    created: str | None = None,
    build_params: dict | None = None,
    metric: str = METRIC,
    uncertainty: bool = False,
) -> dict[str, Any]:
    """The manifest of a knowledge index (``files`` is filled in by :func:`write_index_folder`).

    ``metric``: ``inner_product`` (``embed_dim`` = the embedding width) or ``hamming``
    (``embed_dim`` = the code length in bits). ``uncertainty``: the folder stores each
    caption's PCME log σ (``logsigma.npy``).
    """
    if metric not in METRICS:
        raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return {
        "format_version": FORMAT_VERSION,
        "rvqa_version": rvqa_version(),
        "created": created or utc_now(),
        "updated": None,
        "retriever_fingerprint": fingerprint,
        "embed_dim": int(embed_dim),
        "metric": metric,
        "normalized": metric == METRIC,
        "factory": factory,
        "auto_choice": auto_choice,
        "count": int(count),
        "caption_source": caption_source,
        "id_type": id_type,
        "build_params": dict(build_params or {}),
        "search_params": dict(search_params or {}),
        "search_tuning": search_tuning,
        "dedupe": dedupe,
        "embeddings": (
            {"file": EMBEDDINGS_FILE, "dtype": embeddings_dtype} if embeddings_dtype else None
        ),
        "uncertainty": (
            {
                "file": LOGSIGMA_FILE,
                "dtype": "float16",
                "summary": "geometric mean of sigma^2 (exp(mean(2 log sigma)))",
            }
            if uncertainty
            else None
        ),
        "files": {},
    }


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``folder/manifest.json``.

    Raises:
        FileNotFoundError: The folder or its manifest is missing.
        IndexFormatError: Malformed JSON, missing keys, wrong types, another metric,
            or a ``format_version`` newer than this rvqa reads.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"knowledge index folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"a knowledge index is a folder, but {folder} is a file")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST_FILE}: not a knowledge index folder "
            "(or its build did not finish); build it with `rvqa build-index`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexFormatError(f"malformed manifest {path}: {err}") from None
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"malformed manifest {path}: expected a JSON object")
    for key, tp in _REQUIRED_KEYS.items():
        if key not in manifest:
            raise IndexFormatError(f"malformed manifest {path}: key {key!r} is missing")
        value = manifest[key]
        if not isinstance(value, tp) or isinstance(value, bool):
            raise IndexFormatError(
                f"malformed manifest {path}: {key!r} should be {tp.__name__}, got {value!r}"
            )
    version = manifest["format_version"]
    if version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{folder} was written by a newer rvqa (index format_version {version}, "
            f"rvqa {manifest.get('rvqa_version', '?')}); this rvqa {rvqa_version()} reads "
            f"format_version <= {FORMAT_VERSION}: upgrade rvqa (pip install -U rvqa)"
        )
    if version < 1:
        raise IndexFormatError(f"malformed manifest {path}: format_version {version} < 1")
    if manifest["metric"] not in METRICS:
        raise IndexFormatError(
            f"malformed manifest {path}: metric {manifest['metric']!r}, expected one of "
            f"{', '.join(map(repr, METRICS))}"
        )
    if manifest["metric"] == HAMMING and manifest["embed_dim"] % 8:
        raise IndexFormatError(
            f"malformed manifest {path}: a hamming index needs embed_dim (bits) a multiple of "
            f"8, got {manifest['embed_dim']}"
        )
    if manifest["embed_dim"] <= 0 or manifest["count"] < 0:
        raise IndexFormatError(f"malformed manifest {path}: embed_dim and count must be >= 0")
    if INDEX_FILE not in manifest["files"]:
        raise IndexFormatError(f"malformed manifest {path}: files has no {INDEX_FILE!r} entry")
    return manifest


# --------------------------------------------------------------------------- writing


def write_captions(folder: Path, captions: Any, ids: Any = None) -> None:
    """Write captions and ids as a ``datasets`` Arrow store (``save_to_disk``).

    Args:
        folder: Destination folder (created).
        captions: A list of strings, or a ``datasets.Dataset`` with "caption" and "id"
            columns (then ``ids`` is ignored).
        ids: A list of ints or of strings, same length as ``captions``.
    """
    from datasets import Dataset, Features, Value

    if isinstance(captions, Dataset):
        ds = captions
    else:
        id_type = "string" if ids and isinstance(ids[0], str) else "int64"
        features = Features({"caption": Value("string"), "id": Value(id_type)})
        ds = Dataset.from_dict({"caption": list(captions), "id": list(ids)}, features=features)
    ds.save_to_disk(str(folder))


def write_embeddings(path: Path, embeddings: np.ndarray, dtype: str) -> None:
    """Save raw embeddings as ``.npy`` in ``dtype`` (chunked, so a memmap input streams);
    ``packed_bits``: the rows are already packed codes (uint8), saved as they are."""
    dtype = "uint8" if dtype == PACKED_BITS else dtype
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=embeddings.shape)
    step = 1 << 16
    for s in range(0, len(embeddings), step):
        out[s : s + step] = embeddings[s : s + step]
    out.flush()
    del out


def write_index_folder(
    out_dir: str | os.PathLike,
    index: faiss.Index,
    captions: Any,
    ids: Any,
    manifest: dict[str, Any],
    embeddings: np.ndarray | None = None,
    overwrite: bool = False,
    logsigma: np.ndarray | None = None,
) -> Path:
    """Write a complete knowledge index folder atomically.

    Everything goes into a temporary sibling folder (``.NAME.tmp-<pid>-<rand>``),
    is flushed to disk, and is renamed into place; an existing ``out_dir`` is
    renamed aside and deleted only after the new folder is in place. On any
    exception the temporary folder is removed and ``out_dir`` is untouched.

    Args:
        out_dir: Final folder.
        index: A CPU faiss index whose row ``i`` is caption ``i``.
        captions: Captions (list of str, or a ``datasets.Dataset``, see :func:`write_captions`).
        ids: Caption ids (ignored when ``captions`` is a Dataset).
        manifest: From :func:`make_manifest`; ``files`` is filled in here (the dict is updated).
        embeddings: Raw embeddings to store (in ``manifest["embeddings"]["dtype"]``), or None.
        overwrite: Replace an existing folder (only if it is a knowledge index or empty).
        logsigma: A PCME index's (count, dim) caption log σ (``manifest["uncertainty"]``
            must be set), stored as float16.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: ``overwrite`` would replace a folder that is not a knowledge index.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if isinstance(index, faiss.IndexBinary):
            faiss.write_index_binary(index, str(tmp / INDEX_FILE))
        else:
            faiss.write_index(index, str(tmp / INDEX_FILE))
        write_captions(tmp / CAPTIONS_DIR, captions, ids)
        if embeddings is not None and manifest.get("embeddings"):
            write_embeddings(tmp / EMBEDDINGS_FILE, embeddings, manifest["embeddings"]["dtype"])
        else:
            manifest["embeddings"] = None
        if manifest.get("uncertainty"):
            if logsigma is None or len(logsigma) != manifest["count"]:
                raise UsageError(
                    "a probabilistic index needs the log sigma of every caption "
                    f"({manifest['count']}), got {None if logsigma is None else len(logsigma)}"
                )
            write_embeddings(tmp / LOGSIGMA_FILE, logsigma, "float16")
        manifest["files"] = describe_files(tmp)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
    try:  # make the rename itself durable
        fd = os.open(out_dir.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover
        pass
    logger.info("wrote knowledge index %s (%d captions)", out_dir, manifest["count"])
    return out_dir


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail early (before any encoding) when ``out_dir`` may not be written.

    Raises:
        FileExistsError: It exists and ``overwrite`` is False.
        ValueError: It exists, is not empty, and is not a knowledge index (no manifest),
            so ``overwrite`` would delete something else.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    if not out_dir.is_dir():
        raise UsageError(f"refusing to replace {out_dir}: it is a file, not an index folder")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise UsageError(
            f"refusing to replace {out_dir}: it is not a knowledge index folder "
            f"(no {MANIFEST_FILE}); choose another output folder"
        )


# --------------------------------------------------------------------------- reading


def mmap_flags() -> int:
    """The faiss read flags for a read-only memory-mapped index (0 if unsupported)."""
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", None) or getattr(faiss, "IO_FLAG_MMAP", 0)
    return flag | getattr(faiss, "IO_FLAG_READ_ONLY", 0) if flag else 0


def read_faiss_index(
    path: Path, mmap: bool = True, binary: bool = False
) -> tuple[faiss.Index, bool]:
    """Read a faiss index (``binary``: a binary index), memory-mapped where the type allows.

    Returns:
        ``(index, memory_mapped)``. When the mmap read fails for this index type the
        index is read normally into memory and a note is logged.
    """
    read = faiss.read_index_binary if binary else faiss.read_index
    flags = mmap_flags() if mmap else 0
    if flags:
        try:
            return read(str(path), flags), True
        except RuntimeError as err:
            logger.info(
                "memory-mapped read of %s is not supported for this index type (%s); "
                "reading it into memory",
                path,
                str(err).splitlines()[0][:200],
            )
    try:
        return read(str(path)), False
    except RuntimeError as err:
        raise IndexFormatError(
            f"cannot read faiss index {path} ({str(err).splitlines()[0][:200]}): the file is "
            "corrupted or not a faiss index; rebuild the index"
        ) from None


def owned_copy(index: faiss.Index) -> faiss.Index:
    """An in-memory CPU copy that owns its data (safe to ``add`` to, unlike an mmap'd index)."""
    if isinstance(index, faiss.IndexBinary):
        return faiss.deserialize_index_binary(faiss.serialize_index_binary(index))
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    # clone_index keeps mmap'd storage as a view; a serialise round trip copies it.
    return faiss.deserialize_index(faiss.serialize_index(index))


def read_captions(folder: Path, mmap: bool = True) -> Any:
    """Load the captions store with ``datasets.load_from_disk`` (memory-mapped Arrow)."""
    from datasets import load_from_disk

    ds = load_from_disk(str(folder), keep_in_memory=not mmap)
    missing = {"caption", "id"} - set(ds.column_names)
    if missing:
        raise IndexFormatError(f"captions store {folder} lacks columns {sorted(missing)}")
    return ds
