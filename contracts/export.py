"""Export the contracts as files other teams and tools read: JSON Schemas and an AsyncAPI document.

    courier-schemas            write contracts/schemas/<event type>.json and contracts/asyncapi.yaml
    courier-schemas --check    write nothing; exit 1 naming every file that differs from the models

The files are generated, committed, and checked in CI (tests/unit/test_schemas.py): the pydantic
models stay the single source of truth, and a change to a model shows up as a reviewable diff.
Output is deterministic (sorted keys, no timestamps) so that diffs are stable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import yaml

from contracts.events import EVENT_MODELS, INGEST_TYPES, schema_urn
from contracts.topology import (
    CONTROL_EVENT_TYPES,
    SUBSCRIPTIONS,
    WORKERS,
    ExchangeSpec,
    events_exchange,
    queue_for,
    service_topology,
)

__all__ = [
    "ASYNCAPI_FILE",
    "COMMAND",
    "NAMESPACE",
    "PUBLICATIONS",
    "SCHEMA_DIR",
    "asyncapi_document",
    "check",
    "event_schema",
    "main",
    "render",
    "write",
]

Action = Literal["send", "receive"]

COMMAND: Final = "courier-schemas"
"""How to regenerate the files (also `python -m contracts.export`)."""

ROOT: Final = Path(__file__).resolve().parent
SCHEMA_DIR: Final = ROOT / "schemas"
ASYNCAPI_FILE: Final = ROOT / "asyncapi.yaml"

NAMESPACE: Final = "courier"
"""The default namespace (`COURIER_NAMESPACE`) the documented broker names derive from."""

AMQP_HOST: Final = "127.0.0.1:5672"
CONTENT_TYPE: Final = "application/cloudevents+json"
JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
AMQP_BINDING_VERSION: Final = "0.3.0"
_GENERATED: Final = f"Generated from contracts.events by `{COMMAND}`; do not edit by hand."

PUBLICATIONS: Final[dict[str, tuple[str, ...]]] = {
    # The gateway publishes what upstream clients may submit, the files it stored and the
    # callbacks clients asked for ...
    "gateway": (
        *(t for t in EVENT_MODELS if t in INGEST_TYPES),
        "cancellation.requested",
        "file.uploaded",
        "callback.requested",
    ),
    # ... handlers publish the follow-up events they return, and workers report status.
    "processor": ("dataset.processed", "results.reported", "status.reported", "file.processed"),
    "notifier": ("status.reported",),
}
"""Which service publishes which event types (who consumes what is `SUBSCRIPTIONS`)."""


def receives(service: str) -> tuple[str, ...]:
    """What a service consumes: its subscriptions, and control requests if it is a worker."""
    control = CONTROL_EVENT_TYPES if service in WORKERS else ()
    return (*SUBSCRIPTIONS.get(service, ()), *control)


# --- JSON Schema ------------------------------------------------------------------------------


def event_schema(event_type: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one event type, identified by its dataschema URN."""
    schema = EVENT_MODELS[event_type].model_json_schema(mode="validation")
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": schema_urn(event_type),
        "$comment": _GENERATED,
        **schema,
    }


def _json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --- AsyncAPI ---------------------------------------------------------------------------------


def _camel(event_type: str) -> str:
    first, *rest = event_type.replace("_", ".").split(".")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def _channel_id(event_type: str) -> str:
    return _camel(event_type)


def _message_id(event_type: str) -> str:
    return EVENT_MODELS[event_type].__name__


def _operation_id(service: str, action: Action, event_type: str) -> str:
    return f"{service}{action.capitalize()}{_message_id(event_type)}"


def _ordered(types: Iterable[str]) -> list[str]:
    """Event types in `EVENT_MODELS` order, whatever order they came in."""
    wanted = set(types)
    unknown = wanted - EVENT_MODELS.keys()
    if unknown:
        raise ValueError(f"unknown event types: {sorted(unknown)}")
    return [t for t in EVENT_MODELS if t in wanted]


def _sorted_keys(value: Any) -> Any:
    """Recursively sort mapping keys, as the JSON files are, so the YAML diffs as stably."""
    if isinstance(value, Mapping):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def _component_schemas() -> dict[str, Any]:
    """Every event schema, with its `$defs` hoisted into `components/schemas` beside it."""
    schemas: dict[str, Any] = {}

    def add(name: str, schema: dict[str, Any]) -> None:
        if name in schemas and schemas[name] != schema:
            raise ValueError(f"two different schemas are both named {name!r}")
        schemas[name] = schema

    for event_type, model in EVENT_MODELS.items():
        schema = model.model_json_schema(
            mode="validation", ref_template="#/components/schemas/{model}"
        )
        for name, definition in schema.pop("$defs", {}).items():
            add(name, definition)
        add(_message_id(event_type), schema)
    return _sorted_keys(schemas)  # type: ignore[no-any-return]


def _events_exchange() -> ExchangeSpec:
    service = next(iter(SUBSCRIPTIONS))
    name = events_exchange(NAMESPACE)
    return next(x for x in service_topology(NAMESPACE, service).exchanges() if x.name == name)


def _channel(event_type: str, exchange: ExchangeSpec) -> dict[str, Any]:
    message = _message_id(event_type)
    return {
        "address": event_type,
        "title": event_type,
        "description": (
            f"Events of type `{event_type}` on the `{exchange.name}` {exchange.kind} exchange; "
            "the routing key is the event type."
        ),
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": exchange.name,
                    "type": exchange.kind,
                    "durable": exchange.durable,
                    "autoDelete": False,
                    "vhost": "/",
                },
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        },
    }


def _message(event_type: str) -> dict[str, Any]:
    model = EVENT_MODELS[event_type]
    summary = (model.__doc__ or event_type).strip().splitlines()[0]
    return {
        "name": event_type,
        "title": model.__name__,
        "summary": summary,
        "description": (
            f"A CloudEvents 1.0 event in structured mode. `dataschema` is "
            f"`{schema_urn(event_type)}`, the `$id` of "
            f"`contracts/schemas/{event_type}.json`."
        ),
        "contentType": CONTENT_TYPE,
        "correlationId": {
            "description": "The correlation id; when absent, the event's own `id`.",
            "location": "$message.payload#/correlationid",
        },
        "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        "bindings": {
            "amqp": {"messageType": event_type, "bindingVersion": AMQP_BINDING_VERSION},
        },
    }


def _operation(service: str, action: Action, event_type: str) -> dict[str, Any]:
    channel = _channel_id(event_type)
    if action == "send":
        description = (
            f"The {service} publishes `{event_type}` persistent and mandatory, and counts it "
            "as sent only once the broker confirmed it."
        )
        binding: dict[str, Any] = {"deliveryMode": 2, "mandatory": True}
    else:
        description = (
            f"The {service} consumes `{event_type}` from its quorum queue "
            f"`{queue_for(NAMESPACE, service, event_type)}` and acknowledges it only after "
            "its handler succeeded."
        )
        binding = {"ack": True}
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{_message_id(event_type)}"}],
        "summary": f"{service} {action}s {event_type}",
        "description": description,
        "tags": [{"name": service}],
        "bindings": {"amqp": {**binding, "bindingVersion": AMQP_BINDING_VERSION}},
    }


def _operations() -> dict[str, Any]:
    operations: dict[str, Any] = {}
    services = list(dict.fromkeys([*PUBLICATIONS, *SUBSCRIPTIONS]))
    for service in services:
        flows: tuple[tuple[Action, tuple[str, ...]], ...] = (
            ("send", PUBLICATIONS.get(service, ())),
            ("receive", receives(service)),
        )
        for action, types in flows:
            for event_type in _ordered(types):
                operations[_operation_id(service, action, event_type)] = _operation(
                    service, action, event_type
                )
    return operations


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of Courier's events exchange, derived from the contracts."""
    exchange = _events_exchange()
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Courier events",
            "version": "1",
            "description": (
                "Durable background work and events on RabbitMQ. Every event is a CloudEvents "
                f"1.0 envelope published to the `{exchange.name}` topic exchange with the "
                "event type as routing key; each consuming service has its own quorum queue "
                "bound to the types it subscribes to (and a queue of their own for the types "
                "of a lane, such as the processor's files).\n\n" + _GENERATED
            ),
            "license": {"name": "MIT", "url": "https://opensource.org/licenses/MIT"},
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "local": {
                "host": AMQP_HOST,
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "RabbitMQ for a local run; deployments set `AMQP_URL`.",
            }
        },
        "channels": {_channel_id(t): _channel(t, exchange) for t in EVENT_MODELS},
        "operations": _operations(),
        "components": {
            "messages": {_message_id(t): _message(t) for t in EVENT_MODELS},
            "schemas": _component_schemas(),
        },
    }


def _yaml(document: Mapping[str, Any]) -> str:
    body = yaml.safe_dump(
        document, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100
    )
    return f"# {_GENERATED}\n{body}"


# --- files ------------------------------------------------------------------------------------


def render(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file under `root` (the contracts package) and its content."""
    files = {root / SCHEMA_DIR.name / f"{t}.json": _json(event_schema(t)) for t in EVENT_MODELS}
    files[root / ASYNCAPI_FILE.name] = _yaml(asyncapi_document())
    return files


def _stale(root: Path, files: Mapping[Path, str]) -> list[Path]:
    """Schema files of event types that no longer exist."""
    return sorted(path for path in (root / SCHEMA_DIR.name).glob("*.json") if path not in files)


def _display(path: Path, root: Path) -> str:
    return f"{root.name}/{path.relative_to(root).as_posix()}"


def check(root: Path = ROOT) -> list[str]:
    """What differs between the files on disk and what the models produce (empty: up to date)."""
    problems: list[str] = []
    files = render(root)
    for path, content in files.items():
        if not path.is_file():
            problems.append(f"missing: {_display(path, root)}")
        elif path.read_text(encoding="utf-8") != content:
            problems.append(f"differs: {_display(path, root)}")
    problems.extend(f"stale: {_display(path, root)}" for path in _stale(root, files))
    return problems


def write(root: Path = ROOT) -> list[str]:
    """Write every generated file whose content changed and remove stale schemas; say what."""
    changes: list[str] = []
    files = render(root)
    (root / SCHEMA_DIR.name).mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8")
            changes.append(f"wrote {_display(path, root)}")
    for path in _stale(root, files):
        path.unlink()
        changes.append(f"removed {_display(path, root)}")
    return changes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Write the JSON Schemas and the AsyncAPI document of Courier's events.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the files on disk differ from what the models produce",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="directory that holds schemas/ and asyncapi.yaml (default: the contracts package)",
    )
    args = parser.parse_args(argv)
    root: Path = args.root
    if args.check:
        problems = check(root)
        if problems:
            sys.stderr.write(
                "The exported contracts are out of date with contracts.events:\n"
                + "".join(f"  {problem}\n" for problem in problems)
                + f"Run `{COMMAND}` (or `python -m contracts.export`) and commit the result.\n"
            )
            return 1
        sys.stdout.write(f"{len(render(root))} generated files are up to date.\n")
        return 0
    changes = write(root)
    sys.stdout.write("".join(f"{change}\n" for change in changes) or "already up to date\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
