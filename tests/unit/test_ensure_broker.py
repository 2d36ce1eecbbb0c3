"""scripts/ensure_broker.py: what it does when nothing answers at AMQP_URL."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.processes import free_port

SCRIPT = Path(__file__).parents[2] / "scripts" / "ensure_broker.py"


def test_a_local_url_on_another_port_starts_no_local_broker(tmp_path: Path) -> None:
    # The local node listens on 5672: started for another port it never answered there, and
    # beside a node already running, a second one only failed.
    started = tmp_path / "started"
    fake = tmp_path / "rabbitmq-server"
    fake.write_text(f"#!/bin/sh\ntouch {started}\n")
    fake.chmod(0o755)
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    env = {**os.environ, "AMQP_URL": url, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--optional"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and not started.exists()
    assert "not starting the local RabbitMQ" in run.stdout


def test_a_cluster_answering_on_a_later_node_is_a_broker_that_answers(tmp_path: Path) -> None:
    started = tmp_path / "started"
    fake = tmp_path / "rabbitmq-server"
    fake.write_text(f"#!/bin/sh\ntouch {started}\n")
    fake.chmod(0o755)
    with socket.create_server(("127.0.0.1", 0)) as node_2:
        down = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
        port = node_2.getsockname()[1]
        up = f"amqp://guest:guest@127.0.0.1:{port}/"
        env = {
            **os.environ,
            "AMQP_URL": f"{down}, {up}",
            "PATH": f"{tmp_path}:{os.environ['PATH']}",
        }
        run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and not started.exists()
    assert f"answering at 127.0.0.1:{port}" in run.stdout


def test_an_empty_entry_in_the_list_is_not_taken_for_the_default_local_broker(
    tmp_path: Path,
) -> None:
    # The settings pass over an empty entry (a trailing comma); this script read it as
    # 127.0.0.1:5672 and, a broker answering there, said the listed cluster answered.
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):  # else something listens there already
            stack.enter_context(socket.create_server(("127.0.0.1", 5672)))
        url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
        env = {**os.environ, "AMQP_URL": f"{url},", "PATH": str(tmp_path)}
        run = subprocess.run(
            [sys.executable, str(SCRIPT), "--optional"], env=env, capture_output=True, text=True
        )
    assert "answering" not in run.stdout
    assert "nothing answers" in run.stdout
