"""Streaming training input (data.streaming, data.shuffle_window) and horizontal flips: the order of
a windowed epoch, streamed batches equal to in-memory ones at every worker count and after a
resume mid-epoch, the same loss curve, flipped latent copies, a bounded peak RSS, the rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import write_digit_shards, write_latent_folder
from driver_helpers import train_measuring_rss
from orchestrator.cli import main
from orchestrator.config import load_job
from orchestrator.errors import ConfigError
from orchestrator.train.batches import BatchSchedule
from orchestrator.train.inputs import InMemoryInput, StreamingInput, open_training_input

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "jobs" / "digits.yaml")
IMAGES, SHARDS = 600, 7  # uneven shards of 85 and 86 rows


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("digit-shards")
    write_digit_shards(folder, IMAGES, SHARDS)
    return str(folder)


def _job(path: str, *overrides: str):
    return load_job(SPEC, ["data.name=parquet", f"data.path={path}", "tracking.enabled=false", *overrides])


def test_a_windowed_epoch_shuffles_shards_then_rows_within_windows_of_shards():
    sizes = [5, 7, 3, 9, 6]
    schedule = BatchSchedule(30, 4, seed=3, shard_sizes=sizes, shuffle_window=2)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    epochs = []
    for epoch in range(2):
        positions = np.arange(epoch * 30, (epoch + 1) * 30)
        rows = schedule.rows(positions)
        assert sorted(rows) == list(range(30))  # every row once per epoch
        windows = schedule.windows(epoch)
        assert [len(w) for w in windows.shards] == [2, 2, 1]
        for j, shards in enumerate(windows.shards):
            first, end, span_shards = schedule.window_span(epoch * schedule.windows_per_epoch + j)
            expected = set(np.concatenate([np.arange(starts[s], starts[s] + sizes[s]) for s in shards]))
            assert set(schedule.rows(np.arange(first, end))) == expected and list(span_shards) == list(shards)
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])
    # flips: about half, a function of the position only
    flips = schedule.flips(np.arange(4000))
    assert 0.45 < flips.mean() < 0.55
    np.testing.assert_array_equal(BatchSchedule(30, 4, seed=3).flips(np.arange(4000)), flips)


def _streamed(config, world_size: int, accumulation: int, steps: range) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(step, chunk) -> the batch, from `world_size` streaming inputs (one per rank)."""
    inputs = [open_training_input(config, rank=rank, world_size=world_size) for rank in range(world_size)]
    chunks = world_size * accumulation
    batches = {}
    for step in steps:
        for chunk in range(chunks):
            batches[step, chunk] = inputs[chunk % world_size].batch(step, chunk, chunks)
    for source in inputs:
        assert isinstance(source, StreamingInput)
        source.close()
    return batches


def test_streamed_batches_equal_the_in_memory_batches_at_every_worker_count_with_flips(digit_shards):
    config = _job(digit_shards, "data.streaming=true", "data.shuffle_window=2", "data.horizontal_flip=true", "train.batch_size=40")
    memory = open_training_input(_job(digit_shards, "data.shuffle_window=2", "data.horizontal_flip=true", "train.batch_size=40"))
    assert isinstance(memory, InMemoryInput)
    steps = range(0, 33)  # 15 steps an epoch: more than two epochs, batches across windows and epochs
    for world_size, accumulation in [(1, 1), (2, 1), (2, 2), (4, 1)]:
        streamed = _streamed(config, world_size, accumulation, steps)
        for (step, chunk), (images, labels) in streamed.items():
            expected_images, expected_labels = memory.batch(step, chunk, world_size * accumulation)
            torch.testing.assert_close(images, expected_images, rtol=0, atol=0)
            torch.testing.assert_close(labels, expected_labels, rtol=0, atol=0)
    # the flips happen: flipped examples are the mirror images of the unflipped ones
    plain = open_training_input(_job(digit_shards, "data.shuffle_window=2", "train.batch_size=40"))
    flipped, unflipped = memory.batch(5, 0, 1)[0], plain.batch(5, 0, 1)[0]
    mirrored = (flipped != unflipped).flatten(1).any(1)
    assert 10 < int(mirrored.sum()) < 30
    torch.testing.assert_close(flipped[mirrored], unflipped[mirrored].flip(-1))


def test_a_limit_cuts_the_streamed_shards_where_it_cuts_the_rows_held_in_memory(digit_shards):
    overrides = ["data.shuffle_window=2", "data.limit=300", "train.batch_size=50"]  # 300 rows: 3 shards and a half
    streamed = open_training_input(_job(digit_shards, *overrides, "data.streaming=true"))
    memory = open_training_input(_job(digit_shards, *overrides))
    assert list(streamed.shards.sizes) == [86, 86, 86, 42] and len(memory.dataset) == 300
    for step in range(14):  # more than two epochs of 6 steps
        assert all(torch.equal(a, b) for a, b in zip(streamed.batch(step, 0, 1), memory.batch(step, 0, 1)))
    streamed.close()


def test_a_streaming_input_opened_mid_epoch_at_another_worker_count_serves_the_uninterrupted_batches(digit_shards):
    config = _job(digit_shards, "data.streaming=true", "data.shuffle_window=3", "train.batch_size=24")
    whole = _streamed(config, 1, 4, range(0, 30))
    for world_size, accumulation in [(1, 4), (2, 2), (4, 1)]:
        resumed = _streamed(config, world_size, accumulation, range(17, 30))  # 25 steps an epoch: mid-epoch
        for key, (images, labels) in resumed.items():
            torch.testing.assert_close(images, whole[key][0], rtol=0, atol=0)
            assert torch.equal(labels, whole[key][1])


def test_streaming_holds_only_its_own_rows_of_at_most_two_windows(digit_shards):
    config = _job(digit_shards, "data.streaming=true", "data.shuffle_window=1", "train.batch_size=20")
    source = open_training_input(config, rank=1, world_size=2)
    held = []
    for step in range(40):
        source.batch(step, 1, 2)
        held.append([len(window.result().positions) for window in source._windows.values()])
    source.close()
    # a window is one shard (85-86 rows); this rank keeps its chunks' rows of it, about half (its
    # chunks of 10 rows alternate with the other rank's), and never more than two windows
    assert max(len(windows) for windows in held) == 2
    assert all(33 <= rows <= 53 for windows in held for rows in windows)


def test_streamed_latents_take_the_flipped_copies_that_encode_wrote(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((50, 4, 2, 2)).astype(np.float32)
    flipped = latents + 100.0  # not a mirror image: only the copy can give these values
    labels = rng.integers(0, 3, 50)
    write_latent_folder(tmp_path / "latents", latents, labels, shard_size=8, num_classes=3, flipped=flipped)
    overrides = ["data.name=latents", f"data.path={tmp_path / 'latents'}", "data.horizontal_flip=true", "train.batch_size=10", "tracking.enabled=false"]
    streamed = open_training_input(load_job(SPEC, [*overrides, "data.streaming=true", "data.shuffle_window=2"]))
    memory = open_training_input(load_job(SPEC, [*overrides, "data.shuffle_window=2"]))
    schedule = streamed.schedule
    for step in range(12):
        images, batch_labels = streamed.batch(step, 0, 1)
        torch.testing.assert_close(images, memory.batch(step, 0, 1)[0], rtol=0, atol=0)
        positions = np.arange(step * 10, (step + 1) * 10)
        rows, flips = schedule.rows(positions), schedule.flips(positions)
        expected = np.where(flips[:, None, None, None], flipped[rows], latents[rows])
        np.testing.assert_array_equal(images.numpy(), expected)
        np.testing.assert_array_equal(batch_labels.numpy(), labels[rows])
    streamed.close()


def test_flipping_latents_without_flipped_copies_is_refused_before_any_work(tmp_path, capsys):
    write_latent_folder(tmp_path / "latents", np.zeros((4, 4, 2, 2), np.float32), np.zeros(4), shard_size=2, num_classes=1)
    code = main(["train", SPEC, "--check", "data.name=latents", f"data.path={tmp_path / 'latents'}", "data.horizontal_flip=true", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "data.horizontal_flip: the latents at" in err and "encode.horizontal_flip: true" in err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.streaming=true", "data.shuffle_window=4"], "streaming reads shards (data.name parquet or latents)"),
        (["data.name=parquet", "data.path=/x", "data.streaming=true"], "set data.shuffle_window"),
        (["data.shuffle_window=2"], "has no shards; remove data.shuffle_window"),
    ],
)
def test_streaming_rules_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_job(SPEC, overrides)


def _train(tmp: Path, path: str, *overrides: str):
    from orchestrator.train.run import run_train

    config = _job(
        path, "distributed.backend=local", f"output_dir={tmp}", "train.steps=24", "train.batch_size=40", "train.log_every=4",
        "train.checkpoint_every=12", "train.sample_every=1000", "evaluation.num_samples=20", "evaluation.grid_size=2",
        "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "data.shuffle_window=2", "data.horizontal_flip=true", *overrides,
    )
    summary = run_train(config)
    records = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def test_streaming_and_in_memory_training_give_the_same_loss_curve_and_a_resume_mid_epoch_too(digit_shards, tmp_path):
    _, memory = _train(tmp_path / "memory", digit_shards)
    _, streamed = _train(tmp_path / "streamed", digit_shards, "data.streaming=true")
    assert [r["loss"] for r in streamed] == [r["loss"] for r in memory]
    assert all(0 <= r["data_stall_share"] < 1 for r in streamed)
    # stopped at step 12 (mid-epoch: 15 steps an epoch), then resumed to 24
    _train(tmp_path / "resumed", digit_shards, "data.streaming=true", "train.steps=12")
    summary, resumed = _train(tmp_path / "resumed", digit_shards, "data.streaming=true")
    assert summary.resumed_from == 12
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in memory], rel=1e-6)


def _peak_rss(tmp: Path, spec: str, *overrides: str) -> int:
    """Peak RSS of a training process above its RSS after imports, in bytes."""
    result = train_measuring_rss(spec, list(overrides), tmp)
    return result["peak"] - result["before"]


@pytest.mark.slow
def test_streaming_a_dataset_many_windows_large_keeps_the_peak_rss_of_a_worker_bounded(tmp_path):
    """64 shards of 8 MiB latents (512 MiB), one shard a window. The bound stated: the peak RSS of
    a streaming worker stays below that of the same job holding one shard in memory plus a
    quarter of the dataset (it holds two windows and one shard being read, plus what the
    allocators keep of the buffers read). In memory, the whole dataset costs at least its size."""
    shard_rows, shards, shape = 2048, 64, (4, 16, 16)
    shard_bytes = shard_rows * int(np.prod(shape)) * 4
    dataset_bytes = shards * shard_bytes
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((shard_rows * shards, *shape), dtype=np.float32)
    labels = rng.integers(0, 10, len(latents))
    write_latent_folder(tmp_path / "big", latents, labels, shard_size=shard_rows, num_classes=10)
    write_latent_folder(tmp_path / "one", latents[:shard_rows], labels[:shard_rows], shard_size=shard_rows, num_classes=10)
    del latents
    common = [
        "data.name=latents", "tracking.enabled=false", "distributed.backend=local", f"output_dir={tmp_path / 'runs'}",
        "train.batch_size=512", "train.steps=48", "train.log_every=12", "train.checkpoint_every=1000", "train.sample_every=1000",
        "evaluation.grid_size=1", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4",
    ]
    # 48 steps of 512 rows: 12 windows of one shard
    streamed = _peak_rss(tmp_path, SPEC, *common, "name=streamed", f"data.path={tmp_path / 'big'}", "data.streaming=true", "data.shuffle_window=1")
    single = _peak_rss(tmp_path, SPEC, *common, "name=single", f"data.path={tmp_path / 'one'}")
    whole = _peak_rss(tmp_path, SPEC, *common, "name=whole", f"data.path={tmp_path / 'big'}")
    mib = 2**20
    print(f"peak RSS above start: streamed {streamed / mib:.0f} MiB, one shard in memory {single / mib:.0f} MiB, "
          f"all {shards} in memory {whole / mib:.0f} MiB (shard {shard_bytes / mib:.0f} MiB, dataset {dataset_bytes / mib:.0f} MiB)")
    assert streamed <= single + dataset_bytes / 4
    assert whole >= single + 0.75 * dataset_bytes  # the bound would catch an input that loads it all
