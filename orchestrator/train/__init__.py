"""The `train` verb: `run_train` picks the backend (`run.py`) for a job checked by
`orchestrator.job_checks`; both backends run the same loop (`loop.py`) over batches that are a
function of the step (`batches.py`).

    run.py            the verb: the backend the job asks for
    loop.py           TrainingRun (data, network, EMA, target network, objective) and train_loop
    ray_backend.py    Ray Train TorchTrainer workers + a DeepSpeed engine (ZeRO 0-3)
    local_backend.py  one process, plain torch: the reference the Ray backend is checked against
    optimizer.py      the torch optimiser and learning-rate warm-up both backends use
    batches.py        which examples and which random draws a step uses
    checkpoints.py    committed checkpoints (manifests) and which one a run resumes from
    checkpoint_conversion.py  a DeepSpeed checkpoint converted for another worker count or ZeRO stage
    pretrained.py     model files a run starts from: train.initialize_from and train.teacher
    worker_errors.py  a job's error found by a Ray Train worker ends the run, without retries
"""

from orchestrator.train.run import run_train

__all__ = ["run_train"]
