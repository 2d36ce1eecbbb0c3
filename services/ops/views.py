"""How the CLI shows what the ops API answers: plain, safe text and the tables and blocks it
is laid out in.

Dead letters carry text from anyone who can make a message fail (a webhook receiver's answer,
say): it is shown with every unprintable character escaped, and never read as markup.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

__all__ = [
    "actions_table",
    "groups_listing",
    "json_text",
    "letter_view",
    "letters_listing",
    "visible",
]

MAX_MESSAGE_WIDTH = 80

# What would drive or mislead a terminal: every character Python deems unprintable (C0 and C1
# controls and DEL, whose escape sequences recolour, retitle or erase; format characters such
# as bidi overrides that reorder what is shown, zero-width and tag characters; separators but
# the space), as the failure store's `printable` judges them. Dead letters carry text from
# anyone who can make a message fail, e.g. a webhook receiver's answer.


def _escaped(text: str, keep: str, escape: Callable[[str], str]) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else escape(c) for c in text)


def visible(text: str, *, lines: bool = False) -> str:
    """`text` with every unprintable character written as its Python escape (`\\x1b`,
    `\\u202e`), as the failure store writes what it cannot hold; `lines` keeps newlines and
    tabs."""
    return _escaped(text, "\n\t" if lines else "", lambda c: repr(c)[1:-1])


def json_text(value: Any) -> str:
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
    text = visible(str(value).replace("\n", " "))
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


def _table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[Text]]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        table.add_column(column.name, **column.options)
    for row in rows:
        table.add_row(*row)
    return table


def _listing(
    title: str, columns: Sequence[Column], rows: Sequence[Sequence[Text]], width: int
) -> Table | Group:
    """A table where the terminal is wide enough, else one block of lines a row."""
    if width >= WIDE_LISTING:
        return _table(title, columns, rows)
    blocks: list[Text | Table] = [Text(title)]
    for row in rows:
        block = Table.grid(padding=(0, 2))
        block.add_column(style="bold", no_wrap=True)
        block.add_column(overflow="fold")
        for column, cell in zip(columns, row, strict=True):
            block.add_row(column.label or column.name, cell)
        blocks += [Text(""), block]
    return Group(*blocks)


def letters_listing(items: Sequence[Mapping[str, Any]], status: str, width: int) -> Table | Group:
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


def letter_view(item: Mapping[str, Any]) -> Group:
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
        payload = Text(json_text(item["payload"]), no_wrap=True)
    else:
        payload = Text(visible(str(item.get("payload_text", "")), lines=True))
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
        traceback = Text(visible(str(item["traceback"]), lines=True))
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


def groups_listing(found: Sequence[Mapping[str, Any]], status: str, width: int) -> Table | Group:
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
    return _listing(title, columns, rows, width)


def actions_table(found: Sequence[Mapping[str, Any]]) -> Table:
    columns = [
        *(Column(n, {"no_wrap": True}) for n in ("at (UTC)", "action", "dry run", "actor")),
        Column("count", {"justify": "right", "no_wrap": True}),
        Column("why", {"overflow": "fold"}),
        Column("selection", {"overflow": "fold", "min_width": 24}),
        Column("id", {"no_wrap": True}),
    ]
    rows = [
        [
            _when(entry.get("at")),
            _cell(entry.get("action")),
            _cell("yes" if entry.get("dry_run") else "no"),
            _cell(entry.get("actor")),
            _cell(entry.get("count")),
            _cell(entry.get("reason")),
            _cell(json.dumps(entry.get("selection") or {}, sort_keys=True), width=120),
            _cell(entry.get("id")),
        ]
        for entry in found
    ]
    return _table(f"{len(found)} action(s), newest first", columns, rows)
