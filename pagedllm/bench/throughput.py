"""``pagedllm bench throughput``: an offline workload through pagedllm and transformers in one run."""

from __future__ import annotations

import argparse
import time

import numpy as np
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
from pagedllm.bench.hf_runner import kv_bytes_per_token, load_hf_model, release_device_memory, run_hf
from pagedllm.bench.workloads import BenchRequest, add_workload_args, describe, make_workload
from pagedllm.core.lora.request import LoRARequest, check_adapter, read_adapter_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench throughput``."""
    parser = subparsers.add_parser("throughput", help="offline throughput, pagedllm vs transformers")
    add_common_args(parser)
    add_workload_args(parser, num_prompts=1000, input_len=512, output_len=128)
    parser.add_argument("--hf-num-prompts", type=int, default=None,
                        help="run transformers on a random sample of this many of the workload's requests (its "
                             "static batches are slow on long-tailed lengths); rates are compared, and the "
                             "sample is described in the output")
    parser.add_argument("--lora-path", default=None,
                        help="a PEFT LoRA adapter directory every request runs with (needs --enable-lora): request i "
                             "names adapter id i %% max_loras + 1, all read from these files, as vLLM's "
                             "benchmark_throughput does; transformers applies it through PEFT")
    return parser


def lora_requests(args: argparse.Namespace, num: int) -> list[LoRARequest | None]:
    """Each request's adapter (see ``--lora-path``), or ``[None] * num`` without one. Raises ValueError when
    ``--lora-path`` comes without ``--enable-lora`` or is not an adapter the engine can take."""
    if args.lora_path is None:
        return [None] * num
    if not args.enable_lora:
        raise ValueError("--lora-path needs --enable-lora")
    slots = max(args.max_loras, 1)
    requests = [LoRARequest(f"lora{i + 1}", i + 1, args.lora_path) for i in range(slots)]
    check_adapter(requests[0], args.max_lora_rank)  # a missing, unsupported or too-wide adapter fails here
    return [requests[i % slots] for i in range(num)]


def describe_lora(args: argparse.Namespace) -> list[str]:
    """The workload line naming the adapter, or [] without one."""
    if args.lora_path is None:
        return []
    adapter = read_adapter_config(args.lora_path)
    return [f"LoRA: every request with {args.lora_path} (rank {adapter.r}, {', '.join(adapter.target_modules)}), "
            f"adapter ids 1..{max(args.max_loras, 1)} in turn"]


def hf_sample(requests: list[BenchRequest], num: int | None, seed: int) -> list[BenchRequest]:
    """The requests transformers runs: all of them, or ``num`` drawn without replacement (seeded), in
    workload order."""
    if num is None or num >= len(requests):
        return requests
    if num < 1:
        raise ValueError(f"--hf-num-prompts must be >= 1, got {num}")
    picked = np.sort(np.random.default_rng(seed).choice(len(requests), size=num, replace=False))
    return [requests[i] for i in picked]


def _totals(requests: list[BenchRequest]) -> tuple[int, int]:
    return sum(len(r.prompt_token_ids) for r in requests), sum(r.output_len for r in requests)


def _result(engine: str, elapsed: float, requests: list[BenchRequest], extra: dict[str, object]) -> BenchResult:
    num_in, num_out = _totals(requests)
    return BenchResult(engine, elapsed, len(requests) / elapsed, num_out / elapsed, (num_in + num_out) / elapsed,
                       extra)


def run_pagedllm(args: argparse.Namespace, requests: list[BenchRequest],
                 loras: list[LoRARequest | None]) -> tuple[BenchResult, torch.device]:
    """Run the workload through pagedllm (warmed up), request ``i`` with adapter ``loras[i]``
    (:func:`lora_requests`); returns the result and the engine's device."""
    from pagedllm.core.heap import GcPauses, frozen_heap
    from pagedllm.core.sampling_params import RequestOutputKind, SamplingParams

    llm = make_llm(args)
    engine = llm.llm_engine
    llm.generate([r.prompt_token_ids for r in requests[:4]], SamplingParams(temperature=0, max_tokens=4,
                 ignore_eos=True), use_tqdm=False, lora_request=loras[:4])  # fmt: skip
    device = engine.device
    final = RequestOutputKind.FINAL_ONLY  # as LLM.generate: no per-token output snapshots
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True, output_kind=final)
              for r in requests]
    peak_waste = 0.0

    with frozen_heap(args.gc_freeze), GcPauses() as gc_pauses:
        for r, p, lora in zip(requests, params, loras, strict=True):
            engine.add_request(None, r.prompt_token_ids, p, lora_request=lora)
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
             "peak_kv_waste": f"{100 * peak_waste:.2f}%", "gc": gc_pauses.summary()}
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
    loras = lora_requests(args, len(requests))  # --lora-path checked before any engine starts
    backend = get_registry().resolve_backend(args.device)()
    device = backend.device()
    results: list[BenchResult] = []
    if "pagedllm" in names:
        result, device = run_pagedllm(args, requests, loras)
        results.append(result)
        # printed at once too, so a run stopped during the (slower) peer still records pagedllm's figure
        print(f"pagedllm: {result.elapsed_s:.2f} s, {result.total_tokens_per_s:.1f} total tok/s "
              f"{' '.join(f'{k}={v}' for k, v in result.extra.items())}", flush=True)
    lines = [f"workload: {args.dataset}: {describe(requests)}", *describe_lora(args)]
    if "hf" in names:
        hf_requests = hf_sample(requests, args.hf_num_prompts, args.workload_seed)
        extra: dict[str, object] = {}
        if hf_requests is not requests:
            lines.append(f"transformers runs a random sample: {describe(hf_requests)}")
            extra["sample"] = f"{len(hf_requests)}/{len(requests)}"
        if args.lora_path:
            extra["lora"] = "peft"
        dummy = args.load_format == "dummy"
        model = load_hf_model(model_config.path, model_config.dtype, device, dummy, args.hf_dummy_init,
                              args.lora_path)
        if dummy:
            extra["init"] = args.hf_dummy_init
        kv_budget_tokens = backend.memory_info()[0] // kv_bytes_per_token(model_config)
        hf = run_hf(model, hf_requests, device, args.hf_batch_size, backend.synchronize, kv_budget_tokens)
        results.append(_result("hf", hf.elapsed_s, hf_requests, {"batch_size": hf.batch_size, **extra}))
    report("pagedllm bench throughput", [*lines,
                                          f"model: {model_config.path} ({model_config.dtype}, load {args.load_format})",
                                          engine_settings(args),
                                          f"hardware: {hardware(device)}"], results, args.output_json)
    return 0
