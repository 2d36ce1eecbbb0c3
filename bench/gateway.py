"""Gateway ingest: Courier against the non-durable floor and a bare aio-pika endpoint.

Three servers (one uvicorn worker each, uvloop + httptools) take `POST /v1/events` from `wrk`
(64 connections), interleaved over several rounds in one run; medians and ratios are printed and
saved. Courier's number includes validation, the confirmed persistent mandatory publish to two
quorum queues' exchange and the status projection.

    python -m bench.gateway [--seconds 10] [--rounds 3] [--connections 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import httpx

from bench.report import Result, print_table, save
from services.messaging.settings import CourierSettings

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BODY = '{"type":"notification.requested","data":{"recipient":"r@example.org","subject":"hi"}}'
LUA = f"""wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    app: str, env: dict[str, str], port: int, factory: bool = False
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "uvicorn", app, "--port", str(port), "--loop", "uvloop",
        "--http", "httptools", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    if factory:
        command.append("--factory")
    return subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True)


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def wrk(url: str, seconds: int, connections: int, script: Path) -> tuple[float, float, float, int]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def percentile(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * UNITS[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: .*", out)
    bad = int(errors.group(1)) if errors else 0
    if socket_errors:
        print("  wrk:", socket_errors.group(0))
    return rate, percentile("50"), percentile("99"), bad


async def cleanup(namespace: str, queue: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for topology in CourierSettings(namespace=namespace).all_topologies():
            for spec in topology.queues():
                await channel.queue_delete(spec.name)
        await channel.queue_delete(queue)
        await channel.exchange_delete(f"{namespace}.events")
        await channel.exchange_delete(f"{namespace}.dlx")


def main(seconds: int, rounds: int, connections: int) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `apt-get install wrk` (make bench does it)")
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    bare_queue = f"{namespace}.bare"
    data = Path(tempfile.mkdtemp())
    ports = {"background": free_port(), "bare": free_port(), "courier": free_port()}
    servers = {
        "background": start("bench.baselines:background", {}, ports["background"]),
        "bare": start(
            "bench.baselines:bare",
            {"AMQP_URL": AMQP_URL, "BENCH_QUEUE": bare_queue},
            ports["bare"],
        ),
        "courier": start(
            "services.gateway.app:create_app",
            {
                "AMQP_URL": AMQP_URL,
                "COURIER_NAMESPACE": namespace,
                "COURIER_DATA_DIR": str(data),
                "COURIER_ENVIRONMENT": "development",
                "COURIER_LOG_LEVEL": "WARNING",
            },
            ports["courier"],
            factory=True,
        ),
    }
    names = {
        "background": "BackgroundTasks (no-op, not durable)",
        "bare": "bare aio-pika + confirm",
        "courier": "courier gateway",
    }
    samples: dict[str, list[tuple[float, float, float, int]]] = {k: [] for k in servers}
    script = data / "post.lua"
    script.write_text(LUA)
    try:
        wait_ready(f"http://127.0.0.1:{ports['background']}/docs")
        wait_ready(f"http://127.0.0.1:{ports['bare']}/docs")
        wait_ready(f"http://127.0.0.1:{ports['courier']}/readyz")
        for round_ in range(rounds):
            for key in servers:
                url = f"http://127.0.0.1:{ports[key]}/v1/events"
                samples[key].append(wrk(url, seconds, connections, script))
                got, p50, p99, bad = samples[key][-1]
                print(f"round {round_ + 1} {key}: {got:.0f} req/s, p50 {p50:.1f} ms, ", end="")
                print(f"p99 {p99:.1f} ms, non-2xx {bad}")
    finally:
        for server in servers.values():
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        asyncio.run(cleanup(namespace, bare_queue))
        shutil.rmtree(data, ignore_errors=True)

    results = []
    for key, runs in samples.items():
        results.append(
            Result(
                f"{names[key]} req/s",
                "req/s",
                statistics.median(r[0] for r in runs),
                [r[0] for r in runs],
            )
        )
        results.append(
            Result(
                f"{names[key]} p50",
                "ms",
                statistics.median(r[1] for r in runs),
                [r[1] for r in runs],
            )
        )
        results.append(
            Result(
                f"{names[key]} p99",
                "ms",
                statistics.median(r[2] for r in runs),
                [r[2] for r in runs],
            )
        )
    medians = {key: statistics.median(r[0] for r in runs) for key, runs in samples.items()}
    errors = sum(r[3] for runs in samples.values() for r in runs)
    print_table(
        f"Gateway ingest: POST /v1/events, {connections} connections, {seconds}s x {rounds}",
        results,
    )
    ratios = {
        "courier/bare": medians["courier"] / medians["bare"],
        "courier/background": medians["courier"] / medians["background"],
        "bare/background": medians["bare"] / medians["background"],
    }
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}")
    print(f"non-2xx responses: {errors}")
    save("gateway", results, {"ratios": ratios, "connections": connections, "errors": errors})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    main(args.seconds, args.rounds, args.connections)
