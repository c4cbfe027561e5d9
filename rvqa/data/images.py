"""Image loading, in one place: paths, PIL images and numpy arrays → RGB PIL images.

Every component (retriever, reader, pipeline, index building) loads pixels through
:func:`load_image`, so mode conversion, size limits and error messages are the
same everywhere.

Conversions (all results are mode ``"RGB"``, fully loaded, no open file handle):

* ``L`` / ``1`` (grayscale, bilevel): the gray value is repeated in R, G and B.
* ``P`` (palette): looked up; a palette with transparency is treated like RGBA.
* ``RGBA`` / ``LA`` / ``PA`` / ``RGBa`` / ``La``: **alpha-composited onto white**, so a
  transparent background looks like paper rather than black (a plain
  ``convert("RGB")`` would expose whatever colour the transparent pixels store).
* ``I;16`` / ``I;16B`` / ``I;16L`` / ``I`` (16-bit / 32-bit integer gray, e.g.
  16-bit PNGs): values are taken as 16-bit, clipped to ``[0, 65535]`` and scaled
  to 8 bit with rounding (``v * 255 / 65535``), so full white stays white
  (PIL's own ``convert("L")`` clips instead of scaling, turning most 16-bit
  images white).
* ``F`` (32-bit float gray): taken as ``[0, 1]`` when the image's maximum is at
  most 1, else as ``[0, 255]``; clipped and rounded.
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: PIL's conversion to RGB.
* Any other mode (none of PIL's own modes; a plugin's): refused with an error
  naming the mode (and the file), not converted by guesswork.

Multi-frame files (GIF, TIFF) give their first frame. EXIF orientation is not
applied: datasets such as COCO annotate the stored pixel orientation.

:func:`find_unreadable_images` decodes many images through :func:`load_image`
in a thread pool (Pillow's decoders release the GIL), for up-front checks
(``VQADataset.check_images``, the ``skip_bad_images`` setting).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from rvqa.errors import ImageLoadError, UsageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "find_unreadable_images",
    "image_key",
    "load_image",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest accepted image, in pixels (width × height): 40 megapixels.

Decoded, that is 120 MB of RGB bytes — far above any VQA / caption image (COCO
images are ≤ 640 × 640, ~0.4 MP) yet small enough that a corrupt or hostile
header cannot make a data loader allocate gigabytes. It is below PIL's own
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, ~89 MP), so by default
rvqa's limit is the one that applies. PIL's limit stays in force as an upper
bound even when a larger ``max_pixels`` (or ``None``) is passed.
"""

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_OPEN_LOCK = threading.Lock()  # see _load_path
_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class _ImageTooLarge(UsageError):
    """Raised by the size checks (kept apart from decoder errors); ``reason``: in a few words."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class _UnsupportedMode(ValueError):
    """Raised by :func:`_to_rgb` for a mode PIL cannot convert to RGB."""

    def __init__(self, mode: str):
        super().__init__(mode)
        self.mode = mode


def load_image(image: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image as a fully decoded RGB PIL image.

    Args:
        image: A file path (``str`` or ``os.PathLike``), a PIL image (any mode; it
            is loaded if it was opened lazily, and returned unchanged when it is
            already RGB), or a ``uint8`` numpy array of shape ``(H, W)``,
            ``(H, W, 1)``, ``(H, W, 3)`` (RGB) or ``(H, W, 4)`` (RGBA).
        max_pixels: Refuse images with more than this many pixels (width ×
            height), checked from the file header before any pixel is decoded.
            ``None`` disables rvqa's limit (PIL's ~89 MP bomb limit still applies).
            See :data:`DEFAULT_MAX_PIXELS`.

    Returns:
        An RGB ``PIL.Image.Image`` whose pixels are in memory (no open file).

    Raises:
        ImageLoadError: (a ``ValueError``) The file is missing, empty, truncated,
            not an image, or of an image mode with no conversion to RGB; the
            message names the file (and the mode).
        ValueError: The image is larger than ``max_pixels`` (message names the size
            and the limit), an array has the wrong shape, or a PIL image's mode has
            no conversion to RGB (naming the mode).
        TypeError: ``image`` is of an unsupported type, or an array is not uint8.
    """
    if isinstance(image, (str, os.PathLike)):
        return _load_path(image, max_pixels)
    if isinstance(image, Image.Image):
        _check_size(image.size, max_pixels, what="PIL image")
        image.load()
        try:
            return _to_rgb(image)
        except _UnsupportedMode as err:
            raise UsageError(
                f"PIL image of mode {err.mode!r} cannot be converted to RGB; convert it first "
                f"(supported: PIL's modes {', '.join(Image.MODES)})"
            ) from None
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    raise TypeError(
        f"load_image expects a file path, a PIL.Image.Image or a uint8 numpy array, "
        f"got {type(image).__module__}.{type(image).__qualname__}"
    )


def _check_size(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise _ImageTooLarge(
            f"{what} is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"max_pixels={max_pixels:,}; pass a larger max_pixels (or None) to load it",
            reason=f"too large: {width}x{height} pixels, above max_pixels={max_pixels:,}",
        )


def _load_path(path: str | os.PathLike, max_pixels: int | None) -> Image.Image:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError(path, "file not found")
    if not os.path.isfile(path):
        raise ImageLoadError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(path, "the file is empty (0 bytes)")
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # PIL warns (rather than raises) between MAX_IMAGE_PIXELS and twice that, in
            # Image.open. Warning filters are process-wide: one thread at a time changes
            # them (reading the header is quick; decoding runs in parallel, below).
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            _check_size(im.size, max_pixels, what=f"image {path!r}")
            im.load()
            rgb = _to_rgb(im)
            if rgb is im:  # leaving the with-block closes `im`: keep a copy
                rgb = im.copy()
    except _ImageTooLarge:
        raise
    except _UnsupportedMode as err:
        raise ImageLoadError(
            path, f"image mode {err.mode!r} has no conversion to RGB (not supported)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _ImageTooLarge(  # too large, not unreadable: a UsageError, not an ImageLoadError
            f"image {path!r} is above PIL's decompression-bomb limit "
            f"(PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS:,} pixels): {err}",
            reason=f"too large: above PIL's decompression-bomb limit ({err})",
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file PIL can identify") from None
    except (OSError, SyntaxError, EOFError) as err:
        # OSError: "image file is truncated", broken data streams; SyntaxError:
        # PIL's "broken PNG file" and friends.
        raise ImageLoadError(path, f"corrupt or truncated image data ({err})") from None
    except Exception as err:  # zlib.error, struct.error, ValueError ... from a decoder
        raise ImageLoadError(path, f"corrupt image data ({type(err).__name__}: {err})") from None
    return rgb


def _from_array(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    if array.dtype != np.uint8:
        raise TypeError(
            f"image array has dtype {array.dtype}, expected uint8 with values 0..255 "
            f"(e.g. convert floats in [0, 1] with (x * 255).round().astype(np.uint8))"
        )
    shape = array.shape
    ok = (array.ndim == 2) or (array.ndim == 3 and shape[2] in (1, 3, 4))
    if not ok or array.size == 0:
        raise UsageError(
            f"image array has shape {shape}, expected (H, W) grayscale, (H, W, 3) RGB or "
            f"(H, W, 4) RGBA with H, W > 0 (channels last)"
        )
    _check_size((shape[1], shape[0]), max_pixels, what="image array")
    if array.ndim == 3 and shape[2] == 1:
        array = array[:, :, 0]
    array = np.ascontiguousarray(array)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.ndim if array.ndim == 2 else shape[2]]
    return _to_rgb(Image.fromarray(array, mode=mode))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to RGB (see the module docstring)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in _INT_MODES:
        values = np.asarray(im).astype(np.int64)
        values = np.clip(values, 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(im, dtype=np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    try:
        if mode == "La":  # premultiplied: PIL converts it to LA only
            im, mode = im.convert("LA"), "LA"
        if mode in _ALPHA_MODES:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")
    except ValueError as err:  # "conversion from X to RGB not supported"
        if "conversion" not in str(err):
            raise
        raise _UnsupportedMode(mode) from None


def image_key(image: Any) -> Any:
    """A hashable key that is equal for the same image.

    Images given by path (``str`` or ``os.PathLike``) are the same image when the
    path is; an integer reference (a row of a ``datasets`` table) by its value;
    anything else (a PIL image, an array) by object identity.
    """
    if isinstance(image, (str, os.PathLike)):
        return ("path", os.fspath(image))
    if isinstance(image, int):
        return ("row", image)
    return ("obj", id(image))


def find_unreadable_images(
    images: Iterable[Any],
    *,
    total: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    num_threads: int | None = None,
    progress: bool | None = None,
) -> dict[int, str]:
    """Decode every image fully through :func:`load_image`, in a thread pool; say which fail.

    ``images`` is consumed lazily (a bounded number in flight), so a generator over
    a large data set keeps memory flat; each decoded image is dropped at once.

    Args:
        images: Image references as :func:`load_image` takes them (paths, PIL
            images); ``None`` (no image) is skipped.
        total: How many ``images`` has (for the progress bar), when known.
        max_pixels: As :func:`load_image`; a larger image counts as unreadable.
        num_threads: Decoding threads (default: ``min(32, CPUs + 4)``).
        progress: Show a tqdm progress bar (default: on the main process only, i.e.
            unless the ``RANK`` environment variable names another process).

    Returns:
        ``{position in images: reason}`` for every image that cannot be read
        (missing, empty, truncated, not an image, unsupported mode, too large).

    Raises:
        TypeError: An image reference of a type :func:`load_image` does not take.
    """
    threads = num_threads or min(32, (os.cpu_count() or 1) + 4)
    if progress is None:
        progress = os.environ.get("RANK", "0") == "0"
    bad: dict[int, str] = {}
    pending: deque = deque()

    def collect(keep: int) -> None:
        while len(pending) > keep:
            i, future = pending.popleft()
            reason = future.result()
            if reason is not None:
                bad[i] = reason
            bar.update()

    with (
        ThreadPoolExecutor(threads, thread_name_prefix="rvqa-image-check") as pool,
        tqdm(total=total, desc="checking images", unit="image", disable=not progress) as bar,
    ):
        for i, image in enumerate(images):
            pending.append((i, pool.submit(_unreadable_reason, image, max_pixels)))
            collect(4 * threads)
        collect(0)
    return bad


def _unreadable_reason(image: Any, max_pixels: int | None) -> str | None:
    """Why ``image`` cannot be loaded, in a few words (``None``: it loads, or there is none)."""
    if image is None:
        return None
    try:
        load_image(image, max_pixels)
    except ImageLoadError as err:
        return err.reason
    except _ImageTooLarge as err:
        return err.reason
    except UsageError as err:  # a PIL image of an unsupported mode
        return str(err)
    return None
