import json
from pathlib import Path

import pytest
import yaml

from rvqa.config import config_to_dict
from rvqa.indexing import build_index_from_config
from rvqa.reader.data import _k_for
from rvqa.reader.train import train_reader
from rvqa.retriever.train import train_retriever
from rvqa.run_layout import retriever_dir
from tests.tiny import interrupted_after_checkpoint, run_two_cpu_processes, tiny_run_config


@pytest.fixture(scope="module")
def retriever_run(tmp_path_factory):
    """A tiny trained retriever and its index, shared by the reader tests."""
    root = tmp_path_factory.mktemp("reader-train")
    cfg = tiny_run_config(root)
    train_retriever(cfg)
    build_index_from_config(cfg)
    return root, cfg


def _cfg(retriever_run, out: Path, **reader):
    root, base = retriever_run
    cfg = tiny_run_config(root, **{f"reader.{k}": v for k, v in reader.items()})
    cfg.output_dir = str(out)
    # Reuse the trained retriever: link it into the new run folder.
    (out / "retriever").mkdir(parents=True, exist_ok=True)
    src = retriever_dir(base.output_dir)
    dst = out / "retriever" / src.name
    if not dst.exists():
        dst.symlink_to(src, target_is_directory=True)
    return cfg


def test_train_saves_model_and_run_file(retriever_run, tmp_path):
    cfg = _cfg(retriever_run, tmp_path / "run")
    out = train_reader(cfg)
    res = out["result"]
    assert res.steps == 3 and res.num_processes == 1
    model_dir = out["model_dir"]
    for f in ("model.safetensors", "config.json", "reader_processor.json"):
        assert (model_dir / f).is_file(), f
    # One copy of the answer vocabulary: the reader's config (what RVQA reads).
    assert not (model_dir / "answers.json").exists()
    saved = json.loads((model_dir / "config.json").read_text())["answers"]
    assert saved and len(saved) == len(set(saved))
    run = json.loads((tmp_path / "run" / "rvqa_run.json").read_text())
    assert run["indices"] and run["top_k"] == 2
    assert (tmp_path / "run" / run["reader"] / "model.safetensors").is_file()
    assert out["best_val_accuracy"] is not None and 0 <= out["best_val_accuracy"] <= 100


def test_term_worlds_rewrite_training_answers_into_the_vocabulary(retriever_run, tmp_path):
    worlds = tmp_path / "worlds.json"
    worlds.write_text(json.dumps({"worlds": {"1": {"red": "crimson", "circle": "disc"}}}))
    cfg = _cfg(retriever_run, tmp_path / "run", term_worlds=str(worlds))
    out = train_reader(cfg)
    answers = json.loads((out["model_dir"] / "config.json").read_text())["answers"]
    assert {"red", "crimson", "circle", "disc"} <= set(answers)
    plain = train_reader(_cfg(retriever_run, tmp_path / "plain"))
    base = json.loads((plain["model_dir"] / "config.json").read_text())["answers"]
    assert "crimson" not in base and set(answers) - set(base) == {"crimson", "disc"}


def test_k_dropout_is_deterministic():
    ks = [_k_for(q, 3, 0.5, 0) for q in range(2000)]
    assert ks == [_k_for(q, 3, 0.5, 0) for q in range(2000)]
    assert 0.33 < sum(k != 3 for k in ks) / len(ks) < 0.42  # 50 % redrawn × 3/4 not landing on 3
    assert set(ks) == {0, 1, 2, 3}
    assert all(_k_for(q, 3, 0.0, 0) == 3 for q in range(100))


def test_resume_continues_from_saved_step(retriever_run, tmp_path, monkeypatch):
    kw = {"max_steps": 4, "checkpoint_every": 2, "eval_every": 0}
    full = train_reader(_cfg(retriever_run, tmp_path / "a", **kw))["result"]
    cfg = _cfg(retriever_run, tmp_path / "b", **kw)
    with interrupted_after_checkpoint(monkeypatch, 2):
        train_reader(cfg)
    resumed = train_reader(cfg, resume=True)["result"]
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5, abs=1e-6)
    # A different answer vocabulary is a different model: refused.
    changed = _cfg(retriever_run, tmp_path / "b", answer_vocab_size=5, **kw)
    with pytest.raises(ValueError, match="cannot resume .*answers"):
        train_reader(changed, resume=True)


@pytest.mark.slow
def test_two_cpu_processes(retriever_run, tmp_path):
    cfg = _cfg(retriever_run, tmp_path / "run", max_steps=2, eval_every=0)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    proc = run_two_cpu_processes(
        ["-m", "rvqa", "train-reader", "--config", str(path)], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "reader" / "train_result.json").read_text())
    assert result["num_processes"] == 2 and result["steps"] == 2
    assert (tmp_path / "run" / "reader" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "rvqa_run.json").is_file()


def _count_tower_calls_in_forward(monkeypatch) -> dict[str, int]:
    """Spy: image-tower calls made inside ReaderModel.forward (i.e. per training/eval step)."""
    from rvqa.reader.modeling import ReaderModel

    counts = {"forward": 0, "tower_in_forward": 0, "tower_outside": 0}
    inside = [False]
    forward, features = ReaderModel.forward, ReaderModel.vision_features

    def spy_forward(self, *args, **kwargs):
        counts["forward"] += 1
        inside[0] = True
        try:
            return forward(self, *args, **kwargs)
        finally:
            inside[0] = False

    def spy_features(self, pixel_values):
        counts["tower_in_forward" if inside[0] else "tower_outside"] += 1
        return features(self, pixel_values)

    monkeypatch.setattr(ReaderModel, "forward", spy_forward)
    monkeypatch.setattr(ReaderModel, "vision_features", spy_features)
    return counts


def test_frozen_tower_runs_once_per_image_not_per_step(retriever_run, tmp_path, monkeypatch):
    kw = {"max_steps": 4, "checkpoint_every": 0, "eval_every": 2}
    counts = _count_tower_calls_in_forward(monkeypatch)
    cached = train_reader(_cfg(retriever_run, tmp_path / "cached", **kw))["result"]
    assert counts["forward"] >= 4 and counts["tower_in_forward"] == 0
    assert counts["tower_outside"] >= 1  # the cache: once per image, in batches

    # Per step (no budget): the tower runs in every forward, and the losses are the same.
    counts.update(forward=0, tower_in_forward=0, tower_outside=0)
    per_step = train_reader(
        _cfg(retriever_run, tmp_path / "per-step", **kw), feature_cache_max_bytes=0
    )["result"]
    assert counts["tower_in_forward"] == counts["forward"] >= 4
    assert cached.losses == pytest.approx(per_step.losses, rel=1e-5, abs=1e-6)
    assert [h["accuracy"] for h in cached.history] == [h["accuracy"] for h in per_step.history]


def test_trained_tower_runs_every_step(retriever_run, tmp_path, monkeypatch):
    counts = _count_tower_calls_in_forward(monkeypatch)
    cfg = _cfg(retriever_run, tmp_path / "run", max_steps=2, eval_every=0, freeze_vision=False)
    train_reader(cfg)
    assert counts["tower_outside"] == 0
    assert counts["tower_in_forward"] == counts["forward"] >= 2
