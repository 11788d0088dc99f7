"""Where the time of one engine step goes on a GPU: host work vs device work, and the kernels of a step.

Builds an engine on ``--model`` (a config directory, dummy weights) and runs, with timers around each part
of the step (schedule, batch prep and launch, sampler prep, sampling with its one sync, output processing):

1. the device's two ceilings (copy bandwidth, bf16 matrix product) and the prefill GEMM shapes of the model;
2. ``--num-requests`` prompts of ``--input-len`` tokens generating ``--output-len`` tokens: prefill-heavy
   steps, then pure decode steps at the full batch (CUDA graphs unless ``--enforce-eager``);
3. torch.profiler tables (kernels by device time) of a decode step (graph and eager) and a prefill step;
4. batch 1: a ``--latency-input-len`` prompt then decode steps (per-token time vs the weight-read floor).

Prints a short summary last and writes the tables and a JSON summary under ``--out``. Example::

    python benchmarks/cuda_step_profile.py --model benchmarks/llama3_8b_config --out /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def ceilings(out: dict) -> None:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, on random data."""
    n = 1 << 30
    src = torch.randn(n // 2, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    out["copy_bw_GBps"] = 2 * n / statistics.median(times) / 1e9
    del src, dst
    shapes = {"square8192": (8192, 8192, 8192), "qkv": (8192, 4096, 6144), "o": (8192, 4096, 4096),
              "gate_up": (8192, 4096, 28672), "down": (8192, 14336, 4096), "lm_head_256": (256, 4096, 128256)}
    for name, (m, k, nn) in shapes.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(nn, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):
            torch.nn.functional.linear(x, w)
        b.record()
        b.synchronize()
        sec = a.elapsed_time(b) / 1e3 / 10
        out[f"gemm_{name}_TFLOPs"] = 2 * m * k * nn / sec / 1e12
        out[f"gemm_{name}_ms"] = sec * 1e3
        del x, w
    torch.cuda.empty_cache()


class StepTimer:
    """A copy of ``LLMEngine.step`` with host timers and device events around its parts."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.records: list[dict] = []
        self.sub: dict[str, float] = {}
        self.replay_event: torch.cuda.Event | None = None
        self.launch_start = 0.0  # perf_counter() when the step's execute began, for marks inside it
        runner = engine.executor.worker.runner
        prepare_host = runner.prepare_host

        def timed_prepare_host(*a, **k):
            t = time.perf_counter()
            try:
                return prepare_host(*a, **k)
            finally:
                self.sub["prepare_host_ms"] = self.sub.get("prepare_host_ms", 0.0) + 1e3 * (time.perf_counter() - t)

        runner.prepare_host = timed_prepare_host
        graphs = runner.graph_runner
        if graphs is not None:
            for bucket, replay in list(graphs.graphs.items()):

                def timed_replay(replay=replay) -> None:
                    self.replay_event = torch.cuda.Event(enable_timing=True)
                    self.replay_event.record()
                    t = time.perf_counter()
                    self.sub["replay_start_ms"] = 1e3 * (t - self.launch_start)
                    replay()
                    self.sub["replay_call_ms"] = 1e3 * (time.perf_counter() - t)

                graphs.graphs[bucket] = timed_replay

    def step(self) -> int:
        """Run one step; returns the number of tokens it ran (0 when nothing was scheduled)."""
        eng = self.engine
        self.sub, self.replay_event = {}, None
        t0 = time.perf_counter()
        so = eng.scheduler.schedule()
        if so.is_empty:
            return 0
        t1 = time.perf_counter()
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record()
        self.launch_start = time.perf_counter()
        ro = eng.executor.execute(so)
        ev1.record()
        t2 = time.perf_counter()
        requests = [eng.scheduler.requests[rid] for rid in ro.request_ids]
        batch = eng.sampler.make_batch(requests, ro.logits.shape[-1])
        t3 = time.perf_counter()
        sampled = eng.sampler(ro.logits, batch)
        t4 = time.perf_counter()
        finished = eng.output_processor.process(ro.request_ids, sampled, eng.scheduler.requests)
        for request, status in finished:
            eng.scheduler.finish_requests([request.request_id], status)
            eng.sampler.forget(request.request_id)
        touched = {}
        for request in requests:
            parent = eng.output_processor.parent_of.get(request.request_id)
            if parent is not None:
                touched[parent.request_id] = parent
        for parent in touched.values():
            eng.output_processor.make_output(parent)
        t5 = time.perf_counter()
        num_decodes = sum(1 for s in so.scheduled if s.num_new_tokens == 1)
        self.records.append(dict(
            tokens=so.num_batched_tokens, requests=len(so.scheduled), decodes=num_decodes,
            wall_ms=1e3 * (t5 - t0), schedule_ms=1e3 * (t1 - t0), launch_ms=1e3 * (t2 - t1),
            make_batch_ms=1e3 * (t3 - t2), sample_wait_ms=1e3 * (t4 - t3), outputs_ms=1e3 * (t5 - t4),
            device_ms=ev0.elapsed_time(ev1), **self.sub,
        ))  # fmt: skip
        if self.replay_event is not None:  # device idle before the graph started: host staging
            self.records[-1]["gap_before_replay_ms"] = ev0.elapsed_time(self.replay_event)
        return so.num_batched_tokens


def summarize(records: list[dict], label: str) -> dict:
    """Median of every field over ``records``."""
    if not records:
        return {"label": label, "steps": 0}
    keys = [k for k in records[-1] if k not in ("tokens", "requests", "decodes") and all(k in r for r in records)]
    s = {"label": label, "steps": len(records), "tokens": int(statistics.median(r["tokens"] for r in records)),
         "requests": int(statistics.median(r["requests"] for r in records))}
    for k in keys:
        s[k] = round(statistics.median(r[k] for r in records), 3)
    s["host_not_overlapped_ms"] = round(s["wall_ms"] - s["device_ms"], 3)
    return s


def profile_table(fn, path: Path, row_limit: int = 40) -> str:
    """Run ``fn`` under torch.profiler; write the kernel table (by device time) to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=row_limit, max_name_column_width=70)
    path.write_text(table)
    return table


def _fake_cuda_timing() -> None:
    """Let the script's plumbing run on the CPU (events time the host; memory figures read 0)."""

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.t = 0.0

        def record(self) -> None:
            self.t = time.perf_counter()

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, other: Event) -> float:
            return 1e3 * (other.t - self.t)

    torch.cuda.Event = Event  # type: ignore[misc]
    torch.cuda.synchronize = lambda *a: None  # type: ignore[assignment]
    torch.cuda.memory_allocated = lambda *a: 0  # type: ignore[assignment]
    torch.cuda.mem_get_info = lambda *a: (0, 0)  # type: ignore[assignment]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--latency-input-len", type=int, default=1024)
    parser.add_argument("--latency-steps", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--sharegpt-steps", type=int, default=150)
    parser.add_argument("--skip-ceilings", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script's plumbing")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.device == "cpu":
        _fake_cuda_timing()
    summary: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                     "torch": torch.__version__, "cuda": torch.version.cuda}
    import triton

    summary["triton"] = triton.__version__
    if not args.skip_ceilings:
        ceilings(summary)
        print({k: round(v, 1) for k, v in summary.items() if isinstance(v, float)}, flush=True)

    from pagedllm.core.config import EngineConfig
    from pagedllm.core.sampling_params import SamplingParams
    from pagedllm.entrypoints.llm import LLM

    t = time.perf_counter()
    llm = LLM.from_config(EngineConfig(model=args.model, device=args.device, load_format="dummy",
                                       max_num_batched_tokens=args.max_num_batched_tokens,
                                       max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager))
    summary["engine_init_s"] = round(time.perf_counter() - t, 1)
    engine = llm.llm_engine
    runner = engine.executor.worker.runner
    summary["kv_blocks"] = engine.block_manager.pool.num_blocks
    summary["mem_allocated_GiB"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    summary["mem_total_GiB"] = round(torch.cuda.mem_get_info()[1] / 2**30, 2)
    print("engine:", {k: summary[k] for k in ("engine_init_s", "kv_blocks", "mem_allocated_GiB")}, flush=True)
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    timer = StepTimer(engine)

    # warm-up: compile every prefill/decode kernel variant the run will use
    llm.generate([rng.integers(10, vocab, 300).tolist() for _ in range(4)],
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)

    # ---- throughput-shaped: prefill-heavy steps, then pure decode at the full batch
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.num_requests):
        engine.add_request(None, rng.integers(10, vocab, args.input_len).tolist(), params)
    torch.cuda.synchronize()
    t = time.perf_counter()
    tokens = 0
    profiled_decode = False
    while engine.has_unfinished_requests():
        running = len(engine.scheduler.running)
        pure_decode = not engine.scheduler.waiting and all(
            r.num_computed_tokens == r.num_tokens - 1 for r in engine.scheduler.running)
        if pure_decode and running == args.num_requests and not profiled_decode and len(timer.records) > 40:
            profiled_decode = True
            print(profile_table(lambda: [timer.step() for _ in range(2)], out_dir / "prof_decode_graph.txt", 25),
                  flush=True)
            graphs, runner.graph_runner = runner.graph_runner, None
            profile_table(lambda: timer.step(), out_dir / "prof_decode_eager.txt")
            runner.graph_runner = graphs
            if graphs is not None:  # the decode forward alone: graph replays, device time only
                for bucket in (1, 8, 64, 256):
                    if bucket in graphs.graphs:
                        replay = graphs.graphs[bucket]
                        replay()
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                        for _ in range(10):
                            replay()
                        b.record()
                        b.synchronize()
                        summary[f"graph_replay_bs{bucket}_ms"] = round(a.elapsed_time(b) / 10, 3)
            continue
        tokens += timer.step()
    elapsed = time.perf_counter() - t
    recs = timer.records
    summary["run_s"] = round(elapsed, 2)
    summary["run_total_tok_per_s"] = round(args.num_requests * (args.input_len + args.output_len) / elapsed, 1)
    summary["prefill_steps"] = summarize([r for r in recs if r["tokens"] > 1024], "prefill-heavy steps")
    full = [r for r in recs if r["decodes"] == r["requests"] == args.num_requests]
    summary["decode_steps_full_batch"] = summarize(full, f"pure decode, batch {args.num_requests}")
    (out_dir / "steps.json").write_text(json.dumps(recs))

    # ---- one prefill step under the profiler: 8192 tokens of fresh prompts
    n_pf = max(1, args.max_num_batched_tokens // args.input_len)
    for _ in range(n_pf):
        engine.add_request(None, rng.integers(10, vocab, args.input_len).tolist(),
                           SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    profile_table(lambda: timer.step(), out_dir / "prof_prefill.txt")
    while engine.has_unfinished_requests():
        timer.step()

    # ---- ShareGPT-like lengths: the first --sharegpt-steps steps (mixed eager steps vs graph decode steps)
    if args.sharegpt_steps:
        from pagedllm.bench.workloads import make_workload

        wl = make_workload(argparse.Namespace(dataset="sharegpt", num_prompts=1000, input_len=0, output_len=0,
                                              workload_seed=0), vocab)
        for r in wl:
            engine.add_request(None, r.prompt_token_ids,
                               SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True))
        timer.records = []
        t = time.perf_counter()
        for _ in range(args.sharegpt_steps):
            timer.step()
        summary["sharegpt_first_steps_s"] = round(time.perf_counter() - t, 2)
        recs = timer.records
        summary["sharegpt_mixed"] = summarize([r for r in recs if r["decodes"] < r["requests"]], "sharegpt mixed")
        summary["sharegpt_decode"] = summarize([r for r in recs if r["decodes"] == r["requests"]],
                                               "sharegpt pure decode")
        (out_dir / "steps_sharegpt.json").write_text(json.dumps(recs))
        engine.abort_request([p for p in list(engine.output_processor.parents)])

    # ---- batch 1 latency
    timer.records = []
    engine.add_request(None, rng.integers(10, vocab, args.latency_input_len).tolist(),
                       SamplingParams(temperature=0, max_tokens=args.latency_steps, ignore_eos=True))
    while engine.has_unfinished_requests():
        timer.step()
    summary["batch1_prefill"] = summarize(timer.records[:1], "batch 1 prefill")
    summary["batch1_decode"] = summarize(timer.records[1:], "batch 1 decode")
    engine.add_request(None, rng.integers(10, vocab, args.latency_input_len).tolist(),
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    timer.step()
    profile_table(lambda: [timer.step() for _ in range(3)], out_dir / "prof_batch1_decode.txt", 25)
    while engine.has_unfinished_requests():
        timer.step()

    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
