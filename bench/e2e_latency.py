"""End to end: events at a fixed rate through gateway → processor → notifier, latency to the effect.

Real gateway (one uvicorn worker), processor and notifier processes in a fresh namespace. The
bench sends `dataset.submitted` events (a few records each, its own random UUIDs) at a fixed rate,
open-loop: each send is scheduled by the clock and never waits for an earlier response; every
latency counts from the scheduled time, so a stalled gateway cannot hide behind a slowed client
(no coordinated omission). The processor summarises each dataset and publishes
`dataset.processed` (id `derived_event_id(<id>, "dataset.processed")`); the notifier's `log`
channel appends one JSON line per notification with `delivered_at`.

* end-to-end latency: `delivered_at` minus the scheduled send time (the notifier stamps
  `delivered_at` just before its fsync'd append; the ack follows the fsync);
* HTTP latency: the `202` answer (the broker confirmed) minus the scheduled send time;
* stages (a sample of events, from the gateway's status projection): where the time goes.

The same-run baseline is the same pipeline as careful hand-written aio-pika
(`bench.bare_pipeline`: the same hops through quorum queues, the same summary, a confirmed
publish and an fsync'd line, and nothing else). Its rounds alternate with Courier's; both
systems run side by side throughout, the idle one waiting. A warm-up precedes the measured
rounds; a pipeline drains before the next round starts. The figures are compared with the
targets (p50 ≤ 5 ms, p99 ≤ 25 ms) and with the baseline. `--pin` keeps each pipeline's
processor on CPU 0 and its gateway and notifier on CPU 1, the same layout for both systems
(with `bench.private_broker --cpus 0`, the broker on CPU 0 too); saved as `e2e_latency_pinned`.

    python -m bench.e2e_latency [--rate 500] [--seconds 20] [--rounds 3] [--warmup 5] [--records 3]
        [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop

from bench.report import Result, print_table, save
from bench.system import (
    AMQP_URL,
    cleanup,
    courier_env,
    cpu_seconds,
    free_port,
    local_broker_pid,
    new_namespace,
    pin,
    start,
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
LAYOUT = {"processor": {0}, "gateway": {1}, "notifier": {1}}
"""`--pin`: the CPUs of each role, CPU 0 shared with the broker (`bench.private_broker --cpus
0`). The processor and the broker use about as much CPU per event as the gateway and the
notifier."""


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


class NotifyLog:
    """The log channel's file, read as it grows: notification event id → `delivered_at` (unix
    seconds). Only the bytes appended since the last read are parsed: re-reading the whole file
    every quarter second while a round drains cost ~90 ms a read by the third round, CPU taken
    from the pipeline still catching up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.delivered: dict[str, float] = {}
        self._offset = 0
        self._partial = b""  # a line the notifier had not finished writing

    def read(self) -> dict[str, float]:
        if not self.path.exists():
            return self.delivered
        with self.path.open("rb") as file:
            file.seek(self._offset)
            appended = file.read()
        self._offset += len(appended)
        *lines, self._partial = (self._partial + appended).split(b"\n")
        for line in lines:
            if line:
                record = orjson.loads(line)
                at = datetime.fromisoformat(record["delivered_at"]).timestamp()
                self.delivered[record["event_id"]] = at
        return self.delivered


async def drain(log: NotifyLog, expected: set[str], patience: float) -> dict[str, float]:
    """Wait until every expected notification is in the log (or `patience` ran out)."""
    found = log.read()
    for _ in range(int(patience / 0.25)):
        if expected <= found.keys():
            break
        await asyncio.sleep(0.25)
        found = log.read()
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
    """Per stage, the ms each sampled event spent there, from the gateway's status projection.

    The path runs request → accepted → processor started → notifier started → delivered_at: a
    consumer publishes its follow-ups before it acknowledges. Its `succeeded` comes with the
    acknowledgement, after the inbox's group commit (`COURIER_INBOX_COMMIT_DELAY_MS`), so it
    is shown beside the path, from the step it follows."""
    path = (
        "request → gateway accepted",
        "gateway accepted → processor started",
        "processor started → notifier started",
        "notifier started → delivered_at",
    )
    beside = (
        "processor started → processor succeeded",
        "delivered_at → notifier succeeded",
        "gateway accepted → HTTP 202 seen",
    )
    spans: dict[str, list[float]] = {name: [] for name in (*path, *beside)}
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
            accepted_at = dataset.get("accepted_at")
            accepted = datetime.fromisoformat(accepted_at).timestamp() if accepted_at else None
            started = _step_time(dataset, "processor", "processing")
            delivered = notified.get(derived)
            times = [
                sent.scheduled,
                accepted,
                started,
                _step_time(processed, "notifier", "processing"),
                delivered,
            ]
            pairs = [
                *itertools.pairwise(times),
                (started, _step_time(dataset, "processor", "succeeded")),
                (delivered, _step_time(processed, "notifier", "succeeded")),
                (accepted, None if accepted is None else sent.scheduled + sent.answered),
            ]
            for name, (begin, end) in zip(spans, pairs, strict=True):
                if begin is not None and end is not None:
                    spans[name].append((end - begin) * 1000)
    return spans


@dataclass
class System:
    """A running pipeline: where to send events, where its notifications land."""

    name: str
    base: str
    notify_log: NotifyLog
    processes: dict[str, tuple[str, subprocess.Popen[bytes]]]
    """Role → (readiness probe, process)."""
    cpu: dict[str, float] = field(default_factory=dict)
    """Role → CPU seconds used during the measured rounds."""
    events: int = 0
    """Events sent in the measured rounds."""

    def cpu_now(self) -> dict[str, float | None]:
        used = {role: cpu_seconds(p.pid) for role, (_, p) in self.processes.items()}
        # Rounds alternate and the idle system sends nothing: the broker's CPU during a
        # round is this system's.
        broker = local_broker_pid()
        if broker is not None:
            used["broker"] = cpu_seconds(broker)
        return used

    def charge(self, before: dict[str, float | None], events: int) -> None:
        """Add the CPU used since `before` (a `cpu_now`) by a measured round of `events`."""
        for role, used in self.cpu_now().items():
            start_ = before.get(role)
            if used is not None and start_ is not None:
                self.cpu[role] = self.cpu.get(role, 0.0) + used - start_
        self.events += events


def start_courier(namespace: str, data: Path) -> System:
    env = courier_env(
        namespace,
        data,
        COURIER_NOTIFY_LOG=str(data / "notifications.jsonl"),
        COURIER_BLOB_DIR=str(data / "blobs"),
    )
    port = free_port()
    health = {"processor": free_port(), "notifier": free_port()}
    processes = {
        "gateway": (
            f"http://127.0.0.1:{port}/readyz",
            start_gateway(
                {**env, "COURIER_DATA_DIR": str(data / "gateway")}, port, data / "gateway.log"
            ),
        )
    }
    for service, health_port in health.items():
        service_env = {
            **env,
            "COURIER_DATA_DIR": str(data / service),
            "COURIER_HEALTH_PORT": str(health_port),
        }
        processes[service] = (
            f"http://127.0.0.1:{health_port}/readyz",
            start_module(f"services.{service}", service_env, data / f"{service}.log"),
        )
    return System(
        "courier", f"http://127.0.0.1:{port}", NotifyLog(data / "notifications.jsonl"), processes
    )


def bare_queues(namespace: str) -> tuple[str, str]:
    return f"{namespace}.bare.processor", f"{namespace}.bare.notifier"


def start_bare(namespace: str, data: Path) -> System:
    """The baseline pipeline (`bench.bare_pipeline`), on queues of its own in `namespace`."""
    to_processor, to_notifier = bare_queues(namespace)
    notify_log = data / "bare-notifications.jsonl"
    port = free_port()
    gateway = start(
        "bench.baselines:bare",
        {"AMQP_URL": AMQP_URL, "BENCH_QUEUE": to_processor},
        port,
        log=data / "bare-gateway.log",
    )
    roles = {
        "processor": {"BARE_INBOUND": to_processor, "BARE_OUTBOUND": to_notifier},
        "notifier": {"BARE_INBOUND": to_notifier, "BARE_NOTIFY_LOG": str(notify_log)},
    }
    processes = {"gateway": (f"http://127.0.0.1:{port}/", gateway)}
    for role, env in roles.items():
        log = data / f"bare-{role}.log"
        env = {"AMQP_URL": AMQP_URL, "BARE_ROLE": role, **env}
        processes[role] = (f"log:{log}", start_module("bench.bare_pipeline", env, log))
    return System("bare aio-pika", f"http://127.0.0.1:{port}", NotifyLog(notify_log), processes)


def wait_started(system: System) -> None:
    """Every process answers its readiness URL, or (`log:<path>`) has logged `consuming`."""
    for probe, process in system.processes.values():
        if not probe.startswith("log:"):
            wait_ready(probe, process=process)
            continue
        log = Path(probe.removeprefix("log:"))
        deadline = time.monotonic() + 30
        while not (log.exists() and b"consuming" in log.read_bytes()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{log.name}: the process did not start consuming")
            time.sleep(0.2)


async def one_round(
    system: System, http: Http, ids: Sequence[str], args: argparse.Namespace
) -> tuple[list[Sent], dict[str, float]]:
    """Send `ids` at the rate and wait until their notifications are in the system's log; what
    was sent, and the log's notifications (id → `delivered_at`)."""
    sent = await send_at_rate(http, ids, args.rate, args.records)
    accepted = {derived_event_id(s.event_id, "dataset.processed") for s in sent if s.status == 202}
    return sent, await drain(system.notify_log, accepted, DRAIN_SECONDS)


async def run(
    systems: Sequence[System], args: argparse.Namespace
) -> tuple[dict[str, list[list[Sent]]], dict[str, dict[str, float]], dict[str, list[float]]]:
    """Warm both up, then alternate measured rounds; stages are read for Courier's events.
    Per system: the rounds sent, and the notifications delivered (id → `delivered_at`)."""
    clients = {s.name: Http("127.0.0.1", int(s.base.rsplit(":", 1)[1])) for s in systems}
    rounds: dict[str, list[list[Sent]]] = {s.name: [] for s in systems}
    try:
        count = int(args.rate * args.warmup)
        for system in systems if count else ():
            warm = event_ids(count)
            await one_round(system, clients[system.name], warm, args)
            print(f"warm-up ({system.name}): {count} events in {args.warmup}s")
        for round_ in range(args.rounds):
            for system in systems:
                ids = event_ids(int(args.rate * args.seconds))
                before = system.cpu_now()
                sent, notified_now = await one_round(system, clients[system.name], ids, args)
                system.charge(before, len(sent))
                rounds[system.name].append(sent)
                latencies = _latencies(sent, notified_now)
                figures = (
                    ", ".join(f"p{p} {percentile(latencies, p):.1f} ms" for p in (50, 90, 99))
                    + _slowest(sent, notified_now)
                    if latencies
                    else "nothing delivered"
                )
                accepted = sum(1 for s in sent if s.status == 202)
                print(
                    f"round {round_ + 1} ({system.name}): {len(sent)} sent, {accepted} accepted, "
                    f"{len(latencies)} delivered; end to end {figures}"
                )
        courier = systems[0]
        measured = [s for sent in rounds[courier.name] for s in sent if s.status == 202]
        step = max(1, len(measured) // STAGE_SAMPLE)
        sample = measured[::step][:STAGE_SAMPLE]
        notified = {system.name: system.notify_log.read() for system in systems}
        spans = await stages(courier.base, sample, notified[courier.name])
    finally:
        for http in clients.values():
            await http.close()
    return rounds, notified, spans


def event_ids(count: int) -> list[str]:
    """Random UUIDs, like the ids clients send or the gateway assigns: ids that sort in sending
    order would let every store's B-trees append, ~4x cheaper than real traffic."""
    return [str(uuid.uuid4()) for _ in range(count)]


def _slowest(sent: Sequence[Sent], notified: dict[str, float]) -> str:
    """When the round's slowest event was sent (UTC), to match a stall against the broker's log
    (a quorum queue WAL roll-over on a shared node stalls every queue for a moment)."""
    found = [
        (at - s.scheduled, s.scheduled)
        for s in sent
        if (at := notified.get(derived_event_id(s.event_id, "dataset.processed"))) is not None
    ]
    worst, at = max(found)
    return f", max {worst * 1000:.1f} ms at {datetime.fromtimestamp(at, UTC):%H:%M:%S}"


def _latencies(sent: Sequence[Sent], notified: dict[str, float]) -> list[float]:
    found = (notified.get(derived_event_id(s.event_id, "dataset.processed")) for s in sent)
    return [(at - s.scheduled) * 1000 for s, at in zip(sent, found, strict=True) if at is not None]


def main(args: argparse.Namespace) -> None:
    namespace = new_namespace()
    data = Path(tempfile.mkdtemp())
    systems = [start_courier(namespace, data), start_bare(namespace, data)]
    try:
        for system in systems:
            wait_started(system)
            for role, (_, process) in system.processes.items() if args.pin else ():
                pin(process.pid, LAYOUT[role])
        rounds, notified, spans = uvloop.run(run(systems, args))
    except BaseException:
        for log in sorted(data.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        for system in systems:
            for _, process in system.processes.values():
                stop(process)
        uvloop.run(cleanup(namespace, *bare_queues(namespace)))
        shutil.rmtree(data, ignore_errors=True)
    report(args, systems, rounds, notified, spans)


def _figures(sent_rounds: list[list[Sent]], notified: dict[str, float]) -> dict[str, Any]:
    per_round = [_latencies(sent, notified) for sent in sent_rounds]
    http_round = [[s.answered * 1000 for s in sent if s.status == 202] for sent in sent_rounds]
    if not all(per_round) or not all(http_round):
        raise SystemExit("a round delivered nothing: see the figures above")
    pooled = [x for v in per_round for x in v]
    pooled_http = [x for v in http_round for x in v]
    return {
        "per_round": per_round,
        "http_round": http_round,
        "p50": percentile(pooled, 50),
        "p90": percentile(pooled, 90),
        "p99": percentile(pooled, 99),
        "max": max(pooled),
        "http_p50": percentile(pooled_http, 50),
        "http_p99": percentile(pooled_http, 99),
        "count": len(pooled),
        "sent": sum(len(sent) for sent in sent_rounds),
        "non_202": sum(1 for sent in sent_rounds for s in sent if s.status != 202),
        "missing": sum(1 for sent in sent_rounds for s in sent if s.status == 202) - len(pooled),
        "max_send_lag_ms": max(s.lag for sent in sent_rounds for s in sent) * 1000,
    }


def report(
    args: argparse.Namespace,
    systems: Sequence[System],
    rounds: dict[str, list[list[Sent]]],
    notified: dict[str, dict[str, float]],
    spans: dict[str, list[float]],
) -> None:
    results = []
    figures = {}
    for system in systems:
        f = figures[system.name] = _figures(rounds[system.name], notified[system.name])
        for label, values in (("end to end", f["per_round"]), ("HTTP 202", f["http_round"])):
            for p in (50, 90, 99, 100):
                if label == "HTTP 202" and p in (90, 100):
                    continue
                samples = [percentile(v, p) for v in values]
                name = f"{system.name}: {label} {'max' if p == 100 else f'p{p}'}"
                results.append(Result(name, "ms", statistics.median(samples), samples))
    print_table(
        f"End to end at {args.rate:g}/s, {args.records} records/event, "
        f"{args.seconds}s x {args.rounds} (per-round percentiles, median over rounds)",
        results,
    )
    for name, f in figures.items():
        print(
            f"{name}, all rounds: end to end p50 {f['p50']:.1f} ms, p90 {f['p90']:.1f}, "
            f"p99 {f['p99']:.1f}, max {f['max']:.1f} (count {f['count']}); HTTP 202 p50 "
            f"{f['http_p50']:.1f} ms, p99 {f['http_p99']:.1f}; sent {f['sent']}, non-202 "
            f"{f['non_202']}, not delivered {f['missing']}, largest send lag "
            f"{f['max_send_lag_ms']:.1f} ms"
        )
    courier, bare = (figures[s.name] for s in systems)
    ratios = {p: courier[p] / bare[p] for p in ("p50", "p99")}
    print(
        f"targets: p50 <= {TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms; "
        f"courier / bare aio-pika: p50 {ratios['p50']:.2f}x, p99 {ratios['p99']:.2f}x"
    )
    cpu = {
        s.name: {role: used * 1000 / s.events for role, used in s.cpu.items()}
        for s in systems
        if s.events and s.cpu
    }
    if cpu:
        print(
            "\nCPU per event in the measured rounds (ms; the broker: the local RabbitMQ node "
            "during the system's rounds; the load generator not counted):"
        )
        for name, per_role in cpu.items():
            roles = ", ".join(f"{role} {ms:.2f}" for role, ms in per_role.items())
            own = sum(ms for role, ms in per_role.items() if role != "broker")
            with_broker = (
                f", {sum(per_role.values()):.2f} with the broker" if "broker" in per_role else ""
            )
            print(f"  {name:<14} {roles}; processes {own:.2f}{with_broker}")
    stage_figures = {
        name: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)}
        for name, v in spans.items()
        if v
    }
    print("\nStages of Courier's events (sampled, status projection; p50 / p99 ms):")
    for name, stage in stage_figures.items():
        print(f"  {name:<42} {stage['p50']:>8.1f} {stage['p99']:>8.1f}  n={stage['n']}")
    pooled = {
        name: {k: v for k, v in f.items() if k not in ("per_round", "http_round")}
        for name, f in figures.items()
    }
    save(
        "e2e_latency_pinned" if args.pin else "e2e_latency",
        results,
        {
            "rate": args.rate,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "records": args.records,
            "pinned": {role: sorted(cpus) for role, cpus in LAYOUT.items()} if args.pin else None,
            "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS},
            "pooled": pooled,
            "ratio_to_bare": ratios,
            "cpu_ms_per_event": cpu,
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
    parser.add_argument(
        "--pin", action="store_true", help="keep each role on its CPUs (see LAYOUT)"
    )
    main(parser.parse_args())
