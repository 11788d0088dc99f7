"""Turns a :class:`SchedulerOutput` into one flat token batch, runs the model and returns logits.

Host-side preparation is vectorized with numpy (one Python iteration per request, none per token); the
only device transfers are the few index tensors of the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pagedllm.backends.interface import AttentionMetadata, Backend
from pagedllm.core.block_manager import cdiv
from pagedllm.core.pooling import PooledRows
from pagedllm.core.prompt_logprobs import (
    PromptLogprobRows,
    PromptLogprobs,
    compute_prompt_logprobs,
    prompt_logprob_rows,
)
from pagedllm.core.sampled_rows import SampledRows, sampled_rows
from pagedllm.core.scheduler import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from pagedllm.core.graph_runner import DecodeGraphRunner
    from pagedllm.core.lora.manager import LoRAManager
    from pagedllm.core.lora.request import LoRARequest


@dataclass(slots=True)
class HostBatch:
    """The flat batch of one step as host arrays (requests ordered decodes first)."""

    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slots: np.ndarray  # [num_tokens] int64
    block_tables: np.ndarray  # [num_requests, max_blocks_per_seq] int32
    query_start: np.ndarray  # [num_requests + 1] int64
    starts: np.ndarray  # [num_requests] int64: tokens already in the cache
    num_new: np.ndarray  # [num_requests] int64
    logits_indices: np.ndarray  # [num_logits] int64, ascending: the sampled rows, and prompt-logprob rows if any
    sampled_request_ids: list[str]
    pending_tokens: np.ndarray  # [num_pending] int64: token indices whose ids come from the device
    pending_rows: np.ndarray  # [num_pending] int64: their rows in the previous step's sampled tokens
    prompt_rows: PromptLogprobRows | None = None  # rows whose logits give prompt logprobs
    # with prompt_rows: where the sampled rows and the prompt rows are among logits_indices
    sample_select: np.ndarray | None = None  # [num_sampled] int64
    prompt_select: np.ndarray | None = None  # [num_prompt_rows] int64
    # pooling requests whose prompt's last token runs: their places among the sampled rows, and their ids
    pooled_select: np.ndarray | None = None  # [num_pooled] int64
    pooled_request_ids: list[str] | None = None
    # requests with a LoRA adapter: each token's adapter id (0: none), and the adapters by id
    token_adapters: np.ndarray | None = None  # [num_tokens] int64 (padded like input_ids)
    adapters: dict[int, LoRARequest] | None = None


@dataclass(slots=True)
class ModelInput:
    """The flat batch of one step, on the device."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_logits] int64: rows whose logits are computed (HostBatch's)
    host: HostBatch  # what it was built from (the sampled requests' ids, the prompt-logprob rows)
    sampled: SampledRows | None = None  # those rows for the model's last layer, when it computes only them


@dataclass(slots=True)
class ModelRunnerOutput:
    """Logits of the requests that sample this step: ``logits[i]`` belongs to ``request_ids[i]``; the prompt
    logprobs the step computed, if any request asked, and the hidden states pooling requests wanted (their
    copies to the host under way: ``wait()`` first)."""

    request_ids: list[str]
    logits: torch.Tensor  # [num_sampled, vocab_size]
    prompt_logprobs: PromptLogprobs | None = None
    pooled: PooledRows | None = None  # the last-token hidden states of pooling requests (embeddings)


class ModelRunner:
    """Owns the model and its KV caches on one device; runs one step at a time."""

    def __init__(
        self, model: nn.Module, backend: Backend, device: torch.device, block_size: int, max_model_len: int
    ) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.block_size = block_size
        self.max_blocks_per_seq = cdiv(max_model_len, block_size)
        self.kv_caches: list[torch.Tensor] = []
        self.graph_runner: DecodeGraphRunner | None = None
        capabilities = backend.capabilities()
        # static-shape devices compile one graph per token count: pad every batch to a bucket
        self.token_buckets = sorted(capabilities.token_buckets) if capabilities.needs_static_shapes else []
        self.model_takes_sampled_rows = bool(getattr(model, "supports_sampled_rows", False))
        self.lora: LoRAManager | None = None

    def enable_lora(self, max_loras: int, max_rank: int) -> None:
        """Give the model's projections ``max_loras`` adapter slots of rank up to ``max_rank`` (called once, after
        loading); every layer then computes all its rows (the adapters' rows are per token)."""
        from pagedllm.core.lora.manager import LoRAManager

        self.lora = LoRAManager(self.model, max_loras, max_rank)
        self.model_takes_sampled_rows = False

    @property
    def computes_sampled_rows_only(self) -> bool:
        """Whether the model's last layer computes only the rows a step samples: where the model supports it,
        and not on static shapes (the number of sampled rows varies from step to step)."""
        return self.model_takes_sampled_rows and not self.token_buckets

    # ------------------------------------------------------------------ KV cache
    def kv_cache_bytes_per_block(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers."""
        shape = self.backend.kv_cache_shape(1, self.block_size, num_kv_heads, head_dim)
        per_layer = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        return per_layer * len(self.model.attention_layers())

    def allocate_kv_cache(self, num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Allocate one zeroed cache tensor per layer (layout chosen by the backend) and bind it."""
        shape = self.backend.kv_cache_shape(num_blocks, self.block_size, num_kv_heads, head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.model.attention_layers()]
        for layer, cache in zip(self.model.attention_layers(), self.kv_caches, strict=True):
            layer.kv_cache = cache

    # ------------------------------------------------------------------ one step
    def prepare_host(self, scheduled: list[ScheduledRequest]) -> HostBatch:
        """Build the step's index arrays on the host; decodes are ordered first."""
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens != 1)
        reqs = [scheduled[i] for i in order]
        num_requests = len(reqs)
        num_new = np.fromiter((r.num_new_tokens for r in reqs), dtype=np.int64, count=num_requests)
        starts = np.fromiter((r.start_position for r in reqs), dtype=np.int64, count=num_requests)
        query_start = np.zeros(num_requests + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start[1:])
        num_tokens = int(query_start[-1])
        input_ids = np.fromiter(chain.from_iterable(r.token_ids for r in reqs), dtype=np.int64, count=num_tokens)
        request_of_token = np.repeat(np.arange(num_requests), num_new)
        positions = starts[request_of_token] + np.arange(num_tokens) - query_start[request_of_token]
        # Block tables in one scatter: entry j of request i goes to [i, j]; unused entries stay 0 (null block).
        num_blocks = np.fromiter((len(r.block_ids) for r in reqs), dtype=np.int64, count=num_requests)
        total_blocks = int(num_blocks.sum())
        flat_ids = np.fromiter(chain.from_iterable(r.block_ids for r in reqs), dtype=np.int32, count=total_blocks)
        block_start = np.cumsum(num_blocks) - num_blocks
        request_of_block = np.repeat(np.arange(num_requests), num_blocks)
        block_tables = np.zeros((num_requests, self.max_blocks_per_seq), dtype=np.int32)
        block_tables[request_of_block, np.arange(total_blocks) - block_start[request_of_block]] = flat_ids
        slots = (
            block_tables[request_of_token, positions // self.block_size].astype(np.int64) * self.block_size
            + positions % self.block_size
        )
        sampled = [i for i, r in enumerate(reqs) if r.needs_sample]
        # a request with draft tokens samples at its last token and at each draft: its last 1 + drafts rows
        num_rows = np.fromiter((1 + len(reqs[i].draft_token_ids) for i in sampled), dtype=np.int64, count=len(sampled))
        ends = query_start[1:][sampled]
        first_row = np.cumsum(num_rows) - num_rows  # each sampled request's first row among the sampled rows
        logits_indices = (np.repeat(ends - num_rows - first_row, num_rows) + np.arange(int(num_rows.sum()))
                          ).astype(np.int64)
        pending = [i for i, r in enumerate(reqs) if r.token_from_row is not None]
        pending_tokens = query_start[1:][pending] - 1  # a pending token is its request's last
        input_ids[pending_tokens] = 0  # a valid id until the device writes the sampled one
        if self.token_buckets:
            input_ids, positions, slots = self._pad_to_bucket(input_ids, positions, slots)
        host = HostBatch(
            input_ids=input_ids, positions=positions, slots=slots, block_tables=block_tables,
            query_start=query_start, starts=starts, num_new=num_new,
            logits_indices=logits_indices,
            sampled_request_ids=[reqs[i].request_id for i, rows in zip(sampled, num_rows.tolist(), strict=True)
                                 for _ in range(rows)],
            pending_tokens=pending_tokens,
            pending_rows=np.fromiter((reqs[i].token_from_row for i in pending), dtype=np.int64, count=len(pending)),
        )
        asking = [i for i, r in enumerate(reqs) if r.prompt_logprob_span is not None]
        if asking:
            self._add_prompt_rows(host, [reqs[i] for i in asking], query_start[asking])
        if any(r.lora is not None for r in reqs):
            ids = np.fromiter((r.lora.lora_int_id if r.lora else 0 for r in reqs), dtype=np.int64, count=num_requests)
            host.token_adapters = np.zeros(len(host.input_ids), dtype=np.int64)
            host.token_adapters[:num_tokens] = ids[request_of_token]
            host.adapters = {r.lora.lora_int_id: r.lora for r in reqs if r.lora is not None}
        pooled = [int(first_row[k]) for k, i in enumerate(sampled) if reqs[i].pools]
        if pooled:
            host.pooled_select = np.asarray(pooled, dtype=np.int64)
            host.pooled_request_ids = [host.sampled_request_ids[k] for k in pooled]
        return host

    @staticmethod
    def _add_prompt_rows(host: HostBatch, asking: list[ScheduledRequest], first_rows: np.ndarray) -> None:
        """Add the prompt-logprob rows of ``asking`` (their first rows in the flat batch) to ``host``'s logits
        rows, keeping them ascending, and where each kind lands among them."""
        prompt = prompt_logprob_rows(asking, first_rows)
        union = np.concatenate([host.logits_indices, prompt.rows])
        order = np.argsort(union, kind="stable")
        where = np.empty_like(order)
        where[order] = np.arange(len(order))
        num_sampled = len(host.logits_indices)
        host.logits_indices = union[order]
        host.prompt_rows, host.sample_select, host.prompt_select = prompt, where[:num_sampled], where[num_sampled:]

    def _output(self, host: HostBatch, rows: torch.Tensor, are_logits: bool) -> ModelRunnerOutput:
        """The step's :class:`ModelRunnerOutput` from ``rows``, the logits (``are_logits``) or final hidden
        states of ``host.logits_indices``: the sampled rows' logits, and the prompt logprobs of the other rows
        when some request asked (from hidden states, the LM head runs over those a slice at a time)."""
        def logits_of(x: torch.Tensor) -> torch.Tensor:
            return x if are_logits else self.model.compute_logits(x)

        def pick(from_rows: torch.Tensor, select: np.ndarray) -> torch.Tensor:
            return from_rows[torch.from_numpy(select).to(from_rows.device, non_blocking=True)]

        prompt = None
        sampled = rows
        if host.prompt_rows is not None:
            assert host.sample_select is not None and host.prompt_select is not None
            prompt_rows = pick(rows, host.prompt_select)
            prompt = compute_prompt_logprobs(lambda lo, hi: logits_of(prompt_rows[lo:hi]), host.prompt_rows)
            prompt = prompt.start_copy()
            sampled = pick(rows, host.sample_select)
        pooled = None
        if host.pooled_select is not None:  # hidden states: a step with pooling requests never runs in a graph
            assert not are_logits and host.pooled_request_ids is not None
            pooled = PooledRows.start_copy(host.pooled_request_ids, pick(sampled, host.pooled_select))
        return ModelRunnerOutput(host.sampled_request_ids, logits_of(sampled), prompt, pooled)

    def _pad_to_bucket(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Pad token arrays to the smallest bucket that holds them: ids and positions 0, slots -1."""
        num_tokens = len(arrays[0])
        bucket = next((b for b in self.token_buckets if b >= num_tokens), None)
        if bucket is None:
            raise ValueError(f"{num_tokens} tokens exceed the largest static-shape bucket {self.token_buckets[-1]}")
        fills = (0, 0, -1)
        return tuple(np.concatenate([a, np.full(bucket - num_tokens, f, dtype=a.dtype)])
                     for a, f in zip(arrays, fills, strict=True))

    def pending_token_ids(self, host: HostBatch, sampled_token_ids: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(token_indices, token_ids)`` on the device for the step's pending tokens (None when it has
        none): rows ``host.pending_rows`` of ``sampled_token_ids: [num_rows_prev] int64``, the previous
        step's sampled tokens, still on the device. Raises ValueError if they are needed and not given."""
        if not len(host.pending_tokens):
            return None
        if sampled_token_ids is None:
            raise ValueError("the step has pending tokens but no sampled tokens to take them from")
        dev = self.device
        rows = torch.from_numpy(host.pending_rows).to(dev, non_blocking=True)
        return torch.from_numpy(host.pending_tokens).to(dev, non_blocking=True), sampled_token_ids.index_select(0, rows)

    def prepare(self, scheduled: list[ScheduledRequest], sampled_token_ids: torch.Tensor | None = None
                ) -> ModelInput:
        """Build input ids, positions, slot mapping and block tables on the device; pending tokens are
        taken from ``sampled_token_ids`` (see :meth:`pending_token_ids`)."""
        host = self.prepare_host(scheduled)
        dev = self.device

        def to_dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=True)

        seq_lens = (host.starts + host.num_new).astype(np.int32)
        query_start_cpu = torch.from_numpy(host.query_start.astype(np.int32))
        seq_lens_cpu = torch.from_numpy(seq_lens)
        metadata = AttentionMetadata(
            num_tokens=int(host.query_start[-1]),
            num_decodes=int(np.sum(host.num_new == 1)),
            query_start_loc=query_start_cpu.to(dev, non_blocking=True),
            seq_lens=seq_lens_cpu.to(dev, non_blocking=True),
            context_lens=to_dev(host.starts.astype(np.int32)),
            block_tables=to_dev(host.block_tables),
            slot_mapping=to_dev(host.slots),
            max_query_len=int(host.num_new.max()),
            max_seq_len=int(seq_lens.max()),
            block_size=self.block_size,
            query_start_loc_cpu=query_start_cpu,
            seq_lens_cpu=seq_lens_cpu,
        )
        if self.lora is not None:
            self.lora.prepare_step(host.token_adapters if host.token_adapters is not None
                                   else np.zeros(0, dtype=np.int64), host.adapters or {})
        input_ids = to_dev(host.input_ids)
        pending = self.pending_token_ids(host, sampled_token_ids)
        if pending is not None:
            input_ids.index_copy_(0, *pending)
        sampled = None
        if self.computes_sampled_rows_only and len(host.logits_indices) < metadata.num_tokens:
            sampled = sampled_rows(host.logits_indices, host.positions, host.query_start, metadata, dev)
        return ModelInput(
            input_ids=input_ids,
            positions=to_dev(host.positions),
            metadata=metadata,
            logits_indices=sampled.indices if sampled is not None else to_dev(host.logits_indices),
            host=host,
            sampled=sampled,
        )

    def compute_logits(self, model_input: ModelInput) -> torch.Tensor:
        """Run the model over a prepared batch; returns the logits ``[num_logits, vocab_size]`` of its rows
        ``logits_indices`` (:meth:`final_hidden_states`, then the LM head)."""
        return self.model.compute_logits(self.final_hidden_states(model_input))

    def final_hidden_states(self, model_input: ModelInput) -> torch.Tensor:
        """Run the model over a prepared batch; returns the final hidden states ``[num_logits, hidden]`` of its
        rows ``logits_indices`` (the last layer computes only those where :attr:`computes_sampled_rows_only`)."""
        if model_input.sampled is not None:
            return self.model(model_input.input_ids, model_input.positions, model_input.metadata,
                              sampled=model_input.sampled)
        hidden = self.model(model_input.input_ids, model_input.positions, model_input.metadata)
        return hidden[model_input.logits_indices]

    def capture_decode_graphs(self, max_num_seqs: int, with_logits: bool = True) -> None:
        """Record decode graphs for batch sizes up to ``max_num_seqs`` (backends that can capture only);
        ``with_logits=False`` leaves the LM head out of the graphs (tensor parallelism)."""
        from pagedllm.core.graph_runner import DecodeGraphRunner

        self.graph_runner = DecodeGraphRunner(self.model, self.backend, self.device, self.block_size,
                                              self.max_blocks_per_seq, max_num_seqs, with_logits, self.lora)
        self.graph_runner.capture()

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput, sampled_token_ids: torch.Tensor | None = None
                ) -> ModelRunnerOutput:
        """Run the step's batch through the model; returns logits of the requests that sample.

        ``sampled_token_ids: [num_rows_prev] int64`` on the device: the previous step's sampled tokens,
        where requests scheduled with a ``token_from_row`` find their last input token (asynchronous
        scheduling); nothing waits for them on the host.
        """
        graphs = self.graph_runner
        scheduled = scheduler_output.scheduled
        # decodes, and decodes with draft tokens: each token a decode row of its own (a draft attends to the
        # request's cache up to its position, which this step's earlier rows write before attention reads it)
        if (graphs is not None and sum(r.num_new_tokens for r in scheduled) <= graphs.max_batch_size
                and all(r.num_new_tokens == 1 + len(r.draft_token_ids) and not r.pools for r in scheduled)):
            host = self.prepare_host(scheduled)
            num_rows = int(host.query_start[-1])
            tables = host.block_tables if num_rows == len(scheduled) else np.repeat(host.block_tables, host.num_new,
                                                                                    axis=0)
            lora_rows = None
            if self.lora is not None and host.token_adapters is not None:
                lora_rows = self.lora.rows(host.token_adapters, host.adapters or {})
            logits = graphs.run(host.input_ids, host.positions, host.slots, tables,
                                self.pending_token_ids(host, sampled_token_ids), lora_rows=lora_rows)
            if len(host.logits_indices) != num_rows:  # a one-token prompt chunk that does not sample
                logits = logits[torch.from_numpy(host.logits_indices).to(self.device, non_blocking=True)]
            return self._output(host, logits, are_logits=True)
        model_input = self.prepare(scheduled, sampled_token_ids)
        return self._output(model_input.host, self.final_hidden_states(model_input), are_logits=False)

    @staticmethod
    def warm_up_sizes(max_num_seqs: int) -> list[int]:
        """Decode batch sizes an eager warm-up runs: every power of two below ``max_num_seqs``, then
        ``max_num_seqs``. A backend kernel variant chosen by the decode batch size is covered when every size
        between two consecutive powers of two gets the variant of one of them (a monotone choice that moves at
        most one step per doubling, such as ``cuda``'s split count)."""
        sizes = [1 << k for k in range(max(1, max_num_seqs).bit_length()) if 1 << k < max_num_seqs]
        return [*sizes, max_num_seqs]

    @torch.inference_mode()
    def warm_up(self, decode_sizes: Sequence[int]) -> int:
        """Run throw-away steps over the allocated KV pool so that the kernels compile every variant the engine's
        steps launch before the first request (called at start for backends with
        ``BackendCapabilities.compiles_kernels``): one mixed step (a decode, a prompt chunk that samples nothing,
        a prompt end; the last layer then computes only the sampled rows) and one pure decode step of each
        batch size in ``decode_sizes`` (:meth:`warm_up_sizes` when no graphs were recorded, else none: the
        capture ran the decode steps). Every request reads the null block 0 and writes nothing (slots -1).
        With tensor parallelism every rank runs the same steps. Returns the number of steps run."""
        chunk, end = 2 * self.block_size + 1, 5
        mixed = [ScheduledRequest("warm-up decode", [0], 0, [0], needs_sample=True),
                 ScheduledRequest("warm-up chunk", [0] * chunk, 0, [0] * cdiv(chunk, self.block_size), False),
                 ScheduledRequest("warm-up end", [0] * end, 0, [0], needs_sample=True)]  # fmt: skip
        steps = [mixed] + [[ScheduledRequest(f"warm-up {i}", [0], 0, [0], True) for i in range(n)]
                           for n in decode_sizes]  # fmt: skip
        for scheduled in steps:
            self._run_writing_nothing(scheduled)
        self.backend.synchronize()
        return len(steps)

    def _run_writing_nothing(self, scheduled: list[ScheduledRequest]) -> None:
        """Run the model over the step ``scheduled`` with every slot -1: no key or value is stored (the
        profiling forward and the warm-up steps)."""
        model_input = self.prepare(scheduled)
        model_input.metadata.slot_mapping.fill_(-1)
        self.compute_logits(model_input)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Run one forward of ``num_tokens`` prompt tokens over a throw-away two-block cache, so the
        peak activation memory is known before the KV pool is sized. Nothing is written (slots -1)."""
        self.allocate_kv_cache(2, num_kv_heads, head_dim, dtype)
        num_tokens = min(num_tokens, self.max_blocks_per_seq * self.block_size)
        self._run_writing_nothing([ScheduledRequest("profile", [0] * num_tokens, 0, [], needs_sample=True)])
        self.backend.synchronize()
        self.kv_caches = []
