"""`python -m services.processor`: the processor service's composition root."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import AsyncExitStack

from services.blobs import LocalBlobStore
from services.messaging.consumer import Route
from services.messaging.cpu import CpuPool
from services.messaging.runtime import run
from services.messaging.settings import ConsumerSettings, load
from services.processor import handlers

SERVICE = "processor"


async def build_routes(stack: AsyncExitStack, settings: ConsumerSettings) -> Mapping[str, Route]:
    pool = CpuPool(settings.cpu_workers)
    stack.callback(pool.close)
    policy = settings.retry_policy()
    return {
        "dataset.submitted": Route(
            functools.partial(handlers.dataset_submitted, pool=pool), policy
        ),
        "file.uploaded": Route(
            functools.partial(
                handlers.file_uploaded, pool=pool, blobs=LocalBlobStore(settings.blob_dir)
            ),
            policy,
        ),
    }


def main() -> None:
    run(SERVICE, load(ConsumerSettings), build_routes)


if __name__ == "__main__":
    main()
