"""Settings come from the environment, and README documents every one of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from contracts.notify import CHANNELS
from services.gateway.settings import GatewaySettings
from services.messaging.errors import RetryLater
from services.messaging.settings import ConsumerSettings, CourierSettings, load
from services.messaging.store import store_url
from services.notifier.settings import NotifierSettings
from services.ops.auth import identify

README = Path(__file__).resolve().parents[2] / "README.md"
ALL_SETTINGS: tuple[type[BaseSettings], ...] = (
    CourierSettings,
    GatewaySettings,
    ConsumerSettings,
    NotifierSettings,
)


def env_names(settings: type[BaseSettings]) -> set[str]:
    prefix = settings.model_config.get("env_prefix", "")
    names = set()
    for name, field in settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        names.add(str(choices[0]) if choices else f"{prefix}{name}".upper())
    return names


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=lambda s: s.__name__)
def test_readme_documents_every_setting(settings: type[BaseSettings]) -> None:
    table = README.read_text()
    missing = sorted(name for name in env_names(settings) if f"| `{name}` |" not in table)
    assert not missing, f"README's settings table lacks {missing}"


def test_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://u:p@broker:5672/v")
    monkeypatch.setenv("COURIER_NAMESPACE", "prod")
    monkeypatch.setenv("COURIER_RETRY_DELAYS", "1,10,60")
    monkeypatch.setenv("COURIER_PREFETCH", "7")
    settings = ConsumerSettings()
    assert settings.amqp_url == "amqp://u:p@broker:5672/v"
    assert settings.retry_delays == (1, 10, 60)
    assert settings.prefetch == 7
    assert settings.topology("processor").queue == "prod.processor"


def test_retry_delays_accept_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURIER_RETRY_DELAYS", "[2, 4]")
    assert CourierSettings().retry_delays == (2, 4)


@pytest.mark.parametrize("value", ["debug", "Warning", " INFO "])
def test_the_log_level_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("COURIER_LOG_LEVEL", value)
    assert CourierSettings().log_level == value.strip().upper()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COURIER_NAMESPACE", "has space"),
        ("COURIER_PREFETCH", "0"),
        ("COURIER_RETRY_DELAYS", "9,3"),
        # Beyond what a delay queue's TTL takes (2^32 - 1 ms).
        ("COURIER_RETRY_DELAYS", "5,5000000000"),
        ("AMQP_URL", "amqp//guest:guest@127.0.0.1:5672/"),
        ("AMQP_URL", "not-a-url"),
        ("AMQP_URL", "http://127.0.0.1:5672/"),
        ("COURIER_AMQP_URL", "amqp:///"),
        ("AMQP_URL", " , "),
        ("AMQP_URL", "amqp://rabbit-1/,rabbit-2:5672"),
        # 65535 or more turned heartbeats off.
        ("COURIER_HEARTBEAT", "100000"),
        # Infinite or huge durations overflowed where a duration is built, after start-up.
        ("COURIER_PUBLISH_TIMEOUT", "inf"),
        ("COURIER_INBOX_RETENTION_HOURS", "inf"),
        ("COURIER_INBOX_RETENTION_HOURS", "1e12"),
        ("COURIER_STATUS_RECOVERY_SECONDS", "inf"),
        ("COURIER_SHUTDOWN_TIMEOUT", "nan"),
        ("COURIER_DELIVERY_LIMIT", "99999999999999999999"),
        ("COURIER_MAX_QUEUE_LENGTH", "99999999999999999999"),
    ],
)
def test_nonsense_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match="validation error"):
        ConsumerSettings()


@pytest.mark.parametrize(
    ("settings", "variable", "value"),
    [
        (GatewaySettings, "COURIER_IDEMPOTENCY_TTL_HOURS", "inf"),
        (GatewaySettings, "COURIER_IDEMPOTENCY_TTL_HOURS", "1e12"),
        (GatewaySettings, "COURIER_OPS_RETENTION_DAYS", "1e10"),
        (GatewaySettings, "COURIER_TRACKING_RETENTION_DAYS", "inf"),
        (GatewaySettings, "COURIER_REPLAY_LEASE_SECONDS", "1e300"),
        (GatewaySettings, "COURIER_UPLOAD_TYPES", " , "),
        (NotifierSettings, "COURIER_DELIVERY_RETENTION_DAYS", "inf"),
        (NotifierSettings, "COURIER_SMTP_TIMEOUT", "inf"),
    ],
)
def test_nonsense_settings_of_a_service_are_refused(
    monkeypatch: pytest.MonkeyPatch, settings: type[BaseSettings], variable: str, value: str
) -> None:
    monkeypatch.setenv("COURIER_ENVIRONMENT", "development")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match="validation error"):
        settings()


def test_a_broker_url_that_is_refused_is_never_quoted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp//guest:S3cretPW@127.0.0.1:5672/")
    with pytest.raises(ValidationError, match="not an amqp:// or amqps:// URL") as refused:
        CourierSettings()
    assert "S3cretPW" not in str(refused.value)


def test_a_cluster_node_url_that_is_refused_is_named_by_its_place_never_quoted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://u:S3cretPW@rabbit-1/,amqp//u:S3cretPW@rabbit-2/")
    with pytest.raises(ValidationError, match="URL 2 of 2 is not an amqp://") as refused:
        CourierSettings()
    assert "S3cretPW" not in str(refused.value)


def test_a_raw_comma_in_a_password_is_refused_saying_how_to_write_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://u:S3c,ret99@rabbit-1:5672/")
    with pytest.raises(ValidationError, match="a comma in a password is written %2C") as refused:
        CourierSettings()
    assert "ret99" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://u:p@broker:5672/v",
        "amqps://broker/",
        "amqp://[::1]/",
        "amqp://u:p@rabbit-1:5672/,amqp://u:p@rabbit-2:5672/, amqp://u:p@rabbit-3:5672/",
    ],
)
def test_a_broker_url_with_a_host_is_taken(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("AMQP_URL", url)
    assert CourierSettings().amqp_url == url


def test_a_refused_setting_is_named_as_the_operator_set_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AMQP_URL", raising=False)
    monkeypatch.setenv("COURIER_AMQP_URL", "not-a-url")
    with pytest.raises(SystemExit):
        load(CourierSettings)
    assert capsys.readouterr().err.startswith("invalid setting COURIER_AMQP_URL: ")


@pytest.mark.parametrize(
    ("tokens", "why"),
    [
        ("ops:{a},bob:{a}", "one token is given twice"),
        (":{a}", "a token without a name"),
    ],
)
def test_each_ops_token_names_one_actor(tokens: str, why: str) -> None:
    pairs = tokens.format(a="a" * 32)
    with pytest.raises(ValidationError, match=re.escape(why)) as refused:
        GatewaySettings(environment="production", ops_tokens=pairs)
    assert "a" * 32 not in str(refused.value)


def test_a_name_may_hold_a_new_token_beside_the_old_one() -> None:
    # Rotating: both are taken until the old pair is dropped (the last pair won, and the old
    # token was refused at once).
    old, new = "o" * 32, "n" * 32
    settings = GatewaySettings(environment="production", ops_tokens=f"ops:{old},ops:{new}")
    assert identify(settings.ops_tokens, old) == identify(settings.ops_tokens, new) == "ops"


def test_ops_tokens_never_show_in_a_settings_repr() -> None:
    token = "t0k3n-" + "z" * 40
    settings = GatewaySettings(environment="production", ops_tokens=f"alice:{token}")
    assert token not in repr(settings)
    assert identify(settings.ops_tokens, token) == "alice"


def test_a_status_recovery_window_shorter_than_two_report_intervals_is_refused() -> None:
    with pytest.raises(ValueError, match="COURIER_STATUS_RECOVERY_SECONDS"):
        ConsumerSettings(status_report_interval_ms=10_000, status_recovery_seconds=10)
    assert ConsumerSettings(status_report_interval_ms=10_000, status_recovery_seconds=20)
    assert ConsumerSettings(status_report_interval_ms=10_000, status_recovery_seconds=0)


@pytest.mark.parametrize("value", ["webhook,email", ",", " "])
def test_the_notify_channels_must_include_the_log_channel(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # The notifier's log channel needs no configuration: a list without it (a blank one too)
    # would refuse notifications the notifier delivers.
    monkeypatch.setenv("COURIER_NOTIFY_CHANNELS", value)
    with pytest.raises(ValidationError, match="must include log"):
        GatewaySettings(environment="development")


def test_the_notify_channels_are_read_as_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURIER_NOTIFY_CHANNELS", " Log , webhook,log")
    assert GatewaySettings(environment="development").notify_channels == ("log", "webhook")
    monkeypatch.setenv("COURIER_NOTIFY_CHANNELS", "")
    assert GatewaySettings(environment="development").notify_channels == CHANNELS


def test_permanent_errors_are_read_as_exception_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURIER_PERMANENT_ERRORS", "KeyError, services.messaging.errors.RetryLater")
    assert ConsumerSettings().permanent_exception_types() == (KeyError, RetryLater)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("no.such.Error", "cannot import 'no.such' (No module named 'no')"),
        ("services.messaging.errors.NoSuchError", "'services.messaging.errors' has no"),
        ("services.messaging.settings.ConsumerSettings", "is not an exception class"),
        ("NoSuchBuiltinError", "'builtins' has no"),
        ("errors..Error", "is not a dotted name"),
    ],
)
def test_a_permanent_error_that_names_no_exception_class_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, entry: str, why: str
) -> None:
    # It crashed the service after its start-up logs, with an import traceback.
    monkeypatch.setenv("COURIER_PERMANENT_ERRORS", f"KeyError,{entry}")
    with pytest.raises(ValidationError) as caught:
        ConsumerSettings()
    assert f"COURIER_PERMANENT_ERRORS: {entry!r}" in str(caught.value)
    assert why in str(caught.value)


def test_every_permanent_error_that_names_no_exception_class_is_named_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COURIER_PERMANENT_ERRORS", "NoSuchError,KeyError,json.Nope")
    with pytest.raises(ValidationError) as caught:
        ConsumerSettings()
    assert "'NoSuchError'" in str(caught.value) and "'json.Nope'" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["postgresql://courier@db/courier", "postgres://u@h/d", "sqlite:////var/lib/courier/x.db"],
)
def test_a_database_url_courier_can_open_is_taken(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    assert CourierSettings().database_url == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("not a url", "not a database URL"),
        ("mysql://u:secret@h/d", "'mysql' is not a store Courier opens"),
        ("postgresql+psycopg2://u:secret@h/d", "'postgresql+psycopg2' is not a store"),
    ],
)
def test_a_database_url_courier_cannot_open_is_a_settings_error_never_quoted(
    url: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(ValidationError, match=re.escape(why)) as refused:
        CourierSettings()
    assert "secret" not in str(refused.value)


def test_a_plain_sqlite_url_is_opened_with_the_asyncio_driver() -> None:
    assert store_url("sqlite:////x/y.db", Path(), "s") == "sqlite+aiosqlite:////x/y.db"


def test_upload_types_that_are_no_media_types_are_a_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COURIER_UPLOAD_TYPES", "Text/CSV, image/*, bad type, text/")
    with pytest.raises(ValidationError, match=re.escape("not ['bad type', 'text/']")):
        GatewaySettings(environment="development")
    monkeypatch.setenv("COURIER_UPLOAD_TYPES", "Text/CSV, image/*, application/vnd.ms-excel")
    expected = ("text/csv", "image/*", "application/vnd.ms-excel")
    assert GatewaySettings(environment="development").upload_types == expected


@pytest.mark.parametrize("where", ["blobs", "blobs/more"])
def test_a_blob_directory_that_is_a_file_or_under_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str
) -> None:
    # The gateway started ready and answered every upload 503; the processor failed every
    # analysis.
    (tmp_path / "blobs").write_text("")
    monkeypatch.setenv("COURIER_BLOB_DIR", str(tmp_path / where))
    with pytest.raises(ValidationError, match="is not a directory"):
        GatewaySettings(environment="development")


def test_a_blob_directory_still_to_be_made_is_taken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COURIER_BLOB_DIR", str(tmp_path / "not" / "yet"))
    settings = GatewaySettings(environment="development")
    assert settings.blob_dir == tmp_path / "not" / "yet"
