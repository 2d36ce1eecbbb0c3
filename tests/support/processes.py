"""Running Courier's services as real processes for end-to-end and fault tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.support.polling import eventually_sync

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProcess:
    name: str
    module: str
    env: Mapping[str, str]
    log_path: Path
    health_url: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env={**self.env, "PYTHONPATH": str(REPO)},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def ready(self) -> bool:
        try:
            answered = httpx.get(self.health_url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
        # Ports come from `free_port`, free a moment before the service binds: under parallel
        # tests another service can take one first and answer in its place.
        return answered and self._listens()

    def _listens(self) -> bool:
        """Whether this process holds the listening socket of its health URL (Linux /proc)."""
        assert self.process is not None
        port = urlsplit(self.health_url).port
        listening = {
            fields[9]
            for fields in (
                line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            )
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port
        }
        fds = Path(f"/proc/{self.process.pid}/fd")
        try:
            return any(fd.readlink().name.strip("socket:[]") in listening for fd in fds.iterdir())
        except (FileNotFoundError, ProcessLookupError):
            return False  # exited meanwhile

    def wait_ready(self, timeout: float = 30) -> ServiceProcess:
        def check() -> None:
            assert self.process is not None
            assert self.process.poll() is None, f"{self.name} exited:\n{self.log()}"
            assert self.ready(), f"{self.name} not ready yet; its log:\n{self.log()}"

        eventually_sync(check, timeout)
        return self

    def terminate(self, timeout: float = 40) -> int:
        """SIGTERM, then wait for the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@contextlib.contextmanager
def running(process: ServiceProcess) -> Iterator[ServiceProcess]:
    """The process started and ready; killed when the block ends, however it ends."""
    process.start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.kill()


def gateway(env: Mapping[str, str], workdir: Path) -> ServiceProcess:
    port = free_port()
    return ServiceProcess(
        name="gateway",
        module="services.gateway",
        env={
            "COURIER_DATA_DIR": str(workdir / "gateway-data"),
            "COURIER_ENVIRONMENT": "development",
            "COURIER_OPS_TOKENS": "ops:e2e-test-ops-token",
            **env,
            "COURIER_PORT": str(port),
            "COURIER_HOST": "127.0.0.1",
        },
        log_path=workdir / "gateway.log",
        health_url=f"http://127.0.0.1:{port}/readyz",
    )


def consumer(
    name: str, env: Mapping[str, str], workdir: Path, module: str | None = None
) -> ServiceProcess:
    port = free_port()
    return ServiceProcess(
        name=name,
        module=module or f"services.{name}",
        env={
            "COURIER_DATA_DIR": str(workdir / f"{name}-data"),
            "COURIER_SHUTDOWN_TIMEOUT": "20",
            **env,
            "COURIER_HEALTH_PORT": str(port),
        },
        log_path=workdir / f"{name}.log",
        health_url=f"http://127.0.0.1:{port}/readyz",
    )


def base_url(gateway_process: ServiceProcess) -> str:
    return gateway_process.health_url.removesuffix("/readyz")


def raw_connection(gateway_process: ServiceProcess, timeout: float) -> socket.socket:
    """A plain TCP connection to the gateway, for a client no HTTP library would be (a head
    or body sent byte by byte, a request cut short)."""
    url = urlsplit(base_url(gateway_process))
    assert url.hostname is not None and url.port is not None
    return socket.create_connection((url.hostname, url.port), timeout=timeout)
