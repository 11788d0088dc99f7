"""Where the time of the throughput workload goes, step by step, as ``bench throughput`` runs it.

Runs ``--num-prompts`` prompts of ``--input-len`` random tokens generating ``--output-len`` each (the engine
as ``pagedllm bench throughput`` builds it, asynchronous scheduling as the backend resolves it) and records,
for every step: its composition (tokens, decodes, whether it is pure decode, which a decode graph runs), the host
time of its launch (``executor.execute``) and the host time of the whole ``engine.step`` call. From each
step ``S`` of ``--window-start`` (a list), ``--window`` steps run under torch.profiler; from their kernels
it finds the device's busy time against the window's wall time (the device's idle share is time lost to the
host), the kernel table by device time and the time per kernel class (GEMM, attention, norms, ...).

Writes ``steps.json`` and ``summary.json`` under ``--out``, and ``kernels.txt`` and ``trace.json.gz`` under
``--out/windowS`` for each window; prints the summary. Example::

    python benchmarks/tput_step_profile.py --model benchmarks/llama3_8b_config --out /tmp/tprof
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

KERNEL_CLASSES = (  # first match wins; matched against the lower-cased kernel name
    ("prefill attention", ("_prefill",)),
    ("decode attention", ("_decode",)),
    ("fused all-reduce+norm", ("allreduce",)),
    ("norm", ("rms_norm",)),
    ("silu_and_mul", ("silu",)),
    ("rotary", ("rotary",)),
    ("fp8 quantize", ("quantize_rows",)),
    ("kv write", ("kv_cache", "write_kv")),
    ("gemv", ("gemv",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "splitk")),
    ("sampling/argmax", ("argmax", "reduce_kernel", "sort", "softmax")),
)


def kernel_class(name: str) -> str:
    """The class of a kernel name (``KERNEL_CLASSES``), ``other`` if none matches."""
    low = name.lower()
    return next((cls for cls, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")


def busy_time_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def analyse_trace(trace: dict) -> dict:
    """Device busy time, span and time per kernel class from a Chrome trace of torch.profiler."""
    kernels = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
               and "dur" in e]
    if not kernels:
        return {"kernels": 0}
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels]
    span = max(e for _, e in spans) - min(s for s, _ in spans)
    by_class: dict[str, float] = {}
    for e in kernels:
        cls = kernel_class(e["name"]) if e["cat"] == "kernel" else e["cat"]
        by_class[cls] = by_class.get(cls, 0.0) + float(e["dur"])
    busy = busy_time_us(spans)
    return {"kernels": len(kernels), "device_span_ms": round(span / 1e3, 2), "device_busy_ms": round(busy / 1e3, 2),
            "device_idle_share": round(1 - busy / span, 4),
            "ms_by_class": {k: round(v / 1e3, 2) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])}}


def profile_window(engine, backend, num_steps: int, step_ms: list[float], records: list[dict], out: Path) -> dict:
    """Run ``num_steps`` engine steps under torch.profiler (appending their times to ``step_ms``); write the
    kernel table and the trace under ``out``; return the window's wall time, its steps' records and
    :func:`analyse_trace`'s figures."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    backend.synchronize()
    t = time.perf_counter()
    first = len(records)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            s = time.perf_counter()
            engine.step()
            step_ms.append(1e3 * (time.perf_counter() - s))
        backend.synchronize()
    window = {"wall_ms": round(1e3 * (time.perf_counter() - t), 2), "steps": records[first:]}
    (out / "kernels.txt").write_text(prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=60, max_name_column_width=90))
    trace_path = out / "trace.json"
    prof.export_chrome_trace(str(trace_path))
    trace = json.loads(trace_path.read_text())
    with gzip.open(out / "trace.json.gz", "wt") as f:
        json.dump(trace, f)
    trace_path.unlink()
    window.update(analyse_trace(trace))
    return window


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: the backend's")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the backend's")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--quantization", default=None, choices=["fp8", "fp8_block"])
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--window-start", default="10,100",
                        help="first profiled step of each window, comma-separated (the default: a prefill-heavy "
                             "and a pure-decode window under the cuda backend's limits on an H200)")
    parser.add_argument("--window", type=int, default=8, help="profiled steps (0: none)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from pagedllm.core.config import EngineConfig
    from pagedllm.core.sampling_params import RequestOutputKind, SamplingParams
    from pagedllm.entrypoints.llm import LLM

    llm = LLM.from_config(EngineConfig(
        model=args.model, device=args.device, load_format="dummy", max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype))  # fmt: skip
    engine = llm.llm_engine
    backend = engine.backend_cls()
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, vocab, args.input_len).tolist() for _ in range(args.num_prompts)]
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)

    records: list[dict] = []
    execute = engine.executor.execute

    def timed_execute(scheduler_output, *a, **k):
        t = time.perf_counter()
        result = execute(scheduler_output, *a, **k)
        scheduled = scheduler_output.scheduled
        decodes = sum(1 for s in scheduled if s.num_new_tokens == 1)
        records.append(dict(tokens=scheduler_output.num_batched_tokens, requests=len(scheduled), decodes=decodes,
                            pure_decode=decodes == len(scheduled),
                            launch_ms=round(1e3 * (time.perf_counter() - t), 3)))
        return result

    engine.executor.execute = timed_execute
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for p in prompts:
        engine.add_request(None, p, params)
    backend.synchronize()
    step_ms: list[float] = []
    windows: dict[int, dict] = {}
    starts = {int(w) for w in args.window_start.split(",") if w} if args.window else set()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        if len(step_ms) in starts:
            first_step = len(step_ms)
            windows[first_step] = profile_window(engine, backend, args.window, step_ms, records,
                                                 out / f"window{first_step}")
            continue
        s = time.perf_counter()
        engine.step()
        step_ms.append(1e3 * (time.perf_counter() - s))
    elapsed = time.perf_counter() - start
    for r, ms in zip(records, step_ms, strict=False):
        r["step_ms"] = round(ms, 3)
    graph = [r for r in records if r["pure_decode"]]  # the steps a decode graph can run
    mixed = [r for r in records if not r["pure_decode"]]

    def med(rs: list[dict], key: str) -> float:
        return round(statistics.median(r[key] for r in rs), 3) if rs else 0.0

    summary = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "async_scheduling": engine.config.async_scheduling, "run_s": round(elapsed, 2),
        "total_tok_per_s": round(args.num_prompts * (args.input_len + args.output_len) / elapsed, 1),
        "steps": len(records), "pure_decode_steps": len(graph), "mixed_steps": len(mixed),
        "pure_decode_step_ms_median": med(graph, "step_ms"), "pure_decode_launch_ms_median": med(graph, "launch_ms"),
        "mixed_step_ms_median": med(mixed, "step_ms"), "mixed_launch_ms_median": med(mixed, "launch_ms"),
        "mixed_tokens_median": med(mixed, "tokens"), "mixed_decodes_median": med(mixed, "decodes"),
        "time_in_pure_decode_steps_s": round(sum(r.get("step_ms", 0) for r in graph) / 1e3, 2),
        "time_in_mixed_steps_s": round(sum(r.get("step_ms", 0) for r in mixed) / 1e3, 2),
        "windows": {first: {**{k: v for k, v in w.items() if k != "steps"},
                            "steps": [{k: r[k] for k in ("tokens", "decodes", "pure_decode", "launch_ms")}
                                      for r in w["steps"]]}
                    for first, w in windows.items()},
    }
    (out / "steps.json").write_text(json.dumps(records))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
