"""The retrieval objectives beside VSE/InfoNCE (issue 19): PCME, cross-modal centre loss,
GPLDAN (graph pattern loss + modality classifier), CRCGS (contrastive + support set) and
DCMH hashing — each against a reference written from the paper's formula with plain
Python loops, each falling on a fixed batch inside the model, and their heads through
save/load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rvqa.errors import ConfigError, UsageError
from rvqa.retriever import losses as L
from rvqa.retriever.configuration import RetrieverConfig
from rvqa.retriever.data import PairCollator, check_labels, class_names_of
from rvqa.retriever.modeling import RetrieverModel
from tests.test_retriever_model import _batch, tiny_retriever
from tests.tiny import draw_shape

B, D, J = 5, 6, 3


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(7)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    pos = torch.zeros(B, B, dtype=torch.bool)
    pos[1, 3] = pos[3, 1] = True
    return {
        "im": unit(B, D),
        "txt": unit(B, D),
        "im_ls": 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64) - 1.5,
        "txt_ls": 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64) - 1.5,
        "im_eps": torch.randn(B, J, D, generator=g, dtype=torch.float64),
        "txt_eps": torch.randn(B, J, D, generator=g, dtype=torch.float64),
        "im_multi": unit(B, 3, D),
        "txt_multi": unit(B, 3, D),
        "pos": pos,
        "labels": torch.tensor([0, 1, 0, 2, 1]),
        "g": g,
    }


def _rows(t: torch.Tensor) -> list:
    return t.tolist()


# ----------------------------------------------------------------------------- PCME


def _ref_pcme(im, im_ls, txt, txt_ls, im_eps, txt_eps, a, b, beta, pos):
    """Chun et al. 2021, eq. (2)-(4) and the VIB term, by loops over pairs and samples."""
    zi = [
        [[im[i][d] + im_eps[i][k][d] * math.exp(im_ls[i][d]) for d in range(D)] for k in range(J)]
        for i in range(B)
    ]
    zt = [
        [
            [txt[i][d] + txt_eps[i][k][d] * math.exp(txt_ls[i][d]) for d in range(D)]
            for k in range(J)
        ]
        for i in range(B)
    ]
    nll = 0.0
    for i in range(B):
        for j in range(B):
            p = 0.0
            for k in range(J):
                for m in range(J):
                    dist = math.sqrt(sum((zi[i][k][d] - zt[j][m][d]) ** 2 for d in range(D)) + 1e-6)
                    # PCME's sigmoid: e^s / (e^s + e^-s)
                    s = -a * dist + b
                    p += math.exp(s) / (math.exp(s) + math.exp(-s))
            p /= J * J
            matched = i == j or pos[i][j]
            nll += -math.log(p) if matched else -math.log(1 - p)
    kl = 0.0
    for mu, ls in ((im, im_ls), (txt, txt_ls)):
        for i in range(B):
            for d in range(D):
                var = math.exp(2 * ls[i][d])
                kl += 0.5 * (mu[i][d] ** 2 + var - 1 - math.log(var))
    return 2 * nll + beta * kl


@pytest.mark.parametrize("use_pos", [False, True])
def test_pcme_matches_reference(data, use_pos):
    a, b, beta = 3.0, 2.0, 1e-2
    pos = data["pos"] if use_pos else None
    got = L.pcme_loss(
        data["im"],
        data["im_ls"],
        data["txt"],
        data["txt_ls"],
        torch.tensor(a, dtype=torch.float64),
        torch.tensor(b, dtype=torch.float64),
        num_samples=J,
        vib_beta=beta,
        positive_mask=pos,
        im_eps=data["im_eps"],
        txt_eps=data["txt_eps"],
    ).item()
    ref = _ref_pcme(
        *(_rows(data[k]) for k in ("im", "im_ls", "txt", "txt_ls", "im_eps", "txt_eps")),
        a,
        b,
        beta,
        _rows(data["pos"]) if use_pos else [[False] * B for _ in range(B)],
    )
    assert got == pytest.approx(ref, rel=1e-10)


def test_pcme_separates_free_embeddings():
    """The loss alone, on free (μ, log σ) parameters: it falls, and every image ends
    with its own caption as its most probable match."""
    g = torch.Generator().manual_seed(0)
    mu_i = torch.nn.Parameter(torch.randn(6, 8, generator=g))
    mu_t = torch.nn.Parameter(torch.randn(6, 8, generator=g))
    ls_i = torch.nn.Parameter(torch.full((6, 8), -2.0))
    ls_t = torch.nn.Parameter(torch.full((6, 8), -2.0))
    a, b = torch.nn.Parameter(torch.tensor(5.0)), torch.nn.Parameter(torch.tensor(5.0))
    opt = torch.optim.Adam([mu_i, mu_t, ls_i, ls_t, a, b], lr=0.05)
    torch.manual_seed(0)
    losses = []
    for _ in range(150):
        loss = L.pcme_loss(F.normalize(mu_i, dim=-1), ls_i, F.normalize(mu_t, dim=-1), ls_t, a, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.3 * losses[0], losses[::15]
    with torch.no_grad():
        zi = L.pcme_sample(F.normalize(mu_i, dim=-1), ls_i, torch.randn(6, 16, 8))
        zt = L.pcme_sample(F.normalize(mu_t, dim=-1), ls_t, torch.randn(6, 16, 8))
        p = L.pcme_match_probability(L.pcme_match_logits(zi, zt, a, b))
    assert (p.argmax(1) == torch.arange(6)).all() and (p.argmax(0) == torch.arange(6)).all()


def test_pcme_match_probability_and_uncertainty(data):
    z = L.pcme_sample(data["im"], data["im_ls"], data["im_eps"])
    logits = L.pcme_match_logits(z, z, torch.tensor(1.0), torch.tensor(0.5))
    p = L.pcme_match_probability(logits)
    assert p.shape == (B, B) and torch.all((p > 0) & (p < 1))
    torch.testing.assert_close(p, p.t())  # the same samples both ways: symmetric
    u = L.pcme_uncertainty(data["im_ls"])
    ref = [math.exp(sum(2 * x for x in row) / D) for row in _rows(data["im_ls"])]
    np.testing.assert_allclose(u.numpy(), ref, rtol=1e-12)


# ----------------------------------------------------------------------------- centre loss


def test_center_loss_matches_reference(data):
    g = data["g"]
    c = 3
    centers = torch.randn(c, D, generator=g, dtype=torch.float64)
    li = torch.randn(B, c, generator=g, dtype=torch.float64)
    lt = torch.randn(B, c, generator=g, dtype=torch.float64)
    y = data["labels"]
    got = L.cross_modal_center_loss(
        data["im"], data["txt"], y, centers, li, lt, center_weight=10.0, mse_weight=0.1
    ).item()
    im, txt, cen, yl = _rows(data["im"]), _rows(data["txt"]), _rows(centers), y.tolist()

    def ce(logits):
        return (
            sum(-logits[i][yl[i]] + math.log(sum(math.exp(v) for v in logits[i])) for i in range(B))
            / B
        )

    center = sum(
        sum((f[i][d] - cen[yl[i]][d]) ** 2 for d in range(D)) for f in (im, txt) for i in range(B)
    ) / (2 * B)
    mse = sum((im[i][d] - txt[i][d]) ** 2 for i in range(B) for d in range(D)) / (B * D)
    ref = ce(_rows(li)) + ce(_rows(lt)) + 10.0 * center + 0.1 * mse
    assert got == pytest.approx(ref, rel=1e-12)


# ----------------------------------------------------------------------------- GPLDAN


@pytest.mark.parametrize("use_pos", [False, True])
def test_graph_pattern_loss_matches_reference(data, use_pos):
    pos = data["pos"] if use_pos else None
    got = L.graph_pattern_loss(
        data["im_multi"], data["txt_multi"], margin=0.2, diversity_weight=0.3, positive_mask=pos
    ).item()
    vi, vt = _rows(data["im_multi"]), _rows(data["txt_multi"])
    pl = _rows(data["pos"]) if use_pos else [[False] * B for _ in range(B)]
    k = 3

    def dot(x, y):
        return sum(a * b for a, b in zip(x, y))

    hinge = 0.0
    for a in range(k):
        for b_ in range(k):
            s = [[dot(vi[i][a], vt[j][b_]) for j in range(B)] for i in range(B)]
            for i in range(B):
                caps = [
                    max(0, 0.2 + s[i][j] - s[i][i]) for j in range(B) if j != i and not pl[i][j]
                ]
                ims = [max(0, 0.2 + s[j][i] - s[i][i]) for j in range(B) if j != i and not pl[j][i]]
                hinge += max(caps, default=0) + max(ims, default=0)
    hinge /= k * k

    # + the hinge on the fused embeddings: the normalised mean of the K
    def fused(v):
        m = [[sum(v[i][a][d] for a in range(k)) / k for d in range(D)] for i in range(B)]
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in m]

    fi, ft = fused(vi), fused(vt)
    s = [[dot(fi[i], ft[j]) for j in range(B)] for i in range(B)]
    for i in range(B):
        caps = [max(0, 0.2 + s[i][j] - s[i][i]) for j in range(B) if j != i and not pl[i][j]]
        ims = [max(0, 0.2 + s[j][i] - s[i][i]) for j in range(B) if j != i and not pl[j][i]]
        hinge += max(caps, default=0) + max(ims, default=0)
    div = 0.0
    for v in (vi, vt):
        for i in range(B):
            for a in range(k):
                for b_ in range(k):
                    div += (dot(v[i][a], v[i][b_]) - (1.0 if a == b_ else 0.0)) ** 2
    ref = hinge + 0.3 * div / k**2
    assert got == pytest.approx(ref, rel=1e-12)


def test_modality_loss_and_gradient_reversal():
    li = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    lt = torch.tensor([1.5, 0.0, -0.5], dtype=torch.float64)
    got = L.modality_loss(li, lt).item()
    ref = 0.5 * (
        sum(-math.log(_sig(x)) for x in li.tolist()) / 3
        + sum(-math.log(1 - _sig(x)) for x in lt.tolist()) / 3
    )
    assert got == pytest.approx(ref, rel=1e-12)
    x = torch.randn(4, 3, requires_grad=True)
    (L.grad_reverse(x, 0.5) * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4, 3), -1.0))


# ----------------------------------------------------------------------------- CRCGS


def _ref_crcgs(im, txt, same, pos, t):
    def dot(x, y):
        return sum(a * b for a, b in zip(x, y))

    inter = 0.0
    for i in range(B):  # image -> texts, extra positives out of the denominator
        den = [dot(im[i], txt[j]) / t for j in range(B) if j == i or not pos[i][j]]
        inter += (-dot(im[i], txt[i]) / t + math.log(sum(math.exp(v) for v in den))) / B
    for j in range(B):
        den = [dot(im[i], txt[j]) / t for i in range(B) if i == j or not pos[i][j]]
        inter += (-dot(im[j], txt[j]) / t + math.log(sum(math.exp(v) for v in den))) / B

    def supcon(x):
        total, anchors = 0.0, 0
        for i in range(B):
            ps = [p for p in range(B) if p != i and same[i][p]]
            if not ps:
                continue
            den = math.log(sum(math.exp(dot(x[i], x[a]) / t) for a in range(B) if a != i))
            total += -sum(dot(x[i], x[p]) / t - den for p in ps) / len(ps)
            anchors += 1
        return total / anchors if anchors else 0.0

    return (inter + supcon(im) + supcon(txt)) / 4


def test_crcgs_contrastive_matches_reference(data):
    labels = data["labels"]
    same = (labels[:, None] == labels[None, :]) | data["pos"] | torch.eye(B, dtype=torch.bool)
    got = L.crcgs_contrastive_loss(
        data["im"], data["txt"], same, temperature=0.1, positive_mask=data["pos"]
    ).item()
    ref = _ref_crcgs(_rows(data["im"]), _rows(data["txt"]), same.tolist(), _rows(data["pos"]), 0.1)
    assert got == pytest.approx(ref, rel=1e-10)


def test_support_set_matches_reference(data):
    labels = data["labels"]
    same = (labels[:, None] == labels[None, :]) | torch.eye(B, dtype=torch.bool)
    got = L.support_set_loss(data["im"], data["txt"], same, temperature=0.2).item()
    im, txt, sl = _rows(data["im"]), _rows(data["txt"]), same.tolist()

    def dot(x, y):
        return sum(a * b for a, b in zip(x, y))

    def cos(x, y):
        return dot(x, y) / math.sqrt(dot(x, x) * dot(y, y))

    w = [[math.exp(dot(im[n], txt[k]) / 0.2) * sl[n][k] for k in range(B)] for n in range(B)]
    im_sup = [
        [sum(w[n][k] * txt[k][d] for k in range(B)) / sum(w[n]) for d in range(D)] for n in range(B)
    ]
    col = [sum(w[k][n] for k in range(B)) for n in range(B)]
    txt_sup = [
        [sum(w[k][n] * im[k][d] for k in range(B)) / col[n] for d in range(D)] for n in range(B)
    ]
    agree = 0.5 * (
        sum(cos(im[n], im_sup[n]) for n in range(B)) / B
        + sum(cos(txt[n], txt_sup[n]) for n in range(B)) / B
    )
    assert got == pytest.approx(-math.log(max(agree, 1e-6)), rel=1e-10)


# ----------------------------------------------------------------------------- hashing


@pytest.mark.parametrize("use_pos", [False, True])
def test_hash_loss_matches_reference(data, use_pos):
    g = data["g"]
    bits = 8
    f = torch.tanh(torch.randn(B, bits, generator=g, dtype=torch.float64))
    gg = torch.tanh(torch.randn(B, bits, generator=g, dtype=torch.float64))
    pos = data["pos"] if use_pos else None
    got = L.hash_loss(f, gg, gamma=0.7, eta=0.3, positive_mask=pos).item()
    fl, gl = _rows(f), _rows(gg)
    pl = _rows(data["pos"]) if use_pos else [[False] * B for _ in range(B)]
    matching, other = [], []
    for i in range(B):
        for j in range(B):
            theta = 0.5 * sum(a * b for a, b in zip(fl[i], gl[j]))
            if i == j or pl[i][j]:
                matching.append(math.log(1 + math.exp(theta)) - theta)
            else:
                other.append(math.log(1 + math.exp(theta)))
    nll = 0.5 * (sum(matching) / len(matching) + sum(other) / len(other))
    quant = 0.0
    for i in range(B):
        code = [math.copysign(1.0, a + b) for a, b in zip(fl[i], gl[i])]
        quant += sum((a - c) ** 2 for a, c in zip(fl[i], code))
        quant += sum((b - c) ** 2 for b, c in zip(gl[i], code))
    quant /= B * bits
    bal = sum((sum(fl[i][k] for i in range(B)) / B) ** 2 for k in range(bits))
    bal += sum((sum(gl[i][k] for i in range(B)) / B) ** 2 for k in range(bits))
    bal /= bits
    assert got == pytest.approx(nll + 0.7 * quant + 0.3 * bal, rel=1e-12)


# ----------------------------------------------------------------------------- config


def test_loss_spec_parsing_and_errors():
    assert L.parse_loss("infonce + center") == ("infonce", "center")
    with pytest.raises(ConfigError, match="unknown loss term 'pcm'.*known terms: vse_max"):
        L.parse_loss("pcm")
    with pytest.raises(ConfigError, match="'pcme' and 'hash' cannot be combined"):
        L.parse_loss("pcme+hash")
    with pytest.raises(ConfigError, match="only auxiliary terms"):
        L.parse_loss("support_set")
    with pytest.raises(ConfigError, match="hash_bits must be a multiple of 8"):
        RetrieverConfig(loss="hash", hash_bits=60)
    with pytest.raises(ConfigError, match="loss_weights names 'center', not a term"):
        RetrieverConfig(loss="infonce", loss_weights={"center": 2.0})
    with pytest.raises(ConfigError, match="needs class_names"):
        tiny_retriever(loss="center")


# ----------------------------------------------------------------------------- in the model

CLASSES = ["blue", "green", "red", "yellow"]


def _labelled_batch(model):
    """Four drawn shapes and their captions, with class indices into CLASSES."""
    spec = [
        ("red", "circle", 0),
        ("green", "square", 2),
        ("blue", "circle", 3),
        ("yellow", "square", 1),
    ]
    pixels = model.preprocess_images([draw_shape(c, s, size=32, offset=o) for c, s, o in spec])
    enc = model.tokenize([f"a {c} {s}" for c, s, _ in spec])
    return {
        "pixel_values": pixels,
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([CLASSES.index(c) for c, _, _ in spec]),
    }


@pytest.mark.parametrize(
    "loss,extra",
    [
        ("pcme", {"pcme_num_samples": 4}),
        ("center", {"class_names": CLASSES}),
        ("infonce+center", {"class_names": CLASSES}),
        ("gpl+modality", {"gpl_heads": 2, "max_violation_warmup": 10}),
        ("crcgs+support_set", {"class_names": CLASSES}),
        ("hash", {"hash_bits": 16}),
        ("infonce+hash", {"hash_bits": 16}),
    ],
)
def test_each_objective_falls_on_a_fixed_batch(loss, extra):
    model = tiny_retriever(loss=loss, **extra)
    batch = _labelled_batch(model)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        # The adversarial modality term does not fall (the towers fight the classifier
        # through the gradient reversal): the matching terms do.
        losses.append(sum(v for t, v in out.loss_terms.items() if t != "modality"))
    assert set(out.loss_terms) == set(L.parse_loss(loss))
    assert all(math.isfinite(x) for x in losses)
    assert min(losses[-5:]) < 0.6 * losses[0], losses


def test_center_needs_labels_in_the_batch():
    model = tiny_retriever(loss="center", class_names=CLASSES)
    with pytest.raises(UsageError, match="needs a semantic category per caption"):
        model(**_batch(model))
    batch = _batch(model)
    batch["labels"] = torch.tensor([0, -1, 1, 2])
    with pytest.raises(UsageError, match="1 of 4 captions in the batch have no label"):
        model(**batch)


@pytest.mark.parametrize(
    "loss,extra",
    [
        ("pcme", {}),
        ("gpl+modality", {"gpl_heads": 3}),
        ("infonce+hash", {"hash_bits": 24}),
        ("infonce+center", {"class_names": CLASSES}),
    ],
)
def test_heads_round_trip_save_pretrained(tmp_path, loss, extra):
    model = tiny_retriever(loss=loss, **extra)
    model.eval()
    images = [draw_shape("red", "circle"), draw_shape("blue", "square")]
    texts = ["a red circle", "a blue square"]
    e_img, e_txt = model.embed_images(images), model.embed_texts(texts)
    model.save_pretrained(tmp_path / "r")
    loaded = RetrieverModel.from_pretrained(tmp_path / "r")
    np.testing.assert_array_equal(loaded.embed_images(images), e_img)
    np.testing.assert_array_equal(loaded.embed_texts(texts), e_txt)
    assert loaded.fingerprint() == model.fingerprint()
    assert loaded.config.loss == loss
    if loss == "pcme":
        emb, sig = loaded.embed_texts(texts, return_logsigma=True)
        np.testing.assert_array_equal(emb, e_txt)
        ref = model.embed_texts(texts, return_logsigma=True)[1]
        np.testing.assert_array_equal(sig, ref)
        assert sig.shape == (2, 16)
    if "hash" in loss:
        assert e_img.shape == (2, 24) and set(np.unique(e_img)) <= {-1.0, 1.0}
        assert loaded.embed_dim == 24 and loaded.index_metric == "hamming"
    else:
        assert loaded.index_metric == "inner_product"
        np.testing.assert_allclose(np.linalg.norm(e_img, axis=1), 1.0, rtol=1e-5)


def test_return_logsigma_needs_pcme():
    model = tiny_retriever(loss="infonce")
    with pytest.raises(UsageError, match="needs a probabilistic \\(PCME\\) retriever"):
        model.embed_texts(["a red circle"], return_logsigma=True)


def test_pcme_starts_with_small_sigma():
    model = tiny_retriever(loss="pcme")
    _, sig = model.embed_texts(["a red circle"], return_logsigma=True)
    # the log sigma heads start at sigma = 0.25 / sqrt(D): |sigma| = 0.25 beside the unit mean
    # (the bias; the small initial weights move each caption's values around it)
    want = math.log(0.25 / math.sqrt(16))
    for head in (model.text_logsigma, model.vision_logsigma):
        np.testing.assert_allclose(head.bias.detach().numpy(), want, rtol=1e-6)
    assert abs(float(sig.mean()) - want) < 0.15


# ----------------------------------------------------------------------------- data


def test_collator_labels_and_label_checks():
    from rvqa.data.captions import CaptionCorpus

    class Tok:
        def __call__(self, texts, **kw):
            n = len(texts)
            return {
                "input_ids": torch.ones(n, 2, dtype=torch.long),
                "attention_mask": torch.ones(n, 2),
            }

    items = [
        {"pixel_values": torch.zeros(3, 4, 4), "caption": c, "image_id": i, "label": lab}
        for i, (c, lab) in enumerate([("a", "red"), ("b", None), ("c", "teal")])
    ]
    batch = PairCollator(Tok(), 8, class_names=["blue", "red"])(items)
    assert batch["labels"].tolist() == [1, -1, -1]
    assert "labels" not in PairCollator(Tok(), 8)(items)
    corpus = CaptionCorpus(
        ["x", "y", "z"], [1, 2, 3], [1, 1, 2], source="records", labels=["b", None, "a"]
    )
    assert class_names_of(corpus) == ["a", "b"]
    with pytest.raises(UsageError, match="1 of 3 captions of here have none .*caption id 2"):
        check_labels(corpus, "center", "here")


# ----------------------------------------------------------------------------- whole runs


def _compositional(tmp_path):
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import compositional_pairs

    root = tmp_path / "comp"
    compositional_pairs.generate(root, {"train": 24, "val": 6, "test": 6}, seed=3)
    return compositional_pairs, root


def test_compositional_set_has_exhaustive_matches(tmp_path):
    cp, root = _compositional(tmp_path)
    test = cp.load_split(root, "test")
    m = test["matches"]
    assert m.shape == (30, 6)
    # every caption fits the image it was written for, and the matrix is exactly what
    # each caption's constraints say of each scene (recomputed one pair at a time)
    assert m[np.arange(30), test["source_image"]].all()
    data = json.loads((root / cp.SPLIT_FILE).read_text())
    sents = [s for im in data["images"] if im["split"] == "test" for s in im["sentences"]]
    for c, sent in enumerate(sents):
        for i, scene in enumerate(test["scenes"]):
            objs = scene["objects"]
            ok = sent["constraints"]["total"] in (None, len(objs))
            for cl in sent["constraints"]["clauses"]:
                n = sum(all(o[k] == v for k, v in cl["desc"].items()) for o in objs)
                ok &= n == cl["n"] if cl["exact"] else n >= cl["n"]
            assert m[c, i] == ok
    # a partial caption fits several images somewhere in a larger split
    train = cp.load_split(root, "train")
    assert train["matches"].sum(1).max() > 1
    # one text, one meaning: captions with the same words have the same matches
    rows: dict[str, set] = {}
    for text, m in zip(train["captions"], train["matches"]):
        rows.setdefault(text.lower().rstrip("."), set()).add(m.tobytes())
    assert all(len(v) == 1 for v in rows.values())


@pytest.mark.parametrize("loss", ["infonce+center", "crcgs+support_set", "hash"])
def test_train_retriever_with_labelled_objectives(tmp_path, loss):
    from rvqa.config import config_from_dict
    from rvqa.retriever.train import train_retriever
    from tests.tiny import tiny_text_backbone

    cp, root = _compositional(tmp_path)
    settings = {
        "vision_backbone": "cnn",
        "cnn_hidden_sizes": [8, 16],
        "text_backbone": str(tiny_text_backbone(tmp_path)),
        "embed_dim": 16,
        "image_size": 32,
        "max_caption_length": 16,
        "batch_size": 16,
        "max_steps": 3,
        "eval_every": 3,
        "learning_rate": 3e-3,
        "loss": loss,
        "hash_bits": 16,
        "captions": {
            "source": "karpathy",
            "path": str(root / cp.SPLIT_FILE),
            "images": str(root / "images"),
            "splits": ["train"],
        },
    }
    cfg = config_from_dict({"output_dir": str(tmp_path / "run"), "retriever": settings})
    out = train_retriever(cfg)
    model = RetrieverModel.from_pretrained(out["model_dir"])
    labels = sorted(
        {
            im["label"]
            for im in json.loads((root / cp.SPLIT_FILE).read_text())["images"]
            if im["split"] == "train"
        }
    )
    # the terms that read categories get the training labels; hashing reads none
    assert model.config.class_names == (None if loss == "hash" else labels)
    assert out["test"] is not None and set(out["test"]) >= {"i2t_r1", "rsum"}
    if loss == "hash":
        assert model.embed_texts(["a red circle"]).shape == (1, 16)


def test_center_refuses_captions_without_labels(tmp_path):
    from rvqa.config import config_from_dict
    from rvqa.retriever.train import train_retriever
    from tests.test_retriever_train import tiny_run_dict

    cfg = config_from_dict(tiny_run_dict(tmp_path, loss="center"))
    with pytest.raises(UsageError, match="needs a semantic category .* of caption source 'coco'"):
        train_retriever(cfg)


def test_unused_term_options_stay_out_of_the_config():
    """A model trained without the new terms serialises (and fingerprints) as before them."""
    from rvqa.retriever.configuration import TERM_FIELDS

    added = {n for names in TERM_FIELDS.values() for n in names} | {"loss_weights", "class_names"}
    plain = tiny_retriever(loss="vse_max").config.to_dict()
    assert not added & set(plain)
    pcme = tiny_retriever(loss="pcme", loss_weights={"pcme": 2.0}).config.to_dict()
    assert set(TERM_FIELDS["pcme"]) | {"loss_weights"} <= set(pcme)
    assert not set(TERM_FIELDS["hash"]) & set(pcme)
    # and round-trips: the absent options load as their defaults
    again = RetrieverConfig.from_dict(pcme)
    assert again.loss_weights == {"pcme": 2.0} and again.hash_bits == 64


def test_loss_term_names_agree_with_the_config_layer():
    from rvqa.config import LOSS_TERM_NAMES

    assert tuple(L.LOSS_TERMS) == LOSS_TERM_NAMES
