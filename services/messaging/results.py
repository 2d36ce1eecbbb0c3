"""Results for the gateway, batched: one `results.reported` per batch, not a delivery per result.

A handler's follow-up of a type the gateway keeps (`RESULT_TYPES`) is published to its
subscribers as usual and also handed to the `ResultReporter`; the input is acknowledged only
once the report holding the result is confirmed, like any follow-up. A crash before that
redelivers the input, and its inbox record brings the result back for another report; the
gateway keeps a dataset's first result, so a second report of it changes nothing.

Reports linger like the inbox's group commit, which the acknowledgement waits for anyway: at a
steady rate the gateway takes one delivery per interval instead of one per result (each was
~0.3 ms of its CPU, mostly the AMQP client's per-delivery work).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any, Final

import orjson

from contracts.envelope import new_event_id, utcnow
from contracts.events import MAX_RESULTS, ResultsReported, ResultsReportedData
from services.messaging.batching import Batcher
from services.messaging.publisher import Publisher, envelope_body

MAX_REPORT_BYTES: Final = 1 << 20
"""A report ends after about this many bytes of results (a larger result goes alone)."""


class ResultReporter:
    def __init__(
        self,
        service: str,
        publisher: Publisher,
        exchange: str,
        *,
        linger: float,
        batch: int,
    ) -> None:
        self._source = f"urn:courier:{service}"
        self._publisher = publisher
        self._exchange = exchange
        self._batcher: Batcher[bytes, None] = Batcher(
            self._publish, max_size=max(1, min(batch, MAX_RESULTS)), linger=linger
        )

    def report(self, results: Sequence[bytes]) -> asyncio.Future[Any]:
        """Done once every result (its body, `event_body`) is in a report the broker confirmed;
        else it raises what the publisher raised (`BrokerUnavailable`, `Unroutable`)."""
        if len(results) == 1:  # the usual case: the item's own future, no gathering one
            return self._batcher.enqueue(results[0])
        return asyncio.gather(*(self._batcher.enqueue(result) for result in results))

    async def _publish(self, results: list[bytes]) -> list[None]:
        outcomes = await asyncio.gather(
            *(self._publish_one(chunk) for chunk in _chunks(results)),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [None] * len(results)

    async def _publish_one(self, bodies: list[bytes]) -> None:
        # The envelope gives the message its id and properties; the body embeds each result
        # as it was serialised (what `EVENT_ADAPTER.dump_json` of the whole report would give).
        report = ResultsReported.model_construct(  # id and time given: no default factories
            id=new_event_id(),
            time=utcnow(),
            source=self._source,
            data=ResultsReportedData.model_construct(results=[]),
        )
        body = envelope_body(report, {"results": [orjson.Fragment(b) for b in bodies]})
        await self._publisher.publish_event(report, exchange=self._exchange, body=body)


def _chunks(bodies: list[bytes]) -> Iterator[list[bytes]]:
    """The bodies in order, in runs of at most `MAX_RESULTS` and about `MAX_REPORT_BYTES`."""
    chunk: list[bytes] = []
    size = 0
    for body in bodies:
        if chunk and (size + len(body) > MAX_REPORT_BYTES or len(chunk) == MAX_RESULTS):
            yield chunk
            chunk, size = [], 0
        chunk.append(body)
        size += len(body)
    if chunk:
        yield chunk
