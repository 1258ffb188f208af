"""Atomic, versioned checkpoints loaded without executing code (torch.load(weights_only=True))."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a crash
    leaves either the old checkpoint or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, *, expected_hash: str | None = None) -> dict:
    """Load and check a checkpoint written by `save_atomic` with a format version and config hash."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt): {exc}") from None
    if not isinstance(obj, dict) or obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {obj.get('format_version') if isinstance(obj, dict) else '?'}"
                              f", expected {FORMAT_VERSION}")
    if expected_hash is not None and obj.get("config_hash") != expected_hash:
        raise CheckpointError(f"checkpoint {path} was written by a run with another configuration "
                              f"(hash {obj.get('config_hash')}, this run {expected_hash}); use a new --out or --init")
    return obj
