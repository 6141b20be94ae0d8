"""The encode verb: a (tiny, randomly initialised) diffusers AutoencoderKL over digits, latent
shards that match the VAE, resume a lost shard, load from and write to S3, and train on them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator import storage
from orchestrator.config import load_job
from orchestrator.encode.run import EncodingMismatchError, finished_shards, run_encode
from orchestrator.errors import ConfigError, JobError, ResourceError
from orchestrator.job_checks import check_job
from sampling_helpers import ray_cluster  # noqa: F401  (a fixture)
from ucgm_core.datasets import load_dataset

SPEC = str(Path(__file__).resolve().parents[1] / "jobs" / "digits.yaml")
IMAGES = 150


@pytest.fixture(scope="module", autouse=True)
def vae_cache(tmp_path_factory):
    """VAE copies of s3:// folders go to a tmp cache, not ~/.cache (set before the module's Ray
    cluster starts, so its actors inherit it)."""
    previous = os.environ.get("UCGM_CACHE_DIR")
    os.environ["UCGM_CACHE_DIR"] = str(tmp_path_factory.mktemp("vae-cache"))
    yield
    if previous is None:
        os.environ.pop("UCGM_CACHE_DIR")
    else:
        os.environ["UCGM_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> str:
    """A tiny SD-VAE-shaped AutoencoderKL: 3 channels in, 4 latent channels, 4x downsampling
    (the real one is 8x), random weights, saved as diffusers saves it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder)
    return str(folder)


def job(vae: str, out: str, *extra: str):
    return load_job(
        SPEC,
        [
            "tracking.enabled=false",
            "data.image_size=32",  # 8x8 digits as 32x32, repeated to RGB for the VAE: 4x8x8 latents
            f"data.limit={IMAGES}",
            f"encode.vae={vae}",
            f"encode.out={out}",
            "encode.shard_size=40",
            "encode.batch_size=16",
            *extra,
        ],
    )


def expected_latents(vae_folder: str, count: int = IMAGES) -> np.ndarray:
    """Latents straight from diffusers: posterior mean times the config's scaling factor."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder, low_cpu_mem_usage=False).eval()
    images = load_dataset("digits", image_size=32, limit=count).images.expand(-1, 3, -1, -1)
    with torch.no_grad():
        return (vae.encode(images).latent_dist.mean * vae.config.scaling_factor).numpy()


def read_shards(out: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, label, latent) of every shard, in index order."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{name}"))) for name in storage.list_names(out) if name.endswith(".parquet")]
    index = np.concatenate([t.column("index").to_numpy() for t in tables])
    label = np.concatenate([t.column("label").to_numpy() for t in tables])
    latent = np.concatenate([np.stack(t.column("latent").to_numpy(zero_copy_only=False)) for t in tables])
    order = np.argsort(index)
    return index[order], label[order], latent[order].reshape(len(index), 4, 8, 8)


@pytest.mark.slow
def test_encode_writes_the_vae_latents_in_shards_and_rewrites_only_a_lost_shard(vae_folder, ray_cluster, tmp_path):
    out = str(tmp_path / "latents")
    summary = run_encode(job(vae_folder, out, "encode.num_actors=2"))
    assert (summary.num_images, summary.shards, summary.shards_written, summary.latent_shape) == (IMAGES, 4, 4, [4, 8, 8])
    assert finished_shards(out) == {0, 1, 2, 3}

    index, label, latent = read_shards(out)
    np.testing.assert_array_equal(index, np.arange(IMAGES))
    np.testing.assert_array_equal(label, load_dataset("digits", limit=IMAGES).labels.numpy())
    expected = expected_latents(vae_folder)
    np.testing.assert_allclose(latent, expected, rtol=1e-4, atol=1e-5)

    # another shard size, batch size and actor count: the same latents
    other = run_encode(job(vae_folder, str(tmp_path / "again"), "encode.shard_size=64", "encode.batch_size=7"))
    assert other.shards == 3
    np.testing.assert_allclose(read_shards(str(tmp_path / "again"))[2], latent, rtol=1e-4, atol=1e-5)

    # a shard lost half-way (marker and file gone) is rewritten; finished ones are left alone
    storage.remove(f"{out}/shard-00002.done")
    storage.remove(f"{out}/shard-00002.parquet")
    kept = {k: os.path.getmtime(f"{out}/shard-{k:05d}.done") for k in (0, 1, 3)}
    resumed = run_encode(job(vae_folder, out))
    assert (resumed.shards_written, resumed.shards_skipped, resumed.images_written) == (1, 3, 40)
    assert {k: os.path.getmtime(f"{out}/shard-{k:05d}.done") for k in kept} == kept
    np.testing.assert_allclose(read_shards(out)[2], latent, rtol=1e-4, atol=1e-5)

    # other parameters into the same folder are refused, not mixed in
    with pytest.raises(EncodingMismatchError, match="latent"):
        run_encode(job(vae_folder, out, "encode.latent=sample"))


@pytest.mark.slow
def test_encode_writes_the_latents_of_the_flipped_images_for_horizontal_flips(vae_folder, ray_cluster, tmp_path):
    out = str(tmp_path / "latents")
    run_encode(job(vae_folder, out, "data.limit=24", "encode.shard_size=16", "encode.horizontal_flip=true"))
    dataset = load_dataset("latents", path=out)
    assert dataset.flipped is not None and tuple(dataset.flipped.shape) == (24, 4, 8, 8)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder, low_cpu_mem_usage=False).eval()
    images = load_dataset("digits", image_size=32, limit=24).images.expand(-1, 3, -1, -1).flip(-1)
    with torch.no_grad():
        expected = (vae.encode(images).latent_dist.mean * vae.config.scaling_factor).numpy()
    np.testing.assert_allclose(dataset.flipped.numpy(), expected, rtol=1e-4, atol=1e-5)
    # the latents of a flipped image are not the flipped latents
    assert not np.allclose(dataset.flipped.numpy(), dataset.images.flip(-1).numpy(), atol=1e-3)
    # a job that flips latents encoded without copies is refused on the driver
    plain = str(tmp_path / "plain")
    run_encode(job(vae_folder, plain, "data.limit=8", "encode.shard_size=8"))
    flipping = load_job(SPEC, ["tracking.enabled=false", "data.name=latents", f"data.path={plain}", "data.horizontal_flip=true"])
    with pytest.raises(ConfigError, match="data.horizontal_flip: the latents at .* hold no flipped copies"):
        check_job(flipping, "train")


def test_training_reads_the_latent_shards(vae_folder, ray_cluster, tmp_path):
    out = str(tmp_path / "latents")
    run_encode(job(vae_folder, out, "data.limit=64", "encode.shard_size=32"))

    dataset = load_dataset("latents", path=out)
    assert tuple(dataset.images.shape) == (64, 4, 8, 8) and dataset.num_classes == 10
    np.testing.assert_allclose(dataset.images.numpy(), expected_latents(vae_folder, 64), rtol=1e-4, atol=1e-5)
    assert len(load_dataset("latents", path=out, limit=10)) == 10

    run = load_job(
        SPEC,
        [
            "tracking.enabled=false", "data.name=latents", f"data.path={out}", "distributed.backend=local",
            "train.steps=3", "train.batch_size=16", "train.log_every=3", "train.sample_every=100", "evaluation.grid_size=2",
            f"output_dir={tmp_path / 'runs'}",
        ],
    )
    from orchestrator.train.run import run_train
    from ucgm_core.model_file import load_model_file

    summary = run_train(run)
    assert summary.steps == 3 and summary.last_loss is not None
    model = load_model_file(io.BytesIO(storage.read_bytes(f"{summary.run_dir}/model.pt")))
    assert (model.in_channels, model.input_size) == (4, 8)

    # a folder with an unfinished shard is refused, with the way out
    storage.remove(f"{out}/shard-00001.done")
    with pytest.raises(ValueError, match="1 of 2 shards unfinished.*re-run"):
        load_dataset("latents", path=out)


def test_encode_reads_the_vae_from_s3_and_writes_latents_there(vae_folder, s3_bucket, ray_cluster, tmp_path):
    import fsspec

    vae_uri = f"{s3_bucket}/models/tiny-vae"
    filesystem = fsspec.filesystem("s3")
    for name in os.listdir(vae_folder):
        filesystem.put_file(os.path.join(vae_folder, name), f"{vae_uri}/{name}")
    out = f"{s3_bucket}/latents"
    summary = run_encode(job(vae_uri, out, "data.limit=40", "encode.shard_size=20"))
    assert (summary.shards, summary.images_written) == (2, 40)
    dataset = load_dataset("latents", path=out)
    np.testing.assert_allclose(dataset.images.numpy(), expected_latents(vae_folder, 40), rtol=1e-4, atol=1e-5)

    with pytest.raises(JobError, match="vae_sha256"):
        run_encode(job(vae_uri, f"{s3_bucket}/other", "encode.vae_sha256=" + "0" * 64))


def test_encode_refuses_impossible_jobs_before_cluster_work(vae_folder, ray_cluster, tmp_path):
    # the driver's check (what the CLI runs first) ...
    with pytest.raises(ConfigError, match="encode.vae: encode needs the VAE"):
        check_job(load_job(SPEC, ["tracking.enabled=false", f"encode.out={tmp_path}"]), "encode")
    with pytest.raises(ConfigError, match="data.image_size.*divide by 4"):
        check_job(job(vae_folder, str(tmp_path / "a"), "data.image_size=30"), "encode")
    with pytest.raises(ConfigError, match="encode.vae: no config.json"):
        check_job(job(str(tmp_path / "no-vae"), str(tmp_path / "b")), "encode")
    # ... and the verb itself, before its actors start
    with pytest.raises(ConfigError, match="data.image_size.*divide by 4"):
        run_encode(job(vae_folder, str(tmp_path / "a"), "data.image_size=30"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_encode(job(str(tmp_path / "no-vae"), str(tmp_path / "b")))
    with pytest.raises(ResourceError, match=r"4 actors \(encode.num_actors\) need 8 CPUs"):
        run_encode(job(vae_folder, str(tmp_path / "c"), "encode.num_actors=4", "encode.cpus_per_actor=2"))
    with pytest.raises(ConfigError, match="data: name latents needs data.path"):
        load_job(SPEC, ["data.name=latents"])


def latent_model_job(vae_folder: str, tmp_path: Path, *extra: str):
    """Sampling jobs on a tiny DiT of 4x8x8 latents whose VAE is `vae_folder`."""
    from sampling_helpers import write_tiny_model_file

    model = write_tiny_model_file(tmp_path / "model.pt", input_size=8, in_channels=4)
    common = [
        "tracking.enabled=false", "seed=7", "data.image_size=32", "data.limit=40", f"encode.vae={vae_folder}",
        f"evaluation.model_file={model}", "sampler.steps=2", "evaluation.batch_size=5", f"output_dir={tmp_path / 'runs'}",
    ]
    return load_job(SPEC, [*common, *extra])


def test_generate_writes_the_vae_decodings_of_a_latent_models_unclamped_samples(vae_folder, ray_cluster, tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image

    from orchestrator.sample.generate import run_generate
    from sampling_helpers import tiny_model
    from ucgm_core.evaluation import generate
    from ucgm_core.features import quantize_to_uint8
    from ucgm_core.sampler import SamplerSettings
    from ucgm_core.transports import build_transport

    out = str(tmp_path / "generated")
    summary = run_generate(latent_model_job(vae_folder, tmp_path, f"evaluation.generation.out={out}", "evaluation.generation.num_samples=5"))
    assert summary.images_written == 5
    pixels = np.stack([np.asarray(Image.open(f"{out}/shard-00000/{i:08d}.png")) for i in range(5)])
    assert pixels.shape == (5, 32, 32, 3)

    latents = generate(tiny_model(input_size=8, in_channels=4), build_transport("linear"),
                       SamplerSettings(steps=2, schedule=(1.17, 0.8, 1.1), boundary_gaps=(0.001, 0.001)),
                       [7 + i for i in range(5)], torch.arange(5) % 10, (4, 8, 8), clamp=False)
    assert latents.abs().max() > 1  # the samples leave [-1, 1]: clamping them would change the images
    vae = AutoencoderKL.from_pretrained(vae_folder, low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    expected = quantize_to_uint8(decoded).numpy().transpose(0, 2, 3, 1)
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1



@pytest.mark.slow  # Inception on CPU: about a minute
def test_evaluate_scores_the_decoded_images_of_a_latent_model_with_inception(vae_folder, ray_cluster, tmp_path):
    from orchestrator.sample.evaluate import run_evaluate
    from orchestrator.sample.reference import run_reference

    inception = ["evaluation.extractor=inception-v3-tf-pool3", f"evaluation.reference_statistics={tmp_path / 'reference.npz'}"]
    run_reference(latent_model_job(vae_folder, tmp_path, *inception))  # of the 3x32x32 images the latents came from
    # without the decoder this is refused: Inception reads 1- or 3-channel images, the model makes 4
    evaluation = run_evaluate(latent_model_job(vae_folder, tmp_path, *inception, "evaluation.num_samples=10"))
    assert evaluation.metric == "fid" and evaluation.results[0].count == 10 and np.isfinite(evaluation.results[0].distance)
