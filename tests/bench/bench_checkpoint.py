"""Benchmark: what checkpoints cost a Ray Train + DeepSpeed run, and what resuming costs.

On one local Ray cluster (2 CPU workers, ZeRO-2, the digits job), for output_dir on local disk and
on a real S3-compatible server on 127.0.0.1 (moto), with train.checkpoint_upload sync and async:

- seconds per checkpoint: what the training loop waited for each save (summary.json's
  checkpoint_seconds / checkpoints, timed on rank 0 inside the worker: DeepSpeed's save, the
  manifests with the sha256 of every file, and `ray.train.report`, which with sync returns once the
  folder is persisted and with async once it is queued for upload);
- the step-time cost: the whole run's wall time with a checkpoint every C steps minus the same run
  with only the last one, per extra checkpoint (this holds what async moves off the loop but still
  costs: the background upload competing with training, and the final flush before the run ends);
- seconds to resume: summary.json's restore_seconds of a run that resumes the checkpoint (choosing
  and checking it, downloading it, converting it where needed, loading it), at the same worker count
  and at another (2 workers -> 1 worker x 2 accumulation steps, through DeepSpeed's universal
  checkpoint).

    .venv/bin/python tests/bench/bench_checkpoint.py [--steps 40] [--every 10] [--repeats 1]

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
from orchestrator.train.loop import TrainSummary  # noqa: E402
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


def summary(config) -> tuple[float, TrainSummary]:
    started = time.perf_counter()
    result = run_train(config)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    s3 = start_s3()  # before Ray starts, so that its workers see the server's variables
    from orchestrator.train.ray_backend import connect_for_training

    local = tempfile.mkdtemp(prefix="bench-checkpoint-")
    connect_for_training(job(local))
    summary(job(f"{local}/warm-up", "train.steps=2"))  # imports and first worker start out of the figures

    rows = []
    for where, root in (("local disk", local), ("S3 (moto, 127.0.0.1)", s3)):
        for upload in ("sync", "async"):
            waited, cost, same, other = [], [], [], []
            for repeat in range(args.repeats):
                base = f"{root}/{upload}-r{repeat}-{uuid.uuid4().hex[:6]}"
                mode = f"train.checkpoint_upload={upload}"
                plain, _ = summary(job(f"{base}/plain", mode, f"train.steps={args.steps}", f"train.checkpoint_every={10 * args.steps}"))
                often, written = summary(job(f"{base}/often", mode, f"train.steps={args.steps}", f"train.checkpoint_every={args.every}"))
                waited.append(written.checkpoint_seconds / written.checkpoints)
                cost.append((often - plain) / (written.checkpoints - 1))  # both runs write the last step's
                _, resumed = summary(job(f"{base}/often", mode, f"train.steps={args.steps + 1}", f"train.checkpoint_every={args.every}"))
                same.append(resumed.restore_seconds)
                _, converted = summary(job(
                    f"{base}/often", mode, f"train.steps={args.steps + 2}", f"train.checkpoint_every={args.every}", "distributed.num_workers=1"
                ))
                other.append(converted.restore_seconds)
            rows.append((where, upload, *map(statistics.median, (waited, cost, same, other))))

    print(f"Ray Train + DeepSpeed, 2 CPU workers, ZeRO-2, digits tiny DiT; {args.steps} steps; median of {args.repeats}\n")
    print("| output_dir | upload | loop waits per checkpoint (s) | wall time per checkpoint (s) "
          "| resume, 2 workers (s) | resume, 2 -> 1 worker (s) |")
    print("|---|---|---|---|---|---|")
    for where, upload, waited, cost, same, other in rows:
        print(f"| {where} | {upload} | {waited:.2f} | {cost:.2f} | {same:.2f} | {other:.2f} |")


if __name__ == "__main__":
    main()
