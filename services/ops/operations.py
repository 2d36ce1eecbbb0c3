"""Replay and discard: moving dead letters safely, with an audit record of every operation.

A replay claims letters in the store, publishes each (confirmed) into the work queue of the
service that failed it, and only then marks it replayed. A crash midway leaves every letter
either still dead (claimed letters return to `dead` after the lease) or back in its work queue
(possibly both, and then the consumer's inbox drops the duplicate): nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import DBAPIError

from contracts.tracking import Transition
from services.messaging.dead_letters import DeadLetter, in_status, replay
from services.messaging.errors import BrokerUnavailable, Unpublishable, Unroutable
from services.messaging.logs import get_logger
from services.messaging.publisher import Publisher
from services.messaging.store import STORE_ERRORS
from services.ops.store import Discarded, FailureStore, Filter

log = get_logger("ops")

TOGETHER_SECONDS = 0.05
"""A replay moves letters in windows of what its rate allows in this time (at least one, at
most `MOST_TOGETHER`): published together, their confirms awaited together, marked in one
transaction. One letter at a time, each confirmed and marked on its own, moved ~200 a second
whatever the rate asked for."""
MOST_TOGETHER = 100
WINDOW_BYTES = 8 * 1024 * 1024
"""The most body bytes a window holds (beyond its first letter): a hundred letters of 1 MiB,
held as read, as messages and as frames, took ~390 MB at once."""


def together(rate: float) -> int:
    """How many letters a replay at `rate` letters a second moves at once."""
    return max(1, min(MOST_TOGETHER, int(rate * TOGETHER_SECONDS)))


def _reason(exc: BaseException) -> str:
    """Why a replay stopped, as its answer says it: a store's error by the driver's message.
    SQLAlchemy's own rendering carries the statement and its parameters (a letter's fields)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"the failure store failed: {type(exc.orig).__name__}: {exc.orig}"
    return str(exc)


def _moved(letter: DeadLetter | Discarded, action_id: str, actor: str) -> dict[str, Any]:
    """The fields of a moved letter's log line: its event's ids, its queue, the action, who."""
    return {
        "event_id": letter.event_id,
        "correlation_id": letter.correlation_id,
        "letter_id": letter.id,
        "queue": letter.queue,
        "action_id": action_id,
        "actor": actor,
    }


@dataclass(frozen=True)
class Outcome:
    action_id: str
    dry_run: bool
    count: int
    ids: list[str]
    error: str | None = None
    """Why the operation stopped early (the broker went away); `count` says what was done."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Letters a replay left dead, and why (nothing bound for them: no service takes them)."""


class Operations:
    def __init__(
        self,
        store: FailureStore,
        publisher: Publisher,
        namespace: str,
        lease: timedelta,
        on_replayed: Callable[[Sequence[Transition]], Awaitable[None]] | None = None,
    ) -> None:
        self._on_replayed = on_replayed
        self._store = store
        self._publisher = publisher
        self._namespace = namespace
        self._lease = lease

    async def replay(
        self, selection: Filter, *, actor: str, limit: int, rate: float, dry_run: bool
    ) -> Outcome:
        await self._store.release_expired(self._lease)  # letters of a replay that died
        if dry_run:  # exactly what a real run would take now, in its order
            ids = await self._store.preview(selection, limit=limit, lease=self._lease)
            action_id = await self._store.record_action(
                action="replay", actor=actor, selection=selection, dry_run=True, count=len(ids)
            )
            return Outcome(action_id, True, len(ids), ids)

        # Recorded before any letter moves, its count kept up as it goes: a replay that dies
        # midway (the letters it moved name the action) is still in the audit trail.
        action_id = await self._store.record_action(
            action="replay", actor=actor, selection=selection, dry_run=False, count=0
        )
        token, claimed = await self._store.claim(selection, limit=limit, lease=self._lease)
        moved: list[str] = []
        skipped: dict[str, str] = {}
        error: str | None = None
        unmarked: list[DeadLetter] = []  # published, their marks not written
        replayed_at = datetime.now(UTC)
        size = together(rate)
        next_at = time.monotonic()
        # Renewed every third of a lease while the replay runs, its pauses included (a slow
        # rate can pause longer than the lease): not per letter, since a renewal writes every
        # letter the replay still holds (5,000 of them took 0.17 s on PostgreSQL).
        renewing = asyncio.get_running_loop().create_task(
            self._keep_renewed(token, action_id, moved)
        )
        try:
            at = 0
            while at < len(claimed):
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                started = time.monotonic()
                window, letters = await self._held_letters(token, claimed[at : at + size])
                at += len(window)
                next_at = started + len(window) / rate
                # Stamped before the publish: the service may report its new attempt before
                # the letter is marked, and the status must keep them in that order.
                replayed_at = datetime.now(UTC)
                publishing = asyncio.ensure_future(self._publish(letters, skipped))
                try:
                    published, failure = await asyncio.shield(publishing)
                except asyncio.CancelledError:
                    # Cancelled (the gateway stopping past its grace period): the broker keeps
                    # what was written all the same. Which it took is known once each publish
                    # settles (within the confirm timeout); marked below, before the release
                    # would make them dead again for a discard to take.
                    unmarked, _ = await publishing
                    raise
                unmarked = published
                marked = await self._mark(published, action_id, token, actor)
                unmarked = []
                await self._replayed(marked, replayed_at, action_id, actor, moved)
                if failure is not None:
                    raise failure
        except (BrokerUnavailable, *STORE_ERRORS) as exc:
            # Said with what was done: letters published but not marked are marked once more
            # below; if the store still refuses, they are dead again and a later replay sends
            # them once more (the consumers' inboxes drop the repeat).
            error = _reason(exc)
            log.warning("replay stopped early", extra={"moved": len(moved), "error": str(exc)})
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
            if unmarked:
                # Published, but the store failed their marks (a connection cut under it):
                # marked once more before the release, which would make them dead again at
                # once, for a discard to take although the service has them.
                with contextlib.suppress(BrokerUnavailable, *STORE_ERRORS):
                    marked = await self._mark(unmarked, action_id, token, actor)
                    await self._replayed(marked, replayed_at, action_id, actor, moved)
            unrecorded = await self._close_replay(token, action_id, actor, moved)
        error = error or unrecorded
        if skipped:
            log.warning(
                "dead letters left dead: no queue takes them, or AMQP cannot carry them",
                extra={"ids": skipped},
            )
        log.info("replayed dead letters", extra={"count": len(moved), "actor": actor})
        return Outcome(action_id, False, len(moved), moved, error, skipped)

    async def _held_letters(
        self, token: str, window: Sequence[str]
    ) -> tuple[Sequence[str], list[DeadLetter]]:
        """The start of `window` whose bodies fit in `WINDOW_BYTES` (at least one letter), and
        the letters of it the replay still holds, in its order."""
        held = await self._store.held(token, window)
        size = 0
        for end, letter_id in enumerate(window):
            size += held.get(letter_id, 0)
            if size > WINDOW_BYTES and end > 0:
                window = window[:end]
                break
        for letter_id in window:
            if letter_id not in held:
                # Its claim ran out (the renewals failed for a lease) and another replay may
                # have it: left alone, said.
                log.warning("a claimed letter was lost to its lease", extra={"id": letter_id})
        found = await self._store.letters([i for i in window if i in held])
        return window, [found[i] for i in window if i in found]  # not those purged meanwhile

    async def _publish(
        self, letters: Sequence[DeadLetter], skipped: dict[str, str]
    ) -> tuple[list[DeadLetter], BaseException | None]:
        """Publish `letters` together, each confirmed: those the broker took, and the first
        failure other than a letter no queue takes or AMQP cannot carry (each of those stays
        dead, said in `skipped`, and the others still go)."""
        outcomes = await asyncio.gather(
            *(replay(self._publisher, self._namespace, letter) for letter in letters),
            return_exceptions=True,
        )
        published: list[DeadLetter] = []
        failure: BaseException | None = None
        for letter, outcome in zip(letters, outcomes, strict=True):
            if isinstance(outcome, Unroutable | Unpublishable):
                skipped[letter.id] = str(outcome)
            elif isinstance(outcome, BaseException):
                failure = failure or outcome
            else:
                published.append(letter)
        return published, failure

    async def _mark(
        self, letters: Sequence[DeadLetter], action_id: str, token: str, actor: str
    ) -> list[DeadLetter]:
        """Mark letters the broker took as replayed, in one transaction: those marked, in
        order; not those a discard or another replay took meanwhile (said)."""
        if not letters:
            return []
        marked = await self._store.mark_replayed(
            [letter.id for letter in letters], token, action_id, actor
        )
        for letter in letters:
            if letter.id not in marked:
                log.warning(
                    "replayed a dead letter whose claim was lost meanwhile, to a discard or "
                    "another replay",
                    extra={"id": letter.id, "action_id": action_id},
                )
        return [letter for letter in letters if letter.id in marked]

    async def _replayed(
        self,
        letters: Sequence[DeadLetter],
        at: datetime,
        action_id: str,
        actor: str,
        moved: list[str],
    ) -> None:
        """Count, report and log letters marked replayed."""
        moved.extend(letter.id for letter in letters)
        await self._report_replayed(letters, at)
        for letter in letters:
            log.info("dead letter replayed", extra=_moved(letter, action_id, actor))

    async def _keep_renewed(self, token: str, action_id: str, moved: list[str]) -> None:
        """Renew the replay's claims, and its action's count, every third of a lease until
        cancelled; a failed renewal is said and tried again at the next (two more before the
        lease runs out)."""
        while True:
            await asyncio.sleep(self._lease.total_seconds() / 3)
            try:
                await self._store.renew(token)
                await self._store.count_action(action_id, len(moved))
            except Exception:  # the replay's own store calls fail and stop it, if it stays away
                log.warning("could not renew a replay's claims", exc_info=True)

    async def _close_replay(
        self, token: str, action_id: str, actor: str, moved: list[str]
    ) -> str | None:
        """Release what the replay did not move and record its final count; what went wrong if
        the store would not (then the claims fall back to dead when their lease runs out)."""
        try:
            await self._store.release(token)  # what was not moved is dead again, at once
            await self._store.count_action(action_id, len(moved))
        except STORE_ERRORS as exc:
            # Published and marked, but the action's count not kept: said here, with every id,
            # and answered.
            log.exception(
                "replay not fully recorded: the store failed",
                extra={"action_id": action_id, "actor": actor, "moved": moved},
            )
            return f"the replay could not be recorded: {_reason(exc)}"
        return None

    async def _report_replayed(self, letters: Sequence[DeadLetter], at: datetime) -> None:
        if self._on_replayed is None:
            return
        transitions = []
        for letter in letters:
            if in_status(letter):
                assert letter.event_id is not None  # `in_status`
                transitions.append(
                    Transition.model_construct(
                        event_id=letter.event_id,
                        event_type=letter.event_type,
                        service=letter.service,
                        state="replayed",
                        at=at,
                        detail=f"dead letter {letter.id}",
                    )
                )
        if transitions:
            await self._on_replayed(transitions)

    async def discard(
        self, selection: Filter, *, actor: str, limit: int, reason: str, dry_run: bool
    ) -> Outcome:
        if dry_run:
            ids = await self._store.preview(selection, limit=limit, lease=None)
            action_id = await self._store.record_action(
                action="discard",
                actor=actor,
                selection=selection,
                dry_run=True,
                count=len(ids),
                reason=reason,
            )
            return Outcome(action_id, True, len(ids), ids)
        action_id = uuid.uuid4().hex
        discarded = await self._store.discard(
            selection, limit=limit, reason=reason, actor=actor, action_id=action_id
        )
        for letter in discarded:
            log.info(
                "dead letter discarded", extra=_moved(letter, action_id, actor) | {"reason": reason}
            )
        log.info("discarded dead letters", extra={"count": len(discarded), "actor": actor})
        ids = [letter.id for letter in discarded]
        return Outcome(action_id, False, len(ids), ids)
