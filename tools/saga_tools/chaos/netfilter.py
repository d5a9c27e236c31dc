"""Network partitions between the nodes of a private cluster, with netfilter (``iptables``).

Every node of a :class:`~saga_tools.chaos.cluster.RabbitCluster` built with
``partitionable=True`` listens for Erlang distribution on 127.0.0.1 at a port of its own and
makes its outgoing distribution connections from an address of its own (127.0.0.11, .12, ...).
A connection between nodes ``a`` and ``b`` is therefore either from ``a``'s address to ``b``'s
distribution port or the other way round, and four ``DROP`` rules in ``OUTPUT`` cut both
directions of both kinds, established connections included, the way a failed switch would:
packets vanish, nothing is reset, and each side finds out by its own net tick. Clients (AMQP),
epmd and ``rabbitmqctl`` connect from 127.0.0.1 and are never cut.

Every rule carries a comment naming its owner, so :meth:`Partitions.heal` and
:meth:`Partitions.close` remove exactly the rules they added, and a rule left behind by a killed
run can be found with ``iptables -S OUTPUT | grep saga-chaos``. Needs root and ``iptables``
(Debian: ``apt-get install iptables``); without them :class:`PartitionError` says so.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from saga_tools.chaos.cluster import RabbitCluster

__all__ = ["PartitionError", "Partitions"]


class PartitionError(RuntimeError):
    """Netfilter could not be used; the message says what to install or run as."""


class Partitions:
    """Cut and heal distribution links between the nodes of one partitionable cluster."""

    def __init__(self, cluster: RabbitCluster, owner: str):
        if not cluster.dist_sources:
            raise PartitionError(
                f"cluster {cluster.name} was not built with partitionable=True: its nodes' "
                "traffic cannot be told apart"
            )
        if shutil.which("iptables") is None:
            raise PartitionError(
                "iptables not found: network partitions need it (apt-get install iptables), "
                "and root"
            )
        self.cluster = cluster
        self.comment = f"saga-chaos-{owner}"
        self._rules: list[list[str]] = []
        #: node indexes currently cut from every other node
        self.isolated: set[int] = set()

    def isolate(self, index: int) -> None:
        """Cut node ``index`` off from every other node, both ways."""
        others = [i for i in range(len(self.cluster.nodes)) if i != index]
        for other in others:
            self.cut(index, other)
        self.isolated.add(index)

    def cut(self, a: int, b: int) -> None:
        """Drop every distribution packet between nodes ``a`` and ``b``."""
        for one, two in ((a, b), (b, a)):
            source = self.cluster.dist_sources[one]
            port = str(self.cluster.nodes[two].dist_port)
            self._add(["-s", source, "-p", "tcp", "--dport", port])  # one calls two
            self._add(["-d", source, "-p", "tcp", "--sport", port])  # two answers one

    def heal(self) -> None:
        """Remove every rule this object added."""
        failures = []
        for spec in reversed(self._rules):
            result = self._iptables("-D", spec, check=False)
            if result.returncode != 0 and "does a matching rule exist" not in result.stderr:
                failures.append(result.stderr.strip())
        self._rules.clear()
        self.isolated.clear()
        if failures:
            raise PartitionError("could not remove partition rules: " + "; ".join(failures))

    def close(self) -> None:
        """Heal, and remove any rule with this owner's comment (a crashed run's too)."""
        self.heal()
        listing = self._iptables("-S", [], check=False).stdout
        for line in listing.splitlines():
            bare = line.replace('"', "")
            if f" {self.comment} " in f"{bare} ":
                spec = line.split()[2:]  # "-A OUTPUT ..." -> the match and target
                self._iptables("-D", [a.strip('"') for a in spec], check=False)

    def _add(self, match: Sequence[str]) -> None:
        spec = [*match, "-m", "comment", "--comment", self.comment, "-j", "DROP"]
        self._iptables("-I", spec)
        self._rules.append(spec)

    def _iptables(
        self, action: str, spec: Sequence[str], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = ["iptables", "-w", "5", action, "OUTPUT", *spec]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PartitionError(f"{' '.join(argv)}: {exc}") from exc
        if check and result.returncode != 0:
            raise PartitionError(
                f"{' '.join(argv)} failed: {result.stderr.strip()} (network partitions need "
                "root and a kernel with netfilter)"
            )
        return result

    def __enter__(self) -> Partitions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
