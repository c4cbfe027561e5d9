"""Images streamed through DataLoader workers (rvqa.pixels) and the training loop with
workers: the processor's pixels, the same batches with 0 and 2 workers, and an
unreadable image named in a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from rvqa.config import TrainSettings
from rvqa.data import VQADataset, VQARecord, load_image
from rvqa.errors import ImageLoadError
from rvqa.pixels import ImagePixels, carry_errors, image_pixels, loader_options, raise_carried
from rvqa.reader.answers import AnswerVocab
from rvqa.reader.data import ReaderCollator, ReaderDataset
from rvqa.towers import small_cnn_processor
from rvqa.training import Trainer, train
from tests.test_reader_model import ANSWERS, processor, tiny_model, tokenizer  # noqa: F401
from tests.tiny import COLORS, draw_shape


def _image_files(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    colors = list(COLORS)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        draw_shape(colors[i % 4], "circle" if i % 2 else "square", offset=i % 3).save(path)
        paths.append(str(path))
    return paths


def _dataset(paths: list[str], processor) -> ReaderDataset:  # noqa: F811
    answers = ["red", "blue", "green", "yellow"]
    records = VQADataset.from_records(
        [
            VQARecord(
                question_id=i,
                image_id=i,
                image=p,
                question="what color is the shape?",
                answers=[answers[i % 4]] * 10,
            )
            for i, p in enumerate(paths)
        ]
    )
    # The tiny reader's answers, in its order.
    return ReaderDataset(records, processor.image_processor, None, AnswerVocab(ANSWERS), 0)


def test_streamed_pixels_are_the_processors_on_the_loaded_image(tmp_path):
    paths = _image_files(tmp_path, 5)
    proc = small_cnn_processor(32)
    data = ImagePixels(paths, proc)
    loader = DataLoader(data, batch_size=2, collate_fn=torch.stack, num_workers=2)
    streamed = torch.cat(list(loader))
    assert streamed.dtype == torch.float16 and streamed.shape == (5, 3, 32, 32)
    for i, p in enumerate(paths):
        expected = proc(images=[load_image(p)], return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(streamed[i].float(), expected, atol=2e-3, rtol=1e-3)
        assert torch.equal(streamed[i], image_pixels(p, proc))


def test_loader_pins_memory_only_for_a_gpu():
    assert loader_options(2, "cpu") == {"num_workers": 2, "pin_memory": False}
    assert loader_options(0, torch.device("cuda", 0))["pin_memory"] is True


def test_an_error_in_a_worker_arrives_as_itself(tmp_path):
    paths = _image_files(tmp_path, 4)
    Path(paths[2]).unlink()
    dataset, collate = carry_errors(ImagePixels(paths, small_cnn_processor(32)), torch.stack)
    for workers in (0, 2):
        loader = DataLoader(dataset, batch_size=2, collate_fn=collate, num_workers=workers)
        with pytest.raises(ImageLoadError) as err:
            for batch in loader:
                raise_carried(batch)
        assert err.value.path == paths[2]
        assert str(err.value).startswith(f"cannot load image {paths[2]!r}")
        assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def _settings(workers: int, **kw) -> TrainSettings:
    base = dict(batch_size=4, max_steps=2, eval_every=0, checkpoint_every=0, log_every=0, seed=3)
    return TrainSettings(num_workers=workers, **{**base, **kw})


def test_training_with_two_workers_sees_the_same_batches(tmp_path, tokenizer, processor):  # noqa: F811
    data = _dataset(_image_files(tmp_path / "images", 12), processor)
    collate = ReaderCollator(processor)
    first = {}
    for workers in (0, 2):
        trainer = Trainer(
            tiny_model(tokenizer), data, collate, _settings(workers), tmp_path / f"setup{workers}"
        )
        trainer.setup()
        assert trainer.loader.num_workers == workers and not trainer.loader.pin_memory
        first[workers] = next(iter(trainer.loader))
    assert first[0].keys() == first[2].keys()
    for key in first[0]:
        assert torch.equal(first[0][key], first[2][key]), key
    assert first[2]["pixel_values"].dtype == torch.float16

    # Two optimizer steps: the same losses with and without workers.
    losses = {
        w: train(tiny_model(tokenizer), data, collate, _settings(w), tmp_path / f"run{w}").losses
        for w in (0, 2)
    }
    assert len(losses[2]) == 2 and losses[0] == pytest.approx(losses[2], rel=1e-6)


def test_a_missing_image_during_training_names_the_file(tmp_path, tokenizer, processor):  # noqa: F811
    paths = _image_files(tmp_path / "images", 8)
    Path(paths[5]).unlink()
    data = _dataset(paths, processor)
    for workers in (0, 2):
        with pytest.raises(ImageLoadError) as err:
            train(
                tiny_model(tokenizer),
                data,
                ReaderCollator(processor),
                _settings(workers, max_steps=4),
                tmp_path / f"run{workers}",
            )
        assert err.value.path == paths[5] and paths[5] in str(err.value)
        assert "\n" not in str(err.value)
