"""Experiment tracking: the only module that speaks MLflow.

The tracking URI comes from the job spec, else `MLFLOW_TRACKING_URI`, else a SQLite store in
`./mlruns` (MLflow 3 refuses new plain-folder stores). Credentials for a remote server come from
MLflow's own environment variables (MLFLOW_TRACKING_TOKEN, ...), never from the job spec, and
parameters that look like secrets are dropped before logging as a second line of defence.
"""

from __future__ import annotations

import logging
import time
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

_SECRET_NAME = re.compile(r"(secret|password|token|access_key|credential)", re.IGNORECASE)
_MLFLOW_PARAM_LIMIT = 6000


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact_bytes(self, data: bytes, artifact_path: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def finish_children(self, status: str = "KILLED") -> int: ...


class NullTracker:
    """Used when tracking is disabled and on every rank but 0."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact_bytes(self, data: bytes, artifact_path: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def finish_children(self, status: str = "KILLED") -> int:
        return 0


_SQLITE = "sqlite:///"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or _SQLITE + str(Path("mlruns").resolve() / "mlflow.db")


def absolute_tracking_uri(uri: str | None) -> str:
    """`uri` (None: the default) with a relative SQLite file made absolute against the working
    directory, so that Ray workers elsewhere write to the same store; other URIs unchanged.
    (`sqlite:///relative.db` is relative, `sqlite:////abs/olute.db` absolute.)"""
    uri = uri or default_tracking_uri()
    if uri.startswith(_SQLITE) and not uri.startswith(_SQLITE + "/"):
        uri = _SQLITE + os.path.abspath(uri.removeprefix(_SQLITE))
    return uri


def sqlite_file(uri: str) -> str | None:
    """The database file of a SQLite tracking URI, else None."""
    return uri.removeprefix(_SQLITE) if uri.startswith(_SQLITE) else None


class MlflowTracker:
    """One MLflow run. Pass `run_id` to append to an existing run (a resumed job), `parent_run_id`
    to nest a new run under another (a sweep's trial under the sweep)."""

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        run_id: str | None = None,
        run_name: str | None = None,
        parent_run_id: str | None = None,
    ):
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or default_tracking_uri()
        if database := sqlite_file(uri):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = uri
        self._client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = self._client.get_run(run_id).info.run_id
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None  # MLflow's own nesting tag
            self.run_id = self._client.create_run(self._experiment_id(uri, experiment), run_name=run_name, tags=tags).info.run_id
        logger.info("MLflow run %s at %s", self.run_id, _redact_uri(uri))

    def _experiment_id(self, uri: str, name: str) -> str:
        existing = self._client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        artifact_location = None
        if database := sqlite_file(uri):  # keep artifacts beside the local database
            artifact_location = (Path(database).parent / "artifacts").as_uri()
        return self._client.create_experiment(name, artifact_location=artifact_location)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        safe = {k: _redact_uri(str(v))[:_MLFLOW_PARAM_LIMIT] for k, v in params.items() if not _SECRET_NAME.search(k)}
        # a resumed run already holds its params; MLflow refuses to change a logged param
        fresh = [Param(k, v) for k, v in safe.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self._client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact_bytes(self, data: bytes, artifact_path: str) -> None:
        folder, _, name = artifact_path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            local.write_bytes(data)
            self._client.log_artifact(self.run_id, str(local), artifact_path=folder or None)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)

    def finish_children(self, status: str = "KILLED") -> int:
        """End the nested runs still marked RUNNING (their process was stopped, e.g. a sweep's
        trial stopped early); returns how many."""
        run = self._client.get_run(self.run_id)
        children = self._client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.status = 'RUNNING'"
        )
        for child in children:
            self._client.set_terminated(child.info.run_id, status=status)
        return len(children)


def log_metrics_once(tracking_uri: str | None, run_id: str, metrics: dict[str, float], step: int) -> int:
    """Log `metrics` at `step` to the existing run `run_id` (running or finished: its status is
    left alone), leaving out each metric the run already holds at that step, so that work redone
    after a crash is logged once; returns how many it logged."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    now = int(time.time() * 1000)
    fresh = [
        Metric(key, float(value), now, step)
        for key, value in metrics.items()
        if all(logged.step != step for logged in client.get_metric_history(run_id, key))
    ]
    if fresh:
        client.log_batch(run_id, metrics=fresh)
    return len(fresh)


def _redact_uri(uri: str) -> str:
    """user:password@host -> ***@host, so a URI with credentials never reaches a log."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def open_tracker(
    enabled: bool,
    tracking_uri: str | None,
    experiment: str,
    run_id: str | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
) -> Tracker:
    if not enabled:
        return NullTracker()
    return MlflowTracker(tracking_uri, experiment, run_id=run_id, run_name=run_name, parent_run_id=parent_run_id)
