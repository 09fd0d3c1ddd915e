"""What a person sees of a run in the Prefect UI: artifacts with descriptions, pictures as image artifacts, and
locations that open from a browser (presigned URLs for an S3 store) or, for a local store, the path as text (a
`file://` link opens nothing).

Artifact keys are namespaced by the config (`sdrpn-<config>-report`), so two configs on one server do not write
over each other's. Nothing is published for a run whose outputs all came from the cache: the artifacts of the run
that made them still stand, and their links are re-signed in place (a presigned URL lives `LINK_LIFETIME_S`, a
week: every run, a cached one included, restarts that week without a new artifact version)."""

from __future__ import annotations

import io
import re

import pyarrow.parquet as pq
from prefect import get_run_logger
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from stages.config import PipelineConfig
from stages.promote import summary
from stages.refs import EvalRef, LabelsRef, ModelRef, RpnRef
from stages.report import CALIBRATION_PICTURE, results_rows, write_results
from storage.artifacts import ArtifactStore
from storage.champion import Champions
from storage.store import LINK_LIFETIME_S, Store
from tasks.stages import artifact_key


def key(cfg: PipelineConfig, *what: str) -> str:
    """The artifact key of `what` for this config: `sdrpn-<config name>-<what>`."""
    return artifact_key(cfg.name, *what)


def place(store: Store, kind: str, fp: str, name: str = "") -> str:
    """Markdown for an output's location: a link that opens in the browser, or the path as text."""
    url = store.browser_url(kind, fp, name) if name else None
    where = store.url(kind, fp, name)
    return f"[{name or kind}]({url}) (`{where}`)" if url else f"`{where}`"


def image(store: Store, kind: str, fp: str, name: str, artifact: str, description: str) -> str:
    """An image artifact where the store gives the browser a URL; the report's Markdown for it either way."""
    url = store.browser_url(kind, fp, name)
    if url is None:
        return f"{description}: `{store.url(kind, fp, name)}`"
    create_image_artifact(image_url=url, key=artifact, description=description)
    return f"![{description}]({url})"


def _paper_model(cfg: PipelineConfig) -> str | None:
    from sdrpn_core.benchmarks.published import PUBLISHED

    name = cfg.eval.paper_model or cfg.teacher.preset.split("/")[0]
    return name if name in PUBLISHED and cfg.model.source == "path" else cfg.eval.paper_model


def training_log(store: Store, rpn: RpnRef) -> list[dict]:
    arts = ArtifactStore(store)
    if "train_log.parquet" not in arts.manifest("rpn", rpn.fingerprint)["files"]:
        return []
    return pq.read_table(io.BytesIO(arts.read("rpn", rpn.fingerprint, "train_log.parquet"))).to_pylist()


def publish_scores(cfg: PipelineConfig, store: Store, model: ModelRef, results: list[EvalRef], history=None) -> str:
    """The score table (a table artifact), the results files, the score bars (and loss curve) → Markdown."""
    url, markdown = write_results(store, results, _paper_model(cfg), model.fingerprint, history)
    fp = url.rstrip("/").rsplit("/", 1)[-1]
    create_table_artifact(
        key=key(cfg, "scores"),
        table=results_rows(results),
        description=f"{cfg.name}: score per benchmark and method (percent) and throughput relative to the baseline",
    )
    lines = [markdown, image(store, "reports", fp, "scores.png", key(cfg, "score-bars"), "scores per benchmark")]
    if history:
        lines.append(image(store, "reports", fp, "loss.png", key(cfg, "loss-curve"), "RPN training loss per step"))
    lines.append(f"Results files: {place(store, 'reports', fp, 'results.md')}")
    return "\n\n".join(lines)


def publish_run(
    cfg: PipelineConfig,
    store: Store,
    model: ModelRef,
    labels: LabelsRef,
    rpn: RpnRef,
    results: list[EvalRef],
    release_url: str,
) -> None:
    """The run's report (scores, label statistics, training, galleries) and where every output is."""
    history = training_log(store, rpn)
    scores = publish_scores(cfg, store, model, results, history)
    galleries = []
    arts = ArtifactStore(store)
    for r in results:
        files, text = (
            arts.manifest("eval", r.fingerprint)["files"],
            arts.read("eval", r.fingerprint, "report.md").decode(),
        )
        if "calibration.png" in files:  # the report's own link opens only beside it in the store: the artifact's
            what = f"{r.benchmark}: SD-RPN's score and throughput per calibrated τ and mode"
            artifact = key(cfg, "calibration", r.benchmark)
            text = text.replace(
                CALIBRATION_PICTURE, image(store, "eval", r.fingerprint, "calibration.png", artifact, what)
            )
        galleries.append(text)
        if "gallery.png" in files:
            what = f"{r.benchmark}: RoI overlays of the largest SD-RPN wins, then losses"
            galleries.append(image(store, "eval", r.fingerprint, "gallery.png", key(cfg, "gallery", r.benchmark), what))
    stats = labels.stats
    report = [
        f"# SD-RPN run: {cfg.name}",
        "## Results",
        scores,
        "## Pseudo-labels",
        f"{stats.get('samples', 0)} samples: {stats.get('usable', 0)} usable, {stats.get('all_ignore', 0)} "
        f"all-ignore {stats.get('ignored_because', {})}, {stats.get('quarantined', 0)} rejected; per sample "
        f"{stats.get('mean_fg', 0):.1f} foreground, {stats.get('mean_bg', 0):.1f} background, "
        f"{stats.get('mean_sink', 0):.1f} sink tokens on average.",
        f"## RPN: {rpn.steps} steps, final loss {rpn.final_loss:.4f}",
        "## Evaluation",
        *galleries,
    ]
    create_markdown_artifact(
        key=key(cfg, "report"),
        markdown="\n\n".join(report),
        description=f"{cfg.name}: scores, pseudo-label statistics, RPN training and RoI galleries",
    )
    release_fp = release_url.rstrip("/").rsplit("/", 1)[-1]
    outputs = [
        "| output | where |",
        "|---|---|",
        f"| label dataset | {place(store, 'labels', labels.fingerprint)} |",
        f"| RPN checkpoint | {place(store, 'rpn', rpn.fingerprint, 'rpn.safetensors')} |",
        f"| shareable RPN (model card, `sdrpn predict --rpn`) | {place(store, 'release', release_fp, 'README.md')} |",
        *[
            f"| {r.benchmark}: predictions, scores, protocol | {place(store, 'eval', r.fingerprint, 'report.md')} |"
            for r in results
        ],
    ]
    create_markdown_artifact(
        key=key(cfg, "outputs"),
        markdown="\n".join(outputs),
        description=f"{cfg.name}: where the run's outputs are in the store (browser links for S3, paths otherwise)",
    )


def publish_decision(cfg: PipelineConfig, store: Store, decision: dict) -> None:
    """The promotion decision: a log line, the side-by-side table (a Markdown artifact) and a Prefect event,
    `sdrpn.rpn.promoted` or `sdrpn.rpn.rejected`, whose payload is the decision (scores included), for automations
    (e.g. a notification on rejection)."""
    logger, line = get_run_logger(), summary(decision)
    (logger.info if decision["promoted"] else logger.warning)("%s", line)
    rows = [
        "| benchmark | metric | champion | challenger | difference | passes |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['benchmark']} | {r['metric']} | {_num(r['champion'])} | {_num(r['challenger'])} | "
            f"{_num(r['delta'], '+.1f')} | {'yes' if r['passes'] else 'no'} |"
            for r in decision["rows"]
        ],
    ]
    champion = decision["champion"]
    markdown = [
        f"# {'Promoted' if decision['promoted'] else 'Rejected'}: {decision['reason']}",
        *(rows if decision["rows"] else ["(nothing compared)"]),
        f"Challenger: {place(store, 'release', decision['challenger']['release'], 'README.md')}",
        f"Champion: {place(store, 'release', champion['release'], 'README.md') if champion else 'none yet'}",
        f"Decision record: `{Champions(store).decision_url(decision['model'], decision['id'])}`",
    ]
    create_markdown_artifact(
        key=key(cfg, "promotion"), markdown="\n\n".join(markdown), description=f"{cfg.name}: {line}"
    )
    emit_event(
        event=f"sdrpn.rpn.{'promoted' if decision['promoted'] else 'rejected'}",
        resource={"prefect.resource.id": f"sdrpn.model.{decision['model']}", "prefect.resource.name": cfg.name},
        related=[
            {
                "prefect.resource.id": f"sdrpn.release.{decision['challenger']['release']}",
                "prefect.resource.role": "challenger",
            }
        ],
        payload=decision,
    )


LINK = re.compile(r"https?://[^\s)\"'<>`]+")


def refresh_links(store: Store, prefix: str) -> int:
    """Re-sign, in place, every link into `store` held by the newest version of each artifact whose key starts
    with `prefix`; returns how many artifacts changed. No artifact version is added."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactUpdate
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    def resign(match: re.Match) -> str:
        path = store.relative(match.group())
        return (store.browser_url(path) if path else None) or match.group()

    changed = 0
    where = ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(like_=f"{prefix}%"))
    with get_client(sync_client=True) as client:
        for artifact in client.read_latest_artifacts(artifact_filter=where):
            if isinstance(artifact.data, str) and (fresh := LINK.sub(resign, artifact.data)) != artifact.data:
                client.update_artifact(artifact.latest_id, ArtifactUpdate(data=fresh))
                changed += 1
    return changed


def _num(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def skipped(what: str, cfg: PipelineConfig, store: Store) -> None:
    """Nothing re-published; the links of the config's artifacts re-signed in place."""
    get_run_logger().info(
        "%s came from the cache: nothing re-published (the artifacts of the run that made them stand)", what
    )
    if store.links:
        refreshed = refresh_links(store, f"{key(cfg)}-")  # this config's keys, not `<name>-other`'s
        get_run_logger().info("%d artifacts' links re-signed for another %d days", refreshed, LINK_LIFETIME_S // 86400)
