"""Training the RPN on pseudo-labels (docs/method.md §5): frozen backbone, BCE over the non-ignored tokens.

The backbone, vision tower and projector run under no-grad; only the predictor learns. The loss is
`BCEWithLogits` averaged over every valid token of the micro-batch pooled (no per-sample normalisation); a batch
without a valid token contributes 0·Σlogits so the graph stays alive. AdamW β=(0.9, 0.98), weight decay 0,
cosine schedule with 3% warm-up (HF's `get_cosine_schedule_with_warmup` formula), peak lr 5e-5 — the authors'
LLaVA settings. A checkpoint (predictor + optimizer + step) is written atomically every `checkpoint_every`
optimizer steps, and a run restarted on the same folder continues bit-for-bit: the data order is a pure
function of (seed, epoch) and the learning rate a pure function of the step.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdrpn_core.data import BadSample, Rejection, load_image
from sdrpn_core.models.base import VLMAdapter
from sdrpn_core.progress import Progress
from sdrpn_core.pseudo_labels import IGNORE
from sdrpn_core.rpn import RoIPredictor, partial_prefill

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"  # step-<N>/ folders under out_dir; the highest complete one is the checkpoint


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run: the config's `train:` section is this dataclass (any field can be set
    there), on top of the preset's `recipe` (the authors' values for the family), on top of these defaults.

    The effective batch is batch_size × accumulation × world_size. With `effective_batch` set, the accumulation is
    derived from it (and `grad_accum` must be left at 1), so the authors' 512 (LLaVA) or 128 (Qwen) is trained
    whatever the number of devices: 8 × 64 × 1 on one GPU, 8 × 16 × 4 on four."""

    K: int
    T: int = 3
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    batch_size: int = 8  # per device
    grad_accum: int = 1
    effective_batch: int | None = None  # samples per optimizer step over all devices; sets the accumulation
    world_size: int = 1  # data-parallel processes (the config's `train.world_size: 0`: every visible GPU)
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; default: all epochs
    max_grad_norm: float | None = None  # the authors' runs clip at 1.0 (the recipes); 0 or None: no clipping
    seed: int = 0
    checkpoint_every: int = 50
    metric_threshold: float = 0.5  # sigmoid threshold for token precision / recall in the log
    inputs: dict = field(default_factory=dict)  # adapter input settings while training (Qwen: the authors' prompt)
    # the frozen backbone's dtype while training, when not the model's (the authors train LLaVA's RPN in bf16 and
    # run its teacher and evaluation in fp16); the stage loads the model so, `train_rpn` checks it
    dtype: str | None = None
    # the authors' ROITrainingDataset keeps samples whose labels are all ignore: no loss, but they fill batches and
    # count in the step count (on in their recipes; off trains on labelled samples alone)
    keep_all_ignore: bool = False

    def __post_init__(self):
        positive = ("K", "T", "batch_size", "grad_accum", "world_size", "epochs", "checkpoint_every")
        for name in (*positive, "effective_batch", "max_steps"):
            value = getattr(self, name)
            if (value is not None or name in positive) and (not isinstance(value, int) or value < 1):
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        for name, value, ok in [
            ("lr", self.lr, self.lr > 0),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0),
            ("warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio < 1),
            ("max_grad_norm", self.max_grad_norm, self.max_grad_norm is None or self.max_grad_norm >= 0),
            ("metric_threshold", self.metric_threshold, 0 < self.metric_threshold < 1),
            ("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)),
            ("dtype", self.dtype, self.dtype in (None, "float32", "float16", "bfloat16")),
        ]:
            if not ok:
                raise ValueError(f"train.{name} = {value!r} is out of range")
        if self.effective_batch is not None:
            if self.grad_accum != 1:
                raise ValueError("set train.effective_batch or train.grad_accum, not both")
            if self.effective_batch % (self.batch_size * self.world_size):
                raise ValueError(
                    f"train.effective_batch {self.effective_batch} is not a multiple of batch_size {self.batch_size}"
                    f" × world_size {self.world_size}"
                )

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each device."""
        if self.effective_batch is None:
            return self.grad_accum
        return self.effective_batch // (self.batch_size * self.world_size)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.accumulation * self.world_size


@dataclass(frozen=True)
class TrainSample:
    sample_id: str
    image: object  # path / URL / PIL image
    question: str
    labels: np.ndarray  # int, length grid_h·grid_w: 1 / 0 / −100


@dataclass
class TrainResult:
    rpn: RoIPredictor
    steps: int
    skipped_all_ignore: int
    rejected: list[Rejection]
    history: list[dict] = field(default_factory=list)


def rpn_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the non-ignored tokens of the whole batch; 0·Σlogits when there are none."""
    valid = labels != IGNORE
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[valid].float(), labels[valid].float())


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    warmup = math.ceil(config.warmup_ratio * total)
    if step < warmup:
        return config.lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (a `step-<N>` folder; hidden temporaries never count)."""
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").exists())
    return steps[-1] if steps else None


def _save_checkpoint(root: Path, rpn: RoIPredictor, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write a hidden folder, rename it to `step-<N>` (atomic), then remove older checkpoints and temporaries.
    A kill at any instant leaves at least one complete checkpoint and nothing that blocks the next save."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    rpn.save(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    final = root / f"step-{state['step']:09d}"
    if final.exists():  # left by a run killed after this very rename: it holds the same step
        shutil.rmtree(tmp)
    else:
        tmp.rename(final)
    for stale in root.iterdir():
        if stale != final and (stale.name.startswith(".tmp-") or stale.name.startswith("step-")):
            shutil.rmtree(stale, ignore_errors=True)


def _load_checkpoint(folder: Path, rpn: RoIPredictor, optimizer: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    rpn.load_state_dict(load_file(folder / "rpn.safetensors", device=str(next(rpn.parameters()).device)))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return json.loads((folder / "state.json").read_text())


def rpn_logits(adapter: VLMAdapter, rpn: RoIPredictor, x, K: int) -> torch.Tensor:
    """The RPN's RoI logits [B, n_img] for a collated batch: the frozen backbone's layers 0..K−1 (no gradient),
    then the RPN queried at each row's last prompt token (the last column: batches are left-padded)."""
    with torch.no_grad():
        embeds = adapter.embed(x)
        hidden, mask, pe, pos = partial_prefill(adapter, embeds, x.attention_mask, adapter.position_ids(x), K)
    query = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
    return rpn(hidden, mask, pe, pos, query, torch.stack(x.image_positions).to(hidden.device))


def _usable(
    adapter: VLMAdapter, samples: Sequence[TrainSample], keep_all_ignore: bool
) -> tuple[list[TrainSample], int]:
    """The samples trained on: those with a labelled token, or all of them with `keep_all_ignore` (the authors'
    batches), and the count of all-ignore ones."""
    labelled = [s for s in samples if np.any(np.asarray(s.labels) != IGNORE)]
    skipped = len(samples) - len(labelled)
    if not labelled:
        raise ValueError(f"no trainable samples: all {len(samples)} are all-ignore")
    if skipped:
        log.info("%s %d all-ignore samples of %d", "keeping" if keep_all_ignore else "skipping", skipped, len(samples))
    usable = list(samples) if keep_all_ignore else labelled
    n_img = adapter.grid[0] * adapter.grid[1]
    for s in usable:
        if np.asarray(s.labels).size != n_img:
            raise ValueError(f"sample {s.sample_id}: {np.asarray(s.labels).size} labels for a {n_img}-token grid")
    return usable, skipped


@dataclass
class _Run:
    """What a training run carries from step to step (and through a checkpoint)."""

    usable: list[TrainSample]
    step: int = 0
    history: list[dict] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    bad_ids: set[str] = field(default_factory=set)

    def steps_per_epoch(self, config: TrainConfig) -> int:
        return math.ceil(math.ceil(len(self.usable) / config.batch_size) / (config.accumulation * config.world_size))

    def micro_batches(self, config: TrainConfig) -> tuple[int, range]:
        """(epoch, micro-batch indices in it) of the current step over all ranks. As HF's Trainer does, an epoch's
        last step accumulates only the micro-batches left, so a data set smaller than one effective batch is seen
        once per epoch (one short step), not cycled through to fill it. Rank r takes every world_size-th of them."""
        micro_per_epoch = math.ceil(len(self.usable) / config.batch_size)
        per_step = config.accumulation * config.world_size
        epoch, k = divmod(self.step, self.steps_per_epoch(config))
        return epoch, range(k * per_step, min((k + 1) * per_step, micro_per_epoch))

    def batch(self, adapter: VLMAdapter, config: TrainConfig, epoch: int, index: int):
        """Micro-batch `index` of `epoch` (a pure function of seed and position) → (inputs, labels), or None when
        every sample in it was rejected (recorded once, skipped from then on)."""
        order = _order(len(self.usable), config.seed, epoch)
        pixels, questions, labels = [], [], []
        for i in order[index * config.batch_size : (index + 1) * config.batch_size]:
            s = self.usable[i]
            if s.sample_id in self.bad_ids:
                continue
            try:
                pixels.append(adapter.pixel_values(load_image(s.image)))
            except BadSample as e:
                self.bad_ids.add(s.sample_id)
                self.rejected.append(Rejection(s.sample_id, e.reason))
                continue
            questions.append(s.question)
            labels.append(torch.as_tensor(np.asarray(s.labels), dtype=torch.long))
        return (adapter.collate(pixels, questions), torch.stack(labels)) if pixels else None


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (torch.distributed, initialised by torchrun); one rank alone
    when there is no process group. Gradients and step metrics are summed over the ranks once per optimizer step,
    after the accumulation (DDP's `no_sync` pattern, done by hand so a rank left without a micro-batch in an
    epoch's short last step still joins the reduction)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], params: list[torch.nn.Parameter]) -> list[float]:
        """Sum `values` and the parameters' gradients over the ranks (in place for the gradients), in one
        all-reduce of a flat buffer (as DDP's buckets: one round trip, not one per tensor)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat(
            [*(g.flatten().double() for g in grads), torch.tensor(values, dtype=torch.float64, device=grads[0].device)]
        )
        dist.all_reduce(flat)
        start = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[start : start + g.numel()].view_as(g).to(g.dtype)
            start += g.numel()
        return flat[start:].tolist()

    def same_start(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank starts from rank 0's weights."""
        if self.world > 1:
            import torch.distributed as dist

            for p in params:
                dist.broadcast(p.data, src=0)

    def gather(self, items: list) -> list:
        """Every rank's items (rejections: each rank meets only the bad samples of its own micro-batches)."""
        if self.world == 1:
            return items
        import torch.distributed as dist

        out: list[list] = [[] for _ in range(self.world)]
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _optimizer_step(
    adapter, rpn, optimizer, params, run: _Run, config: TrainConfig, total: int, autocast, ranks: Ranks
) -> dict:
    """One optimizer step over `config.accumulation` micro-batches per rank → its log record (over all ranks)."""
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss_sum, tp, fp, fn, n_valid = 0.0, 0, 0, 0, 0
    epoch, micros = run.micro_batches(config)
    for index in micros[ranks.rank :: ranks.world]:
        batch = run.batch(adapter, config, epoch, index)
        if batch is None:
            continue
        x, target = batch
        with autocast:
            logits = rpn_logits(adapter, rpn, x, config.K)  # [B, n_img]
        target = target.to(logits.device)
        loss = rpn_loss(logits, target)
        (loss / len(micros)).backward()  # summed over the ranks below: the mean over every rank's micro-batches
        with torch.no_grad():
            valid, truth = target != IGNORE, target == 1
            pred = torch.sigmoid(logits.float()) > config.metric_threshold
            tp += int((pred & truth & valid).sum())
            fp += int((pred & ~truth & valid).sum())
            fn += int((~pred & truth & valid).sum())
            n_valid += int(valid.sum())
            loss_sum += float(loss) / len(micros)
    loss_sum, tp, fp, fn, n_valid = ranks.sum([loss_sum, tp, fp, fn, n_valid], params)
    lr = lr_at(run.step, total, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    run.step += 1
    return {
        "step": run.step,
        "loss": loss_sum,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "valid_tokens": int(n_valid),
        "lr": lr,
        "seconds": time.perf_counter() - t0,
    }


def train_rpn(
    adapter: VLMAdapter,
    samples: Sequence[TrainSample],
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    rpn: RoIPredictor | None = None,
    rpn_fields: dict | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train (or resume, when `out_dir` holds a checkpoint) an RPN on labelled samples.

    Under torchrun every rank runs this on the same samples: rank r takes every world_size-th micro-batch of a
    step, the gradients are summed over the ranks, and rank 0 alone logs, reports progress and checkpoints."""
    ranks = Ranks.current()
    if ranks.world != config.world_size:
        raise ValueError(
            f"train.world_size {config.world_size}, but {ranks.world} process(es) run this training: the train stage "
            f"launches torchrun --nproc-per-node {config.world_size}; on one device keep the authors' batch with "
            "train.effective_batch (the accumulation is derived from it)"
        )
    if config.dtype is not None and adapter.dtype != getattr(torch, config.dtype):
        raise ValueError(f"train.dtype {config.dtype}, but the model is loaded in {adapter.dtype}: load it so")
    torch.manual_seed(config.seed)
    usable, skipped_ignore = _usable(adapter, samples, config.keep_all_ignore)
    adapter.model.requires_grad_(False)
    rpn = rpn or RoIPredictor.from_adapter(adapter, config.K, config.T, **(rpn_fields or {}))
    rpn = rpn.float().train().requires_grad_(True)
    params = [p for p in rpn.parameters() if p.requires_grad]
    ranks.same_start(params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    cuda = adapter.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    run = _Run(usable)
    total = config.max_steps or config.epochs * run.steps_per_epoch(config)
    log.info(
        "effective batch %d = %d per device × %d accumulated × %d device(s); %d optimizer steps over %d samples",
        *(config.samples_per_step, config.batch_size, config.accumulation, config.world_size, total, len(usable)),
    )
    ckpt = Path(out_dir) / CHECKPOINT_DIR if out_dir is not None else None
    _resume(ckpt, rpn, optimizer, run, total)
    bar = Progress(total, "train", log, callback=progress if ranks.main else None)
    bar.done = run.step
    if run.step and progress is not None and ranks.main:
        progress(run.step, total)  # a resumed run shows where it starts (100 % when it had finished)
    while run.step < total:
        record = _optimizer_step(adapter, rpn, optimizer, params, run, config, total, autocast, ranks)
        run.history.append(record)
        if ranks.main:
            bar.update(1, loss=f"{record['loss']:.4f}", p=f"{record['precision']:.2f}", r=f"{record['recall']:.2f}")
        if ckpt is not None and (run.step % config.checkpoint_every == 0 or run.step == total):
            _checkpoint(ckpt, rpn, optimizer, run, config, ranks)
        if on_step is not None:
            on_step(run.step, record)
    rpn.eval().requires_grad_(False)
    return TrainResult(rpn, run.step, skipped_ignore, ranks.gather(run.rejected), run.history)


def _resume(ckpt: Path | None, rpn: RoIPredictor, optimizer: torch.optim.Optimizer, run: _Run, total: int) -> None:
    """Continue from the newest complete checkpoint, if any (every rank reads the same one)."""
    if ckpt is None or (latest := latest_checkpoint(ckpt)) is None:
        return
    state = _load_checkpoint(latest, rpn, optimizer)
    run.step, run.history = state["step"], state["history"]
    run.rejected = [Rejection(**r) for r in state["rejected"]]
    run.bad_ids = {r.sample_id for r in run.rejected}
    log.info("resuming from %s at step %d/%d", latest, run.step, total)


def _checkpoint(ckpt: Path, rpn: RoIPredictor, optimizer, run: _Run, config: TrainConfig, ranks: Ranks) -> None:
    """Rank 0 writes the checkpoint (with every rank's rejections); the others wait until it is complete."""
    rejected = [asdict(r) for r in ranks.gather(run.rejected)]
    if ranks.main:
        state = {"step": run.step, "history": run.history, "rejected": rejected}
        _save_checkpoint(ckpt, rpn, optimizer, {**state, "config": asdict(config), **recipe_record(config)})
    ranks.barrier()


def recipe_record(config: TrainConfig) -> dict:
    """The resolved recipe as written with a checkpoint and an RPN artifact (the effective batch spelled out)."""
    return {
        "recipe": {k: v for k, v in asdict(config).items() if k not in ("K", "T")},
        "effective_batch": config.samples_per_step,
        "accumulation": config.accumulation,
    }


def samples_from_rows(rows: Sequence[dict]) -> list[TrainSample]:
    """Label-table rows (dicts with sample_id, image, question, labels) → training samples."""
    return [
        TrainSample(r["sample_id"], r["image"], r["question"], np.asarray(r["labels"], dtype=np.int64)) for r in rows
    ]
