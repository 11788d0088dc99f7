"""Op level: the backend's fused ops against the ``Backend`` base-class defaults computed in float32.

A backend that does not override an op passes trivially; one that fuses it into a kernel must compute what
the neutral default computes, within the dtype's tolerance. For ``linear_fp8`` (when ``"fp8"`` is claimed)
that includes quantizing the input exactly as the reference does: its e4m3 weight and scales are given;
``linear_fp8_quantized`` gets its input quantized already. ``linear_fp8_block`` (when ``"fp8_block"`` is
claimed) gets an e4m3 weight with 128 x 128 tile scales and an input with one 128-feature group 2^16 times
smaller than the others (its weight columns as much larger, so it weighs alike in the sums): quantized per
token instead of per group, it would fall among e4m3's subnormals and lose its precision. The ops that
quantize their output for an fp8 projection (``rms_norm_fp8``, ``add_rms_norm_fp8``, ``silu_and_mul_fp8``)
are compared dequantized: the backend rounds the op's result to its dtype before quantizing, the float32
default does not, so an element may land one e4m3 step away (at most 1/8 of its magnitude); a missing or
wrong normalization, activation or scale is far outside that. ``linear_fp8_static`` gets a static input scale
half of what the input needs, so its largest values must saturate at 448. ``qk_norm_rotary_embedding`` (Qwen3's per-head
q/k norms with the rotary embedding) gets heads of magnitudes 32 times apart, so a norm over the wrong span
shows. ``linear_w4a16`` (when ``"w4a16"`` is claimed) gets 4-bit weights in groups of 32 to 128 features, one
case with act-order groups (``g_idx`` a permutation), its input as it is: only the float32 sums may differ.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pagedllm.backends.fp8_linear import dequantize_groups, quantize_blocks, quantize_groups, quantize_rows
from pagedllm.backends.interface import Backend
from pagedllm.backends.moe import route_tokens
from pagedllm.backends.w4a16_linear import quantize_w4a16_act_order
from pagedllm.conformance.cases import all_dtypes, base_head_size, dtype_skip, param
from pagedllm.conformance.plugin import ConformanceTarget, case_id, get_target
from pagedllm.conformance.reference import DefaultOpsBackend, poisoned_allocations, tolerance

NUM_TOKENS = 7
HIDDEN = 96
IN_FEATURES, OUT_FEATURES = 256, 80
MOE_INTER = 48  # each expert's intermediate features (fused_moe)
BLOCK_IN_FEATURES, BLOCK_OUT_FEATURES = 512, 256  # whole tiles, four groups: what block-scaled GEMMs take
GROUP_MAGNITUDES = (1.0, 2.0**-16, 4.0, 0.5)  # of the four input groups of the linear_fp8_block cases
# case name -> the Backend method it calls; the linear layers twice: a backend may take one-token inputs
# (batch-1 decode) through another kernel
OPS: dict[str, str] = {"rms_norm": "rms_norm", "add_rms_norm": "add_rms_norm", "rotary_embedding": "rotary_embedding",
                       "qk_norm_rotary_embedding": "qk_norm_rotary_embedding",
                       "silu_and_mul": "silu_and_mul", "gelu_and_mul": "gelu_and_mul", "linear": "linear",
                       "linear_one_token": "linear",
                       "linear_fp8": "linear_fp8", "linear_fp8_one_token": "linear_fp8",
                       "linear_fp8_quantized": "linear_fp8_quantized",
                       "linear_fp8_static": "linear_fp8_static", "linear_fp8_static_one_token": "linear_fp8_static",
                       "linear_fp8_quantized_one_token": "linear_fp8_quantized",
                       "linear_fp8_block": "linear_fp8_block", "linear_fp8_block_one_token": "linear_fp8_block",
                       "linear_fp8_block_quantized": "linear_fp8_block_quantized",
                       "linear_fp8_block_quantized_one_token": "linear_fp8_block_quantized",
                       "linear_w4a16": "linear_w4a16", "linear_w4a16_one_token": "linear_w4a16",
                       "linear_w4a16_act_order": "linear_w4a16", "linear_w4a16_wide": "linear_w4a16",
                       "fused_moe": "fused_moe", "fused_moe_one_token": "fused_moe", "fused_moe_wide": "fused_moe"}
W4A16_CASES: dict[str, tuple[int, int, bool]] = {
    "linear_w4a16": (NUM_TOKENS, 128, False), "linear_w4a16_one_token": (1, 32, False),
    "linear_w4a16_act_order": (NUM_TOKENS, 64, True), "linear_w4a16_wide": (48, 128, False)}
"""``Backend.linear_w4a16`` cases: tokens, group size, whether the groups number a permutation of the features
(act-order ``g_idx``)."""
ROUTER_CASES: dict[str, tuple[int, int, int, bool, bool]] = {
    "topk_softmax": (NUM_TOKENS, 8, 2, True, False), "topk_softmax_one_token": (1, 128, 8, True, True),
    "topk_softmax_wide": (48, 64, 6, False, False), "topk_softmax_odd": (5, 60, 4, False, True)}
"""``Backend.topk_softmax`` cases: tokens, experts, top_k, renormalize, whether the weights are rounded through
the model dtype (Mixtral's router: 8 experts, 2 per token; Qwen3-30B-A3B's: 128, 8; Qwen2-MoE's: 60, 4)."""
FP8_INPUT_OPS: dict[str, str] = {"rms_norm_fp8": "rms_norm", "add_rms_norm_fp8": "add_rms_norm",
                                 "silu_and_mul_fp8": "silu_and_mul", "rms_norm_fp8_groups": "rms_norm",
                                 "add_rms_norm_fp8_groups": "add_rms_norm", "silu_and_mul_fp8_groups": "silu_and_mul"}
"""The ops that quantize their output for an fp8 projection -> the op whose inputs they take. The ``_groups``
ops (for ``"fp8_block"`` projections) take inputs whose 128-feature groups differ in magnitude
(:data:`GROUP_MAGNITUDES`), so a scale per token where one per group is due shows."""
HEAD_SCALES = (1.0, 8.0, 0.25, 2.0, 4.0, 0.5)  # of the four query and two key heads of qk_norm_rotary_embedding
E4M3_STEP = 0.125  # the widest relative spacing of e4m3 values (3 mantissa bits)
E4M3_SUBNORMAL_STEP = 2.0**-9  # the spacing of its subnormals, in units of the scale


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``fused_case`` (every case of :data:`OPS`) and ``fp8_input_case`` (of
    :data:`FP8_INPUT_OPS`) as (case, dtype) for every dtype; fp8 cases skipped unless their quantization
    (``fp8`` or ``fp8_block``) is claimed."""
    for fixture, ops in (("fused_case", OPS), ("fp8_input_case", FP8_INPUT_OPS), ("router_case", ROUTER_CASES)):
        if fixture not in metafunc.fixturenames:
            continue
        capabilities = get_target(metafunc.config).capabilities
        metafunc.parametrize(
            fixture,
            [param(case_id(metafunc.config, op, dtype), (op, dtype),
                   skip=dtype_skip(capabilities, dtype) or unclaimed_quantization(op, capabilities.quantizations))
             for op in ops for dtype in all_dtypes(capabilities)],
        )


def unclaimed_quantization(op: str, claimed: tuple[str, ...]) -> str | None:
    """Why case ``op`` is skipped on a backend claiming the quantizations ``claimed``, or None: the fp8 cases
    need their scheme (``fp8_block``, for the tile-scaled layers and the ``_groups`` ops, or ``fp8``) claimed."""
    needed = ("fp8_block" if "fp8_block" in op or op.endswith("_groups") else "fp8" if "fp8" in op
              else "w4a16" if "w4a16" in op else None)
    if needed is None or needed in claimed:
        return None
    return f"{needed} linear layers not claimed (quantizations)"


def rotary_cache(head_dim: int, max_position: int) -> torch.Tensor:
    """``[max_position, head_dim]`` float32: cos of the plain RoPE angles, then sin."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_position).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def group_magnitudes(width: int) -> torch.Tensor:
    """``[width]`` float32: :data:`GROUP_MAGNITUDES` over ``width``'s equal runs of features (groups of 128 when
    ``width`` is ``128 * len(GROUP_MAGNITUDES)``)."""
    return torch.tensor(GROUP_MAGNITUDES).repeat_interleave(width // len(GROUP_MAGNITUDES))


def op_inputs(op: str, head_dim: int, dtype: torch.dtype, gen: torch.Generator,
              grouped: bool = False) -> tuple[object, ...]:
    """The positional inputs of case ``op`` (float tensors in ``dtype``; caches and positions as the op wants);
    with ``grouped``, the norms' and the activation's features are ``BLOCK_IN_FEATURES`` wide, their groups of
    128 scaled by :data:`GROUP_MAGNITUDES`."""
    width = BLOCK_IN_FEATURES if grouped else HIDDEN
    magnitudes = group_magnitudes(width) if grouped else torch.ones(width)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    def hidden() -> torch.Tensor:  # an offset mean, as real hidden states have: RMS and std differ
        return ((2.0 * torch.randn(NUM_TOKENS, width, generator=gen) + 1.5) * magnitudes).to(dtype)

    weight = (1.0 + 0.1 * torch.randn(width, generator=gen)).to(dtype)
    if op == "rms_norm":
        return hidden(), weight, 1e-6
    if op == "add_rms_norm":
        return hidden(), hidden(), weight, 1e-5
    if op == "rotary_embedding":
        positions = torch.randint(0, 64, (NUM_TOKENS,), generator=gen)
        return positions, randn(NUM_TOKENS, 4, head_dim), randn(NUM_TOKENS, 2, head_dim), rotary_cache(head_dim, 64)
    if op == "qk_norm_rotary_embedding":  # heads of unlike scales: a norm over all heads at once would show
        positions = torch.randint(0, 64, (NUM_TOKENS,), generator=gen)
        head_scales = torch.tensor(HEAD_SCALES)[:, None]
        q = (2.0 * torch.randn(NUM_TOKENS, 6, head_dim, generator=gen) + 1.0) * head_scales
        norm_weights = (1.0 + 0.2 * torch.randn(2, head_dim, generator=gen)).to(dtype)
        return (positions, q[:, :4].to(dtype), q[:, 4:].to(dtype), norm_weights[0], norm_weights[1], 1e-6,
                rotary_cache(head_dim, 64))
    if op.startswith("fused_moe"):  # 8 experts, 2 per token; "wide": 48 tokens, 64 experts, 6 per token
        rows, experts, top_k = {"fused_moe": (NUM_TOKENS, 8, 2), "fused_moe_one_token": (1, 8, 2),
                                "fused_moe_wide": (48, 64, 6)}[op]
        inter = MOE_INTER
        w13 = torch.randn(experts, 2 * inter, HIDDEN, generator=gen) * HIDDEN**-0.5
        w2 = torch.randn(experts, HIDDEN, inter, generator=gen) * inter**-0.5
        weights, ids = route_tokens(torch.randn(rows, experts, generator=gen), top_k, renormalize=True)
        return randn(rows, HIDDEN), w13.to(dtype), w2.to(dtype), weights, ids
    if op.startswith("linear_fp8_block"):
        rows = 1 if op.endswith("one_token") else NUM_TOKENS
        magnitudes = group_magnitudes(BLOCK_IN_FEATURES)
        weight = torch.randn(BLOCK_OUT_FEATURES, BLOCK_IN_FEATURES, generator=gen) * BLOCK_IN_FEATURES**-0.5
        weight = weight / magnitudes  # every group of x weighs alike in the sums
        x = (torch.randn(rows, BLOCK_IN_FEATURES, generator=gen) * magnitudes).to(dtype)
        if "quantized" in op:  # the input quantized per token and group already; the output dtype last
            return *quantize_groups(x), *quantize_blocks(weight), randn(BLOCK_OUT_FEATURES), dtype
        return x, *quantize_blocks(weight), randn(BLOCK_OUT_FEATURES)
    if op.startswith("linear_w4a16"):  # asymmetric 4-bit weights, float32 scales; the op reads x as it is
        rows, group_size, act_order = W4A16_CASES[op]
        weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen) * IN_FEATURES**-0.5
        perm = torch.randperm(IN_FEATURES, generator=gen) if act_order else torch.arange(IN_FEATURES)
        packed, scales, zeros, g_idx = quantize_w4a16_act_order(weight, group_size, perm, scale_dtype=torch.float32)
        return (randn(rows, IN_FEATURES), packed, scales, zeros, group_size, g_idx if act_order else None,
                randn(OUT_FEATURES))
    if op.startswith("linear"):
        rows = 1 if op.endswith("one_token") else NUM_TOKENS
        weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen) * IN_FEATURES**-0.5
        x, bias = randn(rows, IN_FEATURES), randn(OUT_FEATURES)
        if "fp8_quantized" in op:  # the input quantized per token already; the output dtype last
            return *quantize_rows(x), *quantize_rows(weight), bias, dtype
        if "fp8_static" in op:  # a static input scale half of what x needs: its largest values saturate
            input_scale = (x.float().abs().amax() / 448.0 / 2.0).reshape(1)
            return x, input_scale, *quantize_rows(weight), bias
        if "fp8" in op:  # e4m3 weight rows with their float32 scales; the op quantizes x itself
            return x, *quantize_rows(weight), bias
        return x, weight.to(dtype), bias
    gate_up = torch.randn(NUM_TOKENS, 2 * width, generator=gen)  # the groups' magnitudes on up only: the
    gate_up[:, width:] *= magnitudes  # products of two small halves would leave fp16's range
    return (gate_up.to(dtype),)


def as_outputs(result: object) -> list[torch.Tensor]:
    """An op's result as a list of tensors."""
    return list(result) if isinstance(result, tuple) else [result]  # type: ignore[list-item]


def run_op_and_default(target: ConformanceTarget, op: str, inputs: tuple[object, ...]) -> tuple[list[torch.Tensor],
                                                                                               list[torch.Tensor]]:
    """``(the backend's outputs on its device, the base-class default's on the CPU in float32)`` of ``op``."""

    def on(device: torch.device, float32: bool) -> list[object]:
        moved = []
        for x in inputs:
            if isinstance(x, torch.Tensor):
                x = x.clone()  # ops may work in place
                if float32 and x.is_floating_point():
                    x = x.float()
                x = x.to(device)
            elif float32 and isinstance(x, torch.dtype):  # an output dtype (linear_fp8_quantized)
                x = torch.float32
            moved.append(x)
        return moved

    method: Callable[..., object] = getattr(target.backend, op)
    with poisoned_allocations():
        actual = as_outputs(method(*on(target.device, float32=False)))
    reference: Callable[..., object] = getattr(DefaultOpsBackend(), op)
    return actual, as_outputs(reference(*on(torch.device("cpu"), float32=True)))


def test_fused_op_matches_default(
    conformance_target: ConformanceTarget, fused_case: tuple[str, torch.dtype], conformance_generator: torch.Generator
) -> None:
    """The backend's op on ``dtype`` inputs equals the base-class default on the same values in float32."""
    case, dtype = fused_case
    op = OPS[case]
    target = conformance_target
    inputs = op_inputs(case, base_head_size(target.capabilities), dtype, conformance_generator)
    actual, expected = run_op_and_default(target, op, inputs)
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


def test_topk_softmax_matches_default(
    conformance_target: ConformanceTarget, router_case: tuple[str, torch.dtype], conformance_generator: torch.Generator
) -> None:
    """The backend's router on ``dtype`` logits picks the default's experts in the default's order, with its
    weights: float32 within 1e-5, or, rounded through ``dtype``, within one step of it. The logits are distinct
    multiples of 1/8 (exact in every dtype), so no two probabilities tie."""
    case, dtype = router_case
    rows, experts, top_k, renormalize, rounded = ROUTER_CASES[case]
    steps = torch.stack([torch.randperm(experts, generator=conformance_generator) for _ in range(rows)])
    logits = ((steps.float() - experts / 2) / 8).to(dtype)
    round_to = dtype if rounded else None
    target = conformance_target
    with poisoned_allocations():
        weights, ids = target.backend.topk_softmax(logits.to(target.device), top_k, renormalize, round_to)
    want_weights, want_ids = DefaultOpsBackend().topk_softmax(logits.float(), top_k, renormalize, round_to)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32, f"returned {weights.dtype}, {ids.dtype}"
    assert tuple(weights.shape) == tuple(ids.shape) == (rows, top_k), (
        f"shapes {tuple(weights.shape)}, {tuple(ids.shape)}, expected {(rows, top_k)}")
    if not torch.equal(ids.cpu(), want_ids):
        pytest.fail(f"topk_softmax picked experts {ids.cpu().tolist()}, expected {want_ids.tolist()}", pytrace=False)
    rtol = torch.finfo(dtype).eps if rounded else 1e-5
    if not torch.allclose(weights.cpu(), want_weights, rtol=rtol, atol=1e-6):
        err = (weights.cpu() - want_weights).abs().nan_to_num(float("inf")).max()
        pytest.fail(f"topk_softmax weights differ from the default's: max |err| {float(err):.3g} (rtol={rtol})",
                    pytrace=False)


def dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q [rows, cols]`` (e4m3 or float) times its scales, ``[rows]`` (per token) or ``[rows, ceil(cols / 128)]``
    (per token and group), in float32."""
    return dequantize_groups(q, scale) if scale.dim() == 2 else q.float() * scale[:, None]


def test_fp8_input_op_matches_default(
    conformance_target: ConformanceTarget, fp8_input_case: tuple[str, torch.dtype],
    conformance_generator: torch.Generator,
) -> None:
    """The backend's op that quantizes its output (e4m3 values, float32 scales per token or per token and
    group; then the residual sum, in ``dtype``) against the base-class default in float32: scales within the
    dtype's tolerance, dequantized values within one e4m3 step, the residual within the dtype's tolerance."""
    op, dtype = fp8_input_case
    inputs = op_inputs(FP8_INPUT_OPS[op], base_head_size(conformance_target.capabilities), dtype, conformance_generator,
                       grouped=op.endswith("_groups"))
    actual, expected = run_op_and_default(conformance_target, op, inputs)
    assert len(actual) == len(expected), f"{op} returned {len(actual)} tensors, expected {len(expected)}"
    (q, scale), (q_ref, scale_ref) = actual[:2], expected[:2]
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32, f"{op} returned {q.dtype}, {scale.dtype}"
    assert tuple(q.shape) == tuple(q_ref.shape) and tuple(scale.shape) == tuple(scale_ref.shape), (
        f"{op} returned shapes {tuple(q.shape)}, {tuple(scale.shape)}; expected {tuple(q_ref.shape)}, "
        f"{tuple(scale_ref.shape)}"
    )
    tol = tolerance(dtype)
    scale = scale.cpu()
    if not torch.allclose(scale, scale_ref, atol=0.0, rtol=tol.rtol):
        pytest.fail(f"{op}: scales differ from the default's beyond rtol={tol.rtol}: got {scale.tolist()}, expected "
                    f"{scale_ref.tolist()}", pytrace=False)
    values, reference = dequantized(q.cpu(), scale), dequantized(q_ref, scale_ref)
    spacing = dequantized(torch.ones_like(q_ref, dtype=torch.float32), scale_ref)  # each element's scale
    bound = E4M3_STEP * reference.abs() + E4M3_SUBNORMAL_STEP * spacing + tol.atol
    err = (values - reference).abs().nan_to_num(float("inf"))
    if (err > bound).any():
        worst = int((err - bound).argmax())
        pytest.fail(f"{op}: dequantized output differs from the default's by more than one e4m3 step: "
                    f"{values.flatten()[worst]:.4g} against {reference.flatten()[worst]:.4g}", pytrace=False)
    for a, e in zip(actual[2:], expected[2:], strict=True):  # add_rms_norm_fp8's residual sum
        assert a.dtype == dtype, f"{op} residual is {a.dtype}, expected {dtype}"
        assert torch.allclose(a.float().cpu(), e, atol=tol.atol, rtol=tol.rtol), f"{op}: residual sum differs"
