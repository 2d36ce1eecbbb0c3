"""A service's start-up heap is kept out of the garbage collector's way while it runs."""

from __future__ import annotations

import gc
from contextlib import AsyncExitStack

from services.messaging.heap import freeze_start_up_heap


async def test_the_start_up_heap_is_frozen_until_the_service_stops() -> None:
    async with AsyncExitStack() as stack:
        freeze_start_up_heap(stack)
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
