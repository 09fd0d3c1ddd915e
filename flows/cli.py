"""The `sdrpn` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdrpn_core.models.base import VLMAdapter

log = logging.getLogger("sdrpn")


def _config(args: argparse.Namespace):
    from flows.pipeline import DEFAULT_CONFIG
    from stages.config import PipelineConfig

    cfg = PipelineConfig.from_yaml(args.config or DEFAULT_CONFIG)
    updates = {}
    if args.store:
        updates["store"] = cfg.store.model_copy(update={"root": args.store})
    if args.runner:
        updates["runner"] = cfg.runner.model_copy(update={"kind": args.runner, "address": args.dask_address})
    return cfg.model_copy(update=updates)


def _print_scores(scores: list[dict]) -> None:
    for s in scores:
        rel = f"{s['relative_throughput']:.2f}x" if s.get("relative_throughput") else "-"
        print(
            f"{s['benchmark']:10s} {s['method']:9s} score {s['score']:6.1f}  {s['samples_per_s']:7.2f} samples/s  "
            f"({rel} of baseline)"
        )


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the process that started it dies, SIGKILL included."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the SIGTERM handler and the finally clause still stop it
        pass


@contextlib.contextmanager
def temporary_api(timeout_s: float = 90.0):
    """A Prefect API for this command alone, unless the PREFECT_API_URL setting names one. Prefect's own temporary
    server is orphaned when the command is killed; this one is stopped on exit, on SIGTERM, and by the kernel on
    SIGKILL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    import httpx
    import prefect

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(Path(prefect.__file__).parents[1]),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    server = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
    _SERVERS.append(server)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the temporary Prefect API exited with code {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect API did not start within {timeout_s:.0f} s")
            time.sleep(0.2)
        log.info("temporary Prefect API at %s (pid %d; stopped when this command ends)", url, server.pid)
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        _flush_logs()
        _stop(server)


def _flush_logs() -> None:
    """Send Prefect's queued run logs while the API is still up (else they fail after it stops)."""
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=10)


_SERVERS: list[subprocess.Popen] = []


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _on_sigterm(signum: int, _frame) -> None:
    """Stop the temporary API and exit at once, as SIGTERM's default would: every stage commits atomically, so
    nothing half-written is left, and waiting for the task threads could take as long as the run."""
    for server in _SERVERS:
        _stop(server)
    log.warning("terminated by signal %d; committed work is kept, a rerun resumes", signum)
    logging.shutdown()
    os._exit(128 + signum)


def cmd_flow(args: argparse.Namespace) -> int:
    """Run a flow in this process, on a temporary Prefect API unless PREFECT_API_URL points at a server."""
    cfg = _config(args)  # a bad config fails here: before any server, model or retry
    signal.signal(signal.SIGTERM, _on_sigterm)
    with temporary_api():
        return _run_flow(args, cfg)


def _run_flow(args: argparse.Namespace, cfg) -> int:
    from flows import pipeline

    t0 = time.perf_counter()
    if args.command == "run":
        summary = pipeline.sdrpn(cfg)
        _print_scores(summary["scores"])
        for url in summary["eval"]:
            print(f"report: {url}/report.md")
        if summary["promotion"]:
            from stages.promote import summary as decision_line

            print(decision_line(summary["promotion"]))
    elif args.command == "labels":
        ref = pipeline.labels_flow(cfg)
        print(f"labels: {ref.url} ({ref.rows} samples, {ref.usable} usable) {ref.stats}")
    elif args.command == "train":
        ref = pipeline.train_flow(cfg)
        print(f"RPN: {ref.url} ({ref.steps} steps, final loss {ref.final_loss:.4f})")
    elif args.command == "calibrate":
        for ref, doc in pipeline.calibrate_flow(cfg):
            point = doc["chosen_point"]
            print(
                f"{ref.benchmark}: τ {ref.threshold} / {ref.mode}: score {point['score']:.1f} (baseline "
                f"{doc['baseline_score']:.1f}), {point['relative_throughput']:.2f}× the baseline's throughput; "
                f"{doc['samples']} samples, {doc['candidates']} candidates ({doc['split']})\n  {ref.url}/curve.png"
            )
    else:
        results = pipeline.eval_flow(cfg)
        _print_scores([s for r in results for s in r.scores])
        for r in results:
            print(f"report: {r.url}/report.md")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def _predict_settings(args: argparse.Namespace, folder: Path) -> dict:
    """τ, mode, max new tokens and KV reuse: the command line's, else the RPN's `inference.json` (what it was
    evaluated with, or its preset's at training), else the built-in defaults."""
    import json as _json

    from stages.train_ranks import INFERENCE

    recorded = _json.loads((folder / INFERENCE).read_text()) if (folder / INFERENCE).exists() else {}
    source = recorded.get("source", "built-in defaults")
    if args.benchmark:  # that benchmark's τ and mode (calibrated, where `auto` chose them)
        per = recorded.get("per_benchmark") or {}
        if args.benchmark not in per:
            raise SystemExit(
                f"sdrpn predict --benchmark {args.benchmark}: {folder / INFERENCE} has no settings for it "
                f"(it has: {', '.join(per) or 'none'})"
            )
        recorded = {**recorded, **per[args.benchmark]}
        source += f"; {args.benchmark}'s settings"
    settings = {**PREDICT_DEFAULTS, **{k: v for k, v in recorded.items() if k in PREDICT_DEFAULTS and v is not None}}
    for key in PREDICT_DEFAULTS:
        if getattr(args, key) not in (None, "auto"):  # `auto`: the release's (calibrated) value
            settings[key] = getattr(args, key)
    # the input settings it was evaluated with: a τ holds at the pixel budget and prompt it was chosen at
    settings["inputs"] = [list(pair) for pair in recorded.get("inputs") or []]
    settings["reuse_kv"] = bool(recorded.get("reuse_kv", True)) and not args.no_kv_reuse
    settings["source"] = source
    return settings


def _as_evaluated(adapter: VLMAdapter, inputs: list[list]) -> VLMAdapter:
    """The adapter with the inputs an evaluation gives it: the family's evaluation settings (Qwen: no square
    padding, the short-answer prompt), then the release's. `stages.answering.prepare_run` does the same; it is
    repeated here because a change there would change the evaluation pieces' code version."""
    overrides = {**adapter.evaluation_inputs, **dict(inputs)}
    return adapter.with_inputs(**overrides) if overrides else adapter


def _tau_or_auto(value: str) -> float | str:
    return value if value == "auto" else float(value)


PREDICT_DEFAULTS = {"threshold": 0.15, "mode": "mask", "max_new_tokens": 128}


def _predict_model(args: argparse.Namespace, folder: Path):
    """The base model, loaded, after its fingerprint is checked against the one the RPN was trained on."""
    import json as _json

    from sdrpn_core.models import load_adapter
    from sdrpn_core.models.base import AdapterError
    from sdrpn_core.rpn import RPN_CONFIG
    from storage.fingerprint import model_fingerprint

    config = _json.loads((folder / RPN_CONFIG).read_text())
    model = args.model or config.get("base_model")
    if not model:
        raise SystemExit("sdrpn predict: --model is needed (the RPN config names no base model)")
    adapter = load_adapter(model, dtype=args.dtype, device=args.device)
    expected = config.get("base_model_fingerprint")
    if expected and Path(model).is_dir() and not args.no_fingerprint_check:
        dtype = config.get("base_model_dtype") or str(adapter.dtype).removeprefix("torch.")
        found = model_fingerprint(Path(model), adapter=config["family"], dtype=dtype)
        if found != expected:
            raise AdapterError(
                f"{model} is not the model this RPN was trained on (fingerprint {found[:12]}, the RPN's base "
                f"{expected[:12]}: {config.get('base_model')}); --no-fingerprint-check to run it anyway"
            )
    return adapter


def current_release(args: argparse.Namespace) -> Path:
    """`--rpn current`: the champion release in the store (`--store`, default: the default config's) of the base
    model `--model` names, or of the only model with a champion there."""
    from flows.pipeline import DEFAULT_CONFIG
    from stages.common import cache_dir
    from stages.config import PipelineConfig
    from storage.artifacts import ArtifactStore
    from storage.champion import Champions
    from storage.store import Store

    store = Store(args.store or PipelineConfig.from_yaml(DEFAULT_CONFIG).store.root)
    champions = Champions(store).all()
    if args.model:
        wanted = {args.model, str(Path(args.model).resolve())}
        champions = [c for c in champions if c.base_model in wanted]
    if len(champions) != 1:
        found = ", ".join(f"{c.base_model} ({c.release[:12]})" for c in Champions(store).all()) or "none"
        raise SystemExit(
            f"sdrpn predict --rpn current: {len(champions)} champions in {store.url()} match "
            f"{'--model ' + args.model if args.model else 'any model'} (champions there: {found}); "
            "name the base model with --model, or the release itself with --rpn"
        )
    log.info("--rpn current: release %s of %s", champions[0].release[:12], champions[0].base_model)
    if not args.model:
        args.model = champions[0].base_model
    release = champions[0].release
    return ArtifactStore(store).fetch_dir("release", release, cache_dir("release", f"current-{release}"))


def cmd_predict(args: argparse.Namespace) -> int:
    """Answer one question about one image with SD-RPN; write the answer, the overlay (and the comparison)."""
    import json as _json

    from sdrpn_core.data import load_image
    from sdrpn_core.infer import answer_baseline, answer_sdrpn
    from sdrpn_core.rpn import RoIPredictor
    from sdrpn_core.visualize import answer_card, side_by_side
    from stages.release import fetch_release

    folder = current_release(args) if args.rpn == "current" else fetch_release(args.rpn)
    settings = _predict_settings(args, folder)
    adapter = _as_evaluated(_predict_model(args, folder), settings["inputs"])
    rpn = RoIPredictor.load(folder, adapter)
    image = load_image(args.image)
    kwargs = {k: settings[k] for k in ("threshold", "mode", "max_new_tokens", "reuse_kv")}
    answer = answer_sdrpn(adapter, rpn, image, args.question, **kwargs)
    roi = answer.roi
    print(answer.text)
    log.info(
        "settings %s; RoI %s: %s; %d crop tokens",
        settings,
        roi.plan.kind,
        roi.pixel_boxes or roi.plan.reason,
        roi.n_crop_tokens,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    padded = adapter.pads_to_square
    card = answer_card(image, roi.plan.prob, roi.pixel_boxes, args.question, answer.text, padded=padded)
    record = {"question": args.question, "answer": answer.text, "roi": roi.pixel_boxes, "settings": settings}
    if args.compare:
        base = answer_baseline(adapter, image, args.question, settings["max_new_tokens"])
        print(f"baseline: {base.text}")
        record["baseline"] = base.text
        base_card = answer_card(image, None, [], args.question, base.text, title="baseline", padded=padded)
        side_by_side(base_card, card).save(out / "compare.png")
    card.save(out / "overlay.png")
    (out / "answer.json").write_text(_json.dumps(record, indent=1))
    print(f"wrote {out}/overlay.png{', compare.png' if args.compare else ''} and answer.json")
    return 0


SCHEDULE_VARIABLE = "sdrpn_weekly_retrain"  # prefect.yaml reads the schedule's `active` from it at every deploy
SCHEDULE_SLUG = "weekly-retrain"


def _server_api() -> str:
    """The Prefect API a lasting change goes to; SystemExit when none is set (a temporary one forgets it)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise SystemExit(
            "PREFECT_API_URL is not set: this would write to a temporary Prefect server that forgets it when the "
            "command ends. Point it at your server, e.g. `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    return url


def _recorded_schedule() -> bool | None:
    from prefect.variables import Variable

    value = Variable.get(SCHEDULE_VARIABLE, default=None)
    return value if isinstance(value, bool) else None


async def _schedules(deployment_name: str, state: bool | None) -> list[tuple[str, bool]] | None:
    """(cron, active) of the deployment's weekly-retrain schedules, after setting them to `state` (None: read
    only); None when the deployment does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            deployment = await client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            return None
        for s in deployment.schedules:
            if s.slug == SCHEDULE_SLUG and state is not None:
                await client.update_deployment_schedule(deployment.id, s.id, active=state)
        deployment = await client.read_deployment_by_name(deployment_name)
    return [
        (str(getattr(s.schedule, "cron", s.schedule)), s.active)
        for s in deployment.schedules
        if s.slug == SCHEDULE_SLUG
    ]


def schedule_report(deployment: str, recorded: bool | None, schedules: list[tuple[str, bool]] | None) -> list[str]:
    """What `sdrpn schedule` says: the recorded choice, the deployed schedules, and any disagreement with its fix."""
    on_off = {True: "on", False: "off"}
    lines = [f"{SCHEDULE_VARIABLE} = {on_off.get(recorded, 'not set')}"]
    if recorded is None:
        lines.append(
            f"the variable {SCHEDULE_VARIABLE} is not set: `prefect deploy --all` fails on the schedule's `active` "
            "until it is; run `sdrpn schedule off` (or `on`) first"
        )
    if schedules is None:
        lines.append(f"{deployment} is not deployed yet: `prefect deploy --all` will create it so")
        return lines
    lines.append(f"{deployment}: {', '.join(f'{c} {on_off[a]}' for c, a in schedules) or 'no weekly-retrain schedule'}")
    for cron, active in schedules:
        if recorded is not None and active != recorded:
            lines.append(
                f"the deployed schedule {cron} is {on_off[active]} (switched in the UI?) but {SCHEDULE_VARIABLE} is "
                f"{on_off[recorded]}: the next `prefect deploy --all` makes it {on_off[recorded]} again; "
                f"`sdrpn schedule {on_off[active]}` keeps it {on_off[active]}"
            )
    return lines


def cmd_schedule(args: argparse.Namespace) -> int:
    """Switch the weekly retraining of `sdrpn/full` on or off: the server variable every `prefect deploy --all`
    reads (so a redeploy keeps the choice), and the deployed schedule at once; `status` says both, and where they
    disagree."""
    import asyncio

    from prefect.variables import Variable

    _server_api()
    state = None if args.state == "status" else args.state == "on"
    if state is not None:
        Variable.set(SCHEDULE_VARIABLE, state, overwrite=True)
    lines = schedule_report(args.deployment, _recorded_schedule(), asyncio.run(_schedules(args.deployment, state)))
    print("\n".join(lines))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """`prefect deploy --all` from the checkout, after checking what it needs: a lasting server and the recorded
    schedule choice (named, with the fix, when missing)."""
    import asyncio

    api = _server_api()
    if _recorded_schedule() is None:
        raise SystemExit("\n".join(schedule_report(args.deployment, None, None)[:2]))
    root = Path(__file__).resolve().parents[1]
    prefect = Path(sys.executable).with_name("prefect")
    env = {**os.environ, "PWD": str(root)}
    done = subprocess.run([str(prefect), "deploy", "--all", "--no-prompt"], cwd=root, env=env, check=False)
    if done.returncode != 0:
        return done.returncode
    print(f"deployed to {api}")
    print(
        "\n".join(
            schedule_report(args.deployment, _recorded_schedule(), asyncio.run(_schedules(args.deployment, None)))
        )
    )
    return 0


def cmd_nano_train(args: argparse.Namespace) -> int:
    """Train sdrpn-nano with the seeded recipe, from scratch or (`--init`) on from a saved model; phases with 0
    steps are skipped (how models/sdrpn-nano was made: see its README)."""
    from sdrpn_core.models.llava import LlavaAdapter
    from sdrpn_core.synthetic.nano import NanoRecipe, probe, train_nano

    steps = {f"phase{i}_steps": getattr(args, f"phase{i}_steps") for i in (1, 2, 3)}
    extra = {"roi_spans": tuple(int(v) for v in args.roi_spans.split(","))} if args.roi_spans else {}
    recipe = NanoRecipe(seed=args.seed, **{k: v for k, v in steps.items() if v is not None}, **extra)
    init = LlavaAdapter.from_pretrained(args.init, dtype="float32", device=args.device) if args.init else None
    t0 = time.perf_counter()
    adapter = train_nano(recipe, device=args.device, init=init)
    out = Path(args.out)
    adapter.model.cpu().save_pretrained(out)
    adapter.processor.save_pretrained(out)
    print(f"trained in {time.perf_counter() - t0:.0f}s ({recipe}); wrote {out}")
    for canvas in (64, 256) if args.probe else ():
        print(f"probe on {canvas}px scenes seen at 64px: {probe(adapter, n=args.probe, canvas=canvas)}")
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    """Rank every (layer, head) of a model by how often its answer attention peaks in the asked box."""
    from sdrpn_core.heads import score_heads
    from sdrpn_core.models import load_adapter

    adapter = load_adapter(args.model, dtype=args.dtype, device=args.device)
    if args.samples:
        from stages.data import read_jsonl_manifest

        rows, rejected = read_jsonl_manifest(args.samples)
        for r in rejected:
            log.warning("skipped %s", r.reason)
        rows = [r for r in rows if r.get("box")]
        samples = [(r["image"], r["question"], tuple(r["box"])) for r in rows[: args.n]]
    else:  # a synthetic calibration split, seeded apart from the training and held-out splits
        from sdrpn_core.synthetic import make_split

        samples = [(s.image, s.question, s.box) for s in make_split(args.n, args.seed, canvas=args.canvas)]
    scores = score_heads(adapter, samples, max_new_tokens=args.max_new_tokens)
    print(f"{len(samples)} calibration samples; best heads (hit rate = peak inside the asked box):")
    for s in scores[: args.top]:
        print(f"  layer {s.layer:2d} head {s.head:2d}  hit {s.hit_rate:.3f}  mass {s.mass:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdrpn", description="SD-RPN: self-distilled RoI predictors for MLLMs")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {
        "run": "the whole pipeline: teacher → labels → RPN → evaluation",
        "labels": "teacher attention → pseudo-labels for the training data",
        "train": "labels, then the RPN",
        "eval": "evaluate baseline / SD-RPN with the newest RPN for the model",
        "calibrate": "choose SD-RPN's τ and crop mode per benchmark on a calibration split (eval.calibration)",
    }
    for name, text in helps.items():
        sp = sub.add_parser(name, help=text)
        sp.add_argument("config", nargs="?", help="pipeline YAML (default: configs/default.yaml)")
        sp.add_argument("--store", help="override store.root (a folder or s3://bucket/prefix)")
        sp.add_argument("--runner", choices=["threads", "dask"], help="task runner for the teacher shards")
        sp.add_argument("--dask-address", help="a running Dask scheduler (default: a temporary LocalCluster)")
        sp.set_defaults(func=cmd_flow)

    nt = sub.add_parser("nano-train", help="train the sdrpn-nano base model (seeded recipe)")
    nt.add_argument("--out", default="models/sdrpn-nano")
    nt.add_argument("--seed", type=int, default=0)
    nt.add_argument("--init", help="go on from this saved model instead of from scratch")
    for i in (1, 2, 3):
        nt.add_argument(f"--phase{i}-steps", type=int, help=f"phase {i} steps (default: the recipe's)")
    nt.add_argument("--device", default="cpu")
    nt.add_argument("--roi-spans", help="phase 3 window sides in grid cells, e.g. 2,3,3,3,4 (default: the recipe's)")
    nt.add_argument("--probe", type=int, default=100, help="scenes per probe after training (0: none)")
    nt.set_defaults(func=cmd_nano_train)

    hd = sub.add_parser("heads", help="rank a model's heads against ground-truth boxes (choose teacher heads)")
    hd.add_argument("--model", required=True)
    hd.add_argument("--samples", help="JSONL manifest with boxes (default: a synthetic calibration split)")
    hd.add_argument("--n", type=int, default=100)
    hd.add_argument("--seed", type=int, default=777, help="synthetic calibration seed (keep it apart from eval)")
    hd.add_argument("--canvas", type=int, default=256)
    hd.add_argument("--max-new-tokens", type=int, default=4)
    hd.add_argument("--top", type=int, default=10)
    hd.add_argument("--device", default="cpu")
    hd.add_argument("--dtype", default="auto")
    hd.set_defaults(func=cmd_heads)

    sc = sub.add_parser(
        "schedule",
        help="switch the weekly retraining of sdrpn/full on or off (kept across `prefect deploy --all`)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sc.add_argument("state", choices=["on", "off", "status"])
    sc.add_argument("--deployment", default="sdrpn/full")
    sc.set_defaults(func=cmd_schedule)

    dp = sub.add_parser("deploy", help="`prefect deploy --all` from this checkout, once the schedule choice exists")
    dp.add_argument("--deployment", default="sdrpn/full")
    dp.set_defaults(func=cmd_deploy)

    pr = sub.add_parser(
        "predict",
        help="answer one question about one image with SD-RPN",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pr.add_argument("image")
    pr.add_argument("question")
    pr.add_argument(
        "--rpn",
        required=True,
        help="the RPN: a folder, a store URL (…/release/<fp>, …/rpn/<fp>), a cached hub id, or `current`: the "
        "store's champion for the base model",
    )
    pr.add_argument("--store", help="the store `--rpn current` reads (default: the default config's)")
    pr.add_argument("--model", help="base model (default: the one named in the RPN config)")
    recorded = "the RPN's inference.json, else {}"
    pr.add_argument(
        "--threshold", type=_tau_or_auto, help="τ on the RoI map, or auto (default: " + recorded.format(0.15) + ")"
    )
    pr.add_argument(
        "--mode", choices=["mask", "box", "auto"], help="RoI mode, or auto (default: " + recorded.format("mask") + ")"
    )
    pr.add_argument("--benchmark", help="take the τ and mode the release has for this benchmark (calibrated or set)")
    pr.add_argument("--max-new-tokens", type=int, help="answer length (default: " + recorded.format(128) + ")")
    pr.add_argument("--no-kv-reuse", action="store_true", help="recompute pass 2 fully, as the authors do")
    pr.add_argument("--compare", action="store_true", help="also answer without SD-RPN; compare.png side by side")
    pr.add_argument("--out", default="sdrpn-predict", help="folder for answer.json, overlay.png (and compare.png)")
    pr.add_argument("--no-fingerprint-check", action="store_true", help="run on a base model other than the RPN's")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--dtype", default="auto")
    pr.set_defaults(func=cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no internet: telemetry only logs errors
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")  # cold starts on 2 busy cores
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's per-request client log
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
