"""The sweep's search space as an Optuna define-by-run function, the form `OptunaSearch(space=...)`
takes when a parameter depends on another (kappa only when steps > 2).

The function suggests the spec's parameters in order, skipping one whose `when:` fails on the
values suggested before it, and returns the Optuna trial number and the trial's run name (its
run folder and MLflow run: trial_<number>, or for the retry of a trial a kill interrupted, the
interrupted trial's, so its training resumes from its checkpoints). Ray Tune hands the trainable
the suggested values under their dotted job keys plus those two; `job_params` turns them back
into job values (choices of lists travel as JSON text, since Optuna stores scalars only).
"""

from __future__ import annotations

from typing import Any

from orchestrator.tune.spec import Choice, Distribution

TRIAL_NUMBER = "trial_number"
RUN_NAME = "run_name"
RESUMES = "resumes"  # user attribute of a retry: the number of the interrupted trial it continues


def trial_name(number: int) -> str:
    return f"trial_{number:04d}"


def run_name(trial: Any) -> str:
    """The run folder and MLflow run name of an Optuna trial (frozen or live)."""
    return trial_name(trial.user_attrs.get(RESUMES, trial.number))


class SearchSpace:
    def __init__(self, space: dict[str, Distribution]):
        self.space = dict(space)

    def __call__(self, trial: Any) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, distribution in self.space.items():
            condition = distribution.condition
            if condition is None or condition.holds(values):
                values[key] = distribution.suggest(trial, key)
        return {TRIAL_NUMBER: trial.number, RUN_NAME: run_name(trial)}

    def job_params(self, config: dict[str, Any]) -> dict[str, Any]:
        """The job values of a trial's config (dotted job key -> value), conditionals left out
        when they were not suggested."""
        params = {}
        for key, distribution in self.space.items():
            if key in config:
                params[key] = distribution.decode(config[key]) if isinstance(distribution, Choice) else config[key]
        return params
