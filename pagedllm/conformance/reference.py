"""The float32 PyTorch reference and the batch builder the op-level conformance tests share.

A batch is described by :class:`RequestShape` rows (tokens already cached, tokens new this step). The
builder lays their KV blocks out at random (a random permutation of the pool, block 0 kept as the null
block), writes each request's cached context through the backend under test (as earlier steps would
have), then builds this step's flat batch and :class:`AttentionMetadata` exactly as the model runner
does: decodes first, slot mapping from the block tables, padding rows with slot -1.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pagedllm.backends.interface import AttentionMetadata, AttentionSpec, Backend, BackendCapabilities
from pagedllm.backends.kv_storage import divide_by_scale, to_cache_dtype

# Unwritten KV slots hold this instead of NaN: a correct kernel may load a whole block and multiply the
# masked tail by a zero probability, and 0 * NaN is NaN. A key of 100 dominates any softmax it enters and
# a value of 100 moves any output it enters, so reading a wrong slot still fails loudly.
KV_POISON = 100.0


@dataclass(frozen=True, slots=True)
class Tolerance:
    """``torch.testing.assert_close`` tolerances for outputs of magnitude ~1 computed in one dtype."""

    atol: float
    rtol: float


# Per dtype: a few units in the last place of the dtype, for outputs of magnitude ~1 accumulated over a
# few hundred keys. float32 leaves room for TF32-style matmuls on accelerators.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(atol=2e-3, rtol=2e-3),
    torch.float16: Tolerance(atol=1e-2, rtol=1e-2),
    torch.bfloat16: Tolerance(atol=4e-2, rtol=4e-2),
}
FALLBACK_TOLERANCE = Tolerance(atol=1e-1, rtol=1e-1)  # 8-bit and other formats


def tolerance(*dtypes: torch.dtype) -> Tolerance:
    """Return the loosest tolerance among ``dtypes`` (e.g. the model dtype and the KV cache dtype)."""
    chosen = [TOLERANCES.get(d, FALLBACK_TOLERANCE) for d in dtypes]
    return Tolerance(atol=max(t.atol for t in chosen), rtol=max(t.rtol for t in chosen))


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Within the block, memory torch allocates without initializing (``torch.empty``) is filled with NaN.

    Uses ``torch.use_deterministic_algorithms(warn_only=True)`` with
    ``torch.utils.deterministic.fill_uninitialized_memory``: an output row a backend allocates but never
    writes then reads NaN and fails the comparison instead of passing by luck.
    """
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warn_only: "op X has no deterministic implementation"
            yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class RequestShape:
    """One request of a test batch: ``context_len`` tokens already cached, ``query_len`` new this step."""

    context_len: int
    query_len: int

    @property
    def seq_len(self) -> int:
        """Context plus new tokens."""
        return self.context_len + self.query_len


@dataclass(slots=True)
class AttentionBatch:
    """One step's inputs for :meth:`Backend.attention`, plus the full per-request K/V the reference needs."""

    requests: list[RequestShape]
    """In batch order (decodes first)."""
    query: torch.Tensor
    """``[num_tokens_padded, num_heads, head_dim]``."""
    key: torch.Tensor
    """``[num_tokens_padded, num_kv_heads, head_dim]``: this step's keys."""
    value: torch.Tensor
    """Same shape as ``key``."""
    kv_cache: torch.Tensor
    """The layer's cache, context already written, unwritten slots holding :data:`KV_POISON`."""
    metadata: AttentionMetadata
    spec: AttentionSpec
    full_keys: list[torch.Tensor]
    """Per request, ``[seq_len, num_kv_heads, head_dim]`` float32 (as stored: rounded to the KV dtype)."""
    full_values: list[torch.Tensor]
    """Same as ``full_keys``."""
    k_scale: float = 1.0
    """Other than 1.0: the cache holds keys divided by it (``write_kv_cache_scaled``); ``full_keys`` are what
    it stores times ``k_scale``."""
    v_scale: float = 1.0
    """The same for values."""

    @property
    def scaled(self) -> bool:
        """Whether the step runs through ``write_kv_cache_scaled`` and ``attention_scaled``."""
        return self.k_scale != 1.0 or self.v_scale != 1.0

    def write(self, backend: Backend, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store ``key``/``value`` at ``slot_mapping`` in the batch's cache as the engine would for this layer."""
        write_kv(backend, key, value, self.kv_cache, slot_mapping, self.k_scale, self.v_scale)

    def attend(self, backend: Backend) -> torch.Tensor:
        """The step's attention (after :meth:`write` of its keys and values), scaled or not."""
        if self.scaled:
            return backend.attention_scaled(self.query, self.key, self.value, self.kv_cache, self.metadata, self.spec,
                                            self.k_scale, self.v_scale)
        return backend.attention(self.query, self.key, self.value, self.kv_cache, self.metadata, self.spec)


def write_kv(backend: Backend, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """``backend.write_kv_cache``, or with a scale other than 1.0 ``write_kv_cache_scaled``, as a layer stores
    its keys and values (``PagedAttention``)."""
    if k_scale != 1.0 or v_scale != 1.0:
        backend.write_kv_cache_scaled(key, value, kv_cache, slot_mapping, k_scale, v_scale)
    else:
        backend.write_kv_cache(key, value, kv_cache, slot_mapping)


def order_requests(requests: list[RequestShape]) -> list[RequestShape]:
    """Put decodes (``query_len == 1``) first, keeping the order otherwise, as the model runner does."""
    return sorted(requests, key=lambda r: r.query_len != 1)


def build_attention_batch(
    backend: Backend,
    device: torch.device,
    requests: list[RequestShape],
    spec: AttentionSpec,
    block_size: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    generator: torch.Generator,
    num_padding_tokens: int = 0,
    spare_blocks: int = 3,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> AttentionBatch:
    """Lay out ``requests`` in a fresh paged cache and return this step's batch.

    Block ids come from a random permutation of ``1..num_blocks-1`` (block 0 is the null block that pads
    block tables); the cache gets ``spare_blocks`` unused blocks that only ever hold poison. The context
    of every request is written with one :meth:`Backend.write_kv_cache` call; this step's tokens are
    *not* written: the caller does that, as the engine does, right before attention. ``k_scale``/``v_scale``
    other than 1.0: keys and values of that magnitude (queries divided by ``k_scale``, so the scores stay
    near 1), written through :meth:`Backend.write_kv_cache_scaled`.
    """
    requests = order_requests(requests)
    num_kv_heads, head_dim = spec.num_kv_heads, spec.head_dim
    blocks_per_request = [math.ceil(r.seq_len / block_size) for r in requests]
    num_blocks = 1 + sum(blocks_per_request) + spare_blocks
    order = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    tables: list[list[int]] = []
    for count in blocks_per_request:
        tables.append(order[:count])
        order = order[count:]
    max_blocks = max(blocks_per_request) + 2  # wider than needed, like the model runner's tables

    def slots_of(table: list[int], positions: range) -> list[int]:
        return [table[p // block_size] * block_size + p % block_size for p in positions]

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    full_keys = [randn(r.seq_len, num_kv_heads, head_dim, scale=k_scale) for r in requests]
    full_values = [randn(r.seq_len, num_kv_heads, head_dim, scale=v_scale) for r in requests]
    kv_cache = torch.zeros(backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim), dtype=kv_dtype)
    kv_cache = kv_cache.fill_(KV_POISON).to(device)

    context_slots = [s for r, t in zip(requests, tables, strict=True) for s in slots_of(t, range(r.context_len))]
    if context_slots:
        ctx_k = torch.cat([k[: r.context_len] for r, k in zip(requests, full_keys, strict=True)])
        ctx_v = torch.cat([v[: r.context_len] for r, v in zip(requests, full_values, strict=True)])
        write_kv(backend, ctx_k.to(device), ctx_v.to(device), kv_cache,
                 torch.tensor(context_slots, dtype=torch.int64, device=device), k_scale, v_scale)

    new_slots = [s for r, t in zip(requests, tables, strict=True)
                 for s in slots_of(t, range(r.context_len, r.seq_len))]
    key = torch.cat([k[r.context_len :] for r, k in zip(requests, full_keys, strict=True)])
    value = torch.cat([v[r.context_len :] for r, v in zip(requests, full_values, strict=True)])
    num_tokens = key.shape[0]
    query = randn(num_tokens + num_padding_tokens, spec.num_heads, head_dim, scale=1.0 / k_scale)
    if num_padding_tokens:
        key = torch.cat([key, randn(num_padding_tokens, num_kv_heads, head_dim, scale=k_scale)])
        value = torch.cat([value, randn(num_padding_tokens, num_kv_heads, head_dim, scale=v_scale)])
        new_slots += [-1] * num_padding_tokens

    query_lens = torch.tensor([r.query_len for r in requests], dtype=torch.int32)
    query_start = torch.zeros(len(requests) + 1, dtype=torch.int32)
    query_start[1:] = torch.cumsum(query_lens, 0)
    seq_lens = torch.tensor([r.seq_len for r in requests], dtype=torch.int32)
    block_tables = torch.zeros(len(requests), max_blocks, dtype=torch.int32)
    for i, table in enumerate(tables):
        block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
    metadata = AttentionMetadata(
        num_tokens=num_tokens,
        num_decodes=sum(1 for r in requests if r.query_len == 1),
        query_start_loc=query_start.to(device),
        seq_lens=seq_lens.to(device),
        context_lens=torch.tensor([r.context_len for r in requests], dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(new_slots, dtype=torch.int64, device=device),
        max_query_len=max(r.query_len for r in requests),
        max_seq_len=max(r.seq_len for r in requests),
        block_size=block_size,
        query_start_loc_cpu=query_start,
        seq_lens_cpu=seq_lens,
    )
    return AttentionBatch(
        requests=requests,
        query=query.to(device),
        key=key.to(device),
        value=value.to(device),
        kv_cache=kv_cache,
        metadata=metadata,
        spec=spec,
        full_keys=[stored_value(k, kv_dtype, k_scale) for k in full_keys],
        full_values=[stored_value(v, kv_dtype, v_scale) for v in full_values],
        k_scale=k_scale,
        v_scale=v_scale,
    )


def as_decode_rows(metadata: AttentionMetadata) -> AttentionMetadata:
    """``metadata`` with every new token a decode row of its own: its request's block table, ``seq_len`` its
    position plus one, one query token (the layout of speculative decoding's draft rows and of the last layer's
    sampled rows). The same tokens, slots and results: rows of one request see the rows before them through the
    cache, which holds this step's keys and values before attention."""
    query_lens = (metadata.query_start_loc_cpu[1:] - metadata.query_start_loc_cpu[:-1]).tolist()
    context_lens = (metadata.seq_lens_cpu - metadata.query_start_loc_cpu[1:] + metadata.query_start_loc_cpu[:-1])
    request_of_row = [r for r, n in enumerate(query_lens) for _ in range(n)]
    seq_lens = torch.tensor([int(context_lens[r]) + 1 + j for r, n in enumerate(query_lens) for j in range(n)],
                            dtype=torch.int32)
    device = metadata.seq_lens.device
    query_start = torch.arange(len(request_of_row) + 1, dtype=torch.int32)
    return AttentionMetadata(
        num_tokens=metadata.num_tokens, num_decodes=len(request_of_row), query_start_loc=query_start.to(device),
        seq_lens=seq_lens.to(device), context_lens=(seq_lens - 1).to(device),
        block_tables=metadata.block_tables[torch.tensor(request_of_row, device=device)],
        slot_mapping=metadata.slot_mapping, max_query_len=1, max_seq_len=int(seq_lens.max()),
        block_size=metadata.block_size, query_start_loc_cpu=query_start, seq_lens_cpu=seq_lens)


def stored_value(values: torch.Tensor, kv_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """What a cache of ``kv_dtype`` holding ``values`` stands for, in float32: the values rounded to it, or with a
    ``scale`` other than 1.0 ``values / scale`` rounded to it (``kv_storage.divide_by_scale``) times ``scale``."""
    if scale == 1.0:
        return to_cache_dtype(values, kv_dtype).float()
    return to_cache_dtype(divide_by_scale(values, scale), kv_dtype).float() * scale


def reference_attention(batch: AttentionBatch) -> torch.Tensor:
    """Float32 causal attention of the batch's real tokens, one request at a time, from the K/V as stored.

    Query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``; token ``t`` of a request sits at
    position ``context_len + t`` and sees positions ``0..p`` (within ``spec.sliding_window``); scores are
    soft-capped when ``spec.logits_soft_cap`` is set. Returns
    ``[num_tokens, num_heads, head_dim]`` float32 on the CPU.
    """
    spec = batch.spec
    group = spec.num_heads // spec.num_kv_heads
    query = batch.query[: batch.metadata.num_tokens].float().cpu()
    outputs = []
    start = 0
    for request, keys, values in zip(batch.requests, batch.full_keys, batch.full_values, strict=True):
        q = query[start : start + request.query_len]  # [Q, H, D]
        start += request.query_len
        k = keys.repeat_interleave(group, dim=1)  # [S, H, D]
        v = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * spec.scale
        if spec.logits_soft_cap:
            scores = torch.tanh(scores / spec.logits_soft_cap) * spec.logits_soft_cap
        query_pos = request.context_len + torch.arange(request.query_len)
        key_pos = torch.arange(request.seq_len)
        allowed = key_pos[None, :] <= query_pos[:, None]
        if spec.sliding_window is not None:
            allowed &= key_pos[None, :] > query_pos[:, None] - spec.sliding_window
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v))
    return torch.cat(outputs)


def describe_mismatch(batch: AttentionBatch, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> str:
    """Return a short account of where ``actual`` leaves ``expected`` (per request, worst token and head)."""
    lines = []
    start = 0
    for index, request in enumerate(batch.requests):
        a = actual[start : start + request.query_len]
        e = expected[start : start + request.query_len]
        start += request.query_len
        bad = ~torch.isclose(a, e, atol=tol.atol, rtol=tol.rtol)
        if bool(bad.any()):
            err = (a - e).abs().nan_to_num(float("inf"))
            flat = int(err.flatten().argmax())
            token, head = flat // (err.shape[1] * err.shape[2]), (flat // err.shape[2]) % err.shape[1]
            lines.append(
                f"request {index} (context {request.context_len}, new {request.query_len}): "
                f"{int(bad.sum())} elements off, worst |err|={float(err.max()):.4g} at token {token} head {head}"
                + (", NaN present (unwritten output?)" if bool(a.isnan().any()) else "")
            )
    return "\n".join(lines) or "no element outside tolerance"


class DefaultOpsBackend(Backend):
    """The base class's fused ops (``rms_norm``, ``add_rms_norm``, ``rotary_embedding``, ``silu_and_mul``)
    on a backend that overrides none of them: the reference fused-op overrides are compared against.

    Its abstract methods raise: it is never used for memory or attention.
    """

    name = "reference"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        """Never selectable."""
        return False, "the conformance kit's fused-op reference, not a backend"

    def capabilities(self) -> BackendCapabilities:
        """Not used."""
        raise NotImplementedError

    def memory_info(self) -> tuple[int, int]:
        """Not used."""
        raise NotImplementedError

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Not used."""
        raise NotImplementedError

    def write_kv_cache(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Not used."""
        raise NotImplementedError

    def read_kv_cache(self, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Not used."""
        raise NotImplementedError

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        """Not used."""
        raise NotImplementedError

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        spec: AttentionSpec,
    ) -> torch.Tensor:
        """Not used."""
        raise NotImplementedError
