"""Atomic writes on any fsspec filesystem (readers never see a half-written file), and the content check every
reader of committed data uses."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import IO

from fsspec.core import url_to_fs

CONTENT_TYPES = {
    ".md": "text/markdown; charset=utf-8",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".txt": "text/plain; charset=utf-8",
    ".parquet": "application/vnd.apache.parquet",
    ".safetensors": "application/octet-stream",  # what the Hugging Face hub serves them as
}


def content_type(name: str) -> str:
    """The Content-Type an object is stored with, so a browser opens a model card or a PNG instead of downloading
    an untyped object (S3's default is `binary/octet-stream`)."""
    return CONTENT_TYPES.get(PurePosixPath(name).suffix.lower(), "application/octet-stream")


def write_atomic(url: str, write: Callable[[IO[bytes]], None], **storage_options) -> None:
    """Local disk: write a hidden temporary file beside the target, then rename it into place (atomic).
    Object stores: write the object directly — a PUT (or a multipart upload) becomes visible only when complete —
    with its content type (S3; other object stores take the default).
    """
    fs, path = url_to_fs(url, **storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    parent, _, name = path.rpartition("/")
    if protocol != "file":
        typed = {"ContentType": content_type(name)} if protocol in ("s3", "s3a") else {}
        with fs.open(path, "wb", **typed) as f:
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
