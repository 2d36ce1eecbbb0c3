"""A private, throwaway RabbitMQ cluster for fault-injection tests: three
:class:`PrivateRabbitNode` sharing one cookie, nodes 2 and 3 joined to node 1 (the explicit
join of ``RABBITMQ-CLUSTER-NOTES.md``: booting together and joining takes about 15-17 s on
two cores). Every node keeps its own ports, data and watchdog, so a node can be killed and
restarted alone, and teardown never touches the shared node.

Typical use::

    with PrivateRabbitCluster() as cluster:
        settings = CourierSettings(amqp_url=cluster.amqp_url)  # the three nodes, node 1 first
        ...
        cluster.nodes[0].kill()
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Self

from tests.support.rabbit_node import PrivateRabbitNode

__all__ = ["PrivateRabbitCluster"]


class PrivateRabbitCluster:
    def __init__(self, size: int = 3, *, name_prefix: str = "courier-cluster") -> None:
        cookie = secrets.token_hex(16)
        self.nodes = [
            PrivateRabbitNode(name_prefix=f"{name_prefix}{n}", cookie=cookie)
            for n in range(1, size + 1)
        ]

    @property
    def amqp_url(self) -> str:
        """`AMQP_URL` for the whole cluster: every node, node 1 first, with the cluster's
        credentials (node 1's: joining replaced the others' users)."""
        first = self.nodes[0]
        return ",".join(first.amqp_url_via(node.amqp_port) for node in self.nodes)

    def start(self) -> None:
        """Boot the nodes together, then join the others to node 1."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for booted in [pool.submit(node.start) for node in self.nodes]:
                booted.result()
        for node in self.nodes[1:]:
            node.join(self.nodes[0])

    def teardown(self) -> None:
        """Stop every node (together) and remove their directories. Idempotent."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for stopped in [pool.submit(node.teardown) for node in self.nodes]:
                stopped.result()

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
