"""Records read from a store or a user's file, validated by schema (pydantic) before anything uses them.

Each record is a model whose fields check themselves with the message a user needs ("bad row count '2'", "'box'
must be four non-negative integers"); `Record.parse` returns the validated record or raises ValueError with the
first field's message alone, so callers prefix it with the file and line (or the commit) it came from. Nothing
read is ever unpickled or executed: these are JSON objects."""

from __future__ import annotations

import re
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SHA256 = re.compile(r"[0-9a-f]{64}")
MARKER = "_COMMITTED.json"  # an artifact's commit marker, written last


def check_name(name: object) -> str:
    """A file name inside an artifact: relative, '/'-separated, no `..`, no empty or hidden-marker parts."""
    parts = name.split("/") if isinstance(name, str) else []
    if (
        not parts
        or name == MARKER
        or any(p in ("", ".", "..") for p in parts)
        or "\\" in name
        or "\0" in name
        or ":" in parts[0]
    ):
        raise ValueError(f"bad artifact file name {name!r}")
    return name


def _unset() -> Any:
    """A field that is validated when absent too: its validator words the error, not pydantic's "Field required"."""
    return Field(default=None, validate_default=True)


class Record(BaseModel):
    """A JSON object from outside the process. Unknown keys are kept out of the record, not refused: files written
    by a newer sdrpn (or with a user's own fields) still read."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    @classmethod
    def parse(cls, raw: object) -> Self:
        """The validated record; ValueError with the first bad field's message."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            error = first.get("ctx", {}).get("error")
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(str(error) if error is not None else f"{where}: {first['msg']}") from None


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CommitRecord(Record):
    """A label-store commit record: which shard file holds which rows, with the shard's size and sha256."""

    shard: str = _unset()
    kind: str = "data"
    rows: int = _unset()
    ids: list[str] = _unset()
    sha256: str = _unset()
    size: int = _unset()
    schema_version: int = 0
    meta: dict = Field(default_factory=dict)

    @field_validator("shard", mode="before")
    @classmethod
    def _shard(cls, v: object) -> str:
        if not isinstance(v, str) or not re.fullmatch(r"(part|quarantine)-[0-9]{20}-[0-9a-f]{12}\.parquet", v):
            raise ValueError(f"bad shard name {v!r}")
        return v

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, v: object) -> str:
        if v not in ("data", "quarantine"):
            raise ValueError(f"bad kind {v!r}")
        return v  # type: ignore[return-value]

    @field_validator("rows", mode="before")
    @classmethod
    def _rows(cls, v: object) -> int:
        if not is_int(v) or v < 0:  # type: ignore[operator]
            raise ValueError(f"bad row count {v!r}")
        return v  # type: ignore[return-value]

    @field_validator("ids", mode="before")
    @classmethod
    def _ids(cls, v: object) -> list[str]:
        if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
            raise ValueError("ids must be a list of strings, one per row")
        return v

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha(cls, v: object) -> str:
        if not isinstance(v, str) or not SHA256.fullmatch(v):
            raise ValueError("no sha256 of the shard (written by an older sdrpn, or tampered with)")
        return v

    @field_validator("size", "schema_version", mode="before")
    @classmethod
    def _count(cls, v: object) -> int:
        if not is_int(v) or v < 0:  # type: ignore[operator]
            raise ValueError("bad size or schema version")
        return v  # type: ignore[return-value]

    @field_validator("meta", mode="before")
    @classmethod
    def _meta(cls, v: object) -> dict:
        return v if isinstance(v, dict) else {}

    @model_validator(mode="after")
    def _consistent(self) -> CommitRecord:
        if self.shard.startswith("part") != (self.kind == "data"):
            raise ValueError(f"bad kind {self.kind!r} for shard {self.shard}")
        if len(self.ids) != self.rows:
            raise ValueError("ids must be a list of strings, one per row")
        return self


class FileEntry(Record):
    size: int
    sha256: str


class MarkerRecord(Record):
    """An artifact's commit marker: every file's size and sha256, and the stage's metadata."""

    files: dict[str, Any] = _unset()
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("files", mode="before")
    @classmethod
    def _files(cls, v: object) -> dict:
        if not isinstance(v, dict):
            raise ValueError("is malformed: no file listing")
        for name, entry in v.items():
            try:
                check_name(name)
            except ValueError as e:
                raise ValueError(f"refused: {e}") from None
            ok = isinstance(entry, dict) and is_int(entry.get("size")) and isinstance(entry.get("sha256"), str)
            if not ok or not SHA256.fullmatch(entry["sha256"]):
                raise ValueError(f"refused: bad size/sha256 for {name!r}")
        return v

    @field_validator("meta", mode="before")
    @classmethod
    def _meta(cls, v: object) -> dict:
        if not isinstance(v, dict):
            raise ValueError("is malformed: meta is not an object")
        return v


class ManifestLine(Record):
    """One line of a user's JSONL manifest: an image (path or URL), a question, and optionally the reference
    answers, a ground-truth box [x0, y0, x1, y1], a domain, a category and multiple-choice options."""

    image: str = _unset()
    question: str = _unset()
    answers: list[str] = Field(default_factory=list)
    box: list[int] | None = None
    domain: str = ""
    category: str = ""
    options: Any = None

    @field_validator("image", "question", mode="before")
    @classmethod
    def _text(cls, v: object, info) -> str:
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{info.field_name!r} must be a non-empty string")
        return v

    @field_validator("answers", mode="before")
    @classmethod
    def _answers(cls, v: object) -> list[str]:
        if not isinstance(v, list) or not all(isinstance(a, (str, int, float)) for a in v):
            raise ValueError("'answers' must be a list of strings")
        return [str(a) for a in v]

    @field_validator("box", mode="before")
    @classmethod
    def _box(cls, v: object) -> list[int] | None:
        if v is not None and (not isinstance(v, list) or len(v) != 4 or not all(is_int(x) and x >= 0 for x in v)):
            raise ValueError("'box' must be four non-negative integers [x0, y0, x1, y1]")
        return v or None

    @field_validator("domain", "category", mode="before")
    @classmethod
    def _label(cls, v: object, info) -> str:
        if not isinstance(v, str):
            raise ValueError(f"{info.field_name!r} must be a string")
        return v


FINGERPRINT = re.compile(r"[\w-][\w.-]*")


class ChampionRecord(Record):
    """The current champion RPN of a base model (`release/current/<model>/champion.json`): the release that was
    promoted, its RPN, and the decision that promoted it."""

    model: str = _unset()
    base_model: str = ""  # the path or id it was trained on, as the run named it
    release: str = _unset()
    rpn: str = _unset()
    url: str = ""
    decision: str = ""
    decided: float = 0.0

    @field_validator("model", "release", "rpn", mode="before")
    @classmethod
    def _fp(cls, v: object, info) -> str:
        if not isinstance(v, str) or not FINGERPRINT.fullmatch(v):
            raise ValueError(f"no {info.field_name} fingerprint")
        return v
