"""Probe: one job spec's sample quality every N training steps, to choose a learning rate.

Trains in-process through the train verb's own pieces (`TrainingRun`, the plain-torch optimiser of
the local backend: same data order, noise, clipping and EMA) without checkpoints, and every
`--every` steps scores the EMA and the live network with the job's sampler at NFE 1, 2, 4: the
Frechet distance of 500 samples (seeds from 20000, other noise than bench_systems.py's table) in
`mnist-cnn-penultimate` features. Consistency objectives tend to improve and then drift off within
a few hundred steps at too high a rate; the final model file alone does not show when.

    .venv/bin/python tests/bench/probe_learning_curve.py digits_sct --steps 800 --every 100 \\
        train.learning_rate=0.00005 train.initialize_from=outputs/digits_trigflow_teacher/model.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from orchestrator.config import load_job  # noqa: E402
from orchestrator.train.local_backend import TorchOptimization  # noqa: E402
from orchestrator.train.loop import TrainingRun  # noqa: E402
from ucgm_core.datasets import load_dataset  # noqa: E402
from ucgm_core.evaluation import dataset_statistics, sample_statistics  # noqa: E402
from ucgm_core.features import DigitClassifierFeatures  # noqa: E402
from ucgm_core.fid import frechet_distance_from_statistics  # noqa: E402

PROBE_NFES = (1, 2, 4)
PROBE_SAMPLES = 500
PROBE_SEED = 20_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", help="a spec in jobs/systems/ (without .yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the spec")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()

    config = load_job(
        ROOT / "jobs/systems" / f"{args.job}.yaml",
        ["distributed.backend=local", "tracking.enabled=false", "train.device=cpu", *args.overrides],
    )
    run = TrainingRun(config, device=torch.device("cpu"))
    optimization = TorchOptimization(run)
    extractor = DigitClassifierFeatures(framing="mnist_box", device="cpu")
    reference = dataset_statistics(load_dataset(config.data.name).images, extractor)

    def scores(network: torch.nn.Module) -> list[float]:
        network.eval()
        distances = []
        for nfe in PROBE_NFES:
            statistics = sample_statistics(
                network,
                run.transport,
                dataclasses.replace(config.sampler, steps=nfe),
                extractor,
                num_samples=PROBE_SAMPLES,
                num_classes=run.dataset.num_classes,
                image_shape=run.image_shape,
                batch_size=PROBE_SAMPLES,
                seed=PROBE_SEED,
            )
            distances.append(round(frechet_distance_from_statistics(statistics, reference), 1))
        network.train()
        return distances

    print(f"NFE {PROBE_NFES}; step 0: {scores(run.ema.module)}", flush=True)
    started = time.perf_counter()
    for step in range(args.steps):
        loss, _ = run.loss(optimization.network, step, 0)
        optimization.micro_step(loss)
        optimization.finish_step()
        run.update_averages()
        if (step + 1) % args.every == 0:
            print(
                f"step {step + 1}: loss {loss.item():.3f}  EMA {scores(run.ema.module)}  live {scores(run.model)}"
                f"  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
