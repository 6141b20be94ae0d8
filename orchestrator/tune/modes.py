"""What differs between a training sweep and a sampling-only sweep: one object per `mode:`.

    TrainingSweep   every trial trains (Ray Train + DeepSpeed workers); ASHA may stop it early
                    on the quick score; best_job.yaml is a `train` job
    SamplingSweep   every trial evaluates one model file with its sampler settings (Ray Data
                    actors), or the run's post-hoc EMA of the trial's posthoc_ema.sigma_rel;
                    best_job.yaml is an `evaluate` job

Before the first trial the base job is checked for the mode's verb (orchestrator.job_checks):
a training sweep's data and initial weights, a sampling sweep's model file and reference
statistics. The spec (validation, the base job), the driver (checks, resources, scheduler,
trainable) and the report (columns, the best job's verb) ask the sweep's mode,
`mode_of(config)`, instead of branching on its name. A new mode is a subclass here and one
entry in MODES.

Nothing from the rest of `orchestrator.tune` is imported at module level (the trainables are
imported when asked for): the spec imports this table to validate `mode:`, and the trials and
the driver import the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from orchestrator import cluster
from orchestrator.actor_pools import actor_resources
from orchestrator.config import JobConfig
from orchestrator.errors import ConfigError
from orchestrator.job_checks import check_job
from orchestrator.sample.model_files import model_file_path
from orchestrator.sample.reference import reference_path
from orchestrator.train.posthoc import source_problems

if TYPE_CHECKING:
    from orchestrator.tune.spec import Sweep, SweepConfig
    from orchestrator.tune.trials import TrialSetup

METRICS = ("frechet_distance", "nfe", "train_seconds")
SCORE = METRICS[0]  # what every trial reports (ASHA compares it, or early_stopping.metric); always the first metric
POSTHOC_KEY = "posthoc_ema.sigma_rel"  # the one key besides sampler.* a sampling sweep searches: evaluate reconstructs it


@dataclass(frozen=True)
class Workers:
    """What one trial runs besides its driver, once placed on the cluster."""

    cpus: float
    gpus: float
    job_values: dict[str, Any]  # dotted job keys every trial job gets from the placement


class SweepMode:
    """The part of a sweep its mode decides. Subclasses fill in the class attributes and
    override the hooks whose default (nothing to do) does not fit."""

    name: ClassVar[str]
    what: ClassVar[str]  # how messages name a sweep of this mode
    metrics: ClassVar[tuple[str, ...]]  # what its trials measure, so what it can minimise
    verb: ClassVar[str]  # a trial's job is a job of this verb: check_job checks the base job for it; it runs best_job.yaml
    report_columns: ClassVar[tuple[str, ...]]  # TrialRecord fields results.csv shows after the metrics

    # ---- the spec

    def spec_problems(self, config: SweepConfig) -> list[str]:
        """What the sweep spec alone shows this mode cannot run (checked by SweepConfig)."""
        unmeasured = [metric for metric in config.metrics if metric not in self.metrics]
        if not unmeasured:
            return []
        return [f"metrics: a {self.what} (mode: {self.name}) does not measure {unmeasured}; it can minimise {list(self.metrics)}"]

    def job_values(self, config: SweepConfig) -> dict[str, Any]:
        """Dotted job keys the sweep's own keys set on the base job (before its paths are resolved)."""
        return {}

    def fixed_inputs(self, job: JobConfig) -> dict[str, Any]:
        """Dotted job keys whose defaults depend on the run folder, pinned to the base job's
        (resolved) values: a trial runs in a run folder of its own."""
        return {}

    def sweep_problems(self, sweep: Sweep) -> list[str]:
        """What the spec and its base job together show this mode cannot run."""
        return []

    # ---- the driver

    def check_inputs(self, sweep: Sweep) -> None:
        """The base job's rules for the mode's verb (its model file, reference statistics, data,
        initial weights...), checked before the first trial: a trial never discovers them.
        ConfigError listing every problem."""
        try:
            check_job(sweep.base_job, self.verb)
        except ConfigError as error:  # say whose job it is: the user ran `tune`, not `evaluate`
            raise ConfigError(f"sweep {sweep.config.name!r}: its base job, as every trial runs it, {error}", error.problems) from None

    def worker_cpus(self, job: JobConfig) -> float:
        """CPUs of one trial's workers or actors (known before joining the cluster)."""
        raise NotImplementedError

    def place_workers(self, job: JobConfig) -> Workers:
        """One trial's workers or actors against the joined cluster; ResourceError when they never fit."""
        raise NotImplementedError

    def scheduler(self, sweep: Sweep) -> Any:
        """The Tune trial scheduler; None: every trial runs to its end."""
        return None

    def trainable(self) -> Callable[[dict[str, Any], TrialSetup], None]:
        """The Tune function each trial runs."""
        raise NotImplementedError


class TrainingSweep(SweepMode):
    name = "train"
    what = "training sweep"
    metrics = METRICS
    verb = "train"
    report_columns = ("score_samples", "steps")

    def spec_problems(self, config: SweepConfig) -> list[str]:
        problems = super().spec_problems(config)
        if config.model_file is not None:
            problems.append("model_file: only a sampling-only sweep (mode: sample) reads a model file; remove it or set mode: sample")
        return problems

    def sweep_problems(self, sweep: Sweep) -> list[str]:
        stopping, job = sweep.config.early_stopping, sweep.base_job
        if not stopping.enabled:
            return []
        problems = []
        if not job.train.score_every:
            problems.append(
                "early_stopping: training reports no intermediate score (train.score_every is 0); set job_overrides: "
                "{train.score_every: N} (e.g. a tenth of train.steps), or early_stopping.enabled: false"
            )
        if stopping.metric == "checkpoint_score" and not job.evaluation.every:
            problems.append(
                "early_stopping.metric: checkpoint_score needs checkpoints scored during training; set job_overrides: "
                "{evaluation.every: N} (a multiple of train.checkpoint_every), or early_stopping.metric: frechet_distance"
            )
        return problems

    def worker_cpus(self, job: JobConfig) -> float:
        cpus = job.distributed.max_workers * job.distributed.cpus_per_worker  # an elastic trial is placed at its largest
        if job.evaluation.every:  # the pool that scores its checkpoints while it trains
            cpus += job.evaluation.num_actors * job.evaluation.cpus_per_actor
        return cpus

    def place_workers(self, job: JobConfig) -> Workers:
        d = job.distributed
        cluster.check_fits(
            d.max_workers, {"CPU": d.cpus_per_worker, "GPU": d.gpus_per_worker}, f"{d.max_workers} training workers of each trial",
            "lower distributed.num_workers, cpus_per_worker or gpus_per_worker in job_overrides",
        )
        return Workers(self.worker_cpus(job), d.max_workers * d.gpus_per_worker, {})

    def scheduler(self, sweep: Sweep) -> Any:
        """ASHA on the quick score by training step, or on the latest checkpoint score by its
        checkpoint's step (the reports before the first score carry none, and ASHA lets them
        pass); None when early stopping is off."""
        from ray.tune.schedulers import ASHAScheduler

        config, train = sweep.config, sweep.base_job.train
        stopping = config.early_stopping
        if not stopping.enabled:
            return None
        steps = config.space.get("train.steps")
        max_steps = max(int(v) for v in steps.extremes()) if steps is not None else train.steps
        on_checkpoints = stopping.metric == "checkpoint_score"
        return ASHAScheduler(
            time_attr="checkpoint_score_step" if on_checkpoints else "step",
            metric=stopping.metric,
            mode="min",
            max_t=max_steps,
            grace_period=stopping.grace_period or (sweep.base_job.evaluation.every if on_checkpoints else train.score_every),
            reduction_factor=config.early_stopping.reduction_factor,
            stop_last_trials=False,  # a trial at its last step still reports its final score
        )

    def trainable(self) -> Callable[[dict[str, Any], TrialSetup], None]:
        from orchestrator.tune.trials import training_trial

        return training_trial


class SamplingSweep(SweepMode):
    name = "sample"
    what = "sampling-only sweep"
    metrics = ("frechet_distance", "nfe")  # no training, so no train_seconds
    verb = "evaluate"
    report_columns = ("score_samples",)

    def spec_problems(self, config: SweepConfig) -> list[str]:
        problems = super().spec_problems(config)
        others = [key for key in config.space if not key.startswith("sampler.") and key != POSTHOC_KEY]
        if others:
            problems.append(
                f"space: a sampling-only sweep (mode: sample) searches sampler.* keys and {POSTHOC_KEY} only; {others} need training, use mode: train"
            )
        return problems

    def job_values(self, config: SweepConfig) -> dict[str, Any]:
        # each trial scores its own sampler section, once: no grid of other settings
        values: dict[str, Any] = {"evaluation.sampler_grid": []}
        if config.model_file is not None:
            values["evaluation.model_file"] = config.model_file
        return values

    def fixed_inputs(self, job: JobConfig) -> dict[str, Any]:
        # both default to paths under the job's run folder or output_dir, which a trial's job changes
        model_file = model_file_path(job)
        return {
            "evaluation.model_file": model_file,
            "evaluation.reference_statistics": reference_path(job),
            # a sweep over the EMA length reconstructs it from the snapshots beside the model file
            "posthoc_ema.run_dir": job.posthoc_ema.run_dir or model_file.rsplit("/", 1)[0],
        }

    def check_inputs(self, sweep: Sweep) -> None:
        # the trials rebuild their EMA length from the trained run's snapshots: one list of every problem
        missing = source_problems(sweep.base_job) if POSTHOC_KEY in sweep.config.space else []
        try:
            super().check_inputs(sweep)
        except ConfigError as error:
            if not missing:
                raise
            raise ConfigError("\n  ".join([str(error), *missing]), [*error.problems, *missing]) from None
        if missing:
            raise ConfigError(
                f"sweep {sweep.config.name!r} searches {POSTHOC_KEY}, which its base job's run cannot give:\n  " + "\n  ".join(missing), missing
            )

    def worker_cpus(self, job: JobConfig) -> float:
        return job.evaluation.num_actors * job.evaluation.cpus_per_actor

    def place_workers(self, job: JobConfig) -> Workers:
        actors = actor_resources(job)  # decides the GPUs per actor the job left open, and checks they fit
        return Workers(self.worker_cpus(job), actors.count * actors.gpus, {"evaluation.gpus_per_actor": actors.gpus})

    def trainable(self) -> Callable[[dict[str, Any], TrialSetup], None]:
        from orchestrator.tune.trials import sampling_trial

        return sampling_trial


MODES: dict[str, SweepMode] = {mode.name: mode for mode in (TrainingSweep(), SamplingSweep())}


def mode_of(config: SweepConfig) -> SweepMode:
    return MODES[config.mode]
