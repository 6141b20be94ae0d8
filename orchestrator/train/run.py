"""The `train` verb: train with the backend the job asks for.

`distributed.backend: ray` (the default) runs Ray Train + DeepSpeed (orchestrator.train.ray_backend);
`local` runs one process with plain torch (orchestrator.train.local_backend). Both run the same loop
(orchestrator.train.loop). The job is checked first, by the caller (`orchestrator.job_checks.check_job`,
which the CLI and `tune` run before any cluster work).
"""

from __future__ import annotations

from orchestrator.config import JobConfig
from orchestrator.train.loop import TrainSummary


def run_train(config: JobConfig) -> TrainSummary:
    if config.distributed.backend == "local":
        from orchestrator.train.local_backend import run_train_local

        return run_train_local(config)
    from orchestrator.train.ray_backend import run_train_ray

    return run_train_ray(config)
