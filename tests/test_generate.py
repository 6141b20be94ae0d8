"""The generate verb: N images in shards, deterministic per seed, resumable after a kill."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from orchestrator import storage
from orchestrator.config import load_job
from orchestrator.sample.generate import GenerationMismatchError, finished_shards, run_generate
from sampling_helpers import ray_cluster, tiny_model, write_tiny_model_file  # noqa: F401  (ray_cluster is a fixture)
from ucgm_core.evaluation import generate
from ucgm_core.features import quantize_to_uint8
from ucgm_core.sampler import SamplerSettings
from ucgm_core.transports import build_transport

SPEC = str(Path(__file__).resolve().parents[1] / "jobs" / "digits.yaml")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return write_tiny_model_file(tmp_path_factory.mktemp("model") / "model.pt")


def job(model_path: str, out: str, *extra: str):
    return load_job(
        SPEC,
        [
            "tracking.enabled=false",
            "seed=100",
            "sampler.steps=3",
            "sampler.stochasticity=0.5",  # fresh noise per step: per-seed streams matter
            "evaluation.batch_size=4",
            f"evaluation.model_file={model_path}",
            f"evaluation.generation.out={out}",
            *extra,
        ],
    )


def expected_pixels(indices: list[int], steps: int = 3, stochasticity: float = 0.5, seed: int = 100) -> np.ndarray:
    """Images i straight from ucgm_core: seed seed + i, label i mod 10, 8-bit."""
    settings = SamplerSettings(steps=steps, schedule=(1.17, 0.8, 1.1), stochasticity=stochasticity)
    labels = torch.tensor(indices) % 10
    images = generate(tiny_model(), build_transport("linear"), settings, [seed + i for i in indices], labels, (1, 8, 8))
    return quantize_to_uint8(images).numpy()[:, 0]


def png_files(out: str) -> dict[int, bytes]:
    """Every PNG under out, by image index; fails on a duplicate index."""
    files: dict[int, bytes] = {}
    for shard in storage.list_names(out):
        if shard.startswith("shard-") and "." not in shard:
            for name in storage.list_names(storage.join(out, shard)):
                index = int(name.removesuffix(".png"))
                assert index not in files, f"image {index} written twice"
                files[index] = storage.read_bytes(storage.join(out, shard, name))
    return files


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_generate_writes_exactly_n_images_across_shards_the_same_for_any_split(model_path, s3_bucket, ray_cluster, tmp_path):
    out = f"{s3_bucket}/generated"
    config = job(model_path, out, "evaluation.generation.num_samples=23", "evaluation.generation.shard_size=5", "evaluation.generation.formats=[png, parquet]")
    summary = run_generate(config)
    assert (summary.shards, summary.shards_written, summary.images_written) == (5, 5, 23)
    files = png_files(out)
    assert sorted(files) == list(range(23))
    pixels = np.stack([decode(files[i]) for i in range(23)])
    np.testing.assert_array_equal(pixels, expected_pixels(list(range(23))))
    # parquet shards hold the same images with their seeds and labels
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/shard-{k:05d}.parquet"))).to_pydict() for k in range(5)]
    rows = {i: (s, l, img) for t in tables for i, s, l, img in zip(t["index"], t["seed"], t["label"], t["image"])}
    assert sorted(rows) == list(range(23))
    assert all(rows[i][:2] == (100 + i, i % 10) and rows[i][2] == files[i] for i in range(23))

    # another shard size and two actors, locally: byte-identical images
    local = str(tmp_path / "again")
    other = run_generate(job(model_path, local, "evaluation.generation.num_samples=23", "evaluation.generation.shard_size=7", "evaluation.num_actors=2"))
    assert other.shards == 4
    assert png_files(local) == files

    # a second run finds every shard done and writes nothing
    again = run_generate(config)
    assert (again.shards_skipped, again.shards_written, again.images_written) == (5, 0, 0)
    # other parameters into the same folder are refused, not mixed in
    with pytest.raises(GenerationMismatchError, match="sampler"):
        run_generate(job(model_path, out, "evaluation.generation.num_samples=23", "evaluation.generation.shard_size=5",
                         "evaluation.generation.formats=[png, parquet]", "sampler.steps=4"))


@pytest.mark.slow
def test_generate_resumes_after_a_kill_without_duplicates_or_gaps(model_path, ray_cluster, tmp_path):
    out = str(tmp_path / "generated")
    slow = ["evaluation.generation.num_samples=60", "evaluation.generation.shard_size=3", "evaluation.batch_size=3", "sampler.steps=40"]
    command = [sys.executable, "-m", "orchestrator", "generate", SPEC, "tracking.enabled=false", "seed=100", "sampler.stochasticity=0.5",
               f"model_file={model_path}", f"out={out}", f"distributed.ray_address={ray_cluster}", *slow]
    log = open(tmp_path / "generate.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (storage.exists(out) and finished_shards(out)):
            assert process.poll() is None, (tmp_path / "generate.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and anything it started in its session
        process.wait()
    time.sleep(1.0)  # let Ray reap the dead job's actor
    done = finished_shards(out)
    assert 0 < len(done) < 20, f"the kill should land mid-run, {len(done)} of 20 shards were done"
    # also leave a half-written shard behind: a finished one without its marker and one image
    victim = min(done)
    storage.remove(f"{out}/shard-{victim:05d}.done")
    storage.remove(f"{out}/shard-{victim:05d}/{victim * 3:08d}.png")
    kept = {k: os.path.getmtime(f"{out}/shard-{k:05d}.done") for k in done - {victim}}

    summary = run_generate(job(model_path, out, *slow, "sampler.steps=40"))
    assert summary.shards_skipped >= len(kept) and summary.shards_written == 20 - summary.shards_skipped
    assert {k: os.path.getmtime(f"{out}/shard-{k:05d}.done") for k in kept} == kept  # finished shards untouched
    files = png_files(out)
    assert sorted(files) == list(range(60))
    assert finished_shards(out) == set(range(20))
    manifests = [json.loads(storage.read_bytes(f"{out}/shard-{k:05d}.done")) for k in range(20)]
    assert sum(m["count"] for m in manifests) == 60
    pixels = np.stack([decode(files[i]) for i in range(60)])
    np.testing.assert_array_equal(pixels, expected_pixels(list(range(60)), steps=40))
