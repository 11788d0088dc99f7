"""Benchmarks behind ``pagedllm bench``: one module per workload kind (``serve``, ``throughput``, ``latency``),
each exposing ``add_parser(subparsers)`` and ``run(args) -> int``."""
