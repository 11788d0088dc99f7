"""``pagedllm generate [MODEL] --prompt ...``: offline generation from the command line."""

from __future__ import annotations

import argparse
import sys

from pagedllm.entrypoints.engine_args import add_engine_args, engine_config_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``generate`` sub-command."""
    parser = subparsers.add_parser("generate", help="generate completions for prompts")
    add_engine_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--sampling-seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    return parser


def run(args: argparse.Namespace) -> int:
    """Generate and print each completion after its prompt."""
    from pagedllm.core.sampling_params import SamplingParams
    from pagedllm.entrypoints.llm import LLM

    config = engine_config_from_args(args)
    llm = LLM.from_config(config)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, n=args.n, seed=args.sampling_seed, ignore_eos=args.ignore_eos)
    for output in llm.generate(args.prompt, params, use_tqdm=False):
        for completion in output.outputs:
            sys.stdout.write(f"{output.prompt}{completion.text}\n")
            sys.stdout.write(f"--- [{completion.finish_reason}, {len(completion.token_ids)} tokens]\n")
    llm.llm_engine.shutdown()
    return 0
