"""``pagedllm bench serve``: a load generator against a running OpenAI-compatible server.

Requests arrive as a Poisson process at ``--request-rate`` per second (``inf``: all at once), at most
``--max-concurrency`` in flight; each streams ``/v1/completions`` with a random token-id prompt from
:mod:`pagedllm.bench.workloads` (fixed lengths or ShareGPT-like ones, cut to the server's context) and
``ignore_eos``, so it generates exactly the sampled number of tokens.
Reported: successful/failed requests, request and token throughput, and mean/median/p99 time to first
token (TTFT), time per output token after the first (TPOT), inter-token latency (ITL, between streamed
chunks) and end-to-end latency.

:class:`RequestResult` and :func:`summarize` do not depend on HTTP, so an offline run can be summarized
the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pagedllm.bench.workloads import BenchRequest, add_workload_args, describe, make_workload

if TYPE_CHECKING:
    import httpx


@dataclass(slots=True)
class RequestResult:
    """What one request measured (seconds); ``error`` is set when it failed."""

    num_prompt_tokens: int
    num_output_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first, or None with fewer than two tokens."""
        if self.ttft_s is None or self.num_output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.num_output_tokens - 1)


@dataclass(slots=True)
class LatencyStats:
    """Mean, median and a high percentile of a latency, in milliseconds."""

    mean_ms: float
    median_ms: float
    p99_ms: float

    @classmethod
    def of(cls, values_s: Sequence[float]) -> LatencyStats:
        """Summarize values given in seconds (NaN when there are none)."""
        if not values_s:
            return cls(math.nan, math.nan, math.nan)
        ms = 1000 * np.asarray(values_s, dtype=np.float64)
        return cls(float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


@dataclass(slots=True)
class BenchmarkSummary:
    """The figures of one run."""

    num_successful: int
    num_failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e_latency: LatencyStats
    errors: list[str] = field(default_factory=list)


def summarize(results: Sequence[RequestResult], duration_s: float) -> BenchmarkSummary:
    """Aggregate per-request results of a run that took ``duration_s`` seconds."""
    ok = [r for r in results if r.error is None]
    num_in = sum(r.num_prompt_tokens for r in ok)
    num_out = sum(r.num_output_tokens for r in ok)
    return BenchmarkSummary(
        num_successful=len(ok),
        num_failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=num_in,
        total_output_tokens=num_out,
        request_throughput=len(ok) / duration_s,
        output_throughput=num_out / duration_s,
        total_token_throughput=(num_in + num_out) / duration_s,
        ttft=LatencyStats.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=LatencyStats.of([t for r in ok if (t := r.tpot_s) is not None]),
        itl=LatencyStats.of([gap for r in ok for gap in r.itl_s]),
        e2e_latency=LatencyStats.of([r.latency_s for r in ok]),
        errors=sorted({r.error for r in results if r.error is not None})[:10],
    )


def format_summary(summary: BenchmarkSummary, title: str = "Serving Benchmark Result") -> str:
    """The summary as a text table (vLLM's layout)."""
    lines = [f"{f' {title} ':=^60}"]

    def row(name: str, value: object, fmt: str = "") -> None:
        lines.append(f"{name:<44}{value:>16{fmt}}")

    row("Successful requests:", summary.num_successful)
    row("Failed requests:", summary.num_failed)
    row("Benchmark duration (s):", summary.duration_s, ".2f")
    row("Total input tokens:", summary.total_input_tokens)
    row("Total generated tokens:", summary.total_output_tokens)
    row("Request throughput (req/s):", summary.request_throughput, ".2f")
    row("Output token throughput (tok/s):", summary.output_throughput, ".2f")
    row("Total token throughput (tok/s):", summary.total_token_throughput, ".2f")
    for title_, short, stats in (("Time to First Token", "TTFT", summary.ttft),
                                 ("Time per Output Token (excl. 1st token)", "TPOT", summary.tpot),
                                 ("Inter-token Latency", "ITL", summary.itl),
                                 ("End-to-end Latency", "E2EL", summary.e2e_latency)):
        lines.append(f"{f' {title_} ':-^60}")
        row(f"Mean {short} (ms):", stats.mean_ms, ".2f")
        row(f"Median {short} (ms):", stats.median_ms, ".2f")
        row(f"P99 {short} (ms):", stats.p99_ms, ".2f")
    if summary.errors:
        lines.append(f"{' Errors (first distinct) ':-^60}")
        lines.extend(f"  {e}" for e in summary.errors)
    lines.append("=" * 60)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- HTTP
async def _send(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str, request: BenchRequest,
                temperature: float) -> RequestResult:
    """Stream one completion; time its chunks."""
    result = RequestResult(num_prompt_tokens=len(request.prompt_token_ids))
    payload = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
               "temperature": temperature, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    num_chunks = 0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('message')}"
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.num_output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    num_chunks += 1
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
        result.latency_s = time.perf_counter() - start
        if not result.num_output_tokens:
            result.num_output_tokens = num_chunks  # a server without usage: one token per chunk
    except Exception as exc:  # a benchmark counts failures instead of stopping
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def _get_json(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict | None = None
                    ) -> dict:
    if body is None:
        response = await client.get(url, headers=headers)
    else:
        response = await client.post(url, json=body, headers=headers)
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


async def benchmark(base_url: str, requests: Sequence[BenchRequest], model: str | Sequence[str],
                    request_rate: float, max_concurrency: int | None, api_key: str | None = None,
                    temperature: float = 0.0, seed: int = 0, timeout_s: float = 600.0
                    ) -> tuple[list[RequestResult], float]:
    """Send ``requests`` to ``base_url`` as a Poisson process, each naming ``model`` (or its own entry of a
    sequence of names, one per request); returns per-request results and the duration."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency or len(requests), max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        url = base_url.rstrip("/") + "/v1/completions"

        names = [model] * len(requests) if isinstance(model, str) else list(model)

        async def one(request: BenchRequest, name: str) -> RequestResult:
            if semaphore is None:
                return await _send(client, url, headers, name, request, temperature)
            async with semaphore:
                return await _send(client, url, headers, name, request, temperature)

        start = time.perf_counter()
        tasks = []
        for i, (request, name) in enumerate(zip(requests, names, strict=True)):
            tasks.append(asyncio.ensure_future(one(request, name)))
            if math.isfinite(request_rate) and i < len(requests) - 1:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


# Tokenized by the server to learn a range of valid token ids without a local tokenizer.
PROBE_TEXT = (__doc__ or "") + string.printable + " The quick brown fox jumps over the lazy dog. " * 4


def fit_to_context(requests: Sequence[BenchRequest], max_model_len: int) -> list[BenchRequest]:
    """Cut requests so prompt + output fits ``max_model_len``: the prompt to at most half of it, the output
    to the rest."""
    fitted = []
    for r in requests:
        prompt = r.prompt_token_ids
        if len(prompt) + r.output_len > max_model_len:
            prompt = prompt[: max(1, max_model_len // 2)]
        fitted.append(BenchRequest(prompt, max(1, min(r.output_len, max_model_len - len(prompt)))))
    return fitted


async def _prepare(args: argparse.Namespace, base_url: str, api_key: str | None
                   ) -> tuple[str, list[BenchRequest], list[str]]:
    """Ask the server for its model, context length and valid token ids; build the workload. Returns the model,
    the requests and the names the server serves (raises ValueError when ``--model`` or a ``--lora-modules``
    name is not among them)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=60) as client:
        models = await _get_json(client, base_url + "/v1/models", headers)
        card = next((m for m in models["data"] if args.model in (None, m["id"])), None)
        served = [m["id"] for m in models["data"]]
        if card is None:
            raise ValueError(f"the server does not serve {args.model!r}; it serves {served}")
        unknown = [name for name in args.lora_modules or [] if name not in served]
        if unknown:
            raise ValueError(f"--lora-modules {unknown} are not served; the server serves {served} (start it with "
                             f"--enable-lora --lora-modules NAME=PATH)")
        probe = await _get_json(client, base_url + "/tokenize", headers,
                                {"model": card["id"], "prompt": PROBE_TEXT, "add_special_tokens": False})
    return card["id"], build_workload(args, probe["tokens"], card.get("max_model_len")), served


def build_workload(args: argparse.Namespace, probe_token_ids: Sequence[int], max_model_len: int | None
                   ) -> list[BenchRequest]:
    """The workload of the ``--dataset`` options: random ids below the largest id of :data:`PROBE_TEXT`
    tokenized (``probe_token_ids``; all valid), cut to ``max_model_len``. An offline run that tokenizes
    PROBE_TEXT with the same tokenizer gets the same requests."""
    requests = make_workload(args, max(probe_token_ids) + 1)
    return fit_to_context(requests, max_model_len) if max_model_len else requests


def request_models(model: str, lora_modules: Sequence[str] | None, num: int, seed: int) -> list[str]:
    """The model name each of ``num`` requests sends: ``model``, or one of ``lora_modules`` drawn at random (a
    generator seeded with ``seed``, apart from the arrival times')."""
    if not lora_modules:
        return [model] * num
    rng = random.Random(f"lora-{seed}")
    return [rng.choice(list(lora_modules)) for _ in range(num)]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench serve``."""
    parser = subparsers.add_parser("serve", help="load-test a running `pagedllm serve` (OpenAI API)")
    parser.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="model name to request (default: the served one)")
    parser.add_argument("--api-key", default=None, help="bearer key (default: $PAGEDLLM_API_KEY)")
    parser.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME",
                        help="LoRA adapters the server serves by these names: each request names one of them, "
                             "drawn at random (seeded by --seed), as vLLM's benchmark_serving does")
    add_workload_args(parser, num_prompts=100, input_len=128, output_len=128)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="mean requests per second of the Poisson arrivals; inf sends them all at once")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout")
    parser.add_argument("--result-json", default=None, help="also write the figures to this JSON file")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the load test and print the figures; returns 1 when no request succeeded."""
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    api_key = args.api_key or os.environ.get("PAGEDLLM_API_KEY")
    if args.request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the figures
    try:
        model, requests, _ = asyncio.run(_prepare(args, base_url, api_key))
    except httpx.TransportError as exc:
        raise RuntimeError(f"cannot reach a server at {base_url} ({exc}); start one with `pagedllm serve MODEL`"
                           ) from exc
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
    sys.stdout.write(f"workload: {args.dataset}: {describe(requests)}\n")
    sys.stdout.write(f"server: {base_url}, model {model!r}; request rate {rate}/s, max concurrency "
                     f"{args.max_concurrency or 'unlimited'}\n")
    names = request_models(model, args.lora_modules, len(requests), args.seed)
    if args.lora_modules:
        counts = {name: names.count(name) for name in args.lora_modules}
        sys.stdout.write(f"LoRA adapters, requests each: {counts}\n")
    results, duration = asyncio.run(benchmark(base_url, requests, names, args.request_rate, args.max_concurrency,
                                              api_key, args.temperature, args.seed, args.timeout_s))
    summary = summarize(results, duration)
    sys.stdout.write(format_summary(summary) + "\n")
    if args.result_json:
        with open(args.result_json, "w") as f:
            config = {k: v for k, v in vars(args).items() if k != "api_key" and not callable(v)}
            config["request_rate"] = rate
            json.dump({"config": config, "model": model, "request_models": names, **asdict(summary)}, f, indent=2,
                      default=str)
    return 0 if summary.num_successful else 1
