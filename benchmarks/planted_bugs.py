"""Plant the eight one-line bugs the test audit of issue #13 found surviving, one at a time, and check that the
fast tests now catch each (the sources are restored after every run, also on Ctrl-C).

    python benchmarks/planted_bugs.py [--quick]      # --quick: the first four bugs

Ends with `RESULT planted=… caught=…`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._cli import parser  # noqa: E402

# the keys of the last line, `RESULT key=value …` (checked by tests/test_benchmark_scripts.py)
RESULT_KEYS = ("planted", "caught")

# (name, file, original text, planted text, the tests that must catch it)
BUGS = [
    (
        "kv-reuse positions shifted by one",
        "sdrpn_core/infer.py",
        "r.positions[..., r.prefix :]) for r in rows])",
        "r.positions[..., r.prefix :] + 1) for r in rows])",
        "tests/test_infer.py",
    ),
    (
        "RPN query row one token early (inference)",
        "sdrpn_core/infer.py",
        "query = torch.tensor([[length - 1]]",
        "query = torch.tensor([[length - 2]]",
        "tests/test_rpn.py",
    ),
    (
        "RPN query row one token early (training)",
        "sdrpn_core/train.py",
        "query = torch.full((hidden.shape[0],), hidden.shape[1] - 1,",
        "query = torch.full((hidden.shape[0],), hidden.shape[1] - 2,",
        "tests/test_rpn.py",
    ),
    (
        "teacher maps divided by n + 1",
        "sdrpn_core/teacher.py",
        "/ n_valid.clamp(min=1)",
        "/ (n_valid + 1).clamp(min=1)",
        "tests/test_teacher.py",
    ),
    (
        "teacher maps: mean per layer, then over layers",
        "sdrpn_core/teacher.py",
        "pairs.append(mean[:, cols])",
        "pairs.append(mean[:, cols].mean(1, keepdim=True))",
        "tests/test_teacher.py",
    ),
    (
        "sharded reader without first-commit-wins",
        "storage/sharded.py",
        "(not dedup or k not in seen)",
        "(not dedup or True)",
        "tests/test_storage.py",
    ),
    (
        "commit record written before its shard",
        "storage/sharded.py",
        "        self.store.write_bytes(data, self.prefix, shard)\n",
        "",
        "tests/test_storage.py",
    ),
    (
        "grown box one cell narrower",
        "sdrpn_core/roi.py",
        "bw, bh = max(3, x1 - x0 + 1), max(3, y1 - y0 + 1)",
        "bw, bh = max(3, x1 - x0), max(3, y1 - y0)",
        "tests/test_roi.py",
    ),
    (
        ">= instead of > at τ",
        "sdrpn_core/roi.py",
        "        binary = prob > threshold\n    boxes",
        "        binary = prob >= threshold\n    boxes",
        "tests/test_roi.py",
    ),
]


def plant(path: Path, original: str, planted: str) -> str:
    text = path.read_text()
    if text.count(original) != 1:
        raise SystemExit(f"{path}: the text to mutate is not there exactly once: {original!r}")
    if not planted:  # the "record before shard" bug: move the shard write after the record write
        record = '        self.store.write_json(record, self.prefix, COMMITS, f"{stamp}.json")'
        body = text.replace(original, "")
        return body.replace(record, record + "\n        self.store.write_bytes(data, self.prefix, shard)", 1)
    return text.replace(original, planted)


def main() -> None:
    p = parser(__doc__, "the first four bugs only")
    args = p.parse_args()
    bugs = BUGS[:4] if args.quick else BUGS
    if args.smoke:  # what rots here is an anchor: every bug's text still in its file once, its tests still there
        for name, rel, original, planted, tests in bugs:
            plant(ROOT / rel, original, planted)
            if not (ROOT / tests).exists():
                raise SystemExit(f"bug {name!r}: its tests {tests} do not exist")
        print(f"{len(bugs)} bugs: each anchor found once, each test file present (nothing planted)")
        print("RESULT planted=0 caught=0")
        return
    caught = 0
    for name, rel, original, planted, tests in bugs:
        path = ROOT / rel
        clean = path.read_text()
        t0 = time.perf_counter()
        try:
            path.write_text(plant(path, original, planted))
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", tests],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
        finally:
            path.write_text(clean)
        failed = run.returncode != 0
        caught += failed
        line = next((ln for ln in run.stdout.splitlines() if ln.startswith("FAILED")), "")
        print(f"{'caught  ' if failed else 'SURVIVED'} {name:48s} {time.perf_counter() - t0:5.1f} s  {line[:90]}")
    print(f"RESULT planted={len(bugs)} caught={caught}")


if __name__ == "__main__":
    main()
