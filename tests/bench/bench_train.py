"""Benchmark: orchestration overhead of training through Ray Train + DeepSpeed.

Measured in one run, on the same model, data, objective and batch:
  1. a bare single-process PyTorch loop (DiT + UnifiedObjective + AdamW + clipping + EMA);
  2. the same DeepSpeed engine in the benchmark's own process, without Ray (ZeRO stage 0);
  3. Ray Train + DeepSpeed with 1 worker (ZeRO stage 0, and 2);
  4. Ray Train + DeepSpeed with 2 workers (ZeRO stage 2).
The per-step time is split into forward (objective), backward (with the gradient reduction
DeepSpeed overlaps into it) and optimiser step (clipping, EMA, and ZeRO's parameter gathering),
timed on rank 0 inside the workers; the synchronous all-reduce of a gradient-sized buffer is
timed separately as the communication cost.

    .venv/bin/python tests/bench/bench_train.py [--steps 200] [--model tiny] [--batch 128]
    .venv/bin/python tests/bench/bench_train.py --gpu --model B --image-size 32   # on a GPU machine

Prints a markdown table; paste it into tests/bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.train.batches import BatchSchedule, step_generator  # noqa: E402
from orchestrator.config import load_job  # noqa: E402
from ucgm_core.datasets import load_dataset  # noqa: E402
from ucgm_core.dit import build_dit  # noqa: E402
from ucgm_core.ema import ModelEMA  # noqa: E402
from ucgm_core.systems import UnifiedObjective  # noqa: E402
from ucgm_core.transports import build_transport  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def job(args, *overrides):
    base = [
        f"model.size={args.model}",
        f"train.batch_size={args.batch}",
        f"train.steps={args.steps}",
        "tracking.enabled=false",
        f"output_dir={args.output}",
        "train.checkpoint_every=1000000",
        "train.sample_every=1000000",
        "evaluation.num_samples=2",
    ]
    if args.gpu:
        base += ["distributed.gpus_per_worker=1"]
    if args.image_size:
        base += [f"data.image_size={args.image_size}"]
    return load_job(ROOT / "jobs/digits.yaml", base + list(overrides))


def bare_loop(args) -> dict:
    """Timings of the plainest loop that trains the same thing (objective, AdamW, clipping, EMA)."""
    config = job(args)
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.manual_seed(0)
    data = load_dataset("digits", image_size=args.image_size)
    images = data.images
    model = build_dit(config.model, input_size=images.shape[-1], in_channels=images.shape[1], num_classes=10).to(device)
    objective = UnifiedObjective(build_transport("linear"), config.objective)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = ModelEMA(model, decay=0.999)
    schedule = BatchSchedule(len(images), args.batch, 0)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.gpu)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    split = {"forward": [], "backward": [], "optimizer": [], "total": []}
    for step in range(args.steps):
        t0 = time.perf_counter()
        index = schedule.global_indices(step)
        with torch.autocast(**autocast):
            loss = objective(model, None, images[index].to(device), data.labels[index].to(device), generator=step_generator(0, step, 0, device)).loss
        sync()
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model)
        sync()
        t3 = time.perf_counter()
        for key, value in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2), ("total", t3 - t0)):
            split[key].append(value)
    skip = args.steps // 5
    result = {k: statistics.median(v[skip:]) for k, v in split.items()}
    result["allreduce_gradient_sized"] = 0.0
    result["images_per_second"] = args.batch / result["total"]
    return result


def timed_steps(config, device, rank: int, world_size: int) -> dict:
    """The real TrainingRun + DeepSpeedOptimization, with timers around each part of a step."""
    from orchestrator.train.ray_backend import DeepSpeedOptimization
    from orchestrator.train.loop import TrainingRun

    run = TrainingRun(config, device=device, rank=rank, world_size=world_size)
    optimization = DeepSpeedOptimization(run)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    split = {"forward": [], "backward": [], "optimizer": [], "total": []}
    for step in range(config.train.steps):
        t0 = time.perf_counter()
        loss, _ = run.loss(optimization.network, step, 0)
        sync()
        t1 = time.perf_counter()
        optimization.engine.backward(loss)
        sync()
        t2 = time.perf_counter()
        optimization.engine.step()
        with optimization.gathered_parameters():
            run.update_averages()
        sync()
        t3 = time.perf_counter()
        for key, value in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2), ("total", t3 - t0)):
            split[key].append(value)
    buffer = torch.zeros(sum(p.numel() for p in run.ema.module.parameters()), device=device)
    communication = []
    for _ in range(20):
        t0 = time.perf_counter()
        torch.distributed.all_reduce(buffer)
        sync()
        communication.append(time.perf_counter() - t0)
    skip = config.train.steps // 5
    result = {k: statistics.median(v[skip:]) for k, v in split.items()}
    result["allreduce_gradient_sized"] = statistics.median(communication[5:])
    result["images_per_second"] = config.train.batch_size / result["total"]
    return result


def timed_worker(loop_config):
    """A Ray Train worker running `timed_steps`."""
    import ray.train
    import ray.train.torch

    from orchestrator.config import validate_job

    context = ray.train.get_context()
    result = timed_steps(
        validate_job(loop_config["job"]), ray.train.torch.get_device(), context.get_world_rank(), context.get_world_size()
    )
    if context.get_world_rank() == 0:  # Train V2 keeps metrics only with checkpoints: use a file
        Path(loop_config["timings_path"]).write_text(json.dumps(result))


def deepspeed_without_ray(args) -> dict:
    """The same engine in this process, on a one-process gloo group: separates DeepSpeed's
    cost from Ray's."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.gpu else "cpu")
    torch.distributed.init_process_group("nccl" if args.gpu else "gloo", rank=0, world_size=1)
    device = torch.device("cuda" if args.gpu else "cpu")
    try:
        return timed_steps(job(args, "distributed.zero_stage=0"), device, 0, 1)
    finally:
        torch.distributed.destroy_process_group()


def ray_run(args, workers: int, zero: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cpus = max(1, (os.cpu_count() or 1) // workers)  # the whole machine, split between the workers
    config = job(
        args,
        f"distributed.num_workers={workers}",
        f"distributed.cpus_per_worker={cpus}",
        f"distributed.zero_stage={zero}",
        f"name=bench_w{workers}_z{zero}",
    )
    timings_path = os.path.abspath(os.path.join(args.output, f"{config.name}.json"))
    os.makedirs(args.output, exist_ok=True)
    resources = {"CPU": config.distributed.cpus_per_worker}
    if args.gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        timed_worker,
        train_loop_config={"job": config.model_dump(mode="json"), "timings_path": timings_path},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=args.gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
        run_config=RunConfig(name=config.name, storage_path=os.path.abspath(args.output)),
    )
    trainer.fit()
    return json.loads(Path(timings_path).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--output", default="/tmp/ucgm-bench-train")
    args = parser.parse_args()

    import ray

    from orchestrator.train.ray_backend import connect_for_training

    bare_timings = bare_loop(args)
    bare = bare_timings["images_per_second"]
    connect_for_training(job(args, "distributed.num_workers=2", "distributed.cpus_per_worker=1"))
    rows = [("bare single-process loop", bare, bare_timings)]
    engine_only = deepspeed_without_ray(args)
    rows.append(("DeepSpeed engine, ZeRO-0, this process, no Ray", engine_only["images_per_second"], engine_only))
    for workers, zero in ((1, 0), (1, 2), (2, 2)):
        timings = ray_run(args, workers, zero)
        rows.append((f"Ray Train + DeepSpeed, {workers} worker(s), ZeRO-{zero}", timings["images_per_second"], timings))
    ray.shutdown()

    device = torch.cuda.get_device_name() if args.gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"\nmodel {args.model}, batch {args.batch}, {args.steps} steps (median of the last 80%), {device}, torch {torch.__version__}\n")
    print("| setup | images/s | vs bare | forward ms | backward ms | optimizer ms | all-reduce of gradient-sized buffer ms |")
    print("|---|---|---|---|---|---|---|")
    for name, rate, timings in rows:
        cells = [f"{1000 * timings[k]:.1f}" for k in ("forward", "backward", "optimizer", "allreduce_gradient_sized")]
        print(f"| {name} | {rate:.0f} | {rate / bare:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
