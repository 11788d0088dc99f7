"""The ``cuda`` backend: NVIDIA GPUs through torch.cuda, attention and fused ops as Triton kernels.

The kernel modules (and so triton) are imported on first use, inside the methods that launch them, so
loading the plugin or probing :meth:`CudaBackend.is_available` never compiles or touches a GPU.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from pagedllm.backends import kv_storage
from pagedllm.backends.interface import (
    AttentionMetadata,
    AttentionSpec,
    Backend,
    BackendCapabilities,
    DeviceCommunicator,
)

logger = logging.getLogger(__name__)

_ALLOC_MARGIN_BYTES = 256 << 20
"""Left free when the KV pool is sized by what is allocatable now (allocator rounding, small buffers)."""


LARGE_GPU_BYTES = 70 * 2**30
"""Device memory from which the larger scheduler defaults apply (vLLM's threshold)."""


def _cuda_version() -> tuple[int, ...]:
    """The CUDA version torch was built with, as numbers (``()`` for a build without CUDA)."""
    try:
        return tuple(int(part) for part in (torch.version.cuda or "").split(".")[:2])
    except ValueError:
        return ()


def _one_token_first(gemv: Callable[..., torch.Tensor | None], gemm: Callable[..., torch.Tensor], x: torch.Tensor,
                     *args: object) -> torch.Tensor:
    """``gemv(x, *args)`` for a one-row ``x: [1, K]`` (a batch-1 decode step's linear layer) where that GEMV
    takes the inputs (it returns None where not), else ``gemm(x, *args)``."""
    if x.dim() == 2 and x.shape[0] == 1:
        y = gemv(x, *args)
        if y is not None:
            return y
    return gemm(x, *args)


class CudaBackend(Backend):
    """Triton kernels on CUDA; KV layout ``[2, num_blocks, block_size, num_kv_heads, head_dim]``."""

    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    # communicator; linear, all_reduce_add_rms_norm; scheduler defaults; fp8; fp8_block; 1.8: qk_norm_rotary_embedding,
    # the fp8_block input ops, linear_fp8_static; 1.9: write_kv_cache_scaled, attention_scaled; 1.10: compiles_kernels;
    # 1.11: fused_moe; 1.12: gelu_and_mul (the default's torch ops); 1.13: topk_softmax
    interface_version = (1, 13)
    priority = 10  # below rocm: torch.cuda also answers on a ROCm build

    def __init__(self) -> None:
        # One memory pool shared by every captured graph: graphs of different batch sizes replay one at a
        # time, so they can reuse the same intermediate buffers.
        self._graph_pool: object | None = None

    # ------------------------------------------------------------------ identity and capabilities
    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        """Available when torch is a CUDA build that sees a GPU and triton can be imported."""
        try:
            if getattr(torch.version, "hip", None):
                return False, "this is a ROCm build of torch; use --device rocm"
            if not torch.cuda.is_available():
                return False, (
                    f"torch {torch.__version__} has no CUDA device (torch.version.cuda={torch.version.cuda}); "
                    "install a CUDA build of torch on a machine with an NVIDIA GPU"
                )
            if importlib.util.find_spec("triton") is None:
                return False, "triton is not installed; install the triton that matches your torch"
            try:
                import triton  # noqa: F401 - a broken install fails here, not in the first kernel launch
            except Exception as exc:
                return False, f"triton cannot be imported ({type(exc).__name__}: {exc}); reinstall it"
            major, minor = torch.cuda.get_device_capability()
            if major < 7:
                return False, f"GPU compute capability {major}.{minor} is below 7.0, the least triton supports"
        except Exception as exc:  # never raise: the reason is shown to the operator
            return False, f"probing CUDA failed: {type(exc).__name__}: {exc}"
        return True, ""

    def capabilities(self) -> BackendCapabilities:
        """fp16/bf16/fp32 (bf16 from compute capability 8.0), the KV cache also in fp8 e4m3 or e5m2 (vLLM's
        ``--kv-cache-dtype fp8`` / ``fp8_e5m2``, from compute capability 8.9), fp8 linear layers
        (``--quantization fp8``, from 9.0: its row-wise scaled e4m3 product has run on Hopper only; ``fp8_block`` on
        Hopper with CUDA 12.9 or later, where cuBLAS has block-scaled e4m3 products), KV blocks of 16/32/64, heads
        up to 256.

        Scheduler defaults as vLLM's for offline runs: on GPUs of at least 70 GiB (H100, H200) up to 1024
        running requests and 16384 tokens a step (decode steps of hundreds of requests keep the matrix units
        busy; measured in benchmarks/RESULTS.md), else 256 and 8192.
        """
        dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
        kv_only: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
        quantizations: tuple[str, ...] = ("fp8",)
        large = False
        try:
            if torch.cuda.is_available():
                capability = torch.cuda.get_device_capability()
                if capability[0] < 8:
                    dtypes = (torch.float16, torch.float32)
                if capability < (8, 9):  # 8-bit float conversions (Triton's "fp8e4nv", "fp8e5") need Ada or Hopper
                    kv_only = ()
                if capability < (9, 0):  # torch._scaled_mm's row-wise scales: tested on Hopper only
                    quantizations = ()
                elif capability == (9, 0) and _cuda_version() >= (12, 9):  # cuBLAS's block scales: Hopper only
                    quantizations = ("fp8", "fp8_block")
                large = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory >= LARGE_GPU_BYTES
        except Exception:  # capabilities are also listed on machines without a GPU
            pass
        return BackendCapabilities(
            dtypes=dtypes,
            kv_cache_dtypes=(*dtypes, *kv_only),
            block_sizes=(16, 32, 64),
            # Any head size up to 256 works (padded to a power of two with masks); these are the tested ones.
            head_sizes=(64, 80, 96, 112, 128, 256, 32, 16, 8),
            supports_sliding_window=True,
            supports_logits_soft_cap=True,
            can_capture_graphs=True,
            runs_asynchronously=True,
            compiles_kernels=True,
            default_max_num_seqs=1024 if large else 256,
            default_max_num_batched_tokens=16384 if large else 8192,
            quantizations=quantizations,
        )

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
            "cuda KV budget: total %.2f GiB x %.2f - peak torch %.2f GiB - non-torch %.2f GiB = %.2f GiB",
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
        from pagedllm.backends.cuda.kv_cache_kernels import write_kv_cache

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
        from pagedllm.backends.cuda.attention import paged_attention

        return paged_attention(query, kv_cache, metadata, spec)

    def write_kv_cache_scaled(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
        k_scale: float, v_scale: float,
    ) -> None:
        """:meth:`write_kv_cache` dividing by the scales in the same kernel: each value times the float32 inverse
        of its scale, in float32, before the cast to the cache's dtype."""
        from pagedllm.backends.cuda.kv_cache_kernels import write_kv_cache

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
        from pagedllm.backends.cuda.attention import paged_attention

        return paged_attention(query, kv_cache, metadata, replace(spec, scale=spec.scale * k_scale), v_scale=v_scale)

    # ------------------------------------------------------------------ fused ops
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Triton RMSNorm of ``x: [..., hidden]`` with ``weight: [hidden]``, one program per row; rounds
        like the default (Hugging Face)."""
        from pagedllm.backends.cuda.fused_kernels import rms_norm

        return rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused residual add + RMSNorm of ``[num_tokens, hidden]`` tensors; the sum is written into
        ``residual`` in place and returned as the second element."""
        if residual.dtype != x.dtype or residual.shape != x.shape or not residual.is_contiguous():
            return super().add_rms_norm(x, residual, weight, eps)
        from pagedllm.backends.cuda.fused_kernels import add_rms_norm

        return add_rms_norm(x, residual, weight, eps)

    def rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton NeoX rotary of ``query: [num_tokens, num_heads, head_dim]`` and ``key: [num_tokens,
        num_kv_heads, head_dim]`` in one launch; returns new tensors, inputs untouched."""
        if cos_sin_cache.shape[-1] != query.shape[-1] or query.dtype != key.dtype:
            return super().rotary_embedding(positions, query, key, cos_sin_cache)
        from pagedllm.backends.cuda.fused_kernels import rotary_embedding

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
        from pagedllm.backends.cuda.fused_kernels import rotary_embedding

        return rotary_embedding(positions, query, key, cos_sin_cache, head_norms=(q_weight, k_weight, eps))

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """Triton ``silu(x[:, :d]) * x[:, d:]`` for ``x: [num_tokens, 2 * d]``, rounded like the default."""
        from pagedllm.backends.cuda.fused_kernels import silu_and_mul

        return silu_and_mul(x)

    def topk_softmax(self, router_logits: torch.Tensor, top_k: int, renormalize: bool,
                     round_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One Triton program per token: softmax, top-k, renormalization and rounding (``fused_moe.topk_softmax``);
        routers it does not take (more than ``MAX_ROUTED_EXPERTS`` experts) go to the default."""
        from pagedllm.backends.cuda import fused_moe as kernels

        routed = kernels.topk_softmax(router_logits, top_k, renormalize, round_to)
        return routed if routed is not None else super().topk_softmax(router_logits, top_k, renormalize, round_to)

    def fused_moe(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
        """Two Triton grouped GEMMs over the pairs sorted by expert on the device (graphs capture them), SiLU-and-mul
        between (``pagedllm.backends.cuda.fused_moe``); operands it does not take go to the default."""
        from pagedllm.backends.cuda import fused_moe as kernels

        if not kernels.takes(x, w13, w2):
            return super().fused_moe(x, w13, w2, topk_weights, topk_ids)
        return kernels.fused_moe(x, w13, w2, topk_weights, topk_ids, self.silu_and_mul)

    def rms_norm_fp8(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton RMSNorm writing its output quantized per token (the default's up to the sum-of-squares order)."""
        from pagedllm.backends.cuda.fused_kernels import rms_norm_fp8

        return rms_norm_fp8(x, weight, eps)

    def add_rms_norm_fp8(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused residual add + RMSNorm + per-token quantization; the sum is written into ``residual``."""
        if residual.dtype != x.dtype or residual.shape != x.shape or not residual.is_contiguous():
            return super().add_rms_norm_fp8(x, residual, weight, eps)
        from pagedllm.backends.cuda.fused_kernels import add_rms_norm_fp8

        return add_rms_norm_fp8(x, residual, weight, eps)

    def silu_and_mul_fp8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton SiLU-and-mul writing its output quantized per token (bit for bit the default's)."""
        from pagedllm.backends.cuda.fused_kernels import silu_and_mul_fp8

        return silu_and_mul_fp8(x)

    def linear_fp8_quantized(
        self, x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
        bias: torch.Tensor | None, out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """One token through the fp8 GEMV (no pass over the input for its scale); more through cuBLAS's e4m3
        product, as :meth:`linear_fp8` after its quantizer."""
        from pagedllm.backends.cuda import fp8_linear, gemv

        return _one_token_first(gemv.gemv_fp8_quantized, fp8_linear.linear_fp8_quantized, x_q, x_scale, weight,
                                weight_scale, bias, out_dtype)

    def linear_fp8_block(
        self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One-token inputs through a Triton fp8 GEMV with tile scales (the input quantized per group inside
        it); more tokens through the Triton per-group quantizer and cuBLAS's block-scaled e4m3 product
        (``torch._scaled_mm`` with 1 x 128 and 128 x 128 scales; rows padded to a multiple of four); the
        reference for the shapes and float32 outputs it declines (``cuda.fp8_linear.block_product_takes``)."""
        from pagedllm.backends.cuda import fp8_linear, gemv

        return _one_token_first(gemv.gemv_fp8_block, fp8_linear.linear_fp8_block, x, weight, weight_scale, bias)

    def linear_fp8_static(
        self, x: torch.Tensor, input_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The input quantized with its static scale by a Triton kernel (one pass), then
        :meth:`linear_fp8_quantized` (the fp8 GEMV at one token, cuBLAS above)."""
        from pagedllm.backends.cuda.fp8_linear import quantize_with_scale

        x2 = x if x.stride(-1) == 1 else x.contiguous()
        return self.linear_fp8_quantized(*quantize_with_scale(x2, input_scale), weight, weight_scale, bias, x.dtype)

    def rms_norm_fp8_groups(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton RMSNorm writing its output quantized per token and group of 128, scales laid out for cuBLAS's
        block-scaled product (rows padded to four, column-major; returned as ``[num_tokens, groups]`` views)."""
        from pagedllm.backends.cuda.fused_kernels import rms_norm_fp8

        return rms_norm_fp8(x, weight, eps, quantize="groups")

    def add_rms_norm_fp8_groups(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused residual add + RMSNorm + per-group quantization; the sum is written into ``residual``."""
        if residual.dtype != x.dtype or residual.shape != x.shape or not residual.is_contiguous():
            return super().add_rms_norm_fp8_groups(x, residual, weight, eps)
        from pagedllm.backends.cuda.fused_kernels import add_rms_norm_fp8

        return add_rms_norm_fp8(x, residual, weight, eps, quantize="groups")

    def silu_and_mul_fp8_groups(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton SiLU-and-mul writing its output quantized per token and group of 128 (bit for bit the
        default's), laid out as :meth:`rms_norm_fp8_groups` lays it out."""
        from pagedllm.backends.cuda.fused_kernels import silu_and_mul_fp8

        return silu_and_mul_fp8(x, quantize="groups")

    def linear_fp8_block_quantized(
        self, x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
        bias: torch.Tensor | None, out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """One token through the tile-scaled fp8 GEMV reading the quantized input; more through cuBLAS's
        block-scaled product on the fused ops' layout (no copy), as :meth:`linear_fp8_block` after its quantizer."""
        from pagedllm.backends.cuda import fp8_linear, gemv

        return _one_token_first(gemv.gemv_fp8_block_quantized, fp8_linear.linear_fp8_block_quantized, x_q, x_scale,
                                weight, weight_scale, bias, out_dtype)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A Triton GEMV for one-token inputs (``x: [1, K]``, batch-1 decode), where it streams the weights
        faster than cuBLAS; cuBLAS (``torch.nn.functional.linear``) for everything else."""
        from pagedllm.backends.cuda import gemv

        return _one_token_first(gemv.gemv, torch.nn.functional.linear, x, weight, bias)

    def linear_fp8(
        self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One-token inputs through a Triton fp8 GEMV (the input quantized inside it); more tokens through the
        Triton per-token quantizer and cuBLAS's e4m3 product (``torch._scaled_mm``, row-wise scales), which
        needs both dimensions of ``weight`` to be multiples of 16 (the reference otherwise)."""
        from pagedllm.backends.cuda import fp8_linear, gemv

        return _one_token_first(gemv.gemv_fp8, fp8_linear.linear_fp8, x, weight, weight_scale, bias)

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

    # ------------------------------------------------------------------ tensor parallelism
    def create_communicator(
        self, process_group: object, device: torch.device, dtype: torch.dtype, max_bytes: int,
        max_gather_bytes: int = 0,
    ) -> DeviceCommunicator | None:
        """Symmetric-memory all-reduce and all-gather (graph-safe), or None with a logged reason when the GPUs
        cannot map each other's memory or the dtype is float16; tensor-parallel decode then runs without graphs."""
        from pagedllm.backends.cuda.communicator import SymmetricMemoryCommunicator

        try:
            return SymmetricMemoryCommunicator(process_group, device, dtype, max_bytes, max_gather_bytes)
        except Exception as exc:  # every rank fails alike (same torch, same machine); the worker checks
            logger.warning("cuda: no graph-safe collectives (%s: %s); tensor-parallel decode runs without graphs",
                           type(exc).__name__, exc)
            return None
