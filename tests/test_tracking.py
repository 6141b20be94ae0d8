"""Experiment tracking keeps secrets out of MLflow."""

from __future__ import annotations

from orchestrator.tracking import MlflowTracker


def test_params_that_name_or_embed_secrets_are_not_logged(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "secrets")
    tracker.log_params(
        {
            "tracking.tracking_uri": "https://alice:hunter2@mlflow.example.com",
            "storage.aws_secret_access_key": "hunter2",
            "storage.token": "hunter2",
            "train.steps": 10,
        }
    )
    tracker.finish()

    from mlflow.tracking import MlflowClient

    params = MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.params
    assert params["train.steps"] == "10"
    assert params["tracking.tracking_uri"] == "https://***@mlflow.example.com"
    assert not any("hunter2" in value for value in params.values())
    assert "storage.aws_secret_access_key" not in params and "storage.token" not in params
