"""The commands of the README's "Hyperparameter search" section, run as a reader runs them:
read out of README.md at test time, with relative paths, from the root of a fresh copy of
jobs/, through `.venv/bin/python -m orchestrator`, with only fewer trials, steps and samples
appended as overrides. Relative outputs/ and mlruns/ land in that copy, never in the checkout.

A README edit that breaks one of these commands, or adds one the table below does not know,
fails here. The training sweep takes minutes on two cores and is `slow`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SECTION = "### Hyperparameter search"
PREFIX = [".venv/bin/python", "-m", "orchestrator"]

# (verb, spec, --check) -> the overrides appended to the README's command: the same command,
# smaller. Every command of the section needs an entry. The training here only makes the model
# the sampling sweep reads, so it runs in one process (no Ray Train start: a minute on two cores).
SMALLER = {
    ("train", "jobs/digits.yaml", False): [
        "train.steps=30", "train.warmup_steps=5", "train.log_every=10", "train.checkpoint_every=30",
        "train.sample_every=1000", "train.batch_size=32", "evaluation.num_samples=100", "distributed.backend=local",
    ],
    ("reference", "jobs/digits.yaml", False): [],
    ("tune", "jobs/tune_digits_sampling.yaml", False): ["num_trials=2", "job.evaluation.num_samples=100"],
    ("tune", "jobs/tune_digits.yaml", False): [
        "num_trials=2", "early_stopping.grace_period=10", "job.train.steps=20", "job.train.warmup_steps=5",
        "job.train.score_every=10", "job.train.log_every=10", "job.train.checkpoint_every=20",
        "job.evaluation.score_samples=50", "job.evaluation.num_samples=100",
    ],
    ("tune", "jobs/tune_digits.yaml", True): [],
}
SLOW = {("tune", "jobs/tune_digits.yaml", False)}


def readme_commands() -> list[list[str]]:
    """The commands of the section's bash block, in order: continuation lines joined, comments
    dropped, `a && b` split into its commands."""
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = re.split(r"\n#{2,3} ", text.split(SECTION, 1)[1], maxsplit=1)[0]  # the next heading (a bash comment has one #)
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"the README's {SECTION!r} section has no ```bash block"
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            commands += [shlex.split(part) for part in line.split("&&")]
    return commands


def key_of(command: list[str]) -> tuple[str, str, bool]:
    assert command[:3] == PREFIX, f"README command {shlex.join(command)!r} does not start with {shlex.join(PREFIX)}"
    return command[3], command[4], "--check" in command


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A fresh copy of what the commands read (jobs/), with `.venv` the interpreter running
    the tests; the checkout's code comes first on the path (for Ray's workers too)."""
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1], target_is_directory=True)
    return tmp_path


def run_readme_command(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    full = [*command, *SMALLER[key_of(command)]]
    done = subprocess.run(full, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{shlex.join(full)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def test_every_readme_tune_command_has_its_smaller_form():
    commands = readme_commands()
    unknown = [shlex.join(c) for c in commands if key_of(c) not in SMALLER]
    assert not unknown, f"README commands this test does not know; add their overrides to SMALLER: {unknown}"
    assert {key_of(c) for c in commands} == set(SMALLER), "a command this test runs is gone from the README"


def test_the_readme_sampling_sweep_scores_the_model_trained_by_the_readme_commands(clone):
    """train && reference, then the sampling sweep, as written: its relative model file and the
    default reference statistics (under the relative output_dir) are the clone's, though each
    trial runs in Tune's own working directory."""
    commands = [c for c in readme_commands() if key_of(c) not in SLOW and not key_of(c)[2]]
    assert [key_of(c)[:2] for c in commands] == [
        ("train", "jobs/digits.yaml"), ("reference", "jobs/digits.yaml"), ("tune", "jobs/tune_digits_sampling.yaml"),
    ]
    for command in commands:
        run_readme_command(command, clone)

    folder = clone / "outputs" / "tune_digits_sampling"
    summary = json.loads((folder / "sweep.json").read_text())
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert summary["statuses"] == {"completed": 2} and summary["complete"]
    for row, trial in zip(rows, summary["trials"], strict=True):
        distance = float(row["frechet_distance"])
        assert math.isfinite(distance) and distance == trial["values"]["frechet_distance"]
        assert Path(row["run_dir"]).parent == folder / "trials"
    best = yaml.safe_load((folder / "best_job.yaml").read_text())
    assert best["evaluation"]["model_file"] == str(clone / "outputs" / "digits" / "model.pt")
    assert Path(best["evaluation"]["reference_statistics"]).is_relative_to(clone / "outputs" / "reference")
    assert (clone / "mlruns" / "mlflow.db").is_file()


def test_the_readme_sweep_check_validates_and_starts_nothing(clone):
    (command,) = [c for c in readme_commands() if key_of(c)[2]]
    done = run_readme_command(command, clone)
    resolved = yaml.safe_load(done.stdout)
    assert resolved["folder"] == str(clone / "outputs" / "tune_digits")
    assert not (clone / "outputs").exists() and not (clone / "mlruns").exists()


@pytest.mark.slow
def test_the_readme_training_sweep_runs_its_trials(clone):
    (command,) = [c for c in readme_commands() if key_of(c) in SLOW]
    run_readme_command(command, clone)
    summary = json.loads((clone / "outputs" / "tune_digits" / "sweep.json").read_text())
    assert summary["complete"] and summary["best"] is not None
    assert math.isfinite(summary["best"]["values"]["frechet_distance"])
