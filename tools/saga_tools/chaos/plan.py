"""A chaos soak's plan: the seeded workload, the failures injected into it, and the nemesis's
fault schedule. Everything random comes from one seed, and the whole plan is saved as JSON, so a
failing run replays exactly the same sagas, injected failures and faults."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from saga.participant.faults import INJECTED_REFUSAL
from saga_demo import inventory, payment
from saga_demo.checkout import CHECKOUT, checkout_input
from saga_demo.cli import SAMPLE_ADDRESSES, SAMPLE_PRICES
from saga_tools.chaos.model import STEPS, UNIT, Expectation, World, predict
from saga_tools.chaos.proxy import STAGES

#: the start-up stages a ``startup_cut`` fault picks from (see saga_tools.chaos.proxy)
START_STAGES = tuple(STAGES)

__all__ = [
    "CLUSTER_KINDS",
    "FAULT_KINDS",
    "ChaosPlan",
    "Nemesis",
    "PlannedFault",
    "PlannedSaga",
    "expectation",
    "make_plan",
    "orchestrator_names",
]

#: what the nemesis can do; ``make_plan(kinds=...)`` picks a subset
FAULT_KINDS = (
    "kill_orchestrator",
    "kill_service",
    "kill_broker",
    "drop_connections",
    "latency",
    "duplicate_commands",
    "duplicate_replies",
    "malformed",
    "db_lock",
    "partition",
    "sigterm",
    "startup_cut",
    "partition_nodes",
)
#: the kinds that need a cluster of several broker nodes
CLUSTER_KINDS = ("partition_nodes",)
SERVICES = ("order", "payment", "inventory", "shipping")

#: balances and stock big enough that no checkout competes with another for them: every
#: business failure then follows from the checkout's own input, whatever order they run in
PLENTY_BALANCE = Decimal("900000.00")  # the contracts cap a balance at 1,000,000
PLENTY_STOCK = 10_000_000

#: the checkout's retry budgets (attempts), read from the definition itself
_UNLIMITED = 1_000_000
_BUDGET: dict[tuple[str, str], int] = {
    (s.name, "action"): s.retry.max_attempts or _UNLIMITED for s in CHECKOUT.steps
} | {
    (s.name, "compensation"): s.compensation_retry.max_attempts or _UNLIMITED
    for s in CHECKOUT.steps
}


@dataclass(frozen=True)
class PlannedFault:
    """A failure the participant of ``step`` injects into the saga (see participant/faults)."""

    step: str
    direction: Literal["action", "compensation"]
    mode: Literal["transient", "refuse"]
    times: int = 1

    @property
    def exhausts(self) -> bool:
        """True when the step's retry budget runs out on it: the failure is final."""
        return self.mode == "refuse" or self.times >= _BUDGET[(self.step, self.direction)]


@dataclass(frozen=True)
class PlannedSaga:
    key: str
    input: Mapping[str, Any]
    faults: tuple[PlannedFault, ...] = ()
    kind: str = "success"

    @property
    def saga_id(self) -> uuid.UUID:
        from saga.core.ids import saga_id_for_key  # noqa: PLC0415  (kept local: cheap, rarely used)

        return saga_id_for_key(CHECKOUT.name, self.key)


@dataclass(frozen=True)
class Nemesis:
    """One fault: at ``at`` seconds into the run, do ``kind`` to ``target`` for ``duration``."""

    at: float
    kind: str
    target: str = ""
    duration: float = 0.0
    amount: float = 0.0  # latency seconds, messages to duplicate or to forge


@dataclass(frozen=True)
class ChaosPlan:
    seed: int
    sagas: tuple[PlannedSaga, ...]
    schedule: tuple[Nemesis, ...]
    rate: float  # sagas started per second
    balances: Mapping[str, str] = field(default_factory=dict)
    stock: Mapping[str, int] = field(default_factory=dict)
    #: the orchestrator's SAGA_MAX_IN_FLIGHT (None: its default)
    max_in_flight: int | None = None
    #: RabbitMQ nodes: 1, a private node; more, a private cluster with quorum queues
    nodes: int = 1
    #: orchestrator processes (several need ``backend`` postgresql)
    instances: int = 1
    #: where the orchestrators keep sagas: ``sqlite`` (a file) or ``postgresql``
    backend: str = "sqlite"

    @property
    def duration(self) -> float:
        return len(self.sagas) / self.rate

    @property
    def orchestrators(self) -> tuple[str, ...]:
        """The orchestrator processes' names (a fault's ``target``)."""
        return orchestrator_names(self.instances)

    def world(self) -> World:
        """The services' state the plan's expectations are computed against."""
        return (
            World.seeded()
            .with_balances({k: Decimal(v) for k, v in self.balances.items()})
            .with_stock({sku: n - _reserved(sku) for sku, n in self.stock.items()})
        )

    def fault_plan(self) -> dict[str, list[dict[str, Any]]]:
        """What the participants read from ``SAGA_FAULT_PLAN``."""
        commands = {
            **{(s.name, "action"): s.action for s in CHECKOUT.steps},
            **{(s.name, "compensation"): s.compensation for s in CHECKOUT.steps},
        }
        return {
            "faults": [
                {
                    "saga_id": str(s.saga_id),
                    "command_type": commands[(f.step, f.direction)],
                    "mode": f.mode,
                    "times": f.times,
                }
                for s in self.sagas
                for f in s.faults
            ]
        }

    # --- persistence ------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> ChaosPlan:
        return cls.load_text(path.read_text())

    @classmethod
    def load_text(cls, text: str) -> ChaosPlan:
        raw = json.loads(text)
        return cls(
            seed=int(raw["seed"]),
            sagas=tuple(
                PlannedSaga(
                    key=s["key"],
                    input=s["input"],
                    faults=tuple(PlannedFault(**f) for f in s["faults"]),
                    kind=s["kind"],
                )
                for s in raw["sagas"]
            ),
            schedule=tuple(Nemesis(**n) for n in raw["schedule"]),
            rate=float(raw["rate"]),
            balances=dict(raw.get("balances", {})),
            stock={k: int(v) for k, v in raw.get("stock", {}).items()},
            max_in_flight=raw.get("max_in_flight"),
            nodes=int(raw.get("nodes", 1)),
            instances=int(raw.get("instances", 1)),
            backend=str(raw.get("backend", "sqlite")),
        )


def orchestrator_names(instances: int) -> tuple[str, ...]:
    if instances == 1:
        return ("orchestrator",)
    return tuple(f"orchestrator-{i}" for i in range(1, instances + 1))


def _reserved(sku: str) -> int:
    return next(int(s["reserved"]) for s in inventory.SEED if s["sku"] == sku)


# --- the workload ----------------------------------------------------------------------

_GOOD_ADDRESSES = SAMPLE_ADDRESSES[:3]
_UNDELIVERABLE = SAMPLE_ADDRESSES[3]
_SLOW = {  # the carrier never answers: retried until the budget is spent, then compensated
    "name": "Ann Smith",
    "street": "Mill Lane 3",
    "city": "Slowtown",
    "postal_code": "10117",
    "country": "DE",
}

#: (kind, weight): mostly success; business failures at each step; injected failures. Every
#: checkout charges and reserves in parallel; shipping runs only for physical goods.
MIX: tuple[tuple[str, int], ...] = (
    ("success", 40),
    ("digital_only", 5),  # e-books alone: reservation and shipping skipped
    ("mixed_goods", 5),  # physical and digital lines: only the physical ones reserved, shipped
    ("member_refused", 5),  # the charge or the reservation refused: the other one undone
    ("flaky_gateway", 5),  # dave: the card gateway fails once, then succeeds
    ("limit_exceeded", 5),  # refused at payment
    ("out_of_stock", 5),  # refused at inventory
    ("undeliverable", 5),  # refused at shipping
    ("carrier_unreachable", 3),  # transient at shipping until the budget runs out
    ("transient_action", 10),  # an action fails a few times, below its budget
    ("refused_then_compensation_retried", 8),  # a compensation fails a few times
    ("compensation_fails_for_good", 2),  # a compensation exhausts its budget: FAILED
    ("compensation_refused", 2),  # a compensation is refused outright: FAILED
)


def _lines(rng: random.Random, skus: Sequence[str]) -> list[tuple[str, int, Decimal]]:
    chosen = sorted(rng.sample(list(skus), rng.choice((1, 1, 2))))
    return [(sku, rng.randint(1, 2), SAMPLE_PRICES[sku]) for sku in chosen]


def _ebooks(rng: random.Random) -> list[tuple[str, int, Decimal]]:
    return [(inventory.EBOOK, rng.randint(1, 2), SAMPLE_PRICES[inventory.EBOOK])]


def _ran_by(step: str) -> list[str]:
    """The steps that took effect when ``step`` is refused: those of the units before it and
    its siblings in the parallel group, each then undone."""
    return [s for s in STEPS if s != step and UNIT[s] <= UNIT[step]]


def _saga(rng: random.Random, kind: str) -> PlannedSaga:
    """One checkout of ``kind``; its input alone decides any business failure (see PLENTY_*)."""
    common = [inventory.BOOK, inventory.LAMP]
    customer = rng.choice(("alice", "bob"))
    lines = _lines(rng, common)
    address = rng.choice(_GOOD_ADDRESSES)
    faults: tuple[PlannedFault, ...] = ()
    if kind == "digital_only":
        lines = _ebooks(rng)
    elif kind == "mixed_goods":
        lines = sorted(lines + _ebooks(rng))
    elif kind == "member_refused":
        member = rng.choice((STEPS[1], STEPS[2]))  # the charge or the reservation
        faults = (PlannedFault(member, "action", "refuse"),)
    elif kind == "flaky_gateway":
        customer = "dave"
    elif kind == "limit_exceeded":
        customer = "carol"  # per-charge limit 50.00: two lamps are 90.00
        lines = [(inventory.LAMP, 2, SAMPLE_PRICES[inventory.LAMP])]
    elif kind == "out_of_stock":
        lines = [*lines, (inventory.RARE, 1, SAMPLE_PRICES[inventory.RARE])]
        lines = sorted({sku: (sku, n, p) for sku, n, p in lines}.values())
    elif kind == "undeliverable":
        address = _UNDELIVERABLE
    elif kind == "carrier_unreachable":
        address = _SLOW
    elif kind == "transient_action":
        step = rng.choice(STEPS)
        faults = (PlannedFault(step, "action", "transient", rng.randint(1, 2)),)
    elif kind in (
        "refused_then_compensation_retried",
        "compensation_fails_for_good",
        "compensation_refused",
    ):
        at = rng.randint(1, len(STEPS) - 1)  # a step with at least one step before it
        undone = rng.choice(_ran_by(STEPS[at]))  # before it, or beside it in the group
        refusal = PlannedFault(STEPS[at], "action", "refuse")
        if kind == "refused_then_compensation_retried":
            comp = PlannedFault(undone, "compensation", "transient", rng.randint(1, 3))
        elif kind == "compensation_fails_for_good":
            budget = _BUDGET[(undone, "compensation")]
            comp = PlannedFault(undone, "compensation", "transient", budget)
        else:
            comp = PlannedFault(undone, "compensation", "refuse")
        faults = (refusal, comp)
    return PlannedSaga(
        key=f"chaos-{rng.getrandbits(64):016x}",
        input=checkout_input(payment.CUSTOMERS[customer], lines, address),
        faults=faults,
        kind=kind,
    )


def _schedule(
    rng: random.Random,
    duration: float,
    every: float,
    kinds: Sequence[str],
    nodes: int = 1,
    orchestrators: Sequence[str] = ("orchestrator",),
) -> tuple[Nemesis, ...]:
    """The faults; with one node and one orchestrator, the same draws as ever, so a seed gives
    the plan it always gave."""
    processes = (*orchestrators, *SERVICES)
    faults = []
    at = every
    bag: list[str] = []  # every kind once, in a random order, then again: all get their turn
    while at < duration:
        if not bag:
            bag = list(kinds)
            rng.shuffle(bag)
        kind = bag.pop()
        target = ""
        length = 0.0
        amount = 0.0
        if kind == "kill_service":
            target = rng.choice(SERVICES)
            length = rng.uniform(0.5, 2.0)  # down this long before it is restarted
        elif kind in ("kill_orchestrator", "kill_broker"):
            length = rng.uniform(0.5, 2.0)
            if kind == "kill_orchestrator" and len(orchestrators) > 1:
                target = rng.choice(orchestrators)
            elif kind == "kill_broker" and nodes > 1:
                target = f"node-{rng.randrange(nodes) + 1}"
        elif kind == "latency":
            length = rng.uniform(1.0, 3.0)
            amount = rng.choice((0.005, 0.02, 0.05))
        elif kind in ("duplicate_commands", "duplicate_replies", "malformed"):
            amount = float(rng.randint(1, 5))
        elif kind == "db_lock":
            target = rng.choice(processes)
            length = rng.uniform(0.5, 2.0)
        elif kind == "partition":
            # one node: every process cut off from the broker, nothing closed; a cluster: one
            # process cut off from the node it is connected to
            length = rng.uniform(1.0, 4.0)
            if nodes > 1:
                target = rng.choice(processes)
        elif kind == "partition_nodes":  # a node cut off from the others, then healed
            target = f"node-{rng.randrange(nodes) + 1}"
            length = rng.uniform(3.0, 20.0)
        elif kind == "sigterm":  # a graceful stop under load, then a restart
            target = rng.choice(processes)
            length = rng.uniform(0.5, 2.0)
        elif kind == "startup_cut":  # killed, and its restart's connection cut at a stage
            target = rng.choice(processes)
            length = rng.uniform(0.5, 2.0)
            amount = float(rng.randrange(len(START_STAGES)))
        faults.append(Nemesis(round(at, 3), kind, target, round(length, 3), amount))
        at += every * rng.uniform(0.7, 1.3)
    return tuple(faults)


def make_plan(
    seed: int,
    count: int,
    *,
    rate: float = 40.0,
    fault_every: float = 3.0,
    kinds: Sequence[str] | None = None,
    max_in_flight: int | None = None,
    nodes: int = 1,
    instances: int = 1,
    backend: str = "sqlite",
) -> ChaosPlan:
    """``count`` checkouts started at ``rate`` per second, and a fault about every
    ``fault_every`` seconds while they start and for a while after. ``kinds`` defaults to every
    kind the shape allows (partitions between nodes need several nodes)."""
    if kinds is None:
        kinds = [k for k in FAULT_KINDS if nodes > 1 or k not in CLUSTER_KINDS]
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
    if nodes not in (1, 3):
        raise ValueError(f"nodes must be 1 (a private node) or 3 (a cluster), not {nodes}")
    if nodes == 1 and set(kinds) & set(CLUSTER_KINDS):
        raise ValueError(f"{', '.join(CLUSTER_KINDS)} needs a cluster: add --nodes 3")
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"backend must be sqlite or postgresql, not {backend!r}")
    if instances < 1 or (instances > 1 and backend != "postgresql"):
        raise ValueError(
            "several orchestrator instances need backend postgresql: SQLite allows one per file"
        )
    rng = random.Random(seed)
    names = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    sagas = tuple(_saga(rng, rng.choices(names, weights)[0]) for _ in range(count))
    # faults keep coming until the last start, plus a little: the tail is hit too
    schedule = (
        _schedule(
            rng,
            count / rate + 2 * fault_every,
            fault_every,
            kinds,
            nodes,
            orchestrator_names(instances),
        )
        if kinds
        else ()
    )
    return ChaosPlan(
        seed=seed,
        sagas=sagas,
        schedule=schedule,
        rate=rate,
        balances={name: str(PLENTY_BALANCE) for name in ("alice", "bob", "carol", "dave")},
        stock={inventory.BOOK: PLENTY_STOCK, inventory.LAMP: PLENTY_STOCK},
        max_in_flight=max_in_flight,
        nodes=nodes,
        instances=instances,
        backend=backend,
    )


# --- what each saga must end as ------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """How a planned saga must end if no fault times a step out."""

    base: Expectation
    failed_compensation: str | None = None  # the step whose compensation fails for good
    reason: str | None = None

    @property
    def status(self) -> str:
        if self.failed_compensation is not None:
            return "FAILED"
        return self.base.status.value


def expectation(world: World, saga: PlannedSaga) -> Expected:
    """The rules' verdict with the injected failures laid over it."""
    verdicts: dict[str, str | None] = {}
    for f in saga.faults:
        if f.direction == "action" and f.exhausts:
            verdicts[f.step] = INJECTED_REFUSAL if f.mode == "refuse" else "injected_transient"
    base = predict(world, saga.input, verdicts)
    if base.failed_step is not None and base.failed_step in verdicts and not base.transient:
        injected = next(
            f for f in saga.faults if f.step == base.failed_step and f.direction == "action"
        )
        base = replace(base, transient=injected.mode == "transient", flaky=False)
    if base.failed_step is None:
        return Expected(base)
    # compensations run newest first; the first one that fails for good stops the saga
    for step in reversed(base.succeeded):
        comp = next(
            (f for f in saga.faults if f.step == step and f.direction == "compensation"), None
        )
        if comp is not None and comp.exhausts:
            return Expected(base, step, INJECTED_REFUSAL if comp.mode == "refuse" else None)
    return Expected(base)
