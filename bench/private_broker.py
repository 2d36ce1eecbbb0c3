"""Run a benchmark against a RabbitMQ node of its own, configured as `compose.yaml` deploys it.

The benchmarks use the broker at `AMQP_URL`, shared with whatever else runs on the machine and
configured by its owner. This starts a private, throwaway node (`tests.support.rabbit_node`:
own port, data directory and cookie, no plugins, where compose runs the management image; the
shared node is never touched), runs the command with
`AMQP_URL` pointing at it, `BENCH_BROKER_PID` naming its Erlang VM (whose CPU the benchmarks
count as the broker's) and `BENCH_BROKER` naming the set-up (results are saved as
`<scenario>_<BENCH_BROKER>.json`, beside those of the shared node), then removes the node.

`--scheduler-bind-type` is RabbitMQ's `RABBITMQ_SCHEDULER_BIND_TYPE`: `u` (unbound) is what
compose.yaml sets, where the broker shares its cores with the services; `db` is RabbitMQ's
default, one scheduler pinned to each core. `--cpus 0` keeps the node on CPU 0 (all its
threads), as `bench.e2e_latency --pin` lays the services out beside it.

    python -m bench.private_broker [--scheduler-bind-type u|db] [--cpus 0] -- \
        python -m bench.e2e_latency [--pin]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from bench.system import pin
from tests.support.rabbit_node import PrivateRabbitNode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scheduler-bind-type", default="u", choices=("u", "db"))
    parser.add_argument(
        "--cpus", help="comma-separated CPUs the node's threads are kept on (default: all)"
    )
    parser.add_argument("command", nargs="+", help="the benchmark to run (after `--`)")
    args = parser.parse_args(argv)
    node = PrivateRabbitNode(name_prefix="courier-bench")
    node.env["RABBITMQ_SCHEDULER_BIND_TYPE"] = args.scheduler_bind_type
    try:
        node.start()
        if args.cpus:
            pin(node.beam_pid(), {int(cpu) for cpu in args.cpus.split(",")})
        print(
            f"private RabbitMQ node on port {node.amqp_port}, schedulers "
            f"{'unbound' if args.scheduler_bind_type == 'u' else 'bound one per core'}"
            + (f", on CPUs {args.cpus}" if args.cpus else ""),
            flush=True,
        )
        env = {
            **os.environ,
            "AMQP_URL": node.amqp_url,
            "BENCH_BROKER_PID": str(node.beam_pid()),
            "BENCH_BROKER": f"private_{'unbound' if args.scheduler_bind_type == 'u' else 'bound'}"
            + (f"_cpus{args.cpus.replace(',', '-')}" if args.cpus else ""),
        }
        return subprocess.run(args.command, env=env, check=False).returncode
    finally:
        node.teardown()


if __name__ == "__main__":
    sys.exit(main())
