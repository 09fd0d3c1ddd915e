"""The #16 device check: a LLaVA-1.5-7B-shaped random model (336 px / patch 14 → 576 image tokens, 32 layers,
hidden 4096, 32 heads; bf16 on CUDA) answering batches, in one run:

- baseline and SD-RPN samples/s at batch 1 and batch 8 (SD-RPN: K 15, T 3, an untrained RPN at τ 0.001 in box
  mode, so every row crops: the work a real RoI costs), and SD-RPN's throughput relative to the baseline (the
  paper: 0.62× at batch 1, without KV reuse);
- teacher label throughput: our batched extraction (`extract_teacher_maps`, batch 16, only the preset's heads)
  against the authors' way, batch-1 `generate(output_attentions=True)` (`reference_maps_output_attentions`).

    python benchmarks/scale_gpu.py --device cuda      # on a lent GPU (benchmarks/device_checks.sh)
    python benchmarks/scale_gpu.py --quick            # the same code on a small model, on CPU
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import parser

# the keys of the last line, `RESULT key=value …` (checked by tests/test_benchmark_scripts.py)
RESULT_KEYS = (
    "sdrpn_rel_throughput_b1",
    "sdrpn_rel_throughput_b8",
    "baseline_b8_speedup",
    "sdrpn_b8_speedup",
    "teacher_speedup",
)


def build(args):
    import torch

    from benchmarks._pipeline import llava_shaped
    from sdrpn_core.presets import get_preset
    from sdrpn_core.rpn import RoIPredictor

    adapter = llava_shaped(args.layers, args.hidden, args.heads, args.dtype, args.device, args.image_size)
    K = args.layers // 2 - 1
    torch.manual_seed(0)
    rpn = RoIPredictor.from_adapter(adapter, K=K, T=3)
    heads = tuple(h for h in (1, 2, 5) if h < args.heads)
    preset = get_preset("llava-1.5-7b", grounding={K - 1: heads}, sink={min(2, args.layers - 1): None}, K=K, T=3)
    return adapter, rpn, preset


def rows(n: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480 + 16 * i, 640, 3), dtype=np.uint8)) for i in range(n)]
    return images, [f"what is written on the small sign number {i} in the picture ?" for i in range(n)]


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of `fn()` (after one warm-up call)."""
    import statistics

    import torch

    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def answering(adapter, rpn, args) -> dict[str, float]:
    """samples/s of the baseline and SD-RPN at batch 1 and 8."""
    from sdrpn_core.infer import answer_baseline_batch, answer_sdrpn_batch

    images, questions = rows(8)
    rates = {}
    for b in (1, 8):
        ims, qs = images[:b], questions[:b]
        base = timed(lambda ims=ims, qs=qs: answer_baseline_batch(adapter, ims, qs, args.new_tokens), args.device,
                     args.repeats)  # fmt: skip
        sd = timed(
            lambda ims=ims, qs=qs: answer_sdrpn_batch(
                adapter, rpn, ims, qs, threshold=0.001, mode="box", max_new_tokens=args.new_tokens
            ),
            args.device,
            args.repeats,
        )
        rates[f"baseline_b{b}"], rates[f"sdrpn_b{b}"] = b / base, b / sd
    return rates


def teacher(adapter, preset, args) -> dict[str, float]:
    """Label samples/s: ours (batched) against the authors' batch-1 output_attentions generate."""
    from sdrpn_core.data import Sample
    from sdrpn_core.teacher import extract_teacher_maps, reference_maps_output_attentions

    images, questions = rows(args.teacher_n)
    samples = [Sample(str(i), im, q) for i, (im, q) in enumerate(zip(images, questions, strict=True))]

    def ours():
        extract_teacher_maps(adapter, samples, preset, batch_size=args.teacher_n, max_new_tokens=args.new_tokens,
                             generation_kwargs={"min_new_tokens": args.new_tokens})  # fmt: skip

    def theirs():
        for im, q in zip(images, questions, strict=True):
            x = adapter.build_inputs([im], [q])
            reference_maps_output_attentions(adapter, x, preset, args.new_tokens, min_new_tokens=args.new_tokens)

    return {"teacher_ours": args.teacher_n / timed(ours, args.device, 1),
            "teacher_theirs": args.teacher_n / timed(theirs, args.device, 1)}  # fmt: skip


def main() -> None:
    p = parser(__doc__, "4 layers, hidden 256, 112 px, on CPU (under a minute)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--teacher-n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.image_size, args.teacher_n, args.repeats = 4, 256, 4, 112, 4, 1
    if args.smoke:
        args.layers, args.hidden, args.heads, args.image_size, args.teacher_n, args.repeats = 4, 64, 2, 56, 2, 1
        args.device, args.new_tokens = "cpu", 2
    adapter, rpn, preset = build(args)
    r = {**answering(adapter, rpn, args), **teacher(adapter, preset, args)}
    for k, v in r.items():
        print(f"{k:16s} {v:8.2f} samples/s")
    print(
        f"RESULT sdrpn_rel_throughput_b1={r['sdrpn_b1'] / r['baseline_b1']:.2f} "
        f"sdrpn_rel_throughput_b8={r['sdrpn_b8'] / r['baseline_b8']:.2f} "
        f"baseline_b8_speedup={r['baseline_b8'] / r['baseline_b1']:.2f} "
        f"sdrpn_b8_speedup={r['sdrpn_b8'] / r['sdrpn_b1']:.2f} "
        f"teacher_speedup={r['teacher_ours'] / r['teacher_theirs']:.2f}"
    )


if __name__ == "__main__":
    main()
