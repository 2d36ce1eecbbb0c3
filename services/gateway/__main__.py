"""`python -m services.gateway`: serve the gateway with uvicorn (uvloop + httptools, its request
heads bounded: `request_head`), and end with the service's exit code (`ServiceExit`), as the
consumers do."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import uvicorn
import uvloop
from fastapi import FastAPI

from services.gateway.app import create_app
from services.gateway.request_head import BoundedHeadProtocol
from services.gateway.settings import GatewaySettings
from services.messaging.exits import ServiceExit
from services.messaging.logs import configure_logging, get_logger
from services.messaging.settings import load

log = get_logger("gateway")


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(ServiceExit.OK)


def server_config(settings: GatewaySettings, app: FastAPI) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=BoundedHeadProtocol,
        log_config=None,  # keep the JSON logging configured in main
        access_log=False,
        timeout_graceful_shutdown=30,
    )


async def serve(settings: GatewaySettings) -> ServiceExit:
    stopped: list[ServiceExit] = []

    def stop(code: ServiceExit) -> None:
        stopped.append(code)
        server.should_exit = True

    server = uvicorn.Server(server_config(settings, create_app(settings, stop=stop)))
    try:
        await server.serve()
    except SystemExit as ended:
        if stopped:
            return stopped[0]  # why it had to stop, even if a signal came meanwhile
        if ended.code == ServiceExit.OK:
            raise  # the signal uvicorn drained for, raised again once it was done
        # uvicorn's own exit, once it logged why (without saying where): it could not listen,
        # the port taken or an address this host does not have.
        log.error(  # noqa: TRY400  # a SystemExit's traceback would tell nothing more
            "cannot listen on COURIER_HOST and COURIER_PORT; exiting",
            extra={"host": settings.host, "port": settings.port},
        )
        return ServiceExit.FAILED
    if stopped:
        return stopped[0]
    return ServiceExit.OK if server.started else ServiceExit.FAILED


def main() -> None:
    settings = load(GatewaySettings)
    # uvicorn drains, restores the previous handlers and re-raises the signal it caught; the
    # handler below turns that re-raised SIGTERM/SIGINT into a clean exit 0 after the drain.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    configure_logging(settings.log_level, "gateway")
    sys.exit(uvloop.run(serve(settings)))


if __name__ == "__main__":
    main()
