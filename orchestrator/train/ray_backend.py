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
import shutil
import tempfile
import threading
import time
from typing import Any

import torch

from orchestrator import cluster, storage
from orchestrator.train import checkpoint_scores, worker_errors
from orchestrator.train.checkpoint_conversion import converted_checkpoint, loads_universal
from orchestrator.errors import JobError
from orchestrator.train.checkpoints import (
    checkpoint_folder_name,
    needs_conversion,
    prune,
    read_state,
    resumable_checkpoint,
    write_manifest,
)
from orchestrator.config import JobConfig, validate_job
from orchestrator.train.optimizer import build_optimizer, warmup_schedule
from orchestrator.train.loop import TrainingRun, TrainSummary, tracker_factory, train_loop
from orchestrator.stopping import RayWorkerStop, StopFlag, StopRequest, Stopped, signals_stop

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


def deepspeed_config(config: JobConfig, world_size: int, accumulation_steps: int, bf16: bool, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a job: the global batch is `train.batch_size` whatever the worker
    count. `load_universal`: the engine will load a universal checkpoint (RayCheckpointer.restore)."""
    train = config.train
    micro_batch = train.batch_size // (world_size * accumulation_steps)
    settings: dict[str, Any] = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation_steps,
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
    if load_universal:
        settings["checkpoint"] = {"load_universal": True}
    return settings


class DeepSpeedOptimization:
    """The DeepSpeed engine behind the loop's `Optimization` interface."""

    def __init__(self, run: TrainingRun, load_universal: bool = False):
        import deepspeed

        self._deepspeed = deepspeed
        optimizer = build_optimizer(run.trained.parameters(), run.config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(run.config.train.warmup_steps))
        self.engine, _, _, _ = deepspeed.initialize(
            model=run.trained,  # the network and the objective's extra modules, sharded alike
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(run.config, run.world_size, run.accumulation_steps, run.autocast_dtype is not None, load_universal),
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
    """Every rank writes its DeepSpeed shard and its manifest into a local folder, rank 0 adds
    the UCGM state, and all ranks hand their folder to one `ray.train.report`, which merges and
    persists them. Resuming reads the run folder's manifests (orchestrator.train.checkpoints), not
    Ray's checkpoint registry, so the driver's pre-start check and the workers agree."""

    def __init__(self, config: JobConfig):
        self.config = config
        self._copies = contextlib.ExitStack()
        self._chosen: int | None = None
        self._local: str | None = None
        # the ZeRO stage of the chosen checkpoint when it is converted before loading (it was written
        # at another stage, or under ZeRO at another worker count), else None
        self.convert_from: int | None = None
        self._parameters: dict[str, tuple[int, ...]] = {}
        self.choose_seconds = 0.0

    def choose(self, run: TrainingRun) -> None:
        """Before the engine is built (a collective): rank 0 picks the checkpoint to resume from
        and every rank learns its step, whether it is converted first, and the micro-batch count
        to train with (see `accumulation_for`)."""
        started = time.perf_counter()
        try:
            self._agree_on_choice(run)
        finally:
            self.choose_seconds = time.perf_counter() - started

    def _agree_on_choice(self, run: TrainingRun) -> None:
        choice: list[Any] = [None]
        if run.rank == 0:
            try:
                choice = [self._choose(run)]
            except JobError as error:  # every rank raises it: the others must not wait for a broadcast
                choice = [error]
        if run.world_size > 1:
            torch.distributed.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], JobError):
            raise choice[0]
        if choice[0] is None:  # a fresh start; an elastic one may start below its largest size
            run.accumulation_steps = accumulation_for(None, run.world_size, self.config, log=run.rank == 0)
            return
        self._chosen, saved_chunks, self.convert_from = choice[0]
        if self.convert_from is not None:  # names and whole shapes, read before a ZeRO-3 engine partitions them
            self._parameters = {name: tuple(p.shape) for name, p in run.trained.named_parameters()}
            if run.rank == 0 and self.config.distributed.elastic:
                logger.info(
                    "resuming checkpoint %d (ZeRO stage %d) on %d workers at stage %d: converting it through DeepSpeed's "
                    "universal checkpoint first", self._chosen, self.convert_from, run.world_size, self.config.distributed.zero_stage,
                )
        # the driver said so already, unless the run is elastic (Ray picks the worker count at start)
        run.accumulation_steps = accumulation_for(saved_chunks, run.world_size, self.config, log=run.rank == 0 and self.config.distributed.elastic)

    def _choose(self, run: TrainingRun) -> tuple[int, int | None, int | None] | None:
        found = resumable_checkpoint(
            self.config.run_dir, self.config, UCGM_STATE_FILE, check_content=True,
            open_folder=lambda folder: self._copies.enter_context(storage.downloaded_folder(folder)),
        )
        if found is None:
            return None
        checkpoint, _ = found
        self._local = checkpoint.local
        convert = needs_conversion(checkpoint.manifest, run.world_size, self.config.distributed.zero_stage)
        return checkpoint.step, (checkpoint.manifest or {}).get("num_chunks"), checkpoint.manifest["zero_stage"] if convert else None

    def restore(self, run: TrainingRun, optimization: DeepSpeedOptimization) -> dict[str, Any] | None:
        if self._chosen is None:
            return None
        folder = storage.join(self.config.run_dir, checkpoint_folder_name(self._chosen))
        with self._copies:  # rank 0's copy, made (and checked) while choosing, is removed after loading
            local = self._local or self._copies.enter_context(storage.downloaded_folder(folder))
            state = read_state(local, self.config, UCGM_STATE_FILE)
            if self.convert_from is not None:  # every rank converts its own copy: ranks on other nodes share no disk
                local = self._copies.enter_context(
                    converted_checkpoint(
                        local, DEEPSPEED_TAG, saved_stage=self.convert_from, zero_stage=self.config.distributed.zero_stage,
                        parameters=self._parameters,
                    )
                )
            _, client_state = optimization.engine.load_checkpoint(local, tag=DEEPSPEED_TAG)
        run.load_averages_state(state)
        run.step = int(client_state["step"])
        return state

    def save(self, run: TrainingRun, optimization: DeepSpeedOptimization, extra: dict[str, Any], metrics: dict[str, float]) -> None:
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        background = self.config.train.checkpoint_upload == "async"
        # with async, Ray deletes the local copy once it is uploaded, after save() has returned;
        # with sync, this method does, after the report (or Ray's skip of it, when a peer failed)
        folder = tempfile.mkdtemp(prefix="ucgm-checkpoint-")
        try:
            optimization.engine.save_checkpoint(folder, tag=DEEPSPEED_TAG, client_state={"step": run.step})
            if run.rank == 0:
                state = {"step": run.step, "config": self.config.model_dump(mode="json"), **run.averages_state(), **extra}
                torch.save(state, os.path.join(folder, UCGM_STATE_FILE))
            # The manifest is what commits the checkpoint, in whatever order the upload copies the
            # files: resuming needs every rank's manifest and every file it lists at its size
            # (checkpoints.checkpoint_problem), so an upload cut off midway, sync or async, is torn.
            write_manifest(
                folder, rank=run.rank, world_size=run.world_size, step=run.step,
                zero_stage=self.config.distributed.zero_stage, num_chunks=run.num_chunks,
            )
            ray.train.report(
                dict(metrics),
                checkpoint=Checkpoint.from_directory(folder),
                checkpoint_dir_name=checkpoint_folder_name(run.step),
                checkpoint_upload_mode=CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC,
                delete_local_checkpoint_after_upload=background,
            )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if not background:
            shutil.rmtree(folder, ignore_errors=True)
        if run.rank == 0:
            logger.info(
                "checkpoint step %d -> %s%s", run.step, storage.join(self.config.run_dir, checkpoint_folder_name(run.step)),
                " (uploading in the background)" if background else "",
            )

    def report(self, metrics: dict[str, float]) -> None:
        import ray.train

        ray.train.report(dict(metrics))


def accumulation_for(saved_chunks: int | None, world_size: int, config: JobConfig, *, log: bool = False) -> int:
    """Gradient accumulation steps for `world_size` workers: those that keep the micro-batches
    per step of the checkpoint resumed (`saved_chunks`), or, on a fresh start, the job's own
    (`JobConfig.num_chunks`: an elastic run keeps its largest size's). A step's data and noise
    depend only on (seed, step, chunk), so keeping the chunk count (2 workers x 1 -> 1 worker x 2)
    trains each step exactly as the uninterrupted run; where the worker count does not divide it,
    the run goes on at the same global batch in another split and no longer reproduces the
    uninterrupted one."""
    configured = config.train.gradient_accumulation_steps
    chunks = config.num_chunks if saved_chunks is None else saved_chunks
    if chunks % world_size == 0:
        accumulation = chunks // world_size
        if log and accumulation != configured:
            logger.info(
                "%d workers: %d gradient accumulation steps (not %d) keep %d micro-batches per step, so the run continues "
                "exactly as it would have", world_size, accumulation, configured, chunks,
            )
        return accumulation
    if log and saved_chunks is not None:
        logger.warning(
            "resuming on %d workers from a checkpoint trained with %d micro-batches per step: %d does not divide into "
            "%d workers, so the run continues at the same global batch (train.batch_size=%d) in %d micro-batches and is "
            "no longer bitwise reproducible against an uninterrupted run",
            world_size, chunks, chunks, world_size, config.train.batch_size, world_size * configured,
        )
    return configured


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
        checkpointer = RayCheckpointer(config)
        checkpointer.choose(run)  # before the engine: a resumed run may train with another accumulation
        stop = RayWorkerStop(loop_config["stop_flag"], run.rank, run.world_size, run.device)
        load_universal = checkpointer.convert_from is not None and loads_universal(config.distributed.zero_stage)
        train_loop(run, DeepSpeedOptimization(run, load_universal), checkpointer, tracker_factory(config), stop)


# --------------------------------------------------------------------------- driver side


def check_resumable(config: JobConfig) -> None:
    """Refuse, before any worker starts, a run folder that holds checkpoints of which none can
    be resumed by this job (orchestrator.train.checkpoints: none committed and readable, or the
    good one written for another model/data/transport); nothing is changed. Torn newer checkpoints are named in warnings."""
    found = resumable_checkpoint(config.run_dir, config, UCGM_STATE_FILE, check_content=False)
    if found is None:
        return
    checkpoint, _ = found
    logger.info("resuming from %s", checkpoint.folder)
    # what the workers will do with it, said once, where the user reads the job's log
    manifest, distributed = checkpoint.manifest, config.distributed
    if distributed.elastic:  # the worker count is Ray's to pick at start: the workers say what they do
        return
    if needs_conversion(manifest, distributed.max_workers, distributed.zero_stage):
        logger.info(
            "the checkpoint was written by %d workers at ZeRO stage %d and this job asks for %d at stage %d: each worker "
            "converts it through DeepSpeed's universal checkpoint first", manifest["world_size"], manifest["zero_stage"],
            distributed.max_workers, distributed.zero_stage,
        )
    accumulation_for((manifest or {}).get("num_chunks"), distributed.max_workers, config, log=True)


def connect_for_training(config: JobConfig) -> None:
    """Join the cluster the job names, or start a local one in-process (reused if already up),
    with the environment Ray Train and DeepSpeed read at start. A local cluster is sized to this
    machine; a job it cannot hold is refused first (ResourceError, nothing started; see
    cluster.check_local_capacity and cluster.TRAIN_WORKER_GIB)."""
    distributed = config.distributed
    cluster.check_local_capacity(
        distributed.ray_address,
        distributed.max_workers,
        distributed.cpus_per_worker,
        cluster.TRAIN_WORKER_GIB,
        f"{distributed.max_workers} training workers (distributed.num_workers)",
        "lower distributed.num_workers or distributed.cpus_per_worker",
    )
    cpus = distributed.max_workers * distributed.cpus_per_worker
    if checkpoint_scores.enabled(config):  # the scoring pool has CPUs of its own, beside the workers'
        evaluation = config.evaluation
        units = distributed.max_workers + evaluation.num_actors
        cluster.check_local_capacity(
            distributed.ray_address,
            units,
            (cpus + evaluation.num_actors * evaluation.cpus_per_actor) / units,  # all their CPUs, shared out
            cluster.TRAIN_WORKER_GIB,
            f"{distributed.max_workers} training workers and {evaluation.num_actors} scoring actors (evaluation.every)",
            "lower distributed.num_workers or evaluation.num_actors, or set evaluation.every=0",
        )
        cpus += evaluation.num_actors * evaluation.cpus_per_actor
    os.environ.update({k: v for k, v in _WORKER_ENVIRONMENT.items() if k not in os.environ})
    if config.distributed.gpus_per_worker == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
    cluster.connect(config.distributed.ray_address, cpus)


def check_resources(config: JobConfig) -> None:
    """Fail with a clear message when the cluster can never place the workers, instead of
    waiting forever for resources that will not come."""
    distributed = config.distributed
    cluster.check_fits(
        distributed.min_workers,  # an elastic run starts with as many as fit, from its minimum
        {"CPU": distributed.cpus_per_worker, "GPU": distributed.gpus_per_worker},
        f"{distributed.min_workers} training workers (distributed.num_workers)",
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
    check_resumable(config)
    connect_for_training(config)  # first: a job this machine cannot hold is refused before Ray Train is even imported
    check_resources(config)

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    distributed = config.distributed
    use_gpu = distributed.gpus_per_worker > 0
    resources = {"CPU": distributed.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = distributed.gpus_per_worker
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # the driver's SIGTERM / Ctrl-C reaches the workers through this actor (orchestrator.stopping),
    # on the driver's node, which lives as long as the driver does (a worker node may be preempted)
    on_this_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    request = StopRequest()
    flag = ray.remote(num_cpus=0, scheduling_strategy=on_this_node)(StopFlag).remote()
    request.on_request(lambda signal_name: flag.request.remote(signal_name))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": config.model_dump(mode="json"), "stop_flag": flag},
        scaling_config=ScalingConfig(
            num_workers=distributed.num_workers if distributed.elastic else distributed.max_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
        ),
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
    forget_ray_checkpoint_registry(config.run_dir)
    # scores the checkpoints evaluation.every names while the workers train (and those a previous run left unscored)
    scoring = checkpoint_scores.CheckpointScoring(config).start()
    try:
        with signals_stop(request):
            _fit(trainer)
    except TrainingFailedError:
        scoring.stop()
        worker_errors.raise_recorded(config.run_dir)  # one rank's JobError, and the others' collateral failures
        raise
    except BaseException:
        scoring.stop()
        raise
    finally:  # Ray's retention covers this fit's checkpoints; the older ones are pruned here
        prune(config.run_dir, config.train.keep_checkpoints)
    worker_errors.raise_recorded(config.run_dir)
    stopped_at = ray.get(flag.stopped_step.remote())
    if stopped_at is not None:
        scoring.stop()  # what is pending is scored by the run that resumes
        raise Stopped(request.signal_name or "a stop request", stopped_at, request.exit_code)
    failed = scoring.finish()
    if failed:
        logger.error("checkpoint scores missing for steps %s; running the job again scores them", sorted(failed))
    return TrainSummary.from_json(storage.read_bytes(storage.join(config.run_dir, "summary.json")).decode())


def forget_ray_checkpoint_registry(run_dir: str) -> None:
    """Remove Ray Train's `checkpoint_manager_snapshot.json` before a fit, so that Ray's registry
    holds only the checkpoints this fit reports. Resuming never reads it (the manifests are the one
    source of truth, orchestrator.train.checkpoints), and after a torn checkpoint it is wrong: the
    resumed run writes the torn step's folder again, Ray's retention then deletes that folder as
    the old entry of the same name, and the next fit refuses to start on a snapshot naming a
    checkpoint that is gone (CheckpointManagerInitializationError, found in the S3 torn test).
    Retention across fits is `prune`'s, after each fit."""
    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    if storage.exists(snapshot):
        storage.remove(snapshot)


def _fit(trainer: Any) -> None:
    """`trainer.fit()`, from a second thread when called from the main one. Ray Train's `fit`
    installs, in the main thread, a SIGINT handler that aborts the run without a checkpoint; from
    another thread it installs none, and the main thread stays free to run `signals_stop`'s."""
    if threading.current_thread() is not threading.main_thread():
        trainer.fit()
        return
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # handed to the main thread, which raises it
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short waits: signal handlers run between them
    if "error" in outcome:
        raise outcome["error"]
