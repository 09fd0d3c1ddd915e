"""Mutation testing of the method core and the shard store with mutmut (PyPI, `pip install -e ".[mutation]"`).

mutmut rewrites every function of the listed modules into variants (an operator, a constant, a comparison, a
keyword argument changed), runs the tests that call that function against each variant, and records whether a
test failed ("killed") or all passed ("survived"). It works on a copy of the repository in a temporary folder,
so the sources here are never touched.

    python benchmarks/mutation.py [--quick] [--keep DIR]     # --quick: roi.py and pseudo_labels.py only

Survivors that cannot be killed because they do not change behaviour are listed, with the reason, in
`benchmarks/mutation_equivalent.json` (keyed by mutant name and the mutated line, so an entry goes stale when
the code changes). score = (killed + timeout) / (mutants - equivalent); "no tests" mutants count as survivors.
Prints one line per module, then `RESULT mutants=… killed=… survived=… score=…`; writes the survivors' diffs to
`benchmarks/results/mutation_survivors.md`. Not part of CI (the full run takes ~10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.json"
SURVIVORS = ROOT / "benchmarks" / "results" / "mutation_survivors.md"

# module -> the fast test files that exercise it (mutmut runs, per mutant, only those tests that call the function)
MODULES: dict[str, list[str]] = {
    "sdrpn_core/roi.py": ["tests/test_roi.py", "tests/test_properties.py"],
    "sdrpn_core/pseudo_labels.py": ["tests/test_pseudo_labels.py", "tests/test_properties.py"],
    "sdrpn_core/metrics.py": ["tests/test_metrics.py", "tests/test_properties.py"],
    "sdrpn_core/rpn.py": ["tests/test_rpn.py", "tests/test_qwen.py"],
    "sdrpn_core/infer.py": ["tests/test_infer.py", "tests/test_qwen.py", "tests/test_rpn.py"],
    "sdrpn_core/teacher.py": ["tests/test_teacher.py", "tests/test_qwen.py"],
    "storage/sharded.py": ["tests/test_storage.py"],
}
QUICK = ["sdrpn_core/roi.py", "sdrpn_core/pseudo_labels.py"]
PACKAGES = ["sdrpn_core", "storage", "tasks", "flows", "stages", "benchmarks", "models", "configs"]
KILLED = {"killed", "timeout"}


def copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files, as the tests see them."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def write_config(dest: Path, modules: list[str]) -> None:
    tests = sorted({t for m in modules for t in MODULES[m]})
    lines = ["[mutmut]", "source_paths=" + "\n    ".join(modules)]
    lines += ["pytest_add_cli_args_test_selection=" + "\n    ".join(tests)]
    lines += ["also_copy=" + "\n    ".join(p for p in PACKAGES if (dest / p).exists())]
    (dest / "setup.cfg").write_text("\n".join(lines) + "\n")


def mutmut(dest: Path, *args: str, log=None) -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        raise SystemExit('mutmut is not installed: pip install -e ".[mutation]"')
    out = subprocess.run(
        [str(exe), *args], cwd=dest, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if out.returncode not in (0, 1) and args[0] == "run":
        raise SystemExit(f"mutmut {' '.join(args)} failed with exit code {out.returncode}; see the log")
    return out.stdout or ""


def statuses(dest: Path, modules: list[str]) -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true` ("name: status" per line)."""
    out = mutmut(dest, "results", "--all", "true")
    found = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            found[name] = status.strip()
    prefixes = tuple(m[:-3].replace("/", ".") + "." for m in modules)
    return {k: v for k, v in found.items() if k.startswith(prefixes)}


def mutated_line(diff: str) -> str:
    """The first added line of a mutant's diff: what the equivalence list is keyed on, with the name."""
    return next((ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")), "")


def load_equivalent() -> dict[str, dict]:
    if not EQUIVALENT.exists():
        return {}
    return {e["mutant"]: e for e in json.loads(EQUIVALENT.read_text())}


def module_of(name: str, modules: list[str]) -> str:
    return next(m for m in modules if name.startswith(m[:-3].replace("/", ".") + "."))


def report(dest: Path, modules: list[str], status: dict[str, str]) -> dict[str, int]:
    equivalent = load_equivalent()
    survivors = sorted(k for k, v in status.items() if v not in KILLED)
    rows, stale, eq_count = [], [], 0
    for name in survivors:
        diff = mutmut(dest, "show", name)
        line = mutated_line(diff)
        entry = equivalent.get(name)
        if entry and entry.get("line") == line:
            eq_count += 1
            continue
        if entry:
            stale.append(name)
        rows.append(f"### {name} ({status[name]})\n\n```diff\n{diff.strip()}\n```\n")
    per_module: dict[str, Counter] = {m: Counter() for m in modules}
    for name, s in status.items():
        per_module[module_of(name, modules)][s] += 1
    for m, c in per_module.items():
        print(f"{m:32s} " + "  ".join(f"{k}={v}" for k, v in sorted(c.items())))
    if stale:
        print(f"{len(stale)} equivalence entries are stale (the mutated line changed): {', '.join(stale[:5])}")
    SURVIVORS.parent.mkdir(parents=True, exist_ok=True)
    SURVIVORS.write_text(
        f"# Mutants not killed and not listed as equivalent ({len(rows)})\n\n"
        "Written by `python benchmarks/mutation.py`; see `mutation.md` for the summary.\n\n" + "\n".join(rows)
    )
    killed = sum(v in KILLED for v in status.values())
    return {"mutants": len(status), "killed": killed, "equivalent": eq_count, "survived": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="roi.py and pseudo_labels.py only")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (mutmut browse / show there)")
    args = p.parse_args()
    modules = QUICK if args.quick else list(MODULES)
    dest = args.keep or Path(tempfile.mkdtemp(prefix="sdrpn-mutation-"))
    t0 = time.perf_counter()
    try:
        if not (dest / "mutants").exists():
            copy_repo(dest)
            write_config(dest, modules)
            with open(dest / "mutmut.log", "w") as log:
                mutmut(dest, "run", log=log)
        counts = report(dest, modules, statuses(dest, modules))
    finally:
        if not args.keep:
            shutil.rmtree(dest, ignore_errors=True)
    score = counts["killed"] / max(counts["mutants"] - counts["equivalent"], 1)
    print(f"{time.perf_counter() - t0:.0f} s, {counts['equivalent']} listed as equivalent")
    print(
        f"RESULT mutants={counts['mutants']} killed={counts['killed']} survived={counts['survived']} "
        f"equivalent={counts['equivalent']} score={score:.3f}"
    )


if __name__ == "__main__":
    main()
