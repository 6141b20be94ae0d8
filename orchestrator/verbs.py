"""The registry of job verbs: what `python -m orchestrator <verb> <job.yaml>` can run, one record
each. The CLI builds its sub-commands, help and shortcuts from it; `run_job` is the library's way
to run a verb the way the CLI does (the job's rules checked first, orchestrator.job_checks).

A new verb: its module with `run_<verb>(config) -> VerbSummary`, its rules in
`job_checks._VERB_CHECKS`, and one `Verb(...)` line below. (`tune` takes a sweep spec, not a job,
and has its own sub-command.)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from orchestrator.config import JobConfig
from orchestrator.summary import VerbSummary


@dataclass(frozen=True)
class Verb:
    """name: the sub-command; entry: "module:function" of its run function, imported only when it
    runs (torch, Ray and DeepSpeed take seconds to import, and `--check` needs none of them);
    shortcuts: bare command-line keys mapped onto job keys (`num_samples=` -> evaluation.num_samples);
    renamed_shortcuts: old bare keys and their new names, accepted with a warning for one release."""

    name: str
    help: str
    example: str
    entry: str
    shortcuts: dict[str, str] = field(default_factory=dict)
    renamed_shortcuts: dict[str, str] = field(default_factory=dict)

    def run(self, config: JobConfig) -> VerbSummary:
        """Run a job that `check_job(config, self.name)` returned."""
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(module), function)(config)


VERBS: dict[str, Verb] = {
    verb.name: verb
    for verb in (
        Verb(
            "train", "train a model (UCGM-T or a seed system; Ray Train + DeepSpeed, or one process)",
            "jobs/digits.yaml train.steps=500 objective.consistency_ratio=1", "orchestrator.train.run:run_train",
        ),
        Verb(
            "evaluate", "Frechet distance / FID of a model file for one or several sampler settings (Ray Data)",
            "jobs/digits.yaml model_file=outputs/digits/model.pt num_samples=5000 'evaluation.sampler_grid=[{steps: 2}, {steps: 8}]'",
            "orchestrator.sample.evaluate:run_evaluate",
            {"model_file": "evaluation.model_file", "num_samples": "evaluation.num_samples", "reference": "evaluation.reference_statistics"},
            {"checkpoint": "model_file"},
        ),
        Verb(
            "reference", "reference feature statistics of the job's dataset split, stored next to the data",
            "jobs/digits.yaml split=train", "orchestrator.sample.reference:run_reference",
            {"split": "evaluation.reference_split", "out": "evaluation.reference_statistics"},
        ),
        Verb(
            "generate", "many images from a model file, PNG/parquet shards, resumable (Ray Data)",
            "jobs/digits.yaml num_samples=50000 out=s3://bucket/samples", "orchestrator.sample.generate:run_generate",
            {"model_file": "evaluation.model_file", "num_samples": "evaluation.generation.num_samples", "out": "evaluation.generation.out"},
            {"checkpoint": "model_file"},
        ),
        Verb(
            "ema", "post-hoc EMA: a model file for any EMA length, from the snapshots a run tracked (train.posthoc_ema_sigma_rels)",
            "jobs/digits.yaml sigma_rel=0.08", "orchestrator.train.posthoc:run_ema",
            {"sigma_rel": "posthoc_ema.sigma_rel", "step": "posthoc_ema.step", "out": "posthoc_ema.out"},
        ),
        Verb(
            "encode", "VAE latents of the job's images, parquet shards, resumable (Ray Data)",
            "jobs/imagenet256_encode.yaml vae=s3://bucket/sd-vae-ft-ema out=s3://bucket/latents", "orchestrator.encode.run:run_encode",
            {"vae": "encode.vae", "out": "encode.out"},
        ),
    )
}


def run_job(verb: str, config: JobConfig) -> VerbSummary:
    """Check `config`'s rules for `verb` (ConfigError listing every problem, before any cluster
    work; relative paths resolved against the working directory), then run it."""
    from orchestrator.job_checks import check_job

    return VERBS[verb].run(check_job(config, verb))
