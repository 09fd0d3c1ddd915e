"""Atomic writes on any fsspec filesystem: readers never see a half-written file."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import IO

import fsspec
from fsspec.core import url_to_fs


def write_atomic(url: str, write: Callable[[IO[bytes]], None], **storage_options) -> None:
    """Write to a hidden temporary name beside `url`, then move it into place.

    On local disk the move is an atomic rename; on object stores a single PUT is already all-or-nothing, and
    the temporary object is removed on failure.
    """
    fs, path = url_to_fs(url, **storage_options)
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp" if parent else f".{name}.{uuid.uuid4().hex}.tmp"
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def open_input(url: str, **storage_options) -> IO[bytes]:
    return fsspec.open(url, "rb", **storage_options).open()
