"""The index-info report (rvqa.retriever.index.info)."""

from __future__ import annotations

from rvqa.retriever.index import (
    KnowledgeIndex,
    build_index,
    index_info,
)
from tests.index_helpers import (
    HashEncoder,
    build_arrays,
    clustered,
)


def test_index_info_sanity_search(tmp_path):
    enc = HashEncoder()
    path = build_index(enc, [f"caption number {i}" for i in range(20)], tmp_path / "info")
    text = index_info(path)
    assert "Flat" in text and "20" in text and "sha256:fake-retriever" in text
    assert "3/3 captions find themselves at rank 1 (stored embeddings)" in text
    assert "3/3" in index_info(path, enc) and "re-encoded" in index_info(path, enc)
    assert "tuning" not in text  # exact search: nothing tuned


def test_index_info_shows_tuning_curve(tmp_path):
    x = clustered(2000, 16, n_clusters=20)
    path = build_arrays(tmp_path, x, factory="IVF16,Flat")
    m = KnowledgeIndex.load(path).manifest
    curve = m["search_tuning"]["curve"]
    assert curve and curve[-1][0] >= m["search_params"]["nprobe"]
    line = next(ln for ln in index_info(path).splitlines() if ln.strip().startswith("tuning"))
    assert (
        "recall@10 by nprobe (400 queries: the worse of 200 stored vectors + Gaussian noise of "
        "norm 1, renormalised and the corpus' last 200 vectors, searched before they were "
        "added): "
    ) in line
    assert line.endswith(", ".join(f"{v}: {r:.3f}" for v, r, _ in curve))
    proxies = m["search_tuning"]["proxies"]
    line = next(ln for ln in index_info(path).splitlines() if ln.strip().startswith("proxies"))
    noise, tail = proxies["noise"], proxies["held_out"]
    assert line == (
        f"  proxies           at nprobe={m['search_params']['nprobe']}: "
        f"noise {noise[0]:.3f} (bound {noise[1]:.3f}), "
        f"corpus tail {tail[0]:.3f} (bound {tail[1]:.3f})"
    )
