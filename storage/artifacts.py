"""Artifacts keyed by stage fingerprint: RPN checkpoints, predictions, reports, images.

`<root>/<kind>/<fingerprint>/…` holds the files and `_COMMITTED.json` (names, sizes, sha256), written last:
an artifact without it is invisible (a crashed upload leaves nothing readers trust), and a fetch checks every
file against it. `<root>/latest/<model_fp>/<kind>.json` points serving code at the newest artifact of a kind.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from storage.store import Store, StoreError

MARKER = "_COMMITTED.json"


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
            if name == MARKER or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"bad artifact file name {name!r}")
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
        return self.store.read_json(kind, fp, MARKER)

    def read(self, kind: str, fp: str, name: str) -> bytes:
        expected = self.manifest(kind, fp)["files"].get(name)
        if expected is None:
            raise FileNotFoundError(f"{self.url(kind, fp)} has no file {name!r}")
        data = self.store.read_bytes(kind, fp, name)
        if len(data) != expected["size"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise StoreError(f"{self.url(kind, fp, name)} does not match its committed size/hash (corrupt)")
        return data

    def fetch_dir(self, kind: str, fp: str, dest: str | Path) -> Path:
        """Download a committed artifact into `dest` (verified), e.g. an RPN checkpoint to load locally."""
        dest = Path(dest)
        for name in self.manifest(kind, fp)["files"]:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read(kind, fp, name))
        return dest

    # -- latest pointers -----------------------------------------------------------------------------------------
    def set_latest(self, model_fp: str, kind: str, fp: str) -> None:
        self.store.write_json(
            {"fingerprint": fp, "url": self.url(kind, fp), "updated": time.time()}, "latest", model_fp, f"{kind}.json"
        )

    def latest(self, model_fp: str, kind: str) -> str | None:
        if not self.store.exists("latest", model_fp, f"{kind}.json"):
            return None
        return self.store.read_json("latest", model_fp, f"{kind}.json")["fingerprint"]
