"""The ``rocm`` backend: AMD Instinct (CDNA) and Radeon (RDNA3/4) GPUs through a ROCm build of torch, attention and
fused ops as Triton kernels.

On a ROCm build, ``torch.cuda`` drives the AMD GPU (HIP) and Triton compiles for it, so what the ``cuda`` backend
shares with this one lives in :class:`~pagedllm.backends.triton_gpu.backend.TritonGpuBackend`: device life, the
KV cache, attention, the fused ops, the MoE kernels and graph capture (HIP graphs, through the same
``torch.cuda.CUDAGraph``). Here is what is AMD's: the availability check (a HIP build, an AMD GPU of an
architecture the kernels are compile-checked for), the claims, and each family's tiles
(:mod:`pagedllm.backends.rocm.tuning`).
Linear layers run through torch (hipBLASLt); the NVIDIA-only pieces of ``cuda`` (the one-token GEMVs tuned on an
H200, fp8 through cuBLAS's scaled products, symmetric-memory collectives) are not claimed here.
"""

from __future__ import annotations

import torch

from pagedllm.backends.interface import BackendCapabilities
from pagedllm.backends.rocm.tuning import OCP_FP8_ARCHS, SUPPORTED_ARCHS, tuning_for
from pagedllm.backends.triton_gpu.backend import TritonGpuBackend, gpu_capabilities, triton_problem
from pagedllm.backends.triton_gpu.tuning import KernelTuning


def gpu_arch(device_index: int = 0) -> str:
    """The GPU's architecture name without its feature flags (``"gfx942:sramecc+:xnack-"`` -> ``"gfx942"``)."""
    return torch.cuda.get_device_properties(device_index).gcnArchName.split(":")[0]


class RocmBackend(TritonGpuBackend):
    """Triton kernels on AMD CDNA and RDNA GPUs; KV layout ``[2, num_blocks, block_size, num_kv_heads, head_dim]``."""

    name = "rocm"
    # the cuda backend's interface, less what it claims only for NVIDIA (fp8, fp8_block, the GEMVs, collectives)
    interface_version = (1, 14)
    priority = 20  # above cuda: torch.cuda also answers on a ROCm build, and cuda then says to use rocm

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        """Available when torch is a ROCm (HIP) build that sees an AMD GPU of a supported architecture
        (:data:`~pagedllm.backends.rocm.tuning.SUPPORTED_ARCHS`) and triton can be imported."""
        try:
            if not getattr(torch.version, "hip", None):
                return False, (
                    f"torch {torch.__version__} is not a ROCm build (torch.version.hip is None); install torch for "
                    "ROCm (https://pytorch.org/get-started/locally/) on a machine with an AMD Instinct or Radeon GPU"
                )
            if not torch.cuda.is_available():
                return False, (
                    f"torch {torch.__version__} (HIP {torch.version.hip}) sees no AMD GPU; check the driver "
                    "(rocm-smi) and HIP_VISIBLE_DEVICES"
                )
            problem = triton_problem()
            if problem:
                return False, problem
            arch = gpu_arch()
            if arch not in SUPPORTED_ARCHS:
                known = ", ".join(f"{a} ({what})" for a, what in SUPPORTED_ARCHS.items())
                return False, f"GPU architecture {arch} is not one the rocm kernels are built for: {known}"
        except Exception as exc:  # never raise: the reason is shown to the operator
            return False, f"probing ROCm failed: {type(exc).__name__}: {exc}"
        return True, ""

    def capabilities(self) -> BackendCapabilities:
        """fp16/bf16/fp32, the KV cache in the same dtypes and, on GPUs with OCP 8-bit floats in hardware (gfx950,
        gfx1200, gfx1201: :data:`~pagedllm.backends.rocm.tuning.OCP_FP8_ARCHS`), also in fp8 e4m3 or e5m2 (vLLM's
        ``--kv-cache-dtype fp8`` / ``fp8_e5m2``, with checkpoints' KV scales); KV blocks of 16/32/64, heads up to
        256, sliding windows, soft-capped scores, 4-bit weights (``w4a16``: AWQ, GPTQ, compressed-tensors
        checkpoints; the shared Triton kernels with each family's tiles, ``KernelTuning.w4a16``), HIP graphs of
        decode steps, asynchronous scheduling. Scheduler
        defaults as ``cuda``'s: 1024 running requests and 16384 tokens a step on GPUs of at least 70 GiB (every
        MI300), else 256 and 8192 (a 24-48 GB Radeon).

        Not claimed: an fp8 KV cache on gfx90a, gfx942 and RDNA3 (gfx942 computes in the FNUZ fp8 formats, not the
        OCP e4m3/e5m2 that pagedllm stores and checkpoints hold; Triton would convert in software), fp8 linear
        layers, and graph-safe tensor-parallel collectives (tensor parallelism runs through RCCL; its decode steps
        run without graphs).
        """
        dtypes = (torch.float16, torch.bfloat16, torch.float32)
        kv_only: tuple[torch.dtype, ...] = ()
        try:
            if getattr(torch.version, "hip", None) and torch.cuda.is_available() and gpu_arch() in OCP_FP8_ARCHS:
                kv_only = (torch.float8_e4m3fn, torch.float8_e5m2)
        except Exception:  # capabilities are also listed on machines without a GPU
            pass
        return gpu_capabilities(dtypes, (*dtypes, *kv_only), ("w4a16",))

    def make_kernel_tuning(self) -> KernelTuning:
        """The tiles of the current GPU's family (:func:`pagedllm.backends.rocm.tuning.tuning_for`)."""
        return tuning_for(gpu_arch(torch.cuda.current_device()))
