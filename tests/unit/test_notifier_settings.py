"""The notifier's channel settings: parsing, coherence, and no placeholder secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.notifier.settings import NotifierSettings

REAL_SECRET = "3f9c2a7d8e1b4c6a9f0e2d4b6a8c0e1f"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NotifierSettings.model_fields:
        monkeypatch.delenv(f"COURIER_{name.upper()}", raising=False)


def test_channels_are_off_by_default() -> None:
    settings = NotifierSettings()
    assert not settings.webhook_enabled
    assert settings.smtp_host is None


def test_webhook_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURIER_WEBHOOK_SECRET", REAL_SECRET)
    monkeypatch.setenv(
        "COURIER_WEBHOOK_SECRETS", f"Hooks.Example.org={REAL_SECRET}x, b.example={REAL_SECRET}y"
    )
    monkeypatch.setenv("COURIER_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1, 10.0.0.0/8,hooks.internal")
    monkeypatch.setenv("COURIER_WEBHOOK_TIMEOUT", "3")
    settings = NotifierSettings()
    assert settings.webhook_enabled
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == REAL_SECRET
    assert REAL_SECRET not in repr(settings)  # secrets stay out of logs
    assert {host: s.get_secret_value() for host, s in settings.webhook_secrets.items()} == {
        "hooks.example.org": REAL_SECRET + "x",
        "b.example": REAL_SECRET + "y",
    }
    assert settings.webhook_allowed_hosts == ("127.0.0.1", "10.0.0.0/8", "hooks.internal")
    assert settings.webhook_timeout == 3


def test_per_host_secrets_may_be_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURIER_WEBHOOK_SECRETS", f'{{"a.example": "{REAL_SECRET},with,commas"}}')
    secrets = NotifierSettings().webhook_secrets
    assert secrets["a.example"].get_secret_value() == REAL_SECRET + ",with,commas"


@pytest.mark.parametrize(
    "key", ["hooks.example.org:8443", "https://hooks.example.org", "ops@hooks.example.org"]
)
def test_a_per_host_secret_names_a_host_alone(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    # Looked up by the host a URL names, `host:8443` signed for the host on every port.
    monkeypatch.setenv("COURIER_WEBHOOK_SECRETS", f"{key}={REAL_SECRET}")
    with pytest.raises(ValueError, match="is not a host name or IP address alone"):
        NotifierSettings()


@pytest.mark.parametrize(
    ("one", "other"), [("bücher.de", "xn--bcher-kva.de"), ("[2001:db8::1]", "2001:DB8:0::1")]
)
def test_two_secrets_for_one_host_are_refused(
    monkeypatch: pytest.MonkeyPatch, one: str, other: str
) -> None:
    # Which one signed depended on the order of the pairs.
    monkeypatch.setenv("COURIER_WEBHOOK_SECRETS", f"{one}={REAL_SECRET}a,{other}={REAL_SECRET}b")
    with pytest.raises(ValueError, match="are the same host"):
        NotifierSettings()


@pytest.mark.parametrize("secret", ["changeme", "secret", "short-secret"])
def test_placeholder_webhook_secrets_are_refused_outside_development(
    monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    monkeypatch.setenv("COURIER_WEBHOOK_SECRET", secret)
    with pytest.raises(ValueError, match="COURIER_WEBHOOK_SECRET is a placeholder"):
        NotifierSettings()
    monkeypatch.setenv("COURIER_ENVIRONMENT", "development")
    assert NotifierSettings().webhook_enabled


def test_a_placeholder_per_host_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURIER_WEBHOOK_SECRETS", "a.example=changeme")
    with pytest.raises(ValueError, match=r"COURIER_WEBHOOK_SECRETS\[a.example\]"):
        NotifierSettings()


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """What compose passes for `${VAR:-}`."""
    for name in (
        "WEBHOOK_SECRET",
        "WEBHOOK_SECRETS",
        "WEBHOOK_ALLOWED_HOSTS",
        "SMTP_HOST",
        "SMTP_PORT",
        "SMTP_USERNAME",
        "SMTP_PASSWORD",
        "SMTP_STARTTLS",
        "SMTP_FROM",
    ):
        monkeypatch.setenv(f"COURIER_{name}", "")
    settings = NotifierSettings()
    assert not settings.webhook_enabled and settings.smtp_host is None


def test_smtp_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURIER_SMTP_HOST", "smtp.example.org")
    monkeypatch.setenv("COURIER_SMTP_FROM", "Courier <courier@example.org>")
    monkeypatch.setenv("COURIER_SMTP_USERNAME", "courier")
    monkeypatch.setenv("COURIER_SMTP_PASSWORD", "a-real-password-from-the-provider")
    settings = NotifierSettings()
    assert (settings.smtp_port_or_default, settings.smtp_uses_starttls) == (587, True)
    monkeypatch.setenv("COURIER_SMTP_TLS", "true")
    settings = NotifierSettings()
    assert (settings.smtp_port_or_default, settings.smtp_uses_starttls) == (465, False)
    monkeypatch.setenv("COURIER_SMTP_PORT", "2465")
    assert NotifierSettings().smtp_port_or_default == 2465


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"COURIER_SMTP_HOST": "smtp.example.org"}, "COURIER_SMTP_FROM is required"),
        (
            {"COURIER_SMTP_TLS": "true", "COURIER_SMTP_STARTTLS": "true"},
            "exclude each other",
        ),
        ({"COURIER_SMTP_USERNAME": "courier"}, "both COURIER_SMTP_USERNAME"),
        ({"COURIER_SMTP_FROM": "not an address"}, "not a valid sender address"),
        (
            {"COURIER_SMTP_USERNAME": "courier", "COURIER_SMTP_PASSWORD": "changeme"},
            "COURIER_SMTP_PASSWORD is a placeholder",
        ),
        ({"COURIER_WEBHOOK_ALLOWED_HOSTS": "http://x/"}, "not a host name"),
    ],
)
def test_incoherent_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        NotifierSettings()


@pytest.mark.parametrize(
    "value",
    [
        f"a.example={REAL_SECRET}x,a.example={REAL_SECRET}y",
        f"a.example={REAL_SECRET}x,A.Example={REAL_SECRET}y",
        f'{{"a.example": "{REAL_SECRET}x", "a.example": "{REAL_SECRET}y"}}',
    ],
)
def test_a_host_given_twice_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    # The last pair won silently: which secret signs must not depend on the pairs' order.
    monkeypatch.setenv("COURIER_WEBHOOK_SECRETS", value)
    with pytest.raises(ValueError, match=r"'a\.example' is given twice"):
        NotifierSettings()


def test_a_notify_log_that_is_a_directory_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COURIER_NOTIFY_LOG", str(tmp_path))
    with pytest.raises(ValidationError, match="COURIER_NOTIFY_LOG names a directory"):
        NotifierSettings()


def test_a_notify_log_under_a_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "taken").write_text("")
    monkeypatch.setenv("COURIER_NOTIFY_LOG", str(tmp_path / "taken" / "logs" / "n.jsonl"))
    with pytest.raises(ValidationError, match="which is not a directory"):
        NotifierSettings()


@pytest.mark.parametrize("host", ["mail.example.org:587", "smtp://mail.example.org", "a b"])
def test_an_smtp_host_with_more_than_a_host_is_refused(
    monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    monkeypatch.setenv("COURIER_SMTP_HOST", host)
    monkeypatch.setenv("COURIER_SMTP_FROM", "courier@example.org")
    with pytest.raises(ValidationError, match="COURIER_SMTP_HOST is a host name or IP address"):
        NotifierSettings()


@pytest.mark.parametrize("host", ["mail.example.org", "127.0.0.1", "::1"])
def test_an_smtp_host_is_a_name_or_an_address(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("COURIER_SMTP_HOST", host)
    monkeypatch.setenv("COURIER_SMTP_FROM", "courier@example.org")
    assert NotifierSettings().smtp_host == host
