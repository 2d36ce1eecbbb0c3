"""Draining dead letters into the failure store: how many a second a real gateway keeps.

Each round puts `--letters` dead letters (notifier work that failed, with a consumer's
failure headers, real events) into the notifier's dead-letter queue while the gateway is
stopped, starts it, and times from its readiness until the queue is empty and the store
holds every letter (`GET /v1/ops/count`). The same-run reference, rounds alternating: a bare
aio-pika consume-and-ack loop draining the same messages from a quorum queue at the same
prefetch (the drain's), storing nothing: the broker's ceiling for the deliveries alone.

    python -m bench.dlq_drain [--letters 5000] [--rounds 3] [--postgres URL]

`--postgres`: the gateway's store on that PostgreSQL server (in a database of its own, created
and dropped by the benchmark), instead of its SQLite file.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import httpx

from bench.consumer import bare as consume_and_ack
from bench.report import Result, median, print_table, save
from bench.system import (
    AMQP_URL,
    cleanup,
    courier_env,
    cpu_seconds,
    declare_quorum,
    free_port,
    new_namespace,
    postgres_database,
    postgres_option,
    publish_all,
    start_gateway,
    stop,
    wait_ready,
)
from contracts.events import NotificationRequested, NotificationRequestedData
from contracts.topology import work_queue
from services.messaging import failure as f
from services.messaging.dead_letters import DRAIN_PREFETCH
from services.messaging.settings import CourierSettings

TOKEN = "bench:" + "d" * 32


def messages(namespace: str, count: int) -> list[aio_pika.Message]:
    """Notifier work the notifier's consumer dead-lettered, as it does (its failure headers)."""
    now = datetime.now(UTC).isoformat()
    made = []
    for n in range(count):
        event = NotificationRequested(
            data=NotificationRequestedData(recipient=f"user-{n}@example.com", subject="welcome")
        )
        made.append(
            aio_pika.Message(
                event.model_dump_json().encode(),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event.id,
                correlation_id=event.id,
                type=event.type,
                content_type="application/json",
                headers={
                    f.REASON: "retries_exhausted",
                    f.ATTEMPT: 5,
                    f.FIRST_FAILED_AT: now,
                    f.FAILED_AT: now,
                    f.SERVICE: "notifier",
                    f.QUEUE: work_queue(namespace, "notifier"),
                    f.EVENT_ID: event.id,
                    f.EVENT_TYPE: event.type,
                    f.EXCEPTION_TYPE: "builtins.TimeoutError",
                    f.EXCEPTION_MESSAGE: "the SMTP server did not answer in 10 s",
                    f.TRACEBACK: "Traceback (most recent call last):\n...\nTimeoutError",
                },
            )
        )
    return made


async def stored(base: str, wanted: int) -> None:
    """Until the gateway's store counts `wanted` dead letters."""
    headers = {"Authorization": f"Bearer {TOKEN.split(':', 1)[1]}"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        while True:
            response = await client.get("/v1/ops/count", headers=headers)
            response.raise_for_status()
            if response.json()["count"] >= wanted:
                return
            await asyncio.sleep(0.2)  # each poll is CPU the gateway's drain then lacks


def courier_round(
    namespace: str, env: dict[str, str], data: Path, letters: int, total: int
) -> tuple[float, float]:
    """Letters a second the gateway stores from a full dead-letter queue, and the gateway's CPU
    per letter (ms) meanwhile; `total`: how many the store holds once they are in."""
    dlq = CourierSettings(namespace=namespace).topology("notifier").dead_letter_queue
    asyncio.run(publish_all(dlq, messages(namespace, letters)))
    port = free_port()
    gateway = start_gateway(env, port, log=data / "gateway.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/readyz", process=gateway)
        cpu_before = cpu_seconds(gateway.pid) or 0.0
        started = time.perf_counter()
        asyncio.run(stored(base, total))
        elapsed = time.perf_counter() - started
        cpu = (cpu_seconds(gateway.pid) or 0.0) - cpu_before
        return letters / elapsed, 1000 * cpu / letters
    finally:
        stop(gateway)


async def bare_round(namespace: str, queue: str, letters: int) -> float:
    """Letters a second a bare consume-and-ack loop drains at the drain's prefetch."""
    await declare_quorum(queue)
    await publish_all(queue, messages(namespace, letters))
    return letters / await consume_and_ack(AMQP_URL, queue, letters, DRAIN_PREFETCH)


def main(args: argparse.Namespace) -> None:
    with postgres_database(args.postgres, "bench_drain") as database:
        results = measure(database, args)
    store = "PostgreSQL" if database else "SQLite"
    print_table(
        f"Draining {args.letters} dead letters into the store, {store}, {args.rounds} rounds",
        results,
    )
    ratio = results[0].median / results[2].median
    print(f"courier / bare consume-and-ack: {ratio:.2f}x")
    save(
        "dlq_drain_postgres" if database else "dlq_drain",
        results,
        {
            "letters": args.letters,
            "prefetch": DRAIN_PREFETCH,
            "store": store,
            "ratio_to_bare": ratio,
        },
    )


def measure(database: str | None, args: argparse.Namespace) -> list[Result]:
    namespace = new_namespace()
    data = Path(tempfile.mkdtemp())
    bare_queue = f"{namespace}.bare-drain"
    env = courier_env(namespace, data, database, COURIER_OPS_TOKENS=TOKEN)
    courier: list[float] = []
    cpu: list[float] = []
    bare: list[float] = []
    try:
        # The gateway declares the topology the first time; the queue stays between rounds.
        port = free_port()
        gateway = start_gateway(env, port, log=data / "gateway.log")
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz", process=gateway)
        finally:
            stop(gateway)
        for round_ in range(args.rounds):
            total = (round_ + 1) * args.letters
            rate, per_letter = courier_round(namespace, env, data, args.letters, total)
            courier.append(rate)
            cpu.append(per_letter)
            bare.append(asyncio.run(bare_round(namespace, bare_queue, args.letters)))
            print(
                f"round {round_ + 1}: courier {rate:,.0f} letters/s "
                f"(gateway CPU {per_letter:.2f} ms a letter), "
                f"bare consume-and-ack {bare[-1]:,.0f}/s"
            )
    except BaseException:
        print((data / "gateway.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        asyncio.run(cleanup(namespace, bare_queue))
        shutil.rmtree(data, ignore_errors=True)
    return [
        Result("courier: dead letters stored", "letters/s", median(courier), courier),
        Result("courier: gateway CPU per letter", "ms", median(cpu), cpu),
        Result("bare aio-pika: consume and ack", "msgs/s", median(bare), bare),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--letters", type=int, default=5000, help="dead letters per round")
    parser.add_argument("--rounds", type=int, default=3)
    postgres_option(parser)
    main(parser.parse_args())
