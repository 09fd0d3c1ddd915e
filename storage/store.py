"""A store root on any fsspec filesystem: `file://` (or a plain path) by default, `s3://bucket/prefix` for teams.

S3 credentials and endpoint come from the standard AWS environment variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, …) or from `StoreSettings`; they are never logged or put in
reprs. Every remote call goes through `retrying`: transient failures (connection refused, timeouts, 5xx) are
retried with exponential backoff, then surface as a `StoreError` naming the operation and the path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import fsspec
from fsspec.core import url_to_fs
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from storage.files import write_atomic

log = logging.getLogger(__name__)
T = TypeVar("T")
LINK_LIFETIME_S = 7 * 24 * 3600  # the longest an S3 (SigV4) presigned URL may live


class StoreError(RuntimeError):
    """A store operation that failed for good (after retries), naming what and where."""


@dataclass(frozen=True)
class StoreSettings:
    """How to reach the store. Unset S3 fields fall back to the AWS environment variables."""

    root: str = "data"
    endpoint_url: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    retries: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0

    def storage_options(self) -> dict[str, Any]:
        if not self.root.startswith(("s3://", "s3a://")):
            return {}
        # botocore's own retries are turned down: `Store.retrying` owns the retry policy (s3fs still makes a few
        # quick attempts of its own), so a dead endpoint fails in seconds, not minutes.
        opts: dict[str, Any] = {
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 5}
        }
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        if self.key:
            opts["key"] = self.key
        if self.secret:
            opts["secret"] = self.secret
        return opts


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: the network or the server, not the request (missing files, bad input)."""
    if isinstance(exc, StoreError):
        return is_transient(exc.__cause__) if exc.__cause__ is not None else False
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError)):
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or type(exc).__name__ in {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ClientConnectorError",
    }


class Store:
    """A root URL and its filesystem; paths handed around are relative to the root."""

    def __init__(self, settings: StoreSettings | str | None = None):
        settings = StoreSettings(root=settings) if isinstance(settings, str) else settings or StoreSettings()
        self.settings = settings
        root = settings.root.removeprefix("file://")
        try:
            self.fs, path = url_to_fs(root, **settings.storage_options())
        except (ValueError, ImportError) as e:
            raise StoreError(f"cannot open store root {settings.root!r}: {e}") from None
        self.root_path = path.rstrip("/")
        if settings.endpoint_url and settings.root.startswith(("s3://", "s3a://")):
            # Images and other inputs named by plain s3:// URLs (read with fsspec.open, outside the store) must reach
            # the same endpoint as the store; credentials still come from the AWS_* environment.
            fsspec.config.conf.setdefault("s3", {}).setdefault("client_kwargs", {}).setdefault(
                "endpoint_url", settings.endpoint_url
            )
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if self.protocol == "file":
            self.fs.makedirs(self.root_path, exist_ok=True)

    def __repr__(self) -> str:  # never the credentials
        return f"Store({self.url()!r})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root_path, *[p.strip("/") for p in parts if p]])

    def url(self, *parts: str) -> str:
        p = self.path(*parts)
        return p if self.protocol == "file" else f"{self.protocol}://{p}"

    @property
    def links(self) -> bool:
        """Whether outputs have browser URLs (an object store), rather than paths shown as text."""
        return self.protocol not in ("file", "local")

    def browser_url(self, *parts: str, expires_s: int = LINK_LIFETIME_S) -> str | None:
        """An http(s) URL a browser can open (a presigned one for S3, valid `expires_s`), or None where there is
        none (a local folder: show its path as text instead)."""
        if not self.links:
            return None
        try:
            return self.fs.sign(self.path(*parts), expiration=expires_s)
        except NotImplementedError:
            return None

    def relative(self, url: str) -> str | None:
        """The store path (relative to the root) a browser URL of this store points at, else None: path-style
        (`http://endpoint/bucket/prefix/key?…`) or virtual-hosted (`https://bucket.s3…/prefix/key?…`)."""
        parts = urlsplit(url)
        path = unquote(parts.path).lstrip("/")
        bucket, _, prefix = self.root_path.partition("/")
        if path.startswith(self.root_path + "/"):
            return path[len(self.root_path) + 1 :]
        if parts.hostname and parts.hostname.startswith(bucket + "."):
            if not prefix:
                return path or None
            if path.startswith(prefix + "/"):
                return path[len(prefix) + 1 :]
        return None

    def retrying(self, what: str, fn: Callable[[], T]) -> T:
        s = self.settings
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(s.retries),
                wait=wait_exponential(multiplier=s.backoff_s, max=s.backoff_max_s),
                retry=retry_if_exception(is_transient),
                reraise=False,
            ):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        log.warning("retrying %s (attempt %d/%d)", what, attempt.retry_state.attempt_number, s.retries)
                    return fn()
        except RetryError as e:
            cause = e.last_attempt.exception()
            raise StoreError(f"{what} failed after {s.retries} attempts: {type(cause).__name__}: {cause}") from cause
        raise AssertionError("unreachable")

    # -- small helpers -----------------------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.retrying(f"exists {self.url(*parts)}", lambda: self.fs.exists(self.path(*parts)))

    def ls(self, *parts: str) -> list[str]:
        path = self.path(*parts)

        def run() -> list[str]:
            try:
                return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False, refresh=True))
            except FileNotFoundError:
                return []

        return self.retrying(f"list {self.url(*parts)}", run)

    def read_bytes(self, *parts: str) -> bytes:
        return self.retrying(f"read {self.url(*parts)}", lambda: self.fs.cat_file(self.path(*parts)))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Atomic: readers see the old object or the new one, never a part."""
        url = self.url(*parts)
        self.retrying(f"write {url}", lambda: write_atomic(url, lambda f: f.write(data), **self.options))

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=1, sort_keys=True, default=str).encode(), *parts)

    def rm(self, *parts: str, recursive: bool = False) -> None:
        path = self.path(*parts)
        self.retrying(f"remove {self.url(*parts)}", lambda: self.fs.rm(path, recursive=recursive))

    @property
    def options(self) -> dict[str, Any]:
        return self.settings.storage_options()

    def open(self, *parts: str, mode: str = "rb"):
        return fsspec.open(self.url(*parts), mode, **self.options).open()
