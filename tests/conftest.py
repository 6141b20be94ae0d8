"""Shared fixtures. Every test writes under its own tmp folder; MLflow goes to a SQLite file there."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet_third_party_logs():
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


@pytest.fixture
def digits_spec() -> Path:
    return ROOT / "jobs" / "digits.yaml"
