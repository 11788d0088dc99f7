"""The ``cuda`` backend: NVIDIA GPUs through torch.cuda, with its own Triton kernels.

Nothing here imports triton: the kernel modules are imported by :mod:`pagedllm.backends.cuda.backend` on
first use, so ``import pagedllm`` stays light on machines without a GPU.
"""
