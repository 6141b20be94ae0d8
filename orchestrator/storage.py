"""Paths that may be local folders or object-store URIs (`s3://bucket/prefix`), through fsspec.

Credentials, endpoint and region come from the usual AWS environment variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), which s3fs and
botocore read themselves: nothing here handles a secret.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import IO, Iterator

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from orchestrator.errors import StorageError


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and URIs alike."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_uri(path: str) -> bool:
    """True for object-store and other fsspec URIs (`s3://bucket/key`), False for local paths."""
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute against the working directory (`~` expanded); a URI unchanged.
    Ray workers, actors and trials run in other working directories, so a relative path means
    the caller's directory only once it is made absolute where the caller runs."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def check_writable(folder: str) -> None:
    """Prove that `folder` takes a write, before any expensive work starts. A local folder is not
    created: its nearest existing ancestor must be a folder this user may write to (so a refused
    job leaves nothing behind); an object store gets a probe object, written and removed."""
    if not is_uri(folder):
        existing = os.path.abspath(folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            what = "is not a folder" if not os.path.isdir(existing) else "is not writable by this user"
            raise StorageError(f"cannot write to {folder!r}: {existing!r} {what}; check that the path is a writable folder")
        return
    probe = join(folder, ".ucgm-write-check")
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except Exception as error:  # any backend's failure means the same thing to the user
        hint = "the bucket exists and AWS_* credentials / AWS_ENDPOINT_URL are set" if is_uri(folder) else "the path is a writable folder"
        raise StorageError(f"cannot write to {folder!r} ({type(error).__name__}: {error}); check that {hint}") from None


def _fresh(path: str):
    """(filesystem, path) with fsspec's listing cache dropped for it: other processes (Ray
    workers) write the same objects, and a stale cache would report old sizes and ETags."""
    fs, local = url_to_fs(path)
    fs.invalidate_cache(local)
    return fs, local


def exists(path: str) -> bool:
    fs, local = _fresh(path)
    return fs.exists(local)


def list_names(path: str) -> list[str]:
    """Names (not full paths) directly under a folder; empty when it does not exist."""
    fs, local = _fresh(path)
    if not fs.exists(local):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(local, detail=False))


def file_sizes(folder: str) -> dict[str, int]:
    """Size in bytes of every file under a folder, by its path relative to the folder ('/'-separated)."""
    fs, local = _fresh(folder)
    if not fs.exists(local):
        return {}
    root = local.rstrip("/") + "/"
    return {
        name[len(root):] if name.startswith(root) else name.rsplit("/", 1)[-1]: int(info["size"])
        for name, info in fs.find(local, detail=True).items()
        if info.get("type") != "directory"
    }


@contextmanager
def downloaded_folder(path: str) -> Iterator[str]:
    """A local folder holding what `path` holds, for the duration of the block: `path` itself when
    local, else a temporary copy of the object-store folder (removed afterwards)."""
    import tempfile

    fs, remote = _fresh(path)
    if isinstance(fs, LocalFileSystem):
        yield remote
        return
    with tempfile.TemporaryDirectory(prefix="ucgm-download-") as target:
        fs.get(remote.rstrip("/") + "/", target + "/", recursive=True)
        yield target


def remove(path: str) -> None:
    fs, local = url_to_fs(path)
    if fs.exists(local):
        fs.rm(local, recursive=True)


@contextmanager
def open_file(path: str, mode: str = "rb") -> Iterator[IO]:
    """Open a file for reading or writing; parent folders are created on write."""
    fs, local = url_to_fs(path)
    # object stores have no folders to create, and s3fs would create a missing *bucket* instead
    if "w" in mode and isinstance(fs, LocalFileSystem):
        fs.makedirs(os.path.dirname(local), exist_ok=True)
    with fs.open(local, mode) as handle:
        yield handle


def sha256(path: str) -> str:
    """The sha256 of a file (local or s3://), read in 4 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open_file(path) as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
    fs, local = _fresh(path)
    return fs.cat_file(local)


def local_folder(path: str) -> str:
    """A local folder holding what `path` holds: `path` itself when local, else a copy of the
    object-store folder in a cache ($UCGM_CACHE_DIR, default ~/.cache/ucgm-ray), downloaded once
    per node. The copy is named after the URI and its objects' sizes and ETags, so a changed
    folder is downloaded again; it is filled under a temporary name and renamed when complete,
    so processes racing for it (actors on one node) never see half a folder."""
    import hashlib
    import shutil
    import tempfile

    fs, remote = _fresh(path)
    if isinstance(fs, LocalFileSystem):
        return remote
    listing = fs.find(remote, detail=True)
    if not listing:
        raise StorageError(f"nothing at {path!r}; check the path and that AWS_* credentials / AWS_ENDPOINT_URL are set")
    fingerprint = hashlib.sha256(path.encode())
    for name in sorted(listing):
        info = listing[name]
        fingerprint.update(f"{name}\0{info.get('size')}\0{info.get('ETag') or info.get('etag') or info.get('mtime')}\n".encode())
    cache = os.path.expanduser(os.environ.get("UCGM_CACHE_DIR", "~/.cache/ucgm-ray"))
    target = os.path.join(cache, f"{remote.rstrip('/').rsplit('/', 1)[-1]}-{fingerprint.hexdigest()[:16]}")
    if os.path.isdir(target):
        return target
    os.makedirs(cache, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=".partial-", dir=cache)
    try:
        for name in listing:
            relative = name[len(remote.rstrip("/")) + 1 :]
            destination = os.path.join(partial, *relative.split("/"))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            fs.get_file(name, destination)
        try:
            os.rename(partial, target)
        except OSError:  # another process finished the same copy first
            if not os.path.isdir(target):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
