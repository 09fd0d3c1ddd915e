"""What the flow tests share: the tiny pipeline config of each family, counters of stage calls, and readers of
what the Prefect API holds (artifacts, run names, tags, events, task states). The Prefect API itself is the
session fixture `prefect_api` in conftest.py."""

from __future__ import annotations

import dataclasses
import functools
import re
from datetime import UTC
from pathlib import Path

from stages import calibrate as calibrate_stage
from stages import evaluate as eval_stage
from stages import labels as labels_stage
from stages import teacher as teacher_stage
from stages import train_ranks
from stages.common import Stage
from stages.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


TINY = {  # model, teacher preset, teacher input settings (Qwen: the authors' natural-image label prompt)
    "llava": ({"image_size": 32, "patch_size": 8}, "llava-1.5-7b", {}),
    "qwen": ({"family": "qwen2_5_vl", "side": 112}, "qwen2.5-vl-7b/natural", {"prompt": "grounding"}),
}


EVAL_INPUTS = {"llava": {}, "qwen": {"pad_square": False}}  # the authors evaluate Qwen without square padding


def make_config(family: str, root: str, **changes) -> PipelineConfig:
    tiny, preset, teacher_inputs = TINY[family]
    raw = {
        "name": "test",
        "model": {"source": "tiny", "tiny": tiny},
        "train_data": {"kind": "synthetic", "n": 12, "seed": 0, "canvas": 96},
        "teacher": {
            "preset": preset,
            "inputs": teacher_inputs,
            "overrides": {"grounding": {2: [0, 3]}, "sink": {}, "K": 2, "T": 2},
            "batch_size": 4,
            "max_new_tokens": 3,
            "shards": 2,
            "chunk_size": 4,
        },
        "labels": {"max_box_frac": 1.01, "fg_ratio": 0.9},
        "train": {"lr": 1e-3, "batch_size": 4, "epochs": 1},
        "eval": {
            "datasets": [{"kind": "synthetic", "n": 4, "seed": 99, "canvas": 96}],
            "max_new_tokens": 3,
            "gallery": 2,
            "inputs": EVAL_INPUTS[family],
        },
        "store": {"root": root},
    }
    for dotted, value in changes.items():
        node = raw
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return PipelineConfig.model_validate(raw)


class Calls:
    """Counts calls of stage functions (real ones run underneath)."""

    def __init__(self, monkeypatch):
        self.n: dict[str, int] = {}
        self.samples_extracted = 0
        self.pieces_answered = 0
        for name, module, attr in [
            ("teacher", teacher_stage, "extract_teacher_maps"),
            ("labels", labels_stage, "denoise"),
            ("train", train_ranks, "train_rpn"),
            ("eval", eval_stage, "answer_pieces"),  # a shard's missing pieces, answered together
            ("calibrate", calibrate_stage, "calibrate"),
        ]:
            real = getattr(module, attr)
            wrapped = self._wrap(name, real)
            monkeypatch.setattr(module, attr, wrapped)
            for key, value in list(vars(module).items()):  # the stage declarations that run it
                if isinstance(value, Stage) and value.run is real:
                    monkeypatch.setattr(module, key, dataclasses.replace(value, run=wrapped))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self.n[name] = self.n.get(name, 0) + 1
            if name == "teacher":
                self.samples_extracted += len(args[1])
            if name == "eval":
                self.pieces_answered += len(args[5])
            if name == "train":
                self.train_samples = [s.sample_id for s in args[1]]
                self.train_prompt = args[0].prompt("q ?")
            return fn(*args, **kwargs)

        return wrapped


def _artifacts(progress: bool = False, key: str | None = None):
    """Every artifact of the server (or of one key), read page by page: one read returns at most the API's default
    limit (200), and the module's server holds more than that by the end."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    where = ArtifactFilter(key=ArtifactFilterKey(any_=[key])) if key else None

    async def read():
        out: list = []
        async with get_client() as client:
            while page := await client.read_artifacts(
                artifact_filter=where, sort=ArtifactSort.ID_DESC, offset=len(out), limit=200
            ):  # a stable order, so the pages neither overlap nor skip
                out += page
                if len(page) < 200:
                    break
        return out

    arts = sorted(asyncio.run(read()), key=lambda a: a.created)
    if progress:
        return arts
    return {a.key: a for a in arts if a.key}  # the newest of each key


def _stage_of(run_name: str) -> str:
    """ "samples[train]" → "samples", "teacher-shard 2/2" → "teacher-shard", "train" → "train", and a Prefect
    default name "x-16c" → "x"."""

    return re.sub(r"-[0-9a-f]{3}$", "", run_name.split("[", 1)[0].split(" ", 1)[0])


def _task_states(since: float) -> dict[str, set[str]]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime
    from prefect.types import DateTime

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(
                task_run_filter=TaskRunFilter(
                    start_time=TaskRunFilterStartTime(after_=DateTime.fromtimestamp(since, tz=UTC))
                )
            )
        out: dict[str, set[str]] = {}
        for r in runs:
            out.setdefault(_stage_of(r.name), set()).add(r.state.name)
        return out

    return asyncio.run(read())
