"""The seed systems (ucgm_core/systems): each target checked against the exact flow map of Gaussian
data, derivatives against float64 finite differences, samplers against hand-written loops.

For data N(m, s^2 I) and a path x_t = alpha(t) z + gamma(t) x, x_t ~ N(gamma m, sigma_t^2 I) with
sigma_t^2 = alpha^2 + gamma^2 s^2, and the probability-flow ODE carries quantiles, so its flow map
between any two times is affine: Phi_{t->r}(y) = gamma(r) m + (sigma_r / sigma_t)(y - gamma(t) m).
The posterior means are E[x | y] = m + gamma s^2 (y - gamma m) / sigma^2 and
E[z | y] = alpha (y - gamma m) / sigma^2; the ODE velocity is alpha' E[z|y] + gamma' E[x|y].
Everything below is computed from these formulas, independently of the library's jump helpers.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from ucgm_core.dit import DiTSettings, build_dit
from ucgm_core.sampler import SamplerSettings, sample, time_grid
from ucgm_core.systems import (
    PRESETS,
    SYSTEMS,
    AdaptiveWeight,
    ContinuousConsistencySettings,
    ExplicitShortcutSettings,
    MultistepConsistencySettings,
    ObjectiveSettings,
    ShortcutSettings,
    TrainingObjective,
    UnifiedObjective,
    build_objective,
    needs_teacher,
    preset,
    system,
)
from ucgm_core.systems import esc, multistep, scm, shortcut
from ucgm_core.systems.common import inverse_ddim, jump, output_for_jump
from ucgm_core.transports import build_transport

DTYPE = torch.float64
MEAN, STD = 0.3, 0.6
DIM = 3


def rows(t):
    return t.reshape(-1, 1)


def library_time(transport, network_time):
    """Invert network_time for the transports used here (identity, or 1 - t for relinear)."""
    return 1 - network_time if transport.name == "relinear" else network_time


class Gaussian:
    """Closed forms for data N(MEAN, STD^2 I) on a transport's path (see the module docstring)."""

    def __init__(self, transport):
        self.transport = transport

    def coefficients(self, t):
        c = self.transport.coefficients(rows(t))
        return c, torch.sqrt(c.alpha**2 + c.gamma**2 * STD**2)

    def flow_map(self, y, t, r):
        (c_t, sigma_t), (c_r, sigma_r) = self.coefficients(t), self.coefficients(r)
        return c_r.gamma * MEAN + sigma_r / sigma_t * (y - c_t.gamma * MEAN)

    def posterior_means(self, y, t):
        c, sigma = self.coefficients(t)
        return MEAN + c.gamma * STD**2 * (y - c.gamma * MEAN) / sigma**2, c.alpha * (y - c.gamma * MEAN) / sigma**2

    def velocity(self, y, t):
        """dx_t/dt of the probability-flow ODE."""
        c, _ = self.coefficients(t)
        data, noise = self.posterior_means(y, t)
        return c.d_alpha * noise + c.d_gamma * data

    def output(self, data, noise, t):
        """The transport's F for the pair (x_hat, z_hat) = (data, noise): alpha_hat z + gamma_hat x."""
        c, _ = self.coefficients(t)
        return c.alpha_hat * noise + c.gamma_hat * data

    def output_with_data_prediction(self, y, t, data):
        c, _ = self.coefficients(t)
        return self.output(data, (y - c.gamma * data) / c.alpha, t)

    def consistency_network(self, y, network_time, labels, r=None):
        """F whose data prediction is Phi_{t->0}(y): the exact consistency model."""
        t = library_time(self.transport, network_time)
        return self.output_with_data_prediction(y, t, self.flow_map(y, t, torch.zeros_like(t)))

    def denoiser_network(self, y, network_time, labels, r=None):
        """F of the posterior means: the exact multi-step (diffusion / flow-matching) model."""
        t = library_time(self.transport, network_time)
        return self.output(*self.posterior_means(y, t), t)

    def two_time_network(self, y, network_time, labels, r=None):
        """F that jumps exactly from t to r: x_r = gamma(r) x_hat + alpha(r) z_hat = Phi_{t->r}(y).
        Solved by hand: with x_hat = (y - alpha z_hat) / gamma ... written through the posterior-free
        form x_hat = (x_r - (alpha_r/alpha_t) y) / (gamma_r - gamma_t alpha_r/alpha_t)."""
        t = library_time(self.transport, network_time)
        end = library_time(self.transport, r)
        (c_t, _), (c_r, _) = self.coefficients(t), self.coefficients(end)
        ratio = c_r.alpha / c_t.alpha
        data = (self.flow_map(y, t, end) - ratio * y) / (c_r.gamma - c_t.gamma * ratio)
        return self.output_with_data_prediction(y, t, data)


def smooth_network(seed=0, dim=DIM):
    """A small smooth float64 MLP network(x, t, labels, r=None) with num_classes = 2."""
    torch.manual_seed(seed)

    class Net(nn.Module):
        num_classes = 2

        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(dim + 2, 16)
            self.label = nn.Embedding(3, 16)
            self.out = nn.Linear(16, dim)
            self.to(DTYPE)

        def forward(self, x, t, labels, r=None):
            r = t if r is None else r
            h = self.inp(torch.cat([x, rows(t).to(x.dtype), rows(r).to(x.dtype)], dim=1)) + self.label(labels)
            return self.out(torch.tanh(h)) + torch.sin(2 * rows(t)) * x

    return Net()


def points(batch=6, seed=0, low=0.15, high=0.85):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, DIM, generator=generator, dtype=DTYPE)
    t = low + (high - low) * torch.rand(batch, generator=generator, dtype=DTYPE)
    return y, t, torch.zeros(batch, dtype=torch.long)


# ============================================================================ jumps


@pytest.mark.parametrize("name", ["linear", "relinear", "trigflow", "vp_cosine", "edm"])
def test_jump_of_the_exact_two_time_output_lands_on_the_flow_map_and_inverts(name):
    transport = build_transport(name)
    gaussian = Gaussian(transport)
    y, t, labels = points()
    r = t * 0.4
    output = gaussian.two_time_network(y, transport.network_time(t), labels, r=transport.network_time(r))
    landed = jump(transport, output, y, t, r)
    torch.testing.assert_close(landed, gaussian.flow_map(y, t, r), rtol=0, atol=1e-12)
    torch.testing.assert_close(output_for_jump(transport, y, t, landed, r), output, rtol=1e-10, atol=1e-10)


def test_linear_jump_is_the_average_velocity_step():
    transport = build_transport("linear")
    y, t, _ = points()
    output = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    r = 0.5 * t
    torch.testing.assert_close(jump(transport, output, y, t, r), y - rows(t - r) * output, rtol=0, atol=1e-12)


def test_inverse_ddim_matches_the_paper_formula_on_vp_cosine():
    """invDDIM_{t->s}(z_s, z_t) = (z_s - (sigma_s/sigma_t) z_t) / (alpha_s - alpha_t sigma_s/sigma_t)
    with the paper's alpha = cos, sigma = sin of (pi/2) t."""
    transport = build_transport("vp_cosine")
    y, t, _ = points()
    s = 0.5 * t
    z_s = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    a_t, s_t = torch.cos(math.pi / 2 * rows(t)), torch.sin(math.pi / 2 * rows(t))
    a_s, s_s = torch.cos(math.pi / 2 * rows(s)), torch.sin(math.pi / 2 * rows(s))
    expected = (z_s - s_s / s_t * y) / (a_s - a_t * s_s / s_t)
    torch.testing.assert_close(inverse_ddim(transport, z_s, y, t, s), expected, rtol=1e-12, atol=1e-12)


# ============================================================================ sCM


def test_scm_tangent_equals_float64_central_difference_of_the_consistency_function():
    """g (warm-up 1) = cos(theta) d/dtheta f(x + theta' v, theta + theta') with f = cos x - sin F."""
    transport = build_transport("trigflow")
    network = smooth_network()
    y, t, labels = points()
    velocity = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    with torch.no_grad():
        _, tangent = scm.trigflow_tangent(network, transport, y, t, velocity, labels)

        def consistency(x, angle):
            output = network(x, angle / (math.pi / 2), labels)
            return torch.cos(rows(angle)) * x - torch.sin(rows(angle)) * output

        angle, step = math.pi / 2 * t, 1e-5
        difference = (consistency(y + step * velocity, angle + step) - consistency(y - step * velocity, angle - step)) / (2 * step)
    expected = torch.cos(rows(angle)) * difference
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(tangent, expected, rtol=0, atol=1e-8)


def test_scm_tangent_warmup_scales_only_the_derivative_term():
    transport = build_transport("trigflow")
    network = smooth_network()
    y, t, labels = points()
    velocity = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    with torch.no_grad():
        output, full = scm.trigflow_tangent(network, transport, y, t, velocity, labels, warmup=1.0)
        _, none = scm.trigflow_tangent(network, transport, y, t, velocity, labels, warmup=0.0)
        _, part = scm.trigflow_tangent(network, transport, y, t, velocity, labels, warmup=0.3)
    cos = torch.cos(math.pi / 2 * rows(t))
    torch.testing.assert_close(none, -(cos**2) * (output - velocity), rtol=0, atol=1e-12)
    torch.testing.assert_close(part, none + 0.3 * (full - none), rtol=0, atol=1e-12)


def test_scm_tangent_of_the_exact_consistency_model_is_zero_along_the_exact_ode():
    transport = build_transport("trigflow")
    gaussian = Gaussian(transport)
    y, t, labels = points()
    angle_velocity = gaussian.velocity(y, t) / (math.pi / 2)  # dx/dtheta
    with torch.no_grad():
        _, tangent = scm.trigflow_tangent(gaussian.consistency_network, transport, y, t, angle_velocity, labels)
        _, control = scm.trigflow_tangent(gaussian.consistency_network, transport, y, t, angle_velocity + 0.3, labels)
    assert tangent.abs().max() < 1e-12
    assert control.abs().max() > 1e-2


def test_scm_tangent_normalisation_divides_by_rms_plus_constant():
    tangent = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=DTYPE)
    normalised = scm.normalize_tangent(tangent, 0.1)
    rms = math.sqrt((9 + 16) / 2)
    torch.testing.assert_close(normalised[0], tangent[0] / (rms + 0.1))
    assert torch.equal(normalised[1], tangent[1])
    assert torch.equal(scm.normalize_tangent(tangent, 0.0), tangent)


def test_scd_with_the_exact_teacher_and_student_has_zero_loss_and_a_perturbed_student_does_not():
    transport = build_transport("trigflow")
    gaussian = Gaussian(transport)

    def teacher(y, network_time, labels, r=None):  # a TrigFlow model predicts dx/dtheta
        return gaussian.denoiser_network(y, network_time, labels)

    settings = ContinuousConsistencySettings(distillation=True, adaptive_weighting=False)
    objective = build_objective(settings, transport, teacher=teacher)
    x = MEAN + STD * torch.randn(64, DIM, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    labels = torch.zeros(64, dtype=torch.long)
    out = objective(gaussian.consistency_network, None, x, labels, generator=torch.Generator().manual_seed(1), num_classes=1)
    assert out.loss < 1e-24

    def perturbed(y, network_time, labels, r=None):
        return gaussian.consistency_network(y, network_time, labels) + 0.1 * y

    out = objective(perturbed, None, x, labels, generator=torch.Generator().manual_seed(1), num_classes=1)
    assert out.loss > 1e-4


def test_sct_step_argument_warms_the_tangent_up():
    transport = build_transport("trigflow")
    objective = build_objective(ContinuousConsistencySettings(tangent_warmup_steps=100), transport)
    network = smooth_network()
    x = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    labels = torch.zeros(8, dtype=torch.long)

    def run(step):
        return objective(network, None, x, labels, generator=torch.Generator().manual_seed(1), step=step).metrics

    assert float(run(0)["tangent_warmup"]) == 0.0
    assert float(run(25)["tangent_warmup"]) == 0.25
    assert float(run(None)["tangent_warmup"]) == 1.0 == float(run(500)["tangent_warmup"])
    assert float(run(0)["tangent_rms"]) != float(run(None)["tangent_rms"])


def test_scm_adaptive_weight_is_an_extra_module_trained_by_the_loss():
    transport = build_transport("trigflow")
    objective = build_objective(ContinuousConsistencySettings(), transport)
    (weight,) = objective.extra_modules()
    assert isinstance(weight, AdaptiveWeight)
    weight.to(DTYPE)
    network = smooth_network()
    x = torch.randn(16, DIM, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    out = objective(network, None, x, torch.zeros(16, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert weight.linear.weight.grad is not None and weight.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in network.parameters())
    assert build_objective(ContinuousConsistencySettings(adaptive_weighting=False), transport).extra_modules() == []


def test_adaptive_weighting_is_minimised_at_the_log_of_the_loss():
    """exp(-w) L + w has its minimum over w at w = log L: fit w for two constant loss levels."""
    weight = AdaptiveWeight(times=1, frequencies=4).to(DTYPE)
    optimizer = torch.optim.Adam(weight.parameters(), lr=0.05)
    time = torch.tensor([0.25, 0.75], dtype=DTYPE)
    losses = torch.tensor([0.5, 4.0], dtype=DTYPE)
    for _ in range(1500):
        log_weight = weight(time)
        objective = (torch.exp(-log_weight) * losses + log_weight).sum()
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
    torch.testing.assert_close(weight(time).detach(), losses.log(), rtol=0, atol=1e-3)


def test_scm_sampler_is_one_step_or_two_steps_renoised_at_one_point_one_radians():
    one, two = scm.sampler_settings(1), scm.sampler_settings(2)
    assert time_grid(one).tolist() == [1.0, 0.0]
    middle = float(time_grid(two)[1]) * math.pi / 2
    assert abs(middle - 1.1) < 1e-12 and two.stochasticity == 1.0
    transport = build_transport("trigflow")
    gaussian = Gaussian(transport)
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    samples = sample(gaussian.consistency_network, transport, noise, None, two, generator=torch.Generator().manual_seed(1))
    assert abs(float(samples.mean()) - MEAN) < 0.03 and abs(float(samples.std()) - STD) < 0.03


# ============================================================================ Multistep CM


def multistep_exact_network(gaussian, segments):
    """The exact Multistep CM: at t in (t_step, t_step + 1/T] the data prediction whose DDIM step
    lands on Phi_{t -> t_step}(y) (paper eq. 7 with the exact trajectory)."""

    def network(y, network_time, labels, r=None):
        t = network_time
        start = torch.ceil(t * segments - 1e-9) / segments - 1 / segments
        (c_t, _), (c_s, _) = gaussian.coefficients(t), gaussian.coefficients(start)
        ratio = c_s.alpha / c_t.alpha
        data = (gaussian.flow_map(y, t, start) - ratio * y) / (c_s.gamma - c_t.gamma * ratio)
        return gaussian.output_with_data_prediction(y, t, data)

    return network


@pytest.mark.parametrize("addim_eta", [0.0, 0.75])
def test_multistep_target_with_as_many_segments_as_teacher_steps_is_the_teacher_data_prediction(addim_eta):
    """T = N: the teacher step lands on the segment start, so x_target = invDDIM(aDDIM(x_teacher)) =
    x_teacher for DDIM (eta 0), whatever the student; with eta > 0 only the aDDIM inflation differs."""
    transport = build_transport("vp_cosine")
    y, _, labels = points()
    segments = 4
    t = torch.tensor([0.25, 0.5, 0.75, 1.0, 0.5, 1.0], dtype=DTYPE)
    start = t - 1 / segments
    teacher_data = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    student = smooth_network()
    with torch.no_grad():
        target = multistep.multistep_target(
            transport, student, y, t, start, start, teacher_data, labels,
            data_variance=torch.full_like(t, 0.2 * addim_eta),
        )
    if addim_eta == 0.0:
        torch.testing.assert_close(target, teacher_data, rtol=1e-10, atol=1e-10)
    else:
        assert (target - teacher_data).abs().max() > 1e-3


def test_multistep_distillation_with_t_equal_n_trains_the_student_to_the_teacher_ddim_steps():
    """Objective level: T = N = 4, eta 0, student = teacher: x_hat = x_target, zero loss."""
    transport = build_transport("vp_cosine")
    teacher = smooth_network(seed=3)
    settings = MultistepConsistencySettings(
        distillation=True, student_steps=4, teacher_steps_start=4, teacher_steps_end=4, addim_eta=0.0, loss_constant=0.0
    )
    objective = build_objective(settings, transport, teacher=teacher)
    x = torch.randn(32, DIM, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    labels = torch.zeros(32, dtype=torch.long)
    # the distance is a per-sample RMSE, so float64 round-off shows as ~1e-16
    assert objective(teacher, None, x, labels, generator=torch.Generator().manual_seed(1)).loss < 1e-12
    assert objective(smooth_network(seed=4), None, x, labels, generator=torch.Generator().manual_seed(1)).loss > 1e-3


def test_multistep_sampler_is_t_ddim_steps_and_reproduces_the_teacher_n_step_ddim():
    transport = build_transport("vp_cosine")
    teacher = smooth_network(seed=3)
    noise = torch.randn(5, DIM, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    labels = torch.zeros(5, dtype=torch.long)
    steps = 4
    result = sample(teacher, transport, noise, labels, multistep.sampler_settings(steps))
    z = noise
    for i in range(steps):  # the paper's Algorithm 2, written out with alpha = cos, sigma = sin
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        x_hat = teacher(z, torch.full((5,), t, dtype=DTYPE), labels)  # x-prediction
        a_t, s_t, a_s, s_s = (f(math.pi / 2 * u) for f, u in ((math.cos, t), (math.sin, t), (math.cos, s), (math.sin, s)))
        z = a_s * x_hat + s_s / s_t * (z - a_t * x_hat)
    torch.testing.assert_close(result, x_hat, rtol=1e-10, atol=1e-10)


def test_multistep_target_of_the_exact_model_has_second_order_residual_in_the_teacher_step():
    """Exact student (segment flow maps) and exact denoiser teacher: the DDIM teacher step is the only
    approximation, with local error O(h^2), so halving h quarters the residual at fixed (t, t_step)."""
    transport = build_transport("vp_cosine")
    gaussian = Gaussian(transport)
    segments = 2
    student = multistep_exact_network(gaussian, segments)
    y, _, labels = points()
    t = torch.full((6,), 0.75, dtype=DTYPE)
    start = torch.full((6,), 0.5, dtype=DTYPE)
    exact = transport.predictions(student(y, t, labels), y, t)[0]
    residuals = []
    for teacher_steps in (16, 32, 64):
        h = 1 / teacher_steps
        teacher_data = gaussian.posterior_means(y, t)[0]
        with torch.no_grad():
            target = multistep.multistep_target(transport, student, y, t, t - h, start, teacher_data, labels)
        residuals.append(float((target - exact).abs().max()))
    assert residuals[0] > 1e-6
    for coarse, fine in zip(residuals, residuals[1:]):
        assert 0.2 < fine / coarse < 0.3, residuals


def test_multistep_teacher_steps_anneal_exponentially():
    settings = MultistepConsistencySettings(teacher_steps_start=64, teacher_steps_end=1280, teacher_anneal_steps=100)
    assert settings.teacher_steps(0) == 64 and settings.teacher_steps(100) == 1280 == settings.teacher_steps(None)
    assert settings.teacher_steps(50) == round(64 * math.sqrt(20))
    assert settings.steps_per_segment(0) == 8


def test_addim_inflates_the_noise_norm_by_the_posterior_variance():
    """|z_s|^2 = |gamma_s x|^2 + (alpha_s^2 + D jump_var / |eps|^2) |eps|^2 when x and eps are orthogonal."""
    transport = build_transport("vp_cosine")
    x_hat = torch.tensor([[1.0, 0.0]], dtype=DTYPE)
    noise = torch.tensor([[0.0, 2.0]], dtype=DTYPE)
    t, s = torch.tensor([0.8], dtype=DTYPE), torch.tensor([0.6], dtype=DTYPE)
    c_t, c_s = transport.coefficients(t), transport.coefficients(s)
    z_t = c_t.gamma * x_hat + c_t.alpha * noise
    variance = torch.tensor([0.3], dtype=DTYPE)
    z_s = multistep.adjusted_ddim_step(transport, x_hat, z_t, t, s, variance)
    jump_variance = (c_s.gamma - c_t.gamma * c_s.alpha / c_t.alpha) ** 2 * variance
    expected = c_s.gamma**2 + c_s.alpha**2 * 4 + 2 * jump_variance
    torch.testing.assert_close(z_s.pow(2).sum(), expected.sum(), rtol=1e-12, atol=0)
    ddim = multistep.adjusted_ddim_step(transport, x_hat, z_t, t, s, torch.zeros(1, dtype=DTYPE))
    torch.testing.assert_close(ddim, c_s.gamma * x_hat + c_s.alpha * noise, rtol=0, atol=1e-12)


# ============================================================================ shortcut models


def test_shortcut_self_consistency_target_of_the_exact_flow_map_is_the_exact_double_step():
    transport = build_transport("relinear")
    gaussian = Gaussian(transport)
    y, t, labels = points(low=0.5, high=1.0)
    step = torch.tensor([1, 2, 4, 8, 16, 32], dtype=DTYPE) / 64
    middle, end = t - step, t - 2 * step
    with torch.no_grad():
        target = shortcut.self_consistency_target(transport, gaussian.two_time_network, y, t, middle, end, labels)
    double_step = gaussian.two_time_network(y, transport.network_time(t), labels, r=transport.network_time(end))
    torch.testing.assert_close(target, double_step, rtol=0, atol=1e-12)
    # in the paper's terms the target is the mean of the two half-step velocities
    first = gaussian.two_time_network(y, 1 - t, labels, r=1 - middle)
    second = gaussian.two_time_network(y + rows(step) * first, 1 - middle, labels, r=1 - end)
    torch.testing.assert_close(target, (first + second) / 2, rtol=0, atol=1e-12)


def test_shortcut_objective_with_the_exact_flow_map_has_zero_self_consistency_residual():
    transport = build_transport("relinear")
    gaussian = Gaussian(transport)
    settings = ShortcutSettings(finest_steps=16, self_consistency_fraction=0.5, target_clip=0.0, target_network="live")
    objective = build_objective(settings, transport)
    x = MEAN + STD * torch.randn(64, DIM, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    out = objective(gaussian.two_time_network, None, x, torch.zeros(64, dtype=torch.long), generator=torch.Generator().manual_seed(1), num_classes=1)
    assert out.metrics["self_consistency_mse"] < 1e-24
    assert out.metrics["flow_matching_mse"] > 1e-3  # per-sample velocities are noisy targets


def test_shortcut_times_cover_every_level_on_the_grid():
    objective = shortcut.ShortcutObjective(build_transport("relinear"), ShortcutSettings(finest_steps=8, self_consistency_fraction=0.5))
    t, s, r, count = objective.draw_times(48, torch.Generator().manual_seed(0), torch.device("cpu"), DTYPE)
    assert count == 24
    big = (t - r)[:count] * 8
    assert sorted(set(big.round().tolist())) == [2.0, 4.0, 8.0]
    torch.testing.assert_close(s[:count], t[:count] - (t - r)[:count] / 2)
    assert bool(((t * 8).round() == t * 8).all()) and bool((r >= 0).all()) and bool((t <= 1).all())
    torch.testing.assert_close((t - r)[count:], torch.full((24,), 1 / 8, dtype=DTYPE))


def test_shortcut_sampler_takes_k_euler_steps_told_their_end_time():
    transport = build_transport("relinear")
    calls = []

    def network(x, network_time, labels, r=None):
        calls.append((float(network_time[0]), float(r[0])))
        return torch.tanh(x) + rows(network_time) - rows(r)

    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    result = sample(network, transport, noise, None, shortcut.sampler_settings(4))
    x = noise
    for k in range(4):  # the paper's sampler: tau = k/4, x <- x + d s(x, tau, d)
        x = x + 0.25 * network(x, torch.full((4,), k / 4, dtype=DTYPE), None, r=torch.full((4,), (k + 1) / 4, dtype=DTYPE))
    torch.testing.assert_close(result, x, rtol=1e-12, atol=1e-12)
    assert [c for c in calls[:4]] == [(k / 4, (k + 1) / 4) for k in range(4)]


# ============================================================================ ESC


def test_esc_target_of_the_exact_average_velocity_along_the_exact_velocity_is_exact():
    transport = build_transport("linear")
    gaussian = Gaussian(transport)
    y, t, labels = points()
    r = torch.tensor([0.0, 0.1, 0.3, 0.05, 0.5, 0.0], dtype=DTYPE) * t
    with torch.no_grad():
        target = esc.mean_flow_target(gaussian.two_time_network, transport, y, t, r, gaussian.velocity(y, t), labels)
        control = esc.mean_flow_target(gaussian.two_time_network, transport, y, t, r, gaussian.velocity(y, t) + 0.2, labels)
    exact = gaussian.two_time_network(y, t, labels, r=r)
    torch.testing.assert_close(target, exact, rtol=0, atol=1e-10)
    assert (control - exact).abs().max() > 1e-2


def test_esc_target_derivative_equals_a_float64_central_difference():
    transport = build_transport("linear")
    network = smooth_network()
    y, t, labels = points()
    r = 0.4 * t
    velocity = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    with torch.no_grad():
        target = esc.mean_flow_target(network, transport, y, t, r, velocity, labels)
        h = 1e-6
        difference = (network(y + h * velocity, t + h, labels, r=r) - network(y - h * velocity, t - h, labels, r=r)) / (2 * h)
    torch.testing.assert_close(target, velocity - rows(t - r) * difference, rtol=0, atol=1e-8)


def test_plug_in_velocity_is_the_marginal_velocity_of_the_batch_distribution():
    """Brute force: for data atoms x_i, p(i | y) ~ N(y; gamma x_i, alpha^2 I), E[x|y] = sum p_i x_i."""
    transport = build_transport("linear")
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(7, 2, generator=generator, dtype=DTYPE)
    y = torch.randn(7, 2, generator=generator, dtype=DTYPE)
    t = 0.2 + 0.6 * torch.rand(7, generator=generator, dtype=DTYPE)
    labels = torch.tensor([0, 0, 1, 1, 0, 2, 2])  # 2 is the null label: mixes over every atom
    plugged = esc.plug_in_velocity(transport, data, y, t, labels, null_label=2)
    for j in range(7):
        atoms = [i for i in range(7) if labels[j] == 2 or labels[i] == labels[j]]
        log_p = torch.stack([-((y[j] - (1 - t[j]) * data[i]) ** 2).sum() / (2 * t[j] ** 2) for i in atoms])
        p = torch.softmax(log_p, 0)
        mean_data = sum(p[k] * data[i] for k, i in enumerate(atoms))
        mean_noise = (y[j] - (1 - t[j]) * mean_data) / t[j]
        torch.testing.assert_close(plugged[j], mean_noise - mean_data, rtol=1e-10, atol=1e-10)


def test_esc_times_follow_the_instantaneous_fraction_and_the_progressive_endpoint():
    settings = ExplicitShortcutSettings(instantaneous_fraction=0.75, endpoint_zero_steps=100)
    objective = esc.ExplicitShortcutObjective(build_transport("linear"), settings)
    generator = torch.Generator().manual_seed(0)
    t, r = objective.draw_times(20000, generator, torch.device("cpu"), DTYPE, step=None)
    assert bool((r <= t).all())
    assert abs(float((r == t).double().mean()) - 0.75) < 0.01
    assert float((r == 0).double().mean()) == 0.0
    t, r = objective.draw_times(20000, generator, torch.device("cpu"), DTYPE, step=0)
    assert abs(float((r == 0).double().mean()) - 0.25) < 0.01  # every r != t row goes to 0 at step 0
    assert settings.endpoint_zero_probability(50) == pytest.approx(math.acos(0.5) / (math.pi / 2))


def test_esc_sampler_is_one_jump_from_noise_to_data():
    transport = build_transport("linear")
    seen = []

    def network(x, network_time, labels, r=None):
        seen.append((network_time.tolist(), r.tolist()))
        return 0.5 * x + 1.0

    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    result = sample(network, transport, noise, None, esc.sampler_settings(1))
    torch.testing.assert_close(result, noise - (0.5 * noise + 1.0), rtol=0, atol=1e-12)
    assert seen == [([1.0] * 3, [0.0] * 3)]


def test_esc_gradient_reaches_network_and_weight_only():
    transport = build_transport("linear")
    objective = build_objective(ExplicitShortcutSettings(), transport)
    (weight,) = objective.extra_modules()
    weight.to(DTYPE)
    network = smooth_network()
    x = torch.randn(16, DIM, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    labels = torch.tensor([0, 1] * 8)
    out = objective(network, None, x, labels, generator=torch.Generator().manual_seed(1), step=5)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in network.parameters()) and weight.linear.bias.grad is not None


# ============================================================================ registry and settings


def test_build_objective_returns_the_objective_of_each_registered_kind():
    expected = {
        "ucgm": (UnifiedObjective, "linear"),
        "scm": (scm.ContinuousConsistencyObjective, "trigflow"),
        "multistep_cm": (multistep.MultistepConsistencyObjective, "vp_cosine"),
        "shortcut": (shortcut.ShortcutObjective, "relinear"),
        "esc": (esc.ExplicitShortcutObjective, "linear"),
    }
    assert list(SYSTEMS) == list(expected)  # UCGM-T first: the job schema's default kind
    for kind, record in SYSTEMS.items():
        settings = record.settings()
        assert settings.kind == kind and dataclasses.is_dataclass(settings)
        assert record.default_transport == expected[kind][1]
        objective = build_objective(settings, build_transport(record.default_transport))
        assert isinstance(objective, expected[kind][0]) and isinstance(objective, TrainingObjective)


def test_unknown_kinds_name_the_valid_ones_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown system kind 'scn'; did you mean 'scm'\? choose one of \['ucgm', 'scm'"):
        system("scn")


def test_what_a_system_needs_comes_from_its_record():
    assert ObjectiveSettings(consistency_ratio=1.0, derivative="jvp").needs_forward_mode_autodiff
    assert not ObjectiveSettings(consistency_ratio=0.0, derivative="jvp").needs_forward_mode_autodiff
    assert not ObjectiveSettings(consistency_ratio=1.0).needs_forward_mode_autodiff
    assert ContinuousConsistencySettings().needs_forward_mode_autodiff and ExplicitShortcutSettings().needs_two_time_network
    assert needs_teacher(MultistepConsistencySettings(distillation=True)) and not needs_teacher(MultistepConsistencySettings())
    assert not needs_teacher(ObjectiveSettings()) and not needs_teacher(ShortcutSettings())


def test_every_objective_accepts_the_step_keyword_and_returns_a_scalar_loss():
    network = smooth_network()
    x = torch.randn(16, DIM, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    labels = torch.tensor([0, 1] * 8)
    for name, system in PRESETS.items():
        transport = build_transport(system.transport)
        teacher = smooth_network(seed=7) if system.teacher else None
        objective = build_objective(system.objective, transport, teacher=teacher)
        for module in objective.extra_modules():
            module.to(DTYPE)
        target = objective.create_target_network(network) if objective.needs_target_network else None
        out = objective(network, target.module(network) if target else None, x, labels, generator=torch.Generator().manual_seed(2), step=3)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss), name
        assert all(v.ndim == 0 for v in out.metrics.values()), name


def test_teacher_rules_and_transport_checks_name_the_fix():
    trigflow, linear = build_transport("trigflow"), build_transport("linear")
    with pytest.raises(ValueError, match="teacher"):
        build_objective(ContinuousConsistencySettings(distillation=True), trigflow)
    with pytest.raises(ValueError, match="teacher"):
        build_objective(ContinuousConsistencySettings(), trigflow, teacher=smooth_network())
    with pytest.raises(ValueError, match="transport: trigflow"):
        build_objective(ContinuousConsistencySettings(), linear)
    with pytest.raises(ValueError, match="transport: linear"):
        build_objective(ExplicitShortcutSettings(), trigflow)
    with pytest.raises(ValueError, match="teacher"):
        build_objective(ObjectiveSettings(), linear, teacher=smooth_network())


@pytest.mark.parametrize(
    "settings_class, field_name, value",
    [
        (ContinuousConsistencySettings, "tangent_normalization", -0.1),
        (ContinuousConsistencySettings, "tangent_warmup_steps", -1),
        (ContinuousConsistencySettings, "distillation", "yes"),
        (MultistepConsistencySettings, "student_steps", 0),
        (MultistepConsistencySettings, "addim_eta", 1.5),
        (MultistepConsistencySettings, "teacher_steps_end", 4),
        (ShortcutSettings, "finest_steps", 100),
        (ShortcutSettings, "self_consistency_fraction", 1.0),
        (ExplicitShortcutSettings, "instantaneous_fraction", 1.5),
        (ExplicitShortcutSettings, "guidance_interval", (0.8, 0.2)),
        (ExplicitShortcutSettings, "kind", "shortcut"),
    ],
)
def test_invalid_system_settings_name_the_field(settings_class, field_name, value):
    with pytest.raises(ValueError, match=field_name):
        settings_class(**{field_name: value})


def test_presets_are_consistent_with_their_systems():
    for name, chosen in PRESETS.items():
        assert preset(name) is chosen
        build_transport(chosen.transport)
        assert chosen.transport == system(chosen.objective.kind).default_transport
        assert chosen.two_time_network == chosen.objective.needs_two_time_network
        assert chosen.forward_mode_autodiff == chosen.objective.needs_forward_mode_autodiff
        assert chosen.sampler.condition_on_end_time == chosen.two_time_network
        assert chosen.teacher == needs_teacher(chosen.objective)
    assert preset("ucgm_few_step").objective.consistency_ratio == 1.0
    assert preset("ucgm_multi_step").objective.consistency_ratio == 0.0
    assert preset("ucgm_accelerated").sampler.extrapolation > 0
    with pytest.raises(ValueError, match="choose one of"):
        preset("sCM")


def test_condition_on_end_time_leaves_one_time_networks_unchanged():
    """The sampler passes r only when asked; a one-time network gives the same samples either way."""
    transport = build_transport("linear")
    gaussian = Gaussian(transport)
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    plain = sample(gaussian.denoiser_network, transport, noise, None, SamplerSettings(steps=5))
    told = sample(gaussian.denoiser_network, transport, noise, None, SamplerSettings(steps=5, condition_on_end_time=True))
    torch.testing.assert_close(plain, told, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_and_samples_a_small_dit_through_one_loop(name):
    """What a benchmark does with each preset: a DiT built with the preset's needs (second time,
    math attention for forward-mode AD), one optimiser step through the common loop, one sample."""
    system = preset(name)
    torch.manual_seed(0)
    attention = "math" if system.forward_mode_autodiff else "fused"
    model = build_dit(
        DiTSettings(size="tiny", hidden_size=32, depth=1, num_heads=2, two_time=system.two_time_network, attention=attention),
        input_size=4, in_channels=1, num_classes=3,
    )
    transport = build_transport(system.transport)
    teacher = build_dit(DiTSettings(size="tiny", hidden_size=32, depth=1, num_heads=2, attention=attention), input_size=4, in_channels=1, num_classes=3) if system.teacher else None
    objective = build_objective(system.objective, transport, teacher=teacher)
    parameters = list(model.parameters()) + [p for m in objective.extra_modules() for p in m.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    target = objective.create_target_network(model) if objective.needs_target_network else None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (8,), generator=generator)
    out = objective(model, target.module(model) if target else None, x, labels, generator=generator, step=0)
    out.loss.backward()
    optimizer.step()
    if target is not None:
        target.update(model)
    assert torch.isfinite(out.loss)
    samples = sample(model, transport, torch.randn(2, 1, 4, 4, generator=generator), labels[:2], system.sampler, generator=generator)
    assert samples.shape == (2, 1, 4, 4) and bool(torch.isfinite(samples).all())
