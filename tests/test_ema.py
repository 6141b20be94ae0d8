"""ModelEMA and the target-network policies (ucgm_core/ema.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ucgm_core.ema import FrozenTargetNetwork, LiveTargetNetwork, ModelEMA, TargetNetwork


def _small_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _perturb(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype).to(parameter.device))
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.add_(1.0)
            else:
                buffer.add_(3)


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_ema_update_equals_decay_formula_and_copies_buffers():
    model = _small_model()
    ema = ModelEMA(model, decay=0.9, warmup=False)
    before = _parameters(ema.module)
    _perturb(model, seed=1)
    ema.update(model)
    online = _parameters(model)
    for name, value in _parameters(ema.module).items():
        expected = 0.9 * before[name] + 0.1 * online[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-14)
    for (name, own), (_, source) in zip(ema.module.named_buffers(), model.named_buffers()):
        assert torch.equal(own, source), name


def test_ema_copy_is_detached_and_separate_from_the_model():
    model = _small_model()
    ema = ModelEMA(model, decay=0.5, warmup=False)
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ema.module.parameters(), model.parameters()))


def test_warmup_first_update_copies_then_decay_follows_halving_recursion():
    model = _small_model()
    ema = ModelEMA(model, decay=0.999, warmup=True)
    assert ema.current_decay == 0.0
    _perturb(model, seed=2)
    ema.update(model)
    for name, value in _parameters(ema.module).items():
        assert torch.equal(value, _parameters(model)[name]), name

    expected_decays = [0.0]
    for _ in range(6):
        d = expected_decays[-1]
        expected_decays.append(d + (1 - d) * (0.999 - d) / 2)
    assert expected_decays[1] == pytest.approx(0.4995)
    assert ema.current_decay == pytest.approx(expected_decays[1], abs=1e-15)

    # the second update must use decay 0.4995
    before = _parameters(ema.module)
    _perturb(model, seed=3)
    ema.update(model)
    online = _parameters(model)
    for name, value in _parameters(ema.module).items():
        expected = 0.4995 * before[name] + 0.5005 * online[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-13)
    for _ in range(4):
        ema.update(model)
    assert ema.current_decay == pytest.approx(expected_decays[6], abs=1e-15)
    assert ema.current_decay < 0.999


def test_warmup_decay_converges_to_target():
    model = _small_model()
    ema = ModelEMA(model, decay=0.99, warmup=True)
    # gap g = target - d shrinks like 2 / n while g >> 1 - target (so d ~ 1 - 2/n: an average over
    # roughly the last n/2 updates), then geometrically by 1 - (1 - target)/2 per update
    decays = []
    for _ in range(3000):
        ema.update(model)
        decays.append(ema.current_decay)
    assert all(a < b for a, b in zip(decays, decays[1:]))
    assert 1 - decays[49] == pytest.approx(2 / 50, rel=0.25)
    assert ema.current_decay == pytest.approx(0.99, abs=1e-6)


def test_decay_setter_without_warmup_takes_effect_and_is_validated():
    model = _small_model()
    ema = ModelEMA(model, decay=0.9, warmup=False)
    ema.decay = 0.5
    assert ema.current_decay == 0.5
    with pytest.raises(ValueError, match="decay"):
        ema.decay = 1.5
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=-0.1)


def test_bfloat16_parameters_are_averaged_in_float32():
    model = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.999, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.5)
    for _ in range(100):
        ema.update(model)
    expected = 1.5 - 0.5 * 0.999**100  # 1.0476, while pure bf16 steps of 5e-4 would stay at 1.0
    assert ema.module.weight.dtype == torch.bfloat16
    assert (ema.module.weight.float() - expected).abs().max() < 2**-7
    assert (ema.module.weight.float() != 1.0).all()


def test_ema_state_dict_round_trip_resumes_identically():
    model = _small_model()
    ema = ModelEMA(model, decay=0.99, warmup=True)
    for seed in range(3):
        _perturb(model, seed)
        ema.update(model)
    restored = ModelEMA(_small_model(seed=7), decay=0.5, warmup=False)
    restored.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert restored.decay == 0.99 and restored.warmup and restored.updates == 3
    assert restored.current_decay == ema.current_decay
    for seed in (10, 11):
        _perturb(model, seed)
        ema.update(model)
        restored.update(model)
    for name, value in _parameters(ema.module).items():
        assert torch.equal(value, _parameters(restored.module)[name]), name


def test_bfloat16_state_dict_keeps_float32_shadows():
    model = nn.Linear(2, 2).to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.999, warmup=False)
    with torch.no_grad():
        model.weight.add_(0.5)
    for _ in range(10):
        ema.update(model)
    state = ema.state_dict()
    assert state["shadows"]["weight"].dtype == torch.float32
    restored = ModelEMA(nn.Linear(2, 2).to(torch.bfloat16), decay=0.999, warmup=False)
    restored.load_state_dict(state)
    for _ in range(5):
        ema.update(model)
        restored.update(model)
    assert torch.equal(ema.state_dict()["shadows"]["weight"], restored.state_dict()["shadows"]["weight"])


class _NotCopyable(nn.Linear):
    def __deepcopy__(self, memo):
        raise AssertionError("the live policy must not copy the model")


def test_live_policy_returns_the_online_module_without_copying():
    model = _NotCopyable(2, 2)
    target = TargetNetwork.create("live", model)
    assert isinstance(target, LiveTargetNetwork)
    assert target.module(model) is model
    target.update(model)
    assert target.state_dict() == {"policy": "live"}


def test_frozen_policy_keeps_the_weights_at_creation():
    model = _small_model()
    initial = _parameters(model)
    target = TargetNetwork.create("frozen", model)
    assert isinstance(target, FrozenTargetNetwork)
    _perturb(model, seed=4)
    target.update(model)
    frozen = target.module(model)
    assert frozen is not model
    for name, value in _parameters(frozen).items():
        assert torch.equal(value, initial[name]), name
    assert all(not p.requires_grad for p in frozen.parameters())


def test_ema_policy_follows_the_online_module():
    model = _small_model()
    target = TargetNetwork.create("ema", model, decay=0.9, warmup=False)
    before = _parameters(target.module(model))
    _perturb(model, seed=5)
    target.update(model)
    online = _parameters(model)
    for name, value in _parameters(target.module(model)).items():
        torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * online[name], rtol=0, atol=1e-14)


@pytest.mark.parametrize("policy", ["ema", "live", "frozen"])
def test_target_network_state_dict_round_trip(policy):
    model = _small_model()
    target = TargetNetwork.create(policy, model, decay=0.9, warmup=True)
    _perturb(model, seed=6)
    target.update(model)
    target.update(model)
    other_model = _small_model(seed=3)
    restored = TargetNetwork.create(policy, other_model, decay=0.5, warmup=False)
    restored.load_state_dict(target.state_dict())
    if policy == "live":
        assert restored.module(other_model) is other_model
        return
    for name, value in _parameters(target.module(model)).items():
        assert torch.equal(value, _parameters(restored.module(other_model))[name]), name


def test_target_network_rejects_state_of_another_policy_and_unknown_policy():
    model = _small_model()
    frozen = TargetNetwork.create("frozen", model)
    with pytest.raises(ValueError, match="policy"):
        TargetNetwork.create("ema", model).load_state_dict(frozen.state_dict())
    with pytest.raises(ValueError, match="policy"):
        TargetNetwork.create("average", model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ema_update_on_cuda_matches_cpu():
    model = _small_model(dtype=torch.float32)
    cpu_ema = ModelEMA(model, decay=0.9, warmup=True)
    cuda_model = copy.deepcopy(model).cuda()
    cuda_ema = ModelEMA(cuda_model, decay=0.9, warmup=True)
    for seed in range(3):
        _perturb(model, seed)
        _perturb(cuda_model, seed)
        cpu_ema.update(model)
        cuda_ema.update(cuda_model)
    for name, value in _parameters(cpu_ema.module).items():
        torch.testing.assert_close(_parameters(cuda_ema.module)[name].cpu(), value)
