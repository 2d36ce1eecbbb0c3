"""`python -m services.gateway`: serve the gateway with uvicorn (uvloop + httptools)."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn

from services.gateway.settings import GatewaySettings
from services.messaging.logs import configure_logging
from services.messaging.settings import load


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> None:
    settings = load(GatewaySettings)
    # uvicorn drains, restores the previous handlers and re-raises the signal it caught; the
    # handler below turns that re-raised SIGTERM/SIGINT into a clean exit 0 after the drain.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    configure_logging(settings.log_level, "gateway")
    uvicorn.run(
        "services.gateway.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,  # keep the JSON logging configured above
        access_log=False,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
