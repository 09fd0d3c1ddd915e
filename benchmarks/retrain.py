"""Three weeks of scheduled retraining on the nano default, against a real Prefect API and a throw-away store:

    week 1  the first training manifest arrives: teacher, labels, RPN, evaluation; the first RPN is promoted
    week 2  a second manifest arrives beside it: only its rows go through the teacher; the retrained RPN is
            compared with the champion on the same evaluation samples and promoted or rejected by the gate
    week 3  a challenger made worse on purpose (a learning rate a million times too small: it learns nothing)
            must be rejected, and the champion must not change

    python benchmarks/retrain.py [--quick]

Prints each week's time, teacher rows, decision and scores; ends with
`RESULT week2_teacher_rows=… week2_new_rows=… week3_promoted=0|1 champion_unchanged=0|1 week2_over_week1_time=…`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import parser, size

# the keys of the last line, `RESULT key=value …` (checked by tests/test_benchmark_scripts.py)
RESULT_KEYS = ("week2_teacher_rows", "week2_new_rows", "week3_promoted", "champion_unchanged", "week2_over_week1_time")

# week 1 rows, week 2 rows, evaluation samples; smoke is quick: smaller, and week 3's rejection would be luck
SIZES = {"full": (600, 200, 300), "quick": (64, 16, 40), "smoke": (64, 16, 40)}


def arrive(incoming: Path, week: str, n: int, seed: int) -> int:
    """A week's training manifest (synthetic select scenes as PNG files + manifest.jsonl) in its own folder."""
    from sdrpn_core.synthetic import make_split, write_split

    write_split(incoming / week, make_split(n, seed, canvas=256, variant="select"))
    return n


def teacher_rows(store) -> int:
    """Every teacher row committed in the store (the benchmark's store holds one teacher dataset)."""
    from storage.labels import teacher_dataset

    return sum(len(teacher_dataset(store, fp).committed_ids(include_quarantine=False)) for fp in store.ls("teacher"))


def config(tmp: Path, eval_n: int, **train):
    """The default config at `eval_n` evaluation (and at most as many calibration) scenes, its store and cache in
    `tmp`, trained on the manifests arrived under `tmp/incoming/`."""
    from benchmarks._pipeline import pipeline_config
    from stages.config import PipelineConfig

    raw = pipeline_config(None, str(tmp), eval_n=eval_n).model_dump(mode="json", exclude_none=True)
    raw["train_data"] = {"kind": "jsonl", "path": str(tmp / "incoming" / "*" / "manifest.jsonl")}
    raw["eval"]["methods"] = ["baseline", "sdrpn"]
    raw["train"] = {**raw.get("train", {}), **train}
    return PipelineConfig.model_validate(raw)


def week(name: str, cfg, store) -> dict:
    from flows.pipeline import sdrpn

    before, t0 = teacher_rows(store), time.perf_counter()
    summary = sdrpn(cfg)
    seconds, decision = time.perf_counter() - t0, summary["promotion"]
    scores = {s["method"]: round(s["score"], 1) for s in summary["scores"]}
    verdict = "promoted" if decision and decision["promoted"] else "rejected" if decision else "no decision"
    print(f"{name}: {seconds:6.1f} s  teacher rows +{teacher_rows(store) - before}  {verdict}  scores {scores}")
    if decision:
        print(f"        {decision['reason']}")
    return {"seconds": seconds, "teacher": teacher_rows(store) - before, "decision": decision, "summary": summary}


def main() -> None:
    p = parser(__doc__, f"{SIZES['quick']} rows (under a minute)")
    args = p.parse_args()
    import os

    from benchmarks._pipeline import start_prefect
    from stages.common import get_store
    from storage.champion import Champions

    n1, n2, eval_n = SIZES[size(args)]
    start_prefect()  # Prefect's temporary API: a real server process, started outside the timings
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["SDRPN_CACHE_DIR"] = str(tmp / "cache")
        arrive(tmp / "incoming", "week1", n1, seed=0)
        store = get_store(config(tmp, eval_n).store.settings())
        one = week("week 1", config(tmp, eval_n), store)
        new_rows = arrive(tmp / "incoming", "week2", n2, seed=1)
        two = week("week 2", config(tmp, eval_n), store)
        champions = Champions(store)
        champion = champions.current(two["summary"]["model"])
        three = week("week 3", config(tmp, eval_n, lr=1e-9), store)
        unchanged = champions.current(two["summary"]["model"]) == champion
        history = champions.history(two["summary"]["model"])
    print(f"decisions recorded: {[('promoted' if d['promoted'] else 'rejected') for d in history]}")
    promoted3 = int(bool(three["decision"] and three["decision"]["promoted"]))
    print(
        f"RESULT week2_teacher_rows={two['teacher']} week2_new_rows={new_rows} week3_promoted={promoted3} "
        f"champion_unchanged={int(unchanged)} week2_over_week1_time={two['seconds'] / one['seconds']:.3f}"
    )


if __name__ == "__main__":
    main()
