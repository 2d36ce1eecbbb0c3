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
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.report import Result, print_table, save
from bench.system import (
    AMQP_URL,
    cleanup,
    courier_env,
    free_port,
    new_namespace,
    require_wrk,
    start,
    start_gateway,
    stop,
    wait_ready,
    wrk,
)

BODY = '{"type":"notification.requested","data":{"recipient":"r@example.org","subject":"hi"}}'
LUA = f"""wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""


def main(seconds: int, rounds: int, connections: int) -> None:
    require_wrk()
    namespace = new_namespace()
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
        "courier": start_gateway(courier_env(namespace, data), ports["courier"]),
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
            stop(server)
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
