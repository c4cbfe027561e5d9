"""Mixed precision and gradient accumulation through the project's training loop.

- ``bf16``: Accelerate autocasts the forward pass on CPU too; the loss falls, the
  saved weights stay float32, checkpoints resume exactly and saved models load with
  identical outputs.
- ``fp16`` on a CPU is refused with a ConfigError naming the setting (Accelerate would
  silently train in float32), before any data is read.
- ``gradient_accumulation_steps = 4`` with batch b: for the reader's per-question mean
  loss, the same gradients, learning rates and update as batch 4b; for the retriever's
  in-batch contrastive loss, the mean of the micro-batches' gradients, which is not the
  big batch's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rvqa.config import TrainSettings
from rvqa.errors import ConfigError
from rvqa.reader.modeling import ReaderModel
from rvqa.reader.train import train_reader
from rvqa.retriever.modeling import RetrieverModel
from rvqa.retriever.train import train_retriever
from rvqa.training import find_last_checkpoint, make_accelerator
from tests.tiny import draw_shape, interrupted_after_checkpoint, tiny_run_config
from tests.tiny_towers import (
    assert_loss_fell,
    coco_retriever_config,
    reader_for,
    tiny_text_backbone_without_dropout,
    tiny_vit_folder,
)

# --------------------------------------------------------------------------- helpers


def _bf16_retriever_config(root: Path, **retriever):
    """The small CNN (BatchNorm included) on one fixed batch of 30 pairs, bf16."""
    settings = {"mixed_precision": "bf16", "cnn_hidden_sizes": [8, 16], **retriever}
    return coco_retriever_config(root, "cnn", **settings)


@contextmanager
def _projection_dtypes(module: torch.nn.Module) -> Iterator[dict[bool, set]]:
    """The output dtypes of ``module``, by its training flag, while the block runs."""
    seen: dict[bool, set] = {True: set(), False: set()}
    handle = module.register_forward_hook(lambda m, args, out: seen[m.training].add(out.dtype))
    try:
        yield seen
    finally:
        handle.remove()


def _saved_dtypes(folder: Path) -> set[torch.dtype]:
    """The dtypes of every floating tensor in ``folder``'s model.safetensors."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    return {t.dtype for t in tensors if t.is_floating_point()}


@contextmanager
def _optimizer_steps() -> Iterator[list[dict]]:
    """Every optimizer step taken in the block: its learning rate and, by parameter index,
    each parameter's ``id`` and a copy of its gradient (what the optimiser will apply)."""
    steps: list[dict] = []

    def record(optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        steps.append(
            {
                "lr": optimizer.param_groups[0]["lr"],
                "params": [id(p) for p in params],
                "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
            }
        )

    handle = register_optimizer_step_pre_hook(record)
    try:
        yield steps
    finally:
        handle.remove()


@contextmanager
def _training_batches(model: torch.nn.Module, keys: tuple[str, ...]) -> Iterator[list[dict]]:
    """The ``keys`` of every batch ``model`` is called with in training mode."""
    batches: list[dict] = []

    def record(module, args, kwargs):
        if module.training:
            batches.append({k: kwargs[k].detach().clone() for k in keys if k in kwargs})

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield batches
    finally:
        handle.remove()


def _concat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _assert_same_grads(a: list, b: list, rtol: float = 1e-4, atol: float = 1e-7) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x is None) == (y is None), i
        if x is not None:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=f"parameter {i}")


# --------------------------------------------------------------------------- fp16


@pytest.mark.parametrize("section", ["retriever", "reader"])
def test_fp16_on_cpu_is_a_config_error_before_any_data_is_read(tmp_path, monkeypatch, section):
    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the precision was checked")

    monkeypatch.setattr("rvqa.retriever.train.load_caption_split", no_data)
    monkeypatch.setattr("rvqa.reader.train.load_reader_data", no_data)
    cfg = tiny_run_config(tmp_path, **{f"{section}.mixed_precision": "fp16"})
    run = train_retriever if section == "retriever" else train_reader
    message = (
        rf"^{section}\.mixed_precision: fp16 needs a GPU, but this run is on the CPU, where "
        rf"Accelerate would train in float32 without saying so; use bf16 \(autocast on CPU\) "
        rf"or no, e.g\. --set {section}\.mixed_precision=bf16$"
    )
    with pytest.raises(ConfigError, match=message):
        run(cfg, end_training=False)


def test_one_process_runs_one_precision_after_another(tmp_path):
    """Accelerate keeps one precision per process; make_accelerator resets it between
    runs (a bf16 retriever, then a reader in float32, in one Python session)."""
    bf16 = make_accelerator(TrainSettings(mixed_precision="bf16"), tmp_path)
    assert bf16.mixed_precision == "bf16" and bf16.native_amp  # autocast on
    plain = make_accelerator(TrainSettings(), tmp_path)
    assert plain.mixed_precision == "no" and not plain.native_amp
    with pytest.raises(ConfigError, match=r"^mixed_precision: fp16 needs a GPU"):
        make_accelerator(TrainSettings(mixed_precision="fp16"), tmp_path)
    again = make_accelerator(TrainSettings(mixed_precision="bf16"), tmp_path)
    assert again.mixed_precision == "bf16" and again.native_amp


# --------------------------------------------------------------------------- bf16


def test_bf16_retriever_loss_falls_weights_stay_float32_and_reload_identically(tmp_path):
    cfg = _bf16_retriever_config(tmp_path)
    model = RetrieverModel.from_backbones(cfg.retriever)
    with _projection_dtypes(model.vision_projection) as dtypes:
        out = train_retriever(cfg, model=model, end_training=False)
    # Training forwards ran under bf16 autocast; evaluation (encode_images) in float32.
    assert dtypes[True] == {torch.bfloat16} and dtypes[False] == {torch.float32}
    result = out["result"]
    assert result.steps == 8
    assert_loss_fell(result.losses)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    final = result.final_model_dir
    checkpoint = find_last_checkpoint(tmp_path / "run" / "retriever")
    assert checkpoint is not None and checkpoint.name == "step_00000008"
    for folder in (final, checkpoint):
        assert _saved_dtypes(folder) == {torch.float32}, folder
    loaded = RetrieverModel.from_pretrained(final)
    images = [draw_shape("red", "circle"), draw_shape("blue", "square")]
    captions = ["a red circle", "a blue square"]
    np.testing.assert_array_equal(loaded.embed_images(images), model.embed_images(images))
    np.testing.assert_array_equal(loaded.embed_texts(captions), model.embed_texts(captions))


def test_bf16_retriever_resumes_exactly(tmp_path, monkeypatch):
    """Every step ends an epoch here (one batch an epoch): the resumed run draws the
    next epoch's data iterator from the restored RNG state, as the uninterrupted run did
    (the text tower's dropout then draws the same masks)."""
    cfg = _bf16_retriever_config(tmp_path / "a", max_steps=4)
    full = train_retriever(cfg, end_training=False)["result"]

    cfg = _bf16_retriever_config(tmp_path / "b", max_steps=4)
    with interrupted_after_checkpoint(monkeypatch, 2):
        train_retriever(cfg, end_training=False)
    resumed = train_retriever(cfg, resume=True, end_training=False)["result"]
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    assert resumed.losses == full.losses[2:]  # bit for bit
    a = RetrieverModel.from_pretrained(full.final_model_dir).state_dict()
    b = RetrieverModel.from_pretrained(resumed.final_model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_reader_loss_falls_and_reloads_identically(tmp_path):
    cfg = tiny_run_config(
        tmp_path,
        **{
            "data.train_fraction": 0.002,
            "reader.vision_backbone": "cnn",
            "reader.cnn_hidden_sizes": [8, 16],
            "reader.freeze_vision": False,  # pixels through the tower, under autocast
            "reader.top_k": 0,
            "reader.mixed_precision": "bf16",
            "reader.batch_size": 16,
            "reader.max_steps": 8,
            "reader.warmup_ratio": 0.0,
            "reader.lr_scheduler": "constant_with_warmup",
            "reader.max_eval_questions": 8,
        },
    )
    model, processor = reader_for(cfg)
    with _projection_dtypes(model.classifier) as dtypes:
        result = train_reader(cfg, model=model, processor=processor, end_training=False)["result"]
    assert dtypes[True] == {torch.bfloat16}
    assert_loss_fell(result.losses)
    assert _saved_dtypes(result.final_model_dir) == {torch.float32}
    loaded = ReaderModel.from_pretrained(result.final_model_dir)
    trained = model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    batch = processor([draw_shape("red", "circle")], ["what color is the shape?"])
    model.eval(), loaded.eval()
    with torch.no_grad():
        # The prepared model autocasts its forward and returns float32 outputs.
        expected = model(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loaded(**batch).logits
    assert expected.dtype == torch.float32
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- accumulation


def _accumulation_reader_config(root: Path, batch_size: int, accumulation: int):
    vit = str(tiny_vit_folder(root))  # no BatchNorm, no dropout
    return tiny_run_config(
        root,
        **{
            "data.train_fraction": 0.002,  # 73 training questions: 2 steps of 32
            "reader.text_backbone": str(tiny_text_backbone_without_dropout(root)),
            "reader.vision_backbone": vit,
            "reader.freeze_vision": False,
            "reader.top_k": 0,
            "reader.batch_size": batch_size,
            "reader.gradient_accumulation_steps": accumulation,
            "reader.max_steps": 2,
            "reader.lr_scheduler": "linear",
            "reader.warmup_ratio": 0.0,
            "reader.max_grad_norm": None,  # clipping would hide a wrongly scaled gradient
            "reader.max_eval_questions": 4,
        },
    )


def test_accumulating_4_reader_batches_equals_one_4x_batch(tmp_path):
    runs = {}
    for batch_size, accumulation in ((8, 4), (32, 1)):
        root = tmp_path / f"b{batch_size}"
        cfg = _accumulation_reader_config(root, batch_size, accumulation)
        torch.manual_seed(0)  # the same initial head weights in both runs
        model, processor = reader_for(cfg, dropout=0.0)
        with (
            _optimizer_steps() as steps,
            _training_batches(model, ("pixel_values", "labels")) as batches,
        ):
            result = train_reader(cfg, model=model, processor=processor, end_training=False)
        assert result["result"].steps == 2
        runs[batch_size] = {"steps": steps, "batches": batches, "model": model}
    small, big = runs[8], runs[32]
    assert len(small["batches"]) == 8 and len(big["batches"]) == 2
    # The seedable sampler's order does not depend on the batch size: 4 micro-batches
    # are exactly the big batch.
    for step in range(2):
        micro = _concat(small["batches"][4 * step : 4 * step + 4])
        for key in ("pixel_values", "labels"):
            assert torch.equal(micro[key], big["batches"][step][key]), (step, key)
    # One optimiser and scheduler step per 4 micro-batches, at the same learning rates.
    lr = _accumulation_reader_config(tmp_path / "b8", 8, 4).reader.learning_rate
    assert [s["lr"] for s in small["steps"]] == [s["lr"] for s in big["steps"]] == [lr, lr / 2]
    for step in range(2):
        _assert_same_grads(small["steps"][step]["grads"], big["steps"][step]["grads"])
    a, b = small["model"].state_dict(), big["model"].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_accumulated_retriever_gradient_is_the_mean_of_micro_batch_gradients(tmp_path):
    """VSE++ mines its negatives inside each micro-batch: accumulating 4 batches of 8
    gives the mean of their 4 gradients, not the gradient of one batch of 32."""
    runs = {}
    for batch_size, accumulation in ((8, 4), (32, 1)):
        root = tmp_path / f"b{batch_size}"
        cfg = coco_retriever_config(
            root,
            tiny_vit_folder(root),  # no BatchNorm, no dropout
            n_per_class=3,  # 46 training pairs
            text_backbone=str(tiny_text_backbone_without_dropout(root)),
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            max_grad_norm=None,
        )
        model = RetrieverModel.from_backbones(cfg.retriever)
        initial = copy.deepcopy(model)
        keys = ("pixel_values", "input_ids", "attention_mask", "positive_mask")
        with _optimizer_steps() as steps, _training_batches(model, keys) as batches:
            train_retriever(cfg, model=model, end_training=False)
        assert len(steps) == 1
        names = {id(p): n for n, p in model.named_parameters()}
        grads = dict(zip(steps[0]["params"], steps[0]["grads"], strict=True))
        grads = {names[i]: g for i, g in grads.items() if g is not None}
        runs[batch_size] = {"grads": grads, "batches": batches, "initial": initial}
        # max_violation_warmup counts forward passes: 4 micro-batches, one optimizer step.
        assert int(model.num_updates) == accumulation

    small, big = runs[8], runs[32]
    assert len(small["batches"]) == 4 and len(big["batches"]) == 1
    micro = _concat(small["batches"])
    assert torch.equal(micro["pixel_values"], big["batches"][0]["pixel_values"])
    # The mean of the 4 micro-batch gradients, recomputed from the initial weights.
    reference = small["initial"].train()
    for batch in small["batches"]:
        (reference(**batch).loss / 4).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert set(expected) == set(small["grads"])
    for name, grad in small["grads"].items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)
    # ... which is not the 4x batch's gradient (its negatives come from 32 pairs).
    a, b = small["grads"]["vision_projection.weight"], big["grads"]["vision_projection.weight"]
    assert (a - b).norm() > 0.1 * b.norm()
