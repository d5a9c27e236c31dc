"""Fixtures of the cluster tests: one private 3-node RabbitMQ cluster for the whole package.

The cluster (:class:`~saga_tools.chaos.cluster.RabbitCluster`) is booted once, when the first test
asks for it, since three nodes take a while to boot and join on two cores; it is killed and
deleted after the package's last test. A test may kill a node: :func:`healthy_cluster` boots any
node a test before left down, so every test starts with three running nodes. The shared broker
on port 5672 is never touched by the cluster tests except through the TCP proxies of
``test_failover.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from saga_tools.chaos.cluster import RabbitCluster
from saga_tools.chaos.node import NodeError


@pytest.fixture(scope="package")
def cluster() -> Iterator[RabbitCluster]:
    """Three private nodes in one cluster, started; killed and deleted at the end."""
    rabbit = RabbitCluster(f"cluster-{uuid.uuid4().hex[:6]}")
    try:
        rabbit.start()  # closes the nodes it started when it fails
    except NodeError as exc:
        pytest.fail(str(exc), pytrace=False)
    print(f"\n3-node cluster booted and joined in {rabbit.boot_seconds:.1f}s")
    try:
        yield rabbit
    finally:
        rabbit.close()


@pytest.fixture
def healthy_cluster(cluster: RabbitCluster) -> RabbitCluster:
    """The cluster with all three nodes running (a failed test before may have left one down)."""
    try:
        for index, node in enumerate(cluster.nodes):
            if not node.running():
                cluster.restart(index)
        cluster.wait_running(len(cluster.nodes))
    except NodeError as exc:
        pytest.fail(str(exc), pytrace=False)
    return cluster
