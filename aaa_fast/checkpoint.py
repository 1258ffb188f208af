"""Atomic, versioned, digest-checked checkpoints loaded without executing code.

A checkpoint file holds {"format_version", "sha256", "payload"}: the payload is the torch-saved
state as bytes and sha256 its digest, so a truncated or bit-flipped file is detected rather
than loaded. Both layers are read with torch.load(weights_only=True). `save_rotating` keeps the
previous checkpoint beside the new one; `load_newest` falls back to it when the newest is bad.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile

import torch

FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def previous_path(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a crash
    leaves either the old file or the new one, never half of one."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    wrapped = {"format_version": FORMAT_VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
               "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(wrapped, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as "unexpected pos ..."
            free = shutil.disk_usage(directory).free
            raise CheckpointError(f"cannot write checkpoint {path} ({len(payload) >> 20} MiB; {free >> 20} MiB free "
                                  f"in {directory}): {str(exc).strip().splitlines()[0]}; the file it would replace "
                                  "is kept") from None
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs):
    """A file object whose content replaces `path` at once when the block ends without an error:
    a temporary file in the same directory, fsynced, renamed over `path`. A full disk, an error
    in the block or a crash leaves the old file (or none), never a truncated one. An OSError
    names `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj, path: str) -> None:
    """`obj` as indented JSON, written with atomic_write."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)


def save_rotating(obj: dict, path: str) -> None:
    """save_atomic, keeping the checkpoint it replaces as <name>.prev.pt."""
    if os.path.exists(path):
        os.replace(path, previous_path(path))
    save_atomic(obj, path)


def load_checkpoint(path: str, *, expected_hash: str | None = None) -> dict:
    """Load one checkpoint written by `save_atomic`, checking format, digest and config hash."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        wrapped = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt): {exc}") from None
    version = wrapped.get("format_version") if isinstance(wrapped, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {version!r}, expected {FORMAT_VERSION}")
    payload = wrapped["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != wrapped.get("sha256"):
        raise CheckpointError(f"checkpoint {path} fails its sha256 check: the file was modified or damaged")
    obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if expected_hash is not None and obj.get("config_hash") != expected_hash:
        raise CheckpointError(f"checkpoint {path} was written by a run with another configuration "
                              f"(hash {obj.get('config_hash')}, this run {expected_hash}); use a new --out or --init")
    return obj


def load_newest(path: str, *, expected_hash: str | None = None) -> dict | None:
    """The newest valid checkpoint among `path` and its .prev: None when neither exists; a
    CheckpointError when they exist but none can be used. Falling back is reported on stderr."""
    candidates = [p for p in (path, previous_path(path)) if os.path.exists(p)]
    if not candidates:
        return None
    errors = []
    for candidate in candidates:
        try:
            obj = load_checkpoint(candidate, expected_hash=expected_hash)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        for err in errors:
            print(f"warning: {err}; using {candidate} instead", file=sys.stderr)
        return obj
    raise CheckpointError("; ".join(errors))
