"""A private, throwaway RabbitMQ node for fault-injection tests.

The node follows the recipe in ``RABBITMQ-NOTES.md``: the server and CLI binaries are called
directly from ``/usr/lib/rabbitmq/bin`` (the ``/usr/sbin`` wrappers switch user when run as root),
and the node gets its own world through the environment: a private ``HOME`` with its own
``.erlang.cookie``, a unique ``<name>@localhost`` node name, free AMQP and distribution ports on
127.0.0.1, and its data, logs, pid file and configuration under one temporary directory. It never
touches the shared node.

Typical use::

    with PrivateRabbitNode() as node:
        connection = await aio_pika.connect(node.amqp_url)
        ...
        node.kill()
        node.restart_after_kill()
        node.wait_for_leaders(["orders"], timeout=30)

Operations block (they run the RabbitMQ CLI, each call starts an Erlang VM for about 0.5-1 s); from
async code call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["RABBITMQ_BIN", "PrivateRabbitNode", "RabbitNodeError", "free_port"]

log = logging.getLogger("tests.support.rabbit_node")

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
_LOOPBACK_ONLY = "-kernel inet_dist_use_interface {127,0,0,1}"
_CLI_TIMEOUT = 60.0  # seconds for one CLI call that should answer promptly
_POLL_INTERVAL = 0.25


# Runs beside the node and outlives a test process that dies without teardown (SIGKILL, os._exit):
# when its stdin reaches EOF without "disarm", it stops the node by name and removes the directory.
# Stopping by node name (never by a pid that may be stale) cannot hit anything but this node.
_WATCHDOG = """
import shutil, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
ctl, node, pid_file, base_dir = sys.argv[1:5]
if b"disarm" not in sys.stdin.buffer.read():
    try:
        subprocess.run([ctl, "-n", node, "stop", pid_file], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
"""


class RabbitNodeError(RuntimeError):
    """The private node could not be started, controlled or inspected."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRabbitNode:
    """One private RabbitMQ node: start, graceful restart, ``kill -9`` + restart, inspect, teardown.

    Not thread-safe: drive it from one thread (or one ``asyncio.to_thread`` call at a time).
    """

    def __init__(
        self,
        *,
        name_prefix: str = "courier-test",
        boot_timeout: float = 60.0,
        base_dir: Path | None = None,
        cookie: str | None = None,
    ) -> None:
        """`cookie`: the Erlang cookie, the same for every node of a cluster (random if None)."""
        token = secrets.token_hex(4)
        self._cookie = cookie or "".join(secrets.choice(string.ascii_uppercase) for _ in range(32))
        self.node_name = f"{name_prefix}-{os.getpid()}-{token}@localhost"
        self.boot_timeout = boot_timeout
        self.amqp_port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.amqp_port:  # pragma: no cover - two binds in a row collide
            self.dist_port = free_port()
        self.base_dir = Path(tempfile.mkdtemp(prefix="courier-rmq-", dir=base_dir))
        self.username = "courier-test"
        self.password = secrets.token_hex(16)
        self.pid_file = self.base_dir / "rabbit.pid"
        self.server_log = self.base_dir / "server-stdout.log"
        self.timings: dict[str, float] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._torn_down = False
        self.env = self._prepare()

    # ------------------------------------------------------------------ set-up

    def _prepare(self) -> dict[str, str]:
        base = self.base_dir
        home = base / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(self._cookie)
        cookie.chmod(0o400)
        (base / "mnesia").mkdir()
        (base / "log").mkdir()
        (base / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
                    "loopback_users = none",
                    f"default_user = {self.username}",
                    f"default_pass = {self.password}",
                    "",
                ]
            )
        )
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")
        # Nothing inherited may point the node (or its CLI) at the shared node's files.
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_")) and key != "HOME"
        }
        env.update(
            {
                "HOME": str(home),
                "RABBITMQ_NODENAME": self.node_name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.amqp_port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),  # without extension
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
                # Deliberately absent: keeps /etc/rabbitmq/advanced.config out.
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": _LOOPBACK_ONLY,
                "RABBITMQ_CTL_ERL_ARGS": _LOOPBACK_ONLY,
            }
        )
        return env

    # ------------------------------------------------------------- properties

    @property
    def amqp_url(self) -> str:
        """AMQP URL of the node (a per-node user with a random password, default vhost)."""
        return self.amqp_url_via(self.amqp_port)

    def amqp_url_via(self, port: int, host: str = "127.0.0.1") -> str:
        """The node's AMQP URL through another address, e.g. a :class:`TcpProxy` in front of it."""
        return f"amqp://{self.username}:{self.password}@{host}:{port}/"

    @property
    def short_name(self) -> str:
        """The node name without ``@localhost`` (what epmd lists)."""
        return self.node_name.partition("@")[0]

    @property
    def is_running(self) -> bool:
        """Whether the ``rabbitmq-server`` process started by this object is still alive."""
        return self._process is not None and self._process.poll() is None

    def beam_pid(self) -> int:
        """The pid of the Erlang VM (``beam.smp``), read from the node's pid file."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise RabbitNodeError(f"no usable pid file at {self.pid_file}") from exc

    # --------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the node in its own session and wait until the broker application runs."""
        if self._torn_down:
            raise RabbitNodeError("node was torn down; create a new PrivateRabbitNode")
        if self.is_running:
            raise RabbitNodeError(f"{self.node_name} is already running")
        started = time.monotonic()
        self._start_watchdog()
        self._spawn()
        self._wait_booted()
        self.timings["boot"] = time.monotonic() - started
        log.info(
            "node %s ready on port %d in %.1fs",
            self.node_name,
            self.amqp_port,
            self.timings["boot"],
        )

    def stop_app(self) -> None:
        """Stop the RabbitMQ application (the Erlang VM keeps running): the broker is down."""
        started = time.monotonic()
        self._ctl("stop_app")
        self.timings["stop_app"] = time.monotonic() - started

    def start_app(self) -> None:
        """Start the RabbitMQ application again after :meth:`stop_app` and wait until it runs."""
        started = time.monotonic()
        self._ctl("start_app")  # returns once the application (and its listeners) runs
        self.timings["start_app"] = time.monotonic() - started

    def join(self, other: PrivateRabbitNode) -> None:
        """Join `other`'s cluster (the two share a cookie). This node's users and queues are
        replaced by the cluster's: connect with `other`'s credentials from now on."""
        started = time.monotonic()
        self.stop_app()
        self._ctl("join_cluster", other.node_name)
        self.start_app()
        self.timings["join"] = time.monotonic() - started

    def memory_alarm(self, on: bool) -> None:
        """Raise a memory alarm (a high watermark no node stays under: publishers are blocked),
        or clear it (RabbitMQ's default watermark)."""
        self._ctl("set_vm_memory_high_watermark", "0.0001" if on else "0.4")

    def kill(self) -> None:
        """Crash the node: ``kill -9`` the beam pid from the pid file and wait until it is gone."""
        process = self._require_process()
        pid = self.beam_pid()
        try:
            ours = process.poll() is None and os.getpgid(pid) == process.pid
        except ProcessLookupError:
            ours = False
        if not ours:
            raise RabbitNodeError(f"pid {pid} in {self.pid_file} is not this node's running beam")
        started = time.monotonic()
        log.info("kill -9 %s (beam pid %d)", self.node_name, pid)
        os.kill(pid, signal.SIGKILL)
        # The beam process is a child of the rabbitmq-server shell, which exits once it is reaped.
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired as exc:
            self._force_kill()
            raise RabbitNodeError(f"{self.node_name} did not exit after kill -9") from exc
        self.timings["kill"] = time.monotonic() - started

    def restart_after_kill(self) -> None:
        """Start the node again with the same environment (same data, ports, name) and wait."""
        if self.is_running:
            raise RabbitNodeError(f"{self.node_name} is still running; kill() it first")
        if self._torn_down:
            raise RabbitNodeError("node was torn down; create a new PrivateRabbitNode")
        started = time.monotonic()
        # A stale pid file would let `rabbitmqctl wait` look at the dead process.
        self.pid_file.unlink(missing_ok=True)
        self._spawn()
        self._wait_booted()
        self.timings["restart_after_kill"] = time.monotonic() - started

    def teardown(self) -> None:
        """Stop the node (waiting for the process to exit), then remove its directory.

        Idempotent, and safe after :meth:`kill` or a failed :meth:`start`.
        """
        if self._torn_down:
            return
        started = time.monotonic()
        try:
            if self.is_running:
                self._stop_node()
        finally:
            self._torn_down = True
            self._disarm_watchdog()
            shutil.rmtree(self.base_dir, ignore_errors=True)
        self.timings["teardown"] = time.monotonic() - started

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    # ------------------------------------------------------------- inspection

    def quorum_status(self, queue: str, *, vhost: str = "/") -> list[dict[str, object]]:
        """``rabbitmq-queues quorum_status``: one object per member (``Raft State`` and more)."""
        out = self._run(
            "rabbitmq-queues",
            "quorum_status",
            queue,
            "--vhost",
            vhost,
            "--formatter",
            "json",
        )
        parsed = json.loads(out)
        if not isinstance(parsed, list):
            raise RabbitNodeError(f"unexpected quorum_status output for {queue!r}: {out!r}")
        return [member for member in parsed if isinstance(member, dict)]

    def quorum_leaders_ok(self, queue_names: Iterable[str], *, vhost: str = "/") -> bool:
        """True when every named quorum queue has a member in the ``leader`` state.

        Guards against the 3.10.8 defect where a queue killed right after its declaration comes back
        without a leader (its confirmed messages then unreadable).
        """
        for queue in queue_names:
            try:
                members = self.quorum_status(queue, vhost=vhost)
            except (RabbitNodeError, json.JSONDecodeError) as exc:
                log.debug("quorum_status %s failed: %s", queue, exc)
                return False
            if not any(member.get("Raft State") == "leader" for member in members):
                log.debug("quorum queue %s has no leader: %s", queue, members)
                return False
        return True

    def wait_for_leaders(
        self, queue_names: Sequence[str], timeout: float = 30.0, *, vhost: str = "/"
    ) -> None:
        """Poll until every named quorum queue has a leader; raise ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        while not self.quorum_leaders_ok(queue_names, vhost=vhost):
            if time.monotonic() >= deadline:
                states = {q: self._raft_states(q, vhost) for q in queue_names}
                raise TimeoutError(
                    f"quorum queues without a leader after {timeout}s on {self.node_name}: {states}"
                )
            time.sleep(_POLL_INTERVAL)

    def list_queues(self, *, vhost: str = "/") -> dict[str, int]:
        """Queue name -> ready+unacked message count. Counters can lag right after a restart."""
        out = self._run(
            "rabbitmqctl",
            "list_queues",
            "--vhost",
            vhost,
            "name",
            "messages",
            "--formatter",
            "json",
        )
        parsed = json.loads(out)
        if not isinstance(parsed, list):
            raise RabbitNodeError(f"unexpected list_queues output: {out!r}")
        queues: dict[str, int] = {}
        for row in parsed:
            if not isinstance(row, dict) or not isinstance(row.get("name"), str):
                continue
            messages = row.get("messages")
            queues[row["name"]] = messages if isinstance(messages, int) else 0
        return queues

    def registered_in_epmd(self) -> bool:
        """Whether epmd (the machine's Erlang port mapper) still lists this node's name."""
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        result = subprocess.run(
            [epmd, "-names"], capture_output=True, text=True, timeout=_CLI_TIMEOUT, check=False
        )
        names = {
            line.split()[1]
            for line in result.stdout.splitlines()
            if line.startswith("name ") and len(line.split()) > 1
        }
        return self.short_name in names

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's stdout and main log (for failure messages)."""
        chunks: list[str] = []
        candidates = [self.server_log, self.base_dir / "log" / f"{self.node_name}.log"]
        for path in candidates:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(chunks)

    # -------------------------------------------------------------- internals

    def _start_watchdog(self) -> None:
        if self._watchdog is not None:
            return
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WATCHDOG,
                str(RABBITMQ_BIN / "rabbitmqctl"),
                self.node_name,
                str(self.pid_file),
                str(self.base_dir),
            ],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the test's process group does not reach it
        )

    def _disarm_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        try:
            if watchdog.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    watchdog.stdin.write(b"disarm")
                watchdog.stdin.close()
            watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait(timeout=10)

    def _spawn(self) -> None:
        output: IO[bytes] = self.server_log.open("ab")
        try:
            self._process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self.env,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # setsid: signals to the test's group never reach it
            )
        finally:
            output.close()  # the child holds its own descriptor

    def _wait_booted(self) -> None:
        """``rabbitmqctl wait PIDFILE``, abandoned early if the server process dies meanwhile."""
        process = self._require_process()
        timeout = int(self.boot_timeout)
        waiter = subprocess.Popen(
            [
                str(RABBITMQ_BIN / "rabbitmqctl"),
                "-n",
                self.node_name,
                "wait",
                "--timeout",
                str(timeout),
                str(self.pid_file),
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            failure = self._watch_boot(waiter, process, timeout)
        except BaseException:
            self._force_kill()
            raise
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait(timeout=10)
        if failure is not None:
            self._force_kill()
            raise RabbitNodeError(f"{failure}\n{self.log_tail()}")

    def _watch_boot(
        self,
        waiter: subprocess.Popen[bytes],
        process: subprocess.Popen[bytes],
        timeout: int,
    ) -> str | None:
        """None once ``rabbitmqctl wait`` succeeded, else why the boot failed."""
        deadline = time.monotonic() + timeout + 15
        while True:
            try:
                out, _ = waiter.communicate(timeout=_POLL_INTERVAL)
            except subprocess.TimeoutExpired:
                if process.poll() is not None:
                    return f"{self.node_name} exited with {process.returncode} during boot"
                if time.monotonic() >= deadline:
                    return f"{self.node_name} not ready after {timeout}s"
                continue
            if waiter.returncode == 0:
                return None
            return f"rabbitmqctl wait failed ({waiter.returncode}): {out.decode(errors='replace')}"

    def _stop_node(self) -> None:
        process = self._require_process()
        try:
            # With the pid file argument, `stop` returns only after the process has exited.
            self._ctl("stop", str(self.pid_file), timeout=_CLI_TIMEOUT)
            process.wait(timeout=30)
        except (RabbitNodeError, subprocess.TimeoutExpired) as exc:
            log.warning("graceful stop of %s failed (%s); killing its session", self.node_name, exc)
            self._force_kill()

    def _force_kill(self) -> None:
        """SIGKILL the node's whole session (process group), then reap the shell."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        # The shell is not reaped yet, so its pid (= the session's group id) cannot be reused.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # beam.smp is in that group too
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RabbitNodeError(f"{self.node_name} was never started")
        return self._process

    def _raft_states(self, queue: str, vhost: str) -> list[object]:
        try:
            return [m.get("Raft State") for m in self.quorum_status(queue, vhost=vhost)]
        except (RabbitNodeError, json.JSONDecodeError) as exc:
            return [f"error: {exc}"]

    def _ctl(self, *args: str, timeout: float = _CLI_TIMEOUT) -> str:
        return self._run("rabbitmqctl", *args, timeout=timeout)

    def _run(self, tool: str, *args: str, timeout: float = _CLI_TIMEOUT) -> str:
        command = [str(RABBITMQ_BIN / tool), "-n", self.node_name, *args]
        try:
            result = subprocess.run(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RabbitNodeError(f"{' '.join(command[1:])} timed out after {timeout}s") from exc
        if result.returncode != 0:
            raise RabbitNodeError(
                f"{tool} {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout

    def __repr__(self) -> str:
        return f"PrivateRabbitNode({self.node_name!r}, amqp_port={self.amqp_port})"
