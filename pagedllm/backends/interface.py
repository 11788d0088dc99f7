"""The one abstract attention/memory backend every accelerator implements.

The hardware-neutral core (scheduler, block manager, model runner, model definitions) talks to an
accelerator only through :class:`Backend`. A backend is registered through pluggy (see
``pagedllm.backends.hookspecs``) exactly like a third-party plugin, and its behaviour is checked against
the ``cpu`` reference backend by the conformance kit (``pagedllm.conformance``).

Shapes used throughout:

- ``num_tokens``: tokens in the flat batch of one step (prefill chunks and decodes mixed),
- ``num_requests``: requests in that batch; decodes (one new token) come first, then prefills,
- ``num_heads`` / ``num_kv_heads`` / ``head_dim``: attention geometry of one layer,
- a KV cache is one tensor per layer whose layout the backend chooses (:meth:`Backend.kv_cache_shape`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# The interface version a backend declares in ``Backend.interface_version``. A backend is compatible when
# its major equals ours and its minor is not newer than ours (it may use nothing we do not have).
INTERFACE_VERSION: tuple[int, int] = (1, 0)


def is_compatible_version(plugin_version: tuple[int, int]) -> bool:
    """Tell whether a backend implementing ``plugin_version`` can run on this pagedllm.

    Returns True when the majors are equal and the plugin's minor is <= ours.
    """
    return plugin_version[0] == INTERFACE_VERSION[0] and plugin_version[1] <= INTERFACE_VERSION[1]


@dataclass(frozen=True, slots=True)
class BackendCapabilities:
    """What a backend can do; the core adapts to it and never asks which vendor it is.

    The conformance kit tests exactly the combinations claimed here.
    """

    dtypes: tuple[torch.dtype, ...]
    """Model/activation dtypes the attention and fused ops accept."""
    kv_cache_dtypes: tuple[torch.dtype, ...]
    """Dtypes the KV cache may be stored in."""
    block_sizes: tuple[int, ...]
    """KV block sizes (token slots per block) supported; the core picks the configured one if listed,
    else the first."""
    head_sizes: tuple[int, ...]
    """Head dimensions supported by the attention kernels."""
    needs_static_shapes: bool = False
    """True for compile-to-fixed-shape devices: the core pads batches to ``token_buckets``."""
    token_buckets: tuple[int, ...] = ()
    """Padded token counts to use when ``needs_static_shapes``."""
    supports_chunked_prefill: bool = True
    """False: a prompt is always prefilled in one step (the token budget is raised to fit it)."""
    supports_sliding_window: bool = True
    """Whether ``AttentionSpec.sliding_window`` is honoured."""
    can_capture_graphs: bool = False
    """Whether :meth:`Backend.capture_graph` records replayable device graphs."""
    supports_distributed: bool = True
    """Whether several processes of this backend can run tensor parallel through ``dist_backend``."""


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """Per-layer constants of an attention call.

    ``sliding_window``: a query at position p sees keys at positions in ``(p - sliding_window, p]``;
    None means full causal attention.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs to know about one flat batch, built once per step by the model runner.

    Requests are ordered decodes first (``query_len == 1``), then prefills (chunks of one or more
    tokens, possibly over cached prefix blocks). Token ``t`` of request ``r`` is row
    ``query_start_loc[r] + t`` of the flat batch and sits at position ``context_lens[r] + t``.

    Slot mapping, worked example with ``block_size=4``: a request with block table ``[7, 2]`` whose
    tokens at positions 3, 4, 5 are in this step writes them to slots ``7*4+3=31``, ``2*4+0=8``,
    ``2*4+1=9``. A slot of ``-1`` marks a padding token that must not be written.
    """

    num_tokens: int
    """Real tokens in the batch (rows of ``slot_mapping`` that are >= 0 come first)."""
    num_decodes: int
    """Leading requests that add exactly one token each."""
    query_start_loc: torch.Tensor
    """``[num_requests + 1]`` int32 on device: prefix sums of the new-token counts."""
    seq_lens: torch.Tensor
    """``[num_requests]`` int32 on device: context + new tokens of each request."""
    context_lens: torch.Tensor
    """``[num_requests]`` int32 on device: tokens already in the KV cache before this step."""
    block_tables: torch.Tensor
    """``[num_requests, max_blocks_per_seq]`` int32 on device; unused entries are 0."""
    slot_mapping: torch.Tensor
    """``[num_tokens_padded]`` int64 on device: the KV slot of each token, -1 for padding."""
    max_query_len: int
    max_seq_len: int
    block_size: int
    query_start_loc_cpu: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int32))
    """Host copy of ``query_start_loc`` for backends that plan work on the host."""
    seq_lens_cpu: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    """Host copy of ``seq_lens``."""

    @property
    def num_requests(self) -> int:
        """Number of requests in the batch."""
        return int(self.seq_lens.shape[0])


class Backend(abc.ABC):
    """Abstract accelerator backend: device life, KV cache layout and writes, paged attention, fused ops.

    One instance is created per process by the registry after the plugin is loaded. Methods called on
    the per-token path (``write_kv_cache``, ``attention``, fused ops) must not synchronize the host.
    """

    name: str = ""
    """One word: the folder, entry point, ``--device`` value and test id (e.g. ``cpu``)."""
    device_type: str = "cpu"
    """The torch device type tensors live on (``cpu``, ``cuda``, ``xpu``, ...)."""
    dist_backend: str = "gloo"
    """The ``torch.distributed`` backend for tensor parallelism (``gloo``, ``nccl``, ``xccl``, ...)."""
    interface_version: tuple[int, int] = INTERFACE_VERSION
    """The interface version this backend implements; checked at registration."""
    priority: int = 0
    """Order for ``--device auto`` among available backends: higher is tried first."""

    # ------------------------------------------------------------------ identity and capabilities
    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> tuple[bool, str]:
        """Tell whether this backend can run on this machine; called by the registry for ``--device``
        and ``pagedllm backends``.

        Cheap, never raises: vendor SDKs are imported inside a try. Returns ``(True, "")`` or
        ``(False, reason)`` where the reason tells the operator what is missing.
        """

    @abc.abstractmethod
    def capabilities(self) -> BackendCapabilities:
        """Return what this backend supports; called once when the engine is configured."""

    # ------------------------------------------------------------------ device life
    def init_device(self, rank: int, world_size: int) -> None:  # noqa: B027 - neutral default
        """Bind this process to its device; called once per worker before any tensor is created.

        ``rank``/``world_size``: the tensor-parallel position of this process. Default: nothing to do.
        """

    def device(self, rank: int = 0) -> torch.device:
        """Return the torch device of local rank ``rank`` (default ``torch.device(device_type)``)."""
        return torch.device(self.device_type)

    @abc.abstractmethod
    def memory_info(self) -> tuple[int, int]:
        """Return ``(free_bytes, total_bytes)`` of the memory KV blocks would be allocated in."""

    def kv_cache_budget_bytes(self, memory_utilization: float) -> int:
        """Return the bytes the KV pool may take; called after the model is loaded and profiled.

        Default: ``memory_utilization * free_bytes``. Backends with a better rule override it.
        """
        free_bytes, _ = self.memory_info()
        return int(free_bytes * memory_utilization)

    def synchronize(self) -> None:  # noqa: B027 - neutral default
        """Wait for queued device work to finish (used by benchmarks and profiling only)."""

    # ------------------------------------------------------------------ KV cache
    @abc.abstractmethod
    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Return the shape of one layer's KV cache tensor; the backend owns the layout.

        Called once when the KV pool is allocated (``torch.zeros(shape, dtype, device)`` per layer).
        """

    @abc.abstractmethod
    def write_kv_cache(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Store this step's keys and values in the paged cache, in place.

        ``key``, ``value``: ``[num_tokens, num_kv_heads, head_dim]``; ``slot_mapping``: ``[num_tokens]``
        int64, the slot of each token (see :class:`AttentionMetadata`), -1 for tokens not to store.
        """

    @abc.abstractmethod
    def read_kv_cache(
        self, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(key, value)`` stored at the given slots, each ``[num_slots, num_kv_heads, head_dim]``.

        Not on the hot path: used by the conformance kit to check writes round-trip.
        """

    @abc.abstractmethod
    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        """Copy whole blocks, in every layer's cache, in place (copy-on-write of shared blocks).

        ``src_to_dst``: ``[num_pairs, 2]`` int64, each row ``(src_block_id, dst_block_id)``.
        """

    # ------------------------------------------------------------------ attention
    @abc.abstractmethod
    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        spec: AttentionSpec,
    ) -> torch.Tensor:
        """Causal attention of the mixed batch over the paged cache; called once per layer per step,
        after :meth:`write_kv_cache` stored this step's keys and values.

        ``query``: ``[num_tokens, num_heads, head_dim]``; ``key``/``value``: ``[num_tokens,
        num_kv_heads, head_dim]`` (this step's, also already in the cache). Each token attends to its
        request's cached context and to the new tokens up to itself, through ``metadata.block_tables``.
        Rows of padding tokens may hold anything. Returns ``[num_tokens, num_heads, head_dim]`` in
        ``query``'s dtype.
        """

    # ------------------------------------------------------------------ optional fused ops
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm as Hugging Face computes it: float32 variance, then ``weight * x.to(dtype)``.

        ``x``: ``[num_tokens, hidden]``; ``weight``: ``[hidden]``. Returns ``[num_tokens, hidden]``.
        """
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual add then RMSNorm: returns ``(rms_norm(x + residual), x + residual)``.

        Shapes as :meth:`rms_norm`; backends may fuse both and may write into ``residual`` in place.
        """
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply rotary embedding (Hugging Face "rotate half" / NeoX layout).

        ``positions``: ``[num_tokens]`` int64; ``query``: ``[num_tokens, num_heads, head_dim]``;
        ``key``: ``[num_tokens, num_kv_heads, head_dim]``; ``cos_sin_cache``: ``[max_position,
        head_dim]`` float32, cos in the first half of the last dim and sin in the second. Returns the
        rotated ``(query, key)`` in their dtype.
        """
        cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(query.dtype)
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(query.dtype)

        def rotate_half(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((-x2, x1), dim=-1)

        return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(x[:, :d]) * x[:, d:]`` for ``x: [num_tokens, 2 * d]``; returns ``[num_tokens, d]``."""
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    # ------------------------------------------------------------------ optional step capture
    def capture_graph(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record ``fn`` (a decode step over static buffers) once and return a replay callable.

        Called by the model runner at start-up only when ``capabilities().can_capture_graphs``; replay
        re-runs the recorded device work on whatever the static buffers hold. Default: not supported.
        """
        raise NotImplementedError(f"backend {self.name!r} cannot capture graphs")
