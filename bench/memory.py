"""Memory under sustained load: the gateway's and the consumers' RSS must stay flat.

    python -m bench.memory                     # 5 minutes at 200 events/s
    python -m bench.memory --seconds 60 --rate 100

Starts a real gateway, processor and notifier (one process each, as `make run` does) on the
broker at `AMQP_URL` (default 127.0.0.1:5672) in a namespace of their own, then posts events to
`POST /v1/events` at a steady rate for `--seconds`: half `notification.requested`, half
`dataset.submitted` (a small dataset whose summary the processor announces through the notifier),
so every service handles every event path it has in steady state. Each service's resident memory
(`VmRSS` from /proc/<pid>/status, and its child processes', e.g. the processor's CPU pool) is
sampled every few seconds. After a warm-up (30 s, at most half the run) the figures are: RSS
after the warm-up, at the end, the peak, the growth from warm-up to end (target <= 10 %) and a
least-squares slope in MiB/min, the figure that tells a leak from noise on a longer run.
Afterwards it waits for the notifications to drain, as a check that the load was really handled.
Not a test: it prints figures and saves them to bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import aio_pika
import httpx
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from bench.report import Result, print_table, save
from bench.upload_memory import _children, _status
from services.messaging.settings import CourierSettings
from tests.conftest import LOCAL_URL, Namespace
from tests.support.processes import ServiceProcess, base_url, consumer, gateway

MiB = 1 << 20
TARGET_GROWTH = 0.10


@dataclass
class Series:
    """RSS samples of one process (or process tree): (seconds since the load began, bytes)."""

    name: str
    points: list[tuple[float, int]] = field(default_factory=list)

    def after(self, warmup: float) -> list[tuple[float, int]]:
        return [(t, rss) for t, rss in self.points if t >= warmup]


@dataclass(frozen=True)
class Figures:
    warm_up_mib: float
    end_mib: float
    peak_mib: float
    growth: float
    slope_mib_per_min: float
    late_slope_mib_per_min: float
    samples: int

    @property
    def ok(self) -> bool:
        return self.growth <= TARGET_GROWTH


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 with fewer than two distinct x)."""
    if len(points) < 2:
        return 0.0
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    if var_x == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x


def figures(series: Series, warmup: float) -> Figures | None:
    window = series.after(warmup)
    if not window:
        return None
    warm, end = window[0][1], window[-1][1]
    minutes = [(t / 60, rss / MiB) for t, rss in window]
    return Figures(
        warm_up_mib=warm / MiB,
        end_mib=end / MiB,
        peak_mib=max(rss for _, rss in window) / MiB,
        growth=(end - warm) / warm,
        slope_mib_per_min=slope(minutes),
        late_slope_mib_per_min=slope(minutes[len(minutes) // 2 :]),  # levelling off, or a leak
        samples=len(window),
    )


def dataset_event(rng: random.Random) -> dict[str, Any]:
    records = [
        {"sku": f"sku-{rng.randrange(500)}", "price": round(rng.uniform(1, 100), 2), "qty": i}
        for i in range(rng.randrange(10, 60))
    ]
    return {
        "type": "dataset.submitted",
        "data": {"name": "prices", "records": records, "notify": "bench@example.org"},
    }


def notification_event(rng: random.Random) -> dict[str, Any]:
    return {
        "type": "notification.requested",
        "data": {
            "recipient": f"user-{rng.randrange(10_000)}@example.org",
            "subject": "Your report is ready",
            "body": uuid.uuid4().hex * rng.randrange(1, 8),
        },
    }


@dataclass
class Load:
    accepted: dict[str, int] = field(default_factory=lambda: {"dataset": 0, "notification": 0})
    errors: int = 0
    sent: int = 0
    seconds: float = 0.0


async def drive(url: str, rate: float, seconds: float, concurrency: int, load: Load) -> None:
    """Post events at `rate` per second for `seconds`, from `concurrency` workers."""
    started = time.monotonic()
    ticket = count()
    rng = random.Random(7)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        # Ends at the deadline even when the services fall behind the rate (a busy machine).
        while True:
            n = next(ticket)
            due = started + n / rate
            if due - started >= seconds or time.monotonic() - started >= seconds:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            kind = "dataset" if n % 2 else "notification"
            event = dataset_event(rng) if kind == "dataset" else notification_event(rng)
            load.sent += 1
            try:
                response = await client.post(f"{url}/v1/events", json=event)
            except httpx.HTTPError:
                load.errors += 1
                continue
            if response.status_code == 202:
                load.accepted[kind] += 1
            else:
                load.errors += 1

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    load.seconds = time.monotonic() - started


async def sample(
    services: list[ServiceProcess], interval: float, stop: asyncio.Event
) -> dict[str, Series]:
    """RSS of each service's main process and of its whole tree, every `interval` seconds."""
    series: dict[str, Series] = {}
    started = time.monotonic()
    while True:
        at = time.monotonic() - started
        for service in services:
            assert service.process is not None
            pid = service.process.pid
            main = _status(pid).get("VmRSS", 0)
            children = [_status(child).get("VmRSS", 0) for child in _children(pid)]
            series.setdefault(service.name, Series(service.name)).points.append((at, main))
            if children:
                name = f"{service.name} + children"
                series.setdefault(name, Series(name)).points.append((at, main + sum(children)))
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return series
        except TimeoutError:
            continue


def delivered(notify_log: Path) -> int:
    try:
        return notify_log.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def drain(notify_log: Path, expected: int, seconds: float) -> tuple[int, float]:
    """Wait until `expected` notifications are in the log; the count and the seconds waited."""
    started = time.monotonic()
    got: int = Retrying(
        stop=stop_after_delay(seconds),
        wait=wait_fixed(0.5),
        retry=retry_if_result(lambda found: found < expected),
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else 0,
    )(delivered, notify_log)
    return got, time.monotonic() - started


async def measure(
    services: list[ServiceProcess], args: argparse.Namespace
) -> tuple[dict[str, Series], Load]:
    load = Load()
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(services, args.interval, stop))
    await drive(base_url(services[0]), args.rate, args.seconds, args.concurrency, load)
    stop.set()
    return await sampler, load


async def depths(namespace: Namespace) -> dict[str, int]:
    """Messages (ready and unacknowledged) left in each of the namespace's queues."""
    found: dict[str, int] = {}
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        for topology in CourierSettings(namespace=namespace.name).all_topologies():
            for spec in topology.queues():
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(spec.name, passive=True)
                except aio_pika.exceptions.ChannelClosed:
                    continue  # not declared by any service of this run
                found[spec.name.removeprefix(f"{namespace.name}.")] = (
                    queue.declaration_result.message_count or 0
                )
                await channel.close()
    return found


def run(args: argparse.Namespace) -> int:
    namespace = Namespace(os.environ.get("AMQP_URL", LOCAL_URL))
    workdir = Path(tempfile.mkdtemp(prefix="courier-bench-memory-"))
    notify_log = workdir / "notifications.jsonl"
    env = namespace.env(
        COURIER_NOTIFY_LOG=str(notify_log),
        COURIER_BLOB_DIR=str(workdir / "blobs"),
        COURIER_LOG_LEVEL="WARNING",
    )
    services = [
        gateway(env, workdir),
        consumer("processor", env, workdir),
        consumer("notifier", env, workdir),
    ]
    warmup = min(args.warmup, args.seconds / 2)
    try:
        for service in services:
            service.start()
        for service in services:
            service.wait_ready(60)
        print(
            f"load: {args.rate:g} events/s for {args.seconds:g} s "
            f"({args.concurrency} connections), RSS every {args.interval:g} s, "
            f"warm-up {warmup:g} s"
        )
        series, load = asyncio.run(measure(services, args))
        got, waited = drain(notify_log, sum(load.accepted.values()), args.drain)
        left = asyncio.run(depths(namespace))
        for service in services:
            assert service.process is not None
            if service.process.poll() is not None:
                raise SystemExit(f"{service.name} exited during the run:\n{service.log()}")
    finally:
        for service in services:
            if service.process is not None:
                service.kill()
        asyncio.run(namespace.cleanup())
        shutil.rmtree(workdir, ignore_errors=True)

    accepted = sum(load.accepted.values())
    print(
        f"sent {load.sent:,} in {load.seconds:.0f} s, accepted {accepted:,} "
        f"({accepted / load.seconds:.0f}/s), errors {load.errors:,}; notifications delivered "
        f"{got:,} of {accepted:,} ({waited:.1f} s to drain after the load)"
    )
    backlog = {name: n for name, n in left.items() if n}
    print(f"messages left in queues: {backlog or 'none'}")
    table: dict[str, Figures] = {}
    for name, one in series.items():
        found = figures(one, warmup)
        if found is not None:
            table[name] = found
    width = max(len(name) for name in table)
    print(f"\nRSS (MiB) after a {warmup:g} s warm-up; target: growth <= {TARGET_GROWTH:.0%}")
    print(f"  {'process':<{width}}  warm-up      end     peak   growth  slope MiB/min  (last half)")
    for name, f in table.items():
        verdict = "ok" if f.ok else "GROWS"
        print(
            f"  {name:<{width}}  {f.warm_up_mib:7.1f}  {f.end_mib:7.1f}  {f.peak_mib:7.1f}"
            f"  {f.growth:+7.1%}  {f.slope_mib_per_min:+13.3f}  {f.late_slope_mib_per_min:+11.3f}"
            f"  {verdict}"
        )
    results = [
        Result(f"{name} RSS", "MiB", statistics.median(s), s)
        for name, one in series.items()
        if (s := [rss / MiB for _, rss in one.after(warmup)])
    ]
    print_table("RSS after the warm-up (median and spread of the samples)", results)
    path = save(
        "memory",
        results,
        {
            "seconds": args.seconds,
            "warmup": warmup,
            "interval": args.interval,
            "rate": args.rate,
            "load_seconds": load.seconds,
            "accepted_per_second": accepted / load.seconds,
            "accepted": accepted,
            "errors": load.errors,
            "delivered": got,
            "drain_seconds": waited,
            "left_in_queues": backlog,
            "target": f"RSS growth from warm-up to end <= {TARGET_GROWTH:.0%} for every process",
            "processes": {
                name: {
                    "warm_up_mib": f.warm_up_mib,
                    "end_mib": f.end_mib,
                    "peak_mib": f.peak_mib,
                    "growth": f.growth,
                    "slope_mib_per_min": f.slope_mib_per_min,
                    "late_slope_mib_per_min": f.late_slope_mib_per_min,
                    "samples": f.samples,
                    "ok": f.ok,
                }
                for name, f in table.items()
            },
        },
    )
    print(f"saved {path}")
    return 0 if all(f.ok for f in table.values()) and got >= accepted else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--seconds", type=float, default=300, help="load duration (default 300)")
    parser.add_argument("--rate", type=float, default=200, help="events per second (default 200)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections (default 16)")
    parser.add_argument("--interval", type=float, default=2, help="seconds between RSS samples")
    parser.add_argument(
        "--warmup", type=float, default=30, help="seconds before the baseline (at most half)"
    )
    parser.add_argument(
        "--drain", type=float, default=120, help="seconds to wait for the notifications after"
    )
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
