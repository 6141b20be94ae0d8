"""Adding a training system is one module and one registry line: a toy system (its own settings
dataclass and a tiny flow-matching objective) registered here is built by `build_objective`, checked
against its transports, and accepted by the job schema as `objective.kind: toy`."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

from ucgm_core.ema import TargetNetwork
from ucgm_core.systems import (
    SYSTEMS,
    SystemRecord,
    SystemSettings,
    TrainingObjective,
    build_objective,
    needs_teacher,
    register,
    system,
    transport_problem,
)
from ucgm_core.systems.checks import refuse_teacher
from ucgm_core.systems.common import ObjectiveOutput, draw_time, noised_batch, per_sample_mean_square
from ucgm_core.time_distributions import UniformTime
from ucgm_core.transports import Transport, build_transport

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the toy system (one module)


@dataclass(frozen=True)
class ToySettings(SystemSettings):
    """Flow matching with a scaled loss."""

    kind: Literal["toy"] = "toy"
    scale: float = 1.0


class ToyObjective:
    """loss = scale * mean((F - F*)^2) at t ~ U(0, 1), without label dropout."""

    needs_target_network = False

    def __init__(self, transport: Transport, settings: ToySettings | None = None, *, teacher=None) -> None:
        refuse_teacher(teacher, "the toy system")
        self.transport, self.settings = transport, settings or ToySettings()

    def create_target_network(self, model: nn.Module) -> TargetNetwork:
        return TargetNetwork.create("live", model)

    def extra_modules(self) -> list[nn.Module]:
        return []

    def __call__(
        self, network, target_network, x, labels, *, generator, num_classes=None, step=None
    ) -> ObjectiveOutput:
        time = draw_time(UniformTime(), x, generator)
        batch = noised_batch(self.transport, x, labels, time, generator=generator, null_label=0, label_dropout=0.0)
        output = network(batch.x_time, self.transport.network_time(time), batch.labels)
        target = self.transport.ideal_output(x, batch.noise, time)
        loss = self.settings.scale * per_sample_mean_square(output - target).mean()
        return ObjectiveOutput(loss=loss, metrics={"loss": loss.detach()})


TOY = SystemRecord(kind="toy", settings=ToySettings, objective=ToyObjective, transports=("linear", "relinear"))


# ----------------------------------------------------------------------------- tests


@pytest.fixture
def toy_registered():
    register(TOY)  # the one registry line
    yield TOY
    SYSTEMS.pop(TOY.kind)  # leave the registry as the other tests expect it


def test_build_objective_builds_a_registered_toy_system(toy_registered):
    objective = build_objective(ToySettings(scale=2.0), build_transport("linear"))
    assert isinstance(objective, ToyObjective) and isinstance(objective, TrainingObjective)
    network = nn.Linear(3, 3).double()
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(8, dtype=torch.long)
    out = objective(lambda x_t, t, labels: network(x_t), None, x, labels, generator=torch.Generator())
    out.loss.backward()
    assert torch.isfinite(out.loss) and network.weight.grad is not None


def test_the_toy_record_answers_what_the_system_needs(toy_registered):
    settings = ToySettings()
    assert system("toy") is TOY and list(SYSTEMS)[-1] == "toy"
    assert not settings.needs_two_time_network and not settings.needs_forward_mode_autodiff
    assert not needs_teacher(settings)
    assert transport_problem(settings, "relinear") is None
    assert "set transport: linear" in transport_problem(settings, "trigflow")
    with pytest.raises(ValueError, match="trains without a teacher"):
        build_objective(settings, build_transport("linear"), teacher=nn.Identity())


def test_a_kind_is_registered_once_and_must_match_its_settings(toy_registered):
    register(TOY)  # the same record again changes nothing
    with pytest.raises(ValueError, match="kind 'toy' is taken"):
        register(SystemRecord(kind="toy", settings=ToySettings, objective=nn.Identity))
    with pytest.raises(ValueError, match='kind: Literal\\["toi"\\]'):
        SystemRecord(kind="toi", settings=ToySettings, objective=ToyObjective)
    with pytest.raises(ValueError, match="did you mean 'toy'"):
        system("toi")


def test_the_job_schema_accepts_a_system_registered_before_it_is_imported():
    """orchestrator.config builds its `objective:` union from the registry when it is imported, so a
    new system is registered first (as a plug-in module would be); a fresh interpreter shows it."""
    script = "\n".join(
        [
            "import sys",
            f"sys.path.insert(0, {str(ROOT / 'tests')!r})",
            "import test_system_registry as toy",
            "from ucgm_core.systems import register",
            "register(toy.TOY)",
            "from orchestrator.config import ConfigError, load_job",
            "config = load_job(None, ['objective.kind=toy', 'objective.scale=2.5'])",
            "assert type(config.objective).__name__ == 'ToySettings' and config.objective.scale == 2.5",
            "assert config.to_flat_dict()['objective.kind'] == 'toy'",
            "try:",
            "    load_job(None, ['objective.kind=toy', 'transport=trigflow'])",
            "except ConfigError as error:",
            "    assert 'set transport: linear' in str(error), error",
            "else:",
            "    raise AssertionError('the toy system accepted a transport outside its record')",
        ]
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
