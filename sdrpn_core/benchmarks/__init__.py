"""Benchmarks, one self-describing module each, registered by name when this package is imported. A module
declares its `Benchmark` (reader, split, prompt, metric, sub-scores, paper columns, τ) and calls `register`;
adding a benchmark is that module and its test."""

from __future__ import annotations

import importlib
import pkgutil

from sdrpn_core.benchmarks.base import Benchmark, BenchmarkSample

BENCHMARKS: dict[str, Benchmark] = {}
_INFRASTRUCTURE = {"base", "layout", "scoring", "published"}


def register(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in BENCHMARKS and BENCHMARKS[benchmark.name] is not benchmark:
        raise ValueError(f"benchmark {benchmark.name!r} is registered twice")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkSample", "get_benchmark", "register"]
