"""``pagedllm bench serve`` without a server: per-request figures, their summary, fitting the context."""

from __future__ import annotations

import math

import pytest

from pagedllm.bench.serve import LatencyStats, RequestResult, fit_to_context, format_summary, summarize
from pagedllm.bench.workloads import BenchRequest


def test_tpot_excludes_the_first_token() -> None:
    assert RequestResult(10, num_output_tokens=5, ttft_s=0.2, latency_s=1.0).tpot_s == pytest.approx(0.2)
    assert RequestResult(10, num_output_tokens=1, ttft_s=0.2, latency_s=0.2).tpot_s is None


def test_latency_stats_match_numpy_percentiles() -> None:
    stats = LatencyStats.of([0.001 * i for i in range(1, 101)])
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.median_ms == pytest.approx(50.5)
    assert stats.p99_ms == pytest.approx(99.01)
    assert math.isnan(LatencyStats.of([]).mean_ms)


def test_summary_counts_only_successes() -> None:
    results = [
        RequestResult(100, num_output_tokens=10, ttft_s=0.1, latency_s=1.0, itl_s=[0.1] * 9),
        RequestResult(50, num_output_tokens=20, ttft_s=0.3, latency_s=2.2, itl_s=[0.1] * 19),
        RequestResult(70, error="HTTP 400: bad"),
    ]
    summary = summarize(results, duration_s=4.0)
    assert (summary.num_successful, summary.num_failed) == (2, 1)
    assert (summary.total_input_tokens, summary.total_output_tokens) == (150, 30)
    assert summary.request_throughput == 0.5 and summary.output_throughput == 7.5
    assert summary.total_token_throughput == 45.0
    assert summary.ttft.mean_ms == pytest.approx(200.0)
    assert summary.tpot.mean_ms == pytest.approx(100.0)
    assert summary.itl.median_ms == pytest.approx(100.0)
    assert summary.errors == ["HTTP 400: bad"]
    text = format_summary(summary)
    for line in ("Successful requests:", "Failed requests:", "Request throughput (req/s):",
                 "Output token throughput (tok/s):", "Median TTFT (ms):", "P99 TPOT (ms):", "Mean ITL (ms):"):
        assert line in text


def test_fit_to_context() -> None:
    requests = [BenchRequest(list(range(10)), 5), BenchRequest(list(range(900)), 300), BenchRequest([1], 2000)]
    fitted = fit_to_context(requests, max_model_len=512)
    assert [(len(r.prompt_token_ids), r.output_len) for r in fitted] == [(10, 5), (256, 256), (1, 511)]
