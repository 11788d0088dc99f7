"""Pieces shared by the offline benchmarks: engine construction, hardware description, result lines."""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict, dataclass

import torch

from pagedllm.entrypoints.engine_args import add_engine_args, engine_config_from_args


@dataclass(slots=True)
class BenchResult:
    """One engine's figures on one workload."""

    engine: str
    elapsed_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    extra: dict[str, object]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Engine options plus ``--backend pagedllm,hf`` and ``--output-json``."""
    add_engine_args(parser, model_positional=False)
    parser.add_argument("--backend", default="pagedllm,hf",
                        help="comma-separated engines to run on the same workload: pagedllm, hf")
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help="transformers static batch size (default: the largest power of two that fits, "
                             "starting from one batch for the whole workload)")
    parser.add_argument("--hf-dummy-init", choices=["transformers", "pagedllm"], default="transformers",
                        help="with --load-format dummy, how transformers' weights are drawn: its own initialization, "
                             "or pagedllm's dummy fill (every parameter uniform in [-0.01, 0.01])")
    parser.add_argument("--output-json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=True,
                        help="freeze the Python heap the engine's start built (gc.freeze) while timing pagedllm, as "
                             "`pagedllm serve` does for its life; --no-gc-freeze leaves full collections scanning it")


def hardware(device: torch.device) -> str:
    """The accelerator's name (or the CPU's), and software versions."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and module is not None and hasattr(module, "get_device_name"):
        name = module.get_device_name(device)
    return f"{name} ({device.type}); torch {torch.__version__}, {torch.get_num_threads()} CPU threads"


def engine_settings(args: argparse.Namespace) -> str:
    """pagedllm's settings that change its figures, as one report line."""
    spec = getattr(args, "speculative_config", None)
    return (f"pagedllm engine: tensor_parallel_size={args.tensor_parallel_size}, max_num_seqs={args.max_num_seqs}, "
            f"max_num_batched_tokens={args.max_num_batched_tokens or 'auto'}, "
            f"enforce_eager={args.enforce_eager}, kv_cache_dtype={args.kv_cache_dtype}, "
            f"quantization={getattr(args, 'resolved_quantization', args.quantization)}, "
            f"async_scheduling={ {True: 'on', False: 'off', None: 'auto'}[args.async_scheduling] }"
            + (f", speculative_config={json.dumps(spec)}" if spec else "")
            + (f", enable_lora (max_loras={args.max_loras}, max_lora_rank={args.max_lora_rank})"
               if getattr(args, "enable_lora", False) else ""))


def make_llm(args: argparse.Namespace) -> object:
    """The pagedllm ``LLM`` for the benchmark's engine options; ``args.async_scheduling``, ``max_num_seqs``
    and ``max_num_batched_tokens`` become the settings the engine resolved for its backend, and
    ``args.resolved_quantization`` the quantization it runs (a checkpoint stored in fp8 sets it; ``args.quantization``
    stays what was asked, which the transformers runner follows): the report prints what ran."""
    from pagedllm.entrypoints.llm import LLM

    llm = LLM.from_config(engine_config_from_args(args))
    engine = llm.llm_engine
    args.async_scheduling = engine.config.async_scheduling
    args.max_num_seqs, args.max_num_batched_tokens = engine.config.max_num_seqs, engine.max_num_batched_tokens
    args.resolved_quantization = engine.config.quantization
    return llm


def backends_of(args: argparse.Namespace) -> list[str]:
    """The engines asked for, validated."""
    names = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = set(names) - {"pagedllm", "hf"}
    if unknown or not names:
        raise ValueError(f"--backend takes pagedllm and/or hf, got {args.backend!r}")
    return names


def report(title: str, lines: list[str], results: list[BenchResult], output_json: str | None) -> None:
    """Print the workload lines, each engine's figures and the pagedllm/hf ratios; optionally dump JSON."""
    print(f"== {title} ==")
    for line in lines:
        print(line)
    for r in results:
        extra = " ".join(f"{k}={v}" for k, v in r.extra.items())
        print(f"{r.engine:>9}: {r.elapsed_s:8.2f} s  {r.requests_per_s:8.2f} req/s  "
              f"{r.output_tokens_per_s:10.1f} output tok/s  {r.total_tokens_per_s:10.1f} total tok/s  {extra}")
    by_name = {r.engine: r for r in results}
    if "pagedllm" in by_name and "hf" in by_name:
        ratio = by_name["pagedllm"].total_tokens_per_s / by_name["hf"].total_tokens_per_s
        print(f"    ratio: pagedllm / hf = {ratio:.2f}x (total tokens/s)")
    if output_json:
        with open(output_json, "w") as f:
            json.dump({"title": title, "lines": lines, "results": [asdict(r) for r in results]}, f, indent=2)
