"""Op level: the backend's fused ops against the ``Backend`` base-class defaults computed in float32.

A backend that does not override an op passes trivially; one that fuses it into a kernel must compute what
the neutral default computes, within the dtype's tolerance. For ``linear_fp8`` (when ``"fp8"`` is claimed)
that includes quantizing the input exactly as the reference does: its e4m3 weight and scales are given.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pagedllm.backends.fp8_linear import quantize_rows
from pagedllm.backends.interface import Backend
from pagedllm.conformance.cases import all_dtypes, base_head_size, dtype_skip, param
from pagedllm.conformance.plugin import ConformanceTarget, case_id, get_target
from pagedllm.conformance.reference import DefaultOpsBackend, poisoned_allocations, tolerance

NUM_TOKENS = 7
HIDDEN = 96
IN_FEATURES, OUT_FEATURES = 256, 80
# case name -> the Backend method it calls; the linear layers twice: a backend may take one-token inputs
# (batch-1 decode) through another kernel
OPS: dict[str, str] = {"rms_norm": "rms_norm", "add_rms_norm": "add_rms_norm", "rotary_embedding": "rotary_embedding",
                       "silu_and_mul": "silu_and_mul", "linear": "linear", "linear_one_token": "linear",
                       "linear_fp8": "linear_fp8", "linear_fp8_one_token": "linear_fp8"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``fused_case`` as (case, dtype) for every case of :data:`OPS` and dtype."""
    if "fused_case" in metafunc.fixturenames:
        capabilities = get_target(metafunc.config).capabilities
        unclaimed_fp8 = None if "fp8" in capabilities.quantizations else "fp8 linear layers not claimed (quantizations)"
        metafunc.parametrize(
            "fused_case",
            [param(case_id(metafunc.config, op, dtype), (op, dtype),
                   skip=dtype_skip(capabilities, dtype) or (unclaimed_fp8 if "fp8" in op else None))
             for op in OPS for dtype in all_dtypes(capabilities)],
        )


def rotary_cache(head_dim: int, max_position: int) -> torch.Tensor:
    """``[max_position, head_dim]`` float32: cos of the plain RoPE angles, then sin."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_position).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def op_inputs(op: str, head_dim: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[object, ...]:
    """The positional inputs of case ``op`` (float tensors in ``dtype``; caches and positions as the op wants)."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    def hidden() -> torch.Tensor:  # an offset mean, as real hidden states have: RMS and std differ
        return (2.0 * torch.randn(NUM_TOKENS, HIDDEN, generator=gen) + 1.5).to(dtype)

    weight = (1.0 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype)
    if op == "rms_norm":
        return hidden(), weight, 1e-6
    if op == "add_rms_norm":
        return hidden(), hidden(), weight, 1e-5
    if op == "rotary_embedding":
        positions = torch.randint(0, 64, (NUM_TOKENS,), generator=gen)
        return positions, randn(NUM_TOKENS, 4, head_dim), randn(NUM_TOKENS, 2, head_dim), rotary_cache(head_dim, 64)
    if op.startswith("linear"):
        rows = 1 if op.endswith("one_token") else NUM_TOKENS
        weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen) * IN_FEATURES**-0.5
        x, bias = randn(rows, IN_FEATURES), randn(OUT_FEATURES)
        if "fp8" in op:  # e4m3 weight rows with their float32 scales; the op quantizes x itself
            return x, *quantize_rows(weight), bias
        return x, weight.to(dtype), bias
    return (randn(NUM_TOKENS, 2 * HIDDEN),)


def as_outputs(result: object) -> list[torch.Tensor]:
    """An op's result as a list of tensors."""
    return list(result) if isinstance(result, tuple) else [result]  # type: ignore[list-item]


def test_fused_op_matches_default(
    conformance_target: ConformanceTarget, fused_case: tuple[str, torch.dtype], conformance_generator: torch.Generator
) -> None:
    """The backend's op on ``dtype`` inputs equals the base-class default on the same values in float32."""
    case, dtype = fused_case
    op = OPS[case]
    target = conformance_target
    inputs = op_inputs(case, base_head_size(target.capabilities), dtype, conformance_generator)

    def on(device: torch.device, float32: bool) -> list[object]:
        moved = []
        for x in inputs:
            if isinstance(x, torch.Tensor):
                x = x.clone()  # ops may work in place
                if float32 and x.is_floating_point():
                    x = x.float()
                x = x.to(device)
            moved.append(x)
        return moved

    method: Callable[..., object] = getattr(target.backend, op)
    with poisoned_allocations():
        actual = as_outputs(method(*on(target.device, float32=False)))
    reference: Callable[..., object] = getattr(DefaultOpsBackend(), op)
    expected = as_outputs(reference(*on(torch.device("cpu"), float32=True)))
    overridden = getattr(type(target.backend), op) is not getattr(Backend, op)
    assert len(actual) == len(expected), f"{op} returned {len(actual)} tensors, expected {len(expected)}"
    tol = tolerance(dtype)
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == dtype, f"{op} output {index} is {a.dtype}, expected {dtype}"
        assert tuple(a.shape) == tuple(e.shape), (
            f"{op} output {index} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        )
        a32 = a.float().cpu()
        if not torch.allclose(a32, e, atol=tol.atol, rtol=tol.rtol):
            err = (a32 - e).abs().nan_to_num(float("inf")).max()
            pytest.fail(f"{op} ({'overridden' if overridden else 'default'}) output {index} differs from the "
                        f"base-class default in float32: max |err| {float(err):.4g} (atol={tol.atol}, rtol={tol.rtol})",
                        pytrace=False)
