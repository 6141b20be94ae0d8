"""Benchmark: what checkpoints cost a Ray Train + DeepSpeed run, and what resuming costs.

Each figure is a difference of wall times of whole `run_train` calls on one local Ray cluster
(2 CPU workers, ZeRO-2, the digits job), so it holds everything a user waits for: DeepSpeed's
save, the manifests (sha256 of every file), `ray.train.report` persisting the folder, and on S3
the upload to a real S3-compatible server on 127.0.0.1 (moto):

  seconds per checkpoint = (T(checkpoint_every=C) - T(no checkpoint but the last)) / (extra checkpoints)
  seconds to resume      = T(resume at step N, train 1 more step) - T(train 1 step from scratch)

for output_dir on local disk and on S3; and the resume at another worker count (2 -> 1 worker,
ZeRO-0, where a resume at another count is allowed). Checkpoints are written synchronously
(`ray.train.report` returns when the folder is persisted); the async upload mode is not used.

    .venv/bin/python tests/bench/bench_checkpoint.py [--steps 60] [--every 10] [--repeats 2]

Prints a markdown table; paste it into tests/bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.config import load_job  # noqa: E402
from orchestrator.train.run import run_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def job(output_dir: str, *overrides: str):
    return load_job(
        ROOT / "jobs/digits.yaml",
        [
            f"output_dir={output_dir}",
            "tracking.enabled=false",
            "distributed.num_workers=2",
            "distributed.cpus_per_worker=1",
            "distributed.zero_stage=2",
            "train.log_every=10",
            "train.sample_every=1000000",
            "evaluation.num_samples=2",
            "train.keep_checkpoints=2",
            *overrides,
        ],
    )


def timed(config) -> float:
    started = time.perf_counter()
    run_train(config)
    return time.perf_counter() - started


def start_s3() -> str:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint
    )
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    s3 = start_s3()  # before Ray starts, so that its workers see the server's variables
    from orchestrator.train.ray_backend import connect_for_training

    local = tempfile.mkdtemp(prefix="bench-checkpoint-")
    connect_for_training(job(local))
    timed(job(f"{local}/warm-up", "train.steps=2"))  # imports and first worker start out of the figures

    rows = []
    for where, root in (("local disk", local), ("S3 (moto, 127.0.0.1)", s3)):
        plain, often, fresh, resumed = [], [], [], []
        for repeat in range(args.repeats):
            base = f"{root}/r{repeat}-{uuid.uuid4().hex[:6]}"
            plain.append(timed(job(f"{base}/plain", f"train.steps={args.steps}", f"train.checkpoint_every={10 * args.steps}")))
            often.append(timed(job(f"{base}/often", f"train.steps={args.steps}", f"train.checkpoint_every={args.every}")))
            fresh.append(timed(job(f"{base}/fresh", "train.steps=1", "train.checkpoint_every=1")))
            # resume the `often` run at its last step and train one more
            resumed.append(timed(job(f"{base}/often", f"train.steps={args.steps + 1}", f"train.checkpoint_every={args.every}")))
        extra = args.steps // args.every - 1  # both runs write the last step's
        per_checkpoint = (statistics.median(often) - statistics.median(plain)) / extra
        resume = statistics.median(resumed) - statistics.median(fresh)
        rows.append((where, statistics.median(plain), statistics.median(often), per_checkpoint, resume))

    # a resume at another worker count: ZeRO-0, 2 workers -> 1 worker x 2 accumulation steps
    counts = []
    for repeat in range(args.repeats):
        base = f"{local}/count-{repeat}"
        timed(job(base, f"train.steps={args.every}", "distributed.zero_stage=0", f"train.checkpoint_every={args.every}"))
        same = timed(job(base, f"train.steps={args.every + 1}", "distributed.zero_stage=0", f"train.checkpoint_every={args.every}"))
        other = timed(
            job(base, f"train.steps={args.every + 2}", "distributed.zero_stage=0", "distributed.num_workers=1", f"train.checkpoint_every={args.every}")
        )
        counts.append((same, other))

    print(f"Ray Train + DeepSpeed, 2 CPU workers, ZeRO-2, digits tiny DiT; {args.steps} steps; median of {args.repeats}\n")
    print("| output_dir | run, last checkpoint only (s) | run, checkpoint every "
          f"{args.every} steps (s) | seconds per checkpoint | seconds to resume (vs a fresh 1-step run) |")
    print("|---|---|---|---|---|")
    for where, plain, often, per_checkpoint, resume in rows:
        print(f"| {where} | {plain:.1f} | {often:.1f} | {per_checkpoint:.2f} | {resume:.2f} |")
    same = statistics.median(c[0] for c in counts)
    other = statistics.median(c[1] for c in counts)
    print(f"\nZeRO-0 resume + 1 step: same worker count (2) {same:.1f} s, another (1 worker x 2 micro-batches) {other:.1f} s")


if __name__ == "__main__":
    main()
