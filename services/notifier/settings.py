from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from services.messaging.settings import ConsumerSettings, file_in_the_way
from services.notifier.breaker import DEFAULT_COOLDOWN
from services.notifier.mail import EmailRejected, parse_address
from services.notifier.targets import TargetPolicy, dns_host, is_bare_host

MIN_SECRET_LENGTH = 24
PLACEHOLDERS = frozenset(
    {"changeme", "change-me", "secret", "token", "password", "dev", "test", "example"}
)
_OPTIONAL = (
    "webhook_secret",
    "smtp_host",
    "smtp_port",
    "smtp_username",
    "smtp_password",
    "smtp_starttls",
    "smtp_from",
)


def _one_value_per_key(pairs: Sequence[tuple[str, object]]) -> dict[str, object]:
    """`pairs` as a dict; a host given twice (`a=x,a=y`, or as two JSON keys) is refused, not
    left to the last pair: which secret signs must not depend on their order."""
    found: dict[str, object] = {}
    for host, secret in pairs:
        if host in found:
            raise ValueError(f"COURIER_WEBHOOK_SECRETS: {host!r} is given twice")
        found[host] = secret
    return found


class NotifierSettings(ConsumerSettings):
    notify_log: Path = Field(
        default=Path("data/notifications.jsonl"),
        description="File the `log` channel appends one JSON line per notification to.",
    )
    environment: Literal["production", "development"] = Field(
        default="production",
        description="`development` accepts placeholder webhook secrets; not for production.",
    )
    delivery_retention_days: float = Field(
        default=30.0,
        gt=0,
        le=3650,
        description="How long the deliveries record keeps a notification.",
    )
    deliveries_commit_delay_ms: float = Field(
        default=25.0,
        ge=0,
        le=1000,
        description="How long a finished notification's outcome waits for others to share its "
        "commit.",
    )

    # --- webhook ---------------------------------------------------------------------------
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Default HMAC-SHA256 signing secret; none at all turns the channel off.",
    )
    webhook_secrets: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict,
        description="Per-host signing secrets as `host=secret` pairs, comma-separated (or JSON).",
    )
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Host names, IPs or CIDR networks a webhook may reach although not public.",
    )
    webhook_timeout: float = Field(
        default=10.0, gt=0, le=300, description="Seconds one webhook request may take in total."
    )
    webhook_connect_timeout: float = Field(
        default=5.0, gt=0, le=60, description="Seconds to resolve and connect to a receiver."
    )
    webhook_cooldown: float = Field(
        default=DEFAULT_COOLDOWN,
        ge=0,
        le=3600,
        description="Seconds a receiver that did not answer in time is not asked; 0: always.",
    )
    webhook_max_connections: int = Field(
        default=100, ge=1, le=10_000, description="Pooled connections to webhook receivers."
    )

    # --- email -----------------------------------------------------------------------------
    smtp_host: str | None = Field(default=None, description="SMTP server; unset = channel off.")
    smtp_port: int | None = Field(
        default=None, ge=1, le=65_535, description="SMTP port; default 465 with TLS, else 587."
    )
    smtp_username: str | None = Field(default=None, description="SMTP login, if any.")
    smtp_password: SecretStr | None = Field(default=None, description="SMTP password.")
    smtp_starttls: bool | None = Field(
        default=None, description="Require STARTTLS; default: yes unless `smtp_tls`."
    )
    smtp_tls: bool = Field(default=False, description="Implicit TLS from the first byte (465).")
    smtp_from: str | None = Field(default=None, description="The From address of every email.")
    smtp_timeout: float = Field(
        default=30.0, gt=0, le=3600, description="Seconds per SMTP exchange."
    )

    @field_validator(*_OPTIONAL, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose passes `${VAR:-}` as an empty string: that means "not set".
        return None if value == "" else value

    @field_validator("smtp_host")
    @classmethod
    def _a_host_alone(cls, value: str | None) -> str | None:
        # `mail.example.org:587` passed, then failed every email as a connection error.
        if value is not None and not is_bare_host(value):
            raise ValueError(
                "COURIER_SMTP_HOST is a host name or IP address alone (a port goes in "
                "COURIER_SMTP_PORT)"
            )
        return value

    @field_validator("notify_log")
    @classmethod
    def _a_file(cls, value: Path) -> Path:
        # Else the notifier started, said it was ready, and failed every `log` notification.
        if value.is_dir():
            raise ValueError("COURIER_NOTIFY_LOG names a directory; it is the file to append to")
        # Its directory is made at start: not under a file (the notifier died at start with a
        # bare FileExistsError).
        blocking = file_in_the_way(value.absolute().parent)
        if blocking is not None:
            raise ValueError(f"COURIER_NOTIFY_LOG is under {blocking}, which is not a directory")
        return value

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _host_pairs(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if value.strip().startswith("{"):
            parsed: object = json.loads(value, object_pairs_hook=_one_value_per_key)
            return parsed
        items = [item.strip() for item in value.split(",") if item.strip()]
        if any("=" not in item for item in items):
            raise ValueError("COURIER_WEBHOOK_SECRETS holds `host=secret` pairs")
        pairs = [item.split("=", 1) for item in items]
        return _one_value_per_key([(host.strip().lower(), secret) for host, secret in pairs])

    @field_validator("webhook_secrets")
    @classmethod
    def _one_secret_per_host(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        # A key is looked up as the host a URL names, written as DNS has it: `host:8443` or
        # `https://host` would sign for the bare host, and two spellings of one host would
        # leave which secret signs to the order of the pairs.
        seen: dict[str, str] = {}
        for host in value:
            if not is_bare_host(host):
                raise ValueError(
                    f"COURIER_WEBHOOK_SECRETS: {host!r} is not a host name or IP address alone "
                    "(no scheme, user, port or path)"
                )
            if (key := dns_host(host)) in seen:
                raise ValueError(
                    f"COURIER_WEBHOOK_SECRETS: {seen[key]!r} and {host!r} are the same host"
                )
            seen[key] = host
        return value

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _valid_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        TargetPolicy.from_entries(value)  # raises ValueError on an entry it cannot read
        return value

    @field_validator("smtp_from")
    @classmethod
    def _sender(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_address(value, "sender", display_name=True)
            except EmailRejected as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _coherent(self) -> NotifierSettings:
        # Every problem at once (one line each): an operator should not learn them one start
        # at a time.
        if problems := [*self._smtp_problems(), *self._secret_problems()]:
            raise ValueError("\n".join(problems))
        return self

    def _smtp_problems(self) -> Iterator[str]:
        if self.smtp_tls and self.smtp_starttls:
            yield "COURIER_SMTP_TLS and COURIER_SMTP_STARTTLS exclude each other"
        if self.smtp_host is not None and not self.smtp_from:
            yield "COURIER_SMTP_FROM is required with COURIER_SMTP_HOST"
        if (self.smtp_username is None) != (self.smtp_password is None):
            yield "set both COURIER_SMTP_USERNAME and COURIER_SMTP_PASSWORD, or neither"

    def _secret_problems(self) -> Iterator[str]:
        if self.environment == "development":
            return
        secrets = {"COURIER_WEBHOOK_SECRET": self.webhook_secret} | {
            f"COURIER_WEBHOOK_SECRETS[{host}]": secret
            for host, secret in self.webhook_secrets.items()
        }
        for name, secret in secrets.items():
            if secret is None:
                continue
            value = secret.get_secret_value()
            if len(value) < MIN_SECRET_LENGTH or value.lower() in PLACEHOLDERS:
                yield (
                    f"{name} is a placeholder or shorter than {MIN_SECRET_LENGTH} characters; "
                    "generate one, e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`"
                )
        if self.smtp_password is not None and (
            self.smtp_password.get_secret_value().lower() in PLACEHOLDERS
        ):
            yield "COURIER_SMTP_PASSWORD is a placeholder"

    @property
    def webhook_enabled(self) -> bool:
        return self.webhook_secret is not None or bool(self.webhook_secrets)

    @property
    def smtp_uses_starttls(self) -> bool:
        return (not self.smtp_tls) if self.smtp_starttls is None else self.smtp_starttls

    @property
    def smtp_port_or_default(self) -> int:
        return self.smtp_port or (465 if self.smtp_tls else 587)
