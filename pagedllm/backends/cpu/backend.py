"""The ``cpu`` reference backend: paged KV cache and attention in plain PyTorch.

Every other backend is held to what this one computes, so it favours clarity: keys and values are gathered
through the block tables and attended with PyTorch's scaled-dot-product attention (float32 accumulation: on
float32 copies of the inputs, or, for bf16 on CPUs with AMX-BF16, on the bf16 inputs themselves, which that
kernel multiplies in hardware; :func:`bf16_attention_is_fast`) under an explicit causal/sliding-window mask,
vectorized over requests (decodes in one batched call, prefills padded to the longest chunk in another), with no
Python loop per token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cache

import torch

from pagedllm.backends import kv_storage
from pagedllm.backends.interface import AttentionMetadata, AttentionSpec, Backend, BackendCapabilities
from pagedllm.backends.kv_storage import byte_view, divide_by_scale, to_cache_dtype

# Like vLLM's CPU default KV space: the pool never takes more than this unless asked explicitly.
DEFAULT_MAX_KV_CACHE_BYTES = 4 << 30
# Decodes are attended in up to this many groups of similar length (each at least DECODE_GROUP_MIN requests).
DECODE_GROUPS = 4
DECODE_GROUP_MIN = 8


@cache
def bf16_attention_is_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX-BF16), where SDPA on bf16 inputs is 3-6x faster
    than on float32 copies of them (``benchmarks/RESULTS.md``); elsewhere (AVX-512 or AVX2 alone) its bf16
    path is about 2x slower. ``PAGEDLLM_CPU_ATTENTION_FP32=1`` keeps float32 everywhere."""
    if os.environ.get("PAGEDLLM_CPU_ATTENTION_FP32") == "1":
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    return bool(capabilities is not None and capabilities().get("amx_bf16", False))


class CpuBackend(Backend):
    """Pure PyTorch backend; KV layout ``[2, num_blocks, block_size, num_kv_heads, head_dim]``."""

    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    interface_version = (1, 14)
    priority = -100  # auto picks cpu last
    _plan: _StepPlan | None = None  # the current step's attention plan

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        """The CPU is always there."""
        return True, ""

    def capabilities(self) -> BackendCapabilities:
        """Any block size and head size; float32, bfloat16 and float16; the KV cache also in fp8 (e4m3 and
        e5m2: the reference of what an fp8 cache computes); fp8 linear layers with row or tile scales and 4-bit
        ones (the references, the defaults of :meth:`Backend.linear_fp8`, :meth:`Backend.linear_fp8_block` and
        :meth:`Backend.linear_w4a16`)."""
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        return BackendCapabilities(
            dtypes=dtypes,
            kv_cache_dtypes=(*dtypes, torch.float8_e4m3fn, torch.float8_e5m2),
            block_sizes=(16, 1, 2, 4, 8, 32, 64, 128),
            head_sizes=(32, 64, 80, 96, 112, 128, 256, 8, 16),
            quantizations=("fp8", "fp8_block", "w4a16"),
            supports_logits_soft_cap=True,
        )

    def init_device(self, rank: int, world_size: int) -> None:
        """Split the cores between the ranks of a tensor-parallel group on one machine."""
        if world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))

    def device_count(self) -> int | None:
        """None: any number of tensor-parallel ranks may share the host's cores and memory."""
        return None

    def memory_info(self) -> tuple[int, int]:
        """Return ``(MemAvailable, MemTotal)`` from ``/proc/meminfo`` (or sysconf where it is absent)."""
        try:
            with open("/proc/meminfo") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
            return fields["MemAvailable"], fields["MemTotal"]
        except (OSError, KeyError, ValueError):
            page = os.sysconf("SC_PAGE_SIZE")
            return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def kv_cache_budget_bytes(self, memory_utilization: float) -> int:
        """``memory_utilization`` of available RAM, capped at 4 GiB (set ``kv_cache_memory_bytes`` for more)."""
        return min(super().kv_cache_budget_bytes(memory_utilization), DEFAULT_MAX_KV_CACHE_BYTES)

    # ------------------------------------------------------------------ KV cache
    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """``(2, num_blocks, block_size, num_kv_heads, head_dim)``: keys then values."""
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def write_kv_cache(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Scatter ``key``/``value`` rows into their slots; rows with slot -1 are skipped."""
        num_kv_heads, head_dim = kv_cache.shape[-2:]
        num_tokens = slot_mapping.shape[0]
        slots = slot_mapping
        keep = slots >= 0
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[:num_tokens][keep], value[:num_tokens][keep]
        for half, rows in ((kv_cache[0], key), (kv_cache[1], value)):
            stored = to_cache_dtype(rows[: slots.shape[0]], kv_cache.dtype)
            byte_view(half).view(-1, num_kv_heads, head_dim).index_copy_(0, slots, byte_view(stored))

    def read_kv_cache(
        self, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the keys and values stored at ``slot_mapping`` ``[num_slots]``; returns two
        ``[num_slots, num_kv_heads, head_dim]`` tensors (:func:`kv_storage.read_slots`)."""
        return kv_storage.read_slots(kv_cache, slot_mapping)

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        """Copy blocks ``src -> dst`` (``src_to_dst``: ``[num_pairs, 2]`` int64) in every layer
        (:func:`kv_storage.copy_blocks`)."""
        kv_storage.copy_blocks(kv_caches, src_to_dst)

    # ------------------------------------------------------------------ attention
    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        spec: AttentionSpec,
    ) -> torch.Tensor:
        """Attention over the paged cache: decodes in groups of similar length, prefills padded together."""
        return self._paged_attention(query, kv_cache, metadata, spec, 1.0)

    def write_kv_cache_scaled(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
        k_scale: float, v_scale: float,
    ) -> None:
        """The reference of a scaled store: each value times the float32 inverse of its scale, in float32, then
        cast to the cache's dtype (:func:`kv_storage.divide_by_scale`, :func:`kv_storage.to_cache_dtype`)."""
        self.write_kv_cache(divide_by_scale(key, k_scale), divide_by_scale(value, v_scale), kv_cache, slot_mapping)

    def attention_scaled(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        spec: AttentionSpec,
        k_scale: float,
        v_scale: float,
    ) -> torch.Tensor:
        """:meth:`attention` with the score scale times ``k_scale`` and the float32 output times ``v_scale``
        before its cast to the query's dtype."""
        return self._paged_attention(query, kv_cache, metadata, replace(spec, scale=spec.scale * k_scale), v_scale)

    def _paged_attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, spec: AttentionSpec,
        v_scale: float,
    ) -> torch.Tensor:
        out = torch.zeros_like(query)
        plan = self._plan_of(metadata, kv_cache.shape[2])
        for group in plan.decodes:
            out[group.rows] = self._attend(query, group, kv_cache, spec, v_scale)
        if plan.prefills is not None:
            group = plan.prefills
            result = self._attend(query, group, kv_cache, spec, v_scale)
            out[group.rows[group.valid]] = result.view(-1, group.max_query_len, *query.shape[1:])[group.valid]
        return out

    def _plan_of(self, metadata: AttentionMetadata, block_size: int) -> _StepPlan:
        """The step's attention plan (:class:`_StepPlan`), built on the first layer's call and reused by the others:
        while the metadata's lengths and block tables hold what the plan was built from (compared by value:
        recorded decode steps refill the same tensors in place)."""
        plan = self._plan
        if plan is None or plan.block_size != block_size or not plan.describes(metadata):
            plan = self._plan = _StepPlan.build(metadata, block_size)
        return plan

    def _attend(self, query: torch.Tensor, group: _Group, kv_cache: torch.Tensor, spec: AttentionSpec,
                v_scale: float) -> torch.Tensor:
        """Attention for one :class:`_Group` of requests, the float32 result times ``v_scale``; returns
        ``[len(group.rows), num_heads, head_dim]``."""
        num_requests = group.num_requests
        num_kv_heads, head_dim = spec.num_kv_heads, spec.head_dim
        # keys/values: [R, num_kv_heads, max_key_len, head_dim]; queries: [R, num_heads, max_query_len, head_dim]
        # (index_select copies whole blocks, markedly faster than advanced indexing on the CPU)
        keys = kv_cache[0].index_select(0, group.blocks).view(num_requests, group.max_key_len, num_kv_heads, head_dim)
        values = kv_cache[1].index_select(0, group.blocks).view(num_requests, group.max_key_len, num_kv_heads,
                                                                head_dim)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        q = query[group.rows].view(num_requests, group.max_query_len, spec.num_heads, head_dim).transpose(1, 2)
        # float32: the reference's precision, and without AMX faster than SDPA's half-precision decode path
        # (about 2x, measured with torch 2.13); bf16 where AMX multiplies it (its kernel accumulates in float32).
        # GQA maps query head h to kv head h // group.
        if spec.logits_soft_cap:
            out = _soft_capped_attention(q.float(), keys.float(), values.float(), group.mask(spec.sliding_window),
                                         spec)
        else:
            keep = q.dtype == torch.bfloat16 and keys.dtype == torch.bfloat16 and bf16_attention_is_fast()
            q, keys, values = (q, keys, values) if keep else (q.float(), keys.float(), values.float())
            # prompts from their first token, no window: SDPA's own causal mask (top-left aligned: query row i
            # sees keys 0..i, so neither the keys past a prompt nor a padded row's garbage reach a real row),
            # about 2x faster than an explicit mask
            causal = group.from_start and spec.sliding_window is None
            out = torch.nn.functional.scaled_dot_product_attention(
                q, keys, values, attn_mask=None if causal else group.mask(spec.sliding_window)[:, None],
                is_causal=causal, scale=spec.scale, enable_gqa=num_kv_heads != spec.num_heads,
            )
        out = (out * v_scale if v_scale != 1.0 else out).to(query.dtype)
        return out.transpose(1, 2).reshape(num_requests * group.max_query_len, spec.num_heads, head_dim)


@dataclass(eq=False)
class _Group:
    """One SDPA call of a step: ``num_requests`` requests whose query rows, padded to ``max_query_len`` each, are
    ``rows`` (``[R]`` for decodes; ``[R, Q]`` for prefills, whose ``valid`` says which padded places are real rows),
    whose keys are the ``max_key_len`` slots of ``blocks`` (``[num_requests * num_blocks]``, block table order);
    ``query_pos`` ``[R, Q]`` and ``seq_lens`` ``[R]`` give the masks (:meth:`mask`, one per sliding window, built
    once)."""

    num_requests: int
    rows: torch.Tensor
    max_query_len: int
    blocks: torch.Tensor
    max_key_len: int
    query_pos: torch.Tensor
    seq_lens: torch.Tensor
    valid: torch.Tensor | None = None
    from_start: bool = False  # prefills only, every one from its first token (no cached context)
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def build(metadata: AttentionMetadata, requests: torch.Tensor, rows: torch.Tensor, max_query_len: int,
              block_size: int, valid: torch.Tensor | None = None) -> _Group:
        """The group of the requests at indices ``requests`` (whose padded query rows are ``rows``)."""
        seq_lens = metadata.seq_lens[requests].long()
        context_lens = metadata.context_lens[requests].long()
        num_blocks = -(-int(seq_lens.max()) // block_size)
        blocks = metadata.block_tables[requests, :num_blocks].flatten()
        query_pos = context_lens[:, None] + torch.arange(max_query_len)[None, :]
        from_start = valid is not None and not bool(context_lens.any())
        return _Group(len(requests), rows, max_query_len, blocks, num_blocks * block_size, query_pos, seq_lens,
                      valid, from_start)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """``[R, Q, K]`` bool: which keys each query row may attend (causal, within its sequence and the window)."""
        if sliding_window not in self.masks:
            key_pos = torch.arange(self.max_key_len)
            allowed = key_pos[None, None, :] <= self.query_pos[:, :, None]
            allowed &= key_pos[None, None, :] < self.seq_lens[:, None, None]
            if sliding_window is not None:
                allowed &= key_pos[None, None, :] > self.query_pos[:, :, None] - sliding_window
            allowed[:, :, 0] |= ~allowed.any(-1)  # padding rows: keep softmax finite, result discarded
            self.masks[sliding_window] = allowed
        return self.masks[sliding_window]


@dataclass(eq=False)
class _StepPlan:
    """How one step's attention is split into SDPA calls, the same for every layer: the decodes sorted by length
    in up to :data:`DECODE_GROUPS` groups (bounding their key padding), the prefills in one group padded to the
    longest chunk. Built once per step (:meth:`CpuBackend._plan_of`)."""

    block_size: int
    inputs: tuple[torch.Tensor, ...]  # copies of what the plan was built from: lengths, block tables
    decodes: list[_Group]
    prefills: _Group | None

    @staticmethod
    def inputs_of(metadata: AttentionMetadata) -> tuple[torch.Tensor, ...]:
        """The metadata tensors a plan depends on."""
        return (metadata.query_start_loc_cpu, metadata.seq_lens_cpu, metadata.seq_lens, metadata.context_lens,
                metadata.block_tables)

    def describes(self, metadata: AttentionMetadata) -> bool:
        """Whether ``metadata`` holds the lengths and block tables this plan was built from."""
        current = self.inputs_of(metadata)
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(self.inputs, current, strict=True))

    @staticmethod
    def build(metadata: AttentionMetadata, block_size: int) -> _StepPlan:
        """The plan of ``metadata``'s step."""
        query_start = metadata.query_start_loc_cpu.tolist()
        num_requests = len(query_start) - 1
        num_decodes = metadata.num_decodes
        decodes = []
        if num_decodes:  # decode rows are request indices
            order = torch.argsort(metadata.seq_lens_cpu[:num_decodes])
            for group in order.split(max(DECODE_GROUP_MIN, -(-num_decodes // DECODE_GROUPS))):
                decodes.append(_Group.build(metadata, group, group, 1, block_size))
        prefills = None
        if num_requests > num_decodes:
            starts = torch.tensor(query_start[num_decodes:num_requests])
            lens = torch.tensor(query_start[num_decodes + 1 :]) - starts
            max_len = int(lens.max())
            offsets = torch.arange(max_len)
            valid = offsets[None, :] < lens[:, None]  # [num_prefills, max_len]
            rows = (starts[:, None] + offsets[None, :]).where(valid, starts[:, None])
            prefills = _Group.build(metadata, torch.arange(num_decodes, num_requests), rows, max_len, block_size, valid)
        return _StepPlan(block_size, tuple(t.clone() for t in _StepPlan.inputs_of(metadata)), decodes, prefills)


def _soft_capped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                           spec: AttentionSpec) -> torch.Tensor:
    """Attention whose scaled scores are soft-capped (``cap * tanh(s / cap)``, Gemma 2) before the mask and the
    softmax, which SDPA cannot do: ``q: [R, num_heads, Q, D]``, ``keys``/``values``: ``[R, num_kv_heads, K, D]``
    (float32), ``allowed: [R, Q, K]``; returns ``[R, num_heads, Q, D]``. The query heads of a KV head are
    folded into one product with it (no repeated keys)."""
    num_requests, num_heads, num_queries, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    q = q.reshape(num_requests, num_kv_heads, group * num_queries, head_dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * spec.scale  # [R, kv heads, group * Q, K]
    cap = float(spec.logits_soft_cap or 0.0)
    scores = torch.tanh(scores / cap) * cap
    scores = scores.view(num_requests, num_kv_heads, group, num_queries, -1)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(num_requests, num_kv_heads, group * num_queries, -1)
    return torch.matmul(probs, values).reshape(num_requests, num_heads, num_queries, head_dim)
