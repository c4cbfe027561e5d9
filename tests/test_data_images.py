"""load_image: every input kind and mode → RGB, and every bad input → a clear error."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rvqa.data import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from tests.data_fixtures import snapshot, write_image


def _rgb(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_rgb_files(tmp_path: Path, suffix: str) -> None:
    path = write_image(tmp_path / f"a{suffix}", size=(32, 24), color=(200, 30, 30))
    for ref in (str(path), path):  # str and PathLike
        out = load_image(ref)
        arr = _rgb(out)
        assert arr.shape == (24, 32, 3)
        assert abs(int(arr[0, 0, 0]) - 200) <= 3  # JPEG is lossy
    if suffix == ".png":
        np.testing.assert_array_equal(arr, np.asarray(Image.open(path).convert("RGB")))


def test_result_is_loaded_and_file_closed(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png")
    before = _open_fds()
    out = load_image(path)
    assert _open_fds() == before
    assert getattr(out, "fp", None) is None
    path.unlink()  # pixels are in memory: still usable without the file
    assert out.tobytes()[:3] == bytes(_rgb(out)[0, 0])


def test_grayscale_and_bilevel(tmp_path: Path) -> None:
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))  # 4x16
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    arr = _rgb(load_image(tmp_path / "g.png"))
    for c in range(3):
        np.testing.assert_array_equal(arr[:, :, c], gray)
    Image.fromarray(gray > 100).save(tmp_path / "b.png")  # mode "1"
    assert Image.open(tmp_path / "b.png").mode == "1"
    arr = _rgb(load_image(tmp_path / "b.png"))
    np.testing.assert_array_equal(arr[:, :, 0], np.where(gray > 100, 255, 0))


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    arr = _rgb(load_image(tmp_path / "p.png"))
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[0, 1]) == (0, 0, 255)
    pal.save(tmp_path / "pt.png", transparency=1)  # index 1 (blue) is transparent
    arr = _rgb(load_image(tmp_path / "pt.png"))
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[0, 1]) == (255, 255, 255)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere...
    rgba[0, 0, 3] = 255  # ...opaque here
    rgba[0, 1, 3] = 0  # ...transparent here
    rgba[0, 2, 3] = 128  # ...half here
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    for ref in (tmp_path / "a.png", rgba):
        arr = _rgb(load_image(ref))
        assert tuple(arr[0, 0]) == (255, 0, 0)
        assert tuple(arr[0, 1]) == (255, 255, 255)
        assert tuple(arr[0, 2]) == (255, 127, 127)
    la = Image.fromarray(
        np.dstack([np.zeros((2, 2), np.uint8), np.array([[0, 255]] * 2, np.uint8)]), mode="LA"
    )
    arr = _rgb(load_image(la))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 1]) == (0, 0, 0)


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode in ("I;16", "I")
    arr = _rgb(load_image(tmp_path / "d.png"))
    np.testing.assert_array_equal(arr[0, :, 0], [0, 1, 128, 255])
    # 32-bit "I" images (e.g. older PIL's 16-bit PNGs) use the same 16-bit scale.
    i_img = Image.fromarray(values.astype(np.int32))
    assert i_img.mode == "I"
    np.testing.assert_array_equal(_rgb(load_image(i_img))[0, :, 1], [0, 1, 128, 255])


def test_float_and_cmyk_modes(tmp_path: Path) -> None:
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert f.mode == "F"
    np.testing.assert_array_equal(_rgb(load_image(f))[0, :, 2], [0, 128, 255])
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # red
    cmyk.save(tmp_path / "c.jpg")
    arr = _rgb(load_image(tmp_path / "c.jpg"))
    assert arr[0, 0, 0] > 200 and arr[0, 0, 1] < 60


def test_multi_frame_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert tuple(_rgb(load_image(tmp_path / "a.gif"))[0, 0]) == (255, 0, 0)


def test_reading_modifies_nothing(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg")
    Image.new("P", (3, 3)).save(tmp_path / "p.png")
    before = snapshot(tmp_path)
    load_image(tmp_path / "a.jpg")
    load_image(tmp_path / "p.png")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- PIL and numpy


def test_pil_inputs() -> None:
    im = Image.new("RGB", (5, 4), (1, 2, 3))
    assert load_image(im) is im  # already RGB: returned unchanged
    out = load_image(Image.new("L", (5, 4), 7))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (7, 7, 7)


def test_lazily_opened_pil_image_is_loaded(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png")
    with open(path, "rb") as f:
        lazy = Image.open(f)
        out = load_image(lazy)
    assert out.getpixel((0, 0))[0] == 200  # readable after the file is closed


@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 1), (4, 5, 3), (4, 5, 4)])
def test_arrays(shape: tuple[int, ...]) -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    if len(shape) == 3 and shape[2] == 4:
        arr[..., 3] = 255  # opaque: colours unchanged
    out = _rgb(load_image(arr))
    assert out.shape == (4, 5, 3)
    if arr.ndim == 2 or shape[2] == 1:
        expected = np.repeat(arr.reshape(4, 5, 1), 3, axis=2)  # gray in R, G and B
    else:
        expected = arr[..., :3]
    np.testing.assert_array_equal(out, expected)


def test_non_contiguous_array() -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    view = arr[::2, ::2]
    np.testing.assert_array_equal(np.asarray(load_image(view)), view)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int64, bool])
def test_array_wrong_dtype(dtype: type) -> None:
    arr = np.zeros((4, 4, 3), dtype=dtype)
    with pytest.raises(TypeError, match=rf"dtype {np.dtype(dtype)}, expected uint8"):
        load_image(arr)


@pytest.mark.parametrize("shape", [(4, 4, 2), (4, 4, 5), (2, 4, 4, 3), (4,), (0, 4, 3)])
def test_array_wrong_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"shape {re.escape(str(shape))}, expected \(H, W\)"):
        load_image(np.zeros(shape, dtype=np.uint8))


def test_unsupported_type() -> None:
    with pytest.raises(
        TypeError, match="file path, a PIL.Image.Image or a uint8 numpy array, got builtins.int"
    ):
        load_image(123)
    with pytest.raises(TypeError, match="got builtins.list"):
        load_image([[0, 1]])


# --------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match=rf"{re.escape(str(path))}.*file not found") as info:
        load_image(path)
    assert isinstance(info.value, ValueError) and info.value.path == str(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=rf"{re.escape(str(path))}.*empty \(0 bytes\)"):
        load_image(path)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a JPEG\n")
    with pytest.raises(ImageLoadError, match=rf"{re.escape(str(path))}.*not an image file"):
        load_image(path)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    full = write_image(tmp_path / f"full{suffix}", size=(64, 64))
    data = full.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    before = _open_fds()
    with pytest.raises(ImageLoadError, match=rf"{re.escape(str(path))}.*(truncated|corrupt)"):
        load_image(path)
    assert _open_fds() == before


# --------------------------------------------------------------------------- size limits


def test_default_limit_is_documented() -> None:
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert DEFAULT_MAX_PIXELS < Image.MAX_IMAGE_PIXELS


def test_max_pixels_checked_from_header_before_decoding(tmp_path: Path) -> None:
    full = write_image(tmp_path / "big.png", size=(100, 80))
    path = tmp_path / "big_cut.png"
    path.write_bytes(full.read_bytes()[:60])  # header intact, pixel data gone
    # The size check fires (not the truncation error): nothing was decoded.
    with pytest.raises(
        ValueError, match=r"100x80 = 8,000 pixels, above the limit of max_pixels=5,000"
    ):
        load_image(path, max_pixels=5000)
    with pytest.raises(ImageLoadError):
        load_image(path, max_pixels=None)
    assert load_image(full, max_pixels=8000).size == (100, 80)
    with pytest.raises(ValueError, match="image array is 100x80"):
        load_image(np.zeros((80, 100, 3), np.uint8), max_pixels=7999)
    with pytest.raises(ValueError, match="PIL image is 100x80"):
        load_image(Image.new("RGB", (100, 80)), max_pixels=7999)


@pytest.mark.parametrize("side", [40, 50])  # PIL warns above its limit, raises above twice it
def test_pil_decompression_bomb_becomes_value_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    path = write_image(tmp_path / "bomb.png", size=(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}.*decompression-bomb limit"
    ) as info:
        load_image(path, max_pixels=None)
    assert not isinstance(info.value, ImageLoadError)
