"""``pagedllm bench {serve,throughput,latency}``: each workload kind lives in ``pagedllm.bench.<kind>``."""

from __future__ import annotations

import argparse
import importlib

BENCH_KINDS: tuple[str, ...] = ("serve", "throughput", "latency")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` and the benchmark kinds present in this build."""
    parser = subparsers.add_parser("bench", help="measure throughput and latency")
    kinds = parser.add_subparsers(dest="bench_kind", required=True)
    for kind in BENCH_KINDS:
        try:
            module = importlib.import_module(f"pagedllm.bench.{kind}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pagedllm.bench.{kind}":
                continue
            raise
        module.add_parser(kinds)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark."""
    return int(importlib.import_module(f"pagedllm.bench.{args.bench_kind}").run(args) or 0)
