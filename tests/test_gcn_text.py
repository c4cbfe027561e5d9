"""The GCN text path (``retriever.text_tower: gcn``) and Yu et al.'s pairwise similarity
loss (``loss: pairwise``): a hand-computed 3-word graph, padding-independent batching,
a tiny GCN retriever that trains and round-trips, the word vectors copied from the
packaged MiniLM, and the configuration errors."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rvqa.config import RetrieverSettings, config_from_dict
from rvqa.errors import ConfigError
from rvqa.retriever import losses as L
from rvqa.retriever.configuration import TEXT_TOWER_FIELDS, RetrieverConfig
from rvqa.retriever.modeling import RetrieverModel
from rvqa.towers import build_tower, gcn_text_config_from_name, hidden_size_of
from rvqa.towers.gcn import GCNTextConfig, GCNTextModel, normalized_adjacency, word_graph
from tests.tiny import draw_shape, tiny_text_backbone

S6 = math.sqrt(6.0)

# Three word vectors: cos(1, 2) = 0.707, cos(2, 3) = -0.555, cos(1, 3) = -0.981.
X = [[1.0, 0.0], [1.0, 1.0], [-1.0, 0.2]]


def _three_words(**config) -> tuple[GCNTextModel, torch.Tensor]:
    """A 1-layer GCN over a 5-word vocabulary whose words 1, 2, 3 have the vectors X."""
    config = {"input_norm": False, **config}
    cfg = GCNTextConfig(
        vocab_size=5, word_dim=2, hidden_size=2, num_layers=1, dropout=0.0, **config
    )
    model = GCNTextModel(cfg).eval()
    with torch.no_grad():
        model.embeddings.weight[1:4] = torch.tensor(X)
        model.layers[0].weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))  # W
        model.layers[0].bias.copy_(torch.tensor([0.0, 0.1]))  # b
    return model, torch.tensor([[1, 2, 3]])


def test_three_word_knn_graph_by_hand():
    model, ids = _three_words(graph="knn", k=1)
    # k = 1: word 1's nearest is 2, word 2's is 1, word 3's is 2 (-0.555 > -0.981);
    # symmetrised: edges 1-2 and 2-3
    adj = word_graph(model.embeddings(ids), torch.ones(1, 3), graph="knn", k=1)
    assert adj[0].tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    # A + I has degrees 2, 3, 2: Â_ij = (A + I)_ij / sqrt(d_i d_j)
    expected = torch.tensor([[1 / 2, 1 / S6, 0.0], [1 / S6, 1 / 3, 1 / S6], [0.0, 1 / S6, 1 / 2]])
    torch.testing.assert_close(model.adjacency(ids)[0], expected)
    # XW = [[1, 2], [1, 3], [-1, -1.8]]; H = ReLU(Â XW + b), b = (0, 0.1)
    out = model(input_ids=ids).last_hidden_state[0]
    by_hand = torch.tensor(
        [
            [1 / 2 + 1 / S6, 1 + 3 / S6 + 0.1],
            [1 / S6 + 1 / 3 - 1 / S6, 2 / S6 + 1 - 1.8 / S6 + 0.1],
            [max(0.0, 1 / S6 - 1 / 2), 3 / S6 - 0.9 + 0.1],
        ]
    )
    torch.testing.assert_close(out, by_hand)
    assert out[2, 0] == 0  # the ReLU cut 1/sqrt(6) - 1/2 < 0
    # with the input LayerNorm (the default): the same graph (from the raw vectors) over
    # LayerNorm(X); in 2-d it maps (1, 0) -> (1, -1), (1, 1) -> (0, 0), (-1, 0.2) -> (-1, 1)
    normed, _ = _three_words(graph="knn", k=1, input_norm=True)
    torch.testing.assert_close(normed.adjacency(ids)[0], expected)
    c = 0.5 / math.sqrt(0.25 + 1e-5)  # LayerNorm's eps
    xw = c * torch.tensor([[1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]])  # LayerNorm(X) W
    ref = torch.relu(expected @ xw + torch.tensor([0.0, 0.1]))
    torch.testing.assert_close(normed(input_ids=ids).last_hidden_state[0], ref)


def test_three_word_threshold_graph_by_hand():
    model, ids = _three_words(graph="threshold", threshold=0.5)
    # only cos(1, 2) = 0.707 reaches 0.5: one edge, word 3 alone with its self loop
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(model.adjacency(ids)[0], expected)
    # without self loops: D^-1/2 A D^-1/2, word 3 has no row at all
    no_loops = normalized_adjacency(
        word_graph(model.embeddings(ids), torch.ones(1, 3), graph="threshold", threshold=0.5),
        torch.ones(1, 3),
        self_loops=False,
    )
    assert no_loops[0].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    # a threshold of -1 joins every pair: A + I all ones, Â = 1/3 everywhere
    every = normalized_adjacency(
        word_graph(model.embeddings(ids), torch.ones(1, 3), graph="threshold", threshold=-1.0),
        torch.ones(1, 3),
    )
    torch.testing.assert_close(every[0], torch.full((3, 3), 1 / 3))


@pytest.mark.parametrize("graph", ["knn", "threshold"])
def test_batched_with_padding_equals_one_at_a_time(graph):
    torch.manual_seed(0)
    cfg = GCNTextConfig(
        vocab_size=40, word_dim=8, hidden_size=6, num_layers=3, graph=graph, k=2, threshold=0.1
    )
    model = GCNTextModel(cfg).eval()
    captions = [[5, 9, 17, 3, 22, 31], [7, 12], [4, 30, 11, 8], [19]]
    width = max(map(len, captions))
    ids = torch.tensor([c + [0] * (width - len(c)) for c in captions])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in captions])
    batched = model(input_ids=ids, attention_mask=mask).last_hidden_state
    a_hat = model.adjacency(ids, mask)
    for i, c in enumerate(captions):
        n = len(c)
        alone = model(input_ids=torch.tensor([c])).last_hidden_state[0]
        torch.testing.assert_close(batched[i, :n], alone)
        assert (batched[i, n:] == 0).all()  # padding is no node
        assert (a_hat[i, n:] == 0).all() and (a_hat[i, :, n:] == 0).all()
        torch.testing.assert_close(a_hat[i, :n, :n], model.adjacency(torch.tensor([c]))[0])
    # every graph symmetric; knn: each real token of a long caption has >= k neighbours
    torch.testing.assert_close(a_hat, a_hat.transpose(1, 2))
    if graph == "knn":
        adj = word_graph(model.embeddings(ids), mask, k=2)
        assert (adj[0].sum(-1) >= 2).all() and adj[3].sum() == 0  # a 1-word caption: no edge


def test_gcn_tower_config_registration_and_minilm_word_vectors():
    from transformers import AutoModel

    from rvqa.towers import load_tower_weights
    from rvqa.towers.backbones import packaged_minilm_path

    d = gcn_text_config_from_name("minilm", hidden_size=32, num_layers=1)
    assert (d["model_type"], d["vocab_size"], d["word_dim"], d["pad_token_id"]) == (
        "rvqa-gcn-text",
        30522,
        384,
        0,
    )
    assert hidden_size_of(d) == 32
    tower = build_tower(d)  # AutoConfig / AutoModel know the GCN tower
    assert isinstance(tower, GCNTextModel) and len(tower.layers) == 1
    load_tower_weights(tower, "minilm", text=True)
    minilm = AutoModel.from_pretrained(packaged_minilm_path())
    torch.testing.assert_close(
        tower.embeddings.weight, minilm.embeddings.word_embeddings.weight, rtol=0, atol=0
    )
    # a tower whose table does not fit the checkpoint's is refused, naming both shapes
    small = build_tower({**d, "vocab_size": 100})
    with pytest.raises(ConfigError, match=r"\(100, 384\) word vectors.*\(30522, 384\)"):
        load_tower_weights(small, "minilm", text=True)


# ----------------------------------------------------------------------------- retriever


def _tiny_gcn_retriever(tmp_path, **overrides) -> RetrieverModel:
    """CNN [8, 16] on 32 px + a GCN over a tiny BERT's (32-d) word vectors, copied in."""
    torch.manual_seed(0)
    options = {
        "vision_backbone": "cnn",
        "cnn_hidden_sizes": [8, 16],
        "image_size": 32,
        "text_backbone": str(tiny_text_backbone(tmp_path)),
        "text_tower": "gcn",
        "gcn_hidden_size": 24,
        "gcn_k": 2,
        "embed_dim": 16,
        "max_caption_length": 12,
        "augment": False,
        "loss": "infonce",
        **overrides,
    }
    return RetrieverModel.from_backbones(load_weights=True, **options)


def _shape_batch(model: RetrieverModel) -> dict:
    spec = [
        ("red", "circle"),
        ("green", "square"),
        ("blue", "circle"),
        ("yellow", "square"),
        ("red", "square"),
        ("blue", "square"),
    ]
    pixels = model.preprocess_images([draw_shape(c, s, size=32) for c, s in spec])
    enc = model.tokenize([f"a {c} {s}" for c, s in spec])
    return {
        "pixel_values": pixels,
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
    }


# (pairwise: the variance terms first pull every similarity together, ~20 steps, before
# the mean gap opens: it needs more steps than the other two)
@pytest.mark.parametrize("loss,steps", [("infonce", 30), ("vse_sum", 30), ("pairwise", 60)])
def test_gcn_retriever_trains_on_a_fixed_batch(tmp_path, loss, steps):
    from transformers import AutoModel

    model = _tiny_gcn_retriever(tmp_path, loss=loss)
    assert isinstance(model.text_model, GCNTextModel)
    # the word vectors are the backbone's (freeze_text: frozen); the GCN layers train
    bert = AutoModel.from_pretrained(tiny_text_backbone(tmp_path))
    words = bert.get_input_embeddings().weight
    torch.testing.assert_close(model.text_model.embeddings.weight, words, rtol=0, atol=0)
    assert model.config.freeze_text and not model.text_model.embeddings.weight.requires_grad
    assert all(p.requires_grad for p in model.text_model.layers.parameters())
    layer0 = model.text_model.layers[0].weight.detach().clone()
    batch = _shape_batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    assert model.text_model.training  # GCN dropout is on in training, frozen words or not
    losses = []
    for _ in range(steps):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert min(losses[-5:]) < 0.6 * losses[0], losses
    assert set(out.loss_terms) == {loss}
    torch.testing.assert_close(model.text_model.embeddings.weight, words, rtol=0, atol=0)
    assert not torch.equal(model.text_model.layers[0].weight, layer0)


def test_gcn_word_vectors_train_without_freeze_text(tmp_path):
    model = _tiny_gcn_retriever(tmp_path, freeze_text=False)
    before = model.text_model.embeddings.weight.detach().clone()
    batch = _shape_batch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    changed = (model.text_model.embeddings.weight != before).any(-1)
    used = torch.unique(batch["input_ids"][batch["attention_mask"].bool()])
    assert changed[used].all() and changed.sum() == len(used)  # only the batch's words


def test_gcn_retriever_round_trips_save_pretrained(tmp_path):
    model = _tiny_gcn_retriever(tmp_path, gcn_graph="threshold", gcn_threshold=0.2)
    model.eval()
    images = [draw_shape("red", "circle"), draw_shape("blue", "square")]
    texts = ["a red circle", "a blue square on the left"]
    e_img, e_txt = model.embed_images(images), model.embed_texts(texts)
    model.save_pretrained(tmp_path / "r")
    loaded = RetrieverModel.from_pretrained(tmp_path / "r")
    assert isinstance(loaded.text_model, GCNTextModel)
    assert loaded.config.text_tower == "gcn" and loaded.config.gcn_graph == "threshold"
    assert loaded.text_model.config.threshold == 0.2 and loaded.text_model.config.k == 2
    np.testing.assert_array_equal(loaded.embed_images(images), e_img)
    np.testing.assert_array_equal(loaded.embed_texts(texts), e_txt)
    assert loaded.fingerprint() == model.fingerprint()
    # loaded, the word vectors stay frozen and the graph convolutions trainable
    assert not loaded.text_model.embeddings.weight.requires_grad
    assert all(p.requires_grad for p in loaded.text_model.layers.parameters())
    # a caption embeds the same alone as batched with a longer one
    np.testing.assert_allclose(loaded.embed_texts(texts[:1])[0], e_txt[0], rtol=1e-5, atol=1e-6)


def test_transformer_retriever_config_has_no_gcn_keys():
    """A retriever of the default text tower serialises (and fingerprints) as before the
    GCN tower and the pairwise term existed."""
    gcn_keys = {n for names in TEXT_TOWER_FIELDS.values() for n in names}
    plain = RetrieverConfig(vision_config={"model_type": "x"}, text_config={"model_type": "bert"})
    d = plain.to_dict()
    assert not (gcn_keys | {"text_tower", "pairwise_lambda", "pairwise_margin"}) & set(d)
    again = RetrieverConfig.from_dict(d)
    assert again.text_tower == "transformer" and again.gcn_k == RetrieverSettings.gcn_k
    gcn = RetrieverConfig(
        text_config={"model_type": "rvqa-gcn-text", "k": 3}, text_tower="gcn", gcn_k=3
    ).to_dict()
    assert gcn["text_tower"] == "gcn" and gcn_keys <= set(gcn)


def test_gcn_configuration_errors(tmp_path):
    text = str(tiny_text_backbone(tmp_path))
    with pytest.raises(ConfigError, match="text_tower must be one of transformer, gcn; got 'lstm'"):
        RetrieverModel.from_backbones(text_backbone=text, text_tower="lstm", load_weights=False)
    for key, value, match in (
        ("gcn_k", 0, "gcn_k must be a positive integer, got 0"),
        ("gcn_layers", 1.5, "gcn_layers must be a positive integer"),
        ("gcn_graph", "full", "gcn_graph must be one of knn, threshold; got 'full'"),
        ("gcn_threshold", 1.5, r"gcn_threshold is a cosine similarity, in \[-1, 1\]"),
        ("gcn_dropout", 1.0, r"gcn_dropout must be a number in \[0, 1\)"),
    ):
        with pytest.raises(ConfigError, match=match):
            RetrieverModel.from_backbones(
                text_backbone=text, text_tower="gcn", load_weights=False, **{key: value}
            )
    with pytest.raises(ConfigError, match="num_text_layers=1 .* set gcn_layers instead"):
        RetrieverModel.from_backbones(
            text_backbone=text, text_tower="gcn", num_text_layers=1, load_weights=False
        )
    # a text_config that is not the tower text_tower names, or disagrees with an option
    with pytest.raises(ConfigError, match="text_tower is 'gcn' but text_config is a 'bert'"):
        RetrieverConfig(text_config={"model_type": "bert"}, text_tower="gcn")
    with pytest.raises(ConfigError, match="text_tower is 'transformer' but .*'rvqa-gcn-text'"):
        RetrieverConfig(text_config={"model_type": "rvqa-gcn-text"})
    with pytest.raises(ConfigError, match="gcn_k=4 but the GCN text_config has k=2"):
        RetrieverConfig(text_config={"model_type": "rvqa-gcn-text", "k": 2}, text_tower="gcn")
    # the run settings name the key
    with pytest.raises(ConfigError, match=r"retriever\.text_tower.*'rnn'"):
        config_from_dict({"retriever": {"text_tower": "rnn"}})
    with pytest.raises(ConfigError, match=r"retriever\.gcn_graph"):
        config_from_dict({"retriever": {"gcn_graph": "dense"}})
    assert config_from_dict({"retriever": {"text_tower": "gcn"}}).retriever.text_tower == "gcn"
    # the tower's own config checks its values too
    with pytest.raises(ConfigError, match="graph must be one of knn, threshold"):
        GCNTextConfig(graph="full")
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\)"):
        GCNTextModel(GCNTextConfig(vocab_size=5, word_dim=2))(input_ids=torch.tensor([1, 2]))


# ----------------------------------------------------------------------------- loss


def _ref_pairwise(im, txt, pos, lam, margin):
    """Yu et al.'s loss from its formula: loops over the B² pairs, population variances."""
    b = len(im)
    matching, others = [], []
    for i in range(b):
        for j in range(b):
            s = sum(a * c for a, c in zip(im[i], txt[j]))
            (matching if i == j or pos[i][j] else others).append(s)
    mu_p, mu_n = statistics.fmean(matching), statistics.fmean(others)
    var = statistics.pvariance(matching) + statistics.pvariance(others)
    return var + lam * max(0.0, margin - (mu_p - mu_n))


@pytest.mark.parametrize("use_pos", [False, True])
@pytest.mark.parametrize("lam,margin", [(0.35, 0.8), (2.0, -1.0)])
def test_pairwise_loss_matches_reference(use_pos, lam, margin):
    g = torch.Generator().manual_seed(3)
    im = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=-1)
    pos = torch.zeros(5, 5, dtype=torch.bool)
    if use_pos:
        pos[1, 3] = pos[3, 1] = pos[0, 4] = True
    got = L.pairwise_similarity_loss(
        im, txt, lam=lam, margin=margin, positive_mask=pos if use_pos else None
    )
    ref = _ref_pairwise(im.tolist(), txt.tolist(), pos.tolist(), lam, margin)
    assert got.item() == pytest.approx(ref, rel=1e-12)
    if margin < 0:  # the means are always "far enough" apart: the variances alone
        assert got.item() == pytest.approx(
            _ref_pairwise(im.tolist(), txt.tolist(), pos.tolist(), 0, 0)
        )


def test_pairwise_loss_without_non_matching_pairs_is_the_positive_variance():
    im = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    txt = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), dim=-1)
    s = im @ txt.t()
    got = L.pairwise_similarity_loss(im, txt, positive_mask=torch.ones(2, 2, dtype=torch.bool))
    assert got.item() == pytest.approx(statistics.pvariance(s.flatten().tolist()), rel=1e-6)
