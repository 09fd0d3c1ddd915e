"""Peak memory and time of teacher-map extraction: ours (capture only the configured heads at decode steps) vs
`generate(output_attentions=True)` with eager attention (every layer, every step, the prefill included).

The model is narrow (hidden 128) but LLaVA-1.5-like in sequence: 336 px / patch 14 → 576 image tokens behind the
vicuna_v1 system prompt, 32 decoder layers, a few dozen forced answer tokens — so attention, not weights, dominates.
Each method runs in its own process; memory is the peak increase over the loaded, warmed-up model (CPU: peak RSS
via /proc VmHWM reset; CUDA: torch peak allocated). Both methods produce the same maps (checked here too).

    python benchmarks/teacher_memory.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import parser

# the keys of the last line, `RESULT key=value …` (checked by tests/test_benchmark_scripts.py)
RESULT_KEYS = ("memory_ratio", "time_ratio", "ours_mib", "theirs_mib", "map_max_diff")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from sdrpn_core.data import Sample
    from sdrpn_core.models import LlavaAdapter
    from sdrpn_core.models.tiny import TinyLlavaSpec, build_tiny_llava
    from sdrpn_core.presets import get_preset
    from sdrpn_core.teacher import extract_teacher_maps, reference_maps_output_attentions

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    spec = TinyLlavaSpec(
        image_size=336,
        patch_size=14,
        vision_hidden=32,
        vision_layers=1,
        text_hidden=128,
        text_intermediate=256,
        text_layers=args.layers,
        text_heads=8,
        text_kv_heads=8,
    )
    model, processor = build_tiny_llava(spec)
    adapter = LlavaAdapter(model.to(args.device), processor)
    preset = get_preset(
        "llava-1.5-7b", grounding={args.layers // 2 - 2: (1, 2, 5)}, sink={2: None}, K=args.layers // 2 - 1, T=3
    )
    rng = np.random.default_rng(0)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 256, (300 + 7 * i, 400, 3), dtype=np.uint8)) for i in range(args.batch)]
    questions = [f"what is written on the sign number {i} in the picture ?" for i in range(args.batch)]

    def run_ours(n_tokens: int, n: int):
        samples = [Sample(str(i), images[i], questions[i]) for i in range(n)]
        out = extract_teacher_maps(
            adapter,
            samples,
            preset,
            batch_size=n,
            max_new_tokens=n_tokens,
            generation_kwargs={"min_new_tokens": n_tokens},
        )
        return np.stack([r.grounding for r in out.records])

    def run_theirs(n_tokens: int, n: int):
        x = adapter.build_inputs(images[:n], questions[:n])
        g, _s, _ = reference_maps_output_attentions(adapter, x, preset, n_tokens, min_new_tokens=n_tokens)
        return g.numpy()

    run = run_ours if args.worker == "ours" else run_theirs
    run(2, 1)  # warm-up: lazy inits, kernels
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _rss_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    maps = run(args.tokens, args.batch)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb("VmHWM") * 1024
    return {
        "seconds": seconds,
        "peak_increase_bytes": peak - base,
        "maps": maps.tolist(),
        "seq_len": len(adapter.build_inputs(images[:1], questions[:1]).input_ids[0]),
    }


def main() -> None:
    p = parser(__doc__, "16 layers, batch 2, 16 tokens (under a minute on 2 cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.layers, args.batch, args.tokens = 16, 2, 16
    if args.smoke:
        args.layers, args.batch, args.tokens = 4, 1, 4
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import numpy as np

    results = {}
    for method in ("theirs", "ours"):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--device",
            args.device,
            "--layers",
            str(args.layers),
            "--batch",
            str(args.batch),
            "--tokens",
            str(args.tokens),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"{method} worker failed:\n{proc.stderr[-3000:]}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, theirs = results["ours"], results["theirs"]
    max_diff = float(np.abs(np.array(ours["maps"]) - np.array(theirs["maps"])).max())
    mem_ratio = ours["peak_increase_bytes"] / theirs["peak_increase_bytes"]
    time_ratio = ours["seconds"] / theirs["seconds"]
    print(
        f"device={args.device} layers={args.layers} batch={args.batch} answer_tokens={args.tokens} "
        f"seq_len={ours['seq_len']} (576 image tokens)"
    )
    for name, r in (("output_attentions", theirs), ("sdrpn capture", ours)):
        print(f"  {name:18s} peak +{r['peak_increase_bytes'] / 2**20:9.1f} MiB   {r['seconds']:7.2f} s")
    print(f"  max |map difference| = {max_diff:.2e}")
    print(
        f"RESULT memory_ratio={mem_ratio:.4f} time_ratio={time_ratio:.3f} "
        f"ours_mib={ours['peak_increase_bytes'] / 2**20:.1f} theirs_mib={theirs['peak_increase_bytes'] / 2**20:.1f} "
        f"map_max_diff={max_diff:.2e}"
    )


if __name__ == "__main__":
    main()
