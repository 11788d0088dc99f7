"""The part of a GPU backend that ``torch.cuda`` and Triton give alike on NVIDIA's CUDA and AMD's HIP builds of
torch: device life and memory, the KV cache and attention, the fused ops, the MoE kernels and graph capture.

:class:`TritonGpuBackend` is not a backend by itself (no name, no availability check, no capabilities): the
``cuda`` and ``rocm`` plugins subclass it, say where they run and what they claim, and give their tiles
(:meth:`TritonGpuBackend.kernel_tuning`). The kernel modules (and so triton) are imported on first use, inside
the methods that launch them, so loading a plugin or probing ``is_available`` never compiles or touches a GPU.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from pagedllm.backends import kv_storage
from pagedllm.backends.interface import AttentionMetadata, AttentionSpec, Backend, BackendCapabilities
from pagedllm.backends.triton_gpu.tuning import KernelTuning

logger = logging.getLogger(__name__)

_ALLOC_MARGIN_BYTES = 256 << 20
"""Left free when the KV pool is sized by what is allocatable now (allocator rounding, small buffers)."""

LARGE_GPU_BYTES = 70 * 2**30
"""Device memory from which the larger scheduler defaults apply (vLLM's threshold)."""


def scheduler_defaults() -> tuple[int, int]:
    """``(max_num_seqs, max_num_batched_tokens)`` when the user sets none, as vLLM's for offline runs: 1024 and
    16384 on GPUs of at least :data:`LARGE_GPU_BYTES` (decode steps of hundreds of requests keep the matrix units
    busy; measured on an H200 in benchmarks/RESULTS.md), else 256 and 8192 (also without a visible GPU)."""
    try:
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            if total >= LARGE_GPU_BYTES:
                return 1024, 16384
    except Exception:  # capabilities are also listed on machines without a GPU
        pass
    return 256, 8192


def gpu_capabilities(dtypes: tuple[torch.dtype, ...], kv_cache_dtypes: tuple[torch.dtype, ...],
                     quantizations: tuple[str, ...] = ()) -> BackendCapabilities:
    """The claims of a backend running the shared kernels, given its model and KV-cache dtypes and quantizations:
    KV blocks of 16/32/64, heads up to 256 (any size works, padded to a power of two with masks; these are the
    tested ones), sliding windows, soft-capped scores, graphs of decode steps, asynchronous scheduling, kernels
    compiled at start, and :func:`scheduler_defaults`."""
    max_num_seqs, max_num_batched_tokens = scheduler_defaults()
    return BackendCapabilities(
        dtypes=dtypes,
        kv_cache_dtypes=kv_cache_dtypes,
        block_sizes=(16, 32, 64),
        head_sizes=(64, 80, 96, 112, 128, 256, 32, 16, 8),
        supports_sliding_window=True,
        supports_logits_soft_cap=True,
        can_capture_graphs=True,
        runs_asynchronously=True,
        compiles_kernels=True,
        default_max_num_seqs=max_num_seqs,
        default_max_num_batched_tokens=max_num_batched_tokens,
        quantizations=quantizations,
    )


def triton_problem() -> str:
    """Why triton cannot run kernels here (not installed, or its import fails), or ``""``; never raises."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; install the triton that matches your torch"
    try:
        import triton  # noqa: F401 - a broken install fails here, not in the first kernel launch
    except Exception as exc:
        return f"triton cannot be imported ({type(exc).__name__}: {exc}); reinstall it"
    return ""


class TritonGpuBackend(Backend):
    """Triton kernels on a GPU that torch drives through ``torch.cuda``; KV layout ``[2, num_blocks, block_size,
    num_kv_heads, head_dim]``."""

    device_type = "cuda"  # what torch calls the device on CUDA and on HIP builds alike
    dist_backend = "nccl"  # NCCL on CUDA builds, RCCL (under the same name) on HIP builds

    def __init__(self) -> None:
        # One memory pool shared by every captured graph: graphs of different batch sizes replay one at a
        # time, so they can reuse the same intermediate buffers.
        self._graph_pool: object | None = None
        self._tuning: KernelTuning | None = None

    def kernel_tuning(self) -> KernelTuning:
        """The tiles this backend launches the shared kernels with; called at each attention and MoE launch
        (cached after the first call). Subclasses override :meth:`make_kernel_tuning`."""
        if self._tuning is None:
            self._tuning = self.make_kernel_tuning()
        return self._tuning

    def make_kernel_tuning(self) -> KernelTuning:
        """Build this GPU family's :class:`KernelTuning` (called once, on the first launch)."""
        raise NotImplementedError(f"{type(self).__name__} gives no kernel tuning")

    # ------------------------------------------------------------------ device life
    def init_device(self, rank: int, world_size: int) -> None:
        """Make the local GPU of ``rank`` the current device and restart its peak-memory count (the KV
        budget subtracts the peak reached from here on, restarted by :meth:`weights_loaded`: the stored weights
        and the profiling forward)."""
        torch.cuda.set_device(self.device(rank))
        torch.cuda.reset_peak_memory_stats()

    def weights_loaded(self) -> None:
        """Restart the peak-memory count: with ``quantization="fp8"`` the model-dtype weights loaded first
        are freed, and the KV budget should subtract only the stored weights and the profiling forward."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def device(self, rank: int = 0) -> torch.device:
        """Return ``cuda:(rank % visible GPUs)``: one process per GPU, also when each sees only its own."""
        return torch.device("cuda", rank % max(1, torch.cuda.device_count()))

    def memory_info(self) -> tuple[int, int]:
        """Return ``(free_bytes, total_bytes)`` of the current GPU (``torch.cuda.mem_get_info``)."""
        free_bytes, total_bytes = torch.cuda.mem_get_info()
        return int(free_bytes), int(total_bytes)

    def kv_cache_budget_bytes(self, memory_utilization: float) -> int:
        """Bytes the KV pool may take: ``total * memory_utilization`` minus what the process needs besides it.

        Called right after the profiling forward at the token budget. Subtracted: torch's peak allocation
        since :meth:`weights_loaded` (the stored weights plus that forward's activations, so the peak of any later step
        fits) and the memory outside torch's pool (CUDA context, cuBLAS workspaces, other processes: used
        minus reserved). Capped by what can be allocated right now (free plus torch's cached, unused
        blocks), less a small margin. Cached activation blocks are released first so the pool can use them.
        """
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        gc.collect()
        torch.cuda.empty_cache()
        free_bytes, total_bytes = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
        allocated = torch.cuda.memory_allocated()
        non_torch = max(0, total_bytes - free_bytes - reserved)
        budget = int(total_bytes * memory_utilization) - peak - non_torch
        available_now = free_bytes + reserved - allocated - _ALLOC_MARGIN_BYTES
        budget = max(0, min(budget, available_now))
        logger.info(
            "%s KV budget: total %.2f GiB x %.2f - peak torch %.2f GiB - non-torch %.2f GiB = %.2f GiB", self.name,
            total_bytes / 2**30, memory_utilization, peak / 2**30, non_torch / 2**30, budget / 2**30,
        )
        return budget

    def synchronize(self) -> None:
        """Wait for every queued kernel of the current GPU."""
        torch.cuda.synchronize()

    # ------------------------------------------------------------------ KV cache
    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """``(2, num_blocks, block_size, num_kv_heads, head_dim)``: keys then values; a token's heads are
        contiguous so one write per token stores them all."""
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def write_kv_cache(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` to their slots (Triton)."""
        from pagedllm.backends.triton_gpu.kv_cache_kernels import write_kv_cache

        write_kv_cache(key, value, kv_cache, slot_mapping)

    def read_kv_cache(self, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        """Split-K decode then varlen flash prefill over the paged cache (``attention.paged_attention``).

        ``query``: ``[num_tokens, num_heads, head_dim]``; ``key``/``value`` are unused (already in
        ``kv_cache``). Returns ``[num_tokens, num_heads, head_dim]``; padding rows are uninitialized.
        """
        from pagedllm.backends.triton_gpu.attention import paged_attention

        return paged_attention(query, kv_cache, metadata, spec, tuning=self.kernel_tuning())

    def write_kv_cache_scaled(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
        k_scale: float, v_scale: float,
    ) -> None:
        """:meth:`write_kv_cache` dividing by the scales in the same kernel: each value times the float32 inverse
        of its scale, in float32, before the cast to the cache's dtype."""
        from pagedllm.backends.triton_gpu.kv_cache_kernels import write_kv_cache

        write_kv_cache(key, value, kv_cache, slot_mapping, k_scale, v_scale)

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
        """:meth:`attention` over scaled keys and values: ``k_scale`` folded into the score scale, the float32
        output times ``v_scale`` inside the same kernels, before the cast."""
        from pagedllm.backends.triton_gpu.attention import paged_attention

        return paged_attention(query, kv_cache, metadata, replace(spec, scale=spec.scale * k_scale), v_scale=v_scale,
                               tuning=self.kernel_tuning())

    # ------------------------------------------------------------------ fused ops
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Triton RMSNorm of ``x: [..., hidden]`` with ``weight: [hidden]``, one program per row; rounds
        like the default (Hugging Face)."""
        from pagedllm.backends.triton_gpu.fused_kernels import rms_norm

        return rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused residual add + RMSNorm of ``[num_tokens, hidden]`` tensors; the sum is written into
        ``residual`` in place and returned as the second element."""
        if residual.dtype != x.dtype or residual.shape != x.shape or not residual.is_contiguous():
            return super().add_rms_norm(x, residual, weight, eps)
        from pagedllm.backends.triton_gpu.fused_kernels import add_rms_norm

        return add_rms_norm(x, residual, weight, eps)

    def rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton NeoX rotary of ``query: [num_tokens, num_heads, head_dim]`` and ``key: [num_tokens,
        num_kv_heads, head_dim]`` in one launch; returns new tensors, inputs untouched."""
        if cos_sin_cache.shape[-1] != query.shape[-1] or query.dtype != key.dtype:
            return super().rotary_embedding(positions, query, key, cos_sin_cache)
        from pagedllm.backends.triton_gpu.fused_kernels import rotary_embedding

        return rotary_embedding(positions, query, key, cos_sin_cache)

    def qk_norm_rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, q_weight: torch.Tensor,
        k_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3's per-head q/k RMSNorms inside the Triton rotary kernel: one launch, q and k read once from
        the q|k|v output (the default: two copies, two norm launches and the rotary)."""
        if (cos_sin_cache.shape[-1] != query.shape[-1] or query.dtype != key.dtype
                or q_weight.dtype != query.dtype or k_weight.dtype != query.dtype):
            return super().qk_norm_rotary_embedding(positions, query, key, q_weight, k_weight, eps, cos_sin_cache)
        from pagedllm.backends.triton_gpu.fused_kernels import rotary_embedding

        return rotary_embedding(positions, query, key, cos_sin_cache, head_norms=(q_weight, k_weight, eps))

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """Triton ``silu(x[:, :d]) * x[:, d:]`` for ``x: [num_tokens, 2 * d]``, rounded like the default."""
        from pagedllm.backends.triton_gpu.fused_kernels import silu_and_mul

        return silu_and_mul(x)

    def topk_softmax(self, router_logits: torch.Tensor, top_k: int, renormalize: bool,
                     round_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One Triton program per token: softmax, top-k, renormalization and rounding (``fused_moe.topk_softmax``);
        routers it does not take (more than ``MAX_ROUTED_EXPERTS`` experts) go to the default."""
        from pagedllm.backends.triton_gpu import fused_moe as kernels

        routed = kernels.topk_softmax(router_logits, top_k, renormalize, round_to)
        return routed if routed is not None else super().topk_softmax(router_logits, top_k, renormalize, round_to)

    def fused_moe(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
        """Two Triton grouped GEMMs over the pairs sorted by expert on the device (graphs capture them), SiLU-and-mul
        between (``pagedllm.backends.triton_gpu.fused_moe``); operands it does not take go to the default."""
        from pagedllm.backends.triton_gpu import fused_moe as kernels

        if not kernels.takes(x, w13, w2):
            return super().fused_moe(x, w13, w2, topk_weights, topk_ids)
        return kernels.fused_moe(x, w13, w2, topk_weights, topk_ids, self.silu_and_mul, tiles=self.kernel_tuning().moe)

    def linear_w4a16(
        self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
        g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Triton kernels reading the 4-bit weight as it is (``pagedllm.backends.triton_gpu.w4a16_linear``): a GEMV
        for one-token steps, a GEMM dequantizing each tile as it reads it for longer ones, with the GPU family's
        tiles (``KernelTuning.w4a16``); no host sync (graphs capture them)."""
        from pagedllm.backends.triton_gpu.w4a16_linear import linear_w4a16

        return linear_w4a16(x, weight, scales, zeros, group_size, g_idx, bias, table=self.kernel_tuning().w4a16)


    # ------------------------------------------------------------------ step capture
    def capture_graph(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Warm ``fn`` up on a side stream (compiles the kernels), record it in a ``torch.cuda.CUDAGraph``
        sharing this backend's memory pool, and return the graph's ``replay``."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            fn()
        return graph.replay

