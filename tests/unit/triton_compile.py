"""Compile a Triton kernel for a GPU this machine does not have (NVIDIA's sm_90, AMD's gfx942, ...): what the
real compiler accepts and how much shared memory each variant takes, checked without the hardware."""

from __future__ import annotations

import inspect

FLOAT_ARGUMENTS = ("qk_scale", "eps", "v_scale", "k_inv_scale", "v_inv_scale")
"""Scalar kernel arguments passed as Python floats (32-bit floats in the signature); other scalars are ints."""


def compile_kernel(kernel: object, pointers: dict[str, str], constexprs: dict[str, object],
                   target: tuple[str, object, int], **options: object) -> object:
    """Compile ``kernel`` (a ``@triton.jit`` function) for ``target`` = ``(backend, arch, warp_size)``, e.g.
    ``("cuda", 90, 32)`` or ``("hip", "gfx942", 64)``, and return the compiled kernel (``.metadata.shared``: its
    shared memory in bytes). ``pointers`` gives the pointer parameters' types (``"*bf16"``); they and the
    ``stride*`` parameters are declared 16-aligned as a real launch specializes them; other parameters not in
    ``constexprs`` are i32 (those named in :data:`FLOAT_ARGUMENTS`: fp32). ``options``: ``num_warps``, ...
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(kernel.fn).parameters)  # type: ignore[attr-defined]
    signature = {
        p: "constexpr" if p in constexprs else pointers.get(p, "fp32" if p in FLOAT_ARGUMENTS else "i32")
        for p in params
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in pointers or p.startswith("stride")}
    source = ASTSource(kernel, signature, {(params.index(k),): v for k, v in constexprs.items()}, attrs)
    return triton.compile(source, target=GPUTarget(*target), options=options)
