"""Dead letters as the gateway keeps them: stored for operators, and shown in their event's status.

The letter is the durable account of a failure. A consumer acks its delivery once the letter is
confirmed, and a status report sent after that could die with the process. A letter the broker
made (a delivery that kept crashing its consumer) has no consumer to report it at all. So every
letter of a tracked event becomes a `dead_lettered` transition. A consumer also reports the same
transition (an earlier gateway needed it): same time, attempt, reason, group and detail, so
the projection keeps it once.
"""

from __future__ import annotations

from datetime import datetime

from contracts.tracking import MAX_DETAIL, MAX_LABEL, Transition
from services.gateway.tracking import Tracking
from services.messaging.batching import Batcher
from services.messaging.dead_letters import DeadLetter, Sink, in_status, precise_time
from services.messaging.failure import FAILED_AT, REASON
from services.messaging.store import row_may_be_at_fault
from services.ops.store import FailureStore


def keep_letters(failures: FailureStore, tracking: Tracking) -> Sink:
    """The dead-letter drain's sink: store the letter, then show it in its event's status."""

    async def apply(transitions: list[Transition]) -> list[None]:
        await tracking.apply(transitions)
        return [None] * len(transitions)

    # The letters the drain delivers while a transaction runs share the next one (the drain
    # stores up to its prefetch at once): a transaction per letter kept ~430 letters a second.
    # A letter the store refuses fails alone, for the drain to store it in plain form. The
    # transitions of a stored batch come together too, so their write needs no linger: one
    # of 20 ms held each window of letters unacked, and capped the drain at ~1,300 a second.
    projections: Batcher[Transition, None] = Batcher(apply, isolate=row_may_be_at_fault)
    stores: Batcher[DeadLetter, datetime] = Batcher(
        failures.store_many, isolate=row_may_be_at_fault
    )

    async def keep(letter: DeadLetter) -> None:
        stored_at = await stores.submit(letter)
        transition = dead_lettered(letter, stored_at)
        if transition is not None:
            await projections.submit(transition)

    return keep


def dead_lettered(letter: DeadLetter, stored_at: datetime) -> Transition | None:
    """The letter's transition in its event's status; None unless the letter is of an event
    the status tracks at that service (`in_status`). `stored_at`: when the failure store first
    took it."""
    if not in_status(letter):
        return None
    assert letter.event_id is not None  # `in_status`
    assert letter.event_type is not None
    by_consumer = REASON in letter.headers
    detail = (
        f"{letter.exception_type}: {letter.exception_message}"
        if letter.exception_type
        else letter.exception_message or ""
    )
    return Transition.model_construct(
        event_id=letter.event_id,
        event_type=letter.event_type,
        service=letter.service,
        state="dead_lettered",
        # A consumer's failure time, to the microsecond (what its own report carries). The
        # broker's `x-death` has whole seconds, which could order the letter before the
        # attempt's `processing`: the letter's first arrival stands in for it, the same each
        # time the letter comes back (a redelivery, a retry after a store failure).
        at=precise_time(letter.headers.get(FAILED_AT)) or stored_at,
        # The broker counts deliveries, not attempts: a letter of its own has none.
        attempt=letter.attempts if by_consumer else None,
        reason=letter.reason[:MAX_LABEL],
        group=letter.group,
        detail=detail[:MAX_DETAIL] or None,
    )
