"""`python -m services.notifier`: the notifier service's composition root."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import AsyncExitStack

from services.messaging.consumer import Route
from services.messaging.runtime import run
from services.notifier import handlers
from services.notifier.channels import Channels, LogChannel, Unconfigured
from services.notifier.settings import NotifierSettings

SERVICE = "notifier"


async def build_routes(stack: AsyncExitStack, settings: NotifierSettings) -> Mapping[str, Route]:
    channels = Channels(
        {
            "log": LogChannel(settings.notify_log),
            "webhook": Unconfigured("webhook"),
            "email": Unconfigured("email"),
        }
    )
    policy = settings.retry_policy()
    return {
        "notification.requested": Route(
            functools.partial(handlers.notification_requested, channels=channels), policy
        ),
        "dataset.processed": Route(
            functools.partial(handlers.dataset_processed, channels=channels), policy
        ),
    }


def main() -> None:
    run(SERVICE, NotifierSettings(), build_routes)


if __name__ == "__main__":
    main()
