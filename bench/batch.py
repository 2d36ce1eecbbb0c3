"""Batch ingest: `POST /v1/events/batch` (100 events a request) against a bare aio-pika publisher.

Courier: a real gateway process (one uvicorn worker, uvloop + httptools) takes a prebuilt batch of
`notification.requested` events from `wrk`; the gateway assigns each event its id, validates the
batch, publishes every event persistent, mandatory and confirmed (pipelined) to the events
exchange (bound to the notifier's quorum queue) and records it in the status projection.

Baseline: a bare aio-pika publisher (uvloop) sends persistent messages of the same size as the
events the gateway publishes to a quorum queue, with publisher confirms, in windows of 256 in
flight; it does nothing else (no HTTP, no validation, no status).

Both run in the same run, interleaved (the order alternates per round), for the same time; the
queues are purged between measurements so neither works against the other's backlog.

    python -m bench.batch [--seconds 10] [--rounds 3] [--connections 8] [--batch 100] [--window 256]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

import aio_pika
import orjson
import uvloop

from bench.report import Result, print_table, save
from bench.system import (
    AMQP_URL,
    cleanup,
    courier_env,
    declare_quorum,
    free_port,
    new_namespace,
    purge,
    require_wrk,
    start_gateway,
    stop,
    wait_ready,
    wrk,
)
from contracts.events import EVENT_ADAPTER, NotificationRequested, NotificationRequestedData
from contracts.topology import work_queue

TARGET = 0.8
LUA = """local f = assert(io.open("{path}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
"""


def batch_body(size: int) -> bytes:
    """`size` events without ids (the gateway assigns them), so the same body is new each time."""
    return orjson.dumps(
        [
            {
                "type": "notification.requested",
                "data": {"recipient": "r@example.org", "subject": f"bench {i}"},
            }
            for i in range(size)
        ]
    )


def event_body() -> bytes:
    """One event as the gateway publishes it (a structured CloudEvent with every attribute)."""
    event = NotificationRequested(
        data=NotificationRequestedData(recipient="r@example.org", subject="bench 10")
    )
    return EVENT_ADAPTER.dump_json(event)


async def bare(queue: str, seconds: float, window: int, body: bytes) -> float:
    """Confirmed persistent publishes, `window` in flight at a time, for `seconds`: messages/s."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        sent = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            pending: list[Awaitable[object]] = [
                exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue,
                )
                for _ in range(window)
            ]
            await asyncio.gather(*pending)
            sent += window
        return sent / (time.perf_counter() - started)


def main(seconds: int, rounds: int, connections: int, batch: int, window: int) -> None:
    require_wrk()
    namespace = new_namespace()
    bare_queue = f"{namespace}.bare"
    courier_queue = work_queue(namespace, "notifier")  # where notification.requested goes
    data = Path(tempfile.mkdtemp())
    body = data / "batch.json"
    body.write_bytes(batch_body(batch))
    script = data / "post.lua"
    script.write_text(LUA.format(path=body))
    message = event_body()
    size = len(message)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/events/batch"
    courier: list[tuple[float, float, float, int]] = []
    baseline: list[float] = []
    server = start_gateway(courier_env(namespace, data / "gateway"), port)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", process=server)
        uvloop.run(declare_quorum(bare_queue))
        # A short warm-up of both paths (connections, caches, the broker's queue processes).
        wrk(url, 2, connections, script)
        uvloop.run(bare(bare_queue, 2, window, message))
        uvloop.run(purge(courier_queue, bare_queue))
        for round_ in range(rounds):
            order = ("courier", "bare") if round_ % 2 == 0 else ("bare", "courier")
            for side in order:
                if side == "courier":
                    rate, p50, p99, bad = wrk(url, seconds, connections, script)
                    courier.append((rate * batch, p50, p99, bad))
                    print(
                        f"round {round_ + 1} courier: {rate * batch:.0f} events/s "
                        f"({rate:.0f} req/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, non-2xx {bad})"
                    )
                else:
                    baseline.append(uvloop.run(bare(bare_queue, seconds, window, message)))
                    print(f"round {round_ + 1} bare: {baseline[-1]:.0f} events/s")
                uvloop.run(purge(courier_queue, bare_queue))
    finally:
        stop(server)
        asyncio.run(cleanup(namespace, bare_queue))
        shutil.rmtree(data, ignore_errors=True)

    results = [
        Result(
            f"courier POST /v1/events/batch ({batch}/request)",
            "events/s",
            statistics.median(r[0] for r in courier),
            [r[0] for r in courier],
        ),
        Result(
            f"bare aio-pika (confirms, window {window})",
            "events/s",
            statistics.median(baseline),
            baseline,
        ),
        Result(
            "courier request p50",
            "ms",
            statistics.median(r[1] for r in courier),
            [r[1] for r in courier],
        ),
        Result(
            "courier request p99",
            "ms",
            statistics.median(r[2] for r in courier),
            [r[2] for r in courier],
        ),
    ]
    ratio = results[0].median / results[1].median
    errors = sum(r[3] for r in courier)
    print_table(
        f"Batch ingest: {batch} events/request, {connections} connections, event {size} B, "
        f"{seconds}s x {rounds}",
        results,
    )
    print(f"ratio courier / bare aio-pika: {ratio:.2f} (target >= {TARGET:.2f})")
    print(f"non-2xx responses: {errors}")
    save(
        "batch",
        results,
        {
            "ratio": ratio,
            "target": TARGET,
            "batch": batch,
            "connections": connections,
            "window": window,
            "event_bytes": size,
            "errors": errors,
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--batch", type=int, default=100, help="events per request")
    parser.add_argument("--window", type=int, default=256, help="bare publishes in flight")
    args = parser.parse_args()
    main(args.seconds, args.rounds, args.connections, args.batch, args.window)
