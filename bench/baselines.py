"""The apps Courier's gateway is measured against, in the same run.

* `background`: FastAPI with an async no-op `BackgroundTasks` task — the non-durable floor
  every user starts from (nothing is stored; a crash loses the work).
* `bare`: FastAPI doing a bare aio-pika persistent publish with a confirm per request — what
  a careful hand-written endpoint does.

    uvicorn bench.baselines:background --loop uvloop --http httptools
    AMQP_URL=... BENCH_QUEUE=... uvicorn bench.baselines:bare --loop uvloop --http httptools
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
import orjson
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse

background = FastAPI()


async def _no_op(payload: dict[str, object]) -> None:
    return None


@background.post("/v1/events")
async def accept_in_process(request: Request, tasks: BackgroundTasks) -> JSONResponse:
    payload = orjson.loads(await request.body())
    tasks.add_task(_no_op, payload)
    return JSONResponse({"accepted": True}, status_code=202)


@asynccontextmanager
async def _broker(app: FastAPI) -> AsyncIterator[None]:
    connection = await aio_pika.connect_robust(os.environ["AMQP_URL"])
    channel = await connection.channel(publisher_confirms=True)
    queue = os.environ["BENCH_QUEUE"]
    await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    app.state.channel = channel
    app.state.queue = queue
    yield
    await connection.close()


bare = FastAPI(lifespan=_broker)


@bare.post("/v1/events")
async def publish_confirmed(request: Request) -> JSONResponse:
    body = await request.body()
    orjson.loads(body)
    await request.app.state.channel.default_exchange.publish(
        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        routing_key=request.app.state.queue,
    )
    return JSONResponse({"accepted": True}, status_code=202)
