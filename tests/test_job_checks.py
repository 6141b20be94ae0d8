"""Every job rule is checked once, on the driver, before any cluster work (orchestrator.job_checks):
a bad job exits 2 within seconds with the key and the fix, through the real CLI, `--check` refuses
it alike, relative paths mean the caller's working directory for Ray workers too, and an error
only a Ray Train worker can see ends the run at once instead of being retried."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from orchestrator.config import load_job
from orchestrator.errors import ConfigError
from orchestrator.job_checks import LOCATION_KEYS, check_job, resolve_locations
from sampling_helpers import write_tiny_model_file
from ucgm_core.dit import DiTSettings

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "jobs" / "digits.yaml")
# an upper bound only against the old behaviour (a minute of Ray Train retries); a loaded machine
# takes several seconds to import torch, so the time itself is printed, not asserted tightly
BOUND_S = 45
RAY_STARTED = ("started a local Ray cluster", "Started a local Ray instance")


def _environment() -> dict[str, str]:
    """The caller's environment without another cluster's address, a submitted job's marker or
    a tracking server: what a user on a laptop has."""
    removed = ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "MLFLOW_TRACKING_URI")
    environment = {k: v for k, v in os.environ.items() if k not in removed}
    # Ray would collapse identical lines of several attempts into one "[repeated Nx]"
    environment.update(PYTHONPATH=str(ROOT), RAY_DEDUP_LOGS="0", RAY_AUTH_MODE="disabled")
    return environment


def _cli(cwd: Path, *args: str, timeout: float = 600) -> tuple[int, str, str, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - started


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Files of the bad inputs: a truncated model file, a training checkpoint's state file, a
    plain file where a folder should be, and a model file of another architecture."""
    folder = tmp_path_factory.mktemp("inputs")
    data = Path(write_tiny_model_file(folder / "model.pt")).read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    state = folder / "run" / "checkpoint_00000010" / "ucgm_state.pt"
    state.parent.mkdir(parents=True)
    torch.save({"step": 10, "ema": {}, "config": {}}, state)
    (folder / "a-file").write_text("")
    return {"folder": str(folder), "truncated": str(folder / "truncated.pt"), "state": str(state), "file": str(folder / "a-file")}


# (verb, overrides, what stderr must name: the keys and the fixes)
BAD_INPUTS = {
    "image_folder without image_size at a nonexistent path": (
        "train", ["data.name=image_folder", "data.path=/nonexistent"],
        ["data.image_size:", "set it, e.g. data.image_size=64", "data.path: nothing at '/nonexistent'", "one sub-folder of images per class"],
    ),
    "initialize_from a file that is no model file": (
        "train", ["train.initialize_from=/etc/passwd"],
        ["train.initialize_from: '/etc/passwd' is not a model file written by `python -m orchestrator train`", "point it at the <run_dir>/model.pt"],
    ),
    "a truncated model file for evaluate": (
        "evaluate", ["model_file={truncated}"],
        ["evaluation.model_file:", "is not a model file", "PytorchStreamReader", "point it at the <run_dir>/model.pt"],
    ),
    "a training checkpoint for evaluate": (
        "evaluate", ["model_file={state}"],
        ["evaluation.model_file:", "is a training checkpoint", "<run_dir>/model.pt", "{folder}/run/model.pt"],
    ),
    "a name that leaves output_dir": (
        "train", ["name=../../escaped"],
        ["name: '../../escaped' is not one folder name", "use a name without '/'"],
    ),
    "a dataset read from a path without data.path": (
        "train", ["data.name=parquet"],
        ["data.path: dataset parquet reads a parquet file", "set data.path"],
    ),
    "an output_dir that cannot be written": (
        "train", ["output_dir={file}/runs"],
        ["output_dir: cannot write to", "check that the path is a writable folder"],
    ),
}


def _filled(items: list[str], inputs: dict[str, str]) -> list[str]:
    return [item.format(**inputs) for item in items]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_job_exits_2_within_seconds_naming_the_key_and_the_fix_without_a_cluster(case, inputs, tmp_path):
    verb, overrides, expected = BAD_INPUTS[case]
    code, out, err, seconds = _cli(tmp_path, verb, SPEC, "tracking.enabled=false", *_filled(overrides, inputs), timeout=120)
    print(f"{case}: exit {code} after {seconds:.1f} s\n{err}")
    assert code == 2, err
    assert err.startswith("error: invalid job config:\n"), err
    for text in _filled(expected, inputs):
        assert text in err
    assert "Traceback" not in out + err
    assert not any(started in out + err for started in RAY_STARTED), "a Ray cluster was started"
    assert seconds < BOUND_S
    assert not (tmp_path.parent / "escaped").exists()  # where <cwd>/outputs/../../escaped would be


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_check_refuses_the_same_jobs(case, inputs, tmp_path, monkeypatch, capsys):
    verb, overrides, expected = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    before = sorted(path.name for path in tmp_path.iterdir())
    assert main([verb, SPEC, "--check", "tracking.enabled=false", *_filled(overrides, inputs)]) == 2
    err = capsys.readouterr().err
    for text in _filled(expected, inputs):
        assert text in err
    # a refused job loses nothing and leaves nothing: no run folder, no outputs/ beside the inputs
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_every_verb_of_the_registry_has_its_rules_and_a_cli_command():
    from orchestrator import job_checks
    from orchestrator.cli import _parser
    from orchestrator.verbs import VERBS

    assert set(VERBS) == set(job_checks._VERB_CHECKS)
    commands = _parser()._subparsers._group_actions[0].choices
    assert set(commands) == {*VERBS, "tune"}


def test_check_prints_the_job_with_its_paths_resolved(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    write_tiny_model_file(tmp_path / "models" / "model.pt")
    assert main(["generate", SPEC, "--check", "model_file=models/model.pt", "out=generated", "tracking.enabled=false"]) == 0
    printed = capsys.readouterr().out
    assert f"model_file: {tmp_path}/models/model.pt" in printed and f"out: {tmp_path}/generated" in printed


def test_a_model_to_start_from_that_does_not_fit_the_network_or_the_transport_is_refused_on_the_driver(tmp_path):
    from ucgm_core.dit import build_dit
    from ucgm_core.model_file import model_file_bytes
    from ucgm_core.sampler import SamplerSettings

    wide = DiTSettings(hidden_size=96, num_heads=4)
    (tmp_path / "wide.pt").write_bytes(
        model_file_bytes(build_dit(wide, input_size=8, in_channels=1, num_classes=10), settings=wide, input_size=8, in_channels=1,
                         num_classes=10, transport="linear", sampler=SamplerSettings())
    )
    job = load_job(ROOT / "jobs/systems/digits_ucgm_few_step.yaml", [f"train.initialize_from={tmp_path / 'wide.pt'}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"train.initialize_from: .* does not fit this job's network: model.hidden_size is 96 there"):
        check_job(job, "train")
    teacher = write_tiny_model_file(tmp_path / "linear.pt")  # a linear-transport model
    job = load_job(ROOT / "jobs/systems/digits_scd.yaml", [f"train.teacher={teacher}", "train.initialize_from=null", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.teacher: .* trained on transport 'linear', this job uses 'trigflow'"):
        check_job(job, "train")


def test_every_problem_is_listed_at_once(inputs, tmp_path):
    job = load_job(SPEC, ["name=..", "data.name=image_folder", f"train.initialize_from={inputs['truncated']}", "tracking.enabled=false"])
    with pytest.raises(ConfigError) as raised:
        check_job(job, "train")
    keys = [line.split(":", 1)[0] for line in raised.value.problems]
    assert keys == ["name", "data.path", "data.image_size", "train.initialize_from"]


# --------------------------------------------------------------------------- relative paths


def test_relative_locations_are_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    relative = {key: f"rel/{key.replace('.', '_')}" for key in LOCATION_KEYS}
    distillation = ROOT / "jobs/systems/digits_scd.yaml"  # a job that takes a train.teacher
    job = load_job(distillation, [f"{key}={value}" for key, value in relative.items()] + ["encode.out=s3://bucket/latents"])
    resolved = resolve_locations(job)
    for key, value in relative.items():
        got = functools.reduce(getattr, key.split("."), resolved)
        assert got == ("s3://bucket/latents" if key == "encode.out" else str(tmp_path / value)), key
    assert resolved.tracking.tracking_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"  # the default store, here
    assert resolve_locations(load_job(SPEC, ["tracking.tracking_uri=sqlite:///db/m.db"])).tracking.tracking_uri == f"sqlite:///{tmp_path}/db/m.db"
    assert resolve_locations(load_job(SPEC, ["tracking.tracking_uri=http://mlflow:5000"])).tracking.tracking_uri == "http://mlflow:5000"
    assert resolve_locations(resolved) == resolved  # once is enough
    assert resolved.model == job.model and resolved.objective == job.objective


def test_a_ray_train_run_with_relative_paths_writes_under_the_callers_directory(tmp_path):
    code, out, err, seconds = _cli(
        tmp_path, "train", SPEC, "output_dir=rel/out", "train.steps=2", "train.log_every=1", "train.checkpoint_every=2",
        "train.sample_every=100000", "evaluation.num_samples=20", "evaluation.batch_size=20", "distributed.num_workers=1",
        "distributed.cpus_per_worker=1",
    )
    print(f"relative train: exit {code} after {seconds:.1f} s")
    assert code == 0, err[-3000:]
    assert (tmp_path / "rel" / "out" / "digits" / "model.pt").is_file()
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()  # the default MLflow store, from the workers too


# --------------------------------------------------------------------------- errors only a worker sees


def test_an_error_only_a_worker_sees_ends_the_run_without_retries(tmp_path):
    images = tmp_path / "images" / "class_a"  # a class folder, but no image in it: only loading the data shows it
    images.mkdir(parents=True)
    (images / "notes.txt").write_text("no images here")
    code, out, err, seconds = _cli(
        tmp_path, "train", SPEC, "data.name=image_folder", "data.path=images", "data.image_size=8", "train.steps=2",
        "distributed.num_workers=1", "distributed.cpus_per_worker=1", "distributed.max_failures=2", "tracking.enabled=false",
    )
    print(f"worker-only error: exit {code} after {seconds:.1f} s")
    assert code == 2, err[-3000:]
    assert f"error: invalid job config:\n  data: image_folder path '{tmp_path / 'images'}' holds no .png/.jpg/.jpeg files" in err
    attempts = (out + err).count("a problem of the job: ending the run without retries")
    assert attempts == 1, (out + err)[-4000:]
    # the driver prints the message alone; Ray's own actors may log tracebacks of their own
    # (forwarded as "(Name pid=...) ..."), e.g. when several clusters share the machine
    assert not any("Traceback" in line for line in err.splitlines() if "pid=" not in line)
