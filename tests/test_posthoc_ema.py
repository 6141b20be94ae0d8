"""Post-hoc EMA (EDM2 section 3): power-function EMAs, their snapshots during training, and the
`ema` verb that reconstructs any EMA length from them as a model file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from orchestrator.config import load_job
from orchestrator.train.posthoc import snapshot_files
from orchestrator.train.run import run_train
from ucgm_core.model_file import load_model_file
from ucgm_core.posthoc_ema import PowerFunctionEMA, Snapshot, gamma_to_sigma_rel, reconstruct, sigma_rel_to_gamma

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "jobs/digits.yaml")


def test_sigma_rel_and_gamma_convert_as_in_edm2():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's two tracked profiles
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.08, 0.2):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)


def _noisy_training(steps: int, sigma_rels: tuple[float, ...], every: int):
    """SGD on a drifting linear regression, with power-function EMAs of several lengths."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    averages = {s: PowerFunctionEMA(model, s) for s in sigma_rels}
    target, snapshots = torch.randn(16, 16), []
    for step in range(1, steps + 1):
        x = torch.randn(32, 16)
        target += 0.01 * torch.randn(16, 16)
        loss = ((model(x) - x @ target.T) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for average in averages.values():
            average.update(model)
        if step % every == 0:
            snapshots += [Snapshot(a.gamma, step, {k: v.clone() for k, v in a.module.state_dict().items()}) for s, a in averages.items() if s in (0.05, 0.10)]
    return averages, snapshots


def test_a_reconstruction_matches_a_directly_tracked_ema_of_another_length():
    averages, snapshots = _noisy_training(400, (0.05, 0.065, 0.08, 0.10, 0.13), every=20)
    spread = (averages[0.05].module.weight - averages[0.10].module.weight).norm()
    for sigma_rel in (0.065, 0.08, 0.13):  # between the tracked two, and beyond them
        error = (reconstruct(snapshots, sigma_rel)["weight"] - averages[sigma_rel].module.weight).norm()
        print(f"sigma_rel {sigma_rel}: reconstruction error {float(error / spread):.2%} of the 0.05-0.10 spread")
        assert error <= 0.01 * spread  # the tolerance stated: 1% of the distance between the tracked EMAs
    for sigma_rel in (0.05, 0.10):  # a tracked length is its own last snapshot
        torch.testing.assert_close(reconstruct(snapshots, sigma_rel)["weight"], averages[sigma_rel].module.weight, rtol=1e-5, atol=1e-6)


def _job(tmp: Path, *overrides: str):
    return load_job(SPEC, [
        "distributed.backend=local", f"output_dir={tmp}", "tracking.enabled=false", "train.log_every=10", "train.sample_every=1000",
        "train.checkpoint_every=20", "evaluation.num_samples=20", "train.posthoc_ema_every=5", *overrides,
    ])


def test_training_snapshots_its_emas_resumes_them_and_ema_writes_a_model_file_of_any_length(tmp_path, capsys):
    tracked = "train.posthoc_ema_sigma_rels=[0.05, 0.08, 0.1]"
    run_train(_job(tmp_path / "whole", tracked, "train.steps=60"))
    # stopped at 20 and resumed: the averages come back from the checkpoint
    run_train(_job(tmp_path / "resumed", tracked, "train.steps=20"))
    summary = run_train(_job(tmp_path / "resumed", tracked, "train.steps=60", "train.keep_ema_snapshots=3"))
    assert summary.resumed_from == 20
    files = snapshot_files(_job(tmp_path / "resumed"))
    assert len(files) == 9 and all(f.endswith(("step-00000050.pt", "step-00000055.pt", "step-00000060.pt")) for f in files)

    def snapshot(run: str, sigma_rel: float, step: int) -> dict:
        return torch.load(tmp_path / run / "digits" / "ema_snapshots" / f"sigma_rel-{sigma_rel:.3f}" / f"step-{step:08d}.pt", weights_only=True)

    for name, value in snapshot("whole", 0.08, 60)["weights"].items():
        torch.testing.assert_close(snapshot("resumed", 0.08, 60)["weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)

    # 0.08 from the 0.05 and 0.10 snapshots alone, against the 0.08 one tracked directly
    pair = [snapshot("whole", s, k) for s in (0.05, 0.10) for k in range(5, 61, 5)]
    rebuilt = reconstruct([Snapshot(p["gamma"], p["step"], p["weights"]) for p in pair], 0.08)
    direct, short, long = (snapshot("whole", s, 60)["weights"] for s in (0.08, 0.05, 0.10))

    def distance(a: dict, b: dict) -> float:
        return float(sum((a[n] - b[n]).norm() ** 2 for n in direct) ** 0.5)

    nearest = min(distance(short, direct), distance(long, direct))  # what taking the closer tracked EMA would cost
    with capsys.disabled():
        print(f"digits DiT, 60 steps: 0.08 rebuilt from 0.05/0.10 is {distance(rebuilt, direct):.3g} from the tracked one; "
              f"the nearer tracked EMA is {nearest:.3g} from it")
    assert distance(rebuilt, direct) <= 0.25 * nearest  # the tolerance stated: a quarter of the nearer EMA's distance

    capsys.readouterr()
    job = [SPEC, "distributed.backend=local", f"output_dir={tmp_path / 'whole'}", "tracking.enabled=false", "sigma_rel=0.07"]
    assert main(["ema", *job]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["out"].endswith("digits/model-sigma_rel-0.070.pt") and written["step"] == 60 and written["snapshots"] == 36
    contents = load_model_file(io.BytesIO(Path(written["out"]).read_bytes()))
    assert contents.metadata["posthoc_ema"]["sigma_rel"] == 0.07


def test_ema_without_snapshots_or_a_length_is_refused_naming_the_keys(tmp_path, capsys):
    assert main(["ema", SPEC, f"output_dir={tmp_path}", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert "posthoc_ema.sigma_rel: the EMA length to reconstruct is not set" in err
    assert "train.posthoc_ema_sigma_rels:" in err and "holds no EMA snapshots" in err
