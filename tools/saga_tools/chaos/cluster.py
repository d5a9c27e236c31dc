"""Three private RabbitMQ nodes joined into one cluster, for tests that kill a node under load.

Each node is a :class:`~saga_tools.chaos.node.RabbitNode` (free loopback ports, its own data
directory, the shared broker never touched); they share one Erlang cookie, which is what lets
them, and ``rabbitmqctl``, talk to each other. The nodes boot in parallel, then every node but
the first joins the first the documented way (``stop_app``, ``join_cluster``, ``start_app``),
and :meth:`RabbitCluster.start` returns once ``cluster_status`` lists every node as running.

:meth:`RabbitCluster.kill` SIGKILLs one node; :meth:`RabbitCluster.restart` boots it again on
its own data, and it rejoins by itself. Failures raise :class:`NodeError` with the nodes' log
tails: a test must fail loudly, never skip.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from saga_tools.chaos.node import SBIN, NodeError, RabbitNode, free_port

__all__ = ["RabbitCluster"]


class RabbitCluster:
    """``size`` private nodes in one cluster: ``start``, ``kill(i)``, ``restart(i)``, ``close``.

    Node 0 is the one every client of :attr:`urls` connects to first. Usable as a context
    manager (started on enter, killed and deleted on exit).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        size: int = 3,
        startup_timeout: float = 120.0,
        sbin: Path = SBIN,
        extra_config: str = "",
        partitionable: bool = False,
        net_ticktime: int | None = None,
    ):
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.name = name or f"saga-{secrets.token_hex(4)}"
        self.startup_timeout = startup_timeout
        cookie = secrets.token_hex(20).upper()
        taken: set[int] = set()
        nodes = []
        #: per node, the loopback address its outgoing distribution connections come from
        #: (``partitionable``), so that netfilter can tell one node's traffic from another's
        self.dist_sources: tuple[str, ...] = ()
        if partitionable:
            self.dist_sources = tuple(f"127.0.0.{10 + i}" for i in range(1, size + 1))
        for index in range(1, size + 1):
            port = free_port(taken)
            dist_port = free_port(taken | {port})
            taken |= {port, dist_port}
            kernel = []
            if partitionable:
                address = self.dist_sources[index - 1].replace(".", ",")
                kernel.append(f"{{inet_dist_connect_options, [{{ip, {{{address}}}}}]}}")
            if net_ticktime is not None:
                kernel.append(f"{{net_ticktime, {net_ticktime}}}")
            nodes.append(
                RabbitNode(
                    f"{self.name}-{index}",
                    port=port,
                    dist_port=dist_port,
                    startup_timeout=startup_timeout,
                    sbin=sbin,
                    extra_config=extra_config,
                    advanced_config=f"[{{kernel, [{', '.join(kernel)}]}}].\n",
                    cookie=cookie,
                )
            )
        self.nodes: tuple[RabbitNode, ...] = tuple(nodes)
        #: seconds :meth:`start` took, from the first boot to every node running clustered
        self.boot_seconds: float | None = None

    # --- addresses ---------------------------------------------------------------------

    @property
    def urls(self) -> str:
        """A ``SAGA_RABBITMQ_URL`` value naming every node, node 0 first."""
        return ",".join(n.url for n in self.nodes)

    def urls_for(self, user: str, password: str, vhost: str = "/") -> str:
        """The same for ``user`` on ``vhost`` (users and vhosts are cluster-wide)."""
        return ",".join(n.url_for(user, password, vhost) for n in self.nodes)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Boot every node, join them into one cluster and wait until all run in it."""
        began = time.monotonic()
        try:
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                booted = [pool.submit(n.start) for n in self.nodes]
                for future in booted:
                    future.result()  # the first NodeError, with its node's log tail
            first = self.nodes[0]
            for node in self.nodes[1:]:
                self._join(node, first)
            self.wait_running(len(self.nodes))
        except BaseException:
            with contextlib.suppress(Exception):  # the boot's error is the one to report
                self.close()
            raise
        self.boot_seconds = time.monotonic() - began

    def _join(self, node: RabbitNode, first: RabbitNode) -> None:
        try:
            node.rabbitmqctl("stop_app")
            node.rabbitmqctl("join_cluster", first.node)
            node.rabbitmqctl("start_app", timeout=self.startup_timeout)
            node.rabbitmqctl("await_startup", timeout=self.startup_timeout)
        except NodeError as exc:
            raise NodeError(
                f"{node.node} could not join {first.node}: {exc}\n{self.log_tails()}"
            ) from exc

    def running_nodes(self) -> list[str]:
        """The Erlang names of the nodes running in the cluster, as a live node sees it."""
        errors = []
        for node in self.nodes:
            if not node.running():
                continue
            try:
                out = node.rabbitmqctl("cluster_status", "--formatter", "json", timeout=30)
                return sorted(json.loads(out)["running_nodes"])
            except (NodeError, ValueError, KeyError) as exc:
                errors.append(f"{node.node}: {exc}")
        raise NodeError("no node answers cluster_status: " + ("; ".join(errors) or "none runs"))

    def wait_running(self, count: int, within: float | None = None) -> None:
        """Wait until ``count`` nodes run in the cluster; NodeError with the log tails if not."""
        deadline = time.monotonic() + (within if within is not None else self.startup_timeout)
        seen: list[str] | str = []
        while True:
            try:
                seen = self.running_nodes()
                if len(seen) >= count:
                    return
            except NodeError as exc:
                seen = str(exc)
            if time.monotonic() > deadline:
                raise NodeError(
                    f"cluster {self.name}: {count} nodes should run, cluster_status says "
                    f"{seen}\n{self.log_tails()}"
                )
            time.sleep(0.5)

    def kill(self, index: int) -> RabbitNode:
        """SIGKILL node ``index`` (0: the first of :attr:`urls`), as a power cut would."""
        node = self.nodes[index]
        node.kill()
        return node

    def restart(self, index: int) -> None:
        """Boot node ``index`` again on its data and wait until it runs in the cluster again."""
        self.nodes[index].start()
        self.wait_running(len(self.nodes))

    def close(self) -> None:
        """Kill every node and delete its directory; the first error, if any, after all."""
        failure: BaseException | None = None
        for node in self.nodes:
            try:
                node.close()
            except BaseException as exc:  # close the others first, then raise
                failure = failure or exc
        if failure is not None:
            raise failure

    def log_tails(self, lines: int = 10) -> str:
        return "\n".join(f"log of {n.node}:\n{n.log_tail(lines)}" for n in self.nodes)

    def __enter__(self) -> RabbitCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
