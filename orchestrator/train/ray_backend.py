"""The Ray Train backend: a `TorchTrainer` whose workers run the shared training loop through a
DeepSpeed engine.

Who owns what:
- Ray: placement (`ScalingConfig`), the process group (gloo on CPU, NCCL on GPU), restarts of
  failed workers (`FailureConfig`; a `JobError` is not retried, see
  orchestrator.train.worker_errors), checkpoint persistence and retention (`RunConfig` storage,
  `CheckpointConfig`), and resuming a re-submitted job from its newest checkpoint.
- DeepSpeed: the optimiser, gradient accumulation, gradient clipping, mixed precision and ZeRO
  sharding (stage 0 = plain data parallel, 1, 2, 3). Ray's `prepare_model` is never called: the
  engine does the wrapping.
- Us: the objective, the EMA and target network (full copies made before the engine shards the
  network, updated inside `GatheredParameters` under ZeRO-3), sample grids, MLflow on rank 0.

A checkpoint is one folder per step under `<output_dir>/<name>/checkpoint_XXXXXXXX/`: every rank's
DeepSpeed shard plus `ucgm_state.pt` (EMA, target network, step, MLflow run id, config) from rank 0.

The job reaches `run_train_ray` checked and with absolute paths (orchestrator.job_checks): workers
run in their own working directories.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Any

import torch

from orchestrator import cluster, storage
from orchestrator.train import worker_errors
from orchestrator.train.checkpoints import checkpoint_folder_name, latest_checkpoint, load_resumable_state
from orchestrator.config import JobConfig, validate_job
from orchestrator.train.optimizer import build_optimizer, warmup_schedule
from orchestrator.train.loop import TrainingRun, TrainSummary, tracker_factory, train_loop

logger = logging.getLogger(__name__)

UCGM_STATE_FILE = "ucgm_state.pt"
DEEPSPEED_TAG = "state"

# Read by Ray Train's controller and workers at start. The health-check interval is how often the
# controller polls worker reports; its default (2 s) would make every report a 2 s stall. Worker
# start-up (importing torch and DeepSpeed) can pass the default 60 s limit on a loaded machine;
# an infeasible request is refused up front by `check_resources` instead.
_WORKER_ENVIRONMENT = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
}


# --------------------------------------------------------------------------- worker side


def deepspeed_config(config: JobConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of a job: the global batch is `train.batch_size` whatever the worker count."""
    train = config.train
    micro_batch = train.batch_size // (world_size * train.gradient_accumulation_steps)
    settings: dict[str, Any] = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": train.gradient_clip,
        "zero_optimization": {"stage": config.distributed.zero_stage},
        # our optimiser is torch's AdamW/RAdam, which ZeRO shards like its own
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # parameters and optimiser state stay float32 (so the EMA is exact); matmuls run in bf16
        settings["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return settings


class DeepSpeedOptimization:
    """The DeepSpeed engine behind the loop's `Optimization` interface."""

    def __init__(self, run: TrainingRun):
        import deepspeed

        self._deepspeed = deepspeed
        optimizer = build_optimizer(run.trained.parameters(), run.config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(run.config.train.warmup_steps))
        self.engine, _, _, _ = deepspeed.initialize(
            model=run.trained,  # the network and the objective's extra modules, sharded alike
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(run.config, run.world_size, run.autocast_dtype is not None),
        )
        self.network = self.engine
        self.zero_stage = run.config.distributed.zero_stage
        self.device = run.device
        self._unsharded_norm: float | None = None

    def micro_step(self, loss: torch.Tensor) -> None:
        # the engine scales by 1/accumulation and only steps at the accumulation boundary
        self.engine.backward(loss)
        if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # without ZeRO the engine does not keep the norm it clips by; read it before the step
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._unsharded_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self.engine.step()

    def finish_step(self) -> float:
        norm = self.engine.get_global_grad_norm() if self.zero_stage > 0 else self._unsharded_norm
        return float(norm) if norm is not None else float("nan")

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

    def gathered_parameters(self) -> contextlib.AbstractContextManager:
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        return self._deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)

    def mean_over_ranks(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item()) / torch.distributed.get_world_size()


class RayCheckpointer:
    """Every rank writes its DeepSpeed shard into a local folder, rank 0 adds the UCGM state, and
    all ranks hand their folder to one `ray.train.report`, which merges and persists them."""

    def __init__(self, config: JobConfig):
        self.config = config

    def restore(self, run: TrainingRun, optimization: DeepSpeedOptimization) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state = load_resumable_state(folder, self.config, UCGM_STATE_FILE)
            _, client_state = optimization.engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)
        run.load_averages_state(state)
        run.step = int(client_state["step"])
        return state

    def save(self, run: TrainingRun, optimization: DeepSpeedOptimization, extra: dict[str, Any], metrics: dict[str, float]) -> None:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as folder:
            optimization.engine.save_checkpoint(folder, tag=DEEPSPEED_TAG, client_state={"step": run.step})
            if run.rank == 0:
                state = {"step": run.step, "config": self.config.model_dump(mode="json"), **run.averages_state(), **extra}
                torch.save(state, os.path.join(folder, UCGM_STATE_FILE))
            ray.train.report(
                dict(metrics),
                checkpoint=Checkpoint.from_directory(folder),
                checkpoint_dir_name=checkpoint_folder_name(run.step),
            )
        if run.rank == 0:
            logger.info("checkpoint step %d -> %s", run.step, storage.join(self.config.run_dir, checkpoint_folder_name(run.step)))

    def report(self, metrics: dict[str, float]) -> None:
        import ray.train

        ray.train.report(dict(metrics))


def train_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ray").setLevel(logging.WARNING)  # one line per report otherwise
    config = validate_job(loop_config["job"])
    context = ray.train.get_context()
    with worker_errors.job_errors_end_the_run(config.run_dir, context.get_world_rank()):
        run = TrainingRun(
            config,
            device=ray.train.torch.get_device(),
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
        )
        train_loop(run, DeepSpeedOptimization(run), RayCheckpointer(config), tracker_factory(config))


# --------------------------------------------------------------------------- driver side


def check_resumable(config: JobConfig) -> None:
    """Refuse, before any worker starts, a run folder whose newest checkpoint this job cannot
    resume (unreadable, or written for another model/data/transport); nothing is changed."""
    latest = latest_checkpoint(config.run_dir)
    if latest is None:
        return
    load_resumable_state(latest[1], config, UCGM_STATE_FILE)


def connect_for_training(config: JobConfig) -> None:
    """Join the cluster the job names, or start a local one in-process (reused if already up),
    with the environment Ray Train and DeepSpeed read at start."""
    os.environ.update({k: v for k, v in _WORKER_ENVIRONMENT.items() if k not in os.environ})
    if config.distributed.gpus_per_worker == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
    cluster.connect(config.distributed.ray_address, config.distributed.num_workers * config.distributed.cpus_per_worker)


def check_resources(config: JobConfig) -> None:
    """Fail with a clear message when the cluster can never place the workers, instead of
    waiting forever for resources that will not come."""
    distributed = config.distributed
    cluster.check_fits(
        distributed.num_workers,
        {"CPU": distributed.cpus_per_worker, "GPU": distributed.gpus_per_worker},
        f"{distributed.num_workers} training workers (distributed.num_workers)",
        "lower distributed.num_workers, distributed.cpus_per_worker or distributed.gpus_per_worker",
    )


def _forwarded_environment() -> dict[str, str]:
    """Settings the workers need from the driver's environment. Credentials are not forwarded:
    workers read them from their own environment (cluster secrets), so they never enter a
    runtime_env that the dashboard shows."""
    names = (*_WORKER_ENVIRONMENT, "DS_ACCELERATOR")
    return {k: v for k, v in os.environ.items() if k in names or k.startswith("UCGM_")}


def run_train_ray(config: JobConfig, callbacks: tuple[Any, ...] = ()) -> TrainSummary:
    """Train with Ray Train + DeepSpeed; re-running the same job (same output_dir and name)
    resumes from its newest checkpoint. `callbacks`: Ray Train callbacks, e.g. the one that
    forwards reports to a Tune trial (orchestrator.tune.run)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    check_resumable(config)
    connect_for_training(config)
    check_resources(config)

    distributed = config.distributed
    use_gpu = distributed.gpus_per_worker > 0
    resources = {"CPU": distributed.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = distributed.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": config.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=distributed.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=config.name,
            storage_path=config.output_dir,
            failure_config=FailureConfig(max_failures=distributed.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            worker_runtime_env={"env_vars": _forwarded_environment()},
            callbacks=list(callbacks),
        ),
    )
    worker_errors.clear_recorded(config.run_dir)
    try:
        trainer.fit()
    except TrainingFailedError:
        worker_errors.raise_recorded(config.run_dir)  # one rank's JobError, and the others' collateral failures
        raise
    worker_errors.raise_recorded(config.run_dir)
    return TrainSummary.from_json(storage.read_bytes(storage.join(config.run_dir, "summary.json")).decode())
