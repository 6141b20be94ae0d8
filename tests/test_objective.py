"""UCGM-T (ucgm_core/systems/ucgm.py), checked against hand computations on tiny networks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ucgm_core.ema import TargetNetwork
from ucgm_core.systems.common import drop_labels
from ucgm_core.systems.ucgm import (
    ObjectiveSettings,
    UnifiedObjective,
    consistency_target,
    enhanced_pair,
    finite_difference_derivative,
    jvp_derivative,
    path_data_prediction,
)
from ucgm_core.time_distributions import BetaTime, UniformTime
from ucgm_core.transports import build_transport

DTYPE = torch.float64
NUM_CLASSES = 4
SHAPE = (3, 4, 4)


class SmoothNet(nn.Module):
    """A small conv net with tanh, smooth in (x, t), conditioned on labels (null = NUM_CLASSES)."""

    def __init__(self, seed: int = 0, hidden: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        channels = SHAPE[0]
        self.num_classes = NUM_CLASSES
        self.inp = nn.Conv2d(channels + 1, hidden, 3, padding=1)
        self.label_embedding = nn.Embedding(NUM_CLASSES + 1, hidden)
        self.time_scale = nn.Parameter(torch.randn(hidden))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.to(DTYPE)

    def forward(self, x, t, labels, r=None):
        time_plane = t.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:]).to(x.dtype)
        h = self.inp(torch.cat([x, time_plane], dim=1))
        h = h + self.label_embedding(labels)[:, :, None, None]
        h = h + torch.sin(3 * t.reshape(-1, 1, 1, 1) * self.time_scale[None, :, None, None])
        return self.out(self.dropout(torch.tanh(h)))


class LabelAffineNet(nn.Module):
    """F = scale[label] * x_t + shift[label] * (1 + t): known conditional/unconditional outputs."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.num_classes = NUM_CLASSES
        self.scale = nn.Parameter(torch.randn(NUM_CLASSES + 1, generator=generator, dtype=DTYPE))
        self.shift = nn.Parameter(torch.randn(NUM_CLASSES + 1, generator=generator, dtype=DTYPE))

    def forward(self, x, t, labels, r=None):
        view = (-1, 1, 1, 1)
        return self.scale[labels].reshape(view) * x + self.shift[labels].reshape(view) * (1 + t.reshape(view))


def _batch(batch_size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *SHAPE, generator=generator, dtype=DTYPE)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return x, labels


def _redraw(x, time_distribution, seed):
    """The objective's draws, made independently: t first, then z, from an identically seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    t = time_distribution.sample(x.shape[0], generator=generator, dtype=DTYPE)
    z = torch.randn(x.shape, generator=generator, dtype=DTYPE)
    return t, z


def _rows(t):
    return t.reshape(-1, 1, 1, 1)


def _rmse_loss(output, target):
    return torch.sqrt((output - target).pow(2).flatten(1).mean(dim=1)).mean()


def _hand_dropped_labels(labels, number_dropped):
    dropped = labels.clone()
    if number_dropped:
        dropped[-number_dropped:] = NUM_CLASSES
    return dropped


# ----------------------------------------------------------------------------- lambda = 0


@pytest.mark.parametrize("transport_name", ["linear", "relinear"])
def test_flow_matching_loss_equals_per_sample_rmse_of_velocity(transport_name):
    x, labels = _batch()
    network = SmoothNet()
    objective = UnifiedObjective(build_transport(transport_name), ObjectiveSettings())
    output = objective(network, None, x, labels, generator=torch.Generator().manual_seed(3))

    t, z = _redraw(x, BetaTime(), seed=3)
    x_t = _rows(t) * z + (1 - _rows(t)) * x
    hand_labels = _hand_dropped_labels(labels, 1)  # round(0.1 * 8) = 1
    if transport_name == "linear":
        velocity = network(x_t, t, hand_labels)
        expected = _rmse_loss(velocity, z - x)
    else:  # data at s = 1, network reads s = 1 - t and predicts x - z
        expected = _rmse_loss(network(x_t, 1 - t, hand_labels), x - z)
    torch.testing.assert_close(output.loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(output.metrics["mean_time"], t.mean())
    assert output.loss.requires_grad and not output.metrics["loss"].requires_grad


def test_loss_options_pseudo_huber_cosine_and_time_weight_match_hand_formula():
    x, labels = _batch()
    network = SmoothNet()
    settings = ObjectiveSettings(loss_constant=0.7, cosine_loss=True, time_weighting="cosine", label_dropout=0.0)
    output = UnifiedObjective(build_transport("linear"), settings)(
        network, None, x, labels, generator=torch.Generator().manual_seed(5)
    )
    t, z = _redraw(x, BetaTime(), seed=5)
    velocity = network(_rows(t) * z + (1 - _rows(t)) * x, t, labels)
    target = z - x
    squared = (velocity - target).pow(2).flatten(1).mean(1)
    huber = torch.sqrt(squared + 0.49) - 0.7
    cosine = (velocity * target).sum(1) / (velocity.norm(dim=1) * target.norm(dim=1))
    per_sample = (huber + (1 - cosine).flatten(1).mean(1)) * torch.cos(math.pi * t / 2)
    torch.testing.assert_close(output.loss, per_sample.mean(), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- labels


def test_label_dropout_nulls_last_rounded_rows_and_keeps_caller_labels():
    labels = torch.arange(8) % NUM_CLASSES
    original = labels.clone()
    dropped, number = drop_labels(labels, 0.25, NUM_CLASSES)
    assert number == 2
    assert torch.equal(dropped[:6], original[:6]) and (dropped[6:] == NUM_CLASSES).all()
    assert torch.equal(labels, original)


def test_label_dropout_rounding_to_zero_drops_nothing():
    labels = torch.arange(4)
    dropped, number = drop_labels(labels, 0.1, NUM_CLASSES)  # round(0.4) = 0
    assert number == 0 and torch.equal(dropped, labels)


def test_objective_does_not_mutate_labels_and_network_sees_dropped_labels():
    seen = []

    class Recorder(SmoothNet):
        def forward(self, x, t, labels, r=None):
            seen.append(labels.clone())
            return super().forward(x, t, labels)

    x, labels = _batch(batch_size=10)
    original = labels.clone()
    settings = ObjectiveSettings(label_dropout=0.2)
    UnifiedObjective(build_transport("linear"), settings)(
        Recorder(), None, x, labels, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(labels, original)
    assert torch.equal(seen[0][:8], original[:8]) and (seen[0][8:] == NUM_CLASSES).all()


# ----------------------------------------------------------------------------- enhanced target


@pytest.mark.parametrize("style", ["live_vs_unconditional", "target_vs_unconditional", "target_vs_data"])
def test_enhanced_target_shifts_inside_range_and_averages_outside(style):
    zeta, low, high = 0.5, 0.2, 0.6
    x, labels = _batch(batch_size=12, seed=1)
    online, target_net = LabelAffineNet(seed=1), LabelAffineNet(seed=2)
    time_distribution = UniformTime()
    settings = ObjectiveSettings(
        time_distribution=time_distribution,
        enhanced_ratio=zeta,
        enhanced_range=(low, high),
        enhanced_style=style,
        label_dropout=0.25,
    )
    output = UnifiedObjective(build_transport("linear"), settings)(
        online, target_net, x, labels, generator=torch.Generator().manual_seed(11)
    )

    t, z = _redraw(x, time_distribution, seed=11)
    x_t = _rows(t) * z + (1 - _rows(t)) * x
    hand_labels = _hand_dropped_labels(labels, 3)  # round(0.25 * 12) = 3
    null = torch.full_like(labels, NUM_CLASSES)
    velocity = z - x
    # For Linear, F = z_hat - x_hat, so shifting (x, z) targets by zeta (cond - guide) shifts the
    # velocity target by zeta (F_cond - F_guide), and averages likewise.
    live_conditional = online(x_t, t, hand_labels)
    if style == "live_vs_unconditional":
        conditional, guide = live_conditional, target_net(x_t, t, null)
    elif style == "target_vs_unconditional":
        conditional, guide = target_net(x_t, t, hand_labels), target_net(x_t, t, null)
    else:
        conditional, guide = target_net(x_t, t, hand_labels), velocity
    kept = torch.arange(12) < 9
    inside = (t > low) & (t < high)
    assert (kept & inside).any() and (kept & ~inside).any(), "seed must cover both cases"
    expected_target = torch.where(
        _rows(kept & inside),
        velocity + zeta * (conditional - guide),
        torch.where(_rows(kept), (velocity + conditional) / 2, (velocity + guide) / 2),
    )
    torch.testing.assert_close(output.loss, _rmse_loss(live_conditional, expected_target), rtol=1e-12, atol=0)


def test_enhanced_pair_row_rules():
    truth = (torch.zeros(4, 1), torch.ones(4, 1))
    conditional = (torch.full((4, 1), 2.0), torch.full((4, 1), 3.0))
    guide = (torch.full((4, 1), 4.0), torch.full((4, 1), 5.0))
    t = torch.tensor([0.1, 0.9, 0.5, 0.5])
    x_target, z_target = enhanced_pair(
        truth, conditional, guide, t, ratio=2.0, time_range=(0.0, 0.75), number_dropped=1
    )
    # rows: inside, outside, inside, dropped
    assert x_target.flatten().tolist() == [0 + 2 * (2 - 4), (0 + 2) / 2, 0 + 2 * (2 - 4), (0 + 4) / 2]
    assert z_target.flatten().tolist() == [1 + 2 * (3 - 5), (1 + 3) / 2, 1 + 2 * (3 - 5), (1 + 5) / 2]
    # the range is open: t exactly at a bound is outside
    x_edge, _ = enhanced_pair(
        truth, conditional, guide, torch.tensor([0.0, 0.75, 0.5, 0.5]),
        ratio=2.0, time_range=(0.0, 0.75), number_dropped=0,
    )
    assert x_edge.flatten().tolist() == [1.0, 1.0, -4.0, -4.0]


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("transport_name", ["linear", "trigflow", "relinear"])
def test_finite_difference_and_jvp_derivatives_agree_in_float64(transport_name):
    transport = build_transport(transport_name)
    x, labels = _batch(seed=2)
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(x.shape, generator=generator, dtype=DTYPE)
    t = 0.1 + 0.8 * torch.rand(x.shape[0], generator=generator, dtype=DTYPE)
    prediction = path_data_prediction(transport, SmoothNet(seed=4), x, z, labels)
    with torch.no_grad():
        by_jvp = jvp_derivative(prediction, t)
        errors = {
            step: (finite_difference_derivative(prediction, t, step=step) - by_jvp).norm() / by_jvp.norm()
            for step in (0.005, 0.001)
        }
    assert errors[0.001] < 1e-4
    # a central difference is second order: a 5x smaller step cuts the error ~25x
    assert errors[0.001] < errors[0.005] / 15
    assert by_jvp.norm() > 1e-2  # the check is not vacuous


def test_finite_difference_clamps_points_into_unit_interval_and_divides_by_span():
    t = torch.tensor([0.001, 0.999, 0.5], dtype=DTYPE)
    derivative = finite_difference_derivative(lambda r: (r**2).reshape(-1, 1), t, step=0.005)
    # one-sided near the ends: (f(b) - f(a)) / (b - a) = a + b for f = r^2
    expected = torch.tensor([0.0 + 0.006, 0.994 + 1.0, 1.0], dtype=DTYPE)
    torch.testing.assert_close(derivative.flatten(), expected)


_INVERSE_NETWORK_TIME = {"linear": lambda s: s, "trigflow": lambda s: s, "relinear": lambda s: 1 - s}


@pytest.mark.parametrize("transport_name", ["linear", "trigflow", "relinear"])
def test_exact_gaussian_consistency_function_has_zero_derivative_along_posterior_mean_path(transport_name):
    """For data N(m, s^2) the probability-flow map to t = 0 is affine,
    f(y, r) = m + s (y - gamma(r) m) / sigma(r), sigma^2 = alpha^2 + gamma^2 s^2. Through the
    posterior means (z_bar, x_bar) of a point x_t, the path's velocity equals the ODE velocity at t,
    so d/dt x_hat(t) = 0 and the consistency target equals F_t."""
    transport = build_transport(transport_name)
    mean, std = 0.3, 0.6

    def coefficients(r):
        c = transport.coefficients(_rows(r))
        return c.alpha, c.gamma, torch.sqrt(c.alpha**2 + c.gamma**2 * std**2)

    def exact_network(y, network_time, labels, r=None):
        time = _INVERSE_NETWORK_TIME[transport_name](network_time)
        alpha, gamma, sigma = coefficients(time)
        x_hat = mean + std * (y - gamma * mean) / sigma
        z_hat = (y - gamma * x_hat) / alpha
        return transport.output_from_predictions(x_hat, z_hat, time)

    generator = torch.Generator().manual_seed(4)
    x_t = torch.randn(6, *SHAPE, generator=generator, dtype=DTYPE)
    t = 0.2 + 0.6 * torch.rand(6, generator=generator, dtype=DTYPE)
    labels = torch.zeros(6, dtype=torch.long)
    alpha, gamma, sigma = coefficients(t)
    noise_bar = alpha * (x_t - gamma * mean) / sigma**2
    data_bar = mean + gamma * std**2 * (x_t - gamma * mean) / sigma**2
    torch.testing.assert_close(alpha * noise_bar + gamma * data_bar, x_t)

    prediction = path_data_prediction(transport, exact_network, data_bar, noise_bar, labels)
    with torch.no_grad():
        by_jvp = jvp_derivative(prediction, t)
        coarse = finite_difference_derivative(prediction, t, step=0.005).abs().max()
        fine = finite_difference_derivative(prediction, t, step=0.001).abs().max()
    assert by_jvp.abs().max() < 1e-10
    assert coarse < 1e-3 and fine < coarse / 15  # zero up to the O(h^2) truncation error
    output = exact_network(x_t, transport.network_time(t), labels)
    torch.testing.assert_close(consistency_target(transport, output, by_jvp, t), output, rtol=0, atol=1e-9)

    # control: an arbitrary pair through x_t is not on an ODE trajectory, so the derivative is not 0
    other_noise = noise_bar + 0.5
    other_data = (x_t - alpha * other_noise) / gamma
    control = jvp_derivative(path_data_prediction(transport, exact_network, other_data, other_noise, labels), t)
    assert control.abs().max() > 1e-2


@pytest.mark.parametrize("zeta", [0.0, 1.5])
@pytest.mark.parametrize("ratio", [0.5, 1.0])
@pytest.mark.parametrize("through", ["live", "target"])
def test_consistency_target_matches_hand_computation_for_linear(ratio, zeta, through):
    """Loss value and gradient against a hand computation; with zeta > 0 ('target_vs_data') the
    x-prediction conversion uses the enhanced pair while the networks see the true pair; the
    derivative goes through the online weights (stop-gradient) or theta- as configured."""
    x, labels = _batch(seed=3)
    online, target_net = SmoothNet(seed=5), SmoothNet(seed=6)
    time_distribution = UniformTime(low=0.1, high=0.9)
    settings = ObjectiveSettings(
        time_distribution=time_distribution,
        consistency_ratio=ratio,
        enhanced_ratio=zeta,
        enhanced_style="target_vs_data",
        label_dropout=0.25,
        derivative_network=through,
    )
    output = UnifiedObjective(build_transport("linear"), settings)(
        online, target_net, x, labels, generator=torch.Generator().manual_seed(8)
    )
    output.loss.backward()
    objective_gradients = [p.grad.clone() for p in online.parameters()]
    online.zero_grad(set_to_none=True)

    t, z = _redraw(x, time_distribution, seed=8)
    hand_labels = _hand_dropped_labels(labels, 2)  # round(0.25 * 8) = 2

    def path(data, noise, r):
        return _rows(r) * noise + (1 - _rows(r)) * data

    x_t = path(x, z, t)
    velocity = online(x_t, t, hand_labels)
    with torch.no_grad():
        # Linear: x_hat = y - r F, z_hat = y + (1 - r) F at the conversion point y
        data_target, noise_target = x, z
        if zeta > 0:
            conditional = target_net(x_t, t, hand_labels)
            data_conditional = x_t - _rows(t) * conditional
            noise_conditional = x_t + (1 - _rows(t)) * conditional
            kept, inside = _rows(torch.arange(8) < 6), _rows((t > 0.0) & (t < 0.75))
            data_target = torch.where(
                kept & inside, x + zeta * (data_conditional - x), torch.where(kept, (x + data_conditional) / 2, x)
            )
            noise_target = torch.where(
                kept & inside, z + zeta * (noise_conditional - z), torch.where(kept, (z + noise_conditional) / 2, z)
            )

        derivative_net = target_net if through == "target" else online

        def target_data_prediction(r):
            return path(data_target, noise_target, r) - _rows(r) * derivative_net(path(x, z, r), r, hand_labels)

        if ratio == 1.0:
            h = 0.005
            derivative = (target_data_prediction(t + h) - target_data_prediction(t - h)) / (2 * h)
        else:
            current = path(data_target, noise_target, t) - _rows(t) * velocity
            derivative = (current - target_data_prediction(ratio * t)) / _rows(t - ratio * t)
        # alpha / den = t / (-1) for Linear
        target = velocity + _rows(t) * 4 / torch.sin(math.pi * _rows(t) / 2) * derivative.clamp(-1, 1)
    hand_loss = _rmse_loss(velocity, target)
    torch.testing.assert_close(output.loss, hand_loss, rtol=1e-10, atol=0)
    hand_loss.backward()
    for objective_gradient, parameter in zip(objective_gradients, online.parameters()):
        torch.testing.assert_close(objective_gradient, parameter.grad, rtol=1e-9, atol=1e-12)
    assert 0 <= output.metrics["derivative_clamped_fraction"] <= 1


def test_jvp_and_finite_difference_objectives_give_nearly_equal_losses():
    x, labels = _batch(seed=4)
    online, target_net = SmoothNet(seed=7), SmoothNet(seed=8)
    losses = {}
    for backend in ("jvp", "finite_difference"):
        settings = ObjectiveSettings(
            time_distribution=UniformTime(low=0.1, high=0.9), consistency_ratio=1.0, derivative=backend
        )
        losses[backend] = UnifiedObjective(build_transport("trigflow"), settings)(
            online, target_net, x, labels, generator=torch.Generator().manual_seed(9)
        ).loss
    torch.testing.assert_close(losses["jvp"], losses["finite_difference"], rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------- gradients and RNG


_GRADIENT_CASES = [
    (ratio, zeta, style)
    for ratio in (0.0, 0.5, 1.0)
    for zeta, style in [(0.0, "live_vs_unconditional")]
    + [(0.5, s) for s in ("live_vs_unconditional", "target_vs_unconditional", "target_vs_data")]
]


def _online_gradients(policy, ratio, zeta, style, online, target_module):
    settings = ObjectiveSettings(
        consistency_ratio=ratio, enhanced_ratio=zeta, enhanced_style=style, time_distribution=UniformTime(low=0.05, high=0.95)
    )
    online.zero_grad(set_to_none=True)
    x, labels = _batch(seed=5)
    output = UnifiedObjective(build_transport("linear"), settings)(
        online, target_module, x, labels, generator=torch.Generator().manual_seed(10)
    )
    output.loss.backward()
    return {name: p.grad.clone() for name, p in online.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ratio,zeta,style", _GRADIENT_CASES)
@pytest.mark.parametrize("policy", ["ema", "frozen"])
def test_no_gradient_reaches_copied_target_networks(policy, ratio, zeta, style):
    online = SmoothNet(seed=9)
    target = TargetNetwork.create(policy, online, decay=0.9)
    target.update(online)
    gradients = _online_gradients(policy, ratio, zeta, style, online, target.module(online))
    assert gradients, "the online network must receive gradients"
    assert all(p.grad is None for p in target.module(online).parameters())


@pytest.mark.parametrize("ratio,zeta,style", _GRADIENT_CASES)
def test_live_target_contributes_no_gradient(ratio, zeta, style):
    """With the live policy the online module is also theta-; its gradient must equal the one
    obtained with an identical but separate (frozen) copy as theta-."""
    online = SmoothNet(seed=9)
    live = TargetNetwork.create("live", online)
    live_gradients = _online_gradients("live", ratio, zeta, style, online, live.module(online))
    frozen_copy = copy.deepcopy(online).requires_grad_(False)
    copy_gradients = _online_gradients("frozen", ratio, zeta, style, online, frozen_copy)
    assert live_gradients.keys() == copy_gradients.keys()
    for name in live_gradients:
        torch.testing.assert_close(live_gradients[name], copy_gradients[name], rtol=1e-12, atol=1e-14)


def test_extra_forward_passes_replay_the_rng_and_leave_it_as_after_one_pass():
    draws = []

    class Noisy(SmoothNet):
        def forward(self, x, t, labels, r=None):
            draws.append(torch.rand(()).item())
            return super().forward(x, t, labels)

    online = Noisy(seed=1, dropout=0.3)
    settings = ObjectiveSettings(consistency_ratio=1.0, enhanced_ratio=0.5, enhanced_style="target_vs_unconditional")
    x, labels = _batch()
    torch.manual_seed(123)
    UnifiedObjective(build_transport("linear"), settings)(
        online, online, x, labels, generator=torch.Generator().manual_seed(0)
    )
    after_objective = torch.rand(()).item()
    assert len(draws) == 5  # online, conditional, unconditional, t + h, t - h
    assert len(set(draws)) == 1

    torch.manual_seed(123)
    draws.clear()
    online(x, torch.full((x.shape[0],), 0.5, dtype=DTYPE), labels)  # one pass: same number of draws
    assert torch.rand(()).item() == after_objective


def test_dropout_masks_match_so_live_target_of_a_dropout_net_gives_exact_f_star_shift():
    """With the live policy, lambda = 0 and the 'target_vs_data' style, a conditional target-network
    pass through the same dropout masks equals the online output, so the loss equals the hand value."""
    online = SmoothNet(seed=2, dropout=0.5)
    settings = ObjectiveSettings(
        enhanced_ratio=0.5, enhanced_style="target_vs_data", label_dropout=0.0, time_distribution=UniformTime()
    )
    x, labels = _batch()
    torch.manual_seed(7)
    output = UnifiedObjective(build_transport("linear"), settings)(
        online, online, x, labels, generator=torch.Generator().manual_seed(1)
    )
    t, z = _redraw(x, UniformTime(), seed=1)
    torch.manual_seed(7)
    velocity = online(_rows(t) * z + (1 - _rows(t)) * x, t, labels)
    inside = _rows((t > 0.0) & (t < 0.75))
    target = torch.where(inside, (z - x) + 0.5 * (velocity - (z - x)), ((z - x) + velocity) / 2)
    torch.testing.assert_close(output.loss, _rmse_loss(velocity, target.detach()), rtol=1e-12, atol=0)


def test_missing_target_network_is_an_error_when_needed():
    x, labels = _batch()
    settings = ObjectiveSettings(consistency_ratio=0.5, derivative_network="target")
    with pytest.raises(ValueError, match="target_network"):
        UnifiedObjective(build_transport("linear"), settings)(SmoothNet(), None, x, labels, generator=torch.Generator().manual_seed(0))


def test_consistency_through_the_live_weights_needs_no_target_network():
    x, labels = _batch()
    settings = ObjectiveSettings(consistency_ratio=1.0)
    assert not settings.needs_target_network
    output = UnifiedObjective(build_transport("linear"), settings)(SmoothNet(), None, x, labels, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(output.loss)


def test_num_classes_argument_overrides_missing_attribute():
    def network(x_t, t, labels, r=None):
        assert labels.max() <= 9
        return x_t * 0.5

    x, labels = _batch()
    objective = UnifiedObjective(build_transport("linear"), ObjectiveSettings(label_dropout=0.5))
    objective(network, None, x, labels, generator=torch.Generator().manual_seed(0), num_classes=9)
    with pytest.raises(ValueError, match="num_classes"):
        objective(network, None, x, labels, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "field_name,value",
    [
        ("consistency_ratio", 1.5),
        ("consistency_ratio", -0.1),
        ("label_dropout", 1.0),
        ("enhanced_range", (0.8, 0.2)),
        ("enhanced_range", (0.0, 1.2)),
        ("enhanced_ratio", -0.5),
        ("enhanced_ratio", 1.0),
        ("finite_difference_step", 0.0),
        ("finite_difference_step", 0.5),
        ("target_ema_decay", 1.1),
        ("derivative", "backward"),
        ("target_network", "average"),
        ("enhanced_style", "ft-vs-fe"),
        ("time_weighting", "Cosine"),
        ("loss_constant", -1.0),
        ("time_epsilon", 1.0),
    ],
)
def test_invalid_settings_name_the_field(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        ObjectiveSettings(**{field_name: value})


def test_enhanced_ratio_above_one_is_allowed_for_few_step_training():
    settings = ObjectiveSettings(consistency_ratio=1.0, enhanced_ratio=2.0, enhanced_style="target_vs_data")
    assert settings.needs_target_network
    assert not ObjectiveSettings().needs_target_network


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flow_matching_loss_on_cuda_matches_cpu():
    x, labels = _batch()
    network = SmoothNet()
    settings = ObjectiveSettings(consistency_ratio=1.0, time_distribution=UniformTime(low=0.1, high=0.9))
    objective = UnifiedObjective(build_transport("linear"), settings)
    cpu_loss = objective(network, network, x, labels, generator=torch.Generator().manual_seed(0)).loss
    cuda_network = copy.deepcopy(network).cuda()
    cuda_loss = objective(
        cuda_network, cuda_network, x.cuda(), labels.cuda(), generator=torch.Generator("cuda").manual_seed(0)
    ).loss
    assert torch.isfinite(cuda_loss)
    # different generators on different devices: only the scale is comparable
    assert 0.1 < (cuda_loss / cpu_loss).item() < 10
