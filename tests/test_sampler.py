"""UCGM-S against Gaussian data (exact denoiser and exact flow map known in closed form) and against
a minimal Euler loop for the linear transport written out here."""

from __future__ import annotations

import math

import pytest
import torch

from ucgm_core.sampler import SamplerSettings, count_network_evaluations, sample, time_grid
from ucgm_core.transports import build_transport

DATA_MEAN, DATA_STD = 0.7, 0.5
LINEAR = build_transport("linear")


def as_column(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64).reshape(-1, *([1] * (like.ndim - 1)))


def gaussian_moments(alpha, gamma):
    """x_t = alpha z + gamma x with x ~ N(m, s^2): returns (E[x_t], Var(x_t))."""
    return gamma * DATA_MEAN, gamma**2 * DATA_STD**2 + alpha**2


def exact_linear_denoiser(x_t, t_net, labels, r=None):
    """The optimal linear-transport output for Gaussian data: F = E[z|x_t] - E[x|x_t], with
    x_t = t z + (1 - t) x (the network time is t itself for the linear transport)."""
    x = x_t.to(torch.float64)
    t = as_column(t_net, x)
    mean, var = gaussian_moments(t, 1 - t)
    e_x = DATA_MEAN + (1 - t) * DATA_STD**2 * (x - mean) / var
    e_z = t * (x - mean) / var
    return (e_z - e_x).to(x_t.dtype)


def exact_linear_flow_map(x_t, t_net, labels, r=None):
    """The consistency function of Gaussian data for the linear transport: the probability-flow ODE
    maps N(E[x_t], Var(x_t)) monotonically onto N(m, s^2), so x_0 = m + s (x_t - E[x_t]) / sqrt(Var).
    Returned as a network output through output_from_predictions, with z_hat = (x_t - gamma x_0)/alpha."""
    x = x_t.to(torch.float64)
    t = as_column(t_net, x)
    mean, var = gaussian_moments(t, 1 - t)
    x_hat = DATA_MEAN + DATA_STD * (x - mean) / torch.sqrt(var)
    z_hat = (x - (1 - t) * x_hat) / t
    return LINEAR.output_from_predictions(x_hat, z_hat, t_net.to(torch.float64)).to(x_t.dtype)


class ToyNetwork:
    """A nonlinear class-conditional network that records its calls; label `num_classes` is null."""

    num_classes = 3

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor | None, torch.dtype]] = []

    def __call__(self, x_t, t_net, labels, r=None):
        self.calls.append((x_t.shape[0], t_net.clone(), None if labels is None else labels.clone(), x_t.dtype))
        x = x_t.to(torch.float64)
        t = as_column(t_net, x)
        scale = 1.0 if labels is None else as_column(labels + 1, x)
        return (torch.tanh(x * scale) * (1 + t) - 0.3 * scale * t).to(x_t.dtype)


def linear_euler_loop(network, noise, labels, times, *, extrapolation=0.0, guidance=None, stochasticity=0.0, generator=None):
    """Independent minimal sampler for the linear transport: x_hat = x - t F, z_hat = x + (1 - t) F,
    x_next = (1 - t_n) x_hat + t_n (sqrt(1 - rho) z_hat + sqrt(rho) eps); extrapolation from the third
    step using raw predictions; guidance = (w, low, high, null_label); eps drawn in float64 with the
    state's shape. Returns the trajectory (noise, every raw x_hat)."""
    x = noise.to(torch.float64)
    trajectory, previous = [noise.to(torch.float64)], None
    times = [float(v) for v in times]
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        t_vec = torch.full((x.shape[0],), t, dtype=noise.dtype)
        output = network(x.to(noise.dtype), t_vec, labels).to(torch.float64)
        if guidance is not None and guidance[1] <= t <= guidance[2]:
            w, null = guidance[0], torch.full_like(labels, guidance[3])
            unconditional = network(x.to(noise.dtype), t_vec, null).to(torch.float64)
            output = unconditional + w * (output - unconditional)
        x_hat, z_hat = x - t * output, x + (1 - t) * output
        trajectory.append(x_hat)
        if i == len(times) - 2:
            break
        used_x, used_z = x_hat, z_hat
        if extrapolation and i >= 2:
            used_x = x_hat + extrapolation * (x_hat - previous[0])
            used_z = z_hat + extrapolation * (z_hat - previous[1])
        previous = (x_hat, z_hat)
        if stochasticity:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            used_z = math.sqrt(1 - stochasticity) * used_z + math.sqrt(stochasticity) * eps
        x = (1 - t_next) * used_x + t_next * used_z
    return torch.stack(trajectory)


def gaussian_noise(batch=4000, dim=4, seed=0, dtype=torch.float64):
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_gaussian_moments(samples, mean=DATA_MEAN, std=DATA_STD):
    n = samples.numel()
    values = samples.to(torch.float64).flatten()
    assert abs(float(values.mean()) - mean) < 5 * std / math.sqrt(n), float(values.mean())
    assert abs(float(values.var()) - std**2) < 5 * std**2 * math.sqrt(2 / (n - 1)), float(values.var())


# ---------------------------------------------------------------------------------------- time grid


@pytest.mark.parametrize("steps", [1, 2, 5, 40])
@pytest.mark.parametrize("gaps", [(0.0, 0.0), (0.001, 0.001), (0.001, 0.5), (0.1, 0.0)])
@pytest.mark.parametrize("schedule", [(1.0, 1.0, 1.0), (1.17, 0.8, 1.1), (1.2, 0.72, 1.2)])
def test_time_grid_has_steps_plus_one_decreasing_points_from_near_one_to_zero(steps, gaps, schedule):
    grid = time_grid(SamplerSettings(steps=steps, boundary_gaps=gaps, schedule=schedule))
    assert grid.dtype == torch.float64 and grid.shape == (steps + 1,)
    assert float(grid[-1]) == 0.0
    a, b, c = schedule
    assert float(grid[0]) == pytest.approx(1 - (1 - (1 - gaps[0] ** a) ** b) ** c, abs=1e-15)
    assert bool((grid[1:] < grid[:-1]).all())
    assert bool((grid[:-1] > 0).all())


def test_time_grid_with_identity_schedule_is_the_reversed_linspace():
    grid = time_grid(SamplerSettings(steps=4, boundary_gaps=(0.1, 0.2)))
    torch.testing.assert_close(grid, torch.tensor([0.9, 0.9 - 0.7 / 3, 0.9 - 1.4 / 3, 0.2, 0.0], dtype=torch.float64))
    # g1 = 0: one more linspace point, whose last (t = 0) is dropped before appending 0
    grid = time_grid(SamplerSettings(steps=4, boundary_gaps=(0.0, 0.0)))
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


def test_time_grid_applies_the_kumaraswamy_map():
    a, b, c = 1.17, 0.8, 1.1
    grid = time_grid(SamplerSettings(steps=3, schedule=(a, b, c), boundary_gaps=(0.05, 0.05)))
    u = [0.05, 0.5, 0.95]
    want = [1 - (1 - (1 - v**a) ** b) ** c for v in u] + [0.0]
    torch.testing.assert_close(grid, torch.tensor(want, dtype=torch.float64))


def test_time_grid_for_order_two_has_half_the_intervals():
    assert time_grid(SamplerSettings(steps=5, order=2)).shape == (4,)
    assert time_grid(SamplerSettings(steps=6, order=2)).shape == (4,)


# ----------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"steps": 0}, "steps"),
        ({"stochasticity": 1.5}, "stochasticity"),
        ({"stochasticity": -0.1}, "stochasticity"),
        ({"boundary_gaps": (0.6, 0.5)}, "boundary_gaps"),
        ({"boundary_gaps": (-0.1, 0.0)}, "boundary_gaps"),
        ({"boundary_gaps": (0.0, 1.0)}, "boundary_gaps"),
        ({"schedule": (1.0, 0.0, 1.0)}, "schedule"),
        ({"schedule": (1.0, 1.0)}, "schedule"),
        ({"order": 3}, "order"),
        ({"order": 2, "stochasticity": 0.5}, "stochasticity"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_interval": (0.8, 0.2)}, "guidance_interval"),
        ({"extrapolation": -0.5}, "extrapolation"),
    ],
)
def test_bad_settings_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplerSettings(**kwargs)


def test_settings_accept_lists_from_config_files_and_stay_hashable():
    settings = SamplerSettings(schedule=[1.17, 0.8, 1.1], boundary_gaps=[0.001, 0.002], guidance_interval=[0, 0.76])
    assert settings.schedule == (1.17, 0.8, 1.1) and settings.guidance_interval == (0.0, 0.76)
    hash(settings)


# ------------------------------------------------------------------------------------ distributions


def test_deterministic_sampler_with_exact_denoiser_reproduces_gaussian_data():
    settings = SamplerSettings(steps=200, boundary_gaps=(0.0, 0.001))
    samples = sample(exact_linear_denoiser, LINEAR, gaussian_noise(), None, settings)
    assert samples.dtype == torch.float64
    assert_gaussian_moments(samples)


@pytest.mark.parametrize("steps, gaps", [(1, (0.0, 0.001)), (2, (0.0, 0.5))])
def test_consistency_sampler_with_exact_flow_map_reproduces_gaussian_data(steps, gaps):
    settings = SamplerSettings(steps=steps, boundary_gaps=gaps, stochasticity=1.0)
    generator = torch.Generator().manual_seed(5)
    samples = sample(exact_linear_flow_map, LINEAR, gaussian_noise(seed=1), None, settings, generator=generator)
    assert_gaussian_moments(samples)


def test_a_wrong_flow_map_is_detected_by_the_moment_check():
    def biased(x_t, t_net, labels, r=None):
        return exact_linear_flow_map(x_t, t_net, labels) - 0.05  # shifts x_hat by +0.05 t

    settings = SamplerSettings(steps=2, boundary_gaps=(0.0, 0.5), stochasticity=1.0)
    samples = sample(biased, LINEAR, gaussian_noise(seed=1), None, settings, generator=torch.Generator().manual_seed(5))
    with pytest.raises(AssertionError):
        assert_gaussian_moments(samples)


def exact_output_distribution(settings):
    """(mean, std) of E[x | x_{t_last}] when x_{t_0} ~ N(0, 1) is carried exactly by the probability-flow
    ODE of the linear transport; with t_0 = 1 the start is exact, so this is the ideal sampler output."""
    grid = time_grid(settings)
    assert float(grid[0]) == 1.0
    t_last = float(grid[-2])
    mean, var = gaussian_moments(t_last, 1 - t_last)
    return DATA_MEAN, (1 - t_last) * DATA_STD**2 / math.sqrt(var)


def affine_output(settings):
    """Everything is affine in the noise for Gaussian data, so two noise values give the whole output
    law exactly: output = intercept + slope * noise, noise ~ N(0, 1)."""
    noise = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    out = sample(exact_linear_denoiser, LINEAR, noise, None, settings)
    return float(out[0, 0]), float(out[1, 0] - out[0, 0])


@pytest.mark.parametrize("nfe", [5, 7, 9])
def test_second_order_is_closer_to_the_exact_distribution_than_first_order_at_equal_nfe(nfe):
    errors = {}
    for order in (1, 2):
        settings = SamplerSettings(steps=nfe, order=order, boundary_gaps=(0.0, 0.001))
        assert count_network_evaluations(settings) == nfe
        mean, std = exact_output_distribution(settings)
        intercept, slope = affine_output(settings)
        errors[order] = abs(intercept - mean) + abs(slope - std)
    assert errors[2] < 0.25 * errors[1], errors


def test_second_order_converges_to_the_exact_distribution():
    settings = SamplerSettings(steps=101, order=2, boundary_gaps=(0.0, 0.001))
    mean, std = exact_output_distribution(settings)
    intercept, slope = affine_output(settings)
    assert abs(intercept - mean) < 1e-6 and abs(slope - std) < 1e-3


# --------------------------------------------------------------------------------------- randomness


def test_deterministic_sampler_depends_only_on_the_noise():
    settings = SamplerSettings(steps=6)
    noise = gaussian_noise(batch=8)
    first = sample(exact_linear_denoiser, LINEAR, noise, None, settings)
    again = sample(exact_linear_denoiser, LINEAR, noise, None, settings, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_stochastic_sampler_changes_with_the_generator_seed_only():
    settings = SamplerSettings(steps=3, stochasticity=1.0, boundary_gaps=(0.0, 0.3))
    noise = gaussian_noise(batch=8)

    def run(seed):
        return sample(exact_linear_flow_map, LINEAR, noise, None, settings, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.allclose(run(0), run(1))


@pytest.mark.parametrize("rho", [0.36, 1.0])
def test_stochastic_step_mixes_predicted_and_fresh_noise(rho):
    noise, labels = toy_inputs()
    settings = SamplerSettings(steps=4, stochasticity=rho, extrapolation=0.3)
    _, path = sample(
        ToyNetwork(), LINEAR, noise, labels, settings, generator=torch.Generator().manual_seed(2), return_trajectory=True
    )
    expected = linear_euler_loop(
        ToyNetwork(), noise, labels, time_grid(settings), extrapolation=0.3,
        stochasticity=rho, generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(path, expected, rtol=1e-12, atol=1e-12)


def test_stochastic_sampler_without_generator_raises():
    with pytest.raises(ValueError, match="generator"):
        sample(exact_linear_flow_map, LINEAR, gaussian_noise(batch=2), None, SamplerSettings(stochasticity=0.5))


# ---------------------------------------------------------------------------------- extrapolation


def toy_inputs(batch=3):
    noise = torch.randn(batch, 2, 3, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2][:batch])
    return noise, labels


def test_sampler_without_extrapolation_matches_a_minimal_euler_loop():
    noise, labels = toy_inputs()
    settings = SamplerSettings(steps=7, schedule=(1.17, 0.8, 1.1), boundary_gaps=(0.001, 0.002))
    sample_out, trajectory = sample(ToyNetwork(), LINEAR, noise, labels, settings, return_trajectory=True)
    expected = linear_euler_loop(ToyNetwork(), noise, labels, time_grid(settings))
    torch.testing.assert_close(trajectory, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample_out, expected[-1], rtol=1e-12, atol=1e-12)


def test_extrapolation_follows_the_reference_rule_from_the_third_step():
    noise, labels = toy_inputs()
    kappa = 0.5
    plain = SamplerSettings(steps=7, boundary_gaps=(0.001, 0.002))
    extrapolated = SamplerSettings(steps=7, boundary_gaps=(0.001, 0.002), extrapolation=kappa)
    _, plain_path = sample(ToyNetwork(), LINEAR, noise, labels, plain, return_trajectory=True)
    _, path = sample(ToyNetwork(), LINEAR, noise, labels, extrapolated, return_trajectory=True)
    # trajectory = (noise, x_hat_0, x_hat_1, ...): steps 0 and 1 are never extrapolated and step 2
    # extrapolates only the move that follows, so the first change is x_hat_3 at index 4.
    torch.testing.assert_close(path[:4], plain_path[:4], rtol=0, atol=0)
    assert (path[4] - plain_path[4]).abs().max() > 1e-3
    expected = linear_euler_loop(ToyNetwork(), noise, labels, time_grid(extrapolated), extrapolation=kappa)
    torch.testing.assert_close(path, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------- guidance


def test_guidance_scale_one_makes_one_conditional_call_per_step():
    noise, labels = toy_inputs()
    network = ToyNetwork()
    settings = SamplerSettings(steps=5, guidance_scale=1.0, guidance_interval=(0.0, 1.0))
    out = sample(network, LINEAR, noise, labels, settings)
    assert [call[0] for call in network.calls] == [3] * 5
    assert all(torch.equal(call[2], labels) for call in network.calls)
    torch.testing.assert_close(out, linear_euler_loop(ToyNetwork(), noise, labels, time_grid(settings))[-1])


def test_guidance_combines_conditional_and_unconditional_outputs_inside_the_interval_only():
    noise, labels = toy_inputs()
    network = ToyNetwork()
    scale, low, high = 2.5, 0.3, 0.7
    settings = SamplerSettings(steps=9, boundary_gaps=(0.0, 0.05), guidance_scale=scale, guidance_interval=(low, high))
    _, path = sample(network, LINEAR, noise, labels, settings, return_trajectory=True)
    expected = linear_euler_loop(
        ToyNetwork(), noise, labels, time_grid(settings), guidance=(scale, low, high, ToyNetwork.num_classes)
    )
    torch.testing.assert_close(path, expected, rtol=1e-12, atol=1e-12)

    grid = time_grid(settings)[:-1]
    inside = (grid >= low) & (grid <= high)
    assert 0 < int(inside.sum()) < len(grid)
    assert len(network.calls) == count_network_evaluations(settings)
    for (batch, t_net, call_labels, _), guided in zip(network.calls, inside.tolist()):
        if guided:  # one batched call: conditional rows, then the null label
            assert batch == 6
            assert torch.equal(call_labels, torch.tensor([0, 1, 2, 3, 3, 3]))
            assert torch.equal(t_net[:3], t_net[3:])
        else:
            assert batch == 3 and torch.equal(call_labels, labels)


def test_guidance_interval_is_closed_at_both_ends():
    noise, labels = toy_inputs()
    network = ToyNetwork()
    # grid [1, 0.75, 0.5, 0.25, 0]: the interval's ends are grid points
    settings = SamplerSettings(steps=4, boundary_gaps=(0.0, 0.0), guidance_scale=2.0, guidance_interval=(0.25, 0.75))
    sample(network, LINEAR, noise, labels, settings)
    assert [call[0] for call in network.calls] == [3, 6, 6, 6]


def test_guidance_needs_a_null_label_from_the_network_or_the_caller():
    noise, labels = toy_inputs()
    settings = SamplerSettings(steps=2, guidance_scale=2.0)

    def bare(x_t, t_net, call_labels, r=None):
        return ToyNetwork()(x_t, t_net, call_labels)

    with pytest.raises(ValueError, match="null_label"):
        sample(bare, LINEAR, noise, labels, settings)
    with_argument = sample(bare, LINEAR, noise, labels, settings, null_label=3)
    torch.testing.assert_close(with_argument, sample(ToyNetwork(), LINEAR, noise, labels, settings))


# ------------------------------------------------------------------------------- shapes and counts


@pytest.mark.parametrize("steps, order", [(5, 1), (1, 1), (5, 2), (6, 2), (1, 2)])
def test_trajectory_stacks_noise_and_every_raw_prediction(steps, order):
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    network = ToyNetwork()
    settings = SamplerSettings(steps=steps, order=order)
    out, trajectory = sample(network, LINEAR, noise, torch.tensor([0, 1, 2]), settings, return_trajectory=True)
    evaluations = count_network_evaluations(settings)
    assert trajectory.shape == (evaluations + 1, 3, 2, 4, 4)
    assert trajectory.dtype == torch.float32 and out.dtype == torch.float32 and out.shape == noise.shape
    torch.testing.assert_close(trajectory[0], noise, rtol=0, atol=0)
    torch.testing.assert_close(trajectory[-1], out, rtol=0, atol=0)
    # the network sees the noise's dtype, not the float64 state
    assert all(call[3] == torch.float32 and call[1].dtype == torch.float32 for call in network.calls)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("gaps", [(0.0, 0.0), (0.001, 0.001)])
@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_count_network_evaluations_matches_the_calls_made(steps, order, gaps, guidance_scale):
    noise, labels = toy_inputs(batch=2)
    network = ToyNetwork()
    settings = SamplerSettings(
        steps=steps, order=order, boundary_gaps=gaps, guidance_scale=guidance_scale, guidance_interval=(0.2, 0.8)
    )
    sample(network, LINEAR, noise, labels, settings)
    assert len(network.calls) == count_network_evaluations(settings)
    if order == 1 or steps % 2 == 1:
        assert count_network_evaluations(settings) == steps
    else:
        assert count_network_evaluations(settings) == steps - 1


@pytest.mark.parametrize("name", ["relinear", "trigflow", "edm", "vp_cosine"])
def test_every_transport_samples_with_first_and_second_order(name):
    transport = build_transport(name)
    noise, labels = toy_inputs()
    for order in (1, 2):
        out = sample(ToyNetwork(), transport, noise, labels, SamplerSettings(steps=5, order=order))
        assert out.shape == noise.shape and bool(torch.isfinite(out).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stochastic_guided_sampler_runs_on_cuda_and_matches_cpu_without_noise():
    noise, labels = toy_inputs()
    settings = SamplerSettings(steps=6, guidance_scale=2.0, guidance_interval=(0.2, 0.8), extrapolation=0.4)
    cpu = sample(ToyNetwork(), LINEAR, noise, labels, settings)
    cuda = sample(ToyNetwork(), LINEAR, noise.cuda(), labels.cuda(), settings)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-9, atol=1e-9)
    stochastic = SamplerSettings(steps=3, stochasticity=1.0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    out = sample(ToyNetwork(), LINEAR, noise.cuda(), labels.cuda(), stochastic, generator=generator)
    assert out.device.type == "cuda" and bool(torch.isfinite(out).all())
