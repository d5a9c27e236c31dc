"""Saga definitions and the registry that validates them at startup.

A definition is plain data: a name, a version and ordered steps. Payload builders are pure
functions of the :class:`~saga.core.state.SagaContext`, so a step reads earlier outputs by name
(``ctx.output("charge_payment")["payment_id"]``) instead of from one merged dictionary.

A definition may also name its contracts: the model of the saga's input, and per step the
models of the command payloads and of the replies' data (pydantic models). The input is then
validated before a saga is started, a payload before its command is sent, and ``saga schema
export`` publishes all of them. Nothing here imports pydantic: a model is any class with
``model_validate_json`` and ``model_dump``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any, Protocol, cast
from uuid import UUID

from saga.core.errors import DefinitionError, UnknownSagaError
from saga.core.ids import unit_interval
from saga.core.jsontext import dumps
from saga.core.state import JSON, Direction, SagaContext

__all__ = [
    "NAME",
    "CommandSpec",
    "CompensationPolicy",
    "Model",
    "Parallel",
    "PayloadBuilder",
    "Predicate",
    "Registry",
    "RetryPolicy",
    "SagaDefinition",
    "Step",
    "commands_of",
    "pass_input",
]

#: Saga, step, participant and command names: the same rule as ``contracts.common.Name``.
NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}")


class Model(Protocol):
    """A message model: in practice a pydantic ``BaseModel`` subclass."""

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...


#: a payload builder returns the payload as a JSON object, or as an instance of a model
PayloadBuilder = Callable[[SagaContext], "Mapping[str, JSON] | Model"]


#: a step's condition: a pure function of the context; False skips the step
Predicate = Callable[[SagaContext], bool]


class CompensationPolicy(StrEnum):
    """What a compensation that fails for good does to the rest of the compensation."""

    HALT = "halt"  # stop at once: FAILED naming the step, the older steps wait for an operator
    CONTINUE = "continue"  # go on with the older steps; FAILED at the end naming every stuck one


def pass_input(ctx: SagaContext) -> Mapping[str, JSON]:
    """Default payload: the saga's own input, unchanged."""
    return dict(ctx.input)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how far apart a command is re-sent.

    ``max_attempts=None`` retries forever (useful after a pivot, where giving up is not an
    option). Jitter is derived from the saga id, step and attempt, so it spreads retries of many
    sagas apart while every decision stays repeatable.
    """

    max_attempts: int | None = 3
    initial_backoff: timedelta = timedelta(milliseconds=200)
    multiplier: float = 2.0
    max_backoff: timedelta = timedelta(seconds=30)
    jitter: float = 0.1  # +/- this fraction of the delay

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1, or None for no limit")
        if self.initial_backoff < timedelta(0) or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def exhausted(self, tries: int) -> bool:
        """True when ``tries`` attempts used the whole budget."""
        return self.max_attempts is not None and tries >= self.max_attempts

    def delay(self, tries: int, *seed: object) -> timedelta:
        """Backoff before attempt ``tries + 1``; a pure function of its arguments."""
        base = self.initial_backoff.total_seconds() * self.multiplier ** max(tries - 1, 0)
        base = min(base, self.max_backoff.total_seconds())
        spread = 1 + self.jitter * (2 * unit_interval(*seed, tries) - 1)
        return timedelta(seconds=base * spread)


@dataclass(frozen=True, slots=True)
class Step:
    """One step: an action sent to ``participant`` and, before the pivot, its compensation.

    * ``compensatable=False`` marks a step with nothing to undo (a read or a check).
    * ``pivot=True`` marks the go/no-go step: once it succeeds the saga only moves forward, and
      the steps after it are retried instead of compensated.
    * ``payload_model`` / ``compensation_payload_model`` validate what the builders return before
      the command is sent; ``reply_model`` / ``compensation_reply_model`` describe a success
      reply's data. All four are optional; the schema export publishes the ones given.
    * ``failures`` lists the business reasons the action may fail with, for the contracts.
    * ``when`` is a pure predicate of the context, asked once when the step's turn comes: False
      skips the step (recorded, nothing sent, never compensated). It must not depend on
      anything but the context, or a replayed decision would differ.
    """

    name: str
    participant: str
    action: str
    payload: PayloadBuilder = pass_input
    compensation: str | None = None
    compensation_payload: PayloadBuilder = pass_input
    timeout: timedelta = timedelta(seconds=10)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation_timeout: timedelta | None = None
    compensation_retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(max_attempts=10, max_backoff=timedelta(seconds=60))
    )
    compensatable: bool = True
    pivot: bool = False
    payload_model: type[Any] | None = None
    reply_model: type[Any] | None = None
    compensation_payload_model: type[Any] | None = None
    compensation_reply_model: type[Any] | None = None
    failures: tuple[str, ...] = ()
    when: Predicate | None = None

    def command_type(self, direction: Direction) -> str:
        if direction is Direction.ACTION:
            return self.action
        assert self.compensation is not None, "only steps with a compensation are compensated"
        return self.compensation

    def timeout_for(self, direction: Direction) -> timedelta:
        if direction is Direction.COMPENSATION and self.compensation_timeout is not None:
            return self.compensation_timeout
        return self.timeout

    def retry_for(self, direction: Direction) -> RetryPolicy:
        return self.retry if direction is Direction.ACTION else self.compensation_retry

    def payload_model_for(self, direction: Direction) -> type[Any] | None:
        if direction is Direction.ACTION:
            return self.payload_model
        return self.compensation_payload_model

    def reply_model_for(self, direction: Direction) -> type[Any] | None:
        return self.reply_model if direction is Direction.ACTION else self.compensation_reply_model

    def build(self, direction: Direction, ctx: SagaContext) -> Mapping[str, JSON]:
        """The command's payload as a JSON object, validated against its model if it has one;
        raises (and the engine fails the step) when the builder or the validation does."""
        builder = self.payload if direction is Direction.ACTION else self.compensation_payload
        model = self.payload_model_for(direction)
        built = builder(ctx)
        if not isinstance(built, Mapping):
            if model is not None and not isinstance(built, model):
                raise TypeError(
                    f"the builder returned {type(built).__name__}, not {model.__name__}"
                )
            return cast(Mapping[str, JSON], built.model_dump(mode="json"))
        if model is None:
            return built
        # Through JSON, as it will travel: strict models take UUIDs and times as strings there.
        valid = model.model_validate_json(dumps(built))
        return cast(Mapping[str, JSON], valid.model_dump(mode="json"))


@dataclass(frozen=True, slots=True, init=False)
class Parallel:
    """Steps that run concurrently: their actions are sent together, and the saga moves on when
    every one succeeded. A member reads only the outputs of steps before the group."""

    steps: tuple[Step, ...]

    def __init__(self, *steps: Step):
        object.__setattr__(self, "steps", tuple(steps))


@dataclass(frozen=True, slots=True)
class SagaDefinition:
    """A saga: its name, its version, its ordered steps, and optionally the model its input
    must fit (checked before a saga is started: an invalid input is refused, nothing stored).

    ``span_attributes`` names top-level input fields whose values go on the saga's spans as
    ``saga.input.<field>`` (an order number, a customer id), so a trace is found by the
    business key an operator is asked about; the saga's key is always there as ``saga.key``.

    ``steps`` is flat (a :class:`Parallel` group's members are consecutive steps); ``groups``
    holds each group's ``(first, last)`` step indexes. ``deadline`` bounds the whole forward
    run; ``on_compensation_failure`` says whether a compensation that fails for good stops the
    compensation (``halt``, the default) or lets it go on with the older steps (``continue``).
    """

    name: str
    version: int
    steps: tuple[Step, ...]
    input_model: type[Any] | None = None
    span_attributes: tuple[str, ...] = ()
    groups: tuple[tuple[int, int], ...] = ()
    deadline: timedelta | None = None
    on_compensation_failure: CompensationPolicy = CompensationPolicy.HALT
    #: per step index, the index of the last step of its unit (itself, or its group's last)
    unit_last: tuple[int, ...] = field(default=(), init=False)
    #: per step index, the index of the first step of its unit
    unit_first: tuple[int, ...] = field(default=(), init=False)
    pivot_index: int | None = field(default=None, init=False)

    def __init__(
        self,
        name: str,
        version: int,
        steps: Iterable[Step | Parallel],
        *,
        input_model: type[Any] | None = None,
        span_attributes: Iterable[str] = (),
        deadline: timedelta | None = None,
        on_compensation_failure: CompensationPolicy | str = CompensationPolicy.HALT,
        groups: Iterable[tuple[int, int]] = (),
    ):
        """``steps`` may hold :class:`Parallel` groups; ``groups`` says the same of steps given
        flat (``(first, last)`` indexes, as the ``groups`` field holds them), so that
        ``dataclasses.replace`` of a definition keeps its groups."""
        items = list(steps)
        given = [(int(a), int(b)) for a, b in groups]
        if given and any(isinstance(item, Parallel) for item in items):
            raise DefinitionError(
                name, "give groups as Parallel steps or as groups=, not both", version=version
            )
        for start, end in given:
            if not 0 <= start < end < len(items) or any(
                isinstance(item, Parallel) for item in items[start : end + 1]
            ):
                raise DefinitionError(
                    name, f"groups: ({start}, {end}) is not a run of its steps", version=version
                )
        flat: list[Step] = []
        found: list[tuple[int, int]] = []
        for item in items:
            members = item.steps if isinstance(item, Parallel) else (item,)
            start = len(flat)
            flat.extend(members)
            if isinstance(item, Parallel):
                found.append((start, len(flat) - 1))
        groups = sorted(found or given)
        first = list(range(len(flat)))
        last = list(range(len(flat)))
        for start, end in groups:
            if first[start] != start or last[end] != end:
                raise DefinitionError(name, "groups: two groups overlap", version=version)
            for i in range(start, end + 1):
                first[i], last[i] = start, end
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "steps", tuple(flat))
        object.__setattr__(self, "input_model", input_model)
        object.__setattr__(self, "span_attributes", tuple(span_attributes))
        object.__setattr__(self, "groups", tuple(groups))
        object.__setattr__(self, "deadline", deadline)
        try:
            policy = CompensationPolicy(on_compensation_failure)
        except ValueError:
            raise DefinitionError(
                name,
                f"on_compensation_failure must be one of {[p.value for p in CompensationPolicy]}, "
                f"not {on_compensation_failure!r}",
                version=version,
            ) from None
        object.__setattr__(self, "on_compensation_failure", policy)
        object.__setattr__(self, "unit_first", tuple(first))
        object.__setattr__(self, "unit_last", tuple(last))
        pivot = next((i for i, step in enumerate(flat) if step.pivot), None)
        object.__setattr__(self, "pivot_index", pivot)

    def in_group(self, index: int) -> bool:
        """Whether step ``index`` is a member of a parallel group."""
        return self.unit_first[index] != self.unit_last[index]

    def is_forward_only(self, index: int) -> bool:
        """True for the pivot and every step after it: they are never compensated."""
        pivot = self.pivot_index
        return pivot is not None and index >= pivot

    def needs_compensation(self, index: int) -> bool:
        """Whether step ``index`` is undone when the saga compensates."""
        step = self.steps[index]
        return (
            step.compensatable and step.compensation is not None and not self.is_forward_only(index)
        )

    def validate(self, participants: Iterable[str] | None = None) -> None:
        """Raise :class:`DefinitionError` naming the saga and step on the first problem."""
        name, version = self.name, self.version

        def fail(message: str, step: str | None = None) -> DefinitionError:
            return DefinitionError(name, message, version=version, step=step)

        if not NAME.fullmatch(name):
            raise fail(f"the saga name must match {NAME.pattern} (it goes on the wire)")
        if not isinstance(version, int) or version < 1:
            raise fail("version must be an integer >= 1")
        if not self.steps:
            raise fail("a saga needs at least one step")
        fields = getattr(self.input_model, "model_fields", None)
        for each in self.span_attributes:
            if not isinstance(each, str) or not each:
                raise fail(f"span_attributes names input fields; {each!r} is not a field name")
            if fields is not None and each not in fields:
                raise fail(
                    f"span_attributes: {each!r} is not a field of the input model "
                    f"{getattr(self.input_model, '__name__', '')}; choose from {sorted(fields)}"
                )
        known = None if participants is None else set(participants)
        seen: set[str] = set()
        pivots = [s.name for s in self.steps if s.pivot]
        if len(pivots) > 1:
            raise fail(f"only one step can be the pivot, found {pivots}")
        for i, step in enumerate(self.steps):
            if not isinstance(step, Step):
                raise fail(f"item #{i + 1} is a {type(step).__name__}; groups hold steps only")
            for what, value in (
                ("step name", step.name),
                ("participant", step.participant),
                ("action", step.action),
                ("compensation", step.compensation or "none"),
            ):
                if not NAME.fullmatch(value):
                    raise fail(
                        f"{what} {value!r} must match {NAME.pattern} (it goes on the wire)",
                        step.name or f"#{i + 1}",
                    )
            if step.name in seen:
                raise fail("duplicate step name", step.name)
            seen.add(step.name)
            if known is not None and step.participant not in known:
                raise fail(
                    f"unknown participant {step.participant!r}; known: {sorted(known)}", step.name
                )
            if self.is_forward_only(i):
                if step.compensation is not None:
                    role = "the pivot" if step.pivot else "after the pivot"
                    raise fail(
                        f"{role}, a step is never compensated; remove compensation "
                        f"{step.compensation!r} or move the pivot",
                        step.name,
                    )
            elif step.compensatable and step.compensation is None:
                raise fail(
                    "compensatable step has no compensation; give it compensation=... "
                    "or mark it compensatable=False if it has nothing to undo",
                    step.name,
                )
            if step.timeout <= timedelta(0) or (
                step.compensation_timeout is not None and step.compensation_timeout <= timedelta(0)
            ):
                raise fail("timeouts must be positive", step.name)
            problem = _model_problem(step)
            if problem is not None:
                raise fail(problem, step.name)
            if step.when is not None and not callable(step.when):
                raise fail("when must be a function of the saga context", step.name)
        for start, end in self.groups:
            members = [s.name for s in self.steps[start : end + 1]]
            if len(members) < 2:
                raise fail(f"a parallel group needs at least two steps, got {members}")
            if self.pivot_index is not None and end >= self.pivot_index:
                # a member past the go/no-go point could neither be compensated nor left in
                # doubt while its siblings run on: groups stay where everything can be undone
                raise fail(
                    f"parallel group {members} must come before the pivot "
                    f"{self.steps[self.pivot_index].name!r}"
                )
        if self.deadline is not None and self.deadline <= timedelta(0):
            raise fail("deadline must be positive, or None for no deadline")
        if self.input_model is not None and not _is_model(self.input_model):
            raise fail(f"input_model {self.input_model!r} is not a pydantic model class")


_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _is_model(value: object) -> bool:
    return isinstance(value, type) and all(
        hasattr(value, m) for m in ("model_validate_json", "model_dump", "model_json_schema")
    )


def _model_problem(step: Step) -> str | None:
    for what, model in (
        ("payload_model", step.payload_model),
        ("reply_model", step.reply_model),
        ("compensation_payload_model", step.compensation_payload_model),
        ("compensation_reply_model", step.compensation_reply_model),
    ):
        if model is not None and not _is_model(model):
            return f"{what} {model!r} is not a pydantic model class"
    if step.compensation is None and (
        step.compensation_payload_model is not None or step.compensation_reply_model is not None
    ):
        return "compensation models are given but the step has no compensation"
    bad = [r for r in step.failures if not _REASON.fullmatch(r)]
    if bad:
        return f"failure reasons must match {_REASON.pattern}: {bad}"
    return None


class Registry:
    """The sagas this orchestrator runs, by name and version, validated on registration.

    Every instance is built from the same code at startup on every orchestrator process, so no
    process has sagas the others do not know.
    """

    def __init__(
        self,
        definitions: Iterable[SagaDefinition] = (),
        *,
        participants: Iterable[str] | None = None,
    ):
        self.participants: frozenset[str] | None = (
            None if participants is None else frozenset(participants)
        )
        self._by_name: dict[str, dict[int, SagaDefinition]] = {}
        for definition in definitions:
            self.register(definition)

    def register(self, definition: SagaDefinition) -> SagaDefinition:
        definition.validate(self.participants)
        versions = self._by_name.get(definition.name, {})
        if definition.version in versions:
            raise DefinitionError(
                definition.name, "this version is registered already", version=definition.version
            )
        self._check_commands(definition)
        self._by_name.setdefault(definition.name, {})[definition.version] = definition
        return definition

    def _check_commands(self, definition: SagaDefinition) -> None:
        """One command type means one thing everywhere: the same participant, and no two
        different models for its payload or its reply (the contracts publish one of each)."""
        seen = {c.command_type: c for c in self.commands()}
        for c in commands_of(definition):
            other = seen.get(c.command_type)
            if other is None:
                seen[c.command_type] = c
                continue
            clash = _clash(other, c)
            if clash is not None:
                raise DefinitionError(
                    definition.name,
                    f"command {c.command_type!r} has another {clash} in saga {other.saga!r}",
                    version=definition.version,
                    step=c.step,
                )
            seen[c.command_type] = other.merged(c)

    def commands(self) -> list[CommandSpec]:
        """Every command type the registered sagas send, once, with the models declared for it
        (by any step that sends it), in saga and step order."""
        found: dict[str, CommandSpec] = {}
        for definition in self.all():
            for c in commands_of(definition):
                known = found.get(c.command_type)
                found[c.command_type] = c if known is None else known.merged(c)
        return list(found.values())

    def get(self, name: str, version: int | None = None) -> SagaDefinition:
        """The given version, or the newest one when ``version`` is None."""
        versions = self._by_name.get(name)
        if not versions:
            raise UnknownSagaError(f"no saga named {name!r} is registered (known: {self.names()})")
        if version is None:
            return versions[max(versions)]
        try:
            return versions[version]
        except KeyError:
            raise UnknownSagaError(
                f"saga {name!r} has no version {version} (registered: {sorted(versions)})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def all(self) -> list[SagaDefinition]:
        return [d for name in self.names() for _, d in sorted(self._by_name[name].items())]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def as_mapping(self) -> Mapping[str, Mapping[int, SagaDefinition]]:
        return self._by_name


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One command type as the sagas use it: who runs it and what travels with it."""

    command_type: str
    participant: str
    saga: str
    step: str
    compensates: str | None  # the action this command undoes, for a compensation
    payload_model: type[Any] | None
    reply_model: type[Any] | None
    failures: tuple[str, ...] = ()

    def merged(self, other: CommandSpec) -> CommandSpec:
        """This spec with the models and failures ``other`` declares and this one does not."""
        return CommandSpec(
            self.command_type,
            self.participant,
            self.saga,
            self.step,
            self.compensates,
            self.payload_model or other.payload_model,
            self.reply_model or other.reply_model,
            tuple(dict.fromkeys((*self.failures, *other.failures))),
        )


def _clash(one: CommandSpec, other: CommandSpec) -> str | None:
    """What two uses of one command type disagree on, if anything."""
    if one.participant != other.participant:
        return "participant"
    for what, a, b in (
        ("payload model", one.payload_model, other.payload_model),
        ("reply model", one.reply_model, other.reply_model),
    ):
        if a is not None and b is not None and a is not b:
            return what
    return None


def commands_of(definition: SagaDefinition) -> list[CommandSpec]:
    """The commands ``definition`` may send: each step's action, and its compensation."""
    found: list[CommandSpec] = []
    for i, step in enumerate(definition.steps):
        found.append(
            CommandSpec(
                step.action,
                step.participant,
                definition.name,
                step.name,
                None,
                step.payload_model,
                step.reply_model,
                step.failures,
            )
        )
        if step.compensation is not None and definition.needs_compensation(i):
            found.append(
                CommandSpec(
                    step.compensation,
                    step.participant,
                    definition.name,
                    step.name,
                    step.action,
                    step.compensation_payload_model,
                    step.compensation_reply_model,
                )
            )
    return found


def seed_for(saga_id: UUID, step: str, direction: Direction) -> tuple[object, ...]:
    """Jitter seed of one command: different for each saga, step and direction."""
    return (saga_id, step, direction.value)
