"""Service stores set up as another deployment left them."""

from __future__ import annotations

from pathlib import Path

from services.messaging.store import claim, open_store, store_url


async def claimed_by(namespace: str, data_dir: Path, service: str) -> None:
    """The SQLite store of `service` in `data_dir`, claimed for `namespace`."""
    engine = open_store(store_url(None, data_dir, service))
    try:
        await claim(engine, namespace)
    finally:
        await engine.dispose()
