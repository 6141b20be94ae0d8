"""Paths that may be local folders or object-store URIs (`s3://bucket/prefix`), through fsspec.

Credentials, endpoint and region come from the usual AWS environment variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), which s3fs and
botocore read themselves: nothing here handles a secret.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import IO, Iterator

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and URIs alike."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(path: str) -> bool:
    fs, local = url_to_fs(path)
    return fs.exists(local)


def makedirs(path: str) -> None:
    fs, local = url_to_fs(path)
    fs.makedirs(local, exist_ok=True)


def list_names(path: str) -> list[str]:
    """Names (not full paths) directly under a folder; empty when it does not exist."""
    fs, local = url_to_fs(path)
    if not fs.exists(local):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(local, detail=False))


def remove(path: str) -> None:
    fs, local = url_to_fs(path)
    if fs.exists(local):
        fs.rm(local, recursive=True)


@contextmanager
def open_file(path: str, mode: str = "rb") -> Iterator[IO]:
    """Open a file for reading or writing; parent folders are created on write."""
    fs, local = url_to_fs(path)
    if "w" in mode:
        parent = local.rsplit("/", 1)[0] if "/" in local else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
    with fs.open(local, mode) as handle:
        yield handle


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file at once; written to a sibling name and then moved on local disks, so a
    reader never sees half a file."""
    fs, local = url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        tmp = local + ".partial"
        with open_file(tmp, "wb") as handle:
            handle.write(data)
        fs.mv(tmp, local)
    else:  # object stores publish a PUT atomically
        with open_file(path, "wb") as handle:
            handle.write(data)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as handle:
        return handle.read()
