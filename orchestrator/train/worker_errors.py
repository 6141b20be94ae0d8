"""A job's error met inside a Ray Train worker ends the run at once, without retries.

Ray Train 2.60 (Train V2) retries every error a worker raises: its failure policy
(`ray.train.v2._internal.execution.failure_handling.DefaultFailurePolicy`) charges any
`WorkerGroupError` to `FailureConfig.max_failures` and answers RETRY until those are spent. The
policy is internal (built by `create_failure_policy` from the FailureConfig alone) and there is no
supported way to mark an error as not worth retrying. A `JobError` (a folder without images, a
model file that does not fit the data) fails the same way on every attempt, so each retry only
costs a worker-group restart before the same message.

So the worker function catches `JobError` itself (`job_errors_end_the_run`): it logs it, records
it in the run folder (`job_error-rank<N>.json`: the error's class and message) and returns, so
Ray Train sees a finished run and restarts nothing. The driver clears old records before `fit()`
and afterwards raises the recorded error as the same `JobError` class (`raise_recorded`), which
the CLI prints as a message, without a traceback.

This relies on what a `JobError` is: a function of the job's config and files, met by every rank
at the same point (loading the data, reading a model file, restoring a checkpoint), so no rank is
left waiting in a collective for one that returned.
"""

from __future__ import annotations

import importlib
import json
import logging
from contextlib import contextmanager
from typing import Iterator

from orchestrator import storage
from orchestrator.errors import JobError

logger = logging.getLogger(__name__)

_RECORD_PREFIX = "job_error-rank"


def _record_name(rank: int) -> str:
    return f"{_RECORD_PREFIX}{rank:05d}.json"


@contextmanager
def job_errors_end_the_run(run_dir: str, rank: int) -> Iterator[None]:
    """Inside a worker: a JobError raised in the block is logged and recorded, and the worker
    returns as if done (see the module docstring); any other error propagates and is retried."""
    try:
        yield
    except JobError as error:
        logger.error("rank %d: %s (a problem of the job: ending the run without retries)", rank, error)
        record = {"type": f"{type(error).__module__}:{type(error).__qualname__}", "message": str(error)}
        storage.write_bytes(storage.join(run_dir, _record_name(rank)), json.dumps(record).encode())


def _records(run_dir: str) -> list[str]:
    # `.json` only: a record being written sits under a temporary name first
    return [name for name in storage.list_names(run_dir) if name.startswith(_RECORD_PREFIX) and name.endswith(".json")]


def clear_recorded(run_dir: str) -> None:
    """On the driver, before training: forget the errors of an earlier run of this folder."""
    for name in _records(run_dir):
        storage.remove(storage.join(run_dir, name))


def raise_recorded(run_dir: str) -> None:
    """On the driver, after training: raise the error a worker recorded (the lowest rank's), as
    the JobError class it was raised as; nothing when none was."""
    names = sorted(_records(run_dir))
    if not names:
        return
    record = json.loads(storage.read_bytes(storage.join(run_dir, names[0])))
    clear_recorded(run_dir)
    raise _rebuilt(record["type"], record["message"]) from None


def _rebuilt(qualified_type: str, message: str) -> JobError:
    """The recorded error as its own class when that is one of ours, else as a JobError."""
    module, _, name = qualified_type.partition(":")
    if module.startswith("orchestrator."):
        try:
            cls = getattr(importlib.import_module(module), name)
            if isinstance(cls, type) and issubclass(cls, JobError):
                return cls(message)
        except Exception:  # a class renamed or with another signature: the message is what matters
            pass
    return JobError(message)
