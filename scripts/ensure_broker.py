"""Make sure a RabbitMQ broker answers at AMQP_URL before the system or the tests start.

If nothing answers and RabbitMQ is installed locally, start it (`rabbitmq-server -detached`) and
wait for it. Otherwise stop with a message pointing at `docker compose up`. With `--optional`
a missing broker is only reported (the test suite then finds one itself, e.g. testcontainers).
Standard library only: this runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
START_TIMEOUT = 90.0


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def wait_for(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(host, port):
            return True
        time.sleep(0.5)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--optional", action="store_true", help="do not fail without a broker")
    args = parser.parse_args()

    # A cluster's nodes are listed separated by commas: one answering is enough to start. An
    # empty entry is no node (as services.messaging.connection.broker_urls reads it): taken
    # as the default 127.0.0.1:5672, a local broker there passed for the listed cluster.
    listed = [one.strip() for one in os.environ.get("AMQP_URL", DEFAULT_URL).split(",")]
    nodes = [urlsplit(one) for one in listed if one] or [urlsplit(DEFAULT_URL)]
    for url in nodes:
        host, port = url.hostname or "127.0.0.1", url.port or 5672
        if answers(host, port):
            print(f"broker: answering at {host}:{port}")
            return 0
    host, port = nodes[0].hostname or "127.0.0.1", nodes[0].port or 5672
    local = host in {"127.0.0.1", "localhost", "::1"}
    server = shutil.which("rabbitmq-server")
    if local and server and port != 5672:
        # The local node listens on 5672: started, it would not answer here, and if it runs
        # already, a second one would only fail beside it.
        print(
            f"broker: nothing answers at {host}:{port}; not starting the local RabbitMQ, "
            "which listens on 5672: start the broker AMQP_URL names, or unset AMQP_URL"
        )
    elif local and server:
        print(f"broker: nothing at {host}:{port}; starting the local RabbitMQ ({server} -detached)")
        subprocess.run([server, "-detached"], check=False)
        if wait_for(host, port, START_TIMEOUT):
            print(f"broker: answering at {host}:{port}")
            return 0
        print(f"broker: started RabbitMQ but {host}:{port} did not answer in {START_TIMEOUT:.0f}s")
    else:
        print(
            f"broker: nothing answers at {host}:{port} and RabbitMQ is not installed here. "
            "Start one with `docker compose up -d rabbitmq` (then AMQP_URL's default works), "
            "or set AMQP_URL to a running broker."
        )
    return 0 if args.optional else 1


if __name__ == "__main__":
    sys.exit(main())
