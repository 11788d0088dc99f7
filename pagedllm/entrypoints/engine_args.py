"""Command-line options shared by every command that builds an engine, mapped onto :class:`EngineConfig`."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from pagedllm.core.config import KV_CACHE_DTYPES, QUANTIZATIONS, SCHEDULING_POLICIES, W4A16_NAMES, EngineConfig
from pagedllm.core.reasoning import REASONING_TAGS


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device NAME|auto``: the backend plugin to run on (authoritative; ``auto`` picks one)."""
    parser.add_argument("--device", default="auto",
                        help="backend to run on: a name from `pagedllm backends` (cpu, cuda, ...) or auto")


def add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = True) -> None:
    """Add the model and engine options (vLLM's names) to ``parser``."""
    if model_positional:
        parser.add_argument("model", nargs="?", default=None,
                            help="local Hugging Face checkpoint directory (default: the built-in demo model)")
    else:
        parser.add_argument("--model", default=None, help="local checkpoint directory (default: demo model)")
    add_device_arg(parser)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    kv_choices = ["auto", *(name for name in KV_CACHE_DTYPES if name not in ("float", "half"))]  # no aliases
    parser.add_argument("--kv-cache-dtype", default="auto", choices=kv_choices,
                        help="the KV cache's storage dtype: auto (the model's) or one the backend claims, e.g. "
                             "fp8 (float8_e4m3fn: half the bytes of bf16, twice the tokens)")
    parser.add_argument("--quantization", default=None, choices=[*QUANTIZATIONS, *W4A16_NAMES],
                        help="run the projections quantized where the backend claims it: e4m3 weights (quantized "
                             "once loaded) with per-row scales and inputs quantized per token (fp8), or with "
                             "128 x 128 tile scales and inputs quantized per 128 features (fp8_block); 4-bit "
                             "weights in groups of 128 with 16-bit inputs (w4a16); a checkpoint stored quantized "
                             "(fp8, or 4-bit AWQ, GPTQ or compressed-tensors: its config.json's "
                             "quantization_config) runs so without it (awq, gptq and compressed-tensors name those)")
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="most running requests (default: the backend's, e.g. 1024 on GPUs of 70 GiB or more)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    parser.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="schedule and launch each step before the previous one's tokens are read back "
                             "(host work overlaps the device; with -tp, the mp executor only). Default: on "
                             "for backends whose device runs apart from the host (cuda), off otherwise")
    parser.add_argument("--scheduling-policy", default="fcfs", choices=list(SCHEDULING_POLICIES),
                        help="fcfs: requests run in arrival order; priority: by each request's priority (lower "
                             "first, then arrival), the lowest preempted first when the KV pool runs dry")
    parser.add_argument("--reasoning-parser", default=None, choices=list(REASONING_TAGS),
                        help="a reasoning model's thinking markup (<think>...</think>): structured outputs apply "
                             "to the answer after it, and the server puts a chat reply's thinking in its "
                             "reasoning field. deepseek_r1: the reply thinks from its start (DeepSeek-R1, QwQ, "
                             "Qwen3 Thinking); qwen3: only a reply that opens with <think> (Qwen3)")
    parser.add_argument("--speculative-config", type=json_object, default=None, metavar="JSON",
                        help='speculative decoding by prompt lookup, as vLLM\'s: {"method": "ngram", '
                             '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}')
    parser.add_argument("--enable-lora", action="store_true",
                        help="let requests name a PEFT LoRA adapter (--lora-modules, or LoRARequest offline)")
    parser.add_argument("--max-loras", type=int, default=1, help="adapters running at once (with --enable-lora)")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank accepted")
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--distributed-executor-backend", default="mp", choices=["mp", "ray"])


def json_object(text: str) -> dict:
    """An option's JSON object (argparse ``type``): a clear error for anything else."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build an :class:`EngineConfig` from parsed options (fields absent from ``args`` keep defaults);
    options added by plugins go to ``EngineConfig.extra`` and from there to ``Backend.configure``."""
    from pagedllm.backends.registry import PLUGIN_OPTIONS_DEST

    values = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}
    values["extra"] = {dest: getattr(args, dest) for dest in getattr(args, PLUGIN_OPTIONS_DEST, ())}
    return EngineConfig(**values)
