from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.conftest import Namespace
from tests.support.processes import ServiceProcess, consumer, gateway


class System:
    """Gateway, processor and notifier as three processes in one namespace."""

    def __init__(
        self, namespace: Namespace, workdir: Path, extra_env: Mapping[str, str] | None = None
    ) -> None:
        self.notify_log = workdir / "notifications.jsonl"
        env = namespace.env(
            COURIER_NOTIFY_LOG=str(self.notify_log),
            COURIER_LOG_LEVEL="INFO",
            COURIER_BLOB_DIR=str(workdir / "blobs"),  # shared by gateway and processor
            **(extra_env or {}),
        )
        self.gateway = gateway(env, workdir)
        self.processor = consumer("processor", env, workdir)
        self.notifier = consumer("notifier", env, workdir)
        self.all: tuple[ServiceProcess, ...] = (self.gateway, self.processor, self.notifier)

    def start(self) -> System:
        for service in self.all:
            service.start()
        for service in self.all:
            service.wait_ready()
        return self

    def stop(self) -> None:
        for service in self.all:
            if service.process is not None:
                service.kill()


@pytest.fixture
def system(namespace: Namespace, tmp_path: Path) -> Iterator[System]:
    running = System(namespace, tmp_path).start()
    try:
        yield running
    finally:
        running.stop()
