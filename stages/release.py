"""The `release` stage: the trained RPN as a model people can share, `<root>/release/<fp>/`, a folder in the
`save_pretrained` manner:

    rpn.safetensors, rpn_config.json   the predictor (base model, its fingerprint, K, T, family)
    inference.json                     τ, RoI mode, max new tokens and KV reuse it was evaluated with
    train_recipe.json, train_log.parquet
    scores.json                        per benchmark and method, with each benchmark's protocol
    README.md                          the model card: base model, data, recipe, scores, protocol, how to load

`fetch_release` brings one to a local folder from a folder, an `s3://…/release/<fp>` URL (verified against its
commit record) or a hub-style id already in the local Hugging Face cache (nothing is downloaded); `sdrpn predict
--rpn` takes any of them and checks the base model's fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

from sdrpn_core.rpn import RPN_CONFIG
from stages.code import BENCHMARK_CODE
from stages.common import Stage, cache_dir
from stages.refs import EvalRef, LabelsRef, ModelRef, RpnRef
from stages.report import results_markdown, results_rows
from stages.train_ranks import INFERENCE
from storage.artifacts import ArtifactStore
from storage.fingerprint import hash_obj
from storage.store import Store


def release_key(rpn: RpnRef, evals: list[EvalRef]) -> dict:
    """A release packages one RPN with the evaluations of it."""
    return {"release": rpn.fingerprint, "evals": [e.fingerprint for e in evals]}


def lookup(store: Store, fp: str) -> str | None:
    arts = ArtifactStore(store)
    return arts.url("release", fp) if arts.verify("release", fp) is not None else None


def inference_defaults(protocols: list[dict]) -> dict:
    """What predict uses unless told otherwise: the settings of the first evaluation, each benchmark's τ, mode and
    input settings (its pixel budget) beside (`predict --benchmark`), with the calibration that chose them where
    `auto` did."""
    first = protocols[0]
    per = {
        p["benchmark"]: {
            "threshold": p["roi_threshold"],
            "mode": p["roi_mode"],
            "inputs": p.get("params", {}).get("inputs", []),
            **({"calibration": p["calibration"]["fingerprint"]} if p.get("calibration") else {}),
        }
        for p in protocols
    }
    calibrated = [p["benchmark"] for p in protocols if p.get("calibration")]
    source = f"evaluation: {', '.join(p['benchmark'] for p in protocols)}"
    return {
        "threshold": first["roi_threshold"],
        "mode": first["roi_mode"],
        "max_new_tokens": first["max_new_tokens"],
        "reuse_kv": first["kv_reuse"],
        "inputs": first.get("params", {}).get("inputs", []),
        "per_benchmark_threshold": {p["benchmark"]: p["roi_threshold"] for p in protocols},
        "per_benchmark": per,
        "source": source + (f"; τ and mode calibrated on {', '.join(calibrated)}" if calibrated else ""),
    }


def model_card(model: ModelRef, rpn: RpnRef, labels: LabelsRef, recipe: dict, evals: list[EvalRef], protocols) -> str:
    inference = inference_defaults(protocols)
    lines = [
        "---",
        f"base_model: {model.path}",
        "library_name: sdrpn",
        "tags: [sd-rpn, roi-prediction, multimodal]",
        "---",
        "",
        f"# SD-RPN region predictor for `{Path(model.path).name}`",
        "",
        "A self-distilled RoI predictor (arXiv 2509.16944): decoder layers copied from the base model, trained on",
        "pseudo-labels from the model's own attention, that tells the model where to look closer before it answers.",
        "",
        "## Base model",
        "",
        f"- path or id: `{model.path}` ({model.family}, {model.dtype})",
        f"- fingerprint: `{model.fingerprint}` (checked when the predictor is loaded)",
        "",
        "## Training data",
        "",
        f"- label set `{labels.fingerprint}`: {labels.rows} samples, {labels.usable} with a labelled token",
        *[f"- source `{name}`: label set `{fp}`" for name, fp in labels.parts],
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(recipe, indent=1),
        "```",
        "",
        f"{rpn.steps} optimizer steps, final loss {rpn.final_loss:.4f}.",
        "",
        "## Scores",
        "",
        results_markdown(results_rows(evals), None),
        "## Protocol",
        "",
        "| benchmark | harness | metric | τ | RoI mode | max new tokens | batch | rows |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {p['benchmark']} | {p['harness']} | {p['metric']} | {p['roi_threshold']} | {p['roi_mode']} | "
            f"{p['max_new_tokens']} | {p.get('batch_size', 1)} | {p['rows']} |"
            for p in protocols
        ],
        "",
        "## Use",
        "",
        "```bash",
        f'sdrpn predict photo.jpg "What is written on the sign?" --rpn <this folder> --model {model.path}',
        "```",
        "",
        f"Defaults `predict` takes from `{INFERENCE}`: τ {inference['threshold']}, mode {inference['mode']}, "
        f"{inference['max_new_tokens']} new tokens.",
        "",
    ]
    return "\n".join(lines)


def release(store: Store, model: ModelRef, rpn: RpnRef, labels: LabelsRef, evals: list[EvalRef], fp: str) -> str:
    """Write and commit the release folder; returns its URL."""
    arts = ArtifactStore(store)
    local = arts.fetch_dir("rpn", rpn.fingerprint, cache_dir("rpn", rpn.fingerprint))
    protocols = [json.loads(arts.read("eval", e.fingerprint, "protocol.json")) for e in evals]
    recipe = json.loads((local / "train_recipe.json").read_text()) if (local / "train_recipe.json").exists() else {}
    files = {p.name: p.read_bytes() for p in sorted(local.iterdir()) if p.is_file()}
    files[INFERENCE] = json.dumps(inference_defaults(protocols), indent=1).encode()
    scores = [{"protocol": p, "scores": list(e.scores)} for p, e in zip(protocols, evals, strict=True)]
    files["scores.json"] = json.dumps(scores, indent=1, default=str).encode()
    files["README.md"] = model_card(model, rpn, labels, recipe, evals, protocols).encode()
    meta = {"rpn": rpn.fingerprint, "model": model.fingerprint, "evals": [e.fingerprint for e in evals]}
    return arts.put_files("release", fp, files, meta=meta)


def fetch_release(source: str) -> Path:
    """A local folder holding an RPN: `source` itself, a store URL `…/release/<fp>` (or `…/rpn/<fp>`) fetched and
    verified, or a hub-style id (`org/name`) found in the local Hugging Face cache."""
    path = Path(source)
    if path.is_dir():
        if not (path / RPN_CONFIG).exists():
            raise FileNotFoundError(f"{source}: no {RPN_CONFIG} here, not an RPN folder")
        return path
    if "://" in source:
        root, kind, fp = source.rstrip("/").rsplit("/", 2)
        if kind not in ("release", "rpn"):
            raise ValueError(f"{source}: expected a store URL ending in /release/<fp> or /rpn/<fp>")
        return ArtifactStore(Store(root)).fetch_dir(kind, fp, cache_dir("release", hash_obj(source)[:16]))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as e:
        raise FileNotFoundError(
            f"{source}: not a folder, not a store URL, and not in the local Hugging Face cache ({e}); "
            f"download it first (huggingface-cli download {source})"
        ) from None


RELEASE = Stage(
    "release",
    run=release,
    lookup=lookup,
    # the model card prints the paper's rows; the benchmarks' other code reaches it through the scores
    code=("stages.release", "sdrpn_core.benchmarks.published"),
    exclude=BENCHMARK_CODE,
    key=release_key,
)
