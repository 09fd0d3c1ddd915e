"""What every benchmark script shares: its size flags (`--quick`, `--smoke`)."""

from __future__ import annotations

import argparse

SMOKE_HELP = (
    "tiny sizes, seconds: only checks that the script runs and prints its whole RESULT line "
    "(tests/test_benchmark_scripts.py runs every script this way); its figures mean nothing"
)


def parser(doc: str | None, quick: str) -> argparse.ArgumentParser:
    """The script's argument parser with `--quick` (under a minute, figures still meaningful) and `--smoke`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=quick)
    size.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    return p


def size(args: argparse.Namespace) -> str:
    """ "quick", "smoke" or "full": the key of a script's table of sizes."""
    return "quick" if args.quick else "smoke" if args.smoke else "full"
