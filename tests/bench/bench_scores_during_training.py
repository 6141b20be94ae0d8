"""Benchmark: training throughput with checkpoints scored during training (evaluation.every)
against the same training without it.

One local Ray cluster of 1 + 1 CPUs: a training worker (distributed.cpus_per_worker=1) of the
digits job, and, in the scored run, one scoring actor of 1 CPU (evaluation.num_actors=1,
cpus_per_actor=1) that scores every checkpoint at two sampler settings while training goes on.
Both runs have the same seed, steps and checkpoints; each runs as `train` runs it
(orchestrator.train.run.run_train), one after the other.

- images/s: the mean of metrics.jsonl's images_per_second over the intervals after the first
  (the first holds the start); the scored run's include the model files rank 0 writes;
- wall: run_train from call to return, which in the scored run includes waiting, at the end,
  for the last checkpoint's score;
- scores: how many checkpoint steps were scored, and the mean seconds of one score.

    .venv/bin/python tests/bench/bench_scores_during_training.py [--steps 600] [--every 100] [--samples 300]

Prints a markdown table; paste it into tests/bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from orchestrator.config import load_job  # noqa: E402
from orchestrator.job_checks import check_job  # noqa: E402
from orchestrator.sample.reference import run_reference  # noqa: E402
from orchestrator.train import checkpoint_scores  # noqa: E402
from orchestrator.train.run import run_train  # noqa: E402

SPEC = ROOT / "jobs/digits.yaml"


def run(overrides: list[str]) -> dict[str, float]:
    config = check_job(load_job(SPEC, overrides), "train")
    started = time.perf_counter()
    run_train(config)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()]
    later = records[1:] or records
    scored = checkpoint_scores.scored_steps(config.run_dir)
    seconds = [checkpoint_scores.read_scores(config.run_dir, step)["seconds"] for step in scored]
    return {
        "images_per_second": float(np.mean([r["images_per_second"] for r in later])),
        "wall": wall,
        "scored": len(scored),
        "score_seconds": float(np.mean(seconds)) if seconds else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100, help="train.checkpoint_every = evaluation.every")
    parser.add_argument("--samples", type=int, default=300, help="evaluation.every_samples")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        common = [
            f"output_dir={tmp / 'outputs'}", "tracking.enabled=false", "distributed.num_workers=1", "distributed.cpus_per_worker=1",
            f"train.steps={args.steps}", f"train.log_every={args.every // 2}", f"train.checkpoint_every={args.every}",
            "train.sample_every=100000", "evaluation.num_actors=1", "evaluation.cpus_per_actor=1", "evaluation.batch_size=100",
            f"evaluation.every_samples={args.samples}", "evaluation.sampler_grid=[{steps: 2}, {steps: 8}]",
        ]
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        try:
            run_reference(load_job(SPEC, common))
            plain = run([*common, "name=plain"])
            scored = run([*common, "name=scored", f"evaluation.every={args.every}"])
        finally:
            ray.shutdown()

    print(f"digits job, {args.steps} steps, a checkpoint every {args.every}; 1 training worker of 1 CPU; "
          f"scored run: 1 scoring actor of 1 CPU, {args.samples} samples at NFE 2 and 8 per checkpoint; {os.cpu_count()} CPUs\n")
    print("| run | images/s | ratio | wall s | checkpoints scored | s per score |")
    print("|---|---|---|---|---|---|")
    for name, result in (("no scores during training", plain), ("evaluation.every", scored)):
        print(f"| {name} | {result['images_per_second']:.1f} | {result['images_per_second'] / plain['images_per_second']:.3f} | "
              f"{result['wall']:.0f} | {result['scored']} | {result['score_seconds']:.1f} |")


if __name__ == "__main__":
    main()
