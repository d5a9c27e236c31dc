"""The timer loop: fires the deadlines of awaited replies and of backoffs, honestly.

A step's timeout measures its participant's silence. So timers never fire while the broker
connection is down (no reply can arrive, no retry can leave); after an outage they wait as long
again as it lasted, for the participants' held-up replies; and while replies wait in the reply
queue not yet delivered to us (a backlog after a restart or a burst), they wait for those to be
applied first. And a step's own deadline waits while its participant's command queue holds
commands not yet delivered to any consumer: the participant is busy or restarting, and the
command may still be in the queue, so its silence says nothing yet (Temporal's split between
schedule-to-start and start-to-close: the step's timeout is the second). Once the backlog is
gone the participant still gets the step's whole timeout from that moment, since it may have
taken the command only then (a restarted service draining its queue answers in turn, not at
once). Each wait is capped by ``SAGA_TIMER_OUTAGE_CREDIT_MAX``, so a silent participant is
always timed out in the end.
Without this, every held-up reply arrives after its step timed out, every timeout adds a retry
to the backlog, and the retry budgets run out on steps that had answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime

import structlog

from saga.orchestrator.runtime import Orchestrator
from saga.transport.broker import Broker
from saga.transport.link import own_cancellation

__all__ = ["TimerLoop"]

log = structlog.get_logger("saga.orchestrator")


class TimerLoop:
    """Fires due timers every ``interval`` seconds, after ``grace`` seconds at start (replies
    that arrived while the orchestrator was down are applied first)."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        broker: Callable[[], Broker | None],
        replies_waiting: Callable[[], Awaitable[bool]],
        *,
        interval: float,
        grace: float,
        credit_max: float,
        backlogged: Callable[[], Awaitable[set[str]]] | None = None,
        backlog_every: float = 0.5,
    ):
        self._orchestrator = orchestrator
        self._broker = broker
        self._replies_waiting = replies_waiting
        self.interval = interval
        self.grace = grace
        self.credit_max = credit_max
        self._backlogged = backlogged
        self.backlog_every = backlog_every
        self._held_since: dict[str, float] = {}  # participant -> when its backlog was first seen
        #: participant -> when its backlog was seen gone: on the loop's clock (how long to keep
        #: it at most) and on the orchestrator's, the clock its deadlines are set on
        self._cleared_at: dict[str, tuple[float, datetime]] = {}
        self._hold_checked = float("-inf")

    async def _participants_held(self, now: float) -> Mapping[str, float]:
        """Participants whose deadlines wait, each with the seconds since its backlog was seen
        gone (0 while it lasts): a deadline waits until that reaches its step's timeout. A
        backlog holds for at most credit_max in one stretch; the queues are looked at every
        ``backlog_every`` seconds (one passive declare each)."""
        if self._backlogged is None:
            return {}
        if now - self._hold_checked >= self.backlog_every:
            self._hold_checked = now
            try:
                backlogged = await self._backlogged()
            except Exception as exc:
                log.warning("timer_backlog_check_failed", error=repr(exc))
                backlogged = set()
            for name in list(self._held_since):
                if name not in backlogged:
                    del self._held_since[name]
                    self._cleared_at[name] = (now, self._orchestrator.clock.now())
            for name in backlogged:
                self._cleared_at.pop(name, None)
                if name not in self._held_since:
                    self._held_since[name] = now
                    log.debug("timers_held", participant=name, why="commands not taken yet")
            for name, (seen, _) in list(self._cleared_at.items()):
                if now - seen >= self.credit_max:
                    del self._cleared_at[name]
        today = self._orchestrator.clock.now()
        hold = {name: (today - at).total_seconds() for name, (_, at) in self._cleared_at.items()}
        hold.update(
            (name, 0.0) for name, since in self._held_since.items() if now - since < self.credit_max
        )
        return hold

    async def _reply_backlog(self, now: float, since: float | None) -> float | None:
        """When the reply queue's backlog began (``since``, or now if it just did); None when
        the queue is empty."""
        if await self._replies_waiting():
            return now if since is None else since
        return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.grace)
        down_since: float | None = None
        backlog_since: float | None = None  # when the reply queue's current backlog was seen
        replies_checked = float("-inf")
        while True:
            if own_cancellation():
                # Python 3.11's wait_for can swallow a cancellation that arrives as its inner
                # call completes (a broker probe, a commit), leaving the task marked
                # "cancelling" yet running: stop here, or a graceful stop waits for ever.
                raise asyncio.CancelledError
            broker = self._broker()
            if broker is not None and not broker.is_connected():
                if down_since is None:
                    down_since = loop.time()
                    log.warning("timers_paused", why="broker connection down")
                await asyncio.sleep(self.interval)
                continue
            if down_since is not None:
                outage = loop.time() - down_since
                wait = min(max(outage, self.grace), self.credit_max)
                log.info("timers_resume", outage_s=round(outage, 2), after_s=round(wait, 2))
                down_since = None
                await asyncio.sleep(wait)
                continue  # down again meanwhile? check before firing
            try:
                due = await self._orchestrator.timers_due()
            except Exception as exc:
                log.warning("timer_loop_failed", error=repr(exc))
                due = False
            now = loop.time()
            if not due:
                # nothing to hold: the queues are looked at every backlog_every seconds only,
                # so that a backlog's start and end are still seen (its credit counts from
                # its start, whenever deadlines pass)
                if now - replies_checked >= self.backlog_every:
                    replies_checked = now
                    backlog_since = await self._reply_backlog(now, backlog_since)
                await self._participants_held(now)
                await asyncio.sleep(self.interval)
                continue
            replies_checked = now
            backlog_since = await self._reply_backlog(now, backlog_since)
            if backlog_since is not None and now - backlog_since < self.credit_max:
                await asyncio.sleep(self.interval)
                continue
            try:
                held = await self._participants_held(loop.time())
                await self._orchestrator.fire_due_timers(hold=held)
            except Exception as exc:
                log.warning("timer_loop_failed", error=repr(exc))
            await asyncio.sleep(self.interval)
