"""The commit rule of checkpoint folders (orchestrator.train.checkpoints), on hand-made folders."""

from __future__ import annotations

from pathlib import Path

from orchestrator.train.checkpoints import checkpoint_problem, write_manifest


def _write(folder: Path, rank: int, world_size: int, payload: bytes) -> None:
    """One rank's files, then its manifest (what each worker does before Ray persists the folder)."""
    staging = folder.parent / f"staging-{rank}-{world_size}"
    staging.mkdir()
    (staging / f"shard_{rank}.pt").write_bytes(payload)
    write_manifest(str(staging), rank=rank, world_size=world_size, step=20, zero_stage=2, num_chunks=2)
    for path in staging.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())


def test_a_folder_rewritten_by_fewer_ranks_is_committed_despite_the_old_ranks_manifests(tmp_path):
    folder = tmp_path / "checkpoint_00000020"
    folder.mkdir()
    _write(folder, 0, 2, b"old rank 0")  # torn: rank 1 of 2 got its manifest in, rank 0's shard did not fit
    _write(folder, 1, 2, b"old rank 1")
    (folder / "shard_1.pt").write_bytes(b"cut")
    assert "shard_1.pt has 3 bytes" in checkpoint_problem(str(folder), check_content=True)
    _write(folder, 0, 1, b"new rank 0, alone")  # the 1-worker run reached step 20 again
    assert checkpoint_problem(str(folder), check_content=True) is None
    (folder / "shard_0.pt").write_bytes(b"cut")  # and a torn rewrite is still caught
    assert "shard_0.pt" in checkpoint_problem(str(folder), check_content=True)
