"""Prometheus metrics of the server (``GET /metrics``), updated on the engine thread after every step.

Names follow vLLM's with the ``pagedllm:`` prefix. Each server owns its registry, so several apps in one
process (tests) do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagedllm.core.engine import EngineStats
from pagedllm.core.outputs import RequestOutput
from pagedllm.core.pooling import EmbeddingRequestOutput

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class ServerMetrics:
    """The server's metrics; a :class:`~pagedllm.entrypoints.async_engine.StepObserver`.

    Time to first token runs from the HTTP arrival to the step that sampled the request's first token;
    inter-token latency is the time between two steps that gave the same completion tokens, per token.
    """

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        self.num_running = gauge("pagedllm:num_requests_running", "Sequences running on the engine.")
        self.num_waiting = gauge("pagedllm:num_requests_waiting", "Sequences waiting to run.")
        self.kv_usage = gauge("pagedllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).")
        self.kv_free_blocks = gauge("pagedllm:kv_cache_free_blocks", "KV-cache blocks free now.")
        self.kv_total_blocks = gauge("pagedllm:kv_cache_total_blocks", "KV-cache blocks in the pool.")
        self.prefix_hit_rate = gauge("pagedllm:prefix_cache_hit_rate",
                                     "Prompt tokens found in the prefix cache / prompt tokens looked up.")
        self.prefix_queries = counter("pagedllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("pagedllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("pagedllm:num_preemptions", "Requests preempted (recomputed later).")
        self.draft_tokens = counter("pagedllm:spec_decode_num_draft_tokens", "Draft tokens run (speculative decoding).")
        self.accepted_tokens = counter("pagedllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.lora_info = Gauge("pagedllm:lora_requests_info",
                               "The LoRA adapters of running and waiting requests (labels, comma-separated) and the "
                               "adapter slots; its value is when they were seen, as vLLM's.",
                               ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r)
        self.prompt_tokens = counter("pagedllm:prompt_tokens", "Prompt tokens of requests that started.")
        self.generation_tokens = counter("pagedllm:generation_tokens", "Tokens generated.")
        self.ttft = Histogram("pagedllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS_S, registry=r).labels(model_name)
        self.itl = Histogram("pagedllm:inter_token_latency_seconds", "Time between two tokens of a completion.",
                             labels, buckets=ITL_BUCKETS_S, registry=r).labels(model_name)
        self.e2e = Histogram("pagedllm:e2e_request_latency_seconds", "Arrival to finish of a request.", labels,
                             buckets=E2E_BUCKETS_S, registry=r).labels(model_name)
        self.finished = Counter("pagedllm:request_success", "Finished requests, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.model_name = model_name
        # per unfinished request: tokens seen and last token time of each completion
        self._progress: dict[str, list[tuple[int, float]]] = {}
        self._last_stats: EngineStats | None = None

    def observe(self, outputs: Sequence[RequestOutput], aborted_ids: Sequence[str], stats: EngineStats) -> None:
        """Record one engine-thread iteration (see ``StepObserver``)."""
        now = time.monotonic()
        for output in outputs:
            self._observe_output(output, now)
        for request_id in aborted_ids:
            self._progress.pop(request_id, None)
            self.finished.labels(self.model_name, "abort").inc()
        self._observe_stats(stats)

    def _observe_output(self, output: RequestOutput | EmbeddingRequestOutput, now: float) -> None:
        if isinstance(output, EmbeddingRequestOutput):  # one output, when it finishes: its prompt, no tokens
            self.prompt_tokens.inc(len(output.prompt_token_ids))
            self.finished.labels(self.model_name, "stop" if output.outputs.embedding else "abort").inc()
            return
        progress = self._progress.get(output.request_id)
        if progress is None:
            progress = self._progress[output.request_id] = [(0, now)] * len(output.outputs)
            self.prompt_tokens.inc(len(output.prompt_token_ids))
            metrics = output.metrics
            if metrics is not None and metrics.first_token_time is not None:
                self.ttft.observe(metrics.first_token_time - metrics.arrival_time)
        for completion in output.outputs:
            num_seen, last_time = progress[completion.index]
            num_new = len(completion.token_ids) - num_seen
            if num_new <= 0:
                continue
            self.generation_tokens.inc(num_new)
            if num_seen > 0:
                gap = (now - last_time) / num_new
                for _ in range(num_new):
                    self.itl.observe(gap)
            progress[completion.index] = (len(completion.token_ids), now)
        if output.finished:
            del self._progress[output.request_id]
            reasons = {c.finish_reason or "abort" for c in output.outputs}
            for reason in reasons:
                self.finished.labels(self.model_name, reason).inc()
            if output.metrics is not None:
                self.e2e.observe(now - output.metrics.arrival_time)

    def _observe_stats(self, stats: EngineStats) -> None:
        previous = self._last_stats
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_free_blocks.set(stats.num_free_blocks)
        self.kv_total_blocks.set(stats.num_total_blocks)
        queries, hits = stats.prefix_cache_queries_tokens, stats.prefix_cache_hit_tokens
        self.prefix_hit_rate.set(hits / queries if queries else 0.0)
        self.prefix_queries.inc(queries - (previous.prefix_cache_queries_tokens if previous else 0))
        self.prefix_hits.inc(hits - (previous.prefix_cache_hit_tokens if previous else 0))
        self.preemptions.inc(stats.num_preemptions - (previous.num_preemptions if previous else 0))
        self.draft_tokens.inc(stats.spec_decode_num_draft_tokens
                              - (previous.spec_decode_num_draft_tokens if previous else 0))
        self.accepted_tokens.inc(stats.spec_decode_num_accepted_tokens
                                 - (previous.spec_decode_num_accepted_tokens if previous else 0))
        if stats.max_loras:  # one series: the adapters now (vLLM keeps every combination ever seen)
            self.lora_info.clear()
            self.lora_info.labels(str(stats.max_loras), ",".join(stats.running_lora_adapters),
                                  ",".join(stats.waiting_lora_adapters)).set_to_current_time()
        self._last_stats = stats

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
