"""Settings read from the environment (pydantic-settings); README documents every variable.

Broker-wide names keep their conventional spelling (`AMQP_URL`); everything else is `COURIER_*`.
Topology settings are shared by every service, because the gateway declares every service's
queues too and the broker refuses a queue re-declared with other arguments.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Self, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from contracts.topology import (
    DEFAULT_DELIVERY_LIMIT,
    DEFAULT_RETRY_DELAYS,
    SUBSCRIPTIONS,
    ServiceTopology,
    service_topology,
)
from services.messaging.connection import broker_urls
from services.messaging.cpu import worker_count
from services.messaging.exits import ServiceExit
from services.messaging.retry import RetryPolicy
from services.messaging.status import DEFAULT_INTERVAL as DEFAULT_STATUS_INTERVAL
from services.messaging.store import database_url_problem

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def _int_tuple(value: object) -> object:
    """Accept `5,30,120` as well as a JSON list."""
    if isinstance(value, str):
        value = value.strip().removeprefix("[").removesuffix("]")
        return tuple(int(part) for part in value.split(",") if part.strip())
    return value


SettingsT = TypeVar("SettingsT", bound="CourierSettings")
MAX_QUEUE_ARGUMENT = 2**31 - 1
"""Bound of the delivery limit and queue length (queue arguments the broker reads as integers)."""
MAX_RETRY_DELAY = (2**32 - 1) // 1000
"""Longest delay tier in seconds: RabbitMQ takes a queue TTL of at most 2^32 - 1 ms."""
DAY = 86_400.0


def load(settings_type: type[SettingsT]) -> SettingsT:
    """A service's settings from the environment. Invalid ones end the process with
    `ServiceExit.SETTINGS` and a line on stderr for each problem, naming its variable (not a
    pydantic traceback that an operator has to read from the bottom)."""
    try:
        return settings_type()
    except ValidationError as exc:
        for error in exc.errors():
            where = _variable(settings_type, error["loc"])
            # A check's own message, without pydantic's "Value error, " before it.
            why = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
            for problem in why.splitlines():  # a check across settings may find several
                if where is None:  # such a problem names its variables itself
                    line = f"invalid settings: {problem}"
                elif problem.startswith(f"{where}: "):
                    line = f"invalid setting {problem}"
                else:
                    line = f"invalid setting {where}: {problem}"
                print(line, file=sys.stderr)
        raise SystemExit(ServiceExit.SETTINGS) from None


def _variable(settings_type: type[CourierSettings], loc: tuple[int | str, ...]) -> str | None:
    """The environment variable an error's location names (None for a check across several):
    for a setting read under several names, the one the operator set."""
    if not loc:
        return None
    name = str(loc[0])
    for field_name, field in settings_type.model_fields.items():
        alias = field.validation_alias
        names = [str(c) for c in alias.choices] if isinstance(alias, AliasChoices) else []
        if name != field_name and name not in names:
            continue
        if not names:
            return settings_type.model_config.get("env_prefix", "") + field_name.upper()
        # The one set (an empty variable counts as unset: `env_ignore_empty`), else the first.
        return next((n for n in names if os.environ.get(n)), names[0])
    return name  # located by the variable itself


def file_in_the_way(directory: Path) -> Path | None:
    """What keeps `directory` from being made at start: it, or its nearest existing ancestor,
    when that is not a directory; None when it is one or can be made."""
    nearest = next((p for p in (directory, *directory.absolute().parents) if p.exists()), None)
    return None if nearest is None or nearest.is_dir() else nearest


class CourierSettings(BaseSettings):
    """What every Courier process reads."""

    # Errors name the setting, never echo its value: tokens and URLs with passwords stay out
    # of start-up failures (and so out of the logs).
    # An empty variable is an unset one (compose passes `${NAME:-}` so), and it does not hide
    # another name of the same setting (`DATABASE_URL` empty, `COURIER_DATABASE_URL` set).
    model_config = SettingsConfigDict(
        env_prefix="COURIER_",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
        env_ignore_empty=True,
        # `inf` (and `nan`) would pass every bound and overflow where a duration is built.
        allow_inf_nan=False,
    )

    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        validation_alias=AliasChoices("AMQP_URL", "COURIER_AMQP_URL"),
        description=(
            "RabbitMQ connection URL; a cluster's nodes as several, separated by commas "
            "(connects to the first that answers, moves on to the next when it is lost)."
        ),
    )
    namespace: str = Field(
        default="courier",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Prefix of every exchange and queue name; isolates deployments and test runs.",
    )
    heartbeat: int = Field(
        # 0 turns heartbeats off, as 65535 or more did without a word. The AMQP client takes a
        # connection that received nothing for 3 heartbeats and 3 s as lost: at 10 s a node
        # frozen or cut off is left for the next after 33 s (93 s at 30 s), within the
        # 5-20 s RabbitMQ's heartbeat guide finds optimal for most environments.
        default=10,
        ge=0,
        le=3600,
        description="AMQP heartbeat in seconds.",
    )
    publish_timeout: float = Field(
        default=5.0, gt=0, le=3600, description="Seconds to wait for a publisher confirm."
    )
    publisher_channels: int = Field(
        default=1, ge=1, le=64, description="Confirming channels the publisher spreads work over."
    )
    retry_delays: Annotated[tuple[int, ...], NoDecode] = Field(
        default=DEFAULT_RETRY_DELAYS, description="Delay tiers in seconds, e.g. `5,30,120,600`."
    )
    delivery_limit: int = Field(
        default=DEFAULT_DELIVERY_LIMIT,
        ge=1,
        le=MAX_QUEUE_ARGUMENT,
        description="Redeliveries before the broker dead-letters a message (crash-loop guard).",
    )
    max_queue_length: int | None = Field(
        default=None,
        ge=1,
        le=MAX_QUEUE_ARGUMENT,
        description="Work queue length limit; publishes beyond it are refused.",
    )
    log_level: LogLevel = "INFO"
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "COURIER_DATABASE_URL"),
        description="The service's own store; unset means a SQLite file in the data directory.",
    )
    data_dir: Path = Field(
        default=Path("data"), description="Directory of the default SQLite stores."
    )
    blob_dir: Path = Field(
        default=Path("data/blobs"),
        description="Directory of uploaded files (shared by the gateway and the processor).",
    )

    _split_delays = field_validator("retry_delays", mode="before")(_int_tuple)

    @field_validator("blob_dir")
    @classmethod
    def _a_directory(cls, value: Path) -> Path:
        # Made at start if missing: a file there, or above it, failed every upload (503) and
        # every analysis of a service that said it was ready.
        blocking = file_in_the_way(value)
        if blocking is not None:
            raise ValueError(f"{blocking} is not a directory")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp(cls, value: str) -> str:
        # Said without the value, which holds the broker's password. Unchecked, a typo was
        # retried for ever (and logged by the client with the password in clear).
        urls = broker_urls(value)
        if not urls:
            raise ValueError("not an amqp:// or amqps:// URL with a host")
        for position, one in enumerate(urls, 1):
            try:
                url = URL(one)
            except ValueError:
                url = None
            if url is None or url.scheme not in {"amqp", "amqps"} or not url.host:
                if len(urls) == 1:
                    raise ValueError("not an amqp:// or amqps:// URL with a host")
                raise ValueError(
                    f"URL {position} of {len(urls)} is not an amqp:// or amqps:// URL with a "
                    "host (a comma in a password is written %2C)"
                )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _opens_a_store(cls, value: str | None) -> str | None:
        if value is not None and (why := database_url_problem(value)):
            raise ValueError(why)
        return value

    @field_validator("retry_delays")
    @classmethod
    def _ascending(cls, delays: tuple[int, ...]) -> tuple[int, ...]:
        if not delays or delays[0] <= 0 or list(delays) != sorted(set(delays)):
            raise ValueError("retry delays must be positive, distinct and ascending")
        if delays[-1] > MAX_RETRY_DELAY:  # a delay queue's TTL, in ms, is at most 2^32 - 1
            raise ValueError(f"a retry delay is at most {MAX_RETRY_DELAY} seconds")
        return delays

    def topology(self, service: str) -> ServiceTopology:
        return service_topology(
            self.namespace,
            service,
            retry_delays=self.retry_delays,
            delivery_limit=self.delivery_limit,
            max_length=self.max_queue_length,
        )

    def all_topologies(self) -> tuple[ServiceTopology, ...]:
        return tuple(self.topology(service) for service in SUBSCRIPTIONS)


class ConsumerSettings(CourierSettings):
    """What a consuming service reads on top of the common settings."""

    prefetch: int = Field(
        default=32, ge=1, le=65_535, description="Unacked messages (and concurrent handlers)."
    )
    immediate_retries: int = Field(
        default=2, ge=0, le=10, description="In-process retries of a transient failure."
    )
    shutdown_timeout: float = Field(
        default=30.0, gt=0, le=3600, description="Seconds SIGTERM waits for in-flight handlers."
    )
    health_host: str = Field(
        default="127.0.0.1", description="Address of the health endpoint (0.0.0.0 in containers)."
    )
    health_port: int = Field(
        default=0, ge=0, le=65_535, description="Port of /healthz and /readyz; 0 turns it off."
    )
    unready_exit_after: float = Field(
        default=120.0,
        gt=0,
        le=DAY,
        description="Exit non-zero when unable to consume for this long (a supervisor restarts).",
    )
    inbox_retention_hours: float = Field(
        default=168.0, gt=0, le=87_600, description="How long handled event ids are remembered."
    )
    inbox_commit_delay_ms: float = Field(
        default=25.0,
        ge=0,
        le=1000,
        description="How long a handled event's inbox record waits for others to share its commit.",
    )
    status_report_interval_ms: float = Field(
        default=DEFAULT_STATUS_INTERVAL * 1000,
        gt=0,
        le=60_000,
        description="How often the status transitions noted meanwhile are reported.",
    )
    status_recovery_seconds: float = Field(
        # Past a delivery's returns to the queue (seconds in all): a record whose delivery is
        # still unsettled (its follow-ups not published yet) is rarely told this old.
        default=60.0,
        ge=0,
        le=DAY,
        description="How long an outcome's report may stay unconfirmed before the service "
        "(any replica) reports it again from the inbox, in case a crash or a refusal took it; "
        "a starting service reports every such outcome at once.",
    )
    result_report_delay_ms: float = Field(
        default=25.0,
        ge=0,
        le=1000,
        description="How long a result waits for others to share its report to the gateway.",
    )
    permanent_errors: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Exception types (dotted names, comma-separated) never retried.",
    )
    cpu_workers: int = Field(
        default=0, ge=0, le=64, description="Processes for CPU-bound handlers; 0 = CPU count."
    )
    files_prefetch: int = Field(
        default=0,
        ge=0,
        le=65_535,
        description="Files the processor analyses at once (the prefetch of its files lane); "
        "0 = one less than the CPU workers, at least 1.",
    )

    @field_validator("permanent_errors", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @field_validator("permanent_errors")
    @classmethod
    def _names_exception_types(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        # Resolved here, so that a typo is a settings error at start-up, not a crash of the
        # service once it has started; every bad entry is named at once.
        problems = []
        for name in names:
            try:
                _exception_type(name)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return names

    @model_validator(mode="after")
    def _recovery_covers_the_interval(self) -> Self:
        # Reports wait up to an interval after their ack: a shorter age would tell again
        # outcomes whose report is still on its way.
        interval = self.status_report_interval_ms / 1000
        if 0 < self.status_recovery_seconds < 2 * interval:
            raise ValueError(
                f"COURIER_STATUS_RECOVERY_SECONDS ({self.status_recovery_seconds:g}) must be 0 "
                f"or at least twice COURIER_STATUS_REPORT_INTERVAL_MS ({2 * interval:g} s)"
            )
        return self

    def lane_prefetch(self, lane: str) -> int:
        """The prefetch of a lane's consumer (`contracts.topology.LANES`). Files beyond it wait
        in their queue, where no `consumer_timeout` counts; by default one CPU worker stays
        free for the datasets large enough to need one."""
        if lane == "files":
            return self.files_prefetch or max(1, worker_count(self.cpu_workers) - 1)
        return self.prefetch

    def retry_policy(self) -> RetryPolicy:
        """The service-wide retry policy; a route may use its own."""
        return RetryPolicy(
            delays=self.retry_delays,
            immediate=self.immediate_retries,
            permanent=self.permanent_exception_types(),
        )

    def permanent_exception_types(self) -> tuple[type[BaseException], ...]:
        """`permanent_errors` as classes (validated: every name is one)."""
        return tuple(_exception_type(name) for name in self.permanent_errors)


def _exception_type(dotted: str) -> type[BaseException]:
    """The exception class a `COURIER_PERMANENT_ERRORS` entry names (a bare name: a builtin);
    ValueError, naming the variable and the entry, when there is none."""
    if not all(part.isidentifier() for part in dotted.split(".")):
        raise ValueError(f"COURIER_PERMANENT_ERRORS: {dotted!r} is not a dotted name")
    module_name, _, name = dotted.rpartition(".")
    module_name = module_name or "builtins"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"COURIER_PERMANENT_ERRORS: {dotted!r}: cannot import {module_name!r} ({exc})"
        ) from None
    try:
        found = getattr(module, name)
    except AttributeError:
        raise ValueError(
            f"COURIER_PERMANENT_ERRORS: {dotted!r}: {module_name!r} has no {name!r}"
        ) from None
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        # A ValueError, which pydantic reports as a settings error.
        raise ValueError(  # noqa: TRY004
            f"COURIER_PERMANENT_ERRORS: {dotted!r} is not an exception class"
        )
    return found
