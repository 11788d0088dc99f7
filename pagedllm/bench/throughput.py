"""``pagedllm bench throughput``: an offline workload through pagedllm and transformers in one run."""

from __future__ import annotations

import argparse
import time

import torch

from pagedllm.bench.common import BenchResult, add_common_args, backends_of, hardware, make_llm, report
from pagedllm.bench.hf_runner import load_hf_model, release_device_memory, run_hf
from pagedllm.bench.workloads import BenchRequest, add_workload_args, describe, make_workload


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench throughput``."""
    parser = subparsers.add_parser("throughput", help="offline throughput, pagedllm vs transformers")
    add_common_args(parser)
    add_workload_args(parser, num_prompts=1000, input_len=512, output_len=128)
    return parser


def _totals(requests: list[BenchRequest]) -> tuple[int, int]:
    return sum(len(r.prompt_token_ids) for r in requests), sum(r.output_len for r in requests)


def _result(engine: str, elapsed: float, requests: list[BenchRequest], extra: dict[str, object]) -> BenchResult:
    num_in, num_out = _totals(requests)
    return BenchResult(engine, elapsed, len(requests) / elapsed, num_out / elapsed, (num_in + num_out) / elapsed,
                       extra)


def run_pagedllm(args: argparse.Namespace, requests: list[BenchRequest]) -> tuple[BenchResult, torch.device]:
    """Run the workload through pagedllm (warmed up); returns the result and the engine's device."""
    from pagedllm.core.sampling_params import SamplingParams

    llm = make_llm(args)
    engine = llm.llm_engine
    llm.generate([r.prompt_token_ids for r in requests[:4]],
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    device = engine.device
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    peak_waste = 0.0

    for r, p in zip(requests, params, strict=True):
        engine.add_request(None, r.prompt_token_ids, p)
    engine.backend_cls().synchronize()
    start = time.perf_counter()
    num_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        num_steps += 1
        if num_steps % 16 == 0:
            stats = engine.stats()
            allocated = (stats.num_total_blocks - stats.num_free_blocks) * engine.block_size
            if allocated:
                peak_waste = max(peak_waste, stats.num_wasted_slots / allocated)
    elapsed = time.perf_counter() - start
    extra = {"steps": num_steps, "preemptions": engine.stats().num_preemptions,
             "peak_kv_waste": f"{100 * peak_waste:.2f}%"}
    result = _result("pagedllm", elapsed, requests, extra)
    engine.shutdown()
    del llm, engine
    release_device_memory(device)
    return result, device


def run(args: argparse.Namespace) -> int:
    """Run the chosen engines on the same workload and print both figures and the ratio."""
    from pagedllm.backends.registry import get_registry
    from pagedllm.core.config import EngineConfig, load_model_config

    names = backends_of(args)
    model_config = load_model_config(args.model or EngineConfig().resolved_model(), args.dtype, args.max_model_len)
    requests = make_workload(args, model_config.vocab_size)
    backend = get_registry().resolve_backend(args.device)()
    device = backend.device()
    results: list[BenchResult] = []
    if "pagedllm" in names:
        result, device = run_pagedllm(args, requests)
        results.append(result)
        # printed at once too, so a run stopped during the (slower) peer still records pagedllm's figure
        print(f"pagedllm: {result.elapsed_s:.2f} s, {result.total_tokens_per_s:.1f} total tok/s "
              f"{' '.join(f'{k}={v}' for k, v in result.extra.items())}", flush=True)
    if "hf" in names:
        model = load_hf_model(model_config.path, model_config.dtype, device, args.load_format == "dummy")
        hf = run_hf(model, requests, device, args.hf_batch_size, backend.synchronize)
        results.append(_result("hf", hf.elapsed_s, requests, {"batch_size": hf.batch_size}))
    report("pagedllm bench throughput", [f"workload: {args.dataset}: {describe(requests)}",
                                          f"model: {model_config.path} ({model_config.dtype}, load {args.load_format})",
                                          f"hardware: {hardware(device)}"], results, args.output_json)
    return 0
