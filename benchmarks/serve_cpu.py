"""Serving on the CPU: ``pagedllm bench serve`` against ``pagedllm serve`` at several request rates, then the
same workload through the offline API, in one run.

1. starts ``pagedllm serve MODEL --device cpu`` (a subprocess on a free port);
2. for each ``--request-rates`` value runs ``pagedllm bench serve`` (another subprocess: Poisson arrivals,
   streamed completions, token-id prompts, EOS ignored) and keeps its JSON figures;
3. stops the server, builds ``LLM(MODEL)`` in this process with the same engine options, warms it up,
   queues the identical requests at once (the offline API has no arrival process: it is the ``inf`` rate)
   and steps to completion, taking TTFT and TPOT from each request's timestamps (first token, last token);
4. prints one table: request and token throughput, TTFT and TPOT mean/median/p99 for every run.

Example (the demo model, 4.5M parameters)::

    python benchmarks/serve_cpu.py --dtype float32 --num-prompts 100 --input-len 128 --output-len 128 \\
        --request-rates 4,inf
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from pagedllm.bench.serve import PROBE_TEXT, RequestResult, build_workload, format_summary, summarize
from pagedllm.bench.workloads import BenchRequest, add_workload_args, describe
from pagedllm.testing.server import ServerProcess


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20)
    parser.add_argument("--request-rates", default="4,inf", help="comma-separated rates (requests/s) or inf")
    parser.add_argument("--max-concurrency", type=int, default=None)
    add_workload_args(parser, num_prompts=100, input_len=128, output_len=128)
    return parser.parse_args()


def engine_args(args: argparse.Namespace) -> list[str]:
    return ["--device", "cpu", "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]


def bench_serve(server: ServerProcess, args: argparse.Namespace, rate: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "pagedllm", "bench", "serve", "--base-url", server.url,
                   "--request-rate", rate, "--dataset", args.dataset, "--num-prompts", str(args.num_prompts),
                   "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                   "--workload-seed", str(args.workload_seed), "--result-json", out.name]
        if args.max_concurrency:
            command += ["--max-concurrency", str(args.max_concurrency)]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
        return json.loads(Path(out.name).read_text())


def run_offline(args: argparse.Namespace, model: str) -> tuple[list[BenchRequest], list[RequestResult], float]:
    from pagedllm import LLM, SamplingParams

    llm = LLM(model, device="cpu", dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    tokenizer = llm.get_tokenizer()
    requests = build_workload(args, tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids,
                              llm.llm_engine.model_config.max_model_len)
    engine = llm.llm_engine
    llm.generate([r.prompt_token_ids for r in requests[:4]], SamplingParams(temperature=0, max_tokens=4,
                                                                            ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(f"offline-{i}", r.prompt_token_ids,
                           SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True))
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    duration = time.perf_counter() - start
    results = []
    for i, r in enumerate(requests):
        output = finals[f"offline-{i}"]
        m = output.metrics
        assert m is not None and m.first_token_time is not None and m.last_token_time is not None
        results.append(RequestResult(len(r.prompt_token_ids), len(output.outputs[0].token_ids),
                                     m.first_token_time - m.arrival_time, m.last_token_time - m.arrival_time))
    engine.shutdown()
    return requests, results, duration


def main() -> int:
    args = parse_args()
    from pagedllm.demo import demo_model_path

    model = args.model or demo_model_path()
    rows = []
    with ServerProcess(model, [*engine_args(args), "--disable-access-log"]) as server:
        for rate in args.request_rates.split(","):
            figures = bench_serve(server, args, rate)
            rows.append((f"serve, rate {rate}", figures))
    requests, results, duration = run_offline(args, model)
    summary = summarize(results, duration)
    print(f"offline workload: {args.dataset}: {describe(requests)}")
    print(format_summary(summary, "Offline LLM API (all requests at t=0)"))
    rows.append(("offline API", asdict(summary)))
    print(f"\nmodel {model} ({args.dtype}), cpu backend; workload {args.dataset}, {args.num_prompts} prompts")
    print(f"{'run':<18}{'req/s':>8}{'out tok/s':>11}{'TTFT mean/med/p99 ms':>26}{'TPOT mean/med/p99 ms':>24}")
    for name, f in rows:
        ttft, tpot = f["ttft"], f["tpot"]
        print(f"{name:<18}{f['request_throughput']:>8.2f}{f['output_throughput']:>11.1f}"
              f"{ttft['mean_ms']:>10.0f}{ttft['median_ms']:>8.0f}{ttft['p99_ms']:>8.0f}"
              f"{tpot['mean_ms']:>10.1f}{tpot['median_ms']:>7.1f}{tpot['p99_ms']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
