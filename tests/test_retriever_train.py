import json
from pathlib import Path

import pytest
import yaml

from rvqa.config import config_from_dict
from rvqa.retriever.modeling import RetrieverModel
from rvqa.retriever.train import train_retriever
from tests.tiny import (
    coco_caption_fixture,
    interrupted_after_checkpoint,
    run_two_cpu_processes,
    tiny_text_backbone,
)


def tiny_run_dict(tmp_path: Path, **retriever) -> dict:
    captions, images = coco_caption_fixture(tmp_path / "coco", n_per_class=3)
    settings = {
        "vision_backbone": "cnn",
        "cnn_hidden_sizes": [8, 16],
        "text_backbone": str(tiny_text_backbone(tmp_path)),
        "embed_dim": 16,
        "image_size": 32,
        "max_caption_length": 12,
        "batch_size": 8,
        "max_steps": 6,
        "eval_every": 3,
        "checkpoint_every": 3,
        "learning_rate": 3e-3,
        "max_violation_warmup": 2,
        "val_fraction": 0.25,
        "log_every": 1,
        "captions": {"source": "coco", "path": str(captions), "images": str(images)},
    }
    settings.update(retriever)
    return {"output_dir": str(tmp_path / "run"), "retriever": settings}


def test_train_single_process(tmp_path):
    cfg = config_from_dict(tiny_run_dict(tmp_path))
    out = train_retriever(cfg)
    res = out["result"]
    run = tmp_path / "run" / "retriever"
    assert res.steps == 6 and res.num_processes == 1
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "best" / "config.json").is_file() and res.best_metric is not None
    assert (run / "config.yaml").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["retriever"]["max_steps"] == 6
    # 36 training pairs / batch 8 = 4 steps an epoch: evaluations and checkpoints
    # every 3 steps and at each epoch end; the newest 2 checkpoints are kept.
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000006"]
    assert [h["step"] for h in res.history] == [3, 4, 6]
    assert {"i2t_r1", "t2i_r10", "rsum"} <= set(res.history[0])
    model = RetrieverModel.from_pretrained(run / "final")
    assert model.embed_texts(["a red circle"]).shape == (1, 16)
    result = json.loads((run / "train_result.json").read_text())
    assert result["steps"] == 6 and result["num_processes"] == 1
    assert result["metric"] == "rsum" and result["best_metric"] == res.best_metric
    assert result["history"] == res.history and result["final_loss"] == res.losses[-1]
    # metrics.json: the handed-on model and its recall only (no loop facts repeated).
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"model_dir", "val", "test"}
    assert metrics["model_dir"] == str(run / "best") == str(out["model_dir"])
    best_entry = next(h for h in res.history if h["rsum"] == res.best_metric)
    assert metrics["val"] == best_entry and metrics["test"] is None


def test_resume_continues_exactly(tmp_path, monkeypatch):
    full = train_retriever(config_from_dict(tiny_run_dict(tmp_path / "a")))["result"]

    cfg = config_from_dict(tiny_run_dict(tmp_path / "b"))
    with interrupted_after_checkpoint(monkeypatch, 3):
        train_retriever(cfg)
    assert not (tmp_path / "b" / "run" / "retriever" / "final").exists()

    resumed = train_retriever(cfg, resume=True)["result"]
    assert resumed.resumed_from_step == 3 and resumed.steps == 6
    # Same data order, RNG and schedule: the last 3 losses equal the uninterrupted run's.
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-5, abs=1e-6)


def test_resume_with_changed_model_config_refused(tmp_path):
    train_retriever(config_from_dict(tiny_run_dict(tmp_path, max_steps=3)))
    changed = config_from_dict(tiny_run_dict(tmp_path, max_steps=3, embed_dim=8))
    with pytest.raises(ValueError, match=r"cannot resume .*model\.embed_dim: 16 -> 8"):
        train_retriever(changed, resume=True)


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint found"):
        train_retriever(config_from_dict(tiny_run_dict(tmp_path)), resume=True)


@pytest.mark.slow
def test_two_cpu_processes(tmp_path):
    cfg = tiny_run_dict(tmp_path, max_steps=4, eval_every=2, checkpoint_every=0)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_two_cpu_processes(
        ["-m", "rvqa", "train-retriever", "--config", str(path)], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "retriever" / "train_result.json").read_text())
    assert result["num_processes"] == 2
    assert result["steps"] == 4
    model = RetrieverModel.from_pretrained(tmp_path / "run" / "retriever" / "final")
    assert model.embed_texts(["a blue square"]).shape == (1, 16)
