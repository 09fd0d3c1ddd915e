"""Atomic writes on any fsspec filesystem (readers never see a half-written file), and the content check every
reader of committed data uses."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import IO

from fsspec.core import url_to_fs


def write_atomic(url: str, write: Callable[[IO[bytes]], None], **storage_options) -> None:
    """Local disk: write a hidden temporary file beside the target, then rename it into place (atomic).
    Object stores: write the object directly — a PUT (or a multipart upload) becomes visible only when complete.
    """
    fs, path = url_to_fs(url, **storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    parent, _, name = path.rpartition("/")
    if protocol != "file":
        with fs.open(path, "wb") as f:
            write(f)
        return
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp" if parent else f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def matches(data: bytes, size: int, sha256: str) -> bool:
    """Whether `data` is exactly what a commit record or artifact marker recorded (size, then sha256)."""
    return len(data) == size and hashlib.sha256(data).hexdigest() == sha256
