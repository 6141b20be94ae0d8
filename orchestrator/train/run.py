"""The `train` verb: validate, then train with the backend the job asks for.

`distributed.backend: ray` (the default) runs Ray Train + DeepSpeed (orchestrator.train.ray_backend);
`local` runs one process with plain torch (orchestrator.train.local_backend). Both run the same loop
(orchestrator.train.loop).
"""

from __future__ import annotations

from orchestrator.config import JobConfig
from orchestrator.train.pretrained import check_model_sources
from orchestrator.train.loop import TrainSummary


def run_train(config: JobConfig) -> TrainSummary:
    check_model_sources(config)  # a missing teacher or initial model fails before any cluster work
    if config.distributed.backend == "local":
        from orchestrator.train.local_backend import run_train_local

        return run_train_local(config)
    from orchestrator.train.ray_backend import run_train_ray

    return run_train_ray(config)
