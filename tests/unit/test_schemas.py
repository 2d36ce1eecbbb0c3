"""The exported contracts: the committed JSON Schemas and AsyncAPI document match the models, are
valid documents, and accept and refuse what the models accept and refuse."""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from jsonschema.validators import validator_for
from pydantic import ValidationError

from contracts import export
from contracts.events import EVENT_ADAPTER, EVENT_MODELS, INGEST_TYPES, schema_urn
from contracts.topology import SUBSCRIPTIONS, events_exchange
from services.messaging.settings import CourierSettings

REGENERATE = "run `courier-schemas` (or `python -m contracts.export`) and commit the result"
ASYNCAPI_SPEC = Path(__file__).parent / "data" / "asyncapi-3.0.0.json"

# One valid event of every type, as it travels (a new event type fails here until it has one) ...
VALID: dict[str, dict[str, Any]] = {
    "notification.requested": {
        "type": "notification.requested",
        "specversion": "1.0",
        "id": "n-1",
        "source": "urn:test",
        "time": "2025-01-01T00:00:00Z",
        "data": {"channel": "email", "recipient": "a@example.org", "subject": "hi", "body": "yo"},
    },
    "dataset.submitted": {
        "type": "dataset.submitted",
        "id": "d-1",
        "correlationid": "c-1",
        "callbackurl": "https://shop.example/hooks/courier",
        "data": {"name": "sales", "records": [{"a": 1, "b": "x", "c": None, "d": True}]},
    },
    "dataset.processed": {
        "type": "dataset.processed",
        "id": "p-1",
        "causationid": "d-1",
        "subject": "d-1",
        "data": {
            "dataset_id": "d-1",
            "name": "sales",
            "record_count": 1,
            "fields": {"a": {"kind": "number", "count": 1, "nulls": 0, "min": 1.0, "max": 1.0}},
        },
    },
    "status.reported": {
        "type": "status.reported",
        "id": "s-1",
        "source": "urn:courier:processor",
        "data": {
            "transitions": [
                {
                    "event_id": "d-1",
                    "service": "processor",
                    "state": "retrying",
                    "at": "2025-01-01T00:00:01Z",
                    "attempt": 1,
                    "next_attempt_at": "2025-01-01T00:00:06Z",
                }
            ]
        },
    },
    "cancellation.requested": {
        "type": "cancellation.requested",
        "id": "x-1",
        "data": {"event_id": "d-1"},
    },
    "file.uploaded": {
        "type": "file.uploaded",
        "id": "f-1",
        "data": {
            "file_id": "f-1",
            "blob": "f-1",
            "name": "prices.csv",
            "content_type": "text/csv",
            "size": 12,
            "sha256": "0" * 64,
        },
    },
    "file.processed": {
        "type": "file.processed",
        "id": "fp-1",
        "causationid": "f-1",
        "data": {
            "file_id": "f-1",
            "name": "prices.csv",
            "declared_type": "text/csv",
            "size": 12,
            "sha256": "0" * 64,
            "analysis": {
                "detected_type": "text/csv",
                "format": "csv",
                "record_count": 1,
                "columns": [{"name": "a", "kind": "number", "count": 1, "nulls": 0, "distinct": 1}],
            },
            "notify": [{"channel": "email", "recipient": "ops@example.org"}],
        },
    },
}
VALID["results.reported"] = {
    "type": "results.reported",
    "id": "r-1",
    "source": "urn:courier:processor",
    "data": {"results": [VALID["dataset.processed"]]},
}
VALID["callback.requested"] = {
    "type": "callback.requested",
    "id": "cb-1",
    "subject": "d-1",
    "data": {
        "event_id": "d-1",
        "event_type": "dataset.submitted",
        "outcome": "dead_lettered",
        "settled_at": "2025-01-01T00:00:09Z",
        "callback_url": "https://shop.example/hooks/courier",
        "services": {
            "processor": {
                "state": "dead_lettered",
                "attempt": 3,
                "reason": "retries_exhausted",
                "group": "0123456789abcdef",
                "detail": "ConnectionError: down",
                "updated_at": "2025-01-01T00:00:09Z",
            }
        },
    },
}
# ... and where to put a value of the wrong type to make it invalid.
WRONG_TYPE: dict[str, tuple[tuple[str, ...], object]] = {
    "notification.requested": (("data", "subject"), 5),
    "dataset.submitted": (("data", "records"), {"a": 1}),
    "dataset.processed": (("data", "record_count"), "1"),
    "status.reported": (("data", "transitions"), {"event_id": "d-1"}),
    "results.reported": (("data", "results"), VALID["dataset.processed"]),
    "cancellation.requested": (("data", "event_id"), 7),
    "file.uploaded": (("data", "size"), "12"),
    "file.processed": (("data", "analysis", "record_count"), True),
    "callback.requested": (("data", "outcome"), "cancelled"),
}


def _committed_schema(event_type: str) -> dict[str, Any]:
    path = export.SCHEMA_DIR / f"{event_type}.json"
    assert path.is_file(), f"{path} is missing: {REGENERATE}"
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


def _committed_asyncapi() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(export.ASYNCAPI_FILE.read_text(encoding="utf-8"))
    return document


def _with_wrong_type(event_type: str) -> dict[str, Any]:
    event = copy.deepcopy(VALID[event_type])
    (*parents, leaf), value = WRONG_TYPE[event_type]
    target = event
    for key in parents:
        target = target[key]
    target[leaf] = value
    return event


def _resolve(document: Mapping[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references are expected, got {ref}"
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, Mapping):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


# --- drift ------------------------------------------------------------------------------------


def test_the_committed_files_match_what_the_models_produce() -> None:
    drift: list[str] = []
    for path, expected in export.render().items():
        actual = path.read_text(encoding="utf-8") if path.is_file() else ""
        if actual != expected:
            diff = difflib.unified_diff(
                actual.splitlines(), expected.splitlines(), str(path), "generated", lineterm=""
            )
            drift.append("\n".join(list(diff)[:40]))
    drift.extend(problem for problem in export.check() if problem.startswith("stale:"))
    assert not drift, f"the exported contracts drifted from the models; {REGENERATE}:\n" + (
        "\n".join(drift)
    )


def test_check_reports_drift_and_write_repairs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "contracts"
    assert export.main(["--check", "--root", str(root)]) == 1
    assert export.main(["--root", str(root)]) == 0
    assert export.main(["--check", "--root", str(root)]) == 0
    capsys.readouterr()

    (root / "schemas" / "dataset.submitted.json").write_text("{}\n", encoding="utf-8")
    (root / "schemas" / "dataset.retired.json").write_text("{}\n", encoding="utf-8")
    assert export.main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "differs: contracts/schemas/dataset.submitted.json" in err
    assert "stale: contracts/schemas/dataset.retired.json" in err
    assert "courier-schemas" in err
    assert (root / "schemas" / "dataset.submitted.json").read_text(encoding="utf-8") == "{}\n"

    assert export.write(root) == [
        "wrote contracts/schemas/dataset.submitted.json",
        "removed contracts/schemas/dataset.retired.json",
    ]
    assert export.check(root) == []


# --- JSON Schemas -----------------------------------------------------------------------------


def test_every_event_type_and_no_other_has_a_committed_schema() -> None:
    committed = {path.name for path in export.SCHEMA_DIR.glob("*.json")}
    assert committed == {f"{t}.json" for t in EVENT_MODELS}, REGENERATE


@pytest.mark.parametrize("event_type", list(EVENT_MODELS))
def test_a_committed_schema_is_a_valid_json_schema_named_by_its_dataschema(
    event_type: str,
) -> None:
    schema = _committed_schema(event_type)
    validator_for(schema).check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == schema_urn(event_type)
    assert schema["$id"] == EVENT_MODELS[event_type].model_fields["dataschema"].default


@pytest.mark.parametrize("event_type", list(EVENT_MODELS))
def test_a_committed_schema_accepts_a_valid_event_and_refuses_a_wrong_type(
    event_type: str,
) -> None:
    schema = _committed_schema(event_type)
    validator = validator_for(schema)(schema)
    valid, invalid = VALID[event_type], _with_wrong_type(event_type)

    assert list(validator.iter_errors(valid)) == []
    assert not validator.is_valid(invalid)
    # The schema and the model agree on both.
    assert EVENT_ADAPTER.validate_python(valid).type == event_type
    with pytest.raises(ValidationError):
        EVENT_ADAPTER.validate_python(invalid)


@pytest.mark.parametrize("event_type", list(EVENT_MODELS))
def test_a_committed_schema_accepts_what_the_model_serialises(event_type: str) -> None:
    schema = _committed_schema(event_type)
    event = EVENT_ADAPTER.validate_python(VALID[event_type])
    assert validator_for(schema)(schema).is_valid(event.model_dump(mode="json"))


# --- AsyncAPI ---------------------------------------------------------------------------------


def test_the_asyncapi_document_is_valid_against_the_official_3_0_0_schema() -> None:
    assert ASYNCAPI_SPEC.is_file(), f"{ASYNCAPI_SPEC} is missing (vendored from @asyncapi/specs)"
    spec = json.loads(ASYNCAPI_SPEC.read_text(encoding="utf-8"))
    Draft7Validator.check_schema(spec)
    errors = sorted(
        Draft7Validator(spec).iter_errors(_committed_asyncapi()), key=lambda e: e.json_path
    )
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors[:10])


def test_the_asyncapi_document_has_a_routing_key_channel_per_event_type() -> None:
    document = _committed_asyncapi()
    assert document["asyncapi"] == "3.0.0"
    server = document["servers"]["local"]
    assert (server["host"], server["protocol"], server["protocolVersion"]) == (
        "127.0.0.1:5672",
        "amqp",
        "0.9.1",
    )

    assert CourierSettings.model_fields["namespace"].default == export.NAMESPACE
    channels = document["channels"].values()
    assert sorted(channel["address"] for channel in channels) == sorted(EVENT_MODELS)
    for channel in channels:
        binding = channel["bindings"]["amqp"]
        assert binding["is"] == "routingKey"
        assert binding["exchange"]["name"] == events_exchange(export.NAMESPACE)
        assert binding["exchange"]["type"] == "topic"
        assert binding["exchange"]["durable"] is True
        [message_ref] = channel["messages"].values()
        message = _resolve(document, message_ref["$ref"])
        assert message["contentType"] == "application/cloudevents+json"
        payload = _resolve(document, message["payload"]["$ref"])
        assert payload["properties"]["type"]["const"] == channel["address"]


def test_every_reference_in_the_asyncapi_document_resolves() -> None:
    document = _committed_asyncapi()
    for ref in _refs(document):
        assert _resolve(document, ref) is not None, ref


def test_the_asyncapi_operations_follow_the_subscriptions() -> None:
    document = _committed_asyncapi()
    flows: dict[tuple[str, str], set[str]] = {}
    for name, operation in document["operations"].items():
        [tag] = operation["tags"]
        channel = _resolve(document, operation["channel"]["$ref"])
        for message_ref in operation["messages"]:
            assert message_ref["$ref"].startswith(operation["channel"]["$ref"] + "/messages/"), name
            _resolve(document, message_ref["$ref"])
        flows.setdefault((tag["name"], operation["action"]), set()).add(channel["address"])

    receives = {service: types for (service, action), types in flows.items() if action == "receive"}
    sends = {service: types for (service, action), types in flows.items() if action == "send"}
    assert receives == {service: set(export.receives(service)) for service in SUBSCRIPTIONS}
    assert set(INGEST_TYPES) <= sends["gateway"]
    assert sends == {service: set(types) for service, types in export.PUBLICATIONS.items()}
    # Every published type reaches a queue (a mandatory publish would come back otherwise), and
    # every subscribed type has a publisher.
    sent = set().union(*sends.values())
    received = set().union(*receives.values())
    assert sent == received == set(EVENT_MODELS)


@pytest.mark.parametrize("event_type", list(EVENT_MODELS))
def test_the_asyncapi_payload_schema_accepts_and_refuses_like_the_json_schema(
    event_type: str,
) -> None:
    document = _committed_asyncapi()
    name = EVENT_MODELS[event_type].__name__
    # AsyncAPI Schema Objects are JSON Schema draft 07; references point into the document.
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    validator = Draft7Validator(schema)
    assert list(validator.iter_errors(VALID[event_type])) == []
    assert not validator.is_valid(_with_wrong_type(event_type))
