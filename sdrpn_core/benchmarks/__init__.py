"""Benchmark readers, one module per benchmark, and a registry by name. Readers take any fsspec URL to the files
a user downloads (the official or lmms-lab layouts) and return (samples, rejected rows with reasons)."""

from __future__ import annotations

from sdrpn_core.benchmarks import chartqa, docvqa, hrbench, mix665k, ocrbench, pope, synthetic, textvqa, vstar
from sdrpn_core.benchmarks.base import Benchmark, BenchmarkSample

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        textvqa.BENCHMARK,
        docvqa.DOCVQA,
        docvqa.INFOVQA,
        chartqa.BENCHMARK,
        ocrbench.BENCHMARK,
        vstar.BENCHMARK,
        pope.BENCHMARK,
        hrbench.HRBENCH_4K,
        hrbench.HRBENCH_8K,
        mix665k.BENCHMARK,
        synthetic.BENCHMARK,
    )
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkSample", "get_benchmark"]
