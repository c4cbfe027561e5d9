"""The ``rvqa index-info`` report: a human-readable summary of an index folder plus a sanity search."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rvqa.retriever.index.format import CAPTIONS_DIR, EMBEDDINGS_FILE, INDEX_FILE, LOGSIGMA_FILE
from rvqa.retriever.index.knowledge_index import KnowledgeIndex
from rvqa.retriever.index.types import CaptionEncoder

__all__ = ["index_info"]


def index_info(
    path: str | os.PathLike,
    encoder: CaptionEncoder | None = None,
    n_check: int = 3,
    *,
    use_gpu: bool = False,
) -> str:
    """A human-readable summary of an index folder plus a sanity search.

    Verifies every file's sha256, then searches the first ``n_check`` captions —
    re-encoded with ``encoder`` when given (the fingerprint is checked), else their
    stored embeddings, else vectors reconstructed from the index — and reports
    whether each finds itself at rank 1 (ties with an identical score count).
    ``use_gpu`` runs the sanity search on GPU (:meth:`KnowledgeIndex.load`).

    Raises:
        The errors of :meth:`KnowledgeIndex.load`.
    """
    path = Path(path)
    index = KnowledgeIndex.load(path, encoder, verify=True, use_gpu=use_gpu)
    m = index.manifest
    dd = m.get("dedupe") or {}
    auto = m.get("auto_choice")
    tuning = m.get("search_tuning") or {}
    recall = {k: v for k, v in tuning.items() if k.startswith("recall_at_")}
    files = m["files"]
    caption_bytes = sum(v["bytes"] for k, v in files.items() if k.startswith(CAPTIONS_DIR + "/"))
    lines = [
        f"Knowledge index {path}",
        f"  format            version {m['format_version']} (written by rvqa {m.get('rvqa_version', '?')})",
        f"  created           {m.get('created')}"
        + (f", updated {m['updated']}" if m.get("updated") else ""),
        f"  retriever         {m['retriever_fingerprint']}",
        f"  captions          {m['count']:,} from {m.get('caption_source') or '(unspecified)'!s}",
        "  dedupe            "
        + (
            f"removed {dd.get('removed', 0):,} duplicates of {dd.get('input_count', 0):,}"
            if dd.get("enabled")
            else "off"
        ),
        (
            f"  vectors           {m['embed_dim']}-bit binary codes, Hamming distance "
            "(score = 1 - 2 * hamming / bits)"
            if m["metric"] == "hamming"
            else f"  vectors           dim {m['embed_dim']}, inner product on L2-normalised vectors"
        ),
        f"  faiss             {m['factory']}"
        + (f" (automatic: {auto['reason']})" if auto else "")
        + "".join(f", {k}={v}" for k, v in (m.get("build_params") or {}).items()),
        "  search params     "
        + (", ".join(f"{k}={v}" for k, v in m["search_params"].items()) or "none (exact)")
        + (f"; measured {_fmt_recall(recall)}" if recall else ""),
    ]
    knob = next(iter(m["search_params"]), "value")
    if tuning.get("curve"):
        lines.append(
            f"  tuning            recall@10 by {knob} ({tuning.get('queries')} queries: "
            f"{tuning.get('query_proxy')}): "
            + ", ".join(f"{c[0]}: {c[1]:.3f}" for c in tuning["curve"])
        )
    if tuning.get("proxies"):
        names = {"held_out": "corpus tail"}
        lines.append(
            f"  proxies           at {knob}={m['search_params'].get(knob)}: "
            + ", ".join(
                f"{names.get(name, name)} {r:.3f} (bound {lb:.3f})"
                for name, (r, lb) in tuning["proxies"].items()
            )
        )
    lines += [
        f"  memory-mapped     {index.memory_mapped}",
        f"  files             {INDEX_FILE} {_mb(files[INDEX_FILE]['bytes'])}, {CAPTIONS_DIR}/ "
        f"{_mb(caption_bytes)}"
        + (
            f", {EMBEDDINGS_FILE} {_mb(files[EMBEDDINGS_FILE]['bytes'])} ({m['embeddings']['dtype']})"
            if m.get("embeddings")
            else ", no stored embeddings"
        )
        + (
            f", {LOGSIGMA_FILE} {_mb(files[LOGSIGMA_FILE]['bytes'])} (PCME caption log sigma)"
            if m.get("uncertainty")
            else ""
        )
        + " (sha256 verified)",
    ]
    lines += _sanity_lines(index, encoder, n_check)
    return "\n".join(lines)


def _fmt_recall(recall: dict) -> str:
    return ", ".join(f"{k.replace('_at_', '@')} {v}" for k, v in recall.items())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _sanity_lines(index: KnowledgeIndex, encoder: Any, n_check: int) -> list[str]:
    n = min(n_check, len(index))
    if n == 0:
        return ["  sanity search     skipped (empty index)"]
    ids, texts = index.lookup(range(n))
    if encoder is not None:
        q, how = encoder.embed_texts(texts), "re-encoded captions"
    else:
        vectors = index.leading_vectors(n)
        if vectors is None:
            return [
                "  sanity search     skipped (no encoder, no stored embeddings, not reconstructible)"
            ]
        q, how = vectors
    results = index.search(q, 5)
    ok = 0
    details = []
    for text, cid, r in zip(texts, ids, results):
        top = r.scores[0] if r.scores else float("nan")
        tied = [i for i, s in zip(r.ids, r.scores) if s >= top - 1e-6]
        found = cid in tied
        ok += found
        rank = r.ids.index(cid) + 1 if cid in r.ids else None
        details.append(
            f"    {'ok ' if found else 'BAD'} id {cid!r} {text[:50]!r}: "
            + (f"rank {rank}, score {r.scores[rank - 1]:.3f}" if rank else "not in the top 5")
        )
    head = f"  sanity search     {ok}/{n} captions find themselves at rank 1 ({how})"
    return [head, *details]
