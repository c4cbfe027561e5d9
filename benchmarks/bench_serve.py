"""``rvqa serve`` under load: micro-batching on vs off, and answering while the index swaps.

Starts the real server (``rvqa serve`` in a subprocess, the demo model, a 100k-caption
index of templated captions encoded by the demo retriever, as ``bench_api.py`` builds it
in ``benchmarks/_work/``) and drives it over HTTP with ``N`` concurrent clients (asyncio +
raw keep-alive connections, each sending its next request when the last one answered: a
closed loop). The
same server is run with ``--max-batch 32`` (batching on) and ``--max-batch 1`` (one
request per forward pass); per level the first ``--warmup`` seconds are not counted.

    python benchmarks/bench_serve.py --model runs/demo                 # the throughput table
    python benchmarks/bench_serve.py --model runs/demo --swap-run 60   # 32 clients, a swap a second
    python benchmarks/bench_serve.py --model runs/demo --in-process    # the model alone, no HTTP
    python benchmarks/bench_serve.py --model runs/demo --startup-runs 5  # start-up times

The swap run answers with ``--clients-swap`` (32) clients for ``--swap-run`` seconds while
another client swaps the served index every second between A (100k captions) and B
(the other 68k captions the templates make: no caption is in both). Every answer's
evidence is checked to come from exactly one of them (a mix would be an answer that
saw two index states). It reports errors, mixed answers, swaps and their latency.

The load generator runs on the same machine as the server (it takes CPU from it);
``--server-threads`` sets the server's torch/faiss threads (default: theirs).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import build_templated_index, captions  # noqa: E402  (the same corpus)

N_TEMPLATED = 168_000  # every distinct caption the templates make
TOKEN = "bench-token"


def build_indices(model_dir: str, work: Path, n_a: int) -> tuple[Path, Path]:
    """Index A (the first ``n_a`` templated captions, bench_api's index) and B (the rest)."""
    a_dir, b_dir = work / f"api-index-{n_a}", work / f"serve-index-rest-{n_a}"
    if a_dir.exists() and b_dir.exists():
        return a_dir, b_dir
    from rvqa import RVQA

    model = RVQA.from_pretrained(model_dir, device="cpu")
    texts = captions(N_TEMPLATED)
    for folder, part in ((a_dir, texts[:n_a]), (b_dir, texts[n_a:])):
        if not folder.exists():
            build_templated_index(model, part, folder)
    return a_dir, b_dir


def request_pool(n: int) -> list[tuple[bytes, str]]:
    """(PNG bytes, question) pairs from the easy-vqa test split."""
    import easy_vqa

    qs, _, ims = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [(Path(paths[ims[i]]).read_bytes(), qs[i]) for i in range(n)]


class Server:
    """``rvqa serve`` in a subprocess; ``startup_s``: launch until /healthz answers 200."""

    def __init__(
        self,
        args: argparse.Namespace,
        index: Path | None,
        max_batch: int,
        port: int,
        precision: str = "float32",
    ):
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        if args.server_threads:
            env["OMP_NUM_THREADS"] = str(args.server_threads)
        token_file = Path(args.work) / "bench-token.txt"
        token_file.write_text(TOKEN)
        cmd = [sys.executable, "-m", "rvqa", "serve", "--model", args.model]
        cmd += ["--index", str(index)] if index is not None else []  # None: the run's own
        cmd += ["--port", str(port), "--max-batch", str(max_batch)]
        cmd += ["--max-wait-ms", str(args.max_wait_ms), "--device", "cpu"]
        cmd += ["--precision", precision]
        cmd += ["--indices-root", str(Path(args.work)), "--admin-token-file", str(token_file)]
        self.log = open(Path(args.work) / f"serve-{port}.log", "w")  # noqa: SIM115
        import httpx  # (imported before the clock starts: not beside the server's start)

        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"rvqa serve exited ({self.proc.returncode}); see {self.log.name}"
                )
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("rvqa serve did not start in 120 s")
            time.sleep(0.02)
        self.startup_s = time.perf_counter() - t0
        self.log.flush()
        split = re.search(
            r"imports ([\d.]+) s .*model and indices ([\d.]+) s",
            Path(self.log.name).read_text(errors="replace"),
        )  # what rvqa serve logs before it starts uvicorn
        self.imports_s, self.loading_s = map(float, split.groups()) if split else (None, None)

    def metrics(self) -> dict[str, float]:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for key in ("rvqa_batch_size_sum", "rvqa_batch_size_count"):
            m = re.search(rf"^{key} (\S+)$", text, re.M)
            out[key] = float(m.group(1)) if m else 0.0
        return out

    def cpu_seconds(self) -> float:
        """The server process's CPU time (user + system, all threads) so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> tuple[float, float]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
        hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
        return rss, hwm

    def stop(self) -> float:
        """SIGTERM (uvicorn's graceful shutdown); seconds until the process exits."""
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return time.perf_counter() - t0


def multipart_request(host: str, image: bytes, fields: dict[str, str]) -> bytes:
    """One whole ``POST /v1/answer`` HTTP/1.1 request (multipart form), built once."""
    boundary = "rvqa-bench-7d1b3c"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (
        f"POST /v1/answer HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def load(
    url: str,
    clients: int,
    pool: list[tuple[bytes, str]],
    warmup: float,
    duration: float,
    check: object = None,
    top_k: int | None = None,
    cpu_seconds: object = None,
) -> dict:
    """``clients`` closed-loop clients on POST /v1/answer; counts what ends in the window.
    ``top_k`` None: the run's own (the demo's 3).

    Each client holds one keep-alive connection and sends prebuilt requests over raw
    asyncio streams: a lean client (about 0.1 ms of CPU a request, where httpx took
    several), so the load generator sharing the machine takes little from the server.
    ``cpu_seconds``: a callable giving the server's CPU time, read at the window's start
    and end (``server_cpu_ms_per_answer``).
    """
    host, port = url.removeprefix("http://").split(":")
    requests = [
        multipart_request(
            f"{host}:{port}", image, {"question": q, **({"top_k": str(top_k)} if top_k else {})}
        )
        for image, q in pool
    ]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + duration
    length_re = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)

    close_re = re.compile(rb"\r\nconnection: *close", re.I)

    async def one(c: int) -> None:
        j = c
        conn = None
        while loop.time() < end:
            req = requests[j % len(requests)]
            j += clients
            t0 = loop.time()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, int(port))
                reader, writer = conn
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                length = length_re.search(head)
                if length is None:
                    raise ValueError(f"a response without Content-Length: {head[:200]!r}")
                body = await reader.readexactly(int(length.group(1)))
                if close_re.search(head):
                    writer.close()
                    conn = None
                status = int(head[9:12])
                problem = None if status == 200 else f"HTTP {status}: {body[:300]!r}"
                if problem is None and check is not None:
                    problem = check(json.loads(body))
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
            ) as err:
                problem = f"{type(err).__name__}: {err}"
                if conn is not None:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.05)
            t1 = loop.time()
            if problem is not None:  # counted whenever it happens, warm-up included
                errors[problem[:200]] = errors.get(problem[:200], 0) + 1
            elif start <= t1 <= end:  # throughput: the answers completed in the window
                latencies.append(t1 - t0)
        if conn is not None:
            conn[1].close()

    cpu: list[float] = []
    if cpu_seconds is not None:
        for at in (start, end):
            loop.call_at(at, lambda: cpu.append(cpu_seconds()))
    await asyncio.gather(*(one(c) for c in range(clients)))
    lat = np.array(latencies) * 1000
    per_answer = (cpu[1] - cpu[0]) * 1000 / len(latencies) if len(cpu) == 2 and latencies else None
    return {
        "clients": clients,
        "answered": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "req_per_s": len(latencies) / duration,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "server_cpu_ms_per_answer": per_answer,
    }


def throughput_table(args: argparse.Namespace, index: Path, pool: list) -> list[dict]:
    rows = []
    levels = [int(c) for c in args.clients.split(",")]
    for precision in args.precisions.split(","):
        for label, max_batch in (("batching on", args.max_batch), ("batching off", 1)):
            server = Server(args, index, max_batch, args.port, precision)
            print(
                f"{precision}, {label} (--max-batch {max_batch}): ready in "
                f"{server.startup_s:.2f} s",
                flush=True,
            )
            try:
                for clients in levels:
                    before = server.metrics()
                    res = asyncio.run(
                        load(
                            server.url,
                            clients,
                            pool,
                            args.warmup,
                            args.duration,
                            cpu_seconds=server.cpu_seconds,
                        )
                    )
                    after = server.metrics()
                    calls = after["rvqa_batch_size_count"] - before["rvqa_batch_size_count"]
                    reqs = after["rvqa_batch_size_sum"] - before["rvqa_batch_size_sum"]
                    res.update(mode=label, max_batch=max_batch, precision=precision)
                    res["mean_batch"] = reqs / max(calls, 1)
                    res["startup_s"] = server.startup_s
                    res["rss_mb"], res["peak_rss_mb"] = server.rss_mb()
                    rows.append(res)
                    print(json.dumps(res), flush=True)
            finally:
                print(f"  stopped in {server.stop():.2f} s", flush=True)
    return rows


def swap_run(args: argparse.Namespace, a_dir: Path, b_dir: Path, pool: list) -> dict:
    import httpx

    texts = captions(N_TEMPLATED)
    n_a = args.n_captions
    set_a, set_b = set(texts[:n_a]), set(texts[n_a:])
    seen = {"A": 0, "B": 0}
    mixed: list = []

    def check(body: dict) -> str | None:
        ev = [e["text"] for e in body.get("evidence", [])]
        if not ev:
            return "no evidence"
        in_a, in_b = all(t in set_a for t in ev), all(t in set_b for t in ev)
        if in_a == in_b:
            mixed.append(ev)
            return "evidence mixes two index states (or neither)"
        seen["A" if in_a else "B"] += 1
        return None

    server = Server(args, a_dir, args.max_batch, args.port, args.precisions.split(",")[0])
    name = a_dir.name
    swaps: list[float] = []
    swap_errors: list[str] = []
    stop = False

    async def swapper(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            folders = [b_dir.name, a_dir.name]
            i = 0
            while not stop:
                await asyncio.sleep(1.0)
                if stop:
                    break
                t0 = time.perf_counter()
                r = await http.put(
                    f"/v1/indices/{name}",
                    json={"path": folders[i % 2]},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                if r.status_code == 200:
                    swaps.append(time.perf_counter() - t0)
                else:
                    swap_errors.append(f"HTTP {r.status_code}: {r.text}")
                i += 1

    async def main() -> dict:
        nonlocal stop
        task = asyncio.ensure_future(swapper(server.url))
        res = await load(server.url, args.clients_swap, pool, 0.0, args.swap_run, check=check)
        stop = True
        await task
        return res

    try:
        res = asyncio.run(main())
        res["rss_mb"], res["peak_rss_mb"] = server.rss_mb()
    finally:
        shutdown = server.stop()
    res.update(
        seconds=args.swap_run,
        swaps=len(swaps),
        swap_errors=swap_errors,
        swap_p50_s=float(np.median(swaps)) if swaps else None,
        swap_max_s=float(max(swaps)) if swaps else None,
        answers_from_A=seen["A"],
        answers_from_B=seen["B"],
        mixed=len(mixed),
        shutdown_s=shutdown,
        startup_s=server.startup_s,
    )
    return res


def in_process(args: argparse.Namespace, index: Path, pool: list) -> list[str]:
    """The model alone, no HTTP: one question per ``answer`` call vs ``answer_batch`` on
    ``--max-batch`` distinct images (medians of 5 rounds), float32 and bf16; each with
    the reader reading the retriever's image-tower pass (``RVQA.image_tower_shared``)
    and with both towers run (``share_image_tower = False``), alternating round by round."""
    import statistics

    from PIL import Image

    from rvqa import RVQA

    lines = []
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b, _ in pool[: args.max_batch]]
    questions = [q for _, q in pool[: args.max_batch]]
    for precision in args.precisions.split(","):
        model = RVQA.from_pretrained(
            args.model, device="cpu", load_indices=False, precision=precision
        )
        model.load_index(index, name="bench")
        print(f"{precision}: image tower shared: {model.image_tower_shared}", flush=True)

        def once(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        times: dict[bool, dict[str, list[float]]] = {
            s: {"one": [], "batch": []} for s in (True, False)
        }
        for r in range(6):  # round 0 warms up
            for share in (True, False):
                model.share_image_tower = share
                one = statistics.median(
                    once(lambda i=i, m=model: m.answer(images[i], questions[i])) for i in range(8)
                )
                batch = once(lambda m=model: m.answer_batch(images, questions)) / len(images)
                if r:
                    times[share]["one"].append(one)
                    times[share]["batch"].append(batch)
        # the same answers either way: every question of the pool, in batches of 32
        every = [Image.open(io.BytesIO(b)).convert("RGB") for b, _ in pool]
        asked = [q for _, q in pool]
        outs = {}
        for share in (True, False):
            model.share_image_tower = share
            outs[share] = model.answer_batch(every, asked, batch_size=args.max_batch)
        pairs = list(zip(outs[True], outs[False]))
        same = sum(a.answer == b.answer for a, b in pairs)
        same_ev = sum(
            [(e.text, e.index, e.id) for e in a.evidence]
            == [(e.text, e.index, e.id) for e in b.evidence]
            for a, b in pairs
        )
        delta = max(abs(a.score - b.score) for a, b in pairs)
        lines.append(
            f"{precision}, one tower pass vs both towers on {len(pairs)} questions: identical "
            f"answers {same}/{len(pairs)}, evidence {same_ev}/{len(pairs)}, "
            f"largest answer-score difference {delta:.2g}"
        )
        print(lines[-1], flush=True)
        model.share_image_tower = True
        for share, label in ((True, "one tower pass"), (False, "both towers")):
            one = statistics.median(times[share]["one"])
            batch = statistics.median(times[share]["batch"])
            lines.append(
                f"{precision}, {label}: answer() {one * 1000:.1f} ms a question; answer_batch "
                f"of {len(images)} {batch * 1000:.1f} ms a question ({one / batch:.2f}x)"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="runs/demo")
    ap.add_argument("--n-captions", type=int, default=100_000)
    ap.add_argument("--work", default="benchmarks/_work")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels (comma-separated)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds counted per level")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds not counted per level")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's batch when on")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--server-threads", type=int, default=None)
    ap.add_argument(
        "--precisions", default="float32,bf16", help="rvqa serve --precision values to run"
    )
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--pool", type=int, default=500, help="distinct test questions sent")
    ap.add_argument("--swap-run", type=float, default=None, metavar="SECONDS")
    ap.add_argument("--clients-swap", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="only time the model itself (answer vs answer_batch), no server",
    )
    ap.add_argument(
        "--startup-runs",
        type=int,
        default=0,
        metavar="N",
        help="only start and stop the server N times: launch to the first /healthz 200",
    )
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    a_dir, b_dir = build_indices(args.model, work, args.n_captions)
    pool = request_pool(args.pool)
    if args.in_process:
        in_process(args, a_dir, pool)
        return
    if args.startup_runs:  # the run's own indices, and with the 100k one, alternately
        times: dict[str, list[Server]] = {"the run's indices": [], "+ the 100k index": []}
        for _ in range(args.startup_runs):
            for label, index in zip(times, (None, a_dir)):
                server = Server(args, index, args.max_batch, args.port)
                times[label].append(server)
                server.stop()
        for label, servers in times.items():
            print(
                f"{label}: ready (launch to the first /healthz 200) in s; of it, imports "
                "and loading as rvqa serve logs them"
            )
            for s in servers:
                print(f"  {s.startup_s:.2f} (imports {s.imports_s}, loading {s.loading_s})")
        return
    if args.swap_run:
        res = swap_run(args, a_dir, b_dir, pool)
        print(json.dumps(res, indent=1))
        ok = res["errors"] == 0 and res["mixed"] == 0 and not res["swap_errors"]
        print(
            f"\n{args.clients_swap} clients, {args.swap_run:g} s, {res['swaps']} swaps "
            f"(p50 {res['swap_p50_s']:.2f} s): {res['answered']} answers in the window; "
            f"all {res['answers_from_A'] + res['answers_from_B'] + res['mixed']} checked: "
            f"{res['answers_from_A']} read A, {res['answers_from_B']} read B, "
            f"{res['errors']} errors, {res['mixed']} mixed -> {'PASS' if ok else 'FAIL'}"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        sys.exit(0 if ok else 1)
    rows = throughput_table(args, a_dir, pool)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    base = {(r["precision"], r["clients"]): r["req_per_s"] for r in rows if r["max_batch"] == 1}
    print(
        "\n| precision | server | clients | req/s | vs batching off | p50 (ms) | p99 (ms) "
        "| mean batch | server CPU (ms an answer) | errors |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        off = base.get((r["precision"], r["clients"]))
        ratio = f"{r['req_per_s'] / off:.2f}×" if off else "n/a"
        print(
            f"| {r['precision']} | {r['mode']} | {r['clients']} | {r['req_per_s']:.1f} | {ratio} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.1f} "
            f"| {r['server_cpu_ms_per_answer'] or float('nan'):.2f} | {r['errors']} |"
        )
    starts = sorted({round(r["startup_s"], 2) for r in rows})
    print(f"\nready (launch to the first /healthz 200), s: {', '.join(map(str, starts))}")
    print(f"server RSS at the end, MB: {max(r['rss_mb'] for r in rows):.0f} (largest)")


if __name__ == "__main__":
    main()
