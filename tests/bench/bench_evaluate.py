"""Benchmark of `evaluate` (run by hand, not in CI):

    .venv/bin/python tests/bench/bench_evaluate.py [--num-samples 6000] [--write]

Measures, in one run and on the same model file, sampler and extractor:
  - a bare single-process loop (ucgm_core.evaluation.sample_statistics, torch limited to one
    thread so that it matches one actor with cpus_per_actor=1), before and after the Ray runs;
  - `run_evaluate` with 1 and with 2 actors (Ray Data, local cluster started beforehand and not
    timed; actor start-up, model transfer and statistics merging are timed);
and reports samples/s, the orchestration overhead of 1 actor against the bare loop, and the split
of the actors' time into sampling, feature extraction and statistics. --write puts the table into
tests/bench/RESULTS.md, section "evaluate".
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from orchestrator.config import load_job  # noqa: E402
from orchestrator.sample.evaluate import run_evaluate  # noqa: E402
from orchestrator.sample.reference import run_reference  # noqa: E402
from orchestrator.sample.extractors import extractor_spec
from orchestrator.sample.sampler_grid import grid_settings  # noqa: E402
from sampling_helpers import tiny_model, write_tiny_model_file  # noqa: E402
from ucgm_core.evaluation import StageTimer, sample_statistics  # noqa: E402
from ucgm_core.transports import build_transport  # noqa: E402

RESULTS = ROOT / "tests" / "bench" / "RESULTS.md"
SECTION = "## evaluate"


def bare_loop(config, num_samples: int) -> tuple[float, dict[str, float]]:
    """samples/s and stage seconds of the plain loop over the same seeds, one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extractor = extractor_spec(config, (1, 8, 8)).build("cpu")
        timer = StageTimer("cpu")
        started = time.perf_counter()
        sample_statistics(
            tiny_model(), build_transport(config.transport), grid_settings(config)[0], extractor,
            num_samples=num_samples, num_classes=10, image_shape=(1, 8, 8),
            batch_size=config.evaluation.batch_size, seed=config.seed, timer=timer,
        )
        return num_samples / (time.perf_counter() - started), timer.seconds
    finally:
        torch.set_num_threads(threads)


def split(seconds: dict[str, float]) -> str:
    total = sum(seconds.values()) or 1.0
    return " / ".join(f"{100 * seconds.get(k, 0.0) / total:.1f}%" for k in ("sampling", "features", "statistics"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="write the table into tests/bench/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model_file(Path(tmp) / "model.pt")
        overrides = [
            f"output_dir={tmp}", "tracking.enabled=false", f"sampler.steps={args.steps}",
            f"evaluation.num_samples={args.num_samples}", f"evaluation.batch_size={args.batch_size}",
            f"evaluation.model_file={model}", "evaluation.cpus_per_actor=1",
        ]
        config = load_job(ROOT / "jobs" / "digits.yaml", overrides)
        run_reference(config)
        rows, walls = [], []
        bare_rate, bare_seconds = bare_loop(config, args.num_samples)
        rows.append(("bare loop (1 thread), before", bare_rate, split(bare_seconds), ""))
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, logging_level=logging.WARNING)
        try:
            for actors in (1, 2):
                summary = run_evaluate(load_job(ROOT / "jobs" / "digits.yaml", [*overrides, f"evaluation.num_actors={actors}"]))
                busy = sum(summary.stage_seconds.values())
                walls.append((summary.seconds, busy))
                rows.append((f"evaluate, {actors} actor{'s' if actors > 1 else ''}", summary.samples_per_second, split(summary.stage_seconds),
                             f"wall {summary.seconds:.1f} s, actor compute {busy:.1f} s"))
        finally:
            ray.shutdown()
        after_rate, after_seconds = bare_loop(config, args.num_samples)
        rows.append(("bare loop (1 thread), after", after_rate, split(after_seconds), ""))

    bare_mean = (bare_rate + after_rate) / 2
    one_actor = rows[1][1]
    lines = [
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `python tests/bench/bench_evaluate.py --num-samples {args.num_samples}` on "
        f"{platform.machine()} ({os.cpu_count()} cores, shared with other jobs), torch {torch.__version__}, CPU only.",
        f"Model: tiny DiT on 8x8x1 (random weights), UCGM-S {args.steps} steps, batch {args.batch_size}, "
        f"{args.num_samples} samples, extractor mnist-cnn-penultimate. Ray cluster start-up is not timed; actor start-up is.",
        "",
        "| run | samples/s | time split sampling / features / statistics | notes |",
        "|---|---:|---|---|",
        *(f"| {name} | {rate:.1f} | {share} | {note} |" for name, rate, share, note in rows),
        "",
        f"Orchestration overhead at 1 actor vs the mean of the two bare loops: {100 * (1 - one_actor / bare_mean):.1f}% "
        f"(goal: under 10%); 2 actors vs 1: x{rows[2][1] / one_actor:.2f}. Share of the 1-actor wall time not spent "
        f"computing in the actor (start-up, scheduling, merging, outputs): {100 * (1 - walls[0][1] / walls[0][0]):.1f}%.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
        if SECTION in existing:
            head, _, rest = existing.partition(SECTION)
            tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
            existing = head + text + ("\n" + tail if tail else "")
        else:
            existing = existing.rstrip("\n") + "\n\n" + text
        RESULTS.write_text(existing)


if __name__ == "__main__":
    main()
