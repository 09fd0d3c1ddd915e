"""The `sdrpn` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger("sdrpn")


def read_samples(path: Path) -> list:
    """A JSONL manifest: one {"id", "image", "question"[, "domain"]} per line; relative image paths are
    resolved against the manifest's folder. A malformed line is an error naming the line."""
    from sdrpn_core.data import Sample

    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = row["image"]
            if "://" not in image and not Path(image).is_absolute():
                image = str(path.parent / image)
            samples.append(
                Sample(str(row.get("id", row.get("sample_id"))), image, row["question"], row.get("domain", "default"))
            )
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}:{n}: bad manifest line ({type(e).__name__}: {e})") from None
    return samples


def write_demo_inputs(folder: Path, n: int = 12, seed: int = 0) -> Path:
    """A few synthetic scenes (clutter + a small coloured box) and questions, for a run with no downloads."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}
    lines = []
    for i in range(n):
        w, h = int(rng.integers(48, 96)), int(rng.integers(48, 96))
        img = Image.fromarray(rng.integers(90, 170, (h, w, 3), dtype=np.uint8))
        name, rgb = list(colours.items())[i % 3]
        x, y = int(rng.integers(0, w - 12)), int(rng.integers(0, h - 12))
        ImageDraw.Draw(img).rectangle([x, y, x + 11, y + 11], fill=rgb)
        img.save(folder / f"scene{i:03d}.png")
        lines.append(
            json.dumps(
                {
                    "id": f"demo-{i:03d}",
                    "image": f"scene{i:03d}.png",
                    "question": f"what is the digit in the {name} box ?",
                }
            )
        )
    manifest = folder / "samples.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def cmd_labels(args: argparse.Namespace) -> int:
    import numpy as np

    from sdrpn_core.models import load_adapter
    from sdrpn_core.presets import get_preset
    from sdrpn_core.pseudo_labels import LabelParams
    from sdrpn_core.teacher import extract_teacher_maps
    from storage.labels import label_table, quarantine_table, write_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = json.loads(args.preset_overrides) if args.preset_overrides else {}
    if args.demo:
        from sdrpn_core.models.tiny import TinyLlavaSpec, build_tiny_llava

        model_dir = out / "tiny-llava"
        if not (model_dir / "config.json").exists():
            model, processor = build_tiny_llava(TinyLlavaSpec(image_size=64, patch_size=8))
            model.save_pretrained(model_dir)
            processor.save_pretrained(model_dir)
        adapter = load_adapter(model_dir)
        manifest = write_demo_inputs(out / "demo-inputs")
        # random weights: attention is diffuse, so every token would pass the 1e-3 sink test; read no sink map
        overrides = {"grounding": {2: (0, 3)}, "sink": {}, "K": 1, "T": 2, **overrides}
        log.info("demo: tiny random LLaVA (4 layers × 4 heads, %dx%d grid), %s", *adapter.grid, manifest)
    else:
        if not args.model or not args.samples:
            raise SystemExit("sdrpn labels: give --model and --samples, or --demo")
        manifest = Path(args.samples)
    overrides = {
        k: ({int(layer): v for layer, v in val.items()} if k in ("grounding", "sink") else val)
        for k, val in overrides.items()
    }
    preset = get_preset(args.preset, **overrides)
    samples = read_samples(manifest)
    if not args.demo:
        adapter = load_adapter(args.model, dtype=args.dtype, device=args.device)
    t0 = time.perf_counter()
    result = extract_teacher_maps(
        adapter, samples, preset, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
    )
    params = LabelParams.from_preset(preset)
    table = label_table(result.records, params, meta={"preset": asdict(preset), "labels": asdict(params)})
    write_table(table, str(out / "labels.parquet"))
    write_table(quarantine_table(result.rejected), str(out / "quarantine.parquet"))
    dt = time.perf_counter() - t0
    valid = np.asarray(table.column("valid").to_pylist(), dtype=bool)
    print(
        f"labelled {table.num_rows} samples in {dt:.1f}s ({table.num_rows / dt:.2f}/s); "
        f"{int(valid.sum())} usable, {int((~valid).sum())} all-ignore, {len(result.rejected)} rejected"
    )
    print(f"wrote {out / 'labels.parquet'} and {out / 'quarantine.parquet'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc

    from sdrpn_core.models import load_adapter
    from sdrpn_core.presets import get_preset
    from sdrpn_core.train import TrainConfig, samples_from_rows, train_rpn
    from storage.labels import read_label_table

    preset = get_preset(args.preset)
    K = args.K if args.K is not None else preset.K
    T = args.T if args.T is not None else preset.T
    adapter = load_adapter(args.model, dtype=args.dtype, device=args.device)
    table = read_label_table(args.labels)
    table = table.filter(pc.field("valid"))
    config = TrainConfig(
        K=K,
        T=T,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.max_steps,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    result = train_rpn(
        adapter,
        samples_from_rows(table.to_pylist()),
        config,
        out_dir=args.out,
        rpn_fields={"preset": preset.name, "base_model": str(args.model)},
    )
    result.rpn.save(Path(args.out) / "rpn")
    last = result.history[-1]
    print(
        f"trained {result.steps} steps on {table.num_rows} samples; final loss {last['loss']:.4f}; "
        f"{len(result.rejected)} unreadable samples skipped"
    )
    print(f"wrote {Path(args.out) / 'rpn'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json as _json

    from sdrpn_core.data import load_image
    from sdrpn_core.infer import answer_baseline, answer_sdrpn
    from sdrpn_core.models import load_adapter
    from sdrpn_core.rpn import RPN_CONFIG, RoIPredictor
    from sdrpn_core.visualize import roi_overlay

    model = args.model or _json.loads((Path(args.rpn) / RPN_CONFIG).read_text()).get("base_model")
    if not model:
        raise SystemExit("sdrpn predict: --model is needed (the RPN config names no base model)")
    adapter = load_adapter(model, dtype=args.dtype, device=args.device)
    rpn = RoIPredictor.load(args.rpn, adapter)
    image = load_image(args.image)
    answer = answer_sdrpn(
        adapter,
        rpn,
        image,
        args.question,
        threshold=args.threshold,
        mode=args.mode,
        reuse_kv=not args.no_kv_reuse,
        max_new_tokens=args.max_new_tokens,
    )
    roi = answer.roi
    print(answer.text)
    where = roi.pixel_boxes if roi.pixel_boxes else f"no RoI ({roi.plan.reason})"
    log.info(
        "RoI %s: %s; %d crop tokens; %s",
        roi.plan.kind,
        where,
        roi.n_crop_tokens,
        ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in answer.seconds.items()),
    )
    if args.compare:
        print(f"baseline: {answer_baseline(adapter, image, args.question, args.max_new_tokens).text}")
    out = Path(args.overlay or Path(args.image).with_suffix(".roi.png").name)
    roi_overlay(image, roi.plan.prob, roi.pixel_boxes).save(out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdrpn", description="SD-RPN: self-distilled RoI predictors for MLLMs")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("labels", help="teacher attention → pseudo-labels for a sample manifest")
    lab.add_argument("--model", help="model folder or hub id")
    lab.add_argument("--samples", help="JSONL manifest of {id, image, question}")
    lab.add_argument("--demo", action="store_true", help="tiny random LLaVA on synthetic scenes (no downloads)")
    lab.add_argument("--preset", default="llava-1.5-7b")
    lab.add_argument("--preset-overrides", help='JSON, e.g. \'{"grounding": {"14": [13, 24]}}\'')
    lab.add_argument("--out", default="runs/labels")
    lab.add_argument("--batch-size", type=int, default=8)
    lab.add_argument("--max-new-tokens", type=int, default=None)
    lab.add_argument("--device", default="cpu")
    lab.add_argument("--dtype", default="auto")
    lab.set_defaults(func=cmd_labels)

    tr = sub.add_parser("train", help="train the RPN on a labels.parquet")
    tr.add_argument("--model", required=True)
    tr.add_argument("--labels", required=True, help="labels.parquet written by `sdrpn labels`")
    tr.add_argument("--preset", default="llava-1.5-7b")
    tr.add_argument("--K", type=int, default=None, help="backbone depth (default: the preset's)")
    tr.add_argument("--T", type=int, default=None, help="RPN depth (default: the preset's)")
    tr.add_argument("--lr", type=float, default=5e-5)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--epochs", type=int, default=1)
    tr.add_argument("--max-steps", type=int, default=None)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--checkpoint-every", type=int, default=50)
    tr.add_argument("--out", default="runs/train", help="checkpoints here; a rerun resumes; final RPN in OUT/rpn")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--dtype", default="auto")
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", help="answer one question about one image with SD-RPN")
    pr.add_argument("image")
    pr.add_argument("question")
    pr.add_argument("--rpn", required=True, help="RPN folder (rpn.safetensors + rpn_config.json)")
    pr.add_argument("--model", help="base model (default: the one named in the RPN config)")
    pr.add_argument("--threshold", type=float, default=0.15)
    pr.add_argument("--mode", choices=["mask", "box"], default="mask")
    pr.add_argument("--no-kv-reuse", action="store_true", help="recompute pass 2 fully, as the authors do")
    pr.add_argument("--max-new-tokens", type=int, default=128)
    pr.add_argument("--compare", action="store_true", help="also print the baseline answer")
    pr.add_argument("--overlay", help="PNG path for the RoI overlay (default: IMAGE.roi.png here)")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--dtype", default="auto")
    pr.set_defaults(func=cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
