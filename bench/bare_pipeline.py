"""The end-to-end benchmark's same-run baseline: the pipeline as careful hand-written aio-pika.

The same hops as Courier's gateway → processor → notifier, each a quorum queue, with the same
work and the same durability at each step, and nothing else (no validation models, inbox,
retries, dead-lettering, status or results):

* gateway: `bench.baselines:bare`, a FastAPI endpoint that publishes the body persistently and
  answers 202 once the broker confirmed;
* processor (`BARE_ROLE=processor`): summarises the records with Courier's own `summarise`,
  publishes the result (confirmed), then acks;
* notifier (`BARE_ROLE=notifier`): appends one JSON line with `delivered_at` to a file and
  fsyncs it, then acks.

    BARE_ROLE=processor|notifier AMQP_URL=... BARE_INBOUND=<queue consumed> \
        BARE_OUTBOUND=<processor: queue published to> BARE_NOTIFY_LOG=<notifier: file> \
        [BARE_PREFETCH=100] python -m bench.bare_pipeline
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime

import aio_pika
import orjson
import uvloop
from aio_pika.abc import AbstractIncomingMessage

from contracts.envelope import derived_event_id
from services.processor.summary import summarise

QUORUM = {"x-queue-type": "quorum"}


async def _consume(role: str) -> None:
    connection = await aio_pika.connect_robust(os.environ["AMQP_URL"])
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=int(os.environ.get("BARE_PREFETCH", "100")))
    inbound = await channel.declare_queue(
        os.environ["BARE_INBOUND"], durable=True, arguments=QUORUM
    )
    if role == "processor":
        outbound = os.environ["BARE_OUTBOUND"]
        await channel.declare_queue(outbound, durable=True, arguments=QUORUM)

        async def handle(message: AbstractIncomingMessage) -> None:
            event = orjson.loads(message.body)
            fields = summarise(event["data"]["records"])
            result = {
                "id": derived_event_id(event["id"], "dataset.processed"),
                "dataset_id": event["id"],
                "fields": {name: summary.model_dump() for name, summary in fields.items()},
            }
            await channel.default_exchange.publish(
                aio_pika.Message(
                    orjson.dumps(result), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                ),
                routing_key=outbound,
            )
            await message.ack()

    else:
        path = os.environ["BARE_NOTIFY_LOG"]

        def append(line: bytes) -> None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

        async def handle(message: AbstractIncomingMessage) -> None:
            result = orjson.loads(message.body)
            line = {"event_id": result["id"], "delivered_at": datetime.now(UTC).isoformat()}
            await asyncio.to_thread(append, orjson.dumps(line) + b"\n")
            await message.ack()

    await inbound.consume(handle)
    print("consuming", flush=True)
    await asyncio.Future()  # until the process is stopped


if __name__ == "__main__":
    role = os.environ.get("BARE_ROLE", "")
    if role not in ("processor", "notifier"):
        raise SystemExit("usage: BARE_ROLE=processor|notifier python -m bench.bare_pipeline")
    uvloop.run(_consume(role))
