"""``rvqa serve``: the :class:`~rvqa.pipeline.RVQA` pipeline behind an HTTP API.

FastAPI + uvicorn (the optional extra ``rvqa[serve]``). Concurrent answer requests are
gathered by a :class:`MicroBatcher` into :meth:`RVQA.answer_batch` calls on one model
thread (a batch takes what queued while the last one ran, then waits up to
``max_wait_ms`` for more, closing at ``max_batch``; no wait after a batch of one); beyond
``max_queue`` waiting requests, or ``max_queued_pixels`` decoded pixels, the server
answers 503 with ``Retry-After``. Index loads and swaps (``PUT`` / ``DELETE
/v1/indices/{name}``) need the admin token (``Authorization: Bearer ...``, compared in
constant time) and a folder under ``indices_root``; without a configured token they are
disabled. Uploads are checked before any pixel is decoded (size, then the image header's
pixel count: no decompression bomb). Nothing from a request is unpickled. With a
re-ranker loaded, the answer and retrieve endpoints take ``rerank`` (each index's top N
re-ordered by it before the best ``top_k`` are read; at most ``max_rerank``; ignored
with ``index=none``, which retrieves nothing).

Endpoints: ``POST /v1/answer``, ``POST /v1/answer_batch``, ``POST /v1/retrieve``,
``GET /v1/indices``, ``PUT|DELETE /v1/indices/{name}``, ``GET /healthz``, ``GET /metrics``
(Prometheus text format), and FastAPI's ``/docs`` and ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from PIL import Image, PngImagePlugin

from rvqa.errors import RVQAError, UnknownIndexError, UsageError
from rvqa.pipeline import ALL_INDICES, RVQA

logger = logging.getLogger(__name__)

try:  # the optional extra: `pip install "rvqa[serve]"`
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as err:  # pragma: no cover - exercised where the extra is missing
    _MISSING: ImportError | None = err
else:
    _MISSING = None

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest image (width × height, read from its header) a request may send."""
INLINE_DECODE_BYTES, INLINE_DECODE_PIXELS = 256 * 1024, 256 * 256
INLINE_DECODE_FORMATS = ("PNG", "GIF", "BMP")
"""Uploads up to this size, pixels and format are decoded on the event loop (about a
millisecond at most, bounded by the pixels: no progressive-JPEG scan bomb), sparing the
two thread hops that spread a burst's requests apart and split batches (a run of 13fac89
measured mean batches of 4.7 at 8 clients and 15.9 at 32 instead of 8 and 32)."""
DEFAULT_MAX_QUEUED_PIXELS = 256 * 1024 * 1024
"""Decoded pixels the requests not answered yet may hold (768 MB as RGB)."""
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
"""Image formats an upload may have."""
INDEX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Names ``PUT /v1/indices/{name}`` accepts (the ``index`` form field splits on commas)."""


class ServeError(RVQAError):
    """A request the server refuses: ``status`` is the HTTP status, the message its body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def require_serve_extra() -> None:
    """Raise a clear error when FastAPI / uvicorn / prometheus_client are not installed."""
    if _MISSING is not None:
        raise UsageError(
            f"rvqa serve needs the serve extra ({_MISSING.name} is missing): "
            'pip install "rvqa[serve]"'
        )


def _too_large(err: Exception) -> bool:
    """Pillow's PNG text limits (:data:`PNG_TEXT_LIMITS`) speak through ValueError."""
    text = str(err).lower()
    return isinstance(err, ValueError) and ("too large" in text or "too much memory" in text)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Upload bytes → an image whose header is read and checked, no pixel decoded yet.

    Raises:
        ServeError: 422 empty, 415 not an image of a supported format, 413 more than
            ``max_pixels`` pixels (a decompression bomb is refused here).
    """
    if not data:
        raise ServeError(422, "the image is empty (0 bytes)")
    try:  # reads the header only; formats: no EPS (Ghostscript) and friends
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as err:  # PIL's own limit (~179 MP), also a bomb
        raise ServeError(413, f"image refused before decoding: {err}") from None
    except Exception as err:  # PIL raises UnidentifiedImageError and others
        if _too_large(err):  # PNG text chunks over PNG_TEXT_LIMITS: a text bomb
            raise ServeError(413, f"image refused: {err}") from None
        raise ServeError(
            415, f"not an image of a supported format ({', '.join(IMAGE_FORMATS)}): {err}"
        ) from None
    width, height = img.size
    if width * height > max_pixels:
        raise ServeError(
            413,
            f"image of {width}x{height} = {width * height} pixels is over the limit of "
            f"{max_pixels} pixels (refused before decoding)",
        )
    return img


def finish_image(img: Image.Image) -> Image.Image:
    """Decode an :func:`open_image` image's pixels → RGB (its metadata dropped). 422 when
    truncated or corrupt."""
    try:
        img.load()
        # a new plain image: the opened one holds the upload's bytes and its chunks
        rgb = img.convert("RGB") if img.mode != "RGB" else img.copy()
    except Exception as err:  # truncated or corrupt pixel data, text after the pixels
        if _too_large(err):
            raise ServeError(413, f"image refused: {err}") from None
        raise ServeError(422, f"the image cannot be decoded ({img.format}): {err}") from None
    finally:
        img.close()
    rgb.info = {}  # e.g. PNG text chunks: not needed to answer
    return rgb


PNG_TEXT_LIMITS = (1024 * 1024, 256 * 1024)
"""Pillow's ``PngImagePlugin.MAX_TEXT_CHUNK`` / ``MAX_TEXT_MEMORY`` (default 1 MB / 64 MB)
as :func:`create_app` sets them for the process: PNG text chunks are decompressed when
the header is read, so an upload of about 64 KB could otherwise hold 64 MB of text. The
chunk limit stays Pillow's (it also bounds ICC profiles); the text held is 256 KB."""


def parse_top_k(value: str | None) -> int | None:
    """A form field → ``top_k`` (None when absent). 422 for a non-integer or < 1."""
    if value is None or value == "":
        return None
    try:
        k = int(value)
    except ValueError:
        raise ServeError(422, f"top_k must be an integer, got {value!r}") from None
    if k < 1:
        raise ServeError(422, f"top_k must be at least 1, got {k}")
    return k


DEFAULT_MAX_RERANK = 100
"""Largest ``rerank`` a request may ask for (the re-ranker's work grows with it)."""


def parse_rerank(
    value: str | None, model: RVQA, top_k: int | None, max_rerank: int = DEFAULT_MAX_RERANK
) -> int | None:
    """A form field → ``rerank`` (None when absent, empty or 0: no re-ranking). 422 for a
    non-integer, a negative one, one over ``max_rerank``, one below the captions read
    (``top_k``, or the model's default), or when no re-ranker is loaded."""
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError:
        raise ServeError(422, f"rerank must be an integer, got {value!r}") from None
    if n == 0:
        return None
    if n < 0:
        raise ServeError(422, f"rerank must be 0 (off) or at least top_k, got {n}")
    if n > max_rerank:
        raise ServeError(422, f"rerank must be at most {max_rerank} (--max-rerank), got {n}")
    if model.reranker is None:
        raise ServeError(
            422,
            "rerank needs a re-ranker and this server loaded none: train one with "
            "`rvqa train-reranker` (recorded in the run folder) or start `rvqa serve` "
            "with --reranker PATH",
        )
    k = model.default_top_k if top_k is None else top_k
    if n < k:
        raise ServeError(
            422, f"rerank={n} re-ranks fewer captions than top_k={k} are read; use rerank ≥ {k}"
        )
    return n


def parse_index(value: str | None, model: RVQA) -> list[str] | None | object:
    """A form field → the ``index`` argument: absent = every loaded index, ``none`` = no
    retrieval, else comma-separated names (404 for an unknown one)."""
    if value is None or value == "":
        return ALL_INDICES
    if value.strip().lower() == "none":
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ServeError(422, f"index {value!r} names no index (use 'none' for no retrieval)")
    for n in names:
        if n not in model.registry:
            known = ", ".join(model.registry.names) or "none loaded"
            raise ServeError(404, f"unknown index {n!r} (loaded: {known})")
    return names


def check_question(question: str | None) -> str:
    if question is None or not question.strip():
        raise ServeError(422, "question is missing or empty")
    return question


class Overloaded(ServeError):
    def __init__(self, why: str):
        super().__init__(503, f"the server is busy ({why}); retry", {"Retry-After": "1"})


@dataclass
class _Job:
    image: Any  # decoded (RGB); dropped once its batch ran
    question: str
    top_k: int | None
    index: Any
    future: asyncio.Future = field(repr=False)
    pixels: int = 0  # held in the pixel budget until the job is settled
    rerank: int | None = None


class MicroBatcher:
    """Gathers concurrent requests into :meth:`RVQA.answer_batch` calls.

    A batch takes every request queued when it starts (they arrived while the model was
    busy), then waits for more until it holds ``max_batch`` requests or ``max_wait_ms``
    after it took its first one; after a batch of one (a lone client) it does not wait,
    so a lone client pays no batching delay. Requests with different ``top_k`` /
    ``index`` / ``rerank`` go into separate calls. ``max_batch=1`` answers one request per forward
    pass (batching off). The model runs on one worker thread, which :meth:`run` shares
    for other blocking model calls.

    Bounds (beyond them :class:`Overloaded`, a 503): at most ``max_queue`` requests wait,
    and the images of waiting and running requests hold at most ``max_pixels`` decoded
    pixels (:meth:`hold_pixels` before decoding, released when the request is answered).
    """

    def __init__(
        self,
        model: Any,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Any = None,
        max_pixels: int = DEFAULT_MAX_QUEUED_PIXELS,
    ):
        for name, v in (
            ("max_batch", max_batch),
            ("max_queue", max_queue),
            ("max_pixels", max_pixels),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(max_wait_ms, (int, float)) or max_wait_ms < 0:
            raise UsageError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_pixels = max_pixels
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight = 0
        self._last_batch = 1
        self._side = 0  # other model calls (retrieve) running or waiting
        self._pixels = 0  # decoded pixels held by requests not answered yet

    @property
    def queued(self) -> int:
        return (self._queue.qsize() if self._queue is not None else 0) + self._side

    @property
    def in_flight(self) -> int:
        """Requests taken into a batch and not answered yet."""
        return self._in_flight

    @property
    def pixels(self) -> int:
        """Decoded pixels held by requests not answered yet."""
        return self._pixels

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rvqa-model")
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._died)

    def _settle(self, job: _Job, result: Any = None, error: BaseException | None = None) -> None:
        """Answer (or fail) a job once, and release its pixels and image."""
        if not job.future.done():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        self.release_pixels(job.pixels)
        job.pixels, job.image = 0, None

    def _died(self, task: asyncio.Task) -> None:
        """The batch loop ended (stopped, or a bug): no waiting request hangs."""
        if not task.cancelled() and task.exception() is not None:
            logger.error("the batch loop stopped: %r", task.exception())
        while self._queue is not None and not self._queue.empty():
            self._settle(
                self._queue.get_nowait(), error=ServeError(503, "the server is shutting down")
            )

    async def stop(self, timeout: float = 60.0) -> None:
        """Answer what is queued and in flight (up to ``timeout`` seconds), then stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.alive and (self.queued or self._in_flight) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:  # a model call still running is not waited for
            self._executor.shutdown(wait=False, cancel_futures=True)

    def reserve(self, n: int = 1) -> None:
        """Raise :class:`Overloaded` unless ``n`` more requests fit the queue."""
        if not self.alive:
            raise ServeError(503, "the server is not answering (its batch loop stopped)")
        if self.queued + n > self.max_queue:
            raise Overloaded(f"{self.queued} requests waiting")

    def hold_pixels(self, n: int) -> None:
        """Count ``n`` decoded pixels against ``max_pixels`` (:class:`Overloaded` when they
        do not fit; one image always fits an empty budget)."""
        if self._pixels and self._pixels + n > self.max_pixels:
            raise Overloaded(f"{self._pixels} decoded pixels waiting")
        self._pixels += n

    def release_pixels(self, n: int) -> None:
        self._pixels = max(self._pixels - n, 0)

    def enqueue(
        self,
        image: Any,
        question: str,
        top_k: int | None,
        index: Any,
        pixels: int = 0,
        rerank: int | None = None,
    ) -> asyncio.Future:
        """Queue one request whose ``pixels`` are held already (released when it is
        answered, or now if it does not fit the queue). No await between :meth:`reserve`
        and this keeps the bound."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        try:
            self.reserve(1)
        except ServeError:
            self.release_pixels(pixels)
            raise
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(image, question, top_k, index, fut, pixels, rerank))
        return fut

    async def submit(
        self,
        image: Any,
        question: str,
        top_k: int | None,
        index: Any,
        pixels: int = 0,
        rerank: int | None = None,
    ):
        """:meth:`enqueue`, awaited: the request's answer."""
        return await self.enqueue(image, question, top_k, index, pixels, rerank)

    async def run(self, fn: Any, pixels: int = 0) -> Any:
        """Run another blocking model call on the model's thread, counted in the queue
        (with the ``pixels`` it holds) until the call has finished or was dropped
        unstarted: a caller that goes away (a client disconnecting) does not uncount
        a call the model thread still runs."""
        try:
            self.reserve(1)
        except ServeError:
            self.release_pixels(pixels)
            raise
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        self._side += 1

        def finished() -> None:
            self._side -= 1
            self.release_pixels(pixels)

        def on_done(_: Any) -> None:
            try:
                loop.call_soon_threadsafe(finished)
            except RuntimeError:  # the loop has closed (shut down): nothing left to count
                pass

        job = self._executor.submit(fn)
        job.add_done_callback(on_done)
        return await asyncio.wrap_future(job)

    async def _run(self) -> None:
        batch: list[_Job] = []
        try:
            await self._loop(batch)
        finally:  # stopped or crashed mid-batch: no taken request waits forever
            for job in batch:
                self._settle(job, error=ServeError(503, "the server is shutting down"))

    async def _take(self, batch: list[_Job]) -> None:
        """Fill ``batch``: the first request (waited for), what queued meanwhile, then more
        until ``max_batch`` or the deadline (none after a batch of one)."""
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        batch.append(await self._queue.get())
        self._in_flight += 1
        deadline = loop.time() + (self.max_wait if self._last_batch > 1 else 0.0)
        while len(batch) < self.max_batch:
            try:  # what queued while the last batch ran joins at once, wait or not
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
            batch.append(job)
            self._in_flight += 1
        self._last_batch = len(batch)

    async def _loop(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch.clear()
            await self._take(batch)
            groups: dict[tuple, list[_Job]] = defaultdict(list)
            for job in batch:
                index = tuple(job.index) if isinstance(job.index, list) else job.index
                key = (job.top_k, index, job.rerank)
                groups[key].append(job)
            for jobs in groups.values():
                try:
                    answers = await loop.run_in_executor(self._executor, self._answer, jobs)
                    for job, ans in zip(jobs, answers):
                        self._settle(job, result=ans)
                except asyncio.CancelledError:
                    raise
                except BaseException as err:  # noqa: BLE001 - every job of the call hears why
                    if not isinstance(err, RVQAError):  # a bug: its traceback logged here
                        logger.error("answer_batch failed", exc_info=err)
                    # shared without its traceback: its frames hold the whole batch's images
                    shown = err if isinstance(err, Exception) else RuntimeError(repr(err))
                    shown = shown.with_traceback(None)
                    for job in jobs:
                        self._settle(job, error=shown)
                    del shown
                finally:
                    self._in_flight -= len(jobs)
                if self.on_batch is not None:
                    try:
                        self.on_batch(len(jobs))
                    except Exception:  # a metrics hook never stops answering
                        logger.exception("on_batch failed")
            # no reference to the last batch while waiting for the next
            groups = jobs = job = answers = None  # type: ignore[assignment]

    def _answer(self, jobs: list[_Job]) -> list:
        head = jobs[0]
        return self.model.answer_batch(
            [j.image for j in jobs],
            [j.question for j in jobs],
            top_k=head.top_k,
            index=head.index,
            batch_size=len(jobs),
            rerank=head.rerank,
        )


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, whether it declares its
    length (refused before reading) or arrives chunked (reading stops at the limit)."""

    def __init__(self, app: Any, max_bytes: int, max_upload_mb: float):
        self.app = app
        self.max_bytes = max_bytes
        # multipart framing around the image: a little room over the image's own limit
        self.limit = max_bytes + 64 * 1024
        self.message = f"the upload is over --max-upload-mb ({max_upload_mb:g} MB)"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await JSONResponse({"error": self.message}, status_code=413)(scope, receive, send)
            return
        seen = 0
        refused = False

        async def limited() -> dict:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # answer 413 now; the app sees the client leave
                    refused = True
                    await JSONResponse({"error": self.message}, status_code=413)(
                        scope, receive, send
                    )
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:  # after the 413, nothing the app says goes out
                await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not refused:
                raise
            logger.debug("after a 413, the app's own error", exc_info=True)


class Metrics:
    """ASGI middleware: counts every request by route template (``/v1/indices/{name}``,
    not each name) and status, and observes its latency; an exception the app did not
    answer is logged with its traceback and answered as a JSON 500 (counted).

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware``
    costs a task group and memory streams per request.
    """

    def __init__(self, app: Any, requests: Any, latency: Any, after: Any = None):
        self.app, self.requests, self.latency, self.after = app, requests, latency, after

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status: int | None = None  # set when the response starts

        async def measured_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, measured_send)
        except Exception:
            logger.exception("error answering %s %s", scope.get("method"), scope.get("path"))
            if status is not None:  # the response is half sent: nothing better than closing it
                raise
            await JSONResponse({"error": "internal server error"}, status_code=500)(
                scope, receive, measured_send
            )
        finally:
            endpoint = getattr(scope.get("route"), "path", "(unmatched)")
            self.requests.labels(endpoint, str(status or 500)).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - t0)
            if self.after is not None:
                self.after()


def _check_token(request: Any, token: str | None) -> None:
    if token is None:
        raise ServeError(
            403,
            "index management is disabled: start the server with --admin-token-file FILE "
            "or the RVQA_ADMIN_TOKEN environment variable",
        )
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer "):
        raise ServeError(401, "index management needs 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(header[len("Bearer ") :].encode(), token.encode()):
        raise ServeError(403, "wrong admin token")


def resolve_under_root(root: Path | None, given: Any) -> Path:
    """An index folder named by a request, confined to ``root`` (symlinks resolved)."""
    if root is None:
        raise ServeError(403, "no --indices-root configured: index folders cannot be loaded")
    if not isinstance(given, str) or not given.strip():
        raise ServeError(422, 'the body must be JSON {"path": "<index folder under the root>"}')
    if "\x00" in given:
        raise ServeError(422, "path contains a NUL character")
    if Path(given).is_absolute():
        raise ServeError(403, f"path {given!r} is absolute; give a folder relative to the root")
    target = (root / given).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ServeError(403, f"path {given!r} leads outside the indices root")
    if not target.is_dir():
        raise ServeError(404, f"no index folder {given!r} under the indices root")
    return target


def create_app(
    model: RVQA,
    *,
    indices_root: str | Path | None = None,
    admin_token: str | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_queue: int = 256,
    max_upload_mb: float = 10.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_queued_pixels: int = DEFAULT_MAX_QUEUED_PIXELS,
    max_rerank: int = DEFAULT_MAX_RERANK,
) -> Any:
    """The FastAPI app serving ``model`` (see the module docstring for the endpoints).

    ``max_pixels`` bounds one image (413 above), ``max_queued_pixels`` the decoded images
    of all requests not answered yet (503 above), ``max_rerank`` the ``rerank`` a request
    may ask for (422 above; its model's re-ranker, :attr:`RVQA.reranker`, answers it). Sets Pillow's PNG text limits for the
    process (:data:`PNG_TEXT_LIMITS`).
    """
    require_serve_extra()
    root = Path(indices_root).resolve() if indices_root is not None else None
    max_bytes = int(max_upload_mb * 1024 * 1024)
    registry = CollectorRegistry()
    requests = Counter(
        "rvqa_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry
    )
    latency = Histogram("rvqa_request_seconds", "request latency", ["endpoint"], registry=registry)
    batch_sizes = Histogram(
        "rvqa_batch_size",
        "requests per answer_batch call",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        registry=registry,
    )
    queue_length = Gauge("rvqa_queue_length", "requests waiting", registry=registry)
    searches = Counter(
        "rvqa_index_searches_total", "answers that searched an index", ["index"], registry=registry
    )
    reranked = Counter(
        "rvqa_reranked_total",
        "answers and retrievals whose evidence the re-ranker ordered (rerank=N)",
        ["endpoint"],
        registry=registry,
    )
    if not isinstance(max_upload_mb, (int, float)) or max_upload_mb <= 0:
        raise UsageError(f"max_upload_mb must be a positive number, got {max_upload_mb!r}")
    if isinstance(max_rerank, bool) or not isinstance(max_rerank, int) or max_rerank < 1:
        raise UsageError(f"max_rerank must be a positive integer, got {max_rerank!r}")
    batcher = MicroBatcher(
        model,
        max_batch,
        max_wait_ms,
        max_queue,
        on_batch=lambda n: batch_sizes.observe(n),
        max_pixels=max_queued_pixels,
    )
    PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_LIMITS
    loaded_at = {n: time.time() for n in model.registry.names}

    @asynccontextmanager
    async def lifespan(app: Any):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="rvqa", version=_version(), lifespan=lifespan)
    app.state.batcher = batcher
    app.state.model = model

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError):
        return JSONResponse({"error": str(err)}, status_code=err.status, headers=err.headers)

    @app.exception_handler(UnknownIndexError)
    async def _unknown(request: Request, err: UnknownIndexError):
        return JSONResponse({"error": str(err).strip("'\"")}, status_code=404)

    @app.exception_handler(UsageError)
    async def _usage(request: Request, err: UsageError):
        return JSONResponse({"error": str(err)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body')}: {e.get('msg')}"
            for e in err.errors()
        )
        return JSONResponse({"error": problems or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    # added first, so it runs inside Metrics: its 413s are counted too
    app.add_middleware(BodyLimit, max_bytes=max_bytes, max_upload_mb=max_upload_mb)
    app.add_middleware(
        Metrics, requests=requests, latency=latency, after=lambda: queue_length.set(batcher.queued)
    )

    async def _open(upload: Any) -> Image.Image:
        """The upload checked: its size, then its header (413 / 415); no pixel decoded."""
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ServeError(413, f"the image is over --max-upload-mb ({max_upload_mb:g} MB)")
        if len(data) <= INLINE_DECODE_BYTES:
            return open_image(data, max_pixels)
        return await asyncio.to_thread(open_image, data, max_pixels)

    async def _decode(header: Image.Image) -> Image.Image:
        """RGB pixels (422 when corrupt): off the event loop, except a small PNG/GIF/BMP."""
        if (
            header.format in INLINE_DECODE_FORMATS
            and header.width * header.height <= INLINE_DECODE_PIXELS
        ):
            return finish_image(header)
        return await asyncio.to_thread(finish_image, header)

    async def _image(upload: Any) -> tuple[Image.Image, int]:
        """``(RGB image, pixels)``: checked, its pixels held in the batcher's budget (503
        when full), decoded. The caller hands the pixels to the job (or releases them)."""
        header = await _open(upload)
        pixels = header.width * header.height
        batcher.hold_pixels(pixels)
        try:
            return await _decode(header), pixels
        except BaseException:
            batcher.release_pixels(pixels)
            raise

    def _count_searches(answers: list) -> None:
        for a in answers:
            for name in {e.index for e in a.evidence if e.index}:
                searches.labels(name).inc()

    @app.post("/v1/answer")
    async def answer(
        image: Annotated[UploadFile, File()],
        question: Annotated[str | None, Form()] = None,
        top_k: Annotated[str | None, Form()] = None,
        index: Annotated[str | None, Form()] = None,
        rerank: Annotated[str | None, Form()] = None,
    ):
        q = check_question(question)
        k = parse_top_k(top_k)
        idx = parse_index(index, model)
        n = parse_rerank(rerank, model, k, max_rerank) if idx is not None else None
        batcher.reserve(1)  # a full queue answers 503 before any pixel is decoded
        img, pixels = await _image(image)
        ans = await batcher.submit(img, q, k, idx, pixels, n)  # the job releases the pixels
        _count_searches([ans])
        if n:
            reranked.labels("/v1/answer").inc()
        return JSONResponse(ans.to_dict())  # already JSON types: no jsonable_encoder pass

    @app.post("/v1/answer_batch")
    async def answer_batch(
        images: Annotated[list[UploadFile], File()],
        questions: Annotated[list[str], Form()],
        top_k: Annotated[str | None, Form()] = None,
        index: Annotated[str | None, Form()] = None,
        rerank: Annotated[str | None, Form()] = None,
    ):
        if len(images) != len(questions):
            raise ServeError(422, f"got {len(images)} images but {len(questions)} questions")
        qs = [check_question(q) for q in questions]
        k = parse_top_k(top_k)
        idx = parse_index(index, model)
        n = parse_rerank(rerank, model, k, max_rerank) if idx is not None else None
        if len(images) > batcher.max_queue:
            raise ServeError(
                422,
                f"{len(images)} images in one request; at most {batcher.max_queue} (--max-queue)",
            )
        batcher.reserve(len(images))
        headers = []
        for i, upload in enumerate(images):
            try:
                headers.append(await _open(upload))
            except ServeError as err:  # its position named
                raise ServeError(err.status, f"image {i}: {err}", err.headers) from None
        sizes = [h.width * h.height for h in headers]
        if sum(sizes) > batcher.max_pixels:  # could never fit: not "busy, retry"
            raise ServeError(
                413,
                f"{len(images)} images of {sum(sizes)} pixels in all; at most "
                f"{batcher.max_pixels} (--max-queued-mpix)",
            )
        batcher.hold_pixels(sum(sizes))  # all or nothing
        decoded: list[tuple[Image.Image, int]] = []
        try:
            for i, (header, pixels) in enumerate(zip(headers, sizes)):
                try:
                    decoded.append((await _decode(header), pixels))
                except ServeError as err:
                    raise ServeError(err.status, f"image {i}: {err}", err.headers) from None
                await asyncio.sleep(0)  # let other requests in between the images
            batcher.reserve(len(images))  # again: others may have queued meanwhile
        except BaseException:
            batcher.release_pixels(sum(sizes))  # none queued: nothing else releases them
            raise
        del headers
        futures = [  # no await between the reserve and these
            batcher.enqueue(img, q, k, idx, pixels, n) for (img, pixels), q in zip(decoded, qs)
        ]
        del decoded
        answers = await asyncio.gather(*futures, return_exceptions=True)  # every one retrieved
        for a in answers:
            if isinstance(a, BaseException):
                raise a
        _count_searches(answers)
        if n:
            reranked.labels("/v1/answer_batch").inc(len(answers))
        return JSONResponse({"answers": [a.to_dict() for a in answers]})

    @app.post("/v1/retrieve")
    async def retrieve(
        image: Annotated[UploadFile, File()],
        top_k: Annotated[str | None, Form()] = None,
        index: Annotated[str | None, Form()] = None,
        rerank: Annotated[str | None, Form()] = None,
    ):
        k = parse_top_k(top_k)
        idx = parse_index(index, model)
        n = parse_rerank(rerank, model, k, max_rerank) if idx is not None else None
        batcher.reserve(1)
        img, pixels = await _image(image)
        # the call releases the pixels when it has run
        found = await batcher.run(lambda: model.retrieve([img], k, idx, rerank=n), pixels)
        if n:
            reranked.labels("/v1/retrieve").inc()
        return JSONResponse({"evidence": [e.to_dict() for e in found[0]]})

    @app.get("/v1/indices")
    async def indices():
        out = []
        for name, manifest in model.indices.items():
            try:
                entry = model.registry.get(name)
            except KeyError:  # unloaded by an admin meanwhile
                continue
            out.append(
                {
                    "name": name,
                    "path": str(Path(entry.path).resolve()),
                    "count": manifest.get("count"),
                    "factory": manifest.get("factory"),
                    "fingerprint": manifest.get("retriever_fingerprint"),
                    "loaded_at": _iso(loaded_at.get(name)),
                }
            )
        return out

    @app.put("/v1/indices/{name}")
    async def put_index(name: str, request: Request):
        _check_token(request, admin_token)
        if not INDEX_NAME.fullmatch(name) or name.lower() == "none":
            raise ServeError(
                422,
                f"index name {name!r}: letters, digits, '.', '_', '-' (not 'none'), "
                "starting with a letter or digit",
            )
        try:
            body = await request.json()
        except Exception:
            body = None
        path = resolve_under_root(root, body.get("path") if isinstance(body, dict) else None)
        loop = asyncio.get_running_loop()
        try:  # swap: loaded and checked first; on failure the old index keeps serving
            await loop.run_in_executor(None, lambda: model.swap_index(path, name=name))
        except (OSError, ValueError, RVQAError) as err:  # the old index keeps serving
            raise ServeError(422, f"index {name!r} not loaded from {path.name!r}: {err}") from None
        loaded_at[name] = time.time()
        return {"name": name, "path": str(path), "loaded": list(model.registry.names)}

    @app.delete("/v1/indices/{name}")
    async def delete_index(name: str, request: Request):
        _check_token(request, admin_token)
        if name not in model.registry:
            raise ServeError(404, f"unknown index {name!r}")
        model.unload_index(name)
        loaded_at.pop(name, None)
        return {"name": name, "loaded": list(model.registry.names)}

    page = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index_page():
        # one static file, no build step: upload, ask, evidence, and the admin swap
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz():
        if not batcher.alive:
            return JSONResponse(
                {"status": "down", "error": "the batch loop stopped"}, status_code=503
            )
        return {
            "status": "ok",
            "indices": list(model.registry.names),
            "reranker": model.reranker is not None,
            "max_rerank": max_rerank if model.reranker is not None else 0,
            "queued": batcher.queued,
            "in_flight": batcher.in_flight,
        }

    @app.get("/metrics")
    async def metrics():
        queue_length.set(batcher.queued)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _iso(t: float | None) -> str | None:
    """Seconds since the epoch → ISO 8601 in UTC."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from rvqa.version import __version__

    return __version__
