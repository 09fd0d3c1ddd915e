"""Mutation testing of the method core and the shard store with mutmut (PyPI, `pip install -e ".[mutation]"`).

mutmut rewrites every function of the listed modules into variants (an operator, a constant, a comparison, a
keyword argument changed), runs the tests that call that function against each variant, and records whether a
test failed ("killed") or all passed ("survived"). It works on a copy of the repository in a temporary folder,
so the sources here are never touched.

    python benchmarks/mutation.py [--quick | --only MODULE...] [--keep DIR [--checked]]  # --quick: five roi functions

Survivors that cannot be killed because they do not change behaviour are listed, with the reason, in
`benchmarks/mutation_equivalent.json` (keyed by mutant name and the mutated line, so an entry goes stale when
the code changes), or recognised as equivalent by rule (`reshape(-1)` -> `reshape(-2)`: numpy reads any negative
size as "infer"). Survivors that only change or drop a `device=` argument are counted apart as untestable here (every
tensor is on the CPU: only a run on a GPU tests them).
score = (killed + timeout) / (mutants - equivalent - device); "no tests" mutants count as survivors.
Survivors that only change the text of an error message or a reason are counted apart (a second score without
them is printed) and not listed.
Prints one line per module, then `RESULT mutants=… killed=… survived=… score=…`; writes the survivors' diffs to
`benchmarks/results/mutation_survivors.md`. Not part of CI (the full run: 53 minutes on 2 cores, 2026-12-04).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._cli import parser  # noqa: E402

# the keys of the last line, `RESULT key=value …` (checked by tests/test_benchmark_scripts.py)
RESULT_KEYS = ("mutants", "killed", "survived", "equivalent", "device", "score")

EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.json"
SURVIVORS = ROOT / "benchmarks" / "results" / "mutation_survivors.md"

# module -> the fast test files that exercise it (mutmut runs, per mutant, only those tests that call the function)
MODULES: dict[str, list[str]] = {
    "sdrpn_core/roi.py": ["tests/test_roi.py", "tests/test_properties.py"],
    "sdrpn_core/pseudo_labels.py": ["tests/test_pseudo_labels.py", "tests/test_properties.py"],
    "sdrpn_core/metrics.py": ["tests/test_metrics.py", "tests/test_properties.py"],
    "sdrpn_core/rpn.py": ["tests/test_rpn.py", "tests/test_qwen.py"],
    "sdrpn_core/infer.py": ["tests/test_infer.py", "tests/test_batched.py", "tests/test_qwen.py", "tests/test_rpn.py"],
    "sdrpn_core/batched.py": ["tests/test_batched.py", "tests/test_infer.py", "tests/test_qwen.py"],
    "sdrpn_core/teacher.py": ["tests/test_teacher.py", "tests/test_qwen.py"],
    "storage/sharded.py": ["tests/test_storage.py", "tests/test_sharded.py"],
    "sdrpn_core/calibrate.py": ["tests/test_calibrate.py"],
    "stages/evaluate.py": ["tests/test_stage_evaluate.py"],
    "stages/release.py": ["tests/test_stage_release.py"],
}
# --quick: five small functions of roi.py (about 60 mutants, under a minute), to see that the setup works
QUICK = ["sdrpn_core/roi.py"]
QUICK_MUTANTS = [
    f"sdrpn_core.roi.x_{f}__mutmut_*"
    for f in ("sigmoid", "gaussian_kernel1d", "tight_box", "check_mode", "resize_mask")
]
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
    lines += ["pytest_add_cli_args=-p\n    benchmarks._mutation_order"]  # each mutant's tests fastest first
    lines += ["also_copy=" + "\n    ".join(p for p in PACKAGES if (dest / p).exists())]
    # torch and polars keep thread pools that a forked worker cannot use: fork each worker from a clean server
    lines += ["process_isolation=forkserver"]
    # log lines are not behaviour; their text is not worth a mutant
    lines += [r"do_not_mutate_patterns=^\s*log\.(debug|info|warning|error)\("]
    (dest / "setup.cfg").write_text("\n".join(lines) + "\n")


def mutmut(dest: Path, *args: str, log=None) -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        raise SystemExit('mutmut is not installed: pip install -e ".[mutation]"')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(
        [str(exe), *args], cwd=dest, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
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


def changed_lines(diff: str) -> tuple[str, str]:
    """The first removed and the first added line of a mutant's diff."""
    lines = diff.splitlines()
    minus = next((ln[1:].strip() for ln in lines if ln.startswith("-") and not ln.startswith("---")), "")
    plus = next((ln[1:].strip() for ln in lines if ln.startswith("+") and not ln.startswith("+++")), "")
    return minus, plus


_MESSAGE = re.compile(r"""(reason=|Error\(|Rejection\([^,]+, )(f?)("[^"]*"|'[^']*')""")


def _message_variants(line: str) -> set[str]:
    """The line with its message literal (after `reason=`, `…Error(`, or a Rejection's reason) rewritten as mutmut
    rewrites strings: wrapped in XX, upper- or lower-cased, or None."""
    out = set()
    for m in _MESSAGE.finditer(line):
        _, f, lit = m.groups()
        q, body = lit[0], lit[1:-1]
        for new in (f"{f}{q}XX{body}XX{q}", f"{f}{q}{body.upper()}{q}", f"{f}{q}{body.lower()}{q}", "None"):
            out.add(line[: m.start(3) - len(f)] + new + line[m.end(3) :])
    return out


def _without_device(line: str) -> str:
    """The line with every `device=…` argument (and a positional `.to(x.device)`) removed, spaces dropped."""
    out, i = [], 0
    while i < len(line):
        if line.startswith("device=", i):
            depth, i = 0, i + len("device=")
            while i < len(line) and not (depth == 0 and line[i] in ",)]}"):
                depth += (line[i] in "([{") - (line[i] in ")]}")
                i += 1
            continue
        out.append(line[i])
        i += 1
    text = re.sub(r"\.to\((None|[\w.]+\.device)\)", ".to()", "".join(out).replace(" ", ""))
    return re.sub(r",+(?=[)\]}])", "", text).replace(",,", ",").replace("(,", "(")


def category(minus: str, plus: str) -> str:
    """'equivalent' for a rewrite numpy cannot tell apart, 'device' where only a `device=` argument changed or went
    (every tensor is on the CPU here: a GPU run is the only test), 'message' where only the text of an error message
    or a reason changed, else 'behaviour'."""
    if minus.replace("reshape(-1)", "reshape(-2)") == plus:
        return "equivalent"  # numpy reads any negative size as "infer this dimension"
    if plus != minus and "device" in minus and _without_device(plus) == _without_device(minus):
        return "device"
    if plus != minus and plus in _message_variants(minus):
        return "message"
    return "behaviour"


def load_equivalent() -> dict[str, dict]:
    if not EQUIVALENT.exists():
        return {}
    return {e["mutant"]: e for e in json.loads(EQUIVALENT.read_text())}


def module_of(name: str, modules: list[str]) -> str:
    return next(m for m in modules if name.startswith(m[:-3].replace("/", ".") + "."))


def report(dest: Path, modules: list[str], status: dict[str, str], out: Path = SURVIVORS) -> dict[str, int]:
    """Sort the survivors (listed equivalent, automatically equivalent, message text, behaviour), print a line per
    module and write the behaviour survivors' diffs to SURVIVORS."""
    listed = load_equivalent()
    counts: Counter = Counter()
    rows, stale = [], []
    names = sorted(k for k, v in status.items() if v not in KILLED)
    with ThreadPoolExecutor(max_workers=4) as pool:  # `mutmut show` is a process each: ~0.7 s
        diffs = dict(zip(names, pool.map(lambda n: mutmut(dest, "show", n), names), strict=True))
    for name in names:
        diff = diffs[name]
        minus, plus = changed_lines(diff)
        entry = listed.get(name)
        if entry and entry.get("line") == plus:
            counts["equivalent"] += 1
            continue
        if entry:
            stale.append(name)
        kind = category(minus, plus)
        counts[kind] += 1
        if kind == "behaviour":
            rows.append(f"### {name} ({status[name]})\n\n```diff\n{diff.strip()}\n```\n")
    per_module: dict[str, Counter] = {m: Counter() for m in modules}
    for name, st in status.items():
        per_module[module_of(name, modules)][st] += 1
    for m, c in per_module.items():
        print(f"{m:32s} " + "  ".join(f"{k}={v}" for k, v in sorted(c.items())))
    if stale:
        print(f"{len(stale)} equivalence entries are stale (the mutated line changed): {', '.join(stale[:5])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# Surviving mutants that change behaviour ({len(rows)})\n\n"
        "Written by `python benchmarks/mutation.py` (message-text and equivalent survivors are counted, not listed);\n"
        "see `mutation.md` for the summary.\n\n" + "\n".join(rows)
    )
    killed = sum(v in KILLED for v in status.values())
    return {"mutants": len(status), "killed": killed, **counts}


def smoke() -> None:
    """What rots here runs no mutant: the modules and test files named, the equivalence list, the config."""
    missing = [p for m, tests in MODULES.items() for p in (m, *tests) if not (ROOT / p).exists()]
    if missing:
        raise SystemExit(f"named in MODULES but missing: {', '.join(missing)}")
    listed = json.loads(EQUIVALENT.read_text())
    with tempfile.TemporaryDirectory() as d:
        write_config(Path(d), list(MODULES))
        config = (Path(d) / "setup.cfg").read_text()
    installed = Path(sys.executable).with_name("mutmut").exists()
    print(f"{len(MODULES)} modules, {len(listed)} equivalent mutants listed, config {len(config)} bytes; "
          f"mutmut {'installed' if installed else 'not installed (make mutation installs it)'}")  # fmt: skip
    print("RESULT mutants=0 killed=0 survived=0 equivalent=0 device=0 score=0.000")


def main() -> None:
    p = parser(__doc__, "five small functions of roi.py (about 60 mutants)")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (mutmut browse / show there)")
    p.add_argument("--only", nargs="+", choices=list(MODULES), help="these modules only (while writing tests)")
    p.add_argument(
        "--checked", action="store_true", help="with --keep of a run stopped early: report its checked mutants alone"
    )
    args = p.parse_args()
    if args.smoke:
        return smoke()
    modules = args.only or (QUICK if args.quick else list(MODULES))
    dest = args.keep or Path(tempfile.mkdtemp(prefix="sdrpn-mutation-"))
    t0 = time.perf_counter()
    try:
        if not (dest / "mutants").exists():
            copy_repo(dest)
            write_config(dest, modules)
            names = QUICK_MUTANTS if args.quick else []
            with open(dest / "mutmut.log", "w") as log:
                mutmut(dest, "run", "--max-children", str(os.cpu_count() or 2), *names, log=log)
        partial = args.quick or args.only or args.checked
        out = SURVIVORS.with_name("mutation_survivors_partial.md") if partial else SURVIVORS
        status = statuses(dest, modules)
        if args.quick:
            status = {k: v for k, v in status.items() if any(fnmatch.fnmatchcase(k, n) for n in QUICK_MUTANTS)}
        if args.checked:  # a stopped run: what it did not reach is neither killed nor a survivor
            unchecked = sum(v == "not checked" for v in status.values())
            status = {k: v for k, v in status.items() if v != "not checked"}
            print(f"{unchecked} mutants not checked (the run was stopped): left out of every count below")
        counts = report(dest, modules, status, out)
    finally:
        if not args.keep:
            shutil.rmtree(dest, ignore_errors=True)
    equivalent, device, message, behaviour = (
        counts.get(k, 0) for k in ("equivalent", "device", "message", "behaviour")
    )
    scored = counts["mutants"] - equivalent - device
    score = counts["killed"] / max(scored, 1)
    behaviour_score = counts["killed"] / max(scored - message, 1)
    print(
        f"{time.perf_counter() - t0:.0f} s; survivors: {equivalent} equivalent, {device} changing only a device "
        f"(untestable without a GPU), {message} changing only a message's text, {behaviour} changing behaviour "
        f"(listed in {out.relative_to(ROOT)})"
    )
    print(f"score without the message-text mutants: {behaviour_score:.3f}")
    print(
        f"RESULT mutants={counts['mutants']} killed={counts['killed']} survived={message + behaviour} "
        f"equivalent={equivalent} device={device} score={score:.3f}"
    )


if __name__ == "__main__":
    main()
