"""``pagedllm bench latency``: time to first token and time per output token of one small batch,
pagedllm vs transformers in one run, against the weight-read floor of the device. With ``--speculative-config``
both run prompt-lookup speculative decoding: pagedllm its ngram drafts, transformers ``generate`` with
``prompt_lookup_num_tokens`` (batch 1 only), and pagedllm's draft acceptance is reported."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagedllm.bench.common import (
    BenchResult,
    add_common_args,
    backends_of,
    engine_settings,
    hardware,
    make_llm,
    report,
)
from pagedllm.bench.hf_runner import load_hf_model, release_device_memory, weight_bytes
from pagedllm.bench.workloads import BenchRequest, make_workload
from pagedllm.core.spec_decode import SpeculativeConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench latency``."""
    parser = subparsers.add_parser("latency", help="batch latency per output token, pagedllm vs transformers")
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--num-iters-warmup", type=int, default=1)
    return parser


def copy_bandwidth_bytes_per_s(device: torch.device, sync: callable, num_bytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written count once each way: read bytes/s)."""
    src = torch.empty(num_bytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - start)
    del src, dst
    # a copy reads and writes each byte: count both, as a weight read is a pure read
    return 2 * num_bytes / min(times)


def _time_pagedllm(args: argparse.Namespace, requests: list[BenchRequest]
                   ) -> tuple[float, float, torch.device, dict[str, str]]:
    from pagedllm.core.heap import frozen_heap
    from pagedllm.core.sampling_params import SamplingParams

    llm = make_llm(args)
    engine = llm.llm_engine
    prompts = [r.prompt_token_ids for r in requests]
    sync = engine.backend_cls().synchronize
    full = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    ttfts, tpots = [], []
    with frozen_heap(args.gc_freeze):
        for i in range(args.num_iters_warmup + args.num_iters):
            sync()
            outputs = llm.generate(prompts, full, use_tqdm=False)
            if i >= args.num_iters_warmup:
                m = outputs[0].metrics
                ttfts.append(m.first_token_time - m.arrival_time)
                tpots.append((m.last_token_time - m.first_token_time) / (args.output_len - 1))
    device = engine.device
    stats = engine.stats()
    extra = {}
    if stats.spec_decode_num_draft_tokens:
        extra["draft_acceptance"] = f"{stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_draft_tokens:.2f}"
    engine.shutdown()
    del llm, engine
    release_device_memory(device)
    return statistics.median(ttfts), statistics.median(tpots), device, extra


def _time_hf(args: argparse.Namespace, model_path: str, dtype: torch.dtype, requests: list[BenchRequest],
             device: torch.device, sync: callable) -> tuple[float, float]:
    model = load_hf_model(model_path, dtype, device, args.load_format == "dummy", args.hf_dummy_init)
    ids = torch.tensor([r.prompt_token_ids for r in requests], device=device)
    lookup = {}
    if args.speculative_config:  # transformers' prompt lookup decoding, with the same draft count and n-gram
        spec = SpeculativeConfig.from_dict(args.speculative_config)
        if len(requests) != 1:
            raise ValueError("--speculative-config with --backend hf needs --batch-size 1 (transformers' prompt "
                             "lookup decodes one sequence)")
        lookup = {"prompt_lookup_num_tokens": spec.num_speculative_tokens,
                  "max_matching_ngram_size": spec.prompt_lookup_max}

    def timed(new_tokens: int) -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=0, **lookup)
        sync()
        return time.perf_counter() - start

    for _ in range(args.num_iters_warmup):
        timed(args.output_len)
    ttft = statistics.median(timed(1) for _ in range(args.num_iters))
    full = statistics.median(timed(args.output_len) for _ in range(args.num_iters))
    return ttft, (full - ttft) / (args.output_len - 1)


def run(args: argparse.Namespace) -> int:
    """Time both engines, print TTFT and per-token latency, and the per-token floor."""
    from pagedllm.backends.registry import get_registry
    from pagedllm.core.config import EngineConfig, load_model_config

    names = backends_of(args)
    model_config = load_model_config(args.model or EngineConfig().resolved_model(), args.dtype, args.max_model_len)
    args.num_prompts, args.dataset, args.workload_seed = args.batch_size, "fixed", 0
    requests = make_workload(args, model_config.vocab_size)
    backend = get_registry().resolve_backend(args.device)()
    device = backend.device()
    results: list[BenchResult] = []
    tokens = args.batch_size * (args.input_len + args.output_len)
    if "pagedllm" in names:
        ttft, tpot, device, spec_extra = _time_pagedllm(args, requests)
        elapsed = ttft + tpot * (args.output_len - 1)
        results.append(BenchResult("pagedllm", elapsed, args.batch_size / elapsed,
                                   args.batch_size * args.output_len / elapsed, tokens / elapsed,
                                   {"ttft_ms": f"{1e3 * ttft:.1f}", "per_token_ms": f"{1e3 * tpot:.2f}",
                                    **spec_extra}))
    if "hf" in names:
        ttft, tpot = _time_hf(args, model_config.path, model_config.dtype, requests, device, backend.synchronize)
        elapsed = ttft + tpot * (args.output_len - 1)
        results.append(BenchResult("hf", elapsed, args.batch_size / elapsed,
                                   args.batch_size * args.output_len / elapsed, tokens / elapsed,
                                   {"ttft_ms": f"{1e3 * ttft:.1f}", "per_token_ms": f"{1e3 * tpot:.2f}"}))
    weights = weight_bytes(model_config.path, model_config.dtype)
    bandwidth = copy_bandwidth_bytes_per_s(device, backend.synchronize)
    floor_ms = 1e3 * weights / bandwidth
    lines = [f"workload: batch {args.batch_size}, {args.input_len} input tokens, {args.output_len} output tokens",
             f"model: {model_config.path} ({model_config.dtype}, {weights / 1e9:.2f} GB of weights read per one-token "
             f"step)",
             engine_settings(args),
             f"hardware: {hardware(device)}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
             f"weight-read floor {floor_ms:.2f} ms per decode step"]
    stored_floor_ms = None
    quantization = getattr(args, "resolved_quantization", None) or args.quantization
    if quantization:  # pagedllm's weights as stored: the floor its own reads set
        w4a16 = model_config.w4a16
        group_size = w4a16.group_size if w4a16 is not None and w4a16.group_size > 0 else 128
        stored = weight_bytes(model_config.path, model_config.dtype, quantization, group_size)
        stored_floor_ms = 1e3 * stored / bandwidth
        lines.append(f"pagedllm's weights with quantization={quantization}: {stored / 1e9:.2f} GB, "
                     f"read floor {stored_floor_ms:.2f} ms per decode step (x_floor_stored)")
    for r in results:
        per_token = float(r.extra["per_token_ms"])
        r.extra["x_floor"] = f"{per_token / floor_ms:.2f}"
        if stored_floor_ms is not None and r.engine == "pagedllm":
            r.extra["x_floor_stored"] = f"{per_token / stored_floor_ms:.2f}"
    report("pagedllm bench latency", lines, results, args.output_json)
    return 0
