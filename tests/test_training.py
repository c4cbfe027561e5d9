"""The shared training loop (rvqa.training): hooks, best-model choice, atomic saves, errors.

A linear model on a few points, so each test takes about a second; resume
exactness on real models is covered by tests/test_retriever_train.py and
tests/test_reader_train.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rvqa.config import TrainSettings
from rvqa.errors import ResumeError, RunFolderError, UsageError
from rvqa.training import Trainer, TrainHooks, train
from tests.tiny import interrupted_after_checkpoint


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 1)

    def forward(self, x, y):
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(self.fc(x).squeeze(-1), y))

    def save_pretrained(self, path):
        torch.save(self.state_dict(), Path(path) / "weights.pt")


def points(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    return [{"x": x[i], "y": x[i, 0] - 2 * x[i, 1]} for i in range(n)]


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def settings(**kw):
    base = dict(batch_size=4, max_steps=6, eval_every=2, checkpoint_every=3, log_every=0)
    base.update(kw)
    return TrainSettings(**base)


def save_state_dict(model, path: Path):
    model.save_pretrained(path)


def final_name(tmp: Path) -> str:
    """``.best.tmp-<pid>-<rand>`` (rvqa.io.atomic_directory's temporary folder) -> ``best``."""
    assert tmp.name.startswith(".") and ".tmp-" in tmp.name, tmp
    return tmp.name[1:].split(".tmp-")[0]


def _weights(folder: Path) -> dict:
    return torch.load(folder / "weights.pt")


def hidden_leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def test_best_model_follows_the_metric_direction(tmp_path):
    scores = iter([5.0, 3.0, 4.0, 3.0])  # evaluations at steps 2, 4, 6 (and none after)
    saved = []

    def evaluate(model, accelerator):
        return {"err": next(scores)}

    def save(model, path):
        saved.append(final_name(path))
        save_state_dict(model, path)

    hooks = TrainHooks(evaluate=evaluate, metric="err", greater_is_better=False, save_fn=save)
    res = Trainer(Linear(), points(), collate, settings(), tmp_path, hooks).run(end_training=False)
    assert [h["step"] for h in res.history] == [2, 4, 6]
    assert [h["err"] for h in res.history] == [5.0, 3.0, 4.0]
    assert res.best_metric == 3.0  # lower is better; the later 4.0 does not replace it
    assert saved == ["best", "best", "final"]  # best at steps 2 and 4, then final
    assert (tmp_path / "best" / "weights.pt").is_file() and res.best_model_dir == tmp_path / "best"
    assert hidden_leftovers(tmp_path) == []  # no temporary folders left behind
    # train_result.json is TrainResult.to_json
    written = json.loads((tmp_path / "train_result.json").read_text())
    assert written == json.loads(json.dumps(res.to_json("err")))
    assert written["best_metric"] == 3.0 and written["metric"] == "err" and written["steps"] == 6
    # 16 points / batch 4 = 4 steps an epoch: checkpoints at 3, 4 (epoch end) and 6,
    # the newest 2 kept; evaluations at 2, 4 (periodic and epoch end: once) and 6.
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000006"]
    state = json.loads(
        (tmp_path / "checkpoints" / "step_00000006" / "trainer_state.json").read_text()
    )
    assert state["step"] == 6 and state["best_metric"] == 3.0


def test_train_wrapper_equals_trainer_and_resumes_bit_identically(tmp_path, monkeypatch):
    torch.manual_seed(0)
    full = train(Linear(), points(), collate, settings(), tmp_path / "a", end_training=False)

    torch.manual_seed(0)
    with interrupted_after_checkpoint(monkeypatch, 3):
        train(Linear(), points(), collate, settings(), tmp_path / "b", end_training=False)
    torch.manual_seed(0)
    resumed = train(
        Linear(), points(), collate, settings(), tmp_path / "b", resume=True, end_training=False
    )
    assert resumed.resumed_from_step == 3 and resumed.steps == 6
    assert resumed.losses == full.losses[3:]  # bit for bit
    a, b = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert list(a) == ["fc.weight", "fc.bias"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same final weights


def test_resume_errors(tmp_path):
    with pytest.raises(RunFolderError, match="no complete checkpoint found under"):
        train(Linear(), points(), collate, settings(), tmp_path, resume=True, end_training=False)
    assert issubclass(RunFolderError, FileNotFoundError)
    train(Linear(), points(), collate, settings(), tmp_path, signature={"a": 1}, end_training=False)
    with pytest.raises(ResumeError, match=r"cannot resume from .*step_00000006.*a: 1 -> 2"):
        train(
            Linear(),
            points(),
            collate,
            settings(),
            tmp_path,
            resume=True,
            signature={"a": 2},
            end_training=False,
        )
    assert issubclass(ResumeError, ValueError)


def test_hooks_and_loose_arguments_are_exclusive(tmp_path):
    with pytest.raises(UsageError, match="pass evaluate/metric/greater_is_better/save_fn or hooks"):
        train(Linear(), points(), collate, settings(), tmp_path, metric="x", hooks=TrainHooks())


def test_failed_save_keeps_the_previous_model_and_leaves_no_temporary(tmp_path):
    calls = []

    def save(model, path):
        calls.append(final_name(path))
        save_state_dict(model, path)
        if calls[-1] == "final" or len(calls) == 2:
            raise OSError("disk full")

    hooks = TrainHooks(evaluate=lambda m, a: {"m": float(len(calls))}, metric="m", save_fn=save)
    with pytest.raises(OSError, match="disk full"):
        Trainer(Linear(), points(), collate, settings(), tmp_path, hooks).run(end_training=False)
    assert (tmp_path / "best" / "weights.pt").is_file()  # the first best/ survives
    assert not (tmp_path / "final").exists()
    assert hidden_leftovers(tmp_path) == []


def test_empty_training_set_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"the training set is empty \(0 examples\)"):
        train(Linear(), [], collate, settings(), tmp_path, end_training=False)


class EpochPoints(torch.utils.data.Dataset):
    """Points whose items record the epoch the loop announced before reading them."""

    def __init__(self):
        self.items = points(8)
        self.epoch = None
        self.seen: list[int | None] = []

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.seen.append(self.epoch)
        return self.items[i]


def test_the_loop_tells_the_dataset_its_epoch_before_reading_it(tmp_path):
    ds = EpochPoints()
    s = settings(max_steps=None, num_epochs=3, eval_every=0, checkpoint_every=0)
    train(Linear(), ds, collate, s, tmp_path, save_fn=save_state_dict)
    assert ds.seen == [0] * 8 + [1] * 8 + [2] * 8


def test_checkpoint_from_before_copy_from_context_resumes_with_it_off(tmp_path):
    """A checkpoint's signature without the key was trained without the pointer/copy head:
    it resumes when the config says so, and is refused (naming the key) otherwise."""
    from rvqa.training import _check_signature

    saved = {"model": {"answers": ["a"]}, "seed": 1}
    _check_signature(
        saved, {"model": {"answers": ["a"], "copy_from_context": False}, "seed": 1}, tmp_path
    )
    with pytest.raises(ResumeError, match=r"model.copy_from_context: False -> True"):
        _check_signature(
            saved, {"model": {"answers": ["a"], "copy_from_context": True}, "seed": 1}, tmp_path
        )
