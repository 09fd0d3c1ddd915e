"""The champion RPN of each base model, and the record of every promotion decision (TFX's "blessing", MLflow's
alias): `<root>/release/current/<model_fp>/`

    champion.json            the release serving code uses (`sdrpn eval`, `sdrpn predict --rpn current`), written
                             atomically after its decision
    decisions/<id>.json      one per decision, promoted or rejected: the side-by-side scores and the reason

A decision's id is a hash of the challenger, the champion it was compared with and the gate's settings, so a rerun
that would decide the same again finds it instead of deciding (and announcing) twice. Writers are the runs of one
deployment: the last promotion written wins; the history keeps every decision either way."""

from __future__ import annotations

import logging
from typing import Any

from storage.records import FINGERPRINT, ChampionRecord
from storage.store import Store, StoreError

log = logging.getLogger(__name__)
CURRENT = ("release", "current")


class Champions:
    def __init__(self, store: Store):
        self.store = store

    def _where(self, model_fp: str, *name: str) -> tuple[str, ...]:
        if not FINGERPRINT.fullmatch(model_fp):
            raise ValueError(f"bad model fingerprint {model_fp!r}")
        return (*CURRENT, model_fp, *name)

    def url(self, model_fp: str) -> str:
        return self.store.url(*self._where(model_fp, "champion.json"))

    def _decision(self, model_fp: str, decision_id: str) -> tuple[str, ...]:
        return self._where(model_fp, "decisions", f"{decision_id}.json")

    def decision_url(self, model_fp: str, decision_id: str) -> str:
        return self.store.url(*self._decision(model_fp, decision_id))

    def current(self, model_fp: str) -> ChampionRecord | None:
        """The champion of `model_fp`, or None before the first promotion; StoreError for a malformed pointer."""
        where = self._where(model_fp, "champion.json")
        if not self.store.exists(*where):
            return None
        try:
            return ChampionRecord.parse(self.store.read_json(*where))
        except ValueError as e:
            raise StoreError(f"{self.store.url(*where)} is malformed: {e}") from None

    def all(self) -> list[ChampionRecord]:
        """Every base model's champion in the store."""
        found = [self.current(m) for m in self.store.ls(*CURRENT) if FINGERPRINT.fullmatch(m)]
        return [c for c in found if c is not None]

    def decided(self, model_fp: str, decision_id: str) -> dict[str, Any] | None:
        """The recorded decision of this id, or None; a malformed record is logged and treated as none (the run
        decides again and writes it anew)."""
        where = self._decision(model_fp, decision_id)
        if not self.store.exists(*where):
            return None
        try:
            raw = self.store.read_json(*where)
        except ValueError:
            raw = None
        ok = isinstance(raw, dict) and raw.get("id") == decision_id and isinstance(raw.get("promoted"), bool)
        if not ok or not isinstance(raw.get("challenger"), dict) or not isinstance(raw.get("reason"), str):
            log.error("%s is malformed: deciding again", self.store.url(*where))
            return None
        return raw

    def record(self, decision: dict[str, Any]) -> None:
        """The decision into the history, then (promoted) the champion pointer: a crash between them leaves the
        old champion and a decision the next run finds and completes."""
        self.store.write_json(decision, *self._decision(decision["model"], decision["id"]))
        if decision["promoted"]:
            self.promote(decision)

    def promote(self, decision: dict[str, Any]) -> None:
        challenger = decision["challenger"]
        pointer = ChampionRecord(
            model=decision["model"],
            base_model=decision.get("base_model", ""),
            release=challenger["release"],
            rpn=challenger["rpn"],
            url=challenger["url"],
            decision=decision["id"],
            decided=decision["decided"],
        )
        self.store.write_json(pointer.model_dump(), *self._where(decision["model"], "champion.json"))
        log.info("champion of model %s is now release %s", decision["model"][:12], challenger["release"][:12])

    def history(self, model_fp: str) -> list[dict[str, Any]]:
        """Every decision for the model, oldest first."""
        names = self.store.ls(*self._where(model_fp, "decisions"))
        out = [self.store.read_json(*self._where(model_fp, "decisions", n)) for n in names if n.endswith(".json")]
        return sorted((d for d in out if isinstance(d, dict)), key=lambda d: d.get("decided", 0.0))
