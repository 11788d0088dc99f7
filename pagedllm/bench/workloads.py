"""Synthetic request workloads shared by the benchmarks: random token ids with fixed lengths, or lengths
drawn like ShareGPT conversations (log-normal, mean ~200 prompt / ~200 output tokens)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

# Log-normal fits giving means near ShareGPT's (~200 in, ~200 out) with its long tail, clipped.
SHAREGPT_INPUT = (np.log(140.0), 0.85)
SHAREGPT_OUTPUT = (np.log(150.0), 0.75)
MIN_LEN, MAX_LEN = 4, 1024


@dataclass(slots=True)
class BenchRequest:
    """One synthetic request: prompt token ids and how many tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int


def add_workload_args(parser: argparse.ArgumentParser, num_prompts: int, input_len: int, output_len: int) -> None:
    """``--dataset fixed|sharegpt``, ``--num-prompts``, ``--input-len``, ``--output-len``, ``--workload-seed``."""
    parser.add_argument("--dataset", choices=["fixed", "sharegpt"], default="fixed",
                        help="fixed lengths, or ShareGPT-like log-normal lengths (mean ~200 in / ~200 out)")
    parser.add_argument("--num-prompts", type=int, default=num_prompts)
    parser.add_argument("--input-len", type=int, default=input_len)
    parser.add_argument("--output-len", type=int, default=output_len)
    parser.add_argument("--workload-seed", type=int, default=0)


def make_workload(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    """Build the requests described by :func:`add_workload_args` options, token ids in ``[10, vocab)``."""
    rng = np.random.default_rng(args.workload_seed)
    n = args.num_prompts
    if args.dataset == "sharegpt":
        inputs = np.clip(rng.lognormal(*SHAREGPT_INPUT, size=n), MIN_LEN, MAX_LEN).astype(int)
        outputs = np.clip(rng.lognormal(*SHAREGPT_OUTPUT, size=n), MIN_LEN, MAX_LEN).astype(int)
    else:
        inputs = np.full(n, args.input_len)
        outputs = np.full(n, args.output_len)
    low = min(10, vocab_size - 1)
    return [BenchRequest(rng.integers(low, vocab_size, size=int(i)).tolist(), int(o))
            for i, o in zip(inputs, outputs, strict=True)]


def describe(requests: list[BenchRequest]) -> str:
    """One line: count and input/output length statistics."""
    ins = np.array([len(r.prompt_token_ids) for r in requests])
    outs = np.array([r.output_len for r in requests])
    return (f"{len(requests)} requests; input tokens mean {ins.mean():.0f} (min {ins.min()}, max {ins.max()}); "
            f"output tokens mean {outs.mean():.0f} (min {outs.min()}, max {outs.max()})")
