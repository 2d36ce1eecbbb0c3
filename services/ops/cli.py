"""The operators' CLI: `courier dlq list|show|groups|replay|discard|actions`.

It talks to the gateway's ops API (`/v1/ops`) over HTTP, with the gateway's address from `--url`
(env `COURIER_URL`) and an ops token from `--token` (env `COURIER_OPS_TOKEN`; the token is never
printed or logged), each given before the command or after it. Output is a human table by
default and one JSON document on stdout with `--json`; errors and progress go to stderr. Human
output shows the text it gets from the gateway (a dead letter's error may be a webhook
receiver's answer) with control and invisible format characters as escapes (`\\x1b`), never as
markup; `--json` carries it exactly.

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
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

import click
import httpx
from click.core import ParameterSource
from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

__all__ = ["ExitCode", "OpsClient", "OpsError", "cli", "main"]

DEFAULT_URL = "http://127.0.0.1:8000"
STATUSES = ("dead", "replaying", "replayed", "discarded", "any")
MAX_PER_REQUEST = 10_000
"""The most letters one replay or discard request may take (the API's bound)."""
LIST_PAGE = 500
"""The largest page the list endpoint serves; used to count a selection."""
DISCARD_BATCH = 1_000
MAX_MESSAGE_WIDTH = 80
PIPED_WIDTH = 200

F = TypeVar("F", bound=Callable[..., Any])


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    AUTH = 3
    UNREACHABLE = 4
    UNAVAILABLE = 5
    INTERRUPTED = 130


class OpsError(Exception):
    """Something the operator must hear about; carries the exit code and any partial result."""

    def __init__(
        self,
        message: str,
        code: ExitCode = ExitCode.FAILED,
        *,
        status: int | None = None,
        detail: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.detail = detail
        self.partial: dict[str, Any] | None = None


# --- the HTTP client --------------------------------------------------------------------------


class OpsClient:
    """The ops API over HTTP; every failure becomes an `OpsError` with a clear message."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=f"{self.url}/v1/ops",
            headers={"Authorization": f"Bearer {token}", "User-Agent": "courier-cli"},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        # httpx would send a None as an empty value (`cursor=`): leave those out.
        query = {key: value for key, value in (params or {}).items() if value is not None}
        return self._send("GET", path, params=query)

    def post(self, path: str, body: Mapping[str, Any], *, extra_seconds: float = 0.0) -> Any:
        """POST; `extra_seconds` on top of the timeout for work the gateway paces (--rate)."""
        return self._send("POST", path, body=dict(body), timeout=self._timeout + extra_seconds)

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        try:
            response = self._http.request(
                method, path, params=params, json=body, timeout=timeout or self._timeout
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise OpsError(
                f"cannot reach the gateway at {self.url}: {exc or type(exc).__name__} "
                "(check --url / COURIER_URL)",
                ExitCode.UNREACHABLE,
            ) from None
        except httpx.TimeoutException:
            raise OpsError(
                f"the gateway at {self.url} did not answer in time; a replay or discard may "
                "still have happened: check `courier dlq actions`",
                ExitCode.FAILED,
            ) from None
        except httpx.HTTPError as exc:
            raise OpsError(f"talking to the gateway at {self.url} failed: {exc}") from None
        return _decode(response)


def _decode(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    status = response.status_code
    if response.is_success and isinstance(body, dict):
        return body
    if response.is_success:
        raise OpsError(
            f"{response.request.url.path} answered {status} without a JSON object; "
            "is --url the Courier gateway?",
            status=status,
        )
    detail = body.get("detail") if isinstance(body, dict) else response.text[:300]
    if status == 401:
        raise OpsError(
            "the gateway wants an ops token (401): pass --token or set COURIER_OPS_TOKEN",
            ExitCode.AUTH,
            status=status,
        )
    if status == 403:
        raise OpsError(
            "the gateway refused this ops token (403): check COURIER_OPS_TOKEN against the "
            "gateway's COURIER_OPS_TOKENS",
            ExitCode.AUTH,
            status=status,
        )
    if status == 503:
        error = detail.get("error") if isinstance(detail, dict) else detail
        retry = response.headers.get("retry-after")
        raise OpsError(
            f"unavailable (503): {error or 'no detail'}"
            + (f"; retry in {retry}s" if retry else ""),
            ExitCode.UNAVAILABLE,
            status=status,
            detail=detail,
        )
    if status == 422:
        raise OpsError(
            f"the gateway rejected the request (422): {_validation_text(detail)}",
            status=status,
            detail=detail,
        )
    if status == 404 and detail == "Not Found":
        raise OpsError(
            f"{response.request.url.path} does not exist (404); is --url the Courier gateway?",
            status=status,
        )
    raise OpsError(f"the gateway answered {status}: {detail}", status=status, detail=detail)


def _validation_text(detail: Any) -> str:
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for error in detail:
        if isinstance(error, dict):
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or str(detail)


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
            "--exception-type", callback=_not_blank, help="Only this exception type (dotted name)."
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
        self.out.print(Text(_visible(message)))

    def note(self, message: str) -> None:
        """A human remark on stderr (silent with --json)."""
        if not self.as_json:
            self.err.print(Text(_visible(message), style="dim"))


def _emit(document: Any) -> None:
    click.echo(_json_text(document))


def _fail(error: OpsError, *, as_json: bool, err: Console) -> NoReturn:
    """Say what went wrong on stderr (and as a JSON document with --json), then exit."""
    # The message may quote the gateway's answer, or a dead letter's text.
    err.print(Text(f"error: {_visible(error.message, lines=True)}", style="bold red"))
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
        finally:
            client.close()

    for option in (
        click.option(
            "--timeout",
            type=click.FloatRange(min=0.1),
            default=30.0,
            show_default=True,
            help="Seconds to wait for each answer (plus --batch / --rate for a replay).",
        ),
        click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout."),
    ):
        run = option(run)
    return _gateway_options(run)


# What would drive or mislead a terminal: every character Python deems unprintable (C0 and C1
# controls and DEL, whose escape sequences recolour, retitle or erase; format characters such
# as bidi overrides that reorder what is shown, zero-width and tag characters; separators but
# the space), as the failure store's `printable` judges them. Dead letters carry text from
# anyone who can make a message fail, e.g. a webhook receiver's answer.


def _escaped(text: str, keep: str, escape: Callable[[str], str]) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else escape(c) for c in text)


def _visible(text: str, *, lines: bool = False) -> str:
    """`text` with every unprintable character written as its Python escape (`\\x1b`,
    `\\u202e`), as the failure store writes what it cannot hold; `lines` keeps newlines and
    tabs."""
    return _escaped(text, "\n\t" if lines else "", lambda c: repr(c)[1:-1])


def _json_text(value: Any) -> str:
    """`value` as indented JSON whose unprintable characters are all JSON escapes (`json`
    leaves DEL, C1 and format characters as they are): still the same JSON, safe to print."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return _escaped(text, "\n", lambda c: json.dumps(c)[1:-1])


def _cell(value: Any, *, width: int | None = None) -> Text:
    """A table cell as plain, safe text: data never gets interpreted as rich markup, and
    never reaches the terminal as a control sequence."""
    if value is None:
        return Text("-", style="dim")
    if isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value)
    text = _visible(str(value).replace("\n", " "))
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return Text(text)


def _when(value: Any) -> Text:
    """An API timestamp, shortened to the second, in UTC."""
    if not isinstance(value, str):
        return _cell(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return _cell(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return Text(moment.strftime("%Y-%m-%d %H:%M:%S"))


def _short_type(value: Any) -> Any:
    """`pydantic_core._pydantic_core.ValidationError` → `ValidationError` (tables only)."""
    return value.rsplit(".", 1)[-1] if isinstance(value, str) else value


def _error_text(item: Mapping[str, Any]) -> Text:
    kind, message = _short_type(item.get("exception_type")), item.get("exception_message")
    text = ": ".join(str(part) for part in (kind, message) if part)
    return _cell(text or None, width=MAX_MESSAGE_WIDTH * 2)


WIDE_LISTING = 120
"""Terminal columns below which a listing shows each row as a block of `name  value` lines: a
table of eight or nine columns leaves each a few characters at 80, wrapped letter by letter."""


@dataclass(frozen=True)
class Column:
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    """How the wide table lays it out (`no_wrap`, `justify`, `overflow`)."""
    label: str | None = None
    """Its name in a block, where there is room to spell it out."""


def _listing(
    title: str, columns: Sequence[Column], rows: Sequence[Sequence[Text]], width: int
) -> Table | Group:
    """A table where the terminal is wide enough, else one block of lines a row."""
    if width >= WIDE_LISTING:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in columns:
            table.add_column(column.name, **column.options)
        for row in rows:
            table.add_row(*row)
        return table
    blocks: list[Text | Table] = [Text(title)]
    for row in rows:
        block = Table.grid(padding=(0, 2))
        block.add_column(style="bold", no_wrap=True)
        block.add_column(overflow="fold")
        for column, cell in zip(columns, row, strict=True):
            block.add_row(column.label or column.name, cell)
        blocks += [Text(""), block]
    return Group(*blocks)


def _letters_listing(items: Sequence[Mapping[str, Any]], status: str, width: int) -> Table | Group:
    every = status == "any"  # then each letter says its own
    # The id never wraps (it is copied into `show` and `--id`); the rest wrap as needed.
    columns = [
        Column("id", {"no_wrap": True, "min_width": 36}),
        *(Column(n, {"overflow": "fold"}) for n in ("when (UTC)", "service", "event type")),
        Column("reason", {"overflow": "fold"}),
        Column("att", {"justify": "right"}, "attempts"),
        Column("rep", {"justify": "right"}, "replays"),
        Column("error", {"overflow": "fold"}),
        *([Column("status")] if every else []),
    ]
    rows = [
        [
            _cell(item.get("id")),
            _when(item.get("dead_lettered_at")),
            _cell(item.get("service")),
            _cell(item.get("event_type")),
            _cell(item.get("reason")),
            _cell(item.get("attempts")),
            _cell(item.get("replays")),
            _error_text(item),
            *([_cell(item.get("status"))] if every else []),
        ]
        for item in items
    ]
    title = f"{len(items)} {'' if every else status + ' '}letter(s), newest first"
    return _listing(title, columns, rows, width)


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
    items: list[dict[str, Any]] = []
    next_cursor = cursor
    while True:
        page = session.client.get("/dead-letters", {**params, "cursor": next_cursor})
        items.extend(page.get("items", []))
        next_cursor = page.get("next_cursor")
        if not (all_pages and next_cursor):
            break
    if session.as_json:
        session.emit({"items": items, "next_cursor": next_cursor})
        return
    if not items:
        session.say("No dead letters match.")
    else:
        session.out.print(_letters_listing(items, status, session.out.width))
    if next_cursor:
        session.note(f"more: --cursor {next_cursor} (or --all-pages)")


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
    session.out.print(_letter_view(item))


def _letter_view(item: Mapping[str, Any]) -> Group:
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column()
    for label, key in (
        ("id", "id"),
        ("status", "status"),
        ("service", "service"),
        ("queue", "queue"),
        ("event id", "event_id"),
        ("event type", "event_type"),
        ("correlation id", "correlation_id"),
        ("reason", "reason"),
        ("attempts", "attempts"),
        ("replays", "replays"),
        ("group", "group_key"),
        ("fingerprint", "fingerprint"),
        ("exception", "exception_type"),
        ("message", "exception_message"),
    ):
        facts.add_row(label, _cell(item.get(key)))
    for label, key in (
        ("first failure", "first_failure"),
        ("last failure", "last_failure"),
        ("dead-lettered", "dead_lettered_at"),
        ("closed", "closed_at"),
    ):
        facts.add_row(label, _cell(item.get(key)))

    if "payload" in item:
        payload = Text(_json_text(item["payload"]), no_wrap=True)
    else:
        payload = Text(_visible(str(item.get("payload_text", "")), lines=True))
    parts: list[Any] = [
        Panel(facts, title="dead letter", title_align="left"),
        Panel(payload, title="payload", title_align="left"),
    ]

    headers = Table(box=None, show_header=False, padding=(0, 2))
    headers.add_column(style="bold", no_wrap=True)
    headers.add_column()
    for name, value in sorted((item.get("headers") or {}).items()):
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        if name == "courier-traceback":
            shown = "(below)"
        headers.add_row(_cell(name), _cell(shown, width=200))
    parts.append(Panel(headers, title="headers", title_align="left"))

    if item.get("traceback"):
        traceback = Text(_visible(str(item["traceback"]), lines=True))
        parts.append(Panel(traceback, title="traceback", title_align="left"))

    history = Table(box=None, padding=(0, 2))
    for column in ("at (UTC)", "action", "actor", "reason", "action id"):
        history.add_column(column)
    for entry in item.get("history") or []:
        history.add_row(
            _when(entry.get("at")),
            _cell(entry.get("action")),
            _cell(entry.get("actor")),
            _cell(entry.get("reason")),
            _cell(entry.get("action_id")),
        )
    parts.append(Panel(history, title="history", title_align="left"))

    related = item.get("related") or []
    if related:
        others = Table(box=None, padding=(0, 2))
        for column in ("id", "dead-lettered (UTC)", "status", "reason", "replays"):
            others.add_column(column, no_wrap=column == "id")
        for other in related:
            others.add_row(
                _cell(other.get("id")),
                _when(other.get("dead_lettered_at")),
                _cell(other.get("status")),
                _cell(other.get("reason")),
                _cell(other.get("replays")),
            )
        parts.append(Panel(others, title="same event, other letters", title_align="left"))
    return Group(*parts)


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
    columns = [
        Column("group", {"no_wrap": True}),
        Column("count", {"justify": "right", "no_wrap": True}),
        Column("first seen (UTC)", {"no_wrap": True}),
        Column("last seen (UTC)", {"no_wrap": True}),
        Column("services"),
        Column("event types"),
        Column("reason", {"no_wrap": True}),
        Column("exception", {"no_wrap": True}),
        Column("example message", {"overflow": "fold", "min_width": 24}),
    ]
    rows = [
        [
            _cell(group.get("group")),
            _cell(group.get("count")),
            _when(group.get("first_seen")),
            _when(group.get("last_seen")),
            _cell(group.get("services")),
            _cell(group.get("event_types")),
            _cell(group.get("reason")),
            _cell(_short_type(group.get("exception_type"))),
            _cell(group.get("example_message"), width=MAX_MESSAGE_WIDTH),
        ]
        for group in found
    ]
    which = "all" if status == "any" else status
    title = f"{len(found)} group(s) of {which} letters, largest first"
    session.out.print(_listing(title, columns, rows, session.out.width))


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
    with _Progress(session, verb, total) as progress:
        for size in _batches(total, batch):
            # Letters left dead stay the oldest match: without this every batch took them again.
            if len(run.skipped) >= MAX_PER_REQUEST:
                break  # so many without a home: reported; discard them, then replay again
            left = {"exclude_ids": list(run.skipped)} if run.skipped else {}
            try:
                outcome = session.client.post(
                    path, {**body, **left, "limit": size}, extra_seconds=paced(size)
                )
            except KeyboardInterrupt:
                error = OpsError(
                    f"interrupted after {run.done} of {total}; the batch in flight may still "
                    "complete on the gateway: check `courier dlq actions`",
                    ExitCode.INTERRUPTED,
                )
                error.partial = run.document()
                raise error from None
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
                break  # nothing left (others took or discarded the rest)
    if selection.ids and total == len(selection.ids):
        handled = {*run.ids, *run.skipped}
        run.not_taken = [i for i in dict.fromkeys(selection.ids) if i not in handled]
    return run


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
    if session.as_json:
        session.emit({"action": action, **outcome})
        return
    session.say(
        f"Dry run: would {verb} {outcome['count']} dead letter(s)"
        + (" (or more)" if outcome["count"] >= size else "")
        + f"; nothing was changed (recorded as action {outcome['action_id']})."
    )
    for letter_id in outcome.get("ids", [])[:20]:
        session.say(f"  {letter_id}")
    if outcome["count"] > 20:
        session.say(f"  … and {outcome['count'] - 20} more")


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
        paced=lambda size: size / rate,
    )
    _report(session, run, "Replayed", "back into their services' queues")
    if not run.complete:  # said above, letter by letter; a script must not take it for done
        raise click.exceptions.Exit(ExitCode.FAILED)


@dlq.command("discard")
@_selection_options
@click.option("--why", required=True, help="Why they are discarded (kept in the audit trail).")
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
    table = Table(
        title=f"{len(found)} action(s), newest first",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("action", no_wrap=True)
    table.add_column("dry run", no_wrap=True)
    table.add_column("actor", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("why", overflow="fold")
    table.add_column("selection", overflow="fold", min_width=24)
    table.add_column("id", no_wrap=True)
    for entry in found:
        table.add_row(
            _when(entry.get("at")),
            _cell(entry.get("action")),
            _cell("yes" if entry.get("dry_run") else "no"),
            _cell(entry.get("actor")),
            _cell(entry.get("count")),
            _cell(entry.get("reason")),
            _cell(json.dumps(entry.get("selection") or {}, sort_keys=True), width=120),
            _cell(entry.get("id")),
        )
    session.out.print(table)


def main(argv: Sequence[str] | None = None) -> None:
    """The `courier` console script."""
    cli.main(args=list(argv) if argv is not None else sys.argv[1:], prog_name="courier")


if __name__ == "__main__":
    main()
