"""Time of a first pipeline run and of a fully cached rerun of the same config (the cost of a scheduled
retraining when nothing changed).

    python benchmarks/rerun.py [--quick] [CONFIG]     # default: configs/default.yaml with a fresh temp store
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?")
    p.add_argument("--quick", action="store_true", help="smaller train / eval sets (under a minute)")
    args = p.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    from prefect import flow

    from flows.pipeline import DEFAULT_CONFIG, sdrpn
    from stages.config import PipelineConfig

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SDRPN_CACHE_DIR"] = str(Path(tmp) / "cache")
        cfg = PipelineConfig.from_yaml(args.config or DEFAULT_CONFIG)
        cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"root": str(Path(tmp) / "store")})})
        if args.quick:
            cfg = cfg.model_copy(
                update={
                    "train_data": cfg.train_data.model_copy(update={"n": 16}),
                    "eval": cfg.eval.model_copy(update={"dataset": cfg.eval.dataset.model_copy(update={"n": 8})}),
                }
            )

        @flow(name="warm-up")
        def warm_up() -> int:  # start Prefect's temporary API outside the timings
            return 1

        warm_up()
        t0 = time.perf_counter()
        first = sdrpn(cfg)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        second = sdrpn(cfg)
        rerun_s = time.perf_counter() - t0
        assert second["scores"] == first["scores"], "a cached rerun must reproduce the scores"
    print(f"config={args.config or DEFAULT_CONFIG} train={cfg.train_data.n} eval={cfg.eval.dataset.n}")
    print(f"  first run  {first_s:7.2f} s")
    print(f"  rerun      {rerun_s:7.2f} s (every stage cached)")
    print(f"RESULT first_s={first_s:.2f} rerun_s={rerun_s:.2f} rerun_ratio={rerun_s / first_s:.3f}")


if __name__ == "__main__":
    main()
