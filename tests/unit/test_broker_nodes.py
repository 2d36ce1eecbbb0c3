"""How a node of `AMQP_URL` is named in the logs of a failover."""

from __future__ import annotations

import pytest
from yarl import URL

from services.messaging.connection import where


@pytest.mark.parametrize(
    ("url", "named"),
    [("amqp://u:p@rabbit-1/", "rabbit-1:5672"), ("amqps://u:p@rabbit-1/", "rabbit-1:5671")],
)
def test_a_node_listed_without_a_port_is_named_with_the_port_connected_to(
    url: str, named: str
) -> None:
    # yarl knows no default port for amqp: the logs said "rabbit-1:None".
    assert where(URL(url)) == named
