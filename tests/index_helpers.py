"""Shared helpers of the knowledge-index tests: a fake retriever, vectors, builds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rvqa.retriever.index import build_index_from_embeddings

REPO = Path(__file__).resolve().parents[1]


class HashEncoder:
    """A fake retriever: each text maps to a fixed random unit vector (sha256-seeded)."""

    def __init__(self, dim: int = 32, fp: str = "sha256:fake-retriever"):
        self.embed_dim = dim
        self._fp = fp
        self.encoded = 0  # texts encoded by this instance (shard check)

    def fingerprint(self) -> str:
        return self._fp

    def embed_texts(self, texts, batch_size=256, show_progress=False) -> np.ndarray:
        self.encoded += len(texts)
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.embed_dim)
            out[i] = v / np.linalg.norm(v)
        return out

    def embed_images(self, images, batch_size=64, show_progress=False) -> np.ndarray:
        # "images" are caption strings here: the image of a caption is its own vector
        return self.embed_texts([str(im) for im in images])


@dataclass
class Caption:
    caption: str
    caption_id: int


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, n_clusters: int = 1000, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres (noise as large as the centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ x.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def build_arrays(tmp_path, x, name="ix", factory="Flat", ids=None, **kw) -> Path:
    captions = [f"caption {i}" for i in range(len(x))]
    kw.setdefault("show_progress", False)
    return build_index_from_embeddings(
        x, captions, ids, tmp_path / name, "sha256:fake-retriever", factory=factory, **kw
    )


CORPUS = [f"caption {i % 97} of the corpus" for i in range(301)]


def make_flat_data(folder: Path) -> tuple:
    """3,000 random unit vectors with string ids in a float32 Flat index, plus 40 queries."""
    x = unit_rows(3000, 32, seed=0)
    q = unit_rows(40, 32, seed=1)
    ids = [f"c{i}" for i in range(len(x))]
    path = build_arrays(folder, x, ids=ids, embeddings_dtype="float32")
    return x, q, ids, path


def make_clustered_data() -> tuple:
    """20,000 clustered unit vectors, 200 queries from the same clusters, exact top-10 rows."""
    allx = clustered(20_200, 64)
    x, q = allx[:20_000], allx[20_000:]
    return x, q, brute_force(q, x, 10)[1]
