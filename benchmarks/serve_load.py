"""Bounded load test of ``advkit serve`` on loopback (issue 17, part 6).

Starts ``advkit serve`` in its own process (a trained small_cnn, with an API key), then,
for each configuration (concurrent clients x images per request), sends a fixed number
of ``POST /predict`` requests from that many client threads (one HTTP connection each)
and stops: after the last request, or at ``--deadline`` seconds, whichever comes first
(requests not sent by then count as failed). A request fails if it raises, times out
(``--timeout``), gets a status other than 200, or an answer without one row of scores
per image. Reports failed requests (the target: 0), latency percentiles (p50, p90, p99,
max, measured by the client around each request), throughput, and checks that the
server's own counter (``GET /stats``) equals the images the clients got answers for.

Writes its section of ``benchmarks/RESULTS.md`` (``--out``; the rest of the file is
kept) and exits with status 1 if any request failed. Run::

    python benchmarks/serve_load.py [--clients 1 8 32] [--images 1 16] [--requests 1000]
                                    [--threads 1] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks import _device_name, _source_state  # noqa: E402
from evaluate import write_section  # noqa: E402

from advkit import data  # noqa: E402

SECTION = "loopback"
SCRIPT = "serve_load.py"
TEST_MODEL = Path.home() / ".cache" / "advkit" / "test-models" / "small_cnn-mnist.safetensors"


@dataclass
class Run:
    """One configuration's outcome."""

    clients: int
    images: int
    requests: int
    failed: int
    failures: dict[str, int]
    latencies: list[float]   # seconds, answered requests only
    seconds: float
    server_images: int       # the server's counter, this configuration's share

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        # Nearest rank: the smallest latency at or above which q of the requests lie.
        return ordered[min(len(ordered) - 1, max(0, int(q / 100 * len(ordered) + 0.5) - 1))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, key: str, threads: int,
                 log: Path) -> subprocess.Popen:
    """``advkit serve`` in its own process, its log (a line per request) in ``log``: a pipe
    nobody reads would fill up and stall the server."""
    env = {**os.environ, "ADVKIT_API_KEY": key, "OMP_NUM_THREADS": str(threads)}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "advkit", "serve", model, "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"{url}/info", headers={"Authorization": f"Bearer {key}"}).raise_for_status()
            return process
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("advkit serve did not start: "
                                   + log.read_text()[-2000:]) from None
            time.sleep(0.2)


def bodies(images: int, count: int = 32) -> list[bytes]:
    """``count`` request bodies of ``images`` MNIST test images each (encoded once, so that
    the clients time the server and the connection, not their own JSON encoding)."""
    x, _ = data.load("mnist", split="test", limit=images * count)
    return [json.dumps({"inputs": x[i * images:(i + 1) * images].tolist()}).encode()
            for i in range(count)]


def load(url: str, key: str, clients: int, images: int, requests: int, timeout: float,
         deadline: float) -> Run:
    pool = bodies(images)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    lock = threading.Lock()
    next_request = [0]
    latencies: list[float] = []
    failures: dict[str, int] = {}
    stop_at = time.monotonic() + deadline

    def fail(why: str) -> None:
        with lock:
            failures[why] = failures.get(why, 0) + 1

    def client() -> None:
        with httpx.Client(headers=headers, timeout=timeout) as http:
            while True:
                with lock:
                    i = next_request[0]
                    if i >= requests or time.monotonic() > stop_at:
                        return
                    next_request[0] += 1
                started = time.perf_counter()
                try:
                    answer = http.post(f"{url}/predict", content=pool[i % len(pool)])
                except httpx.HTTPError as err:
                    fail(type(err).__name__)
                    continue
                took = time.perf_counter() - started
                if answer.status_code != 200:
                    fail(f"status {answer.status_code}")
                elif len(answer.json().get("scores", [])) != images:
                    fail("wrong answer")
                else:
                    with lock:
                        latencies.append(took)

    stats = f"{url}/stats"
    before = httpx.get(stats, headers=headers, timeout=timeout).json()["images"]
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    unsent = requests - next_request[0]
    if unsent:
        failures["not sent by the deadline"] = unsent
    served = httpx.get(stats, headers=headers, timeout=timeout).json()["images"] - before
    return Run(clients, images, requests, sum(failures.values()), failures, latencies, seconds,
               served)


def section(runs: list[Run], command: str, model: str, threads: int, started: str,
            loads: tuple[tuple[float, ...], tuple[float, ...]], note: str | None) -> str:
    begin, end = (f"<!-- benchmarks/{SCRIPT} {SECTION}: {w} -->" for w in ("begin", "end"))
    lines = [
        begin,
        "## Serving: a bounded load test of `advkit serve` on loopback "
        f"(`benchmarks/{SCRIPT}`)",
        "",
        f"- command: `{command}`",
        f"- date: {started}; device: {_device_name(torch.device('cpu'))}; advkit source "
        f"{_source_state()}",
        f"- server: `advkit serve {model}` (scores as probabilities, API key on), its own "
        f"process, {threads} torch thread(s); the clients: threads of this script, one HTTP "
        "connection each, latency measured around each request",
        f"- 1-minute load average {loads[0][0]:.2f} before, {loads[1][0]:.2f} after"
        + (f"; also running: {note}" if note else ""),
        "",
        "| clients | images / request | requests | failed | p50 ms | p90 ms | p99 ms | max ms "
        "| requests/s | images/s | images counted by the server |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        answered = len(run.latencies)
        lines.append(
            f"| {run.clients} | {run.images} | {run.requests} | **{run.failed}** | "
            + " | ".join(f"{run.percentile(q) * 1000:.1f}" for q in (50, 90, 99, 100))
            + f" | {answered / run.seconds:.0f} | {answered * run.images / run.seconds:.0f} | "
            f"{run.server_images} (clients: {answered * run.images}) |")
    failures = [f"{run.clients} clients x {run.images} images: {run.failures}"
                for run in runs if run.failures]
    lines += ["", "Failures: " + ("; ".join(failures) if failures else "none."), end, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=str(TEST_MODEL) if TEST_MODEL.is_file()
                        else "small_cnn", help="what advkit serve loads")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 16],
                        help="images per request")
    parser.add_argument("--requests", type=int, default=1000, help="per configuration")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="seconds per configuration; requests not sent by then fail")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--note", help="what else ran on the machine (for the record)")
    args = parser.parse_args(argv)

    command = "python benchmarks/serve_load.py " + shlex.join(sys.argv[1:] if argv is None
                                                                 else argv)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    key, port = secrets.token_hex(16), free_port()
    load_before = os.getloadavg()
    log = Path(tempfile.mkdtemp(prefix="advkit-serve-load-")) / "server.log"
    server = start_server(args.model, port, key, args.threads, log)
    print(f"server log: {log}", flush=True)
    runs = []
    try:
        for images in args.images:
            for clients in args.clients:
                run = load(f"http://127.0.0.1:{port}", key, clients, images, args.requests,
                           args.timeout, args.deadline)
                runs.append(run)
                print(f"{clients:3d} clients x {images:3d} images: {run.failed} failed, "
                      f"p50 {run.percentile(50) * 1000:.1f} ms, p99 "
                      f"{run.percentile(99) * 1000:.1f} ms, {run.seconds:.1f} s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    text = section(runs, command.strip(), args.model.replace(str(Path.home()), "~"),
                   args.threads, started, (load_before, os.getloadavg()), args.note)
    print(text)
    if args.out:
        write_section(args.out, SECTION, text, SCRIPT)
    mismatch = [r for r in runs if r.server_images != len(r.latencies) * r.images]
    if mismatch:
        print("the server's counter differs from the clients' answered images", file=sys.stderr)
    return 1 if any(r.failed for r in runs) or mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
