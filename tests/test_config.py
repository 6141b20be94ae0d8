"""The job schema: YAML + dotted overrides, validated before any work, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_job

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_parsed_with_yaml_types():
    config = load_job(ROOT / "jobs/digits.yaml", ["train.steps=7", "objective.consistency_ratio=1", "sampler.schedule=[1, 1, 1]"])
    assert config.train.steps == 7
    assert config.objective.consistency_ratio == 1.0
    assert config.sampler.schedule == (1.0, 1.0, 1.0)


def test_time_distribution_is_chosen_by_kind():
    config = load_job(None, ["objective.time_distribution={kind: logit_normal, mean: -0.4, std: 1.0}"])
    assert type(config.objective.time_distribution).__name__ == "LogitNormalTime"
    assert config.objective.time_distribution.mean == -0.4


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_job(None, list(overrides))
    return str(caught.value)


def test_unknown_top_level_key_suggests_the_closest_section():
    message = _error("trian.steps=5")
    assert "trian" in message and "did you mean 'train'" in message


def test_unknown_nested_key_suggests_the_closest_valid_key():
    message = _error("objective.consistancy_ratio=1")
    assert "objective.consistancy_ratio" in message
    assert "did you mean 'objective.consistency_ratio'" in message


def test_wrong_type_names_the_key_and_the_input():
    message = _error("train.steps=many")
    assert "train.steps" in message and "'many'" in message


def test_consistency_ratio_outside_unit_interval_is_refused():
    message = _error("objective.consistency_ratio=1.5")
    assert "consistency_ratio" in message and "[0, 1]" in message


def test_unknown_transport_suggests_a_valid_one():
    message = _error("transport=lineer")
    assert "transport" in message and "'linear'" in message


def test_every_problem_is_reported_at_once():
    message = _error("train.steps=0", "sampler.stochasticity=2")
    assert "train.steps" in message and "stochasticity" in message


def test_missing_spec_file_says_so():
    with pytest.raises(ConfigError, match="not found"):
        load_job(ROOT / "jobs/no_such_job.yaml")


def test_cli_rejects_a_bad_config_before_any_work(tmp_path, capsys):
    output = tmp_path / "out"
    code = main(["train", str(ROOT / "jobs/digits.yaml"), f"output_dir={output}", "objective.consistency_ratio=-1"])
    assert code == 2
    assert "objective" in capsys.readouterr().err
    assert not output.exists()


def test_cli_check_prints_the_resolved_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs resolve here, not in the repository
    assert main(["train", str(ROOT / "jobs/digits.yaml"), "--check", "train.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out


def test_unknown_time_distribution_kind_gives_one_clear_error():
    message = _error("objective.time_distribution={kind: betta, a: 2}")
    assert "unknown kind 'betta'" in message and "did you mean 'beta'" in message
    assert message.count("\n") == 1, message  # one problem, not one per union member


def test_unknown_key_inside_the_chosen_time_distribution_is_named():
    message = _error("objective.time_distribution={kind: beta, aa: 2}")
    assert "did you mean 'objective.time_distribution.a'" in message
    assert message.count("\n") == 1, message


@pytest.mark.parametrize(
    "old, new, value",
    [
        ("evaluation.checkpoint=/models/model.pt", "model_file", "/models/model.pt"),
        ("evaluation.sweep=[{steps: 2}]", "sampler_grid", ({"steps": 2},)),
        ("evaluation.reference=/stats.npz", "reference_statistics", "/stats.npz"),
    ],
)
def test_a_renamed_key_still_works_for_a_release_with_a_warning_naming_the_new_one(old, new, value, caplog):
    config = load_job(None, [old])
    assert getattr(config.evaluation, new) == value
    assert f"rename it to evaluation.{new}" in caplog.text


def test_objective_mode_becomes_the_distillation_flag():
    spec = ROOT / "jobs/systems/digits_scd.yaml"
    assert load_job(spec, ["objective.distillation=null", "objective.mode=distillation"]).objective.distillation is True
    with pytest.raises(ConfigError, match="objective.mode: replaced by objective.distillation, and both are set"):
        load_job(spec, ["objective.mode=distillation"])  # the spec sets distillation: true already
    with pytest.raises(ConfigError, match="objective.mode: 'teaching' is not training or distillation"):
        load_job(None, ["objective.kind=scm", "transport=trigflow", "objective.mode=teaching"])


def test_old_and_new_name_together_are_refused():
    with pytest.raises(ConfigError, match="evaluation.sweep: renamed to evaluation.sampler_grid, and both are set"):
        load_job(None, ["evaluation.sweep=[{steps: 2}]", "evaluation.sampler_grid=[{steps: 4}]"])


def test_the_old_checkpoint_shortcut_still_works(caplog):
    from orchestrator.cli import expand_shortcuts

    assert expand_shortcuts("evaluate", ["checkpoint=m.pt"]) == ["evaluation.model_file=m.pt"]
    assert "evaluate checkpoint= is deprecated" in caplog.text


def test_an_elastic_worker_range_is_read_from_the_command_line():
    config = load_job(None, ["distributed.num_workers=[2,4]", "train.gradient_accumulation_steps=3", "train.batch_size=96"])
    d = config.distributed
    assert (d.min_workers, d.max_workers, d.elastic) == (2, 4, True)
    assert config.num_chunks == 12  # the largest size's micro-batches, kept at every size
    fixed = load_job(None, ["distributed.num_workers=4"]).distributed
    assert (fixed.min_workers, fixed.max_workers, fixed.elastic) == (4, 4, False)


@pytest.mark.parametrize("workers", ["[0,2]", "[3,2]", "0"])
def test_an_impossible_worker_range_is_refused(workers):
    message = _error(f"distributed.num_workers={workers}")
    assert "distributed.num_workers" in message and "1 <= min <= max" in message


def test_an_elastic_range_whose_counts_cannot_share_the_micro_batches_is_refused():
    # 4 workers x 1 accumulation step = 4 micro-batches per step: 3 workers cannot share them
    message = _error("distributed.num_workers=[2,4]", "train.batch_size=64")
    assert "distributed.num_workers" in message and "[3]" in message and "train.gradient_accumulation_steps" in message
    load_job(None, ["distributed.num_workers=[2,4]", "train.batch_size=96", "train.gradient_accumulation_steps=3"])  # 12 chunks


def test_an_elastic_run_started_below_its_largest_size_keeps_that_sizes_micro_batches():
    from orchestrator.train.ray_backend import accumulation_for

    config = load_job(None, ["distributed.num_workers=[1,4]", "train.batch_size=96", "train.gradient_accumulation_steps=3"])
    # a fresh start (no checkpoint) at each size Ray may pick: 12 micro-batches per step each time
    assert [accumulation_for(None, w, config) for w in (1, 2, 3, 4)] == [12, 6, 4, 3]


def test_async_checkpoint_upload_is_refused_where_nothing_is_uploaded():
    message = _error("train.checkpoint_upload=async", "distributed.backend=local")
    assert "train.checkpoint_upload" in message and "distributed.backend=ray" in message
    assert load_job(None, ["train.checkpoint_upload=async"]).train.checkpoint_upload == "async"
