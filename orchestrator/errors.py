"""Errors that describe a problem of the job's input (a config, a path, a checkpoint, the
cluster's size), not of the code. The CLI prints them without a traceback; each message names
what is wrong and how to fix it."""


class JobError(Exception):
    """Base of the errors a user fixes by changing the job, not the code."""


class ConfigError(JobError, ValueError):
    """A job spec that cannot run; the message lists every problem with its key and fix."""


class CheckpointError(JobError):
    """A checkpoint that cannot be used for this job; nothing has been changed on disk."""


class StorageError(JobError):
    """A storage location that cannot be used; the message names it and what to check."""


class ResourceError(JobError):
    """A job that asks for more than the cluster has."""


class ReferenceStatisticsError(JobError):
    """Reference statistics that are missing or were computed in another feature space."""
