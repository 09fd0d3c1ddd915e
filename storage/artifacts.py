"""Artifacts keyed by stage fingerprint: RPN checkpoints, predictions, reports, images.

`<root>/<kind>/<fingerprint>/…` holds the files and `_COMMITTED.json` (names, sizes, sha256), written last:
an artifact without it is invisible (a crashed upload leaves nothing readers trust), and a read checks every
file against it. The marker is data from a shared store: its names are validated on read as on write (no
absolute paths, no `..`), so a planted marker cannot make `fetch_dir` write outside its destination.
`<root>/latest/<model_fp>/<kind>.json` points serving code at the newest artifact of a kind.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path

from storage.files import matches, write_atomic
from storage.records import MARKER, MarkerRecord, check_name
from storage.store import Store, StoreError

log = logging.getLogger(__name__)


def _check_listing(url: str, raw: object) -> dict:
    """A marker read from the store → its validated content; StoreError naming the artifact and the entry."""
    if not isinstance(raw, dict):
        raise StoreError(f"{url}/{MARKER} is malformed: no file listing")
    try:
        MarkerRecord.parse(raw)
    except ValueError as e:
        raise StoreError(f"{url}/{MARKER} {e}") from None
    return raw


class ArtifactStore:
    def __init__(self, store: Store):
        self.store = store

    def url(self, kind: str, fp: str, name: str = "") -> str:
        return self.store.url(kind, fp, name)

    def is_committed(self, kind: str, fp: str) -> bool:
        return self.store.exists(kind, fp, MARKER)

    def put_files(self, kind: str, fp: str, files: dict[str, bytes], meta: dict | None = None) -> str:
        """Upload files (name → bytes; names may contain '/'), then the marker. Returns the artifact URL."""
        listing = {}
        for name, data in sorted(files.items()):
            check_name(name)
            self.store.write_bytes(data, kind, fp, name)
            listing[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.store.write_json({"files": listing, "meta": meta or {}, "created": time.time()}, kind, fp, MARKER)
        return self.url(kind, fp)

    def put_dir(self, kind: str, fp: str, folder: str | Path, meta: dict | None = None) -> str:
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        if not files:
            raise ValueError(f"nothing to store: {folder} has no files")
        return self.put_files(kind, fp, files, meta)

    def manifest(self, kind: str, fp: str) -> dict:
        if not self.is_committed(kind, fp):
            raise FileNotFoundError(f"no committed artifact at {self.url(kind, fp)}")
        try:
            raw = self.store.read_json(kind, fp, MARKER)
        except ValueError as e:
            raise StoreError(f"{self.url(kind, fp)}/{MARKER} is not valid JSON: {e}") from None
        return _check_listing(self.url(kind, fp), raw)

    def read(self, kind: str, fp: str, name: str, manifest: dict | None = None) -> bytes:
        expected = (manifest or self.manifest(kind, fp))["files"].get(name)
        if expected is None:
            raise FileNotFoundError(f"{self.url(kind, fp)} has no file {name!r}")
        data = self.store.read_bytes(kind, fp, name)
        if not matches(data, expected["size"], expected["sha256"]):
            raise StoreError(f"{self.url(kind, fp, name)} does not match its committed size/hash (corrupt)")
        return data

    def fetch_dir(self, kind: str, fp: str, dest: str | Path) -> Path:
        """Bring a committed artifact into `dest` (verified), e.g. an RPN checkpoint to load locally. A local file
        that already matches the marker (size and sha256) is kept; any other is downloaded again, so a stale or
        modified local copy is never used."""
        dest = Path(dest)
        manifest = self.manifest(kind, fp)  # every name validated before anything is written
        kept = 0
        for name, expected in manifest["files"].items():
            target = dest / name
            if target.is_file() and target.stat().st_size == expected["size"]:
                if matches(target.read_bytes(), expected["size"], expected["sha256"]):
                    kept += 1
                    continue
                log.warning("local copy %s differs from %s: fetched again", target, self.url(kind, fp, name))
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(str(target), lambda f, n=name: f.write(self.read(kind, fp, n, manifest)))
        if kept:  # a reused copy is said, never silent
            log.info(
                "%s: %d of %d files reused from the verified local copy %s",
                self.url(kind, fp),
                kept,
                len(manifest["files"]),
                dest,
            )
        return dest

    def verify(self, kind: str, fp: str) -> dict | None:
        """The marker's content if the artifact is committed and every file matches it, else None (logged): a
        stage treats a modified or half-deleted artifact as not done and rebuilds it."""
        if not self.is_committed(kind, fp):
            return None
        try:
            manifest = self.manifest(kind, fp)
            for name in manifest["files"]:
                self.read(kind, fp, name, manifest)
        except (StoreError, FileNotFoundError) as e:
            log.error("artifact %s fails verification, it will be rebuilt: %s", self.url(kind, fp), e)
            return None
        return manifest

    # -- latest pointers -----------------------------------------------------------------------------------------
    def set_latest(self, model_fp: str, kind: str, fp: str) -> None:
        self.store.write_json(
            {"fingerprint": fp, "url": self.url(kind, fp), "updated": time.time()}, "latest", model_fp, f"{kind}.json"
        )

    def latest(self, model_fp: str, kind: str) -> str | None:
        if not self.store.exists("latest", model_fp, f"{kind}.json"):
            return None
        try:
            fp = self.store.read_json("latest", model_fp, f"{kind}.json").get("fingerprint")
        except (ValueError, AttributeError):
            fp = None
        if not isinstance(fp, str) or not re.fullmatch(r"[\w-][\w.-]*", fp):
            raise StoreError(f"{self.store.url('latest', model_fp, kind + '.json')} is malformed (no fingerprint)")
        return fp
