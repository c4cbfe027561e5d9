"""rvqa serve: the HTTP API over a tiny run (FastAPI's TestClient, no network)."""

from __future__ import annotations

import asyncio
import io
import itertools
import shutil
import threading
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from rvqa.pipeline import RVQA  # noqa: E402
from rvqa.server import (  # noqa: E402
    MicroBatcher,
    Overloaded,
    create_app,
)
from tests.tiny import draw_shape  # noqa: E402

TOKEN = "s3cret-token"


def png(color="red", shape="circle", size=32) -> bytes:
    buf = io.BytesIO()
    draw_shape(color, shape, size=size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(tiny_run):
    return RVQA.from_pretrained(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def root(model, tmp_path_factory):
    """An indices root holding a copy of the run's index (for PUT)."""
    root = tmp_path_factory.mktemp("indices")
    name = model.registry.names[0]
    shutil.copytree(model.registry.get(name).path, root / "copy")
    return root


@pytest.fixture()
def client(model, root):
    app = create_app(model, indices_root=root, admin_token=TOKEN, max_upload_mb=0.5)
    with TestClient(app) as c:
        yield c


def test_answer_agrees_with_the_python_api(client, model):
    from PIL import Image

    data = png("blue", "square")
    r = client.post(
        "/v1/answer", files={"image": ("s.png", data)}, data={"question": "what color is it?"}
    )
    assert r.status_code == 200, r.text
    want = model.answer(Image.open(io.BytesIO(data)).convert("RGB"), "what color is it?")
    got = r.json()
    assert got["answer"] == want.answer
    assert got["score"] == pytest.approx(want.score, abs=1e-6)
    assert [e["text"] for e in got["evidence"]] == [e.text for e in want.evidence]
    # top_k and index as form fields; index=none answers without retrieval
    r = client.post(
        "/v1/answer",
        files={"image": ("s.png", data)},
        data={"question": "what color is it?", "top_k": "1", "index": "none"},
    )
    assert r.status_code == 200 and r.json()["evidence"] == []


def test_batch_retrieve_indices_health_and_metrics(client, model):
    files = [("images", (f"{i}.png", png(c))) for i, c in enumerate(["red", "green", "blue"])]
    qs = {"questions": ["what color?", "what shape?", "is it red?"]}
    r = client.post("/v1/answer_batch", files=files, data=qs)
    assert r.status_code == 200, r.text
    assert [a["question"] for a in r.json()["answers"]] == [
        "what color?",
        "what shape?",
        "is it red?",
    ]

    r = client.post("/v1/retrieve", files={"image": ("r.png", png())}, data={"top_k": "2"})
    assert r.status_code == 200 and len(r.json()["evidence"]) == 2

    listed = client.get("/v1/indices").json()
    assert [e["name"] for e in listed] == model.registry.names
    assert set(listed[0]) == {"name", "path", "count", "factory", "fingerprint", "loaded_at"}
    assert listed[0]["fingerprint"] == model.retriever.fingerprint()
    assert listed[0]["loaded_at"].endswith("+00:00")  # ISO 8601, UTC

    assert client.get("/healthz").json()["status"] == "ok"
    text = client.get("/metrics").text
    assert 'rvqa_requests_total{endpoint="/v1/answer_batch",status="200"} 1.0' in text
    assert "rvqa_batch_size_count" in text and "rvqa_queue_length" in text
    assert "rvqa_index_searches_total" in text
    # metrics are labelled by route template, not by each path a client sends
    client.delete("/v1/indices/made-up-name")
    assert "made-up-name" not in client.get("/metrics").text
    assert 'endpoint="/v1/indices/{name}"' in client.get("/metrics").text
    assert client.get("/openapi.json").json()["info"]["title"] == "rvqa"


def test_bad_input_is_refused_and_the_server_keeps_serving(client, model):
    ok = {"image": ("s.png", png())}
    q = {"question": "what color is it?"}
    cases = [
        (({"image": ("x.png", b"not an image at all")}, q), 415, "not an image"),
        (({"image": ("t.png", png()[:60])}, q), 422, "cannot be decoded"),
        (({"image": ("e.png", b"")}, q), 422, "empty"),
        ((ok, {}), 422, "question is missing"),
        ((ok, {"question": "   "}), 422, "question is missing or empty"),
        ((ok, {**q, "index": "nope"}), 404, "unknown index 'nope'"),
        ((ok, {**q, "top_k": "two"}), 422, "top_k must be an integer"),
        ((ok, {**q, "top_k": "0"}), 422, "top_k must be at least 1"),
        (({"image": ("h.bin", b"\x89PNG" + b"0" * 600_000)}, q), 413, "max-upload-mb"),
    ]
    for (files, data), status, message in cases:
        r = client.post("/v1/answer", files=files, data=data)
        assert r.status_code == status, (message, r.status_code, r.text)
        assert message in r.json()["error"], r.json()
    r = client.post("/v1/answer", files=ok, data=q)
    assert r.status_code == 200 and r.json()["answer"]


def _png_header(width: int, height: int) -> bytes:
    """A small real PNG whose header claims width x height pixels (a decompression bomb's
    header): its IHDR rewritten, CRC recomputed."""
    import struct
    import zlib

    data = bytearray(png())
    data[16:24] = struct.pack(">II", width, height)  # IHDR: after signature, length, type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_more_bad_input(client):
    q = {"question": "what color is it?"}
    ok = {"image": ("s.png", png())}
    # a bomb's header: refused from the header, 413 (ours at 16.7 MP, PIL's own above ~179 MP)
    for w in (5000, 20000):
        r = client.post("/v1/answer", files={"image": ("b.png", _png_header(w, w))}, data=q)
        assert r.status_code == 413, r.text

    # a chunked upload (no Content-Length) over the limit is cut off with 413
    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    r = client.post(
        "/v1/answer", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 413 and "max-upload-mb" in r.json()["error"]
    # FastAPI's own validation (no image field) answers in the same JSON shape
    r = client.post("/v1/answer", data=q)
    assert r.status_code == 422 and "image" in r.json()["error"]
    r = client.post("/v1/answer", files=ok, data={**q, "index": ","})
    assert r.status_code == 422 and "names no index" in r.json()["error"]
    many = [("images", (f"{i}.png", png())) for i in range(3)]
    r = client.post("/v1/answer_batch", files=many, data={"questions": ["a?", "b?"]})
    assert r.status_code == 422 and "3 images but 2 questions" in r.json()["error"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for name in ("none", "a,b", ".hidden"):
        r = client.put(f"/v1/indices/{name}", json={"path": "copy"}, headers=auth)
        assert r.status_code == 422 and "index name" in r.json()["error"], name
    r = client.put("/v1/indices/x", json={"path": "co\x00py"}, headers=auth)
    assert r.status_code == 422 and "NUL" in r.json()["error"]
    assert client.post("/v1/answer", files=ok, data=q).status_code == 200


def test_a_png_text_bomb_is_refused(client, model):
    """PNG text chunks are decompressed with the header: a 1 MB zTXt chunk (a few KB
    uploaded) is refused (413) instead of held, and a good request still answers."""
    from PIL import PngImagePlugin

    from rvqa.server import PNG_TEXT_LIMITS

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "0" * (1024 * 1024), zip=True)
    buf = io.BytesIO()
    draw_shape("red", "circle").save(buf, format="PNG", pnginfo=info)
    assert len(buf.getvalue()) < 20_000
    assert (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY) == PNG_TEXT_LIMITS
    r = client.post(
        "/v1/answer", files={"image": ("t.png", buf.getvalue())}, data={"question": "color?"}
    )
    assert r.status_code == 413 and "too much memory" in r.json()["error"].lower(), r.text
    r = client.post("/v1/answer", files={"image": ("s.png", png())}, data={"question": "color?"})
    assert r.status_code == 200


def test_batch_over_the_queue_is_refused(model):
    with TestClient(create_app(model, max_queue=2)) as c:
        many = [("images", (f"{i}.png", png())) for i in range(3)]
        r = c.post("/v1/answer_batch", files=many, data={"questions": ["a?", "b?", "c?"]})
        assert r.status_code == 422 and "at most 2" in r.json()["error"]
        two = many[:2]
        r = c.post("/v1/answer_batch", files=two, data={"questions": ["a?", "b?"]})
        assert r.status_code == 200 and len(r.json()["answers"]) == 2


def test_pixel_limit_applies_before_decoding(model):
    app = create_app(model, max_pixels=16 * 16)
    with TestClient(app) as c:
        r = c.post("/v1/answer", files={"image": ("s.png", png())}, data={"question": "what?"})
    assert r.status_code == 413 and "32x32 = 1024 pixels" in r.json()["error"]


def test_index_management_needs_the_token_and_stays_under_the_root(client, model, root, tmp_path):
    name = model.registry.names[0]
    body = {"path": "copy"}
    assert client.put("/v1/indices/extra", json=body).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert client.put("/v1/indices/extra", json=body, headers=bad).status_code == 403
    auth = {"Authorization": f"Bearer {TOKEN}"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if not (root / "link").is_symlink():
        (root / "link").symlink_to(outside)
    for path, status in (("../x", 403), (str(outside), 403), ("link", 403), ("missing", 404)):
        r = client.put("/v1/indices/extra", json={"path": path}, headers=auth)
        assert r.status_code == status, (path, r.text)
    r = client.put("/v1/indices/extra", json=body, headers=auth)
    assert r.status_code == 200, r.text
    assert [e["name"] for e in client.get("/v1/indices").json()] == [name, "extra"]
    r = client.post(
        "/v1/answer",
        files={"image": ("s.png", png())},
        data={"question": "what color is it?", "index": "extra"},
    )
    assert r.status_code == 200 and {e["index"] for e in r.json()["evidence"]} == {"extra"}
    assert client.delete("/v1/indices/extra", headers=auth).status_code == 200
    assert client.delete("/v1/indices/extra", headers=auth).status_code == 404
    assert [e["name"] for e in client.get("/v1/indices").json()] == [name]


def test_a_failed_swap_leaves_the_old_index_serving(client, model, root):
    name = model.registry.names[0]
    (root / "not-an-index").mkdir(exist_ok=True)
    (root / "not-an-index" / "manifest.json").write_text("{ broken")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.put(f"/v1/indices/{name}", json={"path": "not-an-index"}, headers=auth)
    assert r.status_code == 422 and "not loaded" in r.json()["error"], r.text
    r = client.post(
        "/v1/answer", files={"image": ("s.png", png())}, data={"question": "what color?"}
    )
    assert r.status_code == 200 and {e["index"] for e in r.json()["evidence"]} == {name}
    assert [e["name"] for e in client.get("/v1/indices").json()] == [name]


def test_index_management_is_disabled_without_a_token(model):
    with TestClient(create_app(model)) as c:
        r = c.put("/v1/indices/x", json={"path": "copy"}, headers={"Authorization": "Bearer a"})
    assert r.status_code == 403 and "RVQA_ADMIN_TOKEN" in r.json()["error"]


class _CountingModel:
    """answer_batch records its batch sizes; can be held until released."""

    def __init__(self, model, hold: threading.Event | None = None):
        self.model, self.hold, self.calls = model, hold, []

    def answer_batch(self, images, questions, **kw):
        if self.hold is not None:
            self.hold.wait(120)
        self.calls.append(len(images))
        return self.model.answer_batch(images, questions, **kw)


def test_concurrent_requests_share_one_reader_batch(model):
    counting = _CountingModel(model)
    images = [draw_shape(c, "circle") for c in ("red", "green", "blue", "yellow")] * 2
    questions = [f"question {i}?" for i in range(len(images))]

    async def main():
        b = MicroBatcher(counting, max_batch=8, max_wait_ms=200)
        b.start()
        out = await asyncio.gather(*(b.submit(i, q, None, None) for i, q in zip(images, questions)))
        await b.stop()
        return out

    answers = asyncio.run(main())
    assert counting.calls == [8]  # one forward for 8 concurrent requests
    one_by_one = [model.answer(i, q, index=None) for i, q in zip(images, questions)]
    assert [a.answer for a in answers] == [a.answer for a in one_by_one]


def test_a_lone_request_does_not_wait_but_concurrent_ones_do(model):
    """After a batch of one, a request goes at once (no --max-wait-ms delay for a lone
    client); after a batch of several, the next batch waits for company."""
    import time

    counting = _CountingModel(model)
    image = draw_shape("red", "circle")

    async def main():
        b = MicroBatcher(counting, max_batch=2, max_wait_ms=5000)
        b.start()
        t0 = time.perf_counter()
        await b.submit(image, "lone?", None, None)
        lone = time.perf_counter() - t0
        await asyncio.gather(*(b.submit(image, f"q{i}?", None, None) for i in range(2)))
        first = asyncio.ensure_future(b.submit(image, "a?", None, None))
        await asyncio.sleep(0.3)  # the batch waits for company (the last one held 2)
        assert counting.calls == [1, 2] and b.in_flight == 1
        await asyncio.gather(first, b.submit(image, "b?", None, None))  # closes at max_batch
        await b.stop()
        return lone

    lone = asyncio.run(main())
    assert lone < 2.5  # well below the 5 s wait
    assert counting.calls == [1, 2, 2]


def test_a_failed_batch_lets_its_images_go():
    """The error a failed batch shares carries no traceback (whose frames would hold the
    batch's images), and the images are released with the pixels."""
    import gc
    import weakref

    from rvqa.errors import UsageError

    class Failing:
        def answer_batch(self, images, questions, **kw):
            raise UsageError("no such index")

    images = [draw_shape(c, "circle") for c in ("red", "green")]
    refs = [weakref.ref(i) for i in images]

    async def main():
        b = MicroBatcher(Failing(), max_batch=8, max_wait_ms=100)
        b.start()
        for img in images:
            b.hold_pixels(img.width * img.height)
        futures = [b.enqueue(img, "q?", None, None, img.width * img.height) for img in images]
        images.clear()
        del img  # the hold loop's last one
        out = await asyncio.gather(*futures, return_exceptions=True)
        assert [type(e) for e in out] == [UsageError, UsageError]
        assert out[0].__traceback__ is None
        del out, futures
        gc.collect()
        alive = [r() is not None for r in refs]
        pixels = b.pixels
        await b.stop()
        return alive, pixels

    assert asyncio.run(main()) == ([False, False], 0)


def test_a_full_queue_answers_503_and_nothing_hangs(model):
    hold = threading.Event()
    slow = _CountingModel(model, hold)
    image = draw_shape("red", "circle")

    async def main():
        b = MicroBatcher(slow, max_batch=1, max_wait_ms=0, max_queue=1)
        b.start()
        first = asyncio.ensure_future(b.submit(image, "a?", None, None))
        await asyncio.sleep(0.1)  # taken by the batch loop, held in answer_batch
        second = asyncio.ensure_future(b.submit(image, "b?", None, None))
        await asyncio.sleep(0.05)  # waiting in the queue
        with pytest.raises(Overloaded, match="busy") as err:
            await b.submit(image, "c?", None, None)
        assert err.value.status == 503 and err.value.headers == {"Retry-After": "1"}
        hold.set()
        done = await asyncio.wait_for(asyncio.gather(first, second), 10)
        await b.stop()
        return done

    assert len(asyncio.run(main())) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(app):
    """``app`` on a real port (uvicorn in a thread); yields its URL."""
    import time

    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture()
def live_server(model, root):
    """The app on a real port, for the browser and the load tests."""
    with _serving(create_app(model, indices_root=root, admin_token=TOKEN)) as url:
        yield url


def _wait_until(condition, timeout: float = 20.0, what: str = "a condition") -> None:
    import time

    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_overload_over_http_answers_503_with_retry_after(model):
    """Beyond --max-queue: 503 + Retry-After over a real socket; the held ones finish."""
    import httpx

    hold = threading.Event()
    app = create_app(model, max_batch=1, max_wait_ms=0, max_queue=1)
    batcher = app.state.batcher
    batcher.model = _CountingModel(model, hold)
    got: dict[str, httpx.Response] = {}

    def send(tag: str) -> None:
        got[tag] = httpx.post(
            url + "/v1/answer",
            files={"image": ("s.png", png("red"))},
            data={"question": "what color is the shape?"},
            timeout=60,
        )

    with _serving(app) as url:
        first = threading.Thread(target=send, args=("first",))
        first.start()
        _wait_until(lambda: batcher.in_flight == 1, what="the first request in the model")
        second = threading.Thread(target=send, args=("second",))
        second.start()
        _wait_until(lambda: batcher.queued == 1, what="the second request in the queue")
        r = httpx.post(
            url + "/v1/answer",
            files={"image": ("s.png", png("red"))},
            data={"question": "what color is the shape?"},
            timeout=60,
        )
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
        health = httpx.get(url + "/healthz", timeout=10).json()
        assert health["queued"] == 1 and health["in_flight"] == 1
        hold.set()
        first.join(60)
        second.join(60)
        assert got["first"].status_code == 200 and got["second"].status_code == 200
        assert (
            got["first"].json()["answer"]
            == model.answer(draw_shape("red", "circle"), "what color is the shape?").answer
        )
        metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'rvqa_requests_total{endpoint="/v1/answer",status="503"} 1.0' in metrics


def test_decoded_pixels_are_bounded_and_always_released(model):
    """--max-queued-mpix: an image that would take the decoded pixels of unanswered requests
    over the budget gets 503; every path (answered, refused, truncated, a bad image in a
    batch) gives its pixels back."""
    import httpx

    hold = threading.Event()
    side = 32 * 32  # png() draws 32 x 32 images
    app = create_app(model, max_batch=1, max_wait_ms=0, max_queued_pixels=2 * side)
    batcher = app.state.batcher
    batcher.model = _CountingModel(model, hold)
    got: dict[str, httpx.Response] = {}

    def post(path: str = "/v1/answer", **kw) -> httpx.Response:
        kw.setdefault("files", {"image": ("s.png", png("red"))})
        kw.setdefault("data", {"question": "what color is the shape?"})
        return httpx.post(url + path, timeout=120, **kw)

    def send(tag: str) -> None:
        got[tag] = post()

    with _serving(app) as url:
        threads = [threading.Thread(target=send, args=(t,)) for t in ("first", "second")]
        for t in threads:
            t.start()
        _wait_until(lambda: batcher.pixels == 2 * side, what="two images held")
        r = post()
        assert r.status_code == 503 and "decoded pixels" in r.json()["error"]
        assert r.headers["retry-after"] == "1"
        hold.set()
        for t in threads:
            t.join(120)
        assert got["first"].status_code == got["second"].status_code == 200
        assert batcher.pixels == 0
        assert post(files={"image": ("t.png", png("red")[:80])}).status_code == 422
        r = post(
            "/v1/answer_batch",
            files=[("images", ("a.png", png("red"))), ("images", ("b.png", png("red")[:80]))],
            data={"questions": ["what color?", "what color?"]},
        )
        assert r.status_code == 422 and r.json()["error"].startswith("image 1: ")
        assert post("/v1/retrieve", data={}).status_code == 200
        r = post(  # more pixels than the whole budget: 413, not "busy, retry"
            "/v1/answer_batch",
            files=[("images", (f"{i}.png", png("red"))) for i in range(3)],
            data={"questions": ["what color?"] * 3},
        )
        assert r.status_code == 413 and "--max-queued-mpix" in r.json()["error"], r.text
        assert batcher.pixels == 0


def test_sigterm_finishes_the_requests_in_flight(tiny_run, tmp_path):
    """`rvqa serve` over a real socket: SIGTERM lets the answers being computed finish."""
    import signal
    import subprocess
    import sys

    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "rvqa", "serve", "--model", str(tiny_run), "--port", str(port)]
    cmd += ["--device", "cpu", "--max-batch", "8", "--max-wait-ms", "6000"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"rvqa serve exited: {log.read_text()}")
            try:
                return httpx.get(url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_until(up, timeout=120, what="rvqa serve to start")
        # a batch of two first: the next batch then waits --max-wait-ms for company
        warm = httpx.post(
            url + "/v1/answer_batch",
            files=[("images", ("a.png", png("red"))), ("images", ("b.png", png("blue")))],
            data={"questions": ["what color?", "what shape?"]},
            timeout=60,
        )
        assert warm.status_code == 200, warm.text
        got: list[httpx.Response] = []

        def send(color: str) -> None:
            got.append(
                httpx.post(
                    url + "/v1/answer",
                    files={"image": ("s.png", png(color))},
                    data={"question": "what color is the shape?"},
                    timeout=60,
                )
            )

        threads = [threading.Thread(target=send, args=(c,)) for c in ("red", "green", "blue")]
        for t in threads:
            t.start()

        def waiting() -> int:
            h = httpx.get(url + "/healthz", timeout=5).json()
            return h["queued"] + h["in_flight"]

        _wait_until(lambda: waiting() == 3, what="3 requests in the batch window")
        proc.send_signal(signal.SIGTERM)  # while the batch still waits to fill
        for t in threads:
            t.join(60)
        assert [r.status_code for r in got] == [200, 200, 200], [r.text for r in got]
        assert all(r.json()["answer"] for r in got)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Shutting down" in text and "Traceback" not in text


def test_answers_under_load_while_the_index_swaps(model, root):
    """The short version of `bench_serve.py --swap-run`: clients answer while an admin swaps
    the index between two caption sets; no error, and no answer reads both."""
    import time

    import httpx
    import numpy as np

    from rvqa.retriever.index import build_index_from_embeddings

    name = model.registry.names[0]
    original = model.registry.get(name).path
    texts_a = set(model.registry.get(name).lookup(np.arange(len(model.registry.get(name))))[1])
    texts_b = [f"{t} seen from afar" for t in sorted(texts_a)]
    assert not texts_a & set(texts_b)
    b_dir = root / "swap-b"
    if not b_dir.exists():
        emb = model.retriever.embed_texts(texts_b)
        build_index_from_embeddings(emb, texts_b, None, b_dir, model.retriever.fingerprint())
    texts_b_set = set(texts_b)
    seen = {"A": 0, "B": 0}
    problems: list[str] = []
    swaps: list[int] = []
    stop = threading.Event()

    def client(color: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                r = http.post(
                    "/v1/answer",
                    files={"image": ("s.png", png(color))},
                    data={"question": "what color is the shape?", "top_k": "3"},
                )
                if r.status_code != 200:
                    problems.append(f"HTTP {r.status_code}: {r.text}")
                    continue
                ev = [e["text"] for e in r.json()["evidence"]]
                in_a, in_b = all(t in texts_a for t in ev), all(t in texts_b_set for t in ev)
                if not ev or in_a == in_b:
                    problems.append(f"evidence from both or neither index state: {ev}")
                else:
                    seen["A" if in_a else "B"] += 1

    def swapper() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in itertools.count():
                if stop.wait(0.1):
                    return
                r = http.put(
                    f"/v1/indices/{name}",
                    json={"path": ["swap-b", "copy"][i % 2]},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                (swaps if r.status_code == 200 else problems).append(r.status_code)

    try:
        with _serving(create_app(model, indices_root=root, admin_token=TOKEN)) as url:
            workers = [threading.Thread(target=client, args=(c,)) for c in ("red", "green") * 3]
            workers.append(threading.Thread(target=swapper))
            for w in workers:
                w.start()
            deadline = time.time() + 90  # a slow machine gets more time, a fast one 4 s
            time.sleep(4)
            while time.time() < deadline and (len(swaps) < 10 or min(seen.values()) == 0):
                time.sleep(0.2)
            stop.set()
            for w in workers:
                w.join(60)
    finally:  # the module's model is shared: leave it as it was
        model.swap_index(original, name=name)
    assert problems == []
    assert len(swaps) >= 10 and seen["A"] > 0 and seen["B"] > 0, (swaps, seen)


def _chromium():
    """Debian's chromium (installed by .ci/run); RVQA_REQUIRE_BROWSER=1 (CI) fails without it."""
    import os

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        if os.environ.get("RVQA_REQUIRE_BROWSER") == "1":
            pytest.fail("the browser test needs chromium and playwright (.ci/run installs both)")
        pytest.skip("no chromium / playwright here")
    return path


def test_web_page_upload_answer_evidence_swap_in_a_real_browser(live_server, model, tmp_path):
    chromium = _chromium()  # skips (or fails in CI) before importing playwright
    from playwright.sync_api import sync_playwright

    name = model.registry.names[0]
    image = tmp_path / "shape.png"
    image.write_bytes(png("green", "square"))
    shot = tmp_path / "page.png"
    model.load_reranker(_tiny_reranker(model))  # the page shows its field when one is loaded
    try:
        _drive_the_page(sync_playwright, chromium, live_server, name, image, shot)
    finally:  # the module's model is shared: leave it as it was
        model.reranker = None
        if "extra" in model.registry:
            model.unload_index("extra")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _drive_the_page(sync_playwright, chromium, live_server, name, image, shot) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(live_server + "/")
        page.wait_for_selector(f"#ix-{name}")
        page.set_input_files("#image", str(image))
        page.fill("#question", "what color is the shape?")
        page.click("#ask-button")
        page.wait_for_selector("#evidence tbody tr")
        first = page.inner_text("#answer")
        rows = page.locator("#evidence tbody tr")
        assert rows.count() >= 1 and name in rows.first.inner_text()
        assert "score" in first
        assert not page.locator("#evidence th.rr").first.is_visible()  # not re-ranked
        # re-ranked: the re-rank score and each caption's rank in its index shown
        page.fill("#rerank", "6")
        page.click("#ask-button")
        page.wait_for_selector("#evidence.reranked tbody tr td.rr")
        cells = page.locator("#evidence tbody tr").first.locator("td").all_inner_texts()
        assert len(cells) == 5 and cells[-1] == name and 1 <= int(cells[3]) <= 6, cells
        float(cells[2])
        page.fill("#rerank", "")
        # the admin swap: a wrong token is refused on the page, the right one loads "extra"
        page.fill("#token", "wrong")
        page.fill("#swap-name", "extra")
        page.fill("#swap-path", "copy")
        page.click("#swap-button")
        page.wait_for_selector("#swap-result.error")
        assert "403" in page.inner_text("#swap-result")
        page.fill("#token", TOKEN)
        page.click("#swap-button")
        page.wait_for_selector("#ix-extra")
        page.uncheck(f"#ix-{name}")  # ask again with the new index only
        page.click("#ask-button")
        page.wait_for_function(
            "document.querySelector('#evidence tbody tr td:last-child')?.textContent === 'extra'"
        )
        cells = page.locator("#evidence tbody tr td:last-child").all_inner_texts()
        assert cells and set(cells) == {"extra"}
        page.screenshot(path=str(shot), full_page=True)
        browser.close()


# ------------------------------------------------------------------ re-ranking


def _tiny_reranker(model):
    """An untrained, unfused re-ranker (its own order, not the index's) for ``model``."""
    import torch

    from rvqa.retriever.reranker import RerankerModel

    torch.manual_seed(0)
    return RerankerModel.from_retriever(
        model.retriever,
        hidden_size=16,
        num_steps=2,
        num_heads=2,
        dropout=0.0,
        fuse_retrieval_score=False,
    )


@pytest.fixture(scope="module")
def reranking_model(tiny_run):
    """The tiny run with a re-ranker loaded."""
    m = RVQA.from_pretrained(tiny_run, device="cpu", reranker=False)
    m.load_reranker(_tiny_reranker(m))
    return m


def test_rerank_over_http_agrees_with_the_python_api(reranking_model):
    from PIL import Image

    m = reranking_model
    app = create_app(m, max_rerank=8)
    data = png("green", "square")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    k = m.default_top_k
    with TestClient(app) as c:
        assert c.get("/healthz").json()["reranker"] is True
        assert c.get("/healthz").json()["max_rerank"] == 8
        r = c.post(
            "/v1/answer",
            files={"image": ("s.png", data)},
            data={"question": "what shape is it?", "rerank": "6"},
        )
        assert r.status_code == 200, r.text
        want = m.answer(img, "what shape is it?", rerank=6)
        got = r.json()
        assert got["answer"] == want.answer
        assert [e["text"] for e in got["evidence"]] == [e.text for e in want.evidence]
        assert [e["retrieval_rank"] for e in got["evidence"]] == [
            e.retrieval_rank for e in want.evidence
        ]
        assert [e["rerank_score"] for e in got["evidence"]] == pytest.approx(
            [e.rerank_score for e in want.evidence], abs=1e-5
        )
        # the re-ranker's order (best first), not the index's
        assert len(got["evidence"]) == k
        scores = [e["rerank_score"] for e in got["evidence"]]
        assert scores == sorted(scores, reverse=True)
        assert [e["retrieval_rank"] for e in got["evidence"]] != list(range(1, k + 1))
        plain = c.post(
            "/v1/answer", files={"image": ("s.png", data)}, data={"question": "what shape?"}
        ).json()
        assert "rerank_score" not in plain["evidence"][0]  # no rerank: the plain answer

        r = c.post("/v1/retrieve", files={"image": ("r.png", data)}, data={"rerank": "6"})
        assert r.status_code == 200, r.text
        assert [e["text"] for e in r.json()["evidence"]] == [
            e.text for e in m.retrieve([img], rerank=6)[0]
        ]

        files = [("images", (f"{i}.png", png(col))) for i, col in enumerate(["red", "blue"])]
        r = c.post(
            "/v1/answer_batch",
            files=files,
            data={"questions": ["what color?", "what shape?"], "rerank": "6"},
        )
        assert r.status_code == 200, r.text
        imgs = [draw_shape(col, "circle").convert("RGB") for col in ("red", "blue")]
        want = m.answer_batch(imgs, ["what color?", "what shape?"], rerank=6)
        for a, w in zip(r.json()["answers"], want):
            assert [e["text"] for e in a["evidence"]] == [e.text for e in w.evidence]
            assert all("rerank_score" in e for e in a["evidence"])
        metrics = c.get("/metrics").text  # the plain answer is not counted
        for endpoint, count in (("/v1/answer", 1), ("/v1/retrieve", 1), ("/v1/answer_batch", 2)):
            assert f'rvqa_reranked_total{{endpoint="{endpoint}"}} {count}.0' in metrics

        for value, message in (
            ("many", "rerank must be an integer"),
            ("-3", "rerank must be 0 (off) or at least top_k"),
            ("9", "rerank must be at most 8 (--max-rerank)"),
        ):
            r = c.post(
                "/v1/answer",
                files={"image": ("s.png", data)},
                data={"question": "what?", "rerank": value},
            )
            assert r.status_code == 422 and message in r.json()["error"], r.text
        r = c.post(
            "/v1/answer",
            files={"image": ("s.png", data)},
            data={"question": "what?", "top_k": "3", "rerank": "2"},
        )
        assert r.status_code == 422
        assert "re-ranks fewer captions than top_k=3" in r.json()["error"]


def test_rerank_without_a_reranker_says_how_to_get_one(client):
    r = client.post(
        "/v1/answer",
        files={"image": ("s.png", png())},
        data={"question": "what color?", "rerank": "5"},
    )
    assert r.status_code == 422
    assert "rvqa train-reranker" in r.json()["error"] and "--reranker" in r.json()["error"]
    assert client.get("/healthz").json()["reranker"] is False
    r = client.post(
        "/v1/answer", files={"image": ("s.png", png())}, data={"question": "q?", "rerank": "0"}
    )
    assert r.status_code == 200  # 0: off


def test_requests_with_and_without_rerank_batch_apart(reranking_model):
    counting = _CountingModel(reranking_model)
    images = [draw_shape(col, "circle") for col in ("red", "green", "blue", "yellow")]
    reranks = [None, 6, None, 6]

    async def main():
        b = MicroBatcher(counting, max_batch=8, max_wait_ms=200)
        b.start()
        out = await asyncio.gather(
            *(b.submit(i, "what color?", None, ALL, 0, n) for i, n in zip(images, reranks))
        )
        await b.stop()
        return out

    from rvqa.pipeline import ALL_INDICES as ALL

    answers = asyncio.run(main())
    assert sorted(counting.calls) == [2, 2]  # one call per rerank value
    for a, img, n in zip(answers, images, reranks):
        want = reranking_model.answer(img, "what color?", rerank=n)
        assert [e.text for e in a.evidence] == [e.text for e in want.evidence]
        assert (a.evidence[0].rerank_score is not None) == (n is not None)


def test_a_retrieve_whose_client_left_stays_counted_until_it_has_run(model):
    """A side call (``/v1/retrieve``) cancelled by its caller keeps its place in the queue
    bound and its pixels until the model thread has finished it."""
    release = threading.Event()

    async def main():
        b = MicroBatcher(model, max_queue=4)
        b.start()
        b.hold_pixels(1000)
        task = asyncio.ensure_future(b.run(lambda: release.wait(60), pixels=1000))
        await asyncio.sleep(0.05)
        assert b.queued == 1 and b.pixels == 1000
        task.cancel()  # the client went away
        await asyncio.sleep(0.05)
        counted = (b.queued, b.pixels)  # the model thread still runs it
        release.set()
        for _ in range(100):
            if b.queued == 0:
                break
            await asyncio.sleep(0.01)
        after = (b.queued, b.pixels)
        await b.stop()
        return counted, after

    counted, after = asyncio.run(main())
    assert counted == (1, 1000)
    assert after == (0, 0)


def test_rerank_with_index_none_is_off(reranking_model):
    app = create_app(reranking_model)
    with TestClient(app) as c:
        r = c.post(
            "/v1/answer",
            files={"image": ("s.png", png())},
            data={"question": "what color?", "index": "none", "rerank": "6"},
        )
        assert r.status_code == 200 and r.json()["evidence"] == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--reranker", ""], "--reranker needs a re-ranker folder, or 'none'"),
        (["--max-rerank", "0"], "--max-rerank must be a positive integer, got 0"),
    ],
)
def test_serve_refuses_bad_rerank_flags_before_loading(tmp_path, capsys, flags, message):
    from rvqa.cli import main

    # the run folder does not exist: the flag is refused before anything loads
    assert main(["serve", "--model", str(tmp_path / "nowhere"), *flags]) == 1
    assert message in capsys.readouterr().err
