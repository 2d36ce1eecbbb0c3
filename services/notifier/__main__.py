"""`python -m services.notifier`: the notifier service's composition root."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import AsyncExitStack
from datetime import timedelta

from contracts.notify import Channel
from services.messaging.consumer import Route
from services.messaging.logs import get_logger
from services.messaging.periodic import run_every
from services.messaging.runtime import run
from services.messaging.settings import load
from services.messaging.store import open_store, store_url
from services.notifier import handlers
from services.notifier.channels import Channels, DeliveryChannel, LogChannel, Unconfigured
from services.notifier.deliveries import Deliveries
from services.notifier.mail import EmailChannel, SmtpConfig
from services.notifier.settings import NotifierSettings
from services.notifier.targets import TargetPolicy
from services.notifier.webhook import WebhookChannel, WebhookSecrets, webhook_client

SERVICE = "notifier"
PRUNE_INTERVAL_SECONDS = 3600

log = get_logger("notifier")


async def open_deliveries(stack: AsyncExitStack, settings: NotifierSettings) -> Deliveries:
    """The deliveries record in the service's own store, pruned hourly."""
    engine = open_store(store_url(settings.database_url, settings.data_dir, SERVICE))
    stack.push_async_callback(engine.dispose)
    deliveries = Deliveries(
        engine,
        commit_delay=settings.deliveries_commit_delay_ms / 1000,
        # A full batch goes at once: half the work queue's prefetch window (as the inbox).
        batch=max(1, settings.prefetch // 2),
    )
    stack.callback(deliveries.close)
    await deliveries.start()
    retention = timedelta(days=settings.delivery_retention_days)

    async def prune() -> None:
        log.info("deliveries pruned", extra={"removed": await deliveries.prune(retention)})

    run_every(stack, PRUNE_INTERVAL_SECONDS, "deliveries-prune", prune)
    return deliveries


async def webhook_channel(stack: AsyncExitStack, settings: NotifierSettings) -> DeliveryChannel:
    if not settings.webhook_enabled:
        return Unconfigured("webhook")
    client = webhook_client(
        TargetPolicy.from_entries(settings.webhook_allowed_hosts),
        timeout=settings.webhook_timeout,
        connect_timeout=settings.webhook_connect_timeout,
        max_connections=settings.webhook_max_connections,
    )
    await stack.enter_async_context(client)  # closed (pool drained) at shutdown
    secrets = WebhookSecrets(
        settings.webhook_secret.get_secret_value().encode() if settings.webhook_secret else None,
        {host: s.get_secret_value().encode() for host, s in settings.webhook_secrets.items()},
    )
    return WebhookChannel(
        client, secrets, timeout=settings.webhook_timeout, cooldown=settings.webhook_cooldown
    )


def email_channel(settings: NotifierSettings) -> DeliveryChannel:
    if settings.smtp_host is None or settings.smtp_from is None:
        return Unconfigured("email")
    return EmailChannel(
        SmtpConfig(
            host=settings.smtp_host,
            port=settings.smtp_port_or_default,
            sender=settings.smtp_from,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            starttls=settings.smtp_uses_starttls,
            tls=settings.smtp_tls,
            timeout=settings.smtp_timeout,
        )
    )


async def build_routes(stack: AsyncExitStack, settings: NotifierSettings) -> Mapping[str, Route]:
    by_name: dict[Channel, DeliveryChannel] = {
        "log": LogChannel(settings.notify_log),
        "webhook": await webhook_channel(stack, settings),
        "email": email_channel(settings),
    }
    # What the gateway's COURIER_NOTIFY_CHANNELS should say, for it to refuse the rest at ingest.
    log.info(
        "notification channels",
        extra={
            "configured": [n for n, c in by_name.items() if not isinstance(c, Unconfigured)],
            "not_configured": [n for n, c in by_name.items() if isinstance(c, Unconfigured)],
        },
    )
    channels = Channels(by_name, await open_deliveries(stack, settings))
    policy = settings.retry_policy()
    return {
        "callback.requested": Route(
            functools.partial(handlers.callback_requested, channels=channels), policy
        ),
        "notification.requested": Route(
            functools.partial(handlers.notification_requested, channels=channels), policy
        ),
        "dataset.processed": Route(
            functools.partial(handlers.dataset_processed, channels=channels), policy
        ),
        "file.processed": Route(
            functools.partial(handlers.file_processed, channels=channels),
            policy,
            takes_attempt=True,  # a retry does not ask again a target that refused for good
        ),
    }


def main() -> None:
    run(SERVICE, load(NotifierSettings), build_routes)


if __name__ == "__main__":
    main()
