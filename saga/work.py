"""Counts of the work a process does for its sagas: statements, transactions, hand-offs to
worker threads, publishes, settled deliveries, socket writes.

Time is a poor guard against a slower hot path on shared machines; work is not. These counts
are exact and cheap (an integer added where the work is done), exported as
``saga_work_total{kind=...}`` next to the other metrics, and read per saga by ``saga bench``
and by the regression test that bounds the work per saga and per command.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

from prometheus_client.core import CounterMetricFamily, Metric

__all__ = ["WorkCounts", "WorkCollector"]


@dataclass(slots=True)
class WorkCounts:
    """What one component (a store, a ledger, a broker connection) did so far."""

    #: SQL statements sent to the database (an ``executemany`` counts once; BEGIN and COMMIT
    #: count too)
    statements: int = 0
    #: write transactions committed
    transactions: int = 0
    #: calls handed to a worker thread (each wakes the loop again when done)
    handoffs: int = 0
    #: messages published (each awaits its confirm)
    publishes: int = 0
    #: deliveries received from the broker
    deliveries: int = 0
    #: deliveries acked or nacked
    settles: int = 0
    #: ack frames sent (one ``multiple`` ack settles a run of deliveries)
    ack_frames: int = 0
    #: writes to the broker's socket (each a system call)
    sends: int = 0

    def __add__(self, other: WorkCounts) -> WorkCounts:
        return WorkCounts(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class WorkCollector:
    """``saga_work_total{kind=...}``: the sum of ``sources`` read at each scrape."""

    def __init__(self, sources: list[Callable[[], WorkCounts]]):
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        total = WorkCounts()
        for read in self._sources:
            total = total + read()
        family = CounterMetricFamily(
            "saga_work",
            "Work done: SQL statements, transactions, thread hand-offs, publishes, deliveries, "
            "settles (acks and nacks), ack frames and socket writes.",
            labels=["kind"],
        )
        for kind, value in total.as_dict().items():
            family.add_metric([kind], value)
        yield family
