"""The `reference` verb on a Ray Data actor pool (the same statistics for 1 or 2 actors as in one
process), and published mu/sigma reference statistics (the ADM evaluator's ImageNet batch, pytorch-fid,
clean-fid): the same distance as our sums, their feature space declared by
evaluation.reference_extractor, and refused before any cluster work when it is missing or differs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import load_job
from orchestrator.errors import ConfigError, ReferenceStatisticsError
from orchestrator.job_checks import check_job
from orchestrator.sample.evaluate import run_evaluate
from orchestrator.sample.reference import load_reference, merge_in_block_order, run_reference, save_reference
from sampling_helpers import ray_cluster, write_tiny_model_file  # noqa: F401  (ray_cluster is a fixture)
from ucgm_core.datasets import load_dataset
from ucgm_core.fid import FeatureStatistics, GaussianStatistics, frechet_distance_from_statistics

pytest.importorskip("digit_recognizer", reason="pip install digit-recognizer-py")

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "jobs" / "digits.yaml")
LIMIT, BLOCK = 200, 30  # 7 blocks, the last one short
DIGITS = "mnist-cnn-penultimate"  # the digits job's extractor
IDENTIFIER = "extractor-A(weights_sha256=abc, resize=bilinear)"


def _relative(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(found - expected) / np.linalg.norm(expected))


def _digit_features() -> np.ndarray:
    """Features of the job's images computed directly, in this process, all at once."""
    from ucgm_core.features import DigitClassifierFeatures

    images = load_dataset("digits", limit=LIMIT).images
    return DigitClassifierFeatures(framing="mnist_box")(images).double().numpy()


def _write_mu_sigma(path: Path, features: np.ndarray, **extra: np.ndarray) -> str:
    """A published-style file: mu and np.cov of the features (as the ADM evaluator and
    pytorch-fid store them), and whatever else such files carry."""
    np.savez(path, mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False), **extra)
    return str(path)


# --------------------------------------------------------------------------- reading a reference (no cluster)


def test_sums_and_their_mean_and_covariance_give_the_same_distance():
    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((50, 6)), 0.5 + 2 * rng.standard_normal((40, 6))
    sums = FeatureStatistics.from_features(second)
    moments = GaussianStatistics(second.mean(axis=0), np.cov(second, rowvar=False))  # the convention of mu/sigma files
    np.testing.assert_allclose(sums.gaussian().covariance, moments.covariance, rtol=1e-12)
    expected = frechet_distance_from_statistics(FeatureStatistics.from_features(first), sums)
    assert frechet_distance_from_statistics(FeatureStatistics.from_features(first), moments) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance_from_statistics(moments, FeatureStatistics.from_features(first)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"covariance \(sigma\) must have shape \(6, 6\)"):
        GaussianStatistics(np.zeros(6), np.zeros((6, 5)))


def test_a_mu_sigma_file_is_a_reference_once_its_feature_space_is_declared(tmp_path):
    features = np.random.default_rng(1).standard_normal((30, 4))
    published = _write_mu_sigma(tmp_path / "published.npz", features, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    loaded = load_reference(published, IDENTIFIER, declared_extractor="extractor-A", feature_dim=4)
    assert isinstance(loaded, GaussianStatistics)
    expected = FeatureStatistics.from_features(features).gaussian()
    np.testing.assert_allclose(loaded.mean, expected.mean, rtol=1e-12)
    np.testing.assert_allclose(loaded.covariance, expected.covariance, rtol=1e-12)
    # the full identifier is accepted as well as the extractor's name
    assert load_reference(published, IDENTIFIER, declared_extractor=IDENTIFIER).dim == 4
    with pytest.raises(ReferenceStatisticsError, match="set evaluation.reference_extractor=extractor-A if"):
        load_reference(published, IDENTIFIER)
    with pytest.raises(ReferenceStatisticsError, match="set evaluation.reference_extractor=inception-v3-tf-pool3"):
        load_reference(published, None)  # the feature space unknown: still refused
    with pytest.raises(ReferenceStatisticsError, match="declared .evaluation.reference_extractor. to be of 'extractor-B'"):
        load_reference(published, IDENTIFIER, declared_extractor="extractor-B")
    with pytest.raises(ReferenceStatisticsError, match="4-d features, but extractor-A gives 5-d ones"):
        load_reference(published, IDENTIFIER, declared_extractor="extractor-A", feature_dim=5)


def test_a_broken_mu_sigma_file_is_refused_with_what_is_wrong(tmp_path):
    np.savez(tmp_path / "no-sigma.npz", mu=np.zeros(4))
    with pytest.raises(ReferenceStatisticsError, match="lacks array 'sigma'"):
        load_reference(str(tmp_path / "no-sigma.npz"), IDENTIFIER, declared_extractor="extractor-A")
    np.savez(tmp_path / "bad-shape.npz", mu=np.zeros(4), sigma=np.zeros((4, 3)))
    with pytest.raises(ReferenceStatisticsError, match=r"sigma\) must have shape \(4, 4\)"):
        load_reference(str(tmp_path / "bad-shape.npz"), IDENTIFIER, declared_extractor="extractor-A")
    np.savez(tmp_path / "other.npz", features=np.zeros((3, 4)))
    with pytest.raises(ReferenceStatisticsError, match="neither reference statistics"):
        load_reference(str(tmp_path / "other.npz"), IDENTIFIER)
    (tmp_path / "text.npz").write_text("not an npz")
    with pytest.raises(ReferenceStatisticsError, match="no usable reference statistics file"):
        load_reference(str(tmp_path / "text.npz"), IDENTIFIER)


def test_a_declared_extractor_must_agree_with_what_our_file_records(tmp_path):
    path = str(tmp_path / "ours.npz")
    save_reference(path, FeatureStatistics.from_features(np.random.default_rng(2).standard_normal((10, 4))), IDENTIFIER, "test")
    assert load_reference(path, IDENTIFIER, declared_extractor="extractor-A").count == 10
    with pytest.raises(ReferenceStatisticsError, match="record their feature space.*declares 'extractor-B'"):
        load_reference(path, IDENTIFIER, declared_extractor="extractor-B")


def test_partial_sums_are_added_in_block_order_whatever_order_they_arrive_in():
    rng = np.random.default_rng(3)
    blocks = [FeatureStatistics.from_features(rng.standard_normal((n, 3)) * 1e3) for n in (4, 4, 4, 2)]
    starts = np.cumsum([0] + [b.count for b in blocks[:-1]])

    def rows(order):
        return [
            {
                "start": np.array([starts[i]]), "count": np.array([blocks[i].count]),
                "feature_sum": blocks[i].feature_sum[None], "outer_sum": blocks[i].outer_sum[None],
            }
            for i in order
        ]

    in_order = merge_in_block_order(rows([0, 1, 2, 3]), 3)
    shuffled = merge_in_block_order(rows([3, 1, 0, 2]), 3)
    assert in_order.count == shuffled.count == 14
    assert np.array_equal(in_order.outer_sum, shuffled.outer_sum) and np.array_equal(in_order.feature_sum, shuffled.feature_sum)
    with pytest.raises(RuntimeError, match="without the blocks before them"):
        merge_in_block_order(rows([0, 2]), 3)


def test_reference_refuses_latents_naming_data_name(tmp_path):
    config = load_job(SPEC, [f"output_dir={tmp_path}", "tracking.enabled=false", "data.name=latents", f"data.path={tmp_path}"])
    with pytest.raises(ConfigError, match="data.name: latents are VAE latents, not images"):
        run_reference(config)
    with pytest.raises(ConfigError, match="data.name: latents are VAE latents"):
        check_job(config, "reference")


# --------------------------------------------------------------------------- on a cluster


def _job(tmp_path: Path, *extra: str):
    return load_job(
        SPEC,
        [f"output_dir={tmp_path}", "tracking.enabled=false", f"data.limit={LIMIT}", f"evaluation.batch_size={BLOCK}", "evaluation.cpus_per_actor=1", *extra],
    )


def test_reference_on_one_or_two_actors_gives_the_statistics_of_one_process(tmp_path, ray_cluster):
    summaries = [
        run_reference(_job(tmp_path, f"evaluation.num_actors={actors}", f"evaluation.reference_statistics={tmp_path / f'{actors}.npz'}"))
        for actors in (1, 2)
    ]
    direct = FeatureStatistics.from_features(_digit_features())
    assert summaries[0].extractor == summaries[1].extractor and summaries[0].extractor.startswith(f"{DIGITS}(")
    for summary in summaries:
        statistics = load_reference(summary.path, summary.extractor)
        assert summary.count == statistics.count == LIMIT
        # the actors compute the float32 features in blocks of BLOCK images on one thread, this
        # process all at once on its own threads: the CNN's kernels may add in another order
        # (1.4e-8 seen on one machine), so this compares to float32 precision; the sums themselves
        # are compared exactly below, where both runs take the same blocks on the same threads
        assert _relative(statistics.mean(), direct.mean()) < 1e-6
        assert _relative(statistics.covariance(), direct.covariance()) < 1e-6
    one, two = (load_reference(s.path, s.extractor) for s in summaries)
    assert _relative(one.mean(), two.mean()) < 1e-9 and _relative(one.covariance(), two.covariance()) < 1e-9


@pytest.fixture(scope="module")
def scored_job(tmp_path_factory, ray_cluster):
    """A tiny model of the digits job, our reference statistics of its data, and a mu/sigma file
    of the same images' features, computed directly."""
    tmp = tmp_path_factory.mktemp("published")
    overrides = [
        f"output_dir={tmp / 'outputs'}", "tracking.enabled=false", f"data.limit={LIMIT}", "sampler.steps=2",
        "evaluation.num_samples=40", "evaluation.batch_size=20", "evaluation.grid_size=2", "evaluation.cpus_per_actor=1",
        f"evaluation.model_file={write_tiny_model_file(tmp / 'model.pt')}",
    ]
    run_reference(load_job(SPEC, overrides))
    published = _write_mu_sigma(tmp / "VIRTUAL_digits.npz", _digit_features())
    return overrides, published


def test_evaluate_against_a_mu_sigma_file_gives_the_distance_against_our_sums(scored_job, ray_cluster):
    overrides, published = scored_job
    ours = run_evaluate(load_job(SPEC, overrides))
    theirs = run_evaluate(load_job(SPEC, [*overrides, f"evaluation.reference_statistics={published}", f"evaluation.reference_extractor={DIGITS}"]))
    assert theirs.reference == published
    assert theirs.results[0].distance == pytest.approx(ours.results[0].distance, rel=1e-6)


def test_a_mu_sigma_file_without_a_declared_extractor_is_refused_naming_the_key(scored_job):
    overrides, published = scored_job
    config = load_job(SPEC, [*overrides, f"evaluation.reference_statistics={published}"])
    with pytest.raises(ReferenceStatisticsError, match=f"set evaluation.reference_extractor={DIGITS} if they are"):
        run_evaluate(config)
    with pytest.raises(ConfigError) as refused:
        check_job(config, "evaluate")
    assert any(p.startswith("evaluation.reference_statistics:") and "evaluation.reference_extractor=" in p for p in refused.value.problems)


def _cli(cwd: Path, *args: str) -> tuple[int, str]:
    """`python -m orchestrator ...` as a user runs it (as tests/test_job_checks.py does)."""
    removed = ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "MLFLOW_TRACKING_URI")
    environment = {k: v for k, v in os.environ.items() if k not in removed}
    environment.update(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    done = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=180)
    return done.returncode, done.stdout + done.stderr


def test_a_declared_extractor_other_than_the_jobs_is_refused_with_exit_2_before_any_cluster_work(scored_job, tmp_path):
    overrides, published = scored_job
    declared = [f"evaluation.reference_statistics={published}", "evaluation.reference_extractor=inception-v3-tf-pool3"]
    with pytest.raises(ReferenceStatisticsError, match="declared .evaluation.reference_extractor. to be of 'inception-v3-tf-pool3'"):
        run_evaluate(load_job(SPEC, [*overrides, *declared]))
    code, output = _cli(tmp_path, "evaluate", SPEC, *overrides, *declared)
    assert code == 2, output
    assert "error: invalid job config:\n  evaluation.reference_statistics:" in output
    assert f"evaluation.reference_extractor) to be of 'inception-v3-tf-pool3', but this evaluation uses {DIGITS}(" in output
    assert "Traceback" not in output
    assert not any(started in output for started in ("started a local Ray cluster", "Started a local Ray instance"))
