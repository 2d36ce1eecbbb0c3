"""Replaying dead letters: how many a second an operator's replay moves, through a real gateway.

Each round stores `--letters` fresh dead letters (notifier work, real events) in the gateway's
failure store, then times one `POST /v1/ops/replays` of all of them at a rate no replay reaches
(the answer comes once every letter is published, confirmed and marked). The same-run
reference, rounds alternating: the same messages published by bare aio-pika into the same kind
of queue (quorum), confirmed, 256 in flight: the broker's ceiling for the publishes alone, with
no store, no claim and no audit. Queues are purged between rounds.

    python -m bench.replay [--letters 2000] [--rounds 3] [--postgres URL]

`--postgres`: the gateway's store on that PostgreSQL server (in a database of its own, created
and dropped), instead of a SQLite file.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import httpx

from bench.report import Result, median, print_table, save
from bench.system import (
    cleanup,
    courier_env,
    declare_quorum,
    free_port,
    new_namespace,
    postgres_database,
    postgres_option,
    publish_all,
    purge,
    start_gateway,
    stop,
    wait_ready,
)
from contracts.events import NotificationRequested, NotificationRequestedData
from contracts.topology import work_queue
from services.messaging.dead_letters import DeadLetter
from services.messaging.store import open_store, store_url
from services.ops.store import FailureStore

TOKEN = "bench:" + "b" * 32


def dead_letters(namespace: str, count: int) -> list[DeadLetter]:
    now = datetime.now(UTC)
    made = []
    for n in range(count):
        event = NotificationRequested(
            data=NotificationRequestedData(recipient=f"user-{n}@example.com", subject="welcome")
        )
        made.append(
            DeadLetter(
                id=uuid.uuid4().hex,
                service="notifier",
                queue=work_queue(namespace, "notifier"),
                event_id=event.id,
                event_type=event.type,
                reason="retries_exhausted",
                attempts=5,
                replays=0,
                first_failure=now,
                last_failure=now,
                exception_type="builtins.TimeoutError",
                exception_message="the SMTP server did not answer within 10 seconds",
                traceback="Traceback (most recent call last):\n...\nTimeoutError",
                fingerprint="f" * 16,
                group="g-timeout",
                body=event.model_dump_json().encode(),
                headers={"courier-reason": "retries_exhausted", "courier-attempt": 5},
                correlation_id=event.id,
            )
        )
    return made


async def seed(database: str | None, data: Path, letters: list[DeadLetter]) -> None:
    engine = open_store(store_url(database, data, "gateway"))
    try:
        store = FailureStore(engine)
        await store.start()
        for letter in letters:
            await store.add(letter)
    finally:
        await engine.dispose()


async def courier_round(
    base: str, database: str | None, data: Path, letters: list[DeadLetter]
) -> float:
    """Letters a second of one replay of `letters` through the gateway's ops API."""
    await seed(database, data, letters)
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        started = time.perf_counter()
        response = await client.post(
            "/v1/ops/replays",
            json={"all": True, "limit": len(letters), "rate": 10_000},
            headers={"Authorization": f"Bearer {TOKEN.split(':', 1)[1]}"},
        )
        took = time.perf_counter() - started
    response.raise_for_status()
    moved = int(response.json()["count"])
    if moved != len(letters):
        raise SystemExit(f"the replay moved {moved} of {len(letters)}: {response.text[:500]}")
    return moved / took


async def bare_round(queue: str, letters: list[DeadLetter]) -> float:
    """Letters a second of the same messages published by bare aio-pika, 256 in flight."""
    await declare_quorum(queue)
    messages = [
        aio_pika.Message(
            letter.body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=letter.event_id,
            headers=letter.headers,
        )
        for letter in letters
    ]
    started = time.perf_counter()
    await publish_all(queue, messages)
    took = time.perf_counter() - started
    await purge(queue)
    return len(letters) / took


def bare_queue(namespace: str) -> str:
    return f"{namespace}.bare-replay"


async def run(
    namespace: str, base: str, database: str | None, data: Path, args: argparse.Namespace
) -> list[Result]:
    courier: list[float] = []
    bare: list[float] = []
    for round_ in range(args.rounds):
        letters = dead_letters(namespace, args.letters)
        courier.append(await courier_round(base, database, data, letters))
        await purge(work_queue(namespace, "notifier"))
        bare.append(await bare_round(bare_queue(namespace), letters))
        print(
            f"round {round_ + 1}: courier {courier[-1]:,.0f} letters/s, "
            f"bare publishes {bare[-1]:,.0f}/s"
        )
    return [
        Result("courier: replay (POST /v1/ops/replays)", "letters/s", median(courier), courier),
        Result("bare aio-pika: confirmed publishes, 256 in flight", "msgs/s", median(bare), bare),
    ]


def main(args: argparse.Namespace) -> None:
    with postgres_database(args.postgres, "bench_replay") as database:
        results = measure(database, args)
    store = "PostgreSQL" if database else "SQLite"
    print_table(f"Replay of {args.letters} dead letters, {store}, {args.rounds} rounds", results)
    ratio = results[0].median / results[1].median
    print(f"courier / bare publishes: {ratio:.2f}x")
    save(
        "replay_postgres" if database else "replay",
        results,
        {"letters": args.letters, "store": store, "ratio_to_bare": ratio},
    )


def measure(database: str | None, args: argparse.Namespace) -> list[Result]:
    namespace = new_namespace()
    data = Path(tempfile.mkdtemp())
    port = free_port()
    env = courier_env(namespace, data, database, COURIER_OPS_TOKENS=TOKEN)
    gateway = start_gateway(env, port, log=data / "gateway.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", process=gateway)
        base = f"http://127.0.0.1:{port}"
        return asyncio.run(run(namespace, base, database, data, args))
    except BaseException:
        print((data / "gateway.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        stop(gateway)
        # Once the gateway is gone: it declares again a queue deleted under it.
        asyncio.run(cleanup(namespace, bare_queue(namespace)))
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--letters", type=int, default=2000, help="dead letters per round")
    parser.add_argument("--rounds", type=int, default=3)
    postgres_option(parser)
    main(parser.parse_args())
