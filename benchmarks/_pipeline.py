"""Shared by the benchmarks that run the whole pipeline: Prefect set-up and a config on a throw-away store."""

from __future__ import annotations

import logging
import os
from pathlib import Path


def start_prefect() -> None:
    """Quiet, offline Prefect with its temporary API started now, outside any timing."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from prefect import flow

    @flow(name="warm-up")
    def warm_up() -> int:
        return 1

    warm_up()


def pipeline_config(path: str | None, tmp: str, *, train_n: int | None = None, eval_n: int | None = None):
    """The config at `path` (default: configs/default.yaml) with its store and cache in `tmp`, optionally with
    fewer training / evaluation samples (at most `train_n` / `eval_n`, the latter for calibration too)."""
    from flows.pipeline import DEFAULT_CONFIG
    from stages.config import CalibrationSection, PipelineConfig

    os.environ["SDRPN_CACHE_DIR"] = str(Path(tmp) / "cache")
    cfg = PipelineConfig.from_yaml(path or DEFAULT_CONFIG)
    update = {"store": cfg.store.model_copy(update={"root": str(Path(tmp) / "store")})}
    if train_n is not None:
        update["train_data"] = cfg.train_data.model_copy(update={"n": min(cfg.train_data.n, train_n)})
    if eval_n is not None:
        datasets = [d.model_copy(update={"n": min(d.n, eval_n)}) for d in cfg.eval.datasets]
        section = cfg.eval.calibration or CalibrationSection()
        calibration = section.model_copy(update={"n": min(cfg.eval.calibration_params().n, eval_n)})
        update["eval"] = cfg.eval.model_copy(update={"datasets": datasets, "calibration": calibration})
    return cfg.model_copy(update=update)


def llava_shaped(layers: int, hidden: int, heads: int, dtype: str, device: str, image_size: int = 336):
    """A random LLaVA-1.5-shaped adapter: patch 14 (576 image tokens at 336 px), a small vision tower, the text
    stack `layers` × `hidden` with `heads` heads and LLaMA's 2.6875 MLP ratio (the 7B at 32 × 4096 × 32)."""
    from sdrpn_core.models import LlavaAdapter
    from sdrpn_core.models.llava import resolve_dtype
    from sdrpn_core.models.tiny import TinyLlavaSpec, build_tiny_llava

    spec = TinyLlavaSpec(
        image_size=image_size,
        patch_size=14,
        vision_hidden=64,
        vision_layers=2,
        text_hidden=hidden,
        text_intermediate=int(hidden * 2.6875),
        text_layers=layers,
        text_heads=heads,
        text_kv_heads=heads,
    )
    model, processor = build_tiny_llava(spec, dtype=resolve_dtype(dtype, device), device=device)
    return LlavaAdapter(model, processor)
