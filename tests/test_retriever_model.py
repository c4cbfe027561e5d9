import numpy as np
import pytest
import torch

from rvqa.retriever.configuration import RetrieverConfig
from rvqa.retriever.losses import info_nce_loss, vse_hinge_loss
from rvqa.retriever.modeling import RetrieverModel
from rvqa.towers import load_tokenizer, small_cnn_processor
from tests.tiny import draw_shape


def tiny_retriever(loss="vse_max", embed_dim=16, projection="linear", **kw) -> RetrieverModel:
    tok = load_tokenizer("minilm")
    text = {
        "model_type": "bert",
        "vocab_size": tok.vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "max_position_embeddings": 64,
    }
    vision = {
        "model_type": "rvqa-small-cnn",
        "hidden_sizes": [8, 16],
        "image_size": 32,
        "grid_size": 2,
    }
    cfg = RetrieverConfig(
        vision_config=vision,
        text_config=text,
        embed_dim=embed_dim,
        loss=loss,
        projection=projection,
        image_size=32,
        max_caption_length=12,
        # (trainable towers, no augmentation: the model these tests were written for,
        # not the demo's defaults)
        **{"freeze_text": False, "augment": False, **kw},
    )
    torch.manual_seed(0)
    model = RetrieverModel(cfg)
    model.tokenizer = tok
    model.image_processor = small_cnn_processor(32)
    return model


# ----------------------------------------------------------------------------- losses


def _reference_vse(im, txt, margin, max_violation, pos=None):
    """Straightforward loops over the batch (VSE++ definition)."""
    s = (im @ txt.T).tolist()
    b = len(s)
    total = 0.0
    for i in range(b):
        caps = [
            max(0.0, margin + s[i][j] - s[i][i])
            for j in range(b)
            if j != i and not (pos is not None and pos[i][j])
        ]
        ims = [
            max(0.0, margin + s[j][i] - s[i][i])
            for j in range(b)
            if j != i and not (pos is not None and pos[j][i])
        ]
        if max_violation:
            total += max(caps, default=0.0) + max(ims, default=0.0)
        else:
            total += sum(caps) + sum(ims)
    return total


def _reference_infonce(im, txt, scale, pos=None):
    import math

    s = (im @ txt.T).tolist()
    b = len(s)
    tot = 0.0
    for i in range(b):  # image -> texts
        row = [scale * s[i][j] for j in range(b) if j == i or not (pos is not None and pos[i][j])]
        tot += -(scale * s[i][i]) + math.log(sum(math.exp(v) for v in row))
    for j in range(b):  # text -> images
        col = [scale * s[i][j] for i in range(b) if i == j or not (pos is not None and pos[i][j])]
        tot += -(scale * s[j][j]) + math.log(sum(math.exp(v) for v in col))
    return tot / (2 * b)


@pytest.fixture
def emb():
    g = torch.Generator().manual_seed(3)
    im = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    pos = torch.zeros(6, 6, dtype=torch.bool)
    pos[0, 3] = pos[3, 0] = True
    return im, txt, pos


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("use_pos", [False, True])
def test_vse_losses_match_reference(emb, max_violation, use_pos):
    im, txt, pos = emb
    p = pos if use_pos else None
    got = vse_hinge_loss(im, txt, 0.2, max_violation, p).item()
    ref = _reference_vse(im, txt, 0.2, max_violation, p.tolist() if use_pos else None)
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("use_pos", [False, True])
def test_infonce_matches_reference(emb, use_pos):
    im, txt, pos = emb
    p = pos if use_pos else None
    scale = torch.tensor(np.log(1 / 0.07), dtype=torch.float64)
    got = info_nce_loss(im, txt, scale, p).item()
    ref = _reference_infonce(im, txt, 1 / 0.07, p.tolist() if use_pos else None)
    assert got == pytest.approx(ref, rel=1e-10)


def test_positive_mask_shape_checked(emb):
    im, txt, _ = emb
    with pytest.raises(ValueError, match=r"positive_mask must be \(6, 6\)"):
        vse_hinge_loss(im, txt, 0.2, True, torch.zeros(5, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------- model


def _batch(model, n=4):
    pixels = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    enc = model.tokenize(
        [f"a {c} thing" for c in ("red", "green", "blue", "yellow", "pink", "gray")[:n]]
    )
    return {
        "pixel_values": pixels,
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
    }


@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_shapes_and_normalisation(projection):
    model = tiny_retriever(projection=projection)
    out = model(**_batch(model))
    assert out.image_embeds.shape == (4, 16) and out.text_embeds.shape == (4, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(4))
    assert out.loss.ndim == 0 and out.loss.item() > 0


@pytest.mark.parametrize("loss", ["vse_max", "vse_sum", "infonce"])
def test_loss_decreases_on_fixed_batch(loss):
    model = tiny_retriever(loss=loss, max_violation_warmup=10)
    batch = _batch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    if loss == "vse_max":  # hardest-negative loss before and after (warmup used sums)
        with torch.no_grad():
            out = model(**batch)
        after = vse_hinge_loss(out.image_embeds, out.text_embeds, 0.2, True).item()
        assert after < 0.5 * 1.9, (after, losses)
    else:
        assert losses[-1] < 0.5 * losses[0], losses


def test_save_load_identical_embeddings(tmp_path):
    model = tiny_retriever()
    model.eval()
    images = [draw_shape("red", "circle"), draw_shape("blue", "square")]
    texts = ["a red circle", "a blue square"]
    e_img, e_txt = model.embed_images(images), model.embed_texts(texts)
    model.save_pretrained(tmp_path / "r")
    loaded = RetrieverModel.from_pretrained(tmp_path / "r")
    np.testing.assert_array_equal(loaded.embed_images(images), e_img)
    np.testing.assert_array_equal(loaded.embed_texts(texts), e_txt)
    assert loaded.fingerprint() == model.fingerprint()
    assert e_img.dtype == np.float32 and e_img.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(e_txt, axis=1), 1.0, rtol=1e-5)


def test_fingerprint_changes_with_weights():
    model = tiny_retriever()
    fp = model.fingerprint()
    with torch.no_grad():
        model.text_projection.weight[0, 0] += 1e-3
    assert model.fingerprint() != fp


def test_freezing():
    model = tiny_retriever(freeze_text=True)
    assert not any(p.requires_grad for p in model.text_model.parameters())
    assert all(p.requires_grad for p in model.vision_model.parameters())
    assert model.text_projection.weight.requires_grad


def test_bad_inputs(tmp_path):
    model = tiny_retriever()
    with pytest.raises(TypeError, match="caption 1 must be a string"):
        model.embed_texts(["ok", 3])
    with pytest.raises(ValueError, match="caption 0 is empty"):
        model.embed_texts(["  "])
    with pytest.raises(
        ValueError, match="unknown loss term .triplet.*known terms: vse_max, vse_sum, infonce, pcme"
    ):
        RetrieverConfig(loss="triplet")
    with pytest.raises(ValueError, match="needs vision_config and text_config"):
        RetrieverModel(RetrieverConfig())
    # A tower whose output does not fit the projection.
    with torch.no_grad():
        model.vision_projection = torch.nn.Linear(99, 16)
    with pytest.raises(
        ValueError, match="image tower outputs 16 features but the image projection expects 99"
    ):
        model.encode_images(torch.randn(1, 3, 32, 32))
    # A checkpoint folder with missing files.
    model2 = tiny_retriever()
    model2.save_pretrained(tmp_path / "r")
    (tmp_path / "r" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        RetrieverModel.from_pretrained(tmp_path / "r")


def test_unknown_backbone_lists_known_names(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from rvqa.towers import vision_config_from_name

    with pytest.raises(ValueError, match="cannot load vision backbone 'no-such/model'.*'cnn'"):
        vision_config_from_name("no-such/model")


# ----------------------------------------------------------------------------- other towers

TEXT_TOWERS = {
    "albert": {
        "model_type": "albert",
        "vocab_size": 100,
        "embedding_size": 16,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
    },
    "t5": {
        "model_type": "t5",
        "vocab_size": 100,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 2,
        "num_heads": 2,
    },
    "bert": {
        "model_type": "bert",
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
    },
}
VISION_TOWERS = {
    "vit": {
        "model_type": "vit",
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
    },
    "clip_vision_model": {
        "model_type": "clip_vision_model",
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
    },
    "resnet": {
        "model_type": "resnet",
        "embedding_size": 8,
        "hidden_sizes": [8, 16],
        "depths": [1, 1],
        "layer_type": "basic",
    },
}


@pytest.mark.parametrize("text", sorted(TEXT_TOWERS))
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_text_towers(text, pooling):
    cfg = RetrieverConfig(
        vision_config=VISION_TOWERS["vit"],
        text_config=TEXT_TOWERS[text],
        embed_dim=8,
        text_pooling=pooling,
        vision_pooling="cls",
    )
    model = RetrieverModel(cfg).eval()
    ids = torch.randint(1, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    emb = model.encode_texts(ids, mask)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # Padding does not change a caption's embedding (masked pooling / attention).
    if pooling == "mean" and text != "t5":
        short = model.encode_texts(ids[:1, :5], mask[:1, :5])
        torch.testing.assert_close(short, emb[:1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("vision", sorted(VISION_TOWERS))
@pytest.mark.parametrize("pooling", ["pooled", "cls", "mean"])
def test_vision_towers(vision, pooling):
    if vision == "resnet" and pooling == "cls":
        pytest.skip("a conv net has no CLS token")
    cfg = RetrieverConfig(
        vision_config=VISION_TOWERS[vision],
        text_config=TEXT_TOWERS["bert"],
        embed_dim=8,
        vision_pooling=pooling,
    )
    model = RetrieverModel(cfg).eval()
    emb = model.encode_images(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
