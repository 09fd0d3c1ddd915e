"""What the stages that answer and score benchmarks share (`evaluate`, `score`, `calibrate`): a manifest row as
the benchmark's sample, one evaluation's resolved settings (model, RPN, τ, generation limit), and what of a
benchmark its scores depend on. Kept apart so no stage imports a stage that runs after it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from typing import Any

from sdrpn_core.benchmarks import Benchmark, BenchmarkSample, get_benchmark
from sdrpn_core.benchmarks.scoring import aggregate, score
from sdrpn_core.data import BadSample
from sdrpn_core.infer import Preprocessed, preprocess
from sdrpn_core.methods import EvalMethod, EvalParams, MethodSettings, get_method
from sdrpn_core.models.base import VLMAdapter
from stages.code import function_fingerprint
from stages.common import cache_dir, cached_in_process, load_model
from stages.refs import DatasetRef, ModelRef, RpnRef
from storage.artifacts import ArtifactStore
from storage.fingerprint import hash_obj
from storage.store import Store


def sample_of(row: dict) -> BenchmarkSample:
    """A manifest row as the benchmark's sample (prompts and metrics read these)."""
    options = tuple(tuple(o) for o in json.loads(row["options"])) if row.get("options") else ()
    return BenchmarkSample(
        row["sample_id"],
        row["image"],
        row["question"],
        tuple(row["answers"] or ()),
        row.get("category") or "",
        options,
        tuple(row["box"]) if row.get("box") else None,
        tuple(json.loads(row["meta"]).items()) if row.get("meta") else (),
    )


@dataclass
class AnswerRun:
    """One evaluation's settings, resolved once (model, benchmark, methods, τ, generation limit)."""

    bench: Benchmark
    methods: list[EvalMethod]
    settings: MethodSettings
    tokens: int | None
    options: dict[str, Any] = field(default_factory=dict)  # each method's own settings

    def settings_for(self, method: EvalMethod) -> MethodSettings:
        return replace(self.settings, options=self.options[method.name])


def prepare_run(
    store: Store, model: ModelRef, rpn_ref: RpnRef | None, dataset: DatasetRef, params: EvalParams
) -> AnswerRun:
    if params.calibrated and "sdrpn" in params.methods and rpn_ref is not None:
        raise ValueError(
            "eval.threshold / eval.mode 'auto' reached the evaluation unresolved: the calibrate stage chooses them "
            "(the flows do this; elsewhere `stages.calibrate.resolve` the parameters first)"
        )
    bench = get_benchmark(dataset.benchmark)
    adapter = load_model(model)
    inputs = {**adapter.evaluation_inputs, **dict(params.inputs)}
    if inputs:
        adapter = adapter.with_inputs(**inputs)
    methods = [get_method(m) for m in params.methods]
    methods = [m for m in methods if not m.needs_rpn or rpn_ref is not None]
    rpn = load_rpn(store, rpn_ref, model) if any(m.needs_rpn for m in methods) else None
    tokens = adapter.image_token_budget
    threshold = (
        params.threshold
        if params.threshold is not None
        else bench.threshold(model.family, params.default_threshold, params.model_key, tokens)
    )
    max_new = params.max_new_tokens or bench.max_new_tokens or adapter.default_max_new_tokens
    settings = MethodSettings(adapter, rpn, threshold, params.mode, params.reuse_kv, max_new, params.vicrop_layer)
    return AnswerRun(bench, methods, settings, tokens, {m.name: m.options_of(params) for m in methods})


def read_samples(
    adapter: VLMAdapter, rows: list[dict]
) -> tuple[list[tuple[BenchmarkSample, Preprocessed]], list[tuple[BenchmarkSample, str]]]:
    """(sample, decoded and processed image) of the rows whose image reads; (sample, why) of those that do not."""
    ready, bad = [], []
    for row in rows:
        sample = sample_of(row)
        try:
            ready.append((sample, preprocess(adapter, row["image"])))
        except BadSample as e:
            bad.append((sample, e.reason))
    return ready, bad


def load_rpn(store: Store, rpn: RpnRef, model: ModelRef):
    """The RPN, fetched (verified) and loaded once per process, like the model: a worker keeps it for every
    evaluation piece it runs."""
    from sdrpn_core.rpn import RoIPredictor

    def load():
        local = ArtifactStore(store).fetch_dir("rpn", rpn.fingerprint, cache_dir("rpn", rpn.fingerprint))  # checked
        return RoIPredictor.load(local, load_model(model), check_fingerprint=model.fingerprint)

    return cached_in_process(("rpn", rpn.fingerprint, model.fingerprint), load)


def scoring_fingerprint(bench: Benchmark) -> str:
    """What scores a benchmark's answers: its metric and aggregate (with every project function they call), the
    generic aggregation, and its data fields. Its reader and prompt are not here: they reach the scores through
    the samples and the answers, which are keyed on them."""
    functions = {
        "metric": function_fingerprint(bench.metric),
        "aggregate": function_fingerprint(bench.aggregate) if bench.aggregate else None,
        "score": function_fingerprint(score),
        "aggregate_all": function_fingerprint(aggregate),
    }
    values = {
        f.name: getattr(bench, f.name)
        for f in dataclasses.fields(bench)
        if not callable(getattr(bench, f.name)) and f.name != "thresholds"
    }
    return hash_obj({"functions": functions, "values": values})
