"""The seed systems as job specs: `objective.kind` chooses the system, `train.initialize_from` and
`train.teacher` bring in model files, and the objective's extra modules (sCM's learned weight) are
trained and checkpointed with the network, under plain torch and under DeepSpeed ZeRO."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from orchestrator import storage
from orchestrator.config import load_job
from orchestrator.errors import ConfigError, JobError
from orchestrator.job_checks import check_job
from orchestrator.train.run import run_train
from orchestrator.train.loop import TrainingRun
from ucgm_core.dit import DiTSettings, build_dit
from ucgm_core.model_file import model_file_bytes
from ucgm_core.sampler import SamplerSettings
from ucgm_core.systems import ContinuousConsistencySettings, MultistepConsistencySettings, ShortcutSettings

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_JOBS = sorted((ROOT / "jobs/systems").glob("*.yaml"))


def _job(spec: str, tmp: Path, *overrides: str):
    return load_job(
        ROOT / "jobs/systems" / spec,
        [
            "distributed.backend=local",
            f"output_dir={tmp / 'out'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
            "train.log_every=5",
            "train.sample_every=100000",
            "evaluation.num_samples=50",
            *overrides,
        ],
    )


def _write_model_file(path: Path, *, transport: str, settings: DiTSettings = DiTSettings(), seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_dit(settings, input_size=8, in_channels=1, num_classes=10)
    path.write_bytes(
        model_file_bytes(model, settings=settings, input_size=8, in_channels=1, num_classes=10, transport=transport, sampler=SamplerSettings())
    )
    return model.state_dict()


@pytest.mark.parametrize("spec", SYSTEM_JOBS, ids=lambda p: p.stem)
def test_every_system_job_spec_is_valid(spec):
    config = load_job(spec)
    # each spec's run folder is its own, so the benchmark's trainings never resume one another
    assert config.name == spec.stem


@pytest.mark.parametrize(
    "spec, kind, settings_class",
    [
        ("digits_sct.yaml", "scm", ContinuousConsistencySettings),
        ("digits_multistep_ct.yaml", "multistep_cm", MultistepConsistencySettings),
        ("digits_shortcut.yaml", "shortcut", ShortcutSettings),
    ],
)
def test_objective_kind_chooses_the_system_settings(spec, kind, settings_class):
    config = load_job(ROOT / "jobs/systems" / spec)
    assert isinstance(config.objective, settings_class) and config.objective.kind == kind
    assert config.to_flat_dict()["objective.kind"] == kind


def test_system_mismatches_fail_at_validation_naming_the_key_and_fix():
    with pytest.raises(ConfigError, match=r"transport: scm is defined for the transport\(s\) \['trigflow'\].*set transport: trigflow"):
        load_job(ROOT / "jobs/systems/digits_sct.yaml", ["transport=linear"])
    with pytest.raises(ConfigError, match="model.two_time: .*set model.two_time: true"):
        load_job(ROOT / "jobs/systems/digits_shortcut.yaml", ["model.two_time=false"])
    with pytest.raises(ConfigError, match="train.teacher: .*needs a teacher model file"):
        load_job(ROOT / "jobs/systems/digits_scd.yaml", ["train.teacher=null"])
    with pytest.raises(ConfigError, match="train.teacher: only distillation objectives"):
        load_job(ROOT / "jobs/systems/digits_sct.yaml", ["train.teacher=/x/model.pt"])
    with pytest.raises(ConfigError, match=r"objective.kind: unknown kind 'scn'; did you mean 'scm'\?"):
        load_job(None, ["objective.kind=scn"])
    with pytest.raises(ConfigError, match=r"objective.tangent_normalisation: unknown key; did you mean 'objective.tangent_normalization'"):
        load_job(ROOT / "jobs/systems/digits_sct.yaml", ["objective.tangent_normalisation=0.1"])


def test_initialize_from_starts_the_network_ema_and_frozen_target_at_the_model_file(tmp_path):
    source = _write_model_file(tmp_path / "multi.pt", transport="linear")
    run = TrainingRun(_job("digits_ucgm_few_step.yaml", tmp_path, f"train.initialize_from={tmp_path / 'multi.pt'}"), device=torch.device("cpu"))
    for name, value in source.items():
        assert torch.equal(run.model.state_dict()[name], value), name
        assert torch.equal(run.ema.module.state_dict()[name], value), name
        assert torch.equal(run.target.module(run.model).state_dict()[name], value), name


def test_initialize_from_refuses_another_architecture(tmp_path):
    _write_model_file(tmp_path / "wide.pt", transport="linear", settings=DiTSettings(hidden_size=96, num_heads=4))
    config = _job("digits_ucgm_few_step.yaml", tmp_path, f"train.initialize_from={tmp_path / 'wide.pt'}")
    with pytest.raises(JobError, match=r"train.initialize_from: .* does not fit this job's network: model.hidden_size is 96 there"):
        TrainingRun(config, device=torch.device("cpu"))


def test_teacher_of_another_transport_is_refused(tmp_path):
    _write_model_file(tmp_path / "linear.pt", transport="linear")
    config = _job("digits_scd.yaml", tmp_path, f"train.teacher={tmp_path / 'linear.pt'}", "train.initialize_from=null")
    with pytest.raises(JobError, match="train.teacher: .* trained on transport 'linear', this job uses 'trigflow'"):
        TrainingRun(config, device=torch.device("cpu"))


def test_missing_model_files_fail_before_any_training(tmp_path):
    config = _job(
        "digits_scd.yaml", tmp_path, f"train.teacher={tmp_path / 'nowhere.pt'}", "train.initialize_from=null", "distributed.backend=ray"
    )
    with pytest.raises(ConfigError, match="train.teacher: no model file at"):
        check_job(config, "train")  # what the CLI runs before any cluster work
    assert not list((tmp_path / "out").rglob("*.*"))  # nothing written (the write check leaves an empty run folder)


def test_scd_trains_its_learned_weight_against_a_teacher_and_resumes_it(tmp_path):
    """sCD end to end on the local backend: the teacher is read, the learned weight w(t) (zero at
    start) is updated by the optimiser and restored from the checkpoint on resume."""
    _write_model_file(tmp_path / "teacher.pt", transport="trigflow")
    overrides = (
        f"train.teacher={tmp_path / 'teacher.pt'}",
        f"train.initialize_from={tmp_path / 'teacher.pt'}",  # as the spec: the student starts as the teacher
        "train.checkpoint_every=6",
        "objective.tangent_warmup_steps=4",
    )
    summary = run_train(_job("digits_scd.yaml", tmp_path, "train.steps=6", *overrides))
    assert summary.steps == 6 and math.isfinite(summary.last_loss)
    state = torch.load(Path(summary.run_dir) / "checkpoints/checkpoint_00000006/state.pt", weights_only=True)
    weight = state["model"]["extras.0.linear.weight"]
    assert weight.abs().sum() > 0, "the learned loss weight never left its zero initialisation"

    resumed = run_train(_job("digits_scd.yaml", tmp_path, "train.steps=8", *overrides))
    assert resumed.resumed_from == 6 and resumed.steps == 8


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from orchestrator.cluster import connect

    connect(None, 2)
    yield
    ray.shutdown()


def test_forward_mode_objectives_refuse_zero_3_at_validation():
    with pytest.raises(ConfigError, match="distributed.zero_stage: objective kind 'scm' takes forward-mode derivatives.*use zero_stage: 2"):
        load_job(ROOT / "jobs/systems/digits_sct.yaml", ["distributed.zero_stage=3"])
    load_job(ROOT / "jobs/systems/digits_multistep_ct.yaml", ["distributed.zero_stage=3"])  # no JVP: fine


@pytest.mark.slow
def test_sct_learned_weight_is_trained_under_deepspeed_zero_2(ray_cluster, tmp_path):
    """Two Ray Train workers, DeepSpeed ZeRO-2: the engine wraps the network and w(t) together,
    so the weight is sharded, reduced and stepped like the network (JVP through the engine)."""
    config = _job(
        "digits_sct.yaml",
        tmp_path,
        "distributed.backend=ray",
        "distributed.num_workers=2",
        "distributed.cpus_per_worker=1",
        "distributed.zero_stage=2",
        "train.steps=4",
        "train.batch_size=32",
        "train.checkpoint_every=4",
        "objective.tangent_warmup_steps=2",
        "train.initialize_from=null",  # from scratch: this test is about the engine, not the start
    )
    summary = run_train(config)
    assert summary.steps == 4 and math.isfinite(summary.last_loss)
    engine_state = torch.load(
        Path(config.run_dir) / "checkpoint_00000004/state/mp_rank_00_model_states.pt", weights_only=False, map_location="cpu"
    )["module"]
    assert engine_state["extras.0.linear.weight"].abs().sum() > 0, "w(t) was not stepped by the DeepSpeed optimiser"
    model_file = torch.load(io.BytesIO(storage.read_bytes(f"{config.run_dir}/model.pt")), weights_only=True)
    assert not any(name.startswith("extras") for name in model_file["state_dict"]), "the model file holds the network only"
