"""Shared fixtures. Every test writes under its own tmp folder; MLflow goes to a SQLite file there."""

from __future__ import annotations

import logging
import os
import socket
import uuid
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 for the whole session.

    The AWS_* variables point every client at it (s3fs, pyarrow, boto3 and Ray workers started
    after this fixture all read them). Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    environment = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    previous = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    try:
        yield endpoint
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the local S3 server; returns its s3:// URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
