"""compose.yaml and the Dockerfile: valid, and wired the way the services expect.

Schema origin: data/compose-spec.json is compose-spec/compose-spec's schema/compose-spec.json
as vendored, byte for byte, in check-jsonschema 0.39.0 from PyPI (Apache-2.0: LICENSE.compose-spec).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import AliasChoices

from services.gateway.settings import GatewaySettings
from services.messaging.settings import ConsumerSettings, CourierSettings
from services.notifier.settings import NotifierSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCHEMA_FILE = Path(__file__).parent / "data" / "compose-spec.json"

BROKER = "rabbitmq"
APP_SERVICES = ("gateway", "processor", "notifier")
CONSUMERS = ("processor", "notifier")
SETTINGS: dict[str, type[CourierSettings]] = {
    "gateway": GatewaySettings,
    "processor": ConsumerSettings,
    "notifier": NotifierSettings,
}

# `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}` … (Compose interpolation).
_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
_URL_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?P<userinfo>[^/@\s]+)@")
_SECRET_NAME = re.compile(r"USER|PASS|SECRET|TOKEN|KEY", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_READYZ = re.compile(r"http://127\.0\.0\.1:(\d+)/readyz")


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return document


def _service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = _compose()["services"][name]
    return service


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return schema


def _interpolate(value: str, host: Mapping[str, str] | None = None) -> str:
    """Resolve Compose interpolation as `docker compose` would with only `host`'s variables
    set (none by default)."""

    def default(match: re.Match[str]) -> str:
        if host and match["name"] in host:
            return host[match["name"]]
        op = match["op"]
        assert op in {":-", "-"}, f"{match[0]} has no default: the stack needs a .env to start"
        return match["arg"] or ""

    resolved = _INTERPOLATION.sub(default, value.replace("$$", "\0"))
    assert "$" not in resolved, f"unsupported interpolation in {value!r}"
    return resolved.replace("\0", "$")


def _environment(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def _seconds(duration: str) -> float:
    parts = _DURATION_PART.findall(duration)
    assert parts, f"not a Compose duration: {duration!r}"
    assert "".join(n + u for n, u in parts) == duration, f"not a Compose duration: {duration!r}"
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def _healthcheck_port(service: dict[str, Any]) -> int:
    test = service["healthcheck"]["test"]
    ports = _READYZ.findall(" ".join(test) if isinstance(test, list) else test)
    assert len(ports) == 1, f"healthcheck should probe one /readyz: {test!r}"
    return int(ports[0])


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    parts: list[str] = []
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may also sit between continuation lines
        parts.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            keyword, _, arguments = " ".join(parts).partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            parts = []
    assert not parts, "the Dockerfile ends inside a continued line"
    return instructions


def _dockerfile_cmd() -> list[str]:
    cmds = [arguments for keyword, arguments in _dockerfile_instructions() if keyword == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    command = json.loads(cmds[-1])  # exec form: SIGTERM reaches python, not a shell
    assert isinstance(command, list), "CMD must use the exec (JSON array) form"
    return [str(part) for part in command]


def _command(name: str) -> list[str]:
    command = _service(name).get("command")
    if command is None:
        return _dockerfile_cmd()
    assert isinstance(command, list), f"{name}: use the exec form for command"
    return [str(part) for part in command]


def _apply_environment(
    name: str, monkeypatch: pytest.MonkeyPatch, host: Mapping[str, str] | None = None
) -> None:
    """Make os.environ what the container would see (no .env file, nothing inherited but
    `host`'s variables, as set where `docker compose` runs)."""
    _clear_environment(monkeypatch)
    for key, value in _environment(_service(name)).items():
        monkeypatch.setenv(key, _interpolate(value, host))


def _clear_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("COURIER_") or key in {"AMQP_URL", "DATABASE_URL"}:
            monkeypatch.delenv(key)


def _dockerfile_env() -> dict[str, str]:
    """The image's ENV, from `ENV KEY=VALUE ...` instructions."""
    env: dict[str, str] = {}
    for keyword, arguments in _dockerfile_instructions():
        if keyword == "ENV":
            for pair in arguments.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


# --- the file is a valid Compose file ---------------------------------------------------------


def test_vendored_schema_is_the_compose_specification() -> None:
    schema = _schema()
    assert schema["title"] == "Compose Specification"
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_compose_file_follows_the_compose_specification() -> None:
    validator = Draft202012Validator(_schema(), format_checker=Draft202012Validator.FORMAT_CHECKER)
    errors = [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(_compose())
    ]
    assert errors == []


def test_schema_rejects_a_misspelt_service_key() -> None:
    """Guards the test above: the schema really checks service keys with this validator."""
    document = _compose()
    document["services"]["gateway"]["helthcheck"] = document["services"]["gateway"]["healthcheck"]
    assert not Draft202012Validator(_schema()).is_valid(document)


def test_no_obsolete_version_key() -> None:
    assert "version" not in _compose()


def test_named_volumes_are_declared() -> None:
    document = _compose()
    declared = set(document.get("volumes") or {})
    for name, service in document["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source!r}"


# --- start-up order, health and shutdown -----------------------------------------------------


def test_every_service_has_a_healthcheck() -> None:
    for name, service in _compose()["services"].items():
        healthcheck = service.get("healthcheck")
        assert healthcheck, f"{name} has no healthcheck"
        assert not healthcheck.get("disable", False), f"{name} disables its healthcheck"
        test = healthcheck["test"]
        assert isinstance(test, list), f"{name}: healthcheck test should be a list"
        assert test[0] in {"CMD", "CMD-SHELL"}, f"{name}: healthcheck test {test!r}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_waits_for_a_healthy_broker(name: str) -> None:
    depends_on = _service(name).get("depends_on")
    assert isinstance(depends_on, dict), f"{name}: short depends_on does not wait for health"
    assert depends_on[BROKER]["condition"] == "service_healthy"


def test_app_services_run_one_image() -> None:
    builds = [_service(name).get("build") for name in APP_SERVICES]
    images = [_service(name).get("image") for name in APP_SERVICES]
    assert builds[0] is not None, "the app services must build the project's image"
    assert all(build == builds[0] for build in builds), builds
    assert images[0], "name the image so that the three services share one build"
    assert all(image == images[0] for image in images), images
    context = builds[0] if isinstance(builds[0], str) else builds[0].get("context", ".")
    dockerfile = "Dockerfile" if isinstance(builds[0], str) else builds[0].get("dockerfile")
    assert (ROOT / context / (dockerfile or "Dockerfile")).resolve() == DOCKERFILE


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_is_restarted_when_it_exits(name: str) -> None:
    # A consumer exits non-zero when it cannot consume for too long and counts on this restart.
    assert _service(name).get("restart") in {"unless-stopped", "always", "on-failure"}


def test_broker_healthcheck_probes_the_broker() -> None:
    test = " ".join(_service(BROKER)["healthcheck"]["test"])
    assert "rabbitmq-diagnostics" in test
    assert "ping" in test or "check_port_connectivity" in test


# --- the environment configures what the services read ---------------------------------------


@pytest.mark.parametrize("name", APP_SERVICES)
def test_environment_names_are_settings_of_the_service(name: str) -> None:
    """Settings ignore unknown variables, so a misspelt name would silently do nothing."""
    known: set[str] = set()
    for field_name, field in SETTINGS[name].model_fields.items():
        known.add(f"COURIER_{field_name.upper()}")
        if isinstance(field.validation_alias, AliasChoices):
            known.update(str(choice) for choice in field.validation_alias.choices)
    unknown = set(_environment(_service(name))) - known
    assert not unknown, f"{name} sets variables no setting reads: {sorted(unknown)}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_connects_to_the_compose_broker(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _apply_environment(name, monkeypatch)
    settings = SETTINGS[name]()
    assert urlsplit(settings.amqp_url).hostname == BROKER


def test_gateway_listens_where_it_is_published_and_probed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway_main = importlib.import_module("services.gateway.__main__")
    _apply_environment("gateway", monkeypatch)
    settings = SETTINGS["gateway"]()
    config = gateway_main.server_config(settings, gateway_main.create_app(settings))

    service = _service("gateway")
    assert config.host == "0.0.0.0"
    published = {int(str(port).rsplit(":", 1)[-1]) for port in service["ports"]}
    assert config.port in published
    assert _healthcheck_port(service) == config.port
    assert _seconds(service["stop_grace_period"]) > config.timeout_graceful_shutdown


@pytest.mark.parametrize("name", CONSUMERS)
def test_consumer_serves_health_where_it_is_probed(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry_point = importlib.import_module(f"services.{name}.__main__")
    started: dict[str, Any] = {}
    _apply_environment(name, monkeypatch)
    monkeypatch.setattr(
        entry_point, "run", lambda service, settings, _routes: started.update(settings=settings)
    )
    entry_point.main()

    settings = started["settings"]
    assert isinstance(settings, ConsumerSettings)
    assert isinstance(settings, SETTINGS[name])
    service = _service(name)
    assert settings.health_host == "0.0.0.0"
    assert settings.health_port == _healthcheck_port(service) != 0
    assert _seconds(service["stop_grace_period"]) > settings.shutdown_timeout


@pytest.mark.parametrize("name", APP_SERVICES)
def test_database_url_set_where_compose_runs_reaches_the_service(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "postgresql://courier@db/courier"
    _apply_environment(name, monkeypatch, host={"DATABASE_URL": url})
    assert SETTINGS[name]().database_url == url


@pytest.mark.parametrize("name", APP_SERVICES)
def test_database_url_unset_where_compose_runs_keeps_sqlite(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compose passes an unset `${DATABASE_URL:-}` as an empty string."""
    _apply_environment(name, monkeypatch)
    assert SETTINGS[name]().database_url is None


@pytest.mark.parametrize("name", APP_SERVICES)
def test_the_courier_named_database_url_is_not_hidden_by_an_empty_one(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set in an override as `COURIER_DATABASE_URL`, while compose passes `DATABASE_URL` empty."""
    url = "postgresql://courier@db/courier"
    _apply_environment(name, monkeypatch)
    monkeypatch.setenv("COURIER_DATABASE_URL", url)
    assert SETTINGS[name]().database_url == url


def test_the_image_alone_keeps_its_state_on_its_volumes_and_listens_outside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`docker run` without compose: the stores, the notifier's log and uploaded files in
    the directories the image makes writable, the ports reachable from outside."""
    _clear_environment(monkeypatch)
    for key, value in _dockerfile_env().items():
        monkeypatch.setenv(key, value)
    writable = {Path(d) for d in _dockerfile_run_mkdirs()}
    gateway = GatewaySettings(environment="development")  # no ops tokens given
    notifier = NotifierSettings(environment="development")
    assert gateway.data_dir in writable and gateway.blob_dir in writable
    assert notifier.notify_log.parent in writable
    assert gateway.host == "0.0.0.0" and ConsumerSettings().health_host == "0.0.0.0"


def _dockerfile_run_mkdirs() -> list[str]:
    made: list[str] = []
    for keyword, arguments in _dockerfile_instructions():
        if keyword == "RUN" and "mkdir -p" in arguments:
            made += arguments.split("mkdir -p", 1)[1].split("&&")[0].split()
    return made


def test_notifier_log_is_on_a_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    _apply_environment("notifier", monkeypatch)
    notify_log = NotifierSettings().notify_log
    targets = [
        Path(volume["target"] if isinstance(volume, dict) else volume.split(":")[1])
        for volume in _service("notifier").get("volumes", [])
    ]
    assert any(notify_log.is_relative_to(target) for target in targets), (notify_log, targets)


def _volume_mounts(name: str) -> dict[Path, str]:
    """Mount target → source of a service's volumes."""
    mounts: dict[Path, str] = {}
    for volume in _service(name).get("volumes", []):
        if isinstance(volume, dict):
            mounts[Path(volume["target"])] = volume["source"]
        else:
            source, target = volume.split(":")[:2]
            mounts[Path(target)] = source
    return mounts


def test_gateway_and_processor_share_the_blob_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    """The processor reads the files the gateway stored: same directory, same named volume."""
    volumes: list[str] = []
    directories: list[Path] = []
    for name in ("gateway", "processor"):
        _apply_environment(name, monkeypatch)
        blob_dir = SETTINGS[name]().blob_dir
        directories.append(blob_dir)
        mounts = [
            (len(target.parts), source)
            for target, source in _volume_mounts(name).items()
            if blob_dir.is_relative_to(target)
        ]
        assert mounts, f"{name}: {blob_dir} is on no volume"
        volumes.append(max(mounts)[1])  # the innermost mount holds the directory
    assert directories[0] == directories[1], directories
    assert volumes[0] == volumes[1] and volumes[0] in (_compose().get("volumes") or {}), volumes


def test_credentials_only_through_the_environment() -> None:
    for name, service in _compose()["services"].items():
        elsewhere = {key: value for key, value in service.items() if key != "environment"}
        for text in _strings(elsewhere):
            assert not _URL_USERINFO.search(text), f"{name}: credentials in {text!r}"
            assert "guest" not in text.lower(), f"{name}: credentials in {text!r}"
        # In the environment, credentials are variables (an .env file or the shell sets them).
        for key, value in _environment(service).items():
            hint = f"{name}: {key} hard-codes a credential; use ${{VARIABLE:-default}}"
            userinfo = _URL_USERINFO.search(value)
            if userinfo:
                assert _INTERPOLATION.sub("", userinfo["userinfo"]) in {"", ":"}, hint
            if _SECRET_NAME.search(key):
                assert _INTERPOLATION.fullmatch(value), hint


# --- the image ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", APP_SERVICES)
def test_command_runs_an_entry_point_module(name: str) -> None:
    command = _command(name)
    assert command[:2] == ["python", "-m"], command
    module = importlib.import_module(f"{command[2]}.__main__")
    assert callable(getattr(module, "main", None)), f"{command[2]} has no main()"


def test_dockerfile_cmd_serves_the_gateway() -> None:
    assert _dockerfile_cmd() == ["python", "-m", "services.gateway"]


def test_image_runs_as_a_non_root_user() -> None:
    users = [arguments for keyword, arguments in _dockerfile_instructions() if keyword == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_image_copies_what_the_build_needs() -> None:
    ignored = {
        line.strip().strip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for keyword, arguments in _dockerfile_instructions():
        if keyword != "COPY" or "--from" in arguments:
            continue
        *sources, _destination = [part for part in arguments.split() if not part.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert source.strip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"
