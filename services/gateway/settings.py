from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from contracts.notify import CHANNELS, Channel
from services.messaging.dead_letters import DRAIN_PREFETCH
from services.messaging.settings import DAY, CourierSettings

DEFAULT_UPLOAD_TYPES = (
    "text/csv",
    "text/plain",
    "text/tab-separated-values",
    "application/json",
    "application/x-ndjson",
    "application/jsonl",
    "application/octet-stream",
    "application/pdf",
    "application/zip",
    "application/gzip",
    "image/*",
)
_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"  # RFC 6838 (lowercased as read)
_MEDIA_RANGE = re.compile(rf"{_NAME}/(?:{_NAME}|\*)")


class GatewaySettings(CourierSettings):
    host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(default=8000, ge=1, le=65_535, description="Port the gateway listens on.")
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    max_batch_events: int = Field(
        default=1_000, ge=1, description="Most events in one batch request (413 beyond)."
    )
    min_body_rate: float = Field(
        default=240,
        ge=0,
        description="Bytes a second a request body must average once its grace period is "
        "over (408 and the connection closed otherwise); 0 for no limit.",
    )
    body_rate_grace_seconds: float = Field(
        default=5, gt=0, le=3600, description="Seconds a request body has before its rate counts."
    )
    body_idle_timeout_seconds: float = Field(
        default=60,
        ge=0,
        le=3600,
        description="Longest pause within a request body (408 and the connection closed "
        "beyond); 0 for no limit.",
    )
    dlq_prefetch: int = Field(
        default=DRAIN_PREFETCH,
        ge=1,
        le=65_535,
        description="Dead letters the drain holds at once from each dead-letter queue, stored "
        "in shared transactions: more is faster, and holds more letters in memory.",
    )
    retry_after_seconds: int = Field(
        default=5, ge=1, description="`Retry-After` sent with a 503 when the broker is away."
    )
    environment: Literal["production", "development"] = Field(
        default="production",
        description="`development` allows placeholder ops tokens; never use it in production.",
    )
    # SecretStr: a settings repr or a validation error never shows a token.
    ops_tokens: Annotated[tuple[tuple[str, SecretStr], ...], NoDecode] = Field(
        default=(),
        description="Ops API tokens as `name:token` pairs, comma-separated; the name is the actor.",
    )
    ops_retention_days: float = Field(
        default=30.0,
        gt=0,
        le=3650,
        description="How long replayed and discarded dead letters are kept.",
    )
    tracking_retention_days: float = Field(
        default=30.0,
        gt=0,
        le=3650,
        description="How long an event's status (and a dataset's result) is kept after its "
        "last activity.",
    )
    file_retention_days: float = Field(
        default=30.0,
        gt=0,
        le=3650,
        description="How long an uploaded file (its bytes, record and analysis) is kept.",
    )
    idempotency_ttl_hours: float = Field(
        default=24.0, gt=0, le=87_600, description="How long an Idempotency-Key is remembered."
    )
    replay_lease_seconds: float = Field(
        default=300.0,
        gt=0,
        le=DAY,
        description="After this, a replay that died mid-way is taken over.",
    )
    unbind_retired: bool = Field(
        default=False,
        description="Remove bindings earlier versions made (once none of them runs).",
    )
    max_upload_bytes: int = Field(
        default=1 << 30, ge=1, description="Largest file accepted by POST /v1/files (413 beyond)."
    )
    upload_types: Annotated[tuple[str, ...], NoDecode] = Field(
        default=DEFAULT_UPLOAD_TYPES,
        description="Media types POST /v1/files accepts (415 otherwise); `type/*` allowed.",
    )

    notify_channels: Annotated[tuple[Channel, ...], NoDecode] = Field(
        default=CHANNELS,
        description="Channels the notifier delivers on: a notification, upload target or "
        "callback URL (a webhook) for another is refused (422) instead of dead-lettered.",
    )

    @field_validator("upload_types", "notify_channels", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """`a, B,a` as `("a", "b")`: case-insensitive names, each once."""
        if isinstance(value, str):
            return tuple(dict.fromkeys(i.strip().lower() for i in value.split(",") if i.strip()))
        return value

    @field_validator("upload_types")
    @classmethod
    def _media_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # A typo would refuse every upload of that type with a 415, and start quietly.
        if not value:
            raise ValueError("COURIER_UPLOAD_TYPES must name at least one media type")
        if bad := [t for t in value if not _MEDIA_RANGE.fullmatch(t)]:
            raise ValueError(
                f"COURIER_UPLOAD_TYPES holds type/subtype or type/* media types, not {bad}"
            )
        return value

    @field_validator("notify_channels")
    @classmethod
    def _log_is_always_delivered(cls, value: tuple[Channel, ...]) -> tuple[Channel, ...]:
        # The notifier's log channel needs no configuration, and datasets' notifications go
        # there: a list without it refuses what would be delivered (a blank list, everything).
        if "log" not in value:
            raise ValueError("COURIER_NOTIFY_CHANNELS must include log, which is always on")
        return value

    @field_validator("ops_tokens", mode="before")
    @classmethod
    def _pairs(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [item.strip() for item in value.split(",") if item.strip()]
            if any(":" not in pair for pair in pairs):
                raise ValueError("COURIER_OPS_TOKENS holds `name:token` pairs")
            return tuple((name.strip(), token) for name, token in (p.split(":", 1) for p in pairs))
        if isinstance(value, dict):
            return tuple(value.items())
        return value

    @field_validator("ops_tokens")
    @classmethod
    def _each_token_names_one_actor(
        cls, value: tuple[tuple[str, SecretStr], ...]
    ) -> tuple[tuple[str, SecretStr], ...]:
        # A name may hold several tokens (a new one beside the old while it is rotated); a
        # token under two names would leave the audit's actor to chance.
        if any(not name for name, _ in value):
            raise ValueError("COURIER_OPS_TOKENS: a token without a name (the audit's actor)")
        secrets = [token.get_secret_value() for _, token in value]
        if len(set(secrets)) < len(secrets):
            raise ValueError("COURIER_OPS_TOKENS: one token is given twice")
        return value

    @model_validator(mode="after")
    def _no_placeholder_tokens(self) -> GatewaySettings:
        if self.environment == "development":
            return self
        if not self.ops_tokens:
            raise ValueError("COURIER_OPS_TOKENS is required outside development")
        weak = [
            f"the ops token of {name!r} is a placeholder or shorter than {MIN_TOKEN_LENGTH} "
            "characters; generate one, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            for name, secret in self.ops_tokens
            if len(token := secret.get_secret_value()) < MIN_TOKEN_LENGTH
            or token.lower() in PLACEHOLDERS
        ]
        if weak:  # every one at once, a line each
            raise ValueError("\n".join(weak))
        return self


MIN_TOKEN_LENGTH = 24
PLACEHOLDERS = frozenset({"changeme", "change-me", "secret", "token", "password", "dev", "test"})
