"""The ``cuda`` backend: NVIDIA GPUs through torch.cuda, attention and fused ops as Triton kernels.

What it shares with the ``rocm`` backend (device life, KV cache, attention, fused ops, graphs) is
:class:`~pagedllm.backends.triton_gpu.backend.TritonGpuBackend`; here are what only NVIDIA GPUs get: the
availability check, the claims, the tiles measured on an H100 and an H200, the one-token Triton GEMVs, the fp8
linear layers through cuBLAS's scaled products and the symmetric-memory collectives. The kernel modules (and so
triton) are imported on first use, so loading the plugin or probing :meth:`CudaBackend.is_available` never
compiles or touches a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pagedllm.backends.interface import BackendCapabilities, DeviceCommunicator
from pagedllm.backends.triton_gpu.backend import TritonGpuBackend, gpu_capabilities, triton_problem
from pagedllm.backends.triton_gpu.tuning import KernelTuning, nvidia

logger = logging.getLogger(__name__)

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


class CudaBackend(TritonGpuBackend):
    """Triton kernels on CUDA; KV layout ``[2, num_blocks, block_size, num_kv_heads, head_dim]``."""

    name = "cuda"
    # communicator; linear, all_reduce_add_rms_norm; scheduler defaults; fp8; fp8_block; 1.8: qk_norm_rotary_embedding,
    # the fp8_block input ops, linear_fp8_static; 1.9: write_kv_cache_scaled, attention_scaled; 1.10: compiles_kernels;
    # 1.11: fused_moe; 1.12: gelu_and_mul (the default's torch ops); 1.13: topk_softmax
    interface_version = (1, 14)
    priority = 10  # below rocm: torch.cuda also answers on a ROCm build

    def make_kernel_tuning(self) -> KernelTuning:
        """The tiles measured on an H100 and an H200 (the kernel modules' defaults)."""
        return nvidia()

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
            problem = triton_problem()
            if problem:
                return False, problem
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
        Hopper with CUDA 12.9 or later, where cuBLAS has block-scaled e4m3 products), 4-bit weights (``w4a16``: AWQ,
        GPTQ, compressed-tensors checkpoints; Triton kernels), KV blocks of 16/32/64, heads up to 256.

        Scheduler defaults as vLLM's for offline runs (``triton_gpu.backend.scheduler_defaults``): on GPUs of at
        least 70 GiB (H100, H200) up to 1024 running requests and 16384 tokens a step, else 256 and 8192.
        """
        dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
        kv_only: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
        quantizations: tuple[str, ...] = ("fp8", "w4a16")
        try:
            if torch.cuda.is_available():
                capability = torch.cuda.get_device_capability()
                if capability[0] < 8:
                    dtypes = (torch.float16, torch.float32)
                if capability < (8, 9):  # 8-bit float conversions (Triton's "fp8e4nv", "fp8e5") need Ada or Hopper
                    kv_only = ()
                if capability < (9, 0):  # torch._scaled_mm's row-wise scales: tested on Hopper only
                    quantizations = ("w4a16",)
                elif capability == (9, 0) and _cuda_version() >= (12, 9):  # cuBLAS's block scales: Hopper only
                    quantizations = ("fp8", "fp8_block", "w4a16")
        except Exception:  # capabilities are also listed on machines without a GPU
            pass
        return gpu_capabilities(dtypes, (*dtypes, *kv_only), quantizations)

    def rms_norm_fp8(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton RMSNorm writing its output quantized per token (the default's up to the sum-of-squares order)."""
        from pagedllm.backends.triton_gpu.fused_kernels import rms_norm_fp8

        return rms_norm_fp8(x, weight, eps)

    def add_rms_norm_fp8(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused residual add + RMSNorm + per-token quantization; the sum is written into ``residual``."""
        if residual.dtype != x.dtype or residual.shape != x.shape or not residual.is_contiguous():
            return super().add_rms_norm_fp8(x, residual, weight, eps)
        from pagedllm.backends.triton_gpu.fused_kernels import add_rms_norm_fp8

        return add_rms_norm_fp8(x, residual, weight, eps)

    def silu_and_mul_fp8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton SiLU-and-mul writing its output quantized per token (bit for bit the default's)."""
        from pagedllm.backends.triton_gpu.fused_kernels import silu_and_mul_fp8

        return silu_and_mul_fp8(x)

    def linear_fp8_quantized(
        self, x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
        bias: torch.Tensor | None, out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """One token through the fp8 GEMV (no pass over the input for its scale); more through cuBLAS's e4m3
        product, as :meth:`linear_fp8` after its quantizer."""
        from pagedllm.backends.triton_gpu import fp8_linear, gemv

        return _one_token_first(gemv.gemv_fp8_quantized, fp8_linear.linear_fp8_quantized, x_q, x_scale, weight,
                                weight_scale, bias, out_dtype)

    def linear_fp8_block(
        self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One-token inputs through a Triton fp8 GEMV with tile scales (the input quantized per group inside
        it); more tokens through the Triton per-group quantizer and cuBLAS's block-scaled e4m3 product
        (``torch._scaled_mm`` with 1 x 128 and 128 x 128 scales; rows padded to a multiple of four); the
        reference for the shapes and float32 outputs it declines (``cuda.fp8_linear.block_product_takes``)."""
        from pagedllm.backends.triton_gpu import fp8_linear, gemv

        return _one_token_first(gemv.gemv_fp8_block, fp8_linear.linear_fp8_block, x, weight, weight_scale, bias)

    def linear_fp8_static(
        self, x: torch.Tensor, input_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The input quantized with its static scale by a Triton kernel (one pass), then
        :meth:`linear_fp8_quantized` (the fp8 GEMV at one token, cuBLAS above)."""
        from pagedllm.backends.triton_gpu.fp8_linear import quantize_with_scale

        x2 = x if x.stride(-1) == 1 else x.contiguous()
        return self.linear_fp8_quantized(*quantize_with_scale(x2, input_scale), weight, weight_scale, bias, x.dtype)

    def rms_norm_fp8_groups(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton RMSNorm writing its output quantized per token and group of 128, scales laid out for cuBLAS's
        block-scaled product (rows padded to four, column-major; returned as ``[num_tokens, groups]`` views)."""
        from pagedllm.backends.triton_gpu.fused_kernels import rms_norm_fp8

        return rms_norm_fp8(x, weight, eps, quantize="groups")

    def add_rms_norm_fp8_groups(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused residual add + RMSNorm + per-group quantization; the sum is written into ``residual``."""
        if residual.dtype != x.dtype or residual.shape != x.shape or not residual.is_contiguous():
            return super().add_rms_norm_fp8_groups(x, residual, weight, eps)
        from pagedllm.backends.triton_gpu.fused_kernels import add_rms_norm_fp8

        return add_rms_norm_fp8(x, residual, weight, eps, quantize="groups")

    def silu_and_mul_fp8_groups(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton SiLU-and-mul writing its output quantized per token and group of 128 (bit for bit the
        default's), laid out as :meth:`rms_norm_fp8_groups` lays it out."""
        from pagedllm.backends.triton_gpu.fused_kernels import silu_and_mul_fp8

        return silu_and_mul_fp8(x, quantize="groups")

    def linear_fp8_block_quantized(
        self, x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
        bias: torch.Tensor | None, out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """One token through the tile-scaled fp8 GEMV reading the quantized input; more through cuBLAS's
        block-scaled product on the fused ops' layout (no copy), as :meth:`linear_fp8_block` after its quantizer."""
        from pagedllm.backends.triton_gpu import fp8_linear, gemv

        return _one_token_first(gemv.gemv_fp8_block_quantized, fp8_linear.linear_fp8_block_quantized, x_q, x_scale,
                                weight, weight_scale, bias, out_dtype)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A Triton GEMV for one-token inputs (``x: [1, K]``, batch-1 decode), where it streams the weights
        faster than cuBLAS; cuBLAS (``torch.nn.functional.linear``) for everything else."""
        from pagedllm.backends.triton_gpu import gemv

        return _one_token_first(gemv.gemv, torch.nn.functional.linear, x, weight, bias)

    def linear_fp8(
        self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One-token inputs through a Triton fp8 GEMV (the input quantized inside it); more tokens through the
        Triton per-token quantizer and cuBLAS's e4m3 product (``torch._scaled_mm``, row-wise scales), which
        needs both dimensions of ``weight`` to be multiples of 16 (the reference otherwise)."""
        from pagedllm.backends.triton_gpu import fp8_linear, gemv

        return _one_token_first(gemv.gemv_fp8, fp8_linear.linear_fp8, x, weight, weight_scale, bias)

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
