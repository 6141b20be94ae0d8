"""Every YAML under jobs/ passes what `python -m orchestrator <verb> <spec> --check` checks, with
the verb it is meant for: sweep specs (`tune`), the latent-extraction job (`encode`), and the
training jobs, whose sampling verbs read the same spec. A spec for a cluster, or one that starts
from another run's model, names files this machine does not hold: `--check` may refuse those
locations, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.job_checks import LOCATION_KEYS

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "jobs").rglob("*.yaml"))


def verb_of(spec: Path) -> str:
    raw = yaml.safe_load(spec.read_text())
    if "space" in raw and "job" in raw:
        return "tune"
    if "vae" in raw.get("encode", {}) and raw.get("data", {}).get("name") != "latents":
        return "encode"
    return "train"


def test_jobs_holds_the_laptop_defaults_and_the_paper_recipes():
    names = {spec.name for spec in SPECS}
    assert {"digits.yaml", "fashion_mnist.yaml", "imagenet256_encode.yaml", "imagenet256_dit_xl2_multi_step.yaml",
            "imagenet256_dit_xl2_few_step.yaml"} <= names


def refused_keys(stderr: str) -> set[str]:
    """The keys of the problems an `invalid job config` error lists (one indented line each)."""
    return {line.split(":", 1)[0].strip() for line in stderr.splitlines() if line.startswith("  ")}


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: str(spec.relative_to(ROOT / "jobs")))
def test_every_job_spec_passes_check(spec, capsys, tmp_path, monkeypatch):
    verb = verb_of(spec)
    monkeypatch.chdir(tmp_path)  # relative outputs are created (proved writable) here, not in the repository
    code = main([verb, str(spec), "--check"])
    err = capsys.readouterr().err
    if code == 2 and verb != "tune":
        assert refused_keys(err) <= set(LOCATION_KEYS), f"python -m orchestrator {verb} {spec} --check:\n{err}"
        return
    assert code == 0, f"python -m orchestrator {verb} {spec} --check:\n{err}"


def test_the_few_step_recipe_starts_from_the_multi_step_run():
    from orchestrator.config import load_job

    multi = load_job(ROOT / "jobs/imagenet256_dit_xl2_multi_step.yaml")
    few = load_job(ROOT / "jobs/imagenet256_dit_xl2_few_step.yaml")
    assert few.train.initialize_from == f"{multi.run_dir}/model.pt"
    assert (few.model, few.data, few.transport) == (multi.model, multi.data, multi.transport)
    encode = load_job(ROOT / "jobs/imagenet256_encode.yaml")
    assert multi.data.path == encode.encode.out and multi.encode.vae == encode.encode.vae


RECIPE_SWEEPS = sorted((ROOT / "jobs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("sweep", RECIPE_SWEEPS, ids=lambda spec: spec.stem)
def test_each_recipe_sweep_searches_a_systems_spec_that_names_it(sweep):
    """jobs/sweeps/ holds the sweeps that found the jobs/systems/ recipes: each one's base job is
    a recipe, the recipe's comments name the sweep (so a reader can rerun the search), and a
    training sweep keeps the benchmark's budget (800 steps at batch 128) that its results are for."""
    from orchestrator.tune.spec import load_sweep

    raw = yaml.safe_load(sweep.read_text())
    recipe = (sweep.parent / raw["job"]).resolve()
    assert recipe.parent == ROOT / "jobs" / "systems", f"{sweep.name}: job {raw['job']!r} is not a jobs/systems/ recipe"
    assert f"jobs/sweeps/{sweep.name}" in recipe.read_text(), f"{recipe.name} does not name the sweep jobs/sweeps/{sweep.name}"
    if raw.get("mode", "train") == "train":
        job = load_sweep(sweep).base_job
        assert (job.train.steps, job.train.batch_size) == (800, 128), f"{sweep.name} left the benchmark's budget"
