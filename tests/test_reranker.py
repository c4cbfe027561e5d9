"""The cross-attention re-ranker: the model (formulas, steps, loss, save/load), its
training run and the pipeline stage (``rerank=N``) with its bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rvqa.errors import IndexMismatchError, RunFolderError, UsageError
from rvqa.retriever.reranker import MemoryUnit, RerankerConfig, RerankerModel

TINY = {"hidden_size": 16, "num_steps": 3, "text_layers": 1, "num_heads": 2, "dropout": 0.0}


@pytest.fixture(scope="module")
def retriever(tiny_run):
    from rvqa.retriever.modeling import RetrieverModel
    from rvqa.run_layout import retriever_dir

    return RetrieverModel.from_pretrained(retriever_dir(tiny_run)).eval()


@pytest.fixture(scope="module")
def images():
    from tests.tiny import draw_shape

    return [
        draw_shape("red", "circle"),
        draw_shape("blue", "square"),
        draw_shape("green", "circle"),
    ]


def _reranker(retriever, **kw):
    torch.manual_seed(0)
    return RerankerModel.from_retriever(retriever, **{**TINY, **kw}).eval()


def _tokens(retriever, images):
    *_, tokens = retriever.embed_images(images, return_tokens=True)
    return tokens.clone()  # a normal tensor (made under inference_mode), usable with autograd


# ------------------------------------------------------------------ formulas


def cross_attention(q, c, query_mask, context_mask, lam, norm="none"):
    """The reference: (P, Q, d) queries over (P, C, d) context, one pair per row, as the
    module doc writes it (``softmax_j(λ cos(q_i, u_j))``; with ``norm="queries"`` SCAN's
    LeakyReLU and normalisation over the valid queries first)."""
    sim = torch.bmm(F.normalize(q, dim=-1), F.normalize(c, dim=-1).transpose(1, 2))
    if norm == "queries":
        sim = F.leaky_relu(sim, 0.1)
        if query_mask is not None:
            sim = sim * query_mask.unsqueeze(-1)
        sim = sim / sim.norm(dim=1, keepdim=True).clamp(min=1e-8)
    logits = lam * sim
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask.bool().unsqueeze(1), float("-inf"))
    return torch.bmm(logits.softmax(dim=-1), c)


def reference_match(model, regions, words, word_mask):
    """IMRAM's matching written out per (image, caption) pair: (B, R, d) regions, (B, M, L,
    d) words → (B, M, K); each step's attention, score and ``MemoryUnit`` update as the
    module doc writes them (no shared projections)."""
    b, m, length, d = words.shape
    cfg = model.config
    pairs = regions.unsqueeze(1).expand(b, m, *regions.shape[1:]).reshape(b * m, -1, d)
    flat, mask = words.reshape(b * m, length, d), word_mask.reshape(b * m, length)
    queries = {"t2i": flat, "i2t": pairs}
    steps = []
    for k in range(cfg.num_steps):
        total = 0.0
        for direction in model.directions:
            q = queries[direction]
            if direction == "t2i":
                c = cross_attention(q, pairs, mask, None, cfg.attention_lambda, cfg.attention_norm)
                cos = F.cosine_similarity(q, c, dim=-1)
                score = (cos * mask).sum(1) / mask.sum(1)
            else:
                c = cross_attention(q, flat, None, mask, cfg.attention_lambda, cfg.attention_norm)
                score = F.cosine_similarity(q, c, dim=-1).mean(1)
            total = total + score
            if k + 1 < cfg.num_steps:
                queries[direction] = model.memories[direction](q, c)
        steps.append(total)
    return torch.stack(steps, -1).view(b, m, -1)


def test_the_reference_attention_is_the_formula_written_out():
    """The pairwise reference the fast ``match`` is tested against, checked in turn
    against the formulas element by element."""
    torch.manual_seed(1)
    q, c = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    qmask = torch.tensor([[True, True, False]])
    cmask = torch.tensor([[True, True, True, False, True]])
    lam = 4.0
    # the default: α_ij = softmax_j(λ cos(q_i, u_j)) over valid j
    got = cross_attention(q, c, qmask, cmask, lam)[0]
    for i in range(3):
        cos = F.cosine_similarity(q[0, i][None], c[0], dim=-1)
        w = torch.exp(lam * cos) * cmask[0].float()
        torch.testing.assert_close(got[i], ((w / w.sum())[:, None] * c[0]).sum(0))
    got = cross_attention(q, c, qmask, cmask, lam, norm="queries")[0]
    # s_ij = LeakyReLU(cos(q_i, c_j)); s̄_ij = s_ij / sqrt(Σ_i valid s_ij²); α = softmax_j(λ s̄) over valid j
    s = torch.zeros(3, 5)
    for i in range(3):
        for j in range(5):
            s[i, j] = F.leaky_relu(F.cosine_similarity(q[0, i], c[0, j], dim=0), 0.1)
    s = s * qmask[0].float()[:, None]
    norm = torch.sqrt((s**2).sum(0, keepdim=True))
    sbar = s / norm
    for i in range(3):
        w = torch.exp(lam * sbar[i]) * cmask[0].float()
        w = w / w.sum()
        expected = (w[:, None] * c[0]).sum(0)
        torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"attention_norm": "queries"},
        {"directions": "t2i"},
        {"directions": "i2t", "num_steps": 2},
        {"num_steps": 1},
    ],
)
def test_match_agrees_with_the_pairwise_reference(retriever, kw):
    """The shared-projection ``match`` (module doc) equals IMRAM written out pair by pair,
    in its scores and in its gradients, with ragged captions and two images."""
    model = _reranker(retriever, **kw).train()
    torch.manual_seed(5)
    b, m, length, r, d = 2, 3, 6, 4, model.config.hidden_size
    regions = torch.randn(b, r, d, requires_grad=True)
    words = torch.randn(b, m, length, d, requires_grad=True)
    mask = torch.ones(b, m, length, dtype=torch.bool)
    mask[0, 1, 3:] = False
    mask[1, 2, 1:] = False
    got = model.match(regions, words, mask)
    want = reference_match(model, regions, words, mask)
    assert got.shape == (b, m, model.config.num_steps)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(got)
    params = [regions, words, *[p for p in model.memories.parameters()]]
    g_got = torch.autograd.grad((got * weights).sum(), params, allow_unused=True)
    g_want = torch.autograd.grad((want * weights).sum(), params, allow_unused=True)
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_memory_unit_split_is_the_same_update():
    """``split`` stacks the query and context halves (the update doubled: tanh(x) =
    2σ(2x) − 1); ``_memory_update`` from them is ``MemoryUnit.forward``."""
    from rvqa.retriever.reranker import _memory_update

    torch.manual_seed(3)
    mem = MemoryUnit(4)
    q, c = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    w_q, w_c, _ = mem.split()
    got = _memory_update(q, q, c @ w_c.T, mem.split())
    torch.testing.assert_close(got, mem(q, c), atol=1e-6, rtol=1e-5)
    assert w_q.shape == w_c.shape == (8, 4)


def test_memory_unit_is_the_gated_update():
    torch.manual_seed(2)
    mem = MemoryUnit(4)
    q, c = torch.randn(2, 4), torch.randn(2, 4)
    both = torch.cat([q, c], -1)
    g = torch.sigmoid(both @ mem.gate.weight.T + mem.gate.bias)
    o = torch.tanh(both @ mem.update.weight.T + mem.update.bias)
    torch.testing.assert_close(mem(q, c), g * q + (1 - g) * o)


# ------------------------------------------------------------------ the model


def test_shapes_and_step_scores_sum(retriever, images):
    model = _reranker(retriever)
    caps = [["a red circle", "a blue square"], ["a green circle", "a red square", "a blue circle"]]
    tok = model.tokenize([c for cs in caps for c in cs])
    enc = {k: torch.zeros(2, 3, tok["input_ids"].shape[1], dtype=torch.long) for k in tok}
    enc["input_ids"][0, :2], enc["input_ids"][1, :3] = tok["input_ids"][:2], tok["input_ids"][2:]
    enc["attention_mask"][0, :2] = tok["attention_mask"][:2]
    enc["attention_mask"][1, :3] = tok["attention_mask"][2:]
    enc["attention_mask"][0, 2, 0] = 1
    cand = torch.tensor([[True, True, False], [True, True, True]])
    out = model(
        _tokens(retriever, images[:2]),
        enc["input_ids"],
        enc["attention_mask"],
        retrieval_scores=torch.zeros(2, 3),
        candidate_mask=cand,
    )
    assert out.logits.shape == (2, 3)
    assert out.step_scores.shape == (2, 3, 3)
    torch.testing.assert_close(out.match_scores, out.step_scores.sum(-1))
    assert torch.isinf(out.logits[0, 2]) and torch.isfinite(out.logits[1]).all()


def test_step_count_ablation(retriever, images):
    """K = 1 scores exactly the first step of K = 3 (same weights); more steps add the
    refined queries' scores, which differ from the first step's."""
    three = _reranker(retriever, num_steps=3, fuse_retrieval_score=False)  # logits = scale · S
    one = RerankerModel(RerankerConfig(**{**three.config.to_dict(), "num_steps": 1})).eval()
    missing, unexpected = one.load_state_dict(three.state_dict(), strict=False)
    assert not missing and all(k.startswith("memories.") for k in unexpected)  # K = 1: none
    one.tokenizer = three.tokenizer
    toks = _tokens(retriever, images[:1])
    caps = [["a red circle", "a blue square", "a green circle"]]
    kw = {"retrieval_scores": [[0.0, 0.0, 0.0]]}
    s3 = three.score(toks, caps, **kw)[0]
    s1 = one.score(toks, caps, **kw)[0]
    enc = three.tokenize(caps[0])
    steps = (
        three(toks, enc["input_ids"][None], enc["attention_mask"][None], torch.zeros(1, 3))
        .step_scores[0]
        .detach()
    )
    scale = three.logit_scale.exp().item()
    np.testing.assert_allclose(s1, scale * steps[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s3, scale * steps.sum(-1).numpy(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(steps[:, 1], steps[:, 0])


def test_an_untrained_fused_reranker_keeps_the_retrieval_order(retriever, images):
    """α = 0 at the start: the fused logit is w · retrieval score / c (w = 1), whatever S says."""
    model = _reranker(retriever, retrieval_score_scale=0.25)
    caps = [["a red circle", "a blue square", "a green circle", "a red square"]]
    scores = [[0.2, 0.9, 0.5, 0.1]]
    logits = model.score(_tokens(retriever, images[:1]), caps, scores)[0]
    assert np.argsort(-logits).tolist() == [1, 2, 0, 3]
    np.testing.assert_allclose(logits, np.array(scores[0]) / 0.25, rtol=1e-6)


def test_score_spread_and_the_negatives_drawn():
    from rvqa.retriever.rerank_train import Candidates, RerankDataset, score_spread

    top = np.array([[0.9, 0.8, 0.7], [0.5, 0.5, 0.2]], dtype=np.float32)
    assert score_spread(top) == pytest.approx(np.median(top.std(axis=1)), rel=5e-3)
    assert score_spread(np.ones((3, 4), np.float32)) == 1.0  # no spread: no scaling
    texts = [f"caption {i}" for i in range(12)]
    emb = np.eye(12, 4, dtype=np.float32)
    cands = Candidates(
        images=["a", "b"],
        image_of_record=np.array([0, 0, 1]),
        texts=texts,
        gallery_of_record=np.array([0, 1, 2]),
        positives=[{0, 1}, {2}],
        top=np.array([[0, 3, 1, 4, 5], [2, 6, 7, 8, 9]]),
        top_scores=np.zeros((2, 5), np.float32),
        image_emb=np.ones((2, 4), np.float32),
        text_emb=emb,
        tokens=np.zeros((2, 3, 4), np.float16),
    )
    ds = RerankDataset(cands, num_negatives=2, seed=0, num_random_negatives=3)
    item = ds[0]
    rows = [texts.index(c) for c in item["captions"]]
    assert rows[0] == 0 and len(rows) == 1 + 2 + 3 and len(set(rows)) == 6
    assert set(rows[1:3]) <= {3, 4, 5}  # hard: from the top-N, never an own caption
    assert not set(rows[1:]) & {0, 1}
    assert rows == [texts.index(c) for c in ds[0]["captions"]]  # seeded per item
    np.testing.assert_allclose(item["retrieval_scores"], emb[rows].sum(1))


def test_the_inference_word_table_matches_and_follows_the_weights(retriever):
    model = _reranker(retriever)
    enc = model.tokenize(["a red circle", "two shapes, one of them blue"])
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    with torch.no_grad():
        fast = model.encode_text(ids, mask)  # rows of the projected table
    slow = model.encode_text(ids, mask).detach()  # grad enabled: the projection itself
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.word_projection.weight.mul_(2.0)  # an optimiser step: the table is stale
        after = model.encode_text(ids, mask)
    torch.testing.assert_close(after, model.encode_text(ids, mask).detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, fast)


def test_directions_are_separate_memories(retriever):
    assert set(_reranker(retriever).memories) == {"t2i", "i2t"}
    assert set(_reranker(retriever, directions="t2i").memories) == {"t2i"}


def test_scores_do_not_depend_on_the_other_candidates(retriever, images):
    model = _reranker(retriever)
    toks = _tokens(retriever, images[:2])
    alone = model.score(toks[:1], [["a red circle"]], [[0.5]])[0]
    padded = model.score(
        toks,
        [["a red circle"], ["a blue square", "a picture of a blue square", "x"]],
        [[0.5], [0.1, 0.2, 0.3]],
    )
    np.testing.assert_allclose(padded[0], alone, rtol=1e-5, atol=1e-5)
    assert [len(s) for s in padded] == [1, 3]


def test_loss_falls_on_a_fixed_batch(retriever, images):
    model = _reranker(retriever).train()
    toks = _tokens(retriever, images)
    caps = ["a red circle", "a blue square", "a green circle"]
    enc = model.tokenize(caps)
    # image i's positive is caption i; all three candidates for every image
    ids = enc["input_ids"][None].expand(3, -1, -1)
    mask = enc["attention_mask"][None].expand(3, -1, -1)
    labels = torch.eye(3, dtype=torch.bool)
    scores = torch.zeros(3, 3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(toks, ids, mask, scores, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    order = [int(np.argmax(s)) for s in model.score(toks, [caps] * 3, [[0.0] * 3] * 3)]
    assert order == [0, 1, 2]


def test_save_load_gives_identical_scores(retriever, images, tmp_path):
    model = _reranker(retriever)
    toks = _tokens(retriever, images[:2])
    caps = [["a red circle", "a blue square"], ["a green circle"]]
    before = model.score(toks, caps, [[0.3, 0.1], [0.2]])
    model.save_pretrained(tmp_path / "rr")
    loaded = RerankerModel.from_pretrained(tmp_path / "rr").eval()
    after = loaded.score(toks, caps, [[0.3, 0.1], [0.2]])
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert loaded.config.retriever_fingerprint == retriever.fingerprint()
    assert not loaded.word_embeddings.weight.requires_grad  # frozen word vectors stay frozen


def test_bad_config_and_inputs(retriever, images, tmp_path):
    from rvqa.errors import ConfigError

    with pytest.raises(ConfigError, match="reranker.directions"):
        RerankerConfig(directions="sideways")
    with pytest.raises(ConfigError, match="reranker.num_steps"):
        RerankerConfig(num_steps=0)
    with pytest.raises(ConfigError, match="retrieval_score_scale must be > 0"):
        RerankerConfig(retrieval_score_scale=0.0)
    model = _reranker(retriever)
    with pytest.raises(UsageError, match="image_tokens must have shape"):
        model.score(torch.zeros(1, 4, 3), [["a red circle"]], [[0.1]])
    with pytest.raises(UsageError, match="one score per candidate"):
        model.score(_tokens(retriever, images[:1]), [["a", "b"]], [[0.1]])
    with pytest.raises(IndexMismatchError, match="trained for retriever"):
        model.check_retriever("sha256:other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        RerankerModel.from_pretrained(tmp_path / "empty")


# ------------------------------------------------------------------ training run


def _copy_tiny_run(tiny_run: Path, dest: Path) -> None:
    """A private copy of the tiny run's folder (run, indices, backbone): training a
    re-ranker there rewrites its rvqa_run.json, which the shared fixture must keep."""
    shutil.copytree(Path(tiny_run).parent, dest, ignore=shutil.ignore_patterns("feature_cache"))


def _rerank_config(root: Path, **reranker):
    """The tiny run's config at ``root`` with a tiny re-ranker trained on the COCO-format
    shapes fixture (24 images, 2 captions each)."""
    from rvqa.config import CaptionDataConfig
    from tests.tiny import coco_caption_fixture, tiny_run_config

    captions, images = coco_caption_fixture(root / "coco", n_per_class=3)
    cfg = tiny_run_config(root)
    settings = {
        "captions": CaptionDataConfig(source="coco", path=str(captions), images=str(images)),
        "hidden_size": 16,
        "num_heads": 2,
        "batch_size": 8,
        "max_steps": 4,
        "top_n": 8,
        "num_negatives": 3,
        "eval_top_n": 8,
        "val_fraction": 0.25,
        "test_split": None,
        "log_every": 1,
        **reranker,
    }
    for key, value in settings.items():
        setattr(cfg.reranker, key, value)
    return cfg


@pytest.fixture(scope="module")
def reranked_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run with a re-ranker trained by train_reranker (4 steps)."""
    from rvqa.retriever.rerank_train import train_reranker

    root = tmp_path_factory.mktemp("rerank") / "root"
    _copy_tiny_run(tiny_run, root)
    cfg = _rerank_config(root)
    out = train_reranker(cfg)
    return Path(cfg.output_dir), out


def test_train_reranker_writes_a_loadable_model_and_records_it(reranked_run):
    run, out = reranked_run
    assert out["result"].steps == 4
    metrics = json.loads((run / "reranker" / "metrics.json").read_text())
    assert set(metrics["val"]) >= {"dual_r1", "r1", "r5", "r10"}
    assert 0 <= metrics["val"]["r1"] <= 100
    recorded = json.loads((run / "rvqa_run.json").read_text())
    assert recorded["reranker"].startswith("reranker/")
    assert not (run / "reranker" / "mined").exists()  # the token scratch files are removed


def test_train_reranker_resumes_exactly(tiny_run, tmp_path, monkeypatch):
    from rvqa.retriever.rerank_train import train_reranker
    from tests.tiny import interrupted_after_checkpoint

    roots = []
    for name in ("full", "cut"):
        roots.append(tmp_path / name)
        _copy_tiny_run(tiny_run, roots[-1])
    opts = {"max_steps": 4, "checkpoint_every": 2, "eval_every": 0}
    full = train_reranker(_rerank_config(roots[0], **opts))["result"]
    cfg = _rerank_config(roots[1], **opts)
    with interrupted_after_checkpoint(monkeypatch, 2):
        train_reranker(cfg)
    resumed = train_reranker(cfg, resume=True)["result"]
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    # the same negatives (seeded per item), data order and RNG: the same last losses
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_train_reranker_on_two_cpu_processes(tiny_run, tmp_path):
    import yaml

    from rvqa.config import config_to_dict
    from tests.tiny import run_two_cpu_processes

    root = tmp_path / "root"
    _copy_tiny_run(tiny_run, root)
    cfg = _rerank_config(root, max_steps=4, eval_every=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    proc = run_two_cpu_processes(
        ["-m", "rvqa", "train-reranker", "--config", str(path)], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(cfg.output_dir) / "reranker"
    result = json.loads((out / "train_result.json").read_text())
    assert result["num_processes"] == 2 and result["steps"] == 4
    assert "stage=train-reranker rank=1/2" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"] is not None and 0 <= metrics["val"]["r1"] <= 100
    assert not (out / "mined").exists()


def test_rerank_stage_in_the_pipeline(reranked_run, images):
    from rvqa import RVQA

    model = RVQA.from_pretrained(reranked_run[0], device="cpu")
    assert model.reranker is not None
    plain = model.retrieve(images, top_k=2, rerank=None)
    deep = model.retrieve(images, top_k=6)  # what the re-ranker sees: the index's top 6
    for i, ev in enumerate(model.retrieve(images, top_k=2, rerank=6)):
        assert len(ev) == 2
        assert [e.rerank_score for e in ev] == sorted((e.rerank_score for e in ev), reverse=True)
        for e in ev:  # retrieval score and rank kept: the caption's place in the top 8
            assert deep[i][e.retrieval_rank - 1].text == e.text
            assert deep[i][e.retrieval_rank - 1].score == pytest.approx(e.score)
        assert all(e.rerank_score is None for e in plain[i])
    a = model.answer(images[0], "what color is the shape?", top_k=2, rerank=8)
    assert a.evidence == model.retrieve(images[:1], top_k=2, rerank=8)[0]
    d = a.to_dict()
    assert {"rerank_score", "retrieval_rank"} <= set(d["evidence"][0])
    assert (
        "rerank_score"
        not in model.answer(images[0], "what color?", top_k=2).to_dict()["evidence"][0]
    )


def test_rerank_reads_the_readers_own_tower_when_not_shared(reranked_run, images):
    """The re-ranker always reads the retriever's tokens; the reader reads them only
    where its tower is the retriever's: with the sharing off, or the reader's tower
    changed, it runs its own tower under ``rerank`` as without."""
    from rvqa import RVQA

    model = RVQA.from_pretrained(reranked_run[0], device="cpu")
    reader_tower = model.reader.vision_model
    runs, read = [], []
    reader_tower.register_forward_hook(lambda *_: runs.append(1))
    model.reader.register_forward_pre_hook(
        lambda _, args, kwargs: read.append(kwargs["visual_features"].clone()), with_kwargs=True
    )
    q = ["what color is the shape?"] * 3
    assert model.image_tower_shared
    model.answer_batch(images[:3], q, top_k=2, rerank=6)
    assert not runs
    model.share_image_tower = False
    model.answer_batch(images[:3], q, top_k=2, rerank=6)
    assert len(runs) == 1
    torch.testing.assert_close(read[0], read[1], rtol=1e-5, atol=1e-6)
    model.share_image_tower = True
    with torch.no_grad():
        next(reader_tower.parameters()).mul_(1.5)
    model.answer_batch(images[:3], q, top_k=2, rerank=6)
    model.answer_batch(images[:3], q, top_k=2)
    assert len(runs) == 3
    torch.testing.assert_close(read[2], read[3])
    assert not torch.allclose(read[2], read[0], atol=1e-3)


def test_rerank_takes_each_index_top_n(reranked_run, images):
    from rvqa import RVQA

    model = RVQA.from_pretrained(reranked_run[0], device="cpu")
    (name,) = model.registry.names
    model.load_index(model.registry.get(name).path, name="copy")  # the same captions again
    ev = model.retrieve(images[:1], top_k=6, rerank=6)[0]
    # both indices contributed their own top 6 (12 candidates): a caption and its copy
    # score alike, so the best 6 come from both, each with its rank in its own index
    assert {e.index for e in ev} == {name, "copy"}
    for e in ev:
        own = model.retrieve(images[:1], top_k=6, index=e.index)[0]
        assert own[e.retrieval_rank - 1].text == e.text
    placement = model.placement()
    assert placement["reranker"] == "cpu"


def test_rerank_beyond_the_index_returns_what_exists_with_a_note(reranked_run, images):
    from rvqa import RVQA

    model = RVQA.from_pretrained(reranked_run[0], device="cpu")
    total = next(iter(model.indices.values()))["count"]
    a = model.answer(images[0], "what shape is it?", top_k=2, rerank=total + 50)
    assert len(a.evidence) == min(2, total)
    assert all(e.retrieval_rank <= total for e in a.evidence)
    assert a.notes and f"returned {total} captions" in a.notes[0]


def test_rerank_bad_input(reranked_run, tiny_run, images):
    from rvqa import RVQA

    plain = RVQA.from_pretrained(tiny_run, device="cpu", reranker=False)
    with pytest.raises(UsageError, match="needs a re-ranker and none is loaded: train one"):
        plain.answer(images[0], "what color?", rerank=10)
    with pytest.raises(RunFolderError, match="records no re-ranker"):
        RVQA.from_pretrained(tiny_run, device="cpu", reranker=True)
    with pytest.raises(RunFolderError, match="re-ranker folder .*missing-folder does not exist"):
        RVQA.from_pretrained(tiny_run, device="cpu", reranker=tiny_run / "missing-folder")
    model = RVQA.from_pretrained(reranked_run[0], device="cpu", reranker=True)
    with pytest.raises(UsageError, match="fewer captions than top_k=3"):
        model.answer(images[0], "what color?", top_k=3, rerank=2)
    with pytest.raises(TypeError):
        model.answer(images[0], "what color?", rerank="10")
    with pytest.raises(UsageError, match="do not pass top_k, index or rerank"):
        model.answer_batch([images[0]], ["what?"], evidence=[[("a red circle", 1.0)]], rerank=5)


def test_a_reranker_for_another_retriever_is_refused(reranked_run, tmp_path):
    from rvqa import RVQA

    run = reranked_run[0]
    path = run / "reranker" / "final"
    cfg = json.loads((path / "config.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(path, other)
    cfg["retriever_fingerprint"] = "sha256:000000000000000000000000"
    (other / "config.json").write_text(json.dumps(cfg))
    model = RVQA.from_pretrained(run, device="cpu")
    before = model.reranker
    with pytest.raises(IndexMismatchError, match="trained for retriever sha256:0000"):
        model.load_reranker(other)
    assert model.reranker is before  # the loaded one stays
    with pytest.raises(IndexMismatchError):
        RVQA.from_pretrained(run, device="cpu", reranker=other)


def test_cli_ask_and_evaluate_with_rerank(reranked_run, tmp_path, capsys):
    from rvqa.cli import main
    from tests.tiny import draw_shape

    run = reranked_run[0]
    img = tmp_path / "shape.png"
    draw_shape("red", "circle").save(img)
    assert (
        main(
            [
                "ask",
                "--model",
                str(run),
                "--image",
                str(img),
                "--question",
                "what color?",
                "--top-k",
                "2",
                "--rerank",
                "8",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "re-ranked, best first" in out and "rerank" in out
    assert (
        main(
            [
                "ask",
                "--model",
                str(run),
                "--image",
                str(img),
                "--question",
                "what color?",
                "--rerank",
                "8",
                "--no-retrieval",
            ]
        )
        == 1
    )
    assert "exclude each other" in capsys.readouterr().err
    code = main(
        [
            "evaluate",
            "--model",
            str(run),
            "--split",
            "test",
            "--max-questions",
            "16",
            "--compare",
            "--rerank",
            "8",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "ev" / "compare.json").read_text())
    labels = [r["condition"] for r in rows]
    assert labels == ["tiny-captions", "tiny-captions + rerank 8", "no retrieval"]
    (folder,) = (tmp_path / "ev").glob("*rerank*")
    line = json.loads((folder / "evidence.jsonl").read_text().splitlines()[0])
    assert {"rerank_score", "retrieval_rank"} <= set(line["evidence"][0])


# ------------------------------------------------------------------ the caption cache


def test_the_caption_cache_gives_the_scores_of_encoding_afresh(retriever, images):
    import copy

    model = _reranker(retriever, fuse_retrieval_score=False)
    model.set_caption_cache(3)
    toks = _tokens(retriever, images[:2])
    caps = [["a red circle", "a blue square", "two green circles"], ["a blue square"]]
    plain = copy.deepcopy(model)
    plain.set_caption_cache(0)
    want = plain.score(toks, caps)
    cold = model.score(toks, caps)  # 3 distinct captions encoded, then cached
    assert (model.caption_cache.hits, model.caption_cache.misses) == (0, 4)
    warm = model.score(toks, caps)
    assert (model.caption_cache.hits, model.caption_cache.misses) == (4, 4)
    for a, b, c in zip(want, cold, warm):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)
    # least recently used out first
    model.score(toks[:1], [["a yellow triangle"]])
    assert len(model.caption_cache) == 3 and "a red circle" not in model.caption_cache._entries
    # a weight change empties it: the scores follow the new weights
    with torch.no_grad():
        model.text_norm.weight.mul_(3.0)
        plain.text_norm.weight.mul_(3.0)
    moved = model.score(toks, caps)
    assert model.caption_cache.misses == 4 + 1 + 4  # every lookup missed again
    for a, b in zip(plain.score(toks, caps), moved):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert not np.allclose(moved[0], warm[0])
    # moving or casting the model empties it (no stale precision, nothing left behind)
    assert len(model.caption_cache) > 0
    model.half()
    model.float()
    assert len(model.caption_cache) == 0
    # a copy starts empty; a bad size is refused
    assert len(copy.deepcopy(model).caption_cache) == 0
    with pytest.raises(UsageError, match="caption cache size"):
        model.set_caption_cache(-1)


def test_forward_checks_precomputed_word_features(retriever, images):
    model = _reranker(retriever)
    toks = _tokens(retriever, images[:1])
    mask = torch.ones(1, 2, 3, dtype=torch.bool)
    with pytest.raises(UsageError, match=r"word_features must have shape \(1, 2, 3, 16\)"):
        model(toks, attention_mask=mask, word_features=torch.zeros(1, 2, 3, 8))
    with pytest.raises(UsageError, match="one of input_ids or word_features"):
        model(toks, attention_mask=mask)
    with pytest.raises(UsageError, match=r"attention_mask must have shape \(B, M, L\)"):
        model(toks, attention_mask=mask[0], word_features=torch.zeros(2, 3, 16))


def test_rerank_under_bf16_autocast(reranked_run, images):
    """precision="bf16": the stage runs under autocast, its scores are ordered and within
    bf16's rounding of float32's for every caption, and the caption cache does not hand
    float32 features to a bf16 call (its key holds the autocast)."""
    from rvqa import RVQA
    from rvqa.distributed import bf16_supported

    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no bf16 support")
    f32 = RVQA.from_pretrained(reranked_run[0], device="cpu")
    bf16 = RVQA.from_pretrained(reranked_run[0], device="cpu", precision="bf16")
    want = f32.retrieve(images, top_k=6, rerank=6)  # every candidate, re-ranked
    got = bf16.retrieve(images, top_k=6, rerank=6)
    for w, g in zip(want, got):
        assert [e.rerank_score for e in g] == sorted((e.rerank_score for e in g), reverse=True)
        ref = {e.text: e.rerank_score for e in w}
        assert set(ref) == {e.text for e in g}
        for e in g:  # scores of about 11: bf16 (8 bits) moves them by a few hundredths
            assert abs(e.rerank_score - ref[e.text]) < 0.15, (e.text, e.rerank_score, ref)
    cache = bf16.reranker.caption_cache
    misses = cache.misses
    bf16.reranker.score(  # the same captions outside autocast: encoded afresh
        torch.zeros(1, 16, bf16.reranker.config.vision_hidden_size),
        [[e.text for e in got[0]]],
        [[e.score for e in got[0]]],
    )
    assert cache.misses == misses + len(got[0])
