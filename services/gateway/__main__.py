"""`python -m services.gateway`: serve the gateway with uvicorn (uvloop + httptools)."""

from __future__ import annotations

import uvicorn

from services.gateway.settings import GatewaySettings
from services.messaging.logs import configure_logging


def main() -> None:
    settings = GatewaySettings()
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
