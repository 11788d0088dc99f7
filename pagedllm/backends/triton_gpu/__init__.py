"""Triton kernels and the device life shared by the GPU backends whose torch device is ``"cuda"``: NVIDIA's CUDA
builds of torch (the ``cuda`` backend) and AMD's HIP builds (the ``rocm`` backend), where ``torch.cuda`` drives
the GPU and Triton compiles for either.

Not a plugin: each backend picks the kernels it launches and their tiles (:mod:`.tuning`). Nothing here imports
triton at package import; the kernel modules do, and the backends import them on first use.
"""
