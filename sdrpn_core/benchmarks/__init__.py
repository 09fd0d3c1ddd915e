"""Benchmarks, one self-describing module each, registered by name when this package is imported. A module
declares its `Benchmark` (reader, split, prompt, metric, sub-scores, paper columns, τ) and calls `register`;
adding a benchmark is that module and its test."""

from __future__ import annotations

import importlib
import pkgutil

from sdrpn_core.benchmarks.base import Benchmark, BenchmarkSample
from sdrpn_core.registry import Registry

BENCHMARKS: Registry[Benchmark] = Registry("benchmark")
_INFRASTRUCTURE = {"base", "layout", "scoring", "published"}
register = BENCHMARKS.register
get_benchmark = BENCHMARKS.find


for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkSample", "get_benchmark", "register"]
