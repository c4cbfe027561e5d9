"""``rvqa serve``: the :class:`~rvqa.pipeline.RVQA` pipeline behind an HTTP API.

FastAPI + uvicorn (the optional extra ``rvqa[serve]``). Concurrent answer requests are
gathered by a :class:`MicroBatcher` into :meth:`RVQA.answer_batch` calls (a batch closes
at ``max_batch`` requests or ``max_wait_ms``); beyond ``max_queue`` waiting requests the
server answers 503 with ``Retry-After``. Index loads and swaps (``PUT`` / ``DELETE
/v1/indices/{name}``) need the admin token (``Authorization: Bearer ...``, compared in
constant time) and a folder under ``indices_root``; without a configured token they are
disabled. Uploads are checked before any pixel is decoded (size, then the image header's
pixel count: no decompression bomb). Nothing from a request is unpickled.

Endpoints: ``POST /v1/answer``, ``POST /v1/answer_batch``, ``POST /v1/retrieve``,
``GET /v1/indices``, ``PUT|DELETE /v1/indices/{name}``, ``GET /healthz``, ``GET /metrics``
(Prometheus text format), and FastAPI's ``/docs`` and ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from PIL import Image

from rvqa.errors import RVQAError, UnknownIndexError, UsageError
from rvqa.pipeline import RVQA

logger = logging.getLogger(__name__)

try:  # the optional extra: `pip install "rvqa[serve]"`
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
except ImportError as err:  # pragma: no cover - exercised where the extra is missing
    _MISSING: ImportError | None = err
else:
    _MISSING = None

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest image (width × height, read from its header) a request may send."""


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


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Upload bytes → an RGB image, refusing a decompression bomb before decoding pixels.

    Raises:
        ServeError: 415 not an image, 413 more than ``max_pixels`` pixels, 422 truncated
            or otherwise undecodable.
    """
    if not data:
        raise ServeError(422, "the image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Exception as err:  # PIL raises UnidentifiedImageError and others
        raise ServeError(415, f"not an image PIL can read: {err}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ServeError(
            413,
            f"image of {width}x{height} = {width * height} pixels is over the limit of "
            f"{max_pixels} pixels (refused before decoding)",
        )
    try:
        img.load()
        return img.convert("RGB")
    except Exception as err:  # truncated or corrupt pixel data
        raise ServeError(422, f"the image cannot be decoded ({img.format}): {err}") from None


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


def parse_index(value: str | None, model: RVQA) -> list[str] | None | object:
    """A form field → the ``index`` argument: absent = every loaded index, ``none`` = no
    retrieval, else comma-separated names (404 for an unknown one)."""
    from rvqa.pipeline import ALL_INDICES

    if value is None or value == "":
        return ALL_INDICES
    if value.strip().lower() == "none":
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
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
    def __init__(self, queued: int):
        super().__init__(
            503, f"the server is busy ({queued} requests waiting); retry", {"Retry-After": "1"}
        )


@dataclass
class _Job:
    image: Image.Image
    question: str
    top_k: int | None
    index: Any
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Gathers concurrent requests into :meth:`RVQA.answer_batch` calls.

    A batch closes when it holds ``max_batch`` requests or ``max_wait_ms`` after its first
    one arrived; requests with different ``top_k`` / ``index`` go into separate calls.
    ``max_batch=1`` answers one request per forward pass (batching off).
    """

    def __init__(
        self,
        model: RVQA,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Any = None,
    ):
        for name, v in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(max_wait_ms, (int, float)) or max_wait_ms < 0:
            raise UsageError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rvqa-batch")
        self._in_flight = 0

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Answer what is queued and in flight, then stop (graceful shutdown)."""
        if self._queue is not None:
            while not self._queue.empty() or self._in_flight:
                await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, image: Image.Image, question: str, top_k: int | None, index: Any):
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(self._queue.qsize())
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(image, question, top_k, index, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            self._in_flight += 1
            batch = [first]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                    self._in_flight += 1
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple, list[_Job]] = defaultdict(list)
            for job in batch:
                key = (job.top_k, tuple(job.index) if isinstance(job.index, list) else job.index)
                groups[key].append(job)
            for jobs in groups.values():
                try:
                    answers = await loop.run_in_executor(self._executor, self._answer, jobs)
                except Exception as err:  # the whole call failed: every job of it hears why
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(err)
                else:
                    for job, ans in zip(jobs, answers):
                        if not job.future.done():
                            job.future.set_result(ans)
                finally:
                    self._in_flight -= len(jobs)
            if self.on_batch is not None:
                self.on_batch(len(batch))

    def _answer(self, jobs: list[_Job]) -> list:
        head = jobs[0]
        return self.model.answer_batch(
            [j.image for j in jobs],
            [j.question for j in jobs],
            top_k=head.top_k,
            index=head.index,
            batch_size=max(len(jobs), 1),
        )


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
) -> Any:
    """The FastAPI app serving ``model`` (see the module docstring for the endpoints)."""
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
    batcher = MicroBatcher(
        model, max_batch, max_wait_ms, max_queue, on_batch=lambda n: batch_sizes.observe(n)
    )
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

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes + 64 * 1024:
            response = JSONResponse(
                {"error": f"the upload is over --max-upload-mb ({max_upload_mb:g} MB)"},
                status_code=413,
            )
        else:
            response = await call_next(request)
        route = request.scope.get("route")  # the template: /v1/indices/{name}, not each name
        endpoint = getattr(route, "path", "(unmatched)")
        requests.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - t0)
        queue_length.set(batcher.queued)
        return response

    async def _image(upload: Any) -> Image.Image:
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ServeError(413, f"the image is over --max-upload-mb ({max_upload_mb:g} MB)")
        return decode_image(data, max_pixels)

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
    ):
        q = check_question(question)
        k = parse_top_k(top_k)
        idx = parse_index(index, model)
        img = await _image(image)
        ans = await batcher.submit(img, q, k, idx)
        _count_searches([ans])
        return ans.to_dict()

    @app.post("/v1/answer_batch")
    async def answer_batch(
        images: Annotated[list[UploadFile], File()],
        questions: Annotated[list[str], Form()],
        top_k: Annotated[str | None, Form()] = None,
        index: Annotated[str | None, Form()] = None,
    ):
        if len(images) != len(questions):
            raise ServeError(422, f"got {len(images)} images but {len(questions)} questions")
        qs = [check_question(q) for q in questions]
        k = parse_top_k(top_k)
        idx = parse_index(index, model)
        imgs = [await _image(u) for u in images]
        answers = await asyncio.gather(*(batcher.submit(i, q, k, idx) for i, q in zip(imgs, qs)))
        _count_searches(answers)
        return {"answers": [a.to_dict() for a in answers]}

    @app.post("/v1/retrieve")
    async def retrieve(
        image: Annotated[UploadFile, File()],
        top_k: Annotated[str | None, Form()] = None,
        index: Annotated[str | None, Form()] = None,
    ):
        k = parse_top_k(top_k)
        idx = parse_index(index, model)
        img = await _image(image)
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, lambda: model.retrieve([img], k, idx))
        return {"evidence": [e._asdict() for e in found[0]]}

    @app.get("/v1/indices")
    async def indices():
        out = []
        for name, manifest in model.indices.items():
            entry = model.registry.get(name)
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
        try:
            body = await request.json()
        except Exception:
            body = None
        path = resolve_under_root(root, body.get("path") if isinstance(body, dict) else None)
        loop = asyncio.get_running_loop()
        try:  # swap: loaded and checked first; on failure the old index keeps serving
            await loop.run_in_executor(None, lambda: model.swap_index(path, name=name))
        except (FileNotFoundError, RVQAError) as err:
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

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "indices": list(model.registry.names), "queued": batcher.queued}

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
