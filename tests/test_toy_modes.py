"""Few-step generation on a 2-D toy: 8 Gaussians on a circle, small MLPs trained on CPU.

Flow matching sampled in one step returns E[x] (the origin) for every noise, so it collapses onto
the mean; each few-step system is trained through the same loop (build_objective, target network,
extra modules, step) and must cover all 8 modes at its own 1 or 2 network evaluations.

Measures, on 2000 samples: coverage = number of modes that receive at least a quarter of their fair
share (1/32 of the samples) within 3 sigma of their centre; off-mode fraction = share of samples
farther than 3 sigma from every centre. Samples come from an EMA of the trained weights (decay 0.99,
with warm-up), as every one of these systems samples from an EMA.

Run the slow ones with `pytest -m slow tests/test_toy_modes.py -s` (they print their numbers).
Hyper-parameters are the presets' with the horizons (warm-ups, annealing, steps) scaled to ~2k
steps; deviations that the toy needs are stated in each test.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from torch import nn

from ucgm_core.ema import ModelEMA
from ucgm_core.systems.ucgm import ObjectiveSettings
from ucgm_core.sampler import SamplerSettings, sample
from ucgm_core.systems import build_objective, preset
from ucgm_core.systems import esc, multistep, scm, shortcut
from ucgm_core.time_distributions import ArctanLogNormalTime
from ucgm_core.transports import build_transport

LOGGER = logging.getLogger(__name__)

MODES = 8
RADIUS = math.sqrt(2.0)  # unit variance per coordinate (up to STD^2), as sCM's TrigFlow expects
STD = 0.1
OFF_MODE_DISTANCE = 3 * STD
MIN_MODE_SHARE = 0.25 / MODES
NUM_SAMPLES = 2000
BATCH = 512
CENTERS = torch.tensor(
    [[RADIUS * math.cos(2 * math.pi * k / MODES), RADIUS * math.sin(2 * math.pi * k / MODES)] for k in range(MODES)]
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny MLPs run fastest single-threaded, and much faster than two threads on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def mixture_data(count: int, generator: torch.Generator) -> torch.Tensor:
    mode = torch.randint(0, MODES, (count,), generator=generator)
    return CENTERS[mode] + STD * torch.randn(count, 2, generator=generator)


class ToyNetwork(nn.Module):
    """MLP F(x_t, t, labels, r=None) on [x, features(t), features(r)]; r defaults to t.

    features(s) = [s, sin(w_k s), cos(w_k s)]. "smooth": w_k = k pi, k = 1..6 (networks that are
    differentiated in t: sCM, ESC). "sharp": w_k = 2^k pi, k = 0..6, resolving 1/128 of the time
    axis (Multistep CMs must jump at segment boundaries; shortcut models read a 1/M grid)."""

    num_classes = 1

    def __init__(self, frequencies: str = "smooth", hidden: int = 128, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        if frequencies == "smooth":
            angular = math.pi * torch.arange(1, 7, dtype=torch.float32)
        else:
            angular = math.pi * 2.0 ** torch.arange(0, 7, dtype=torch.float32)
        self.register_buffer("angular", angular)
        width = 2 + 2 * (1 + 2 * angular.numel())
        self.net = nn.Sequential(
            nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2),
        )

    def features(self, time: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        time = torch.as_tensor(time, dtype=like.dtype).reshape(-1).expand(like.shape[0])
        phase = time[:, None] * self.angular.to(like.dtype)
        return torch.cat([time[:, None], torch.sin(phase), torch.cos(phase)], dim=1)

    def forward(self, x, t, labels, r=None):
        r = t if r is None else r
        return self.net(torch.cat([x, self.features(t, x), self.features(r, x)], dim=1))


def train(objective, network: nn.Module, steps: int, *, learning_rate: float = 2e-3, seed: int = 0) -> nn.Module:
    """The training-loop contract of ucgm_core.systems.common.TrainingObjective; returns the EMA copy."""
    extra = objective.extra_modules()
    parameters = list(network.parameters()) + [p for module in extra for p in module.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    target = objective.create_target_network(network) if objective.needs_target_network else None
    average = ModelEMA(network, decay=0.99, warmup=True)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(BATCH, dtype=torch.long)
    for step in range(steps):
        x = mixture_data(BATCH, generator)
        output = objective(network, target.module(network) if target else None, x, labels, generator=generator, step=step)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        if target is not None:
            target.update(network)
        average.update(network)
    return average.module


def mode_statistics(samples: torch.Tensor) -> tuple[int, float]:
    """(covered modes, off-mode fraction)."""
    distance, nearest = torch.cdist(samples.double(), CENTERS.double()).min(dim=1)
    on_mode = distance <= OFF_MODE_DISTANCE
    shares = torch.bincount(nearest[on_mode], minlength=MODES).double() / samples.shape[0]
    return int((shares >= MIN_MODE_SHARE).sum()), float(1 - on_mode.double().mean())


def sampled_modes(network, transport_name: str, settings: SamplerSettings, name: str, seed: int = 1) -> tuple[int, float]:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(NUM_SAMPLES, 2, generator=generator)
    labels = torch.zeros(NUM_SAMPLES, dtype=torch.long)
    with torch.no_grad():
        samples = sample(network, build_transport(transport_name), noise, labels, settings, generator=generator)
    coverage, off_mode = mode_statistics(samples)
    message = f"{name}: {settings.steps} NFE -> coverage {coverage}/8, off-mode {off_mode:.3f}"
    LOGGER.info(message)
    print(message)
    return coverage, off_mode


def assert_covers_all_modes(result: tuple[int, float], off_mode_bound: float) -> None:
    coverage, off_mode = result
    assert coverage == MODES and off_mode < off_mode_bound, result


def uniform_grid(steps: int) -> SamplerSettings:
    return SamplerSettings(steps=steps, boundary_gaps=(0.0, 0.0))


def multi_step_model(transport_name: str, frequencies: str = "smooth", steps: int = 2000) -> nn.Module:
    """UCGM-T lambda = 0 on `transport_name` (flow matching for linear): the multi-step model that
    few-step systems start from or distil."""
    settings = ObjectiveSettings(label_dropout=0.0, time_epsilon=1e-3 if transport_name == "vp_cosine" else 0.0)
    objective = build_objective(settings, build_transport(transport_name))
    return train(objective, ToyNetwork(frequencies), steps)


@pytest.fixture(scope="module")
def flow_matching() -> nn.Module:
    return multi_step_model("linear")


# ============================================================================ default run


def test_flow_matching_collapses_to_the_mean_in_one_step_but_not_in_many(flow_matching):
    coverage, off_mode = sampled_modes(flow_matching, "linear", uniform_grid(1), "flow matching")
    assert coverage == 0 and off_mode > 0.99
    generator = torch.Generator().manual_seed(1)
    one_step = sample(flow_matching, build_transport("linear"), torch.randn(500, 2, generator=generator), None, uniform_grid(1))
    assert float(one_step.norm(dim=1).max()) < 0.5 * RADIUS  # everything lands near E[x] = 0
    assert sampled_modes(flow_matching, "linear", uniform_grid(2), "flow matching")[1] > 0.4
    assert_covers_all_modes(sampled_modes(flow_matching, "linear", uniform_grid(32), "flow matching"), 0.1)


@pytest.mark.slow
def test_shortcut_model_covers_all_modes_in_one_and_two_steps(flow_matching):
    """Shortcut models from scratch; 128 finest steps scaled to 32, EMA decay 0.99 for 2k steps,
    a quarter of the rows self-consistent (the paper: an eighth) to propagate faster."""
    settings = shortcut.ShortcutSettings(
        finest_steps=32, self_consistency_fraction=0.25, target_ema_decay=0.99, label_dropout=0.0
    )
    network = train(build_objective(settings, build_transport("relinear")), ToyNetwork("smooth"), 2000)
    for steps in (1, 2):
        result = sampled_modes(network, "relinear", shortcut.sampler_settings(steps), "shortcut")
        assert_covers_all_modes(result, 0.55)
        assert result[1] < sampled_modes(flow_matching, "linear", uniform_grid(steps), "flow matching")[1] - 0.1


def exact_mixture_network(transport_name: str):
    """The exact multi-step model of the mixture: F of the posterior means E[x | x_t], E[z | x_t]."""
    transport = build_transport(transport_name)

    def network(x_t, network_time, labels, r=None):
        time = network_time.double()[:, None]
        c = transport.coefficients(time)
        spread = c.alpha**2 + c.gamma**2 * STD**2
        offset = x_t.double()[:, None, :] - c.gamma[:, :, None] * CENTERS.double()[None]
        weights = torch.softmax(-offset.pow(2).sum(-1) / (2 * spread), dim=1)
        within = CENTERS.double()[None] + (c.gamma * STD**2 / spread)[:, :, None] * offset
        data = (weights[:, :, None] * within).sum(1)
        noise = (x_t.double() - c.gamma * data) / c.alpha
        return transport.ideal_output(data, noise, network_time.double()).to(x_t.dtype)

    network.num_classes = 1
    return network


def test_ucgm_s_extrapolation_samples_a_multi_step_model_with_fewer_steps():
    """UCGM-S on the exact multi-step model of the mixture: at equal NFE extrapolation lowers the
    off-mode fraction, so 12 extrapolated steps beat 32 plain ones. (Uniform grid: on this toy the
    Kumaraswamy reshaping of the ImageNet preset does not help; the extrapolation is the preset's.)"""
    network = exact_mixture_network("linear")
    accelerated = preset("ucgm_accelerated").sampler
    plain = {steps: sampled_modes(network, "linear", uniform_grid(steps), "exact, plain")[1] for steps in (8, 12, 32)}
    extrapolated = {}
    for steps in (8, 12):
        settings = dataclasses.replace(accelerated, steps=steps, schedule=(1.0, 1.0, 1.0), boundary_gaps=(0.0, 0.0), extrapolation=0.6)
        extrapolated[steps] = sampled_modes(network, "linear", settings, "exact, extrapolated")[1]
    assert all(extrapolated[s] < 0.8 * plain[s] for s in (8, 12)), (plain, extrapolated)
    assert extrapolated[12] < plain[32], (plain, extrapolated)


# ============================================================================ slow: the other systems


@pytest.mark.slow
def test_ucgm_few_step_from_the_flow_matching_model_covers_all_modes_in_two_steps(flow_matching):
    """UCGM-T lambda = 1 started from the multi-step model (learning rate 5e-4, a quarter of the
    multi-step one), the derivative through the live weights; enhancement off (one class)."""
    settings = dataclasses.replace(preset("ucgm_few_step").objective, enhanced_ratio=0.0, label_dropout=0.0)
    student = ToyNetwork("smooth")
    student.load_state_dict(flow_matching.state_dict())
    network = train(build_objective(settings, build_transport("linear")), student, 1500, learning_rate=5e-4)
    sampled_modes(network, "linear", dataclasses.replace(preset("ucgm_few_step").sampler, steps=1), "UCGM few-step")
    result = sampled_modes(network, "linear", preset("ucgm_few_step").sampler, "UCGM few-step")
    assert_covers_all_modes(result, 0.4)


@pytest.fixture(scope="module")
def trigflow_model() -> nn.Module:
    return multi_step_model("trigflow")


@pytest.mark.slow
@pytest.mark.parametrize("distillation", [True, False])
def test_scm_started_from_a_trigflow_model_covers_all_modes_in_one_and_two_steps(trigflow_model, distillation):
    """sCD (teacher: the TrigFlow model) and sCT, both started from it as the paper does; times
    arctan(e^tau / 0.5), tau ~ N(-1, 1.4^2) (its CIFAR proposal), warm-up scaled to 500 steps;
    adaptive weighting, tangent normalisation as in the preset."""
    settings = dataclasses.replace(
        preset("scd" if distillation else "sct").objective,
        time_distribution=ArctanLogNormalTime(mean=-1.0, std=1.4, sigma_data=0.5),
        tangent_warmup_steps=500,
    )
    teacher = trigflow_model if distillation else None
    objective = build_objective(settings, build_transport("trigflow"), teacher=teacher)
    student = ToyNetwork("smooth")
    student.load_state_dict(trigflow_model.state_dict())
    network = train(objective, student, 2000, learning_rate=5e-4)
    name = "sCD" if distillation else "sCT"
    results = [sampled_modes(network, "trigflow", scm.sampler_settings(steps), name) for steps in (1, 2)]
    assert max(r[0] for r in results) == MODES
    assert_covers_all_modes(min(results, key=lambda r: r[1]), 0.4)


@pytest.fixture(scope="module")
def vp_cosine_model() -> nn.Module:
    return multi_step_model("vp_cosine", frequencies="sharp")


@pytest.mark.slow
@pytest.mark.parametrize("distillation", [True, False])
def test_multistep_cm_with_two_segments_covers_all_modes_in_two_steps(vp_cosine_model, distillation):
    """Multistep CD / CT with T = 2, started from the vp_cosine x-prediction model (the paper's
    fine-tuning); teacher steps annealed 16 -> 128 over the first half of training."""
    settings = dataclasses.replace(
        preset("multistep_cd" if distillation else "multistep_ct").objective,
        student_steps=2, teacher_steps_start=16, teacher_steps_end=128, teacher_anneal_steps=400,
    )
    teacher = vp_cosine_model if distillation else None
    objective = build_objective(settings, build_transport("vp_cosine"), teacher=teacher)
    student = ToyNetwork("sharp")
    student.load_state_dict(vp_cosine_model.state_dict())
    network = train(objective, student, 800, learning_rate=1e-3)
    name = "Multistep CD" if distillation else "Multistep CT"
    teacher_result = sampled_modes(vp_cosine_model, "vp_cosine", multistep.sampler_settings(2), "vp_cosine teacher")
    result = sampled_modes(network, "vp_cosine", multistep.sampler_settings(2), name)
    assert_covers_all_modes(result, 0.4)
    assert result[1] < teacher_result[1] - 0.1


@pytest.mark.slow
def test_esc_covers_all_modes_in_one_step(flow_matching):
    """ESC from scratch. Toy deviations (measured on this toy at 2k steps, where each made 1-NFE
    samples worse): no plug-in velocity, no learned weight; no tangent warm-up (it is for fine-tuning), progressive endpoint sampler over the first 1000 steps,
    no training-time guidance (one class)."""
    settings = dataclasses.replace(
        preset("esc").objective,
        plug_in_probability=0.0, adaptive_weighting=False,
        tangent_warmup_steps=0, endpoint_zero_steps=1000, guidance_mixing=0.0, label_dropout=0.0,
    )
    network = train(build_objective(settings, build_transport("linear")), ToyNetwork("smooth"), 2000)
    result = sampled_modes(network, "linear", esc.sampler_settings(1), "ESC")
    sampled_modes(network, "linear", esc.sampler_settings(2), "ESC")
    assert_covers_all_modes(result, 0.4)
