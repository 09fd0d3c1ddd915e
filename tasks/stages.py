"""The Prefect task of a pipeline stage, made from the stage's own declaration (`stages.common.Stage`): every task
looks its output up in the store, runs the stage with a progress artifact when it is not there, and logs what it
did. No stage has a hand-written task, so a new stage is its module and a line in the flow.

The store is the only cache. Each stage's output lives under its content fingerprint (the stage's key: its inputs'
fingerprints and parameters, with the version of the code it runs), computed here from the declaration, and is
verified against its commit records before it is reused: one lookup per call, and a task whose output is found
ends in a `Cached` state without running its stage. Prefect persists no results: its result records are
pickles, and a store others can write to must never hold anything that is executed on read.

Retries are for transient failures only (connection resets, timeouts, S3 5xx): a bad config, a missing file or
a validation error fails at once. The model-bound tasks carry the `sdrpn-gpu` tag, so
`prefect concurrency-limit create sdrpn-gpu 1` serialises them on a one-GPU worker.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from stages.common import Stage, get_store, pick
from storage.store import StoreSettings, is_transient

GPU_TAG = "sdrpn-gpu"
STAGE_LOGGERS = ("stages", "sdrpn_core", "storage")  # the modules' own loggers: counts, rates, ETA, resumes


class _RunLogs(APILogHandler):
    """Sends the stage modules' own lines (counts, rate, ETA, running scores, resumes, reused copies) to the run
    that wrote them, so the Prefect UI shows them under the task run; outside a run (a script or a test calling a
    stage, a reading thread) a line stays local: it is dropped here, not warned about."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            get_run_context()
        except MissingContextError:
            return
        super().emit(record)


def forward_stage_logs() -> None:
    """Attach the run-log handler to the stage modules' loggers, once per process (workers included: each imports
    this module to run a task)."""
    for name in STAGE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _RunLogs) for h in logger.handlers):
            logger.addHandler(_RunLogs())
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)


forward_stage_logs()
STORE_IS_THE_CACHE = {"cache_policy": NO_CACHE, "persist_result": False}


def _retry_if_transient(_task, _run, state) -> bool:
    return is_transient(state.data) if isinstance(state.data, BaseException) else False


IO_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": _retry_if_transient,
}


def cached(ref: Any, what: str) -> State:
    """The `Cached` state for a stage whose output was found (and verified) in the store."""
    get_run_logger().info("%s: found in the store and verified, not recomputed", what)
    return Completed(name="Cached", data=ref, message=f"{what} found in the store")


class _Progress:
    """A Prefect progress artifact (described), updated at most once a second, and at 100 % when the stage ends
    however it ended its work (resumed, partly cached)."""

    def __init__(self, key: str, what: str):
        self.artifact = create_progress_artifact(progress=0.0, key=key, description=what)
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= 1.0 or done >= total:
            self.last = now
            update_progress_artifact(artifact_id=self.artifact, progress=100.0 * done / max(total, 1))

    def finish(self) -> None:
        update_progress_artifact(artifact_id=self.artifact, progress=100.0)


CONFIG_TAG = "config:"  # `config:<name>`: the flows tag their runs (and so every task run in them) with it


def artifact_key(*parts: str) -> str:
    """`sdrpn-<parts>` as Prefect takes artifact keys: lowercase, any run of other characters one dash (an empty
    part vanishes). The flows key a config's artifacts `artifact_key(<config name>, <what>)`."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(("sdrpn", *parts)).lower()).strip("-")


def _config_name() -> str:
    """The config's name from the task run's `config:<name>` tag, so two configs' progress artifacts keep apart;
    empty for a task run outside the flows."""
    from prefect.runtime import task_run

    return next((t.removeprefix(CONFIG_TAG) for t in task_run.tags or () if t.startswith(CONFIG_TAG)), "")


def _arguments(parameters: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments as the templates see them: `{shard1}` is the 1-based shard."""
    shard = parameters.get("shard", 0)
    return {**parameters, "shard1": shard + 1} if isinstance(shard, int) else parameters


@dataclass(frozen=True)
class Found:
    """What the caller's own lookup of a stage found (its output, or None): the task then looks no further, so a
    flow that checks an output first (to skip the work that feeds it) does not look it up twice."""

    ref: Any


def _signature(stage: Stage) -> inspect.Signature:
    """The stage's `run` signature with `settings` (the store's) in place of `store`, without `progress`, without
    `fp` when the stage's key makes it, and with an optional `found` (`Found`) when it has a lookup."""
    params = [
        p.replace(name="settings", annotation=StoreSettings) if p.name == "store" else p
        for p in inspect.signature(stage.run).parameters.values()
        if p.name != "progress" and not (p.name == "fp" and stage.key is not None)
    ]
    if stage.lookup is not None:
        params.append(inspect.Parameter("found", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Found))
    return inspect.Signature(params)


@functools.cache
def stage_task(stage: Stage) -> Task:
    """The Prefect task of `stage`, called as the stage's `run` is, with the store's settings for the store.

    Found in the store (`stage.lookup`) → the task ends `Cached`; otherwise the stage runs, with a progress
    artifact keyed on the task run's name, finished at 100 % however the stage got there."""
    signature = _signature(stage)
    run_name = stage.run_name or stage.name
    takes_progress = "progress" in inspect.signature(stage.run).parameters

    def run_stage(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = {**bound.arguments, "store": get_store(bound.arguments["settings"])}
        arguments.pop("settings")
        found = arguments.pop("found", None)
        arguments = stage.keyed(arguments)
        what = run_name.format(**_arguments(arguments))
        if (ref := found.ref if found is not None else stage.find(arguments)) is not None:
            return cached(ref, what)
        progress = None
        if stage.progress and takes_progress:
            key = artifact_key(_config_name(), what)
            progress = _Progress(key, stage.progress.format(**_arguments(arguments)))
            arguments["progress"] = progress
        out = stage.run(**pick(stage.run, arguments))
        if progress is not None:
            progress.finish()
        if stage.cached_if is not None and stage.cached_if(out):
            return cached(out, what)
        if stage.summary is not None:
            get_run_logger().info("%s: %s", what, stage.summary(out))
        return out

    run_stage.__signature__ = signature  # Prefect binds the call's parameters (and names the run) by this
    run_stage.__name__ = run_stage.__qualname__ = f"{stage.name.replace('-', '_')}_task"
    return task(
        run_stage,
        name=stage.name,
        task_run_name=lambda parameters: run_name.format(**_arguments(parameters)),
        tags=[GPU_TAG] if stage.model_bound else [],
        **STORE_IS_THE_CACHE,
        **(IO_RETRIES if stage.retries else {}),
    )
