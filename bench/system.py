"""Running Courier's services as real processes for the benchmarks, and cleaning up after them.

Each benchmark works in its own namespace (`bench<hex>`): every queue and exchange it could have
made is derived from it, so `cleanup` removes them all whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import httpx

from contracts.topology import dead_letter_exchange, events_exchange
from services.messaging.settings import CourierSettings

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REPO = Path(__file__).resolve().parents[1]


def new_namespace() -> str:
    return f"bench{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def courier_env(
    namespace: str, data: Path, database: str | None = None, **extra: str
) -> dict[str, str]:
    """What every Courier process of a benchmark reads (quiet logs: logging is not measured);
    `database`: its store's `DATABASE_URL`, else SQLite files in `data`."""
    return {
        "AMQP_URL": AMQP_URL,
        "COURIER_NAMESPACE": namespace,
        "COURIER_DATA_DIR": str(data),
        "COURIER_ENVIRONMENT": "development",
        "COURIER_LOG_LEVEL": "WARNING",
        **({"DATABASE_URL": database} if database is not None else {}),
        **extra,
    }


def start(
    app: str,
    env: Mapping[str, str],
    port: int,
    factory: bool = False,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """One uvicorn worker (uvloop + httptools, no access log) serving `app` on `port`."""
    command = [
        sys.executable, "-m", "uvicorn", app, "--port", str(port), "--loop", "uvloop",
        "--http", "httptools", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    if factory:
        command.append("--factory")
    return _popen(command, env, log)


def start_gateway(
    env: Mapping[str, str], port: int, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """The gateway as it ships, `python -m services.gateway` (one uvicorn worker, uvloop and
    its httptools protocol with bounded request heads)."""
    settings = {"COURIER_HOST": "127.0.0.1", "COURIER_PORT": str(port)}
    return _popen([sys.executable, "-m", "services.gateway"], {**env, **settings}, log)


def start_module(
    module: str, env: Mapping[str, str], log: Path | None = None
) -> subprocess.Popen[bytes]:
    """`python -m <module>`, e.g. a consumer service (give it `COURIER_HEALTH_PORT`)."""
    return _popen([sys.executable, "-m", module], env, log)


def _popen(command: list[str], env: Mapping[str, str], log: Path | None) -> subprocess.Popen[bytes]:
    if log is None:
        return subprocess.Popen(
            command, env={**os.environ, **env}, cwd=REPO, start_new_session=True
        )
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            env={**os.environ, **env},
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far, from /proc; None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpus: set[int]) -> None:
    """Keep every thread of process `pid` on `cpus` (threads and processes it starts later
    inherit the mask)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), cpus)


def local_broker_pid() -> int | None:
    """The RabbitMQ node on this machine (its Erlang VM): its CPU is part of what a pipeline
    costs. `BENCH_BROKER_PID` when set (`bench.private_broker`), else the one node running here
    when `AMQP_URL` points here; None otherwise."""
    if given := os.environ.get("BENCH_BROKER_PID"):
        return int(given)
    if urlsplit(AMQP_URL).hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command and command[0].endswith(b"beam.smp") and b"rabbit" in command:
            found.append(int(entry.name))
    return found[0] if len(found) == 1 else None


def wait_ready(
    url: str, timeout: float = 30, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll `url` until it answers below 500; fail early if `process` exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM the process group (the service drains), SIGKILL it if that takes too long."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


async def cleanup(namespace: str, *queues: str) -> None:
    """Delete every queue and exchange of `namespace`, and the extra `queues`."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for topology in CourierSettings(namespace=namespace).all_topologies():
            for spec in topology.queues():
                await channel.queue_delete(spec.name)
        for queue in queues:
            await channel.queue_delete(queue)
        await channel.exchange_delete(events_exchange(namespace))
        await channel.exchange_delete(dead_letter_exchange(namespace))


async def declare_quorum(queue: str) -> None:
    """A durable quorum queue of a bare baseline's own (deleted by `cleanup`)."""
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})


async def purge(*queues: str) -> None:
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        for queue in queues:
            await (await channel.get_queue(queue)).purge()


async def publish_all(queue: str, messages: Sequence[aio_pika.Message], window: int = 256) -> None:
    """Publish `messages` into `queue`, confirmed, `window` in flight at a time."""
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel(publisher_confirms=True)
        for at in range(0, len(messages), window):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(message, routing_key=queue)
                    for message in messages[at : at + window]
                )
            )


def postgres_option(parser: argparse.ArgumentParser) -> None:
    """`--postgres URL`, for `postgres_database`."""
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="a PostgreSQL server (any database on it); the benchmark creates and drops its own",
    )


@contextlib.contextmanager
def postgres_database(server: str | None, prefix: str) -> Iterator[str | None]:
    """A database of the benchmark's own on that PostgreSQL server (its URL, for
    `DATABASE_URL`), dropped afterwards; None without a server (the services' SQLite)."""
    if server is None:
        yield None
        return
    from sqlalchemy.engine import make_url

    server = server.replace("postgresql+asyncpg://", "postgresql://")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    asyncio.run(pg_admin(server, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(pg_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def pg_admin(url: str, statement: str) -> None:
    """Run one statement on a PostgreSQL server (a benchmark's own database made or dropped)."""
    import asyncpg  # type: ignore[import-untyped]

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `apt-get install wrk` (make bench does it)")


def wrk(url: str, seconds: int, connections: int, script: Path) -> tuple[float, float, float, int]:
    """Run `wrk` (2 threads) with a Lua script: requests/s, p50 and p99 in ms, non-2xx count."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def percentile(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * UNITS[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: .*", out)
    bad = int(errors.group(1)) if errors else 0
    if socket_errors:
        print("  wrk:", socket_errors.group(0))
    return rate, percentile("50"), percentile("99"), bad
