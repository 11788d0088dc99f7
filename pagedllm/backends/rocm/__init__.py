"""The ``rocm`` backend: AMD Instinct GPUs through a ROCm (HIP) build of torch, with Triton kernels tuned for CDNA.

Nothing here imports triton: the kernel modules are imported on first use, so ``import pagedllm`` stays light on
machines without a GPU.
"""
