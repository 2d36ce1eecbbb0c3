"""Keeping a service's start-up heap out of the cyclic garbage collector's way."""

from __future__ import annotations

import gc
from contextlib import AsyncExitStack


def freeze_start_up_heap(stack: AsyncExitStack) -> None:
    """Move what start-up built (FastAPI, pydantic's schemas, SQLAlchemy, aio-pika) out of the
    collector's generations until `stack` closes. Every full collection walked all of it and
    freed nothing: under load, a fifth of the gateway's CPU on the batch route."""
    gc.collect()  # what is garbage already is not kept
    gc.freeze()
    stack.callback(gc.unfreeze)
