"""End to end: events at a fixed rate through gateway → processor → notifier, latency to the effect.

Real gateway (one uvicorn worker), processor and notifier processes in a fresh namespace. The
bench sends `dataset.submitted` events (a few records each, its own ids) at a fixed rate,
open-loop: each send is scheduled by the clock and never waits for an earlier response; every
latency counts from the scheduled time, so a stalled gateway cannot hide behind a slowed client
(no coordinated omission). The processor summarises each dataset and publishes
`dataset.processed` (id `derived_event_id(<id>, "dataset.processed")`); the notifier's `log`
channel appends one JSON line per notification with `delivered_at`.

* end-to-end latency: `delivered_at` minus the scheduled send time (the notifier stamps
  `delivered_at` just before its fsync'd append; the ack follows the fsync);
* HTTP latency: the `202` answer (the broker confirmed) minus the scheduled send time;
* stages (a sample of events, from the gateway's status projection): where the time goes.

A warm-up precedes the measured rounds; the pipeline drains between rounds. There is no
baseline process: the figures are compared with the targets (p50 ≤ 5 ms, p99 ≤ 25 ms).

    python -m bench.e2e_latency [--rate 500] [--seconds 20] [--rounds 3] [--warmup 5] [--records 3]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop

from bench.report import Result, print_table, save
from bench.system import (
    cleanup,
    courier_env,
    free_port,
    new_namespace,
    start_gateway,
    start_module,
    stop,
    wait_ready,
)
from contracts.envelope import derived_event_id

TARGET_P50_MS = 5.0
TARGET_P99_MS = 25.0
MAX_CONNECTIONS = 256
DRAIN_SECONDS = 60.0
STAGE_SAMPLE = 200
STAGE_PATIENCE = 30.0  # seconds, for all sampled events together


class Http:
    """A minimal keep-alive HTTP/1.1 client: a sub-millisecond, allocation-light request path, so
    the client's own overhead stays out of the figures (httpx costs more than the gateway here).
    Opens a connection when none is idle, at most `limit`; a send beyond waits (and the wait
    counts, since latency runs from the scheduled time)."""

    def __init__(self, host: str, port: int, limit: int = MAX_CONNECTIONS) -> None:
        self._host = host
        self._port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(limit)
        self.opened = 0

    async def post(self, path: str, body: bytes) -> int:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        async with self._slots:
            reused = bool(self._idle)
            try:
                return await self._exchange(head + body)
            except (asyncio.IncompleteReadError, ConnectionError):
                if not reused:
                    raise
                # The server closed an idle keep-alive connection (uvicorn: after 5 s): once more
                # on a fresh one.
                return await self._exchange(head + body, fresh=True)

    async def _exchange(self, request: bytes, fresh: bool = False) -> int:
        if self._idle and not fresh:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self._host, self._port)
            self.opened += 1
        try:
            writer.write(request)
            response = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in response.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        self._idle.append((reader, writer))
        return int(response[9:12])

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


@dataclass
class Sent:
    event_id: str
    scheduled: float  # wall clock (time.time()) of the scheduled send
    answered: float  # seconds from the scheduled send to the HTTP answer
    lag: float  # seconds the send started after its scheduled time
    status: int


def dataset_body(event_id: str, records: int, i: int) -> bytes:
    return orjson.dumps(
        {
            "id": event_id,
            "type": "dataset.submitted",
            "data": {
                "name": "bench",
                "records": [
                    {"n": i + r, "x": (i + r) / 7, "s": f"v{r}", "ok": r % 2 == 0}
                    for r in range(records)
                ],
            },
        }
    )


async def send_at_rate(http: Http, ids: Sequence[str], rate: float, records: int) -> list[Sent]:
    """Send one event per id, the k-th at start + k/rate, without waiting for answers."""
    bodies = [dataset_body(event_id, records, i) for i, event_id in enumerate(ids)]
    loop = asyncio.get_running_loop()
    sent: list[Sent] = []

    async def one(event_id: str, body: bytes, at: float, wall: float) -> None:
        lag = loop.time() - at
        status = await http.post("/v1/events", body)
        sent.append(Sent(event_id, wall, loop.time() - at, lag, status))

    tasks = []
    start = loop.time() + 0.05
    wall_start = time.time() + (start - loop.time())
    for k, (event_id, body) in enumerate(zip(ids, bodies, strict=True)):
        at = start + k / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(event_id, body, at, wall_start + k / rate)))
    await asyncio.gather(*tasks)
    return sent


def delivered(notify_log: Path) -> dict[str, float]:
    """Notification event id → `delivered_at` (unix seconds), from the log channel's file."""
    if not notify_log.exists():
        return {}
    found = {}
    for line in notify_log.read_bytes().splitlines():
        record = orjson.loads(line)
        found[record["event_id"]] = datetime.fromisoformat(record["delivered_at"]).timestamp()
    return found


async def drain(notify_log: Path, expected: set[str], patience: float) -> dict[str, float]:
    """Wait until every expected notification is in the log (or `patience` ran out)."""
    found = delivered(notify_log)
    for _ in range(int(patience / 0.25)):
        if expected <= found.keys():
            break
        await asyncio.sleep(0.25)
        found = delivered(notify_log)
    return found


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of `values` (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def _step_time(status: dict[str, Any], service: str, state: str) -> float | None:
    info = status.get("services", {}).get(service)
    for step in (info or {}).get("history", []):
        if step["state"] == state:
            return datetime.fromisoformat(step["at"]).timestamp()
    return None


async def stages(
    base: str, sample: Sequence[Sent], notified: dict[str, float]
) -> dict[str, list[float]]:
    """Per stage, the ms each sampled event spent there, from the gateway's status projection."""
    names = (
        "request → gateway accepted",
        "gateway accepted → processor started",
        "processor started → succeeded",
        "processor succeeded → notifier started",
        "notifier started → delivered_at",
        "delivered_at → notifier succeeded",
        "gateway accepted → HTTP 202 seen",
    )
    spans: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.monotonic() + STAGE_PATIENCE
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for sent in sample:
            derived = derived_event_id(sent.event_id, "dataset.processed")
            while True:  # status reports reach the projection a little after the effect
                dataset = (await client.get(f"/v1/events/{sent.event_id}")).json()
                processed = (await client.get(f"/v1/events/{derived}")).json()
                done = _step_time(processed, "notifier", "succeeded") is not None
                if done or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
            accepted = dataset.get("accepted_at")
            times = [
                sent.scheduled,
                datetime.fromisoformat(accepted).timestamp() if accepted else None,
                _step_time(dataset, "processor", "processing"),
                _step_time(dataset, "processor", "succeeded"),
                _step_time(processed, "notifier", "processing"),
                notified.get(derived),
                _step_time(processed, "notifier", "succeeded"),
            ]
            for name, begin, end in zip(names, times, times[1:], strict=False):
                if begin is not None and end is not None:
                    spans[name].append((end - begin) * 1000)
            if times[1] is not None:
                spans[names[-1]].append((sent.scheduled + sent.answered - times[1]) * 1000)
    return spans


def start_system(
    namespace: str, data: Path
) -> tuple[str, list[tuple[str, subprocess.Popen[bytes]]]]:
    env = courier_env(
        namespace,
        data,
        COURIER_NOTIFY_LOG=str(data / "notifications.jsonl"),
        COURIER_BLOB_DIR=str(data / "blobs"),
    )
    port = free_port()
    health = {"processor": free_port(), "notifier": free_port()}
    processes = [
        (
            f"http://127.0.0.1:{port}",
            start_gateway(
                {**env, "COURIER_DATA_DIR": str(data / "gateway")}, port, data / "gateway.log"
            ),
        )
    ]
    for service, health_port in health.items():
        service_env = {
            **env,
            "COURIER_DATA_DIR": str(data / service),
            "COURIER_HEALTH_PORT": str(health_port),
        }
        processes.append(
            (
                f"http://127.0.0.1:{health_port}",
                start_module(f"services.{service}", service_env, data / f"{service}.log"),
            )
        )
    return f"http://127.0.0.1:{port}", processes


async def run(
    namespace: str, base: str, notify_log: Path, args: argparse.Namespace
) -> tuple[list[list[Sent]], dict[str, float], dict[str, list[float]]]:
    port = int(base.rsplit(":", 1)[1])
    http = Http("127.0.0.1", port)
    rounds: list[list[Sent]] = []
    notified: dict[str, float] = {}
    try:
        count = int(args.rate * args.warmup)
        if count:
            warm = [f"{namespace}-warm-{k}" for k in range(count)]
            sent = await send_at_rate(http, warm, args.rate, args.records)
            expected = {derived_event_id(s.event_id, "dataset.processed") for s in sent}
            await drain(notify_log, expected, DRAIN_SECONDS)
            print(f"warm-up: {count} events in {args.warmup}s")
        for round_ in range(args.rounds):
            ids = [f"{namespace}-{round_}-{k}" for k in range(int(args.rate * args.seconds))]
            sent = await send_at_rate(http, ids, args.rate, args.records)
            accepted = [s for s in sent if s.status == 202]
            expected = {derived_event_id(s.event_id, "dataset.processed") for s in accepted}
            notified = await drain(notify_log, expected, DRAIN_SECONDS)
            rounds.append(sent)
            latencies = _latencies(sent, notified)
            figures = (
                ", ".join(f"p{p} {percentile(latencies, p):.1f} ms" for p in (50, 90, 99))
                if latencies
                else "nothing delivered"
            )
            print(
                f"round {round_ + 1}: {len(sent)} sent, {len(accepted)} accepted, "
                f"{len(latencies)} delivered; end to end {figures}"
            )
        measured = [s for sent in rounds for s in sent if s.status == 202]
        step = max(1, len(measured) // STAGE_SAMPLE)
        spans = await stages(base, measured[::step][:STAGE_SAMPLE], notified)
    finally:
        await http.close()
    print(f"client connections opened: {http.opened}")
    return rounds, notified, spans


def _latencies(sent: Sequence[Sent], notified: dict[str, float]) -> list[float]:
    found = (notified.get(derived_event_id(s.event_id, "dataset.processed")) for s in sent)
    return [(at - s.scheduled) * 1000 for s, at in zip(sent, found, strict=True) if at is not None]


def main(args: argparse.Namespace) -> None:
    namespace = new_namespace()
    data = Path(tempfile.mkdtemp())
    notify_log = data / "notifications.jsonl"
    base, processes = start_system(namespace, data)
    try:
        for url, process in processes:
            wait_ready(f"{url}/readyz", process=process)
        rounds, notified, spans = uvloop.run(run(namespace, base, notify_log, args))
    except BaseException:
        for log in sorted(data.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        for _, process in processes:
            stop(process)
        uvloop.run(cleanup(namespace))
        shutil.rmtree(data, ignore_errors=True)

    per_round = [_latencies(sent, notified) for sent in rounds]
    http_round = [[s.answered * 1000 for s in sent if s.status == 202] for sent in rounds]
    if not all(per_round) or not all(http_round):
        raise SystemExit("a round delivered nothing: see the figures above")
    results = []
    for label, values in (("end to end", per_round), ("HTTP 202", http_round)):
        for p in (50, 90, 99, 100):
            if label == "HTTP 202" and p in (90, 100):
                continue
            samples = [percentile(v, p) for v in values]
            name = f"{label} {'max' if p == 100 else f'p{p}'}"
            results.append(Result(name, "ms", statistics.median(samples), samples))
    pooled = [x for v in per_round for x in v]
    pooled_http = [x for v in http_round for x in v]
    sent_total = sum(len(sent) for sent in rounds)
    refused = sum(1 for sent in rounds for s in sent if s.status != 202)
    missing = sum(1 for sent in rounds for s in sent if s.status == 202) - len(pooled)
    lag = max(s.lag for sent in rounds for s in sent) * 1000
    print_table(
        f"End to end at {args.rate:g}/s, {args.records} records/event, "
        f"{args.seconds}s x {args.rounds} (per-round percentiles, median over rounds)",
        results,
    )
    summary = {
        "p50": percentile(pooled, 50),
        "p90": percentile(pooled, 90),
        "p99": percentile(pooled, 99),
        "max": max(pooled),
        "http_p50": percentile(pooled_http, 50),
        "http_p99": percentile(pooled_http, 99),
    }
    print(
        f"all rounds: end to end p50 {summary['p50']:.1f} ms, p90 {summary['p90']:.1f}, "
        f"p99 {summary['p99']:.1f}, max {summary['max']:.1f} (count {len(pooled)}); "
        f"HTTP 202 p50 {summary['http_p50']:.1f} ms, p99 {summary['http_p99']:.1f}"
    )
    print(f"targets: p50 <= {TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms")
    print(f"sent {sent_total}, non-202 {refused}, not delivered within the drain {missing}")
    print(f"largest send lag behind the schedule: {lag:.1f} ms")
    stage_figures = {
        name: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)}
        for name, v in spans.items()
        if v
    }
    print("\nStages (sampled events, status projection; p50 / p99 ms):")
    for name, figures in stage_figures.items():
        print(f"  {name:<42} {figures['p50']:>8.1f} {figures['p99']:>8.1f}  n={figures['n']}")
    save(
        "e2e_latency",
        results,
        {
            "rate": args.rate,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "records": args.records,
            "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS},
            "pooled": summary | {"count": len(pooled)},
            "sent": sent_total,
            "non_202": refused,
            "missing": missing,
            "max_send_lag_ms": lag,
            "stages_ms": stage_figures,
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=500, help="events per second")
    parser.add_argument("--seconds", type=float, default=20, help="length of a measured round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=5, help="seconds of unmeasured load")
    parser.add_argument("--records", type=int, default=3, help="records per dataset")
    main(parser.parse_args())
