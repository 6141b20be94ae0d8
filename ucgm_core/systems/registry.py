"""The registry of training systems: one record per system, read by the job schema, the presets
and `build_objective`.

A system is a settings dataclass, whose field `kind: Literal["<kind>"]` names it in a job spec
(`objective.kind`), an objective class with the `TrainingObjective` interface, called as
`objective(transport, settings, teacher=teacher_or_None)`, and what the training loop must provide
for it. Adding a system takes one module (settings, objective, record) and one line that registers
the record; the seed systems are registered in `ucgm_core/systems/__init__.py`::

    SYSTEM = SystemRecord(kind="toy", settings=ToySettings, objective=ToyObjective)
    register(SYSTEM)

Settings classes derive from `SystemSettings`, whose `needs_*` properties ask the record, so code
that holds only the settings still learns what the system needs.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable

from ucgm_core.transports import Transport

from ucgm_core.systems.common import Network, TrainingObjective

Needs = Callable[[Any], bool]


def never(settings: Any) -> bool:
    """A need no settings of the system have."""
    return False


def always(settings: Any) -> bool:
    """A need all settings of the system have."""
    return True


@dataclass(frozen=True)
class SystemRecord:
    """One training system.

    kind: its name in a job spec (`objective.kind`); the settings' `kind` field defaults to it.
    settings: the frozen settings dataclass; objective: the TrainingObjective class built from
        (transport, settings, teacher=...).
    default_transport: the transport its presets use; transports: the only transports it is
        defined for, or None for any.
    two_time_network: the network is called with an end time r as well (DiTSettings(two_time=True)).
    forward_mode_autodiff(settings): it takes JVPs through the network (DiT: attention="math").
    needs_teacher(settings): it distils a frozen teacher network passed as `teacher=`.
    """

    kind: str
    settings: type
    objective: type
    default_transport: str = "linear"
    transports: tuple[str, ...] | None = None
    two_time_network: bool = False
    forward_mode_autodiff: Needs = never
    needs_teacher: Needs = never

    def __post_init__(self) -> None:
        is_dataclass = dataclasses.is_dataclass(self.settings)
        fields = {f.name: f for f in dataclasses.fields(self.settings)} if is_dataclass else {}
        if "kind" not in fields or fields["kind"].default != self.kind:
            raise ValueError(
                f"settings {self.settings.__name__} of system {self.kind!r} must be a dataclass with the field "
                f'kind: Literal["{self.kind}"] = "{self.kind}" (the job schema chooses the system by it)'
            )
        if self.transports is not None and self.default_transport not in self.transports:
            raise ValueError(
                f"default_transport {self.default_transport!r} of system {self.kind!r} is not among its "
                f"transports {list(self.transports)}"
            )


# kind -> record, in registration order (the job schema lists the kinds in this order).
SYSTEMS: dict[str, SystemRecord] = {}


def register(record: SystemRecord) -> SystemRecord:
    """Add `record` to SYSTEMS; registering the same record again changes nothing."""
    existing = SYSTEMS.get(record.kind)
    if existing is not None and existing != record:
        raise ValueError(
            f"system kind {record.kind!r} is taken (settings {existing.settings.__name__}); "
            "give the new system another kind"
        )
    SYSTEMS[record.kind] = record
    return record


def system(kind: str) -> SystemRecord:
    """The record of `kind`; an unknown kind raises ValueError naming the valid ones."""
    try:
        return SYSTEMS[kind]
    except KeyError:
        close = difflib.get_close_matches(str(kind), list(SYSTEMS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown system kind {kind!r}; {hint}choose one of {list(SYSTEMS)}") from None


class SystemSettings:
    """Base of every system's settings dataclass: what the system needs, asked of its record."""

    @property
    def needs_two_time_network(self) -> bool:
        return system(self.kind).two_time_network  # type: ignore[attr-defined]

    @property
    def needs_forward_mode_autodiff(self) -> bool:
        return system(self.kind).forward_mode_autodiff(self)  # type: ignore[attr-defined]


def _record_of(settings: SystemSettings) -> SystemRecord:
    kind = getattr(settings, "kind", None)
    if kind is None:
        raise ValueError(f"{settings!r} has no kind; use the settings class of one of the systems {list(SYSTEMS)}")
    record = system(kind)
    if not isinstance(settings, record.settings):
        raise ValueError(f"settings of kind {kind!r} must be {record.settings.__name__}, got {type(settings).__name__}")
    return record


def transport_problem(settings: SystemSettings, transport_name: str) -> str | None:
    """Why `transport_name` does not fit the system, or None (checked before a job starts)."""
    record = _record_of(settings)
    allowed = record.transports
    if allowed is None or transport_name in allowed:
        return None
    return (
        f"{record.kind} is defined for the transport(s) {list(allowed)}, got {transport_name!r}; "
        f"set transport: {allowed[0]}"
    )


def needs_teacher(settings: SystemSettings) -> bool:
    """Whether the system trains against a frozen teacher network (the distillation settings)."""
    return _record_of(settings).needs_teacher(settings)


def build_objective(
    settings: SystemSettings, transport: Transport, *, teacher: Network | None = None
) -> TrainingObjective:
    """The TrainingObjective of `settings.kind`, e.g. UnifiedObjective for ObjectiveSettings.

    teacher: a frozen network of the same transport (e.g. `load_model_file(path).model`), required by
    the distillation settings (sCD, Multistep CD) and refused elsewhere."""
    return _record_of(settings).objective(transport, settings, teacher=teacher)
