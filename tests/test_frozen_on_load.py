"""Loading a trained model keeps its frozen parts frozen.

``transformers`` 5 materialises the parameters ``from_pretrained`` loads with
``requires_grad=True``; without :class:`rvqa.towers.KeepsFrozenOnLoad` a loaded
retriever trained further (the knowledge task's card fine-tuning) trained its frozen
text tower too.
"""

from __future__ import annotations

import copy

from rvqa.config import load_config
from rvqa.reader.auto import load_reader
from rvqa.reader.modeling import ReaderModel
from rvqa.retriever.modeling import RetrieverModel
from rvqa.retriever.train import train_retriever


def _grads(model) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def _frozen_text_retriever(tiny_run, folder):
    """The tiny run's retriever saved with ``freeze_text`` (the demo's setting)."""
    model = RetrieverModel.from_pretrained(tiny_run / "retriever" / "best")
    model.config.freeze_text = True
    model.save_pretrained(folder)
    return folder


def test_loaded_retriever_and_reader_keep_frozen_towers_frozen(tiny_run, tmp_path):
    folder = _frozen_text_retriever(tiny_run, tmp_path / "frozen")
    retriever = RetrieverModel.from_pretrained(folder)
    fresh = RetrieverModel(retriever.config)
    assert retriever.config.freeze_text
    assert not any(g for n, g in _grads(fresh).items() if n.startswith("text_model."))
    assert _grads(retriever) == _grads(fresh)
    # (model, loading_info) gets its freezing too
    loaded, info = RetrieverModel.from_pretrained(folder, output_loading_info=True)
    assert _grads(loaded) == _grads(fresh) and not info["missing_keys"]

    reader, _ = load_reader(tiny_run / "reader" / "best")
    fresh_reader = ReaderModel(reader.config)
    assert reader.config.freeze_vision
    assert not any(p.requires_grad for p in reader.vision_model.parameters())
    assert _grads(reader) == _grads(fresh_reader)


def test_training_a_loaded_retriever_leaves_its_frozen_text_tower_unchanged(tiny_run, tmp_path):
    retriever = RetrieverModel.from_pretrained(_frozen_text_retriever(tiny_run, tmp_path / "f"))
    before = {n: p.detach().clone() for n, p in retriever.text_model.named_parameters()}
    cfg = load_config(tiny_run / "retriever" / "config.yaml")
    cfg.output_dir = str(tmp_path / "again")
    cfg.retriever.max_steps = 3
    cfg.retriever.eval_every = 0
    cfg.retriever.freeze_text = True
    out = train_retriever(cfg, model=copy.deepcopy(retriever), end_training=False)
    trained = RetrieverModel.from_pretrained(out["model_dir"])
    for name, p in trained.text_model.named_parameters():
        assert (p == before[name]).all(), f"frozen text tower parameter {name} changed"
    changed = [
        n
        for n, p in trained.vision_model.named_parameters()
        if not (p == dict(retriever.vision_model.named_parameters())[n]).all()
    ]
    assert changed, "the image tower (not frozen) should have trained"
