"""Time of a first pipeline run and of a fully cached rerun of the same config (the cost of a scheduled
retraining when nothing changed).

    python benchmarks/rerun.py [--quick] [CONFIG]     # default: configs/default.yaml with a fresh temp store
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import parser, size

# the keys of the last line, `RESULT key=value …` (checked by tests/test_benchmark_scripts.py)
RESULT_KEYS = ("first_s", "rerun_s", "rerun_ratio")

SIZES = {
    "full": {},
    "quick": {"train_n": 16, "eval_n": 8},
    "smoke": {"train_n": 8, "eval_n": 4},
}  # the default config's split sizes


def main() -> None:
    p = parser(__doc__, "smaller train / eval sets (under a minute)")
    p.add_argument("config", nargs="?")
    args = p.parse_args()
    from prefect.logging.handlers import APILogHandler

    from benchmarks._pipeline import pipeline_config, start_prefect
    from flows.pipeline import DEFAULT_CONFIG, sdrpn

    start_prefect()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = pipeline_config(args.config, tmp, **SIZES[size(args)])
        t0 = time.perf_counter()
        first = sdrpn(cfg)
        APILogHandler().flush()  # the first run's log lines reach the API as part of the first run, not the rerun
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        second = sdrpn(cfg)
        rerun_s = time.perf_counter() - t0
        assert second["scores"] == first["scores"], "a cached rerun must reproduce the scores"
    print(f"config={args.config or DEFAULT_CONFIG} train={cfg.train_data.n} eval={cfg.eval.datasets[0].n}")
    print(f"  first run  {first_s:7.2f} s")
    print(f"  rerun      {rerun_s:7.2f} s (every stage cached)")
    print(f"RESULT first_s={first_s:.2f} rerun_s={rerun_s:.2f} rerun_ratio={rerun_s / first_s:.3f}")


if __name__ == "__main__":
    main()
