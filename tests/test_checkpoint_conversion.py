"""A DeepSpeed checkpoint converted for another worker count and ZeRO stage
(orchestrator.train.checkpoint_conversion) loads with its weights, Adam moments, Adam step, lr
schedule and client state exact, and the next optimiser step is the one the writer would take.

Real DeepSpeed engines in real process groups (gloo, torch.multiprocessing), no Ray: checkpoints
written by 2 workers at ZeRO 0, 1, 2 and 3, loaded by 1 and 3 workers at every stage. The Ray
runs that resume this way end to end are in test_train_ray.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

TAG = "state"
BATCH = 6  # divides into 1, 2 and 3 workers
SAVED_WORKERS = 2
STAGES = (0, 1, 2, 3)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 7 x 13 and 13 x 5 weights: element counts that do not divide into 2 or 3 partitions (ZeRO pads)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 5))


def _batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    inputs, targets = torch.randn(BATCH, 7, generator=generator), torch.randn(BATCH, 5, generator=generator)
    share = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    return inputs[share], targets[share]


def _engine(zero_stage: int, world_size: int, load_universal: bool):
    import deepspeed

    model = _model()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # before ZeRO-3 partitions them
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    config = {
        "train_batch_size": BATCH,
        "train_micro_batch_size_per_gpu": BATCH // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    return engine, shapes


def _step(engine, step: int, rank: int, world_size: int) -> None:
    inputs, targets = _batch(step, rank, world_size)
    engine.backward(((engine(inputs) - targets) ** 2).mean())
    engine.step()


def _state(engine, zero_stage: int) -> dict[str, object]:
    """Every parameter's whole weights, Adam moments and step, and the learning rate."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state: dict[str, object] = {"lr": engine.get_lr()[0]}
    for name, p in engine.module.named_parameters():
        if zero_stage == 0:
            moments = engine.optimizer.state[p]
            state[name] = (p.detach().clone(), moments["exp_avg"].clone(), moments["exp_avg_sq"].clone(), {float(moments["step"])})
            continue
        with deepspeed.zero.GatheredParameters([p]) if zero_stage == 3 else torch.no_grad():
            weights = p.detach().clone()
        state[name] = (
            safe_get_full_fp32_param(p).reshape(weights.shape).clone(),
            safe_get_full_optimizer_state(p, "exp_avg").reshape(weights.shape).clone(),
            safe_get_full_optimizer_state(p, "exp_avg_sq").reshape(weights.shape).clone(),
            {float(group["step"]) for group in engine.optimizer.optimizer.state.values()},
        )
        assert torch.equal(state[name][0], weights), f"{name}: the module's weights are not the optimiser's"
    return state


def _worker(rank: int, world_size: int, port: int, mode: str, zero_stage: int, root: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    import deepspeed

    from orchestrator.train.checkpoint_conversion import converted_checkpoint, loads_universal

    deepspeed.init_distributed("gloo")
    if mode == "save":  # one checkpoint per stage, then the step after it
        for stage in STAGES:
            engine, _ = _engine(stage, world_size, load_universal=False)
            for step in range(3):
                _step(engine, step, rank, world_size)
            engine.save_checkpoint(os.path.join(root, f"saved-{stage}"), tag=TAG, client_state={"step": 3})
            saved = _state(engine, stage)
            _step(engine, 3, rank, world_size)
            after = _state(engine, stage)  # a collective under ZeRO: every rank gathers
            if rank == 0:
                torch.save({"saved": saved, "next": after}, os.path.join(root, f"saved-{stage}.pt"))
        return
    for saved_stage in STAGES:  # every saved checkpoint, converted for this worker count and stage
        engine, parameters = _engine(zero_stage, world_size, load_universal=loads_universal(zero_stage))
        folder = os.path.join(root, f"saved-{saved_stage}")
        with converted_checkpoint(folder, TAG, saved_stage=saved_stage, zero_stage=zero_stage, parameters=parameters) as converted:
            _, client_state = engine.load_checkpoint(converted, tag=TAG)
        assert client_state["step"] == 3
        loaded = _state(engine, zero_stage)
        _step(engine, 3, rank, world_size)
        after = _state(engine, zero_stage)
        if rank == 0:
            torch.save({"saved": loaded, "next": after}, os.path.join(root, f"loaded-{saved_stage}-{world_size}-{zero_stage}.pt"))


def _spawn(world_size: int, mode: str, zero_stage: int, root: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(world_size, port, mode, zero_stage, str(root)), nprocs=world_size)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conversion")
    _spawn(SAVED_WORKERS, "save", -1, root)
    return root


@pytest.mark.parametrize(("world_size", "zero_stage"), [(1, 0), (3, 3), (1, 3), *(pytest.param(*pair, marks=pytest.mark.slow) for pair in [(3, 0), (1, 1), (3, 2)])])
def test_a_checkpoint_of_2_workers_at_any_zero_stage_loads_exactly_at_another_worker_count_and_stage(saved, world_size, zero_stage):
    _spawn(world_size, "load", zero_stage, saved)
    for saved_stage in STAGES:
        written = torch.load(saved / f"saved-{saved_stage}.pt", weights_only=False)
        loaded = torch.load(saved / f"loaded-{saved_stage}-{world_size}-{zero_stage}.pt", weights_only=False)
        case = f"ZeRO-{saved_stage} x {SAVED_WORKERS} -> ZeRO-{zero_stage} x {world_size}"
        assert loaded["saved"]["lr"] == written["saved"]["lr"], case
        for name in (name for name in written["saved"] if name != "lr"):
            weights, exp_avg, exp_avg_sq, step = written["saved"][name]
            loaded_weights, loaded_exp_avg, loaded_exp_avg_sq, loaded_step = loaded["saved"][name]
            assert torch.equal(loaded_weights, weights), f"{case}: {name} weights"
            assert torch.equal(loaded_exp_avg, exp_avg), f"{case}: {name} exp_avg"
            assert torch.equal(loaded_exp_avg_sq, exp_avg_sq), f"{case}: {name} exp_avg_sq"
            assert loaded_step == step == {3.0}, f"{case}: {name} Adam step"
            # the next step, on the same global batch split another way: the same update, up to
            # the order of the gradient reduction
            torch.testing.assert_close(loaded["next"][name][0], written["next"][name][0], rtol=1e-5, atol=1e-7, msg=f"{case}: {name}")
