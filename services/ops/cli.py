"""The operators' CLI: `courier dlq list|show|groups|replay|discard|actions`.

It talks to the gateway's ops API (`/v1/ops`) over HTTP (`client`), with the gateway's address
from `--url` (env `COURIER_URL`) and an ops token from `--token` (env `COURIER_OPS_TOKEN`; the
token is never printed or logged), each given before the command or after it. Output is a human
table by default and one JSON document on stdout with `--json`; errors and progress go to
stderr. Human output shows the text it gets from the gateway (a dead letter's error may be a
webhook receiver's answer) with control and invisible format characters as escapes (`\\x1b`),
never as markup (`views`); `--json` carries it exactly.

A replay or discard works in batches until the selection is exhausted or `--limit` is reached.
Its selection is frozen when it starts: letters dead-lettered after that (for example a replayed
letter that fails again) are not taken by the same run, so a replay never chases its own tail.

Exit codes:

* 0: done;
* 1: the gateway failed or refused the request (HTTP error, unknown id, invalid request);
* 2: usage error (bad option, no selection for replay or discard);
* 3: authentication: no token, or the gateway refused it (401, 403);
* 4: the gateway is unreachable (connection refused, DNS, connect timeout);
* 5: the broker or the gateway's store is unavailable (503): a replay stopped early, what
  moved is reported; or the request could not start;
* 130: interrupted (Ctrl-C) during a replay or discard; what moved is reported.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

import click
import httpx
from click.core import ParameterSource
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from services.ops.client import ExitCode, OpsClient, OpsError
from services.ops.views import (
    actions_table,
    groups_listing,
    json_text,
    letter_view,
    letters_listing,
    visible,
)

__all__ = ["ExitCode", "OpsClient", "OpsError", "cli", "main"]

DEFAULT_URL = "http://127.0.0.1:8000"
STATUSES = ("dead", "replaying", "replayed", "discarded", "any")
MAX_PER_REQUEST = 10_000
"""The most letters one replay or discard request may take (the API's bound)."""
LIST_PAGE = 500
"""The largest page the list endpoint serves; used to count a selection."""
DISCARD_BATCH = 1_000
SLOWEST_REPLAY_RATE = 200.0
"""Letters a second a replay is allowed to take at the slowest, whatever --rate asks for: a
gateway replays letters in windows (published together, marked in one transaction), measured
at up to ~3,700 a second on SQLite (`bench.replay`); a slower store or a loaded host is given
room, so a batch's wait is paced at the lower of the two."""
PIPED_WIDTH = 200

F = TypeVar("F", bound=Callable[..., Any])


# --- options and values -----------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class OutOfRange(ValueError):
    """A time before year 1 or after 9999 once in UTC."""


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """A moment in UTC from ISO 8601 (no offset means UTC) or an age: `90s`, `15m`, `2h`, `7d`."""
    text = text.strip()
    match = _RELATIVE.match(text)
    try:
        if match:
            age = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
            return (now or datetime.now(UTC)) - age
        moment = datetime.fromisoformat(text)  # ValueError when it is neither
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:  # `99999999h`, `9999-12-31T23:59:59-05:00`: before year 1 or after 9999
        raise OutOfRange(f"{text!r} is out of range") from None


def _not_blank(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # An empty filter narrows nothing: `--text "$PATTERN"` with PATTERN unset must not
    # select every dead letter.
    if value is not None and not value:
        raise click.BadParameter("must not be empty")
    return value


def _url_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Checked here: a URL the HTTP client cannot parse ended the CLI with a traceback.
    if value is None:
        return None
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise click.BadParameter(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise click.BadParameter("an http:// or https:// URL with a host, as http://gateway:8000")
    return value


def _when_option(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_when(value)
    except OutOfRange:
        raise click.BadParameter(f"{value!r} is out of range once in UTC") from None
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither an ISO 8601 time nor an age like 15m, 2h, 7d"
        ) from None


@dataclass(frozen=True)
class Filters:
    """The filters the API understands; every one narrows the selection."""

    service: str | None = None
    event_type: str | None = None
    group: str | None = None
    reason: str | None = None
    exception_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    text: str | None = None

    def params(self) -> dict[str, Any]:
        return {
            key: value.isoformat() if isinstance(value, datetime) else value
            for key, value in self.__dict__.items()
            if value is not None
        }

    def any(self) -> bool:
        return bool(self.params())


@dataclass(frozen=True)
class Selection:
    """What a replay or discard takes: ids, filters, or (explicitly) everything."""

    ids: tuple[str, ...] = ()
    filters: Filters = field(default_factory=Filters)
    everything: bool = False

    def body(self, until: datetime | None = None) -> dict[str, Any]:
        params = self.filters.params()
        if until is not None:
            params["until"] = until.isoformat()
        return {
            **({"ids": list(self.ids)} if self.ids else {}),
            **params,
            **({"all": True} if self.everything else {}),
        }


def _filter_options(f: F) -> F:
    options = [
        click.option(
            "--service",
            callback=_not_blank,
            help="Only the service that failed it (gateway, processor, notifier).",
        ),
        click.option(
            "--event-type",
            callback=_not_blank,
            help="Only this event type, e.g. notification.requested.",
        ),
        click.option(
            "--group",
            callback=_not_blank,
            help="Only this failure group (see `courier dlq groups`).",
        ),
        click.option(
            "--reason",
            callback=_not_blank,
            help="Only this reason: invalid, permanent, retries_exhausted, ...",
        ),
        click.option(
            "--exception-type",
            callback=_not_blank,
            help="Only this exception type: its dotted name or its last parts (PermanentError).",
        ),
        click.option(
            "--since",
            callback=_when_option,
            metavar="WHEN",
            help="Dead-lettered at or after: ISO 8601 or 2h, 7d.",
        ),
        click.option(
            "--until",
            callback=_when_option,
            metavar="WHEN",
            help="Dead-lettered before: ISO 8601 or 2h, 7d.",
        ),
        click.option(
            "--text",
            callback=_not_blank,
            help="Text in the exception type or message (case-insensitive).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _selection_options(f: F) -> F:
    f = _filter_options(f)
    f = click.option(
        "--all",
        "everything",
        is_flag=True,
        help="Take every dead letter (required when no --id and no filter is given).",
    )(f)
    return click.option(
        "--id", "ids", multiple=True, metavar="ID", help="A dead letter id (repeatable)."
    )(f)


def _filters(options: dict[str, Any]) -> Filters:
    return Filters(**{name: options.pop(name) for name in Filters.__dataclass_fields__})


def _selection(options: dict[str, Any]) -> Selection:
    filters = _filters(options)
    ids = tuple(dict.fromkeys(options.pop("ids")))  # a repeated --id is one letter, once
    everything = bool(options.pop("everything"))
    if not (ids or filters.any() or everything):
        raise click.UsageError("select dead letters by --id or a filter, or pass --all")
    if len(ids) > MAX_PER_REQUEST:
        raise click.UsageError(f"at most {MAX_PER_REQUEST} --id at a time")
    return Selection(ids, filters, everything)


# --- output -----------------------------------------------------------------------------------


@dataclass
class Session:
    """One command run: the client, and where its output goes."""

    client: OpsClient
    as_json: bool
    out: Console
    err: Console

    def emit(self, document: Any) -> None:
        _emit(document)

    def say(self, message: str) -> None:
        """A human line on stdout, printed as it is: never as markup or control sequences."""
        self.out.print(Text(visible(message)))

    def note(self, message: str) -> None:
        """A human remark on stderr (silent with --json)."""
        if not self.as_json:
            self.err.print(Text(visible(message), style="dim"))


def _emit(document: Any) -> None:
    click.echo(json_text(document))


def _fail(error: OpsError, *, as_json: bool, err: Console) -> NoReturn:
    """Say what went wrong on stderr (and as a JSON document with --json), then exit."""
    # The message may quote the gateway's answer, or a dead letter's text.
    err.print(Text(f"error: {visible(error.message, lines=True)}", style="bold red"))
    if as_json:
        problem: dict[str, Any] = {"message": error.message, "exit_code": int(error.code)}
        if error.status is not None:
            problem["status"] = error.status
        # What a replay or discard did before it stopped comes along.
        _emit({**(error.partial or {}), "error": problem})
    raise click.exceptions.Exit(int(error.code))


def _consoles() -> tuple[Console, Console]:
    # Made per run so output follows whatever sys.stdout/sys.stderr are at that moment. Piped
    # output (grep, less, a file) gets wide tables instead of rich's 80-column default.
    piped_width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else PIPED_WIDTH
    return (
        Console(highlight=False, width=piped_width),
        Console(stderr=True, highlight=False, soft_wrap=True),
    )


def _gateway_options(f: F) -> F:
    """--url and --token, taken by the `courier` group and by every command: they may come
    before the command (`courier --url X dlq list`) or after it (see `_gateway_option`)."""
    f = click.option(
        "--token",
        envvar="COURIER_OPS_TOKEN",
        show_envvar=True,
        metavar="TOKEN",
        help="Ops token. Prefer the variable: arguments are visible to other users.",
    )(f)
    return click.option(
        "--url",
        envvar="COURIER_URL",
        show_envvar=True,
        default=DEFAULT_URL,
        show_default=True,
        callback=_url_option,
        help="The gateway's base URL.",
    )(f)


def _gateway_option(name: str, value: Any) -> Any:
    """The command's --url or --token when given after the command; else the group's, which
    was given before it or else comes from the same variable or default."""
    ctx = click.get_current_context()
    root = ctx.find_root()
    if root is ctx or ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
        return value
    return root.params.get(name, value)


def _connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--url, --token, --json, --timeout; hands the command a `Session` as its first argument."""

    @functools.wraps(f)
    def run(*args: Any, **options: Any) -> Any:
        url: str = _gateway_option("url", options.pop("url"))
        token: str | None = _gateway_option("token", options.pop("token"))
        timeout: float = options.pop("timeout")
        as_json: bool = options.pop("as_json")
        out, err = _consoles()
        if not token:
            error = OpsError("no ops token: set COURIER_OPS_TOKEN (or pass --token)", ExitCode.AUTH)
            _fail(error, as_json=as_json, err=err)
        client = OpsClient(url, token, timeout)
        try:
            return f(Session(client, as_json, out, err), *args, **options)
        except OpsError as error:
            _fail(error, as_json=as_json, err=err)
        except KeyboardInterrupt:  # click would exit 1, "Aborted!", with no JSON document
            _fail(OpsError("interrupted", ExitCode.INTERRUPTED), as_json=as_json, err=err)
        finally:
            client.close()

    for option in (
        click.option(
            "--timeout",
            type=click.FloatRange(min=0.1),
            default=30.0,
            show_default=True,
            help=(
                "Seconds to wait for each answer (plus a replay's batch at --rate, "
                f"at most {SLOWEST_REPLAY_RATE:g}/s)."
            ),
        ),
        click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout."),
    ):
        run = option(run)
    return _gateway_options(run)


# --- commands ---------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@_gateway_options
def cli(url: str, token: str | None) -> None:
    """Courier operations: inspect, group, replay and discard dead letters.

    --url and --token may come before the command or after it (where they win).
    """
    # Both are read by the command that runs (`_gateway_option`).


@cli.group()
def dlq() -> None:
    """Dead letters in the gateway's failure store."""


@dlq.command("list")
@_filter_options
@click.option(
    "--status",
    type=click.Choice(STATUSES),
    default="dead",
    show_default=True,
    help="Which state to list.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, LIST_PAGE),
    default=50,
    show_default=True,
    help="Page size.",
)
@click.option("--cursor", help="Continue after a page (the previous page's next cursor).")
@click.option("--all-pages", is_flag=True, help="Follow next_cursor to the end.")
@_connection_options
def list_letters(
    session: Session,
    status: str,
    limit: int,
    cursor: str | None,
    all_pages: bool,
    **options: Any,
) -> None:
    """List dead letters, newest first."""
    params = {**_filters(options).params(), "status": status, "limit": limit}
    # One page at a time: with --all-pages, every page kept until the end took the CLI to
    # 517 MiB for 50,000 letters.
    pages = _pages(session, params, cursor, follow=all_pages)
    if session.as_json:
        _emit_listing(pages)
        return
    shown, next_cursor = 0, None
    for items, after in pages:
        if items:  # a table per page
            session.out.print(letters_listing(items, status, session.out.width))
        shown += len(items)
        next_cursor = after
    if not shown:
        session.say("No dead letters match.")
    if next_cursor:
        session.note(f"more: --cursor {next_cursor} (or --all-pages)")


Page = tuple[list[dict[str, Any]], str | None]
"""A page of dead letters, and the cursor of the next one."""


def _pages(
    session: Session, params: Mapping[str, Any], cursor: str | None, *, follow: bool
) -> Iterator[Page]:
    """The page after `cursor` and, if `follow`, every page after it, as each arrives."""
    while True:
        page = session.client.get("/dead-letters", {**params, "cursor": cursor})
        cursor = page.get("next_cursor")
        yield page.get("items", []), cursor
        if not (follow and cursor):
            return


def _emit_listing(pages: Iterator[Page]) -> None:
    """`{"items": [...], "next_cursor": ...}` as `_emit` writes it, built page by page in a
    temporary file: one page in memory at a time, and stdout still gets one document, or
    nothing if a page fails (the error's document instead)."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        spool.write('{\n  "items": [')
        separator, next_cursor = "\n    ", None
        for items, after in pages:
            for item in items:
                spool.write(separator + json_text(item).replace("\n", "\n    "))
                separator = ",\n    "
            next_cursor = after
        closing = "]" if separator == "\n    " else "\n  ]"
        spool.write(f'{closing},\n  "next_cursor": {json_text(next_cursor)}\n}}')
        spool.seek(0)
        while chunk := spool.read(1 << 16):
            click.echo(chunk, nl=False)
        click.echo()


@dlq.command("show")
@click.argument("letter_id", metavar="ID", callback=_not_blank)
@_connection_options
def show_letter(session: Session, letter_id: str) -> None:
    """Show one dead letter in full.

    Payload, headers, error, traceback, attempts, failure times, its history, and the other
    letters of the same event (earlier or later failures, replays).
    """
    item = session.client.get(f"/dead-letters/{quote(letter_id, safe='')}")
    if session.as_json:
        session.emit(item)
        return
    session.out.print(letter_view(item))


@dlq.command("groups")
@_filter_options
@click.option(
    "--status",
    type=click.Choice(STATUSES),
    default="dead",
    show_default=True,
    help="Which state to group.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, LIST_PAGE),
    default=50,
    show_default=True,
    help="Most groups.",
)
@_connection_options
def groups(session: Session, status: str, limit: int, **options: Any) -> None:
    """Group dead letters by cause.

    A group is the failure fingerprint (exception type and innermost project frame) plus the
    message with its variable parts removed; largest first.
    """
    params = {**_filters(options).params(), "status": status, "limit": limit}
    found = session.client.get("/groups", params).get("groups", [])
    if session.as_json:
        session.emit({"groups": found})
        return
    if not found:
        session.say("No dead letters match.")
        return
    session.out.print(groups_listing(found, status, session.out.width))


# --- replay and discard -----------------------------------------------------------------------


def _frozen_until(session: Session, selection: Selection) -> datetime | None:
    """The selection's upper bound in time: just after the newest letter that matches now.

    Taken from the store's own clock (the newest letter's time), so letters dead-lettered while
    the operation runs (a replayed letter failing again, say) are never picked up by it.
    """
    params = {**selection.filters.params(), "status": "dead", "limit": 1}
    items = session.client.get("/dead-letters", params).get("items", [])
    if not items:
        return None
    newest = datetime.fromisoformat(str(items[0]["dead_lettered_at"]))
    if newest.tzinfo is None:
        newest = newest.replace(tzinfo=UTC)
    return newest + timedelta(microseconds=1)


def _count(session: Session, selection: Selection, until: datetime, cap: int | None) -> int:
    """How many dead letters the selection holds (up to `cap`)."""
    params = {**selection.filters.params(), "until": until.isoformat(), "status": "dead"}
    total = int(session.client.get("/count", params)["count"])
    return total if cap is None else min(total, cap)


class _Progress:
    """Moved so far / total: a bar on a terminal, a line per batch otherwise, silent with --json."""

    def __init__(self, session: Session, verb: str, total: int) -> None:
        self._session = session
        self._verb = verb
        self._total = total
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if not self._session.as_json and self._session.err.is_terminal:
            self._bar = Progress(
                TextColumn(self._verb),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self._session.err,
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self._verb, total=self._total)
        return self

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
        else:
            self._session.note(f"{self._verb} {done}/{self._total}")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _batches(total: int, batch: int) -> Iterator[int]:
    """Sizes of the requests that cover `total`, each at most `batch`."""
    remaining = total
    while remaining > 0:
        size = min(batch, remaining)
        yield size
        remaining -= size


@dataclass
class _Run:
    """A batched replay or discard: totals, the requests' action ids, and the ids moved."""

    action: str
    total: int
    done: int = 0
    ids: list[str] = field(default_factory=list)
    action_ids: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Letters a replay left dead, and why (no queue takes them)."""
    not_taken: list[str] = field(default_factory=list)
    """Of the ids asked for by --id, those no request took: unknown, or not dead (replayed,
    discarded, or claimed by another replay)."""
    taken_meanwhile: int = 0
    """Of a filter's matches when the run began, those a concurrent replay or discard took."""

    def document(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "dry_run": False,
            "total": self.total,
            "count": self.done,
            "ids": self.ids,
            "action_ids": self.action_ids,
            "skipped": self.skipped,
            "not_taken": self.not_taken,
            "taken_meanwhile": self.taken_meanwhile,
        }

    @property
    def complete(self) -> bool:
        """Every letter asked for was moved: none left dead, none not taken."""
        return not self.skipped and not self.not_taken


def _run_batches(
    session: Session,
    *,
    action: str,
    verb: str,
    path: str,
    selection: Selection,
    extra: Mapping[str, Any],
    limit: int | None,
    batch: int,
    paced: Callable[[int], float],
) -> _Run:
    if selection.ids:
        until = None
        total = len(selection.ids) if limit is None else min(limit, len(selection.ids))
    else:
        until = _frozen_until(session, selection)
        if selection.filters.until is not None and until is not None:
            until = min(until, selection.filters.until)
        total = 0 if until is None else _count(session, selection, until, limit)
    run = _Run(action, total)
    if total == 0:
        return run
    body = {**selection.body(until), **extra}
    homeless = False
    with _Progress(session, verb, total) as progress:
        try:
            for size in _batches(total, batch):
                # Letters left dead stay the oldest match: without this every batch took
                # them again.
                if len(run.skipped) >= MAX_PER_REQUEST:
                    homeless = True  # so many without a home: reported; discard them, then again
                    break
                left = {"exclude_ids": list(run.skipped)} if run.skipped else {}
                try:
                    outcome = session.client.post(
                        path, {**body, **left, "limit": size}, extra_seconds=paced(size)
                    )
                except OpsError as error:
                    if isinstance(error.detail, dict):  # a 503 says what it did before stopping
                        run.done += int(error.detail.get("count", 0))
                        run.ids.extend(error.detail.get("ids", []))
                        if error.detail.get("action_id"):
                            run.action_ids.append(str(error.detail["action_id"]))
                    error.partial = run.document()
                    error.message += f" ({verb.lower()} {run.done} of {total} before it stopped)"
                    raise
                run.done += int(outcome["count"])
                run.ids.extend(outcome.get("ids", []))
                run.skipped.update(outcome.get("skipped", {}))
                run.action_ids.append(str(outcome["action_id"]))
                progress.update(run.done)
                if outcome["count"] == 0 and not outcome.get("skipped"):
                    break  # nothing left to take: others took or discarded the rest
        except KeyboardInterrupt:
            interrupted = OpsError(
                f"interrupted after {run.done} of {total}; the batch in flight may still "
                "complete on the gateway: check `courier dlq actions`",
                ExitCode.INTERRUPTED,
            )
            interrupted.partial = run.document()
            raise interrupted from None
    if not selection.ids and not homeless:
        # Counted at the start: what no batch moved or left dead, a concurrent replay or
        # discard took (said, not passed over).
        run.taken_meanwhile = max(0, total - run.done - len(run.skipped))
    if selection.ids and total == len(selection.ids):
        run.not_taken = _not_taken(selection, {*run.ids, *run.skipped})
    return run


def _not_taken(selection: Selection, handled: Collection[str]) -> list[str]:
    """The --id values asked for that are not in `handled`, each once, in the order given."""
    return [i for i in dict.fromkeys(selection.ids) if i not in handled]


def _dry_run(
    session: Session,
    path: str,
    selection: Selection,
    extra: Mapping[str, Any],
    limit: int | None,
    action: str,
    verb: str,
) -> None:
    size = MAX_PER_REQUEST if limit is None else min(limit, MAX_PER_REQUEST)
    outcome = session.client.post(
        path, {**selection.body(), **extra, "dry_run": True, "limit": size}
    )
    # Ids asked for that it would not take, named and failing as the real run would.
    not_taken = _not_taken(selection, set(outcome.get("ids", [])))
    if session.as_json:
        session.emit({"action": action, **outcome, "not_taken": not_taken})
    else:
        session.say(
            f"Dry run: would {verb} {outcome['count']} dead letter(s)"
            + (" (or more)" if outcome["count"] >= size else "")
            + f"; nothing was changed (recorded as action {outcome['action_id']})."
        )
        for letter_id in outcome.get("ids", [])[:20]:
            session.say(f"  {letter_id}")
        if outcome["count"] > 20:
            session.say(f"  … and {outcome['count'] - 20} more")
        for letter_id in not_taken:
            session.say(f"  would not take: {letter_id}: unknown, or not dead")
    if not_taken and len(selection.ids) <= size:
        raise click.exceptions.Exit(ExitCode.FAILED)


@dlq.command("replay")
@_selection_options
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; move nothing.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Most letters to replay in total (default: every match).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.001, max=10_000, min_open=False),
    default=100.0,
    show_default=True,
    help="Most letters per second.",
)
@click.option(
    "--batch",
    type=click.IntRange(1, MAX_PER_REQUEST),
    default=100,
    show_default=True,
    help="Letters per request.",
)
@_connection_options
def replay(
    session: Session,
    dry_run: bool,
    limit: int | None,
    rate: float,
    batch: int,
    **options: Any,
) -> None:
    """Replay dead letters into the queues they failed in.

    Each goes back to the service that failed it: into its work queue (a cancellation into its
    control queue, a file into the processor's files lane). Select by --id
    (repeatable), by filters, or --all. Works in batches of --batch at --rate letters per
    second until the selection or --limit is exhausted; letters dead-lettered after the start
    are not taken.
    """
    selection = _selection(options)
    if dry_run:
        _dry_run(session, "/replays", selection, {"rate": rate}, limit, "replay", "replay")
        return
    run = _run_batches(
        session,
        action="replay",
        verb="Replayed",
        path="/replays",
        selection=selection,
        extra={"rate": rate},
        limit=limit,
        batch=batch,
        paced=lambda size: size / min(rate, SLOWEST_REPLAY_RATE),
    )
    _report(session, run, "Replayed", "back into their services' queues")
    if not run.complete:  # said above, letter by letter; a script must not take it for done
        raise click.exceptions.Exit(ExitCode.FAILED)


@dlq.command("discard")
@_selection_options
@click.option(
    "--why",
    required=True,
    callback=_not_blank,
    help="Why they are discarded (kept in the audit trail).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be discarded; change nothing.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Most letters to discard in total (default: every match).",
)
@_connection_options
def discard(session: Session, why: str, dry_run: bool, limit: int | None, **options: Any) -> None:
    """Discard dead letters for good, with a reason.

    Discarded letters are never replayed; they stay in the store (and the audit trail) for
    the retention period. Select by --id (repeatable), by filters, or --all; --why is required.
    """
    selection = _selection(options)
    if dry_run:
        _dry_run(session, "/discards", selection, {"why": why}, limit, "discard", "discard")
        return
    run = _run_batches(
        session,
        action="discard",
        verb="Discarded",
        path="/discards",
        selection=selection,
        extra={"why": why},
        limit=limit,
        batch=DISCARD_BATCH,
        paced=lambda size: 0.0,
    )
    _report(session, run, "Discarded", "")
    if not run.complete:  # an id asked for and not discarded: said above
        raise click.exceptions.Exit(ExitCode.FAILED)


def _report(session: Session, run: _Run, verb: str, where: str) -> None:
    if session.as_json:
        session.emit(run.document())
        return
    if run.total == 0:
        session.say("No dead letters match; nothing to do.")
        return
    if len(run.action_ids) == 1:
        audit = f" (action {run.action_ids[0]})"
    else:
        audit = f" ({len(run.action_ids)} actions; see `courier dlq actions`)"
    session.say(
        f"{verb} {run.done} of {run.total} dead letter(s){' ' + where if where else ''}{audit}."
    )
    for letter_id, why in run.skipped.items():
        session.say(f"  left dead: {letter_id}: {why} (discard it if it has no home)")
    for letter_id in run.not_taken:
        session.say(f"  not taken: {letter_id}: unknown, or not dead")
    if run.taken_meanwhile:
        session.say(f"  {run.taken_meanwhile} taken meanwhile by another replay or discard")


@dlq.command("actions")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="Most actions, newest first.",
)
@_connection_options
def actions(session: Session, limit: int) -> None:
    """Show the audit trail of replays and discards.

    Every replay and discard, dry runs too: who, when, which selection, how many.
    """
    found = session.client.get("/actions", {"limit": limit}).get("actions", [])
    if session.as_json:
        session.emit({"actions": found})
        return
    if not found:
        session.say("No actions recorded.")
        return
    session.out.print(actions_table(found))


def main(argv: Sequence[str] | None = None) -> None:
    """The `courier` console script."""
    cli.main(args=list(argv) if argv is not None else sys.argv[1:], prog_name="courier")


if __name__ == "__main__":
    main()
