"""Benchmark: streaming training input (data.streaming) against the same data held in memory.

A synthetic latent dataset in the layout `encode` writes (SHARDS shards of ROWS latents of
4 x 32 x 32 float32, labels of 10 classes), trained on by the single-process backend (one worker,
the digits job's tiny DiT, patch 2: 256 tokens) with the same seed and order
(data.shuffle_window), in memory and streamed. For each, in its own process:

- images/s: the mean of metrics.jsonl's images_per_second over the intervals after the first
  (the first holds the start: the first window read, the quick-score reference);
- data-stall share: the mean of metrics.jsonl's data_stall_share (the share of each interval the
  worker waited for its examples: in memory, the gather; streamed, a window not yet read);
- peak RSS: the process's VmHWM, above its RSS once the orchestrator is imported.

    .venv/bin/python tests/bench/bench_streaming.py [--shards 24] [--rows 1024] [--window 2] [--steps 160] [--batch 64]

Prints a markdown table; paste it into tests/bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from data_helpers import write_latent_folder  # noqa: E402
from driver_helpers import train_measuring_rss  # noqa: E402

def run(tmp: Path, overrides: list[str]) -> dict[str, float]:
    result = train_measuring_rss(ROOT / "jobs/digits.yaml", overrides, tmp)
    records = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    later = records[1:] or records
    return {
        "images_per_second": float(np.mean([r["images_per_second"] for r in later])),
        "stall": float(np.mean([r["data_stall_share"] for r in later])),
        "stall_first": records[0]["data_stall_share"],
        "peak_mib": (result["peak"] - result["before"]) / 2**20,
        "seconds": result["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        rng = np.random.default_rng(0)
        shape = (4, 32, 32)
        latents = rng.standard_normal((args.shards * args.rows, *shape), dtype=np.float32)
        write_latent_folder(tmp / "latents", latents, rng.integers(0, 10, len(latents)), shard_size=args.rows, num_classes=10)
        dataset_mib = latents.nbytes / 2**20
        del latents
        common = [
            "data.name=latents", f"data.path={tmp / 'latents'}", f"data.shuffle_window={args.window}", "tracking.enabled=false",
            "distributed.backend=local", f"output_dir={tmp / 'runs'}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
            f"train.log_every={max(1, args.steps // 8)}", "train.checkpoint_every=100000", "train.sample_every=100000", "evaluation.grid_size=1",
        ]
        memory = run(tmp, [*common, "name=memory"])
        streamed = run(tmp, [*common, "name=streamed", "data.streaming=true"])

    print(f"{args.shards} shards x {args.rows} latents of 4x32x32 ({dataset_mib:.0f} MiB), shuffle_window {args.window} "
          f"({args.window * args.rows} rows), {args.steps} steps of batch {args.batch}, local backend, {os.cpu_count()} CPUs\n")
    print("| input | images/s | ratio | data-stall share (first interval) | peak RSS above start |")
    print("|---|---|---|---|---|")
    for name, result in (("in memory", memory), ("streamed", streamed)):
        print(f"| {name} | {result['images_per_second']:.0f} | {result['images_per_second'] / memory['images_per_second']:.3f} | "
              f"{result['stall']:.4f} ({result['stall_first']:.3f}) | {result['peak_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
