"""Recall@K: exact agreement with brute-force pure-Python references (one positive per caption and many-to-many), ties, folds, memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from rvqa.metrics import recall_at_k, recall_at_k_folds, recall_at_k_multi


def brute_force_recall(images, texts, text_to_image, ks=(1, 5, 10)):
    """Pure-Python reference: loops and sorted lists, stable order on ties."""
    images = [[float(x) for x in row] for row in images]
    texts = [[float(x) for x in row] for row in texts]
    owner = [int(i) for i in text_to_image]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    i2t_ranks = []
    for i, im in enumerate(images):
        # sort by descending score, then ascending index (= a stable sort)
        ranking = sorted(range(len(texts)), key=lambda j: (-dot(im, texts[j]), j))
        i2t_ranks.append(min(r for r, j in enumerate(ranking) if owner[j] == i))
    t2i_ranks = []
    for j, tx in enumerate(texts):
        ranking = sorted(range(len(images)), key=lambda i: (-dot(images[i], tx), i))
        t2i_ranks.append(ranking.index(owner[j]))

    out = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    return out


def assert_same(result, expected):
    assert list(result) == list(expected)
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key


def paired_data(rng, n_images, per_image, dim, noise=1.0, dtype=np.float64):
    images = rng.standard_normal((n_images, dim))
    t2i = np.repeat(np.arange(n_images), per_image)
    texts = images[t2i] + noise * rng.standard_normal((t2i.size, dim))
    return images.astype(dtype), texts.astype(dtype), t2i


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_brute_force_five_captions_per_image(chunk_size):
    rng = np.random.default_rng(0)
    images, texts, t2i = paired_data(rng, 40, 5, 8)
    expected = brute_force_recall(images, texts, t2i)
    assert 0 < expected["i2t_r1"] < 100 and 0 < expected["t2i_r1"] < 100  # not trivial
    assert_same(recall_at_k(images, texts, t2i, chunk_size=chunk_size), expected)


def test_matches_brute_force_shuffled_and_uneven_captions():
    rng = np.random.default_rng(1)
    n_images = 30
    # 1 to 7 captions per image, captions in random order
    t2i = np.concatenate([np.full(rng.integers(1, 8), i) for i in range(n_images)])
    t2i = t2i[rng.permutation(t2i.size)]
    images = rng.standard_normal((n_images, 6))
    texts = images[t2i] + 1.2 * rng.standard_normal((t2i.size, 6))
    ks = (1, 2, 3, 50)
    expected = brute_force_recall(images, texts, t2i, ks)
    assert_same(recall_at_k(images, texts, t2i, ks=ks, chunk_size=4), expected)
    assert_same(recall_at_k(images, texts, t2i, ks=ks), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_match_stable_brute_force(dtype, seed):
    # Small integer embeddings: dot products are exact and tie a lot.
    rng = np.random.default_rng(seed)
    n_images = 25
    t2i = np.repeat(np.arange(n_images), 5)[rng.permutation(5 * n_images)]
    images = rng.integers(-1, 2, size=(n_images, 3))
    texts = rng.integers(-1, 2, size=(t2i.size, 3))
    texts[::4] = images[t2i[::4]]  # some exact copies of the own image
    images[1] = images[0]  # duplicate images
    texts[7] = texts[3]  # duplicate captions
    expected = brute_force_recall(images, texts, t2i)
    got = recall_at_k(images.astype(dtype), texts.astype(dtype), t2i, chunk_size=6)
    assert_same(got, expected)


def test_tie_breaking_by_index_hand_worked():
    # Two identical images and two identical captions: caption 0 belongs to
    # image 1, caption 1 to image 0. All four scores are equal (= 1).
    images = np.array([[1.0, 0.0], [1.0, 0.0]])
    texts = np.array([[1.0, 0.0], [1.0, 0.0]])
    t2i = np.array([1, 0])
    out = recall_at_k(images, texts, t2i, ks=(1, 2))
    # i2t: stable order of captions is [0, 1]; image 0's caption 1 is at rank 1
    # (miss at K=1), image 1's caption 0 at rank 0 (hit). t2i likewise.
    assert out == {
        "i2t_r1": 50.0,
        "i2t_r2": 100.0,
        "t2i_r1": 50.0,
        "t2i_r2": 100.0,
        "rsum": 300.0,
    }


def test_all_scores_equal():
    # Everything ties: image i's first caption (index 5 i) sits at rank 5 i.
    images = np.zeros((4, 3))
    texts = np.zeros((20, 3))
    t2i = np.repeat(np.arange(4), 5)
    out = recall_at_k(images, texts, t2i)
    # i2t ranks 0, 5, 10, 15 -> R@1 = 25, R@5 = 25, R@10 = 50
    # t2i: caption of image i is at rank i -> R@1 = 25, R@5 = R@10 = 100
    assert out == {
        "i2t_r1": 25.0,
        "i2t_r5": 25.0,
        "i2t_r10": 50.0,
        "t2i_r1": 25.0,
        "t2i_r5": 100.0,
        "t2i_r10": 100.0,
        "rsum": 325.0,
    }


def test_perfect_retrieval_and_keys():
    images = np.eye(6)
    t2i = np.repeat(np.arange(6), 5)
    out = recall_at_k(images, images[t2i], t2i)
    assert list(out) == ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
    assert all(v == 100.0 for k, v in out.items() if k != "rsum")
    assert out["rsum"] == 600.0
    assert all(type(v) is float for v in out.values())


def test_chunking_does_not_change_results_medium():
    # Against a vectorised full-matrix reference with stable argsort.
    rng = np.random.default_rng(3)
    images, texts, t2i = paired_data(rng, 300, 5, 16, noise=2.0, dtype=np.float32)
    scores = images @ texts.T
    order = np.argsort(-scores, axis=1, kind="stable")
    i2t = np.array([np.flatnonzero(t2i[order[i]] == i)[0] for i in range(len(images))])
    order_t = np.argsort(-scores.T, axis=1, kind="stable")
    t2i_ranks = np.array([np.flatnonzero(order_t[j] == t2i[j])[0] for j in range(len(texts))])
    expected = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i_ranks)):
        for k in (1, 5, 10):
            expected[f"{name}_r{k}"] = 100.0 * np.count_nonzero(ranks < k) / len(ranks)
    expected["rsum"] = sum(expected.values())
    for chunk in (1, 33, 300, 5000):
        assert recall_at_k(images, texts, t2i, chunk_size=chunk) == expected


def test_folds_protocol():
    rng = np.random.default_rng(4)
    images, texts, t2i = paired_data(rng, 40, 5, 8, noise=1.5)
    # captions in shuffled order: folds follow the images, captions follow them
    perm = rng.permutation(len(texts))
    texts, t2i = texts[perm], t2i[perm]
    folds = []
    for f in range(5):
        lo, hi = 8 * f, 8 * (f + 1)
        sel = [j for j in range(len(t2i)) if lo <= t2i[j] < hi]
        folds.append(brute_force_recall(images[lo:hi], texts[sel], t2i[sel] - lo))
    expected = {key: sum(fold[key] for fold in folds) / 5 for key in folds[0]}
    got = recall_at_k_folds(images, texts, t2i, n_folds=5)
    assert_same(got, expected)
    # one fold is the 5K protocol: recall_at_k on everything
    assert recall_at_k_folds(images, texts, t2i, n_folds=1) == recall_at_k(images, texts, t2i)
    with pytest.raises(ValueError, match="cannot split 40 images .* into 3 equal folds"):
        recall_at_k_folds(images, texts, t2i, n_folds=3)
    with pytest.raises(ValueError, match="n_folds must be a positive integer"):
        recall_at_k_folds(images, texts, t2i, n_folds=0)


def test_input_validation():
    rng = np.random.default_rng(5)
    images, texts, t2i = paired_data(rng, 4, 5, 3)
    with pytest.raises(ValueError, match=r"must be 2-D .* shapes \(12,\) and \(20, 3\)"):
        recall_at_k(images.ravel(), texts, t2i)
    with pytest.raises(
        ValueError,
        match=r"embedding dims differ: image_embeddings \(4, 3\) vs text_embeddings \(20, 5\)",
    ):
        recall_at_k(images, np.zeros((20, 5)), t2i)
    with pytest.raises(
        ValueError, match=r"text_to_image must have shape \(20,\).*got shape \(19,\)"
    ):
        recall_at_k(images, texts, t2i[:-1])
    with pytest.raises(
        ValueError, match=r"5 indices outside \[0, 4\) for image_embeddings \(4, 3\): e.g. \[4\]"
    ):
        recall_at_k(images, texts, np.where(t2i == 3, 4, t2i))
    with pytest.raises(ValueError, match=r"outside \[0, 4\).*e.g. \[-1\]"):
        recall_at_k(images, texts, np.where(t2i == 0, -1, t2i))
    with pytest.raises(ValueError, match="integer image indices, got dtype float64"):
        recall_at_k(images, texts, t2i.astype(float))
    with pytest.raises(ValueError, match=r"1 of 4 images have no caption.*\[2\]"):
        recall_at_k(images, texts, np.where(t2i == 2, 1, t2i))
    bad = images.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"image_embeddings \(shape \(4, 3\)\) contains NaN"):
        recall_at_k(bad, texts, t2i)
    with pytest.raises(ValueError, match="need at least one image"):
        recall_at_k(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="ks must be positive integers"):
        recall_at_k(images, texts, t2i, ks=(0, 5))
    with pytest.raises(ValueError, match="ks must be positive integers"):
        recall_at_k(images, texts, t2i, ks=())
    with pytest.raises(ValueError, match="ks must not repeat"):
        recall_at_k(images, texts, t2i, ks=(1, 1))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        recall_at_k(images, texts, t2i, chunk_size=0)


def test_coco_5k_scale_runs_in_bounded_memory():
    # 5,000 images x 25,000 captions: the full float32 score matrix would be
    # 500 MB; the chunked computation must stay well under 200 MB.
    rng = np.random.default_rng(6)
    images, texts, t2i = paired_data(rng, 5000, 5, 16, noise=0.8, dtype=np.float32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = recall_at_k(images, texts, t2i)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert 0 < out["i2t_r1"] < out["i2t_r5"] < out["i2t_r10"] < 100
    assert 0 < out["t2i_r1"] < out["t2i_r5"] < out["t2i_r10"] < 100
    folds = recall_at_k_folds(images, texts, t2i)
    assert folds["i2t_r1"] > out["i2t_r1"]  # 1K galleries are easier than 5K


def brute_force_multi(images, texts, texts_of_image, ks=(1, 5, 10)):
    """Pure-Python many-to-many reference: a hit is ANY positive in the stable top K."""
    images = [[float(x) for x in row] for row in images]
    texts = [[float(x) for x in row] for row in texts]
    images_of_text = [
        {i for i, ts in enumerate(texts_of_image) if j in ts} for j in range(len(texts))
    ]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def ranks(queries, gallery, positives):
        out = []
        for q, pos in zip(queries, positives):
            ranking = sorted(range(len(gallery)), key=lambda j: (-dot(q, gallery[j]), j))
            out.append(min(r for r, j in enumerate(ranking) if j in pos))
        return out

    out = {}
    for name, rs in (
        ("i2t", ranks(images, texts, texts_of_image)),
        ("t2i", ranks(texts, images, images_of_text)),
    ):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * sum(r < k for r in rs) / len(rs)
    out["rsum"] = sum(out.values())
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_multi_positive_matches_brute_force_with_ties(seed, chunk_size):
    rng = np.random.default_rng(seed)
    n_images, n_texts = 30, 18
    # Small integer embeddings: exact dot products, many ties.
    images = rng.integers(-1, 2, size=(n_images, 3))
    texts = rng.integers(-1, 2, size=(n_texts, 3))
    images[1] = images[0]
    texts[5] = texts[3]
    texts_of_image = [
        set(rng.choice(n_texts, size=rng.integers(1, 4), replace=False).tolist())
        for _ in range(n_images)
    ]
    texts_of_image[0] = {5}  # a positive tied with a lower-index negative (text 3)
    for j in range(n_texts):  # every text belongs to some image
        if not any(j in ts for ts in texts_of_image):
            texts_of_image[j % n_images].add(j)
    expected = brute_force_multi(images, texts, texts_of_image)
    assert 0 < expected["i2t_r1"] < 100 and 0 < expected["rsum"] < 600  # not trivial
    got = recall_at_k_multi(
        images.astype(np.float32), texts.astype(np.float32), texts_of_image, chunk_size=chunk_size
    )
    assert_same(got, expected)


def test_single_positive_protocol_is_the_multi_positive_case():
    # recall_at_k (each caption owned by one image) == recall_at_k_multi with
    # each image's own captions as its positives, bit for bit.
    rng = np.random.default_rng(7)
    images, texts, t2i = paired_data(rng, 60, 5, 8, noise=1.3, dtype=np.float32)
    perm = rng.permutation(len(texts))
    texts, t2i = texts[perm], t2i[perm]
    texts_of_image = [np.flatnonzero(t2i == i).tolist() for i in range(len(images))]
    for chunk in (3, 1024):
        assert recall_at_k_multi(images, texts, texts_of_image, chunk_size=chunk) == recall_at_k(
            images, texts, t2i, chunk_size=chunk
        )


def test_multi_positive_hand_worked_tie():
    # One text shared by both (identical) images, one text owned by image 1 only.
    images = np.array([[1.0, 0.0], [1.0, 0.0]])
    texts = np.array([[1.0, 0.0], [1.0, 0.0]])
    out = recall_at_k_multi(images, texts, [{1}, {0, 1}], ks=(1, 2))
    # i2t: image 0's only positive (text 1) ties with text 0 and comes second: miss at 1;
    # image 1 has text 0 first: hit. t2i: text 0 -> image 1 (second): miss; text 1 -> image 0: hit.
    assert out == {"i2t_r1": 50.0, "i2t_r2": 100.0, "t2i_r1": 50.0, "t2i_r2": 100.0, "rsum": 300.0}


def test_multi_positive_input_validation():
    images, texts = np.eye(3), np.eye(3)
    with pytest.raises(
        ValueError, match=r"texts_of_image has 2 entries for image_embeddings \(3, 3\)"
    ):
        recall_at_k_multi(images, texts, [{0}, {1}])
    with pytest.raises(ValueError, match=r"1 of 3 images have no text .*\[1\]"):
        recall_at_k_multi(images, texts, [{0}, set(), {1, 2}])
    with pytest.raises(ValueError, match=r"indices outside \[0, 3\) .*e.g. \[3\]"):
        recall_at_k_multi(images, texts, [{0}, {1}, {2, 3}])
    with pytest.raises(ValueError, match=r"1 of 3 texts belong to no image .*\[2\]"):
        recall_at_k_multi(images, texts, [{0}, {1}, {1}])
    with pytest.raises(ValueError, match="embedding dims differ"):
        recall_at_k_multi(images, np.eye(4), [{0}, {1}, {2}])
    with pytest.raises(ValueError, match="ks must not repeat"):
        recall_at_k_multi(images, texts, [{0}, {1}, {2}], ks=(5, 5))


def _brute_r_precision(img, txt, matches):
    """Per query: sort the gallery (score descending, index ascending), R = valid
    matches, share of valid ones in the top R; by plain loops."""
    out = {}
    for key, q, g, rel in (("i2t_rp", img, txt, matches.T), ("t2i_rp", txt, img, matches)):
        vals = []
        for i in range(len(q)):
            scores = [float(np.dot(q[i], g[j])) for j in range(len(g))]
            order = sorted(range(len(g)), key=lambda j: (-scores[j], j))
            r = int(rel[i].sum())
            vals.append(sum(bool(rel[i][j]) for j in order[:r]) / r)
        out[key] = 100 * sum(vals) / len(vals)
    return out


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_r_precision_matches_brute_force(chunk):
    from rvqa.metrics import r_precision

    rng = np.random.default_rng(4)
    img = rng.normal(size=(7, 5)).astype(np.float32)
    txt = rng.normal(size=(13, 5)).astype(np.float32)
    img[3] = img[2]  # a tie between two images
    matches = rng.random((13, 7)) < 0.3
    matches[np.arange(13), np.arange(13) % 7] = True  # every caption and image has one
    got = r_precision(img, txt, matches, chunk_size=chunk)
    ref = _brute_r_precision(img, txt, matches)
    assert got == pytest.approx(ref, rel=1e-12)
    # perfect embeddings of a one-to-one truth give 100
    eye = np.eye(4, dtype=np.float32)
    assert r_precision(eye, eye, np.eye(4, dtype=bool)) == {"i2t_rp": 100.0, "t2i_rp": 100.0}


def test_r_precision_errors():
    from rvqa.metrics import r_precision

    e = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"matches must be a bool array of shape .*\(3, 3\)"):
        r_precision(e, e, np.eye(3))
    m = np.eye(3, dtype=bool)
    m[1, 1] = False
    with pytest.raises(ValueError, match="caption 1 has no valid match"):
        r_precision(e, e, m)
