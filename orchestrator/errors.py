"""Errors that describe a problem of the job's input (a config, a path, a checkpoint, the
cluster's size), not of the code. The CLI prints them without a traceback; each message names
what is wrong and how to fix it."""

from __future__ import annotations

from typing import Iterable


class JobError(Exception):
    """Base of the errors a user fixes by changing the job, not the code."""


class ConfigError(JobError, ValueError):
    """A job spec that cannot run; the message lists every problem with its key and fix.

    `problems` holds the listed lines (`<key>: <what is wrong>; <the fix>`) when the error was
    made by `of_job`, so that checks can gather the problems of several errors into one."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()):
        super().__init__(message)
        self.problems = tuple(problems)

    @classmethod
    def of_job(cls, problems: Iterable[str]) -> ConfigError:
        """The one format of a refused job: `invalid job config:` and one indented line per problem."""
        problems = tuple(problems)
        return cls("invalid job config:\n  " + "\n  ".join(problems), problems)

    def __reduce__(self):  # keep `problems` across pickling (Ray hands errors between processes)
        return type(self), (str(self), self.problems)


class CheckpointError(JobError):
    """A checkpoint that cannot be used for this job; nothing has been changed on disk."""


class StorageError(JobError):
    """A storage location that cannot be used; the message names it and what to check."""


class ResourceError(JobError):
    """A job that asks for more than the cluster has."""


class ModelFileError(JobError):
    """A model file (what evaluate/generate sample from, what training starts from) that is
    missing or is not one."""


class ReferenceStatisticsError(JobError):
    """Reference statistics that are missing or were computed in another feature space."""
