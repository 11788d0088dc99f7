"""The ``cuda`` backend's 4-bit-weight GEMM (``pagedllm.backends.triton_gpu.w4a16_linear``) on the CPU under
Triton's interpreter, against ``reference_linear_w4a16`` (float32 PyTorch).

The kernel module is imported under ``TRITON_INTERPRET=1`` and triton's standard library swapped for interpreted
twins during each test by ``test_cuda_kernels_interpreter.py``'s fixtures (which say why). Shapes are tiny (80
outputs, 256 inputs): the interpreter runs every program in Python. bfloat16 is left to the GPU tests (the
interpreter mishandles some bf16 element-wise operations).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.backends.w4a16_linear import quantize_w4a16, quantize_w4a16_act_order, reference_linear_w4a16
from tests.unit.test_cuda_kernels_interpreter import interpreted_modules, kernels  # noqa: F401 - fixtures
from tests.unit.triton_compile import compile_kernel

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}
"""Absolute tolerance relative to the largest output, and relative tolerance. float32 differs from the
reference only in the order of its sums; float16 also rounds the dequantized weight to float16."""
OUT, IN = 80, 256  # 80 outputs: a partial BLOCK_N tile


@pytest.fixture
def w4a16(kernels: SimpleNamespace) -> ModuleType:  # noqa: F811 - the imported fixture
    """The kernel module imported under the interpreter, triton's language patched for it during the test
    (``test_cuda_kernels_interpreter.kernels``)."""
    return kernels.w4a16_linear


@pytest.fixture(scope="module")
def interpreted(interpreted_modules: SimpleNamespace) -> ModuleType:  # noqa: F811 - the imported fixture
    """The kernel module imported under the interpreter, for its host-side helpers (no kernel launched)."""
    return interpreted_modules.w4a16_linear


def make_layer(out: int, inp: int, group_size: int, act_order: bool, bias: bool, seed: int = 0,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A quantized ``[out, inp]`` layer (``quantize_w4a16``, float16 scales): ``(weight, scales, zeros, g_idx,
    bias)``. With ``act_order`` the groups are shuffled over the features (GPTQ's ``desc_act``,
    ``quantize_w4a16_act_order``)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * inp**-0.5
    g_idx = None
    if act_order:
        groups = (torch.arange(inp) // group_size)[torch.randperm(inp, generator=gen)]
        order = torch.argsort(groups, stable=True)  # features of group 0 first, then group 1, ...
        packed, scales, zeros, g_idx = quantize_w4a16_act_order(w, group_size, order)
    else:
        packed, scales, zeros = quantize_w4a16(w, group_size)
    b = torch.randn(out, generator=gen) if bias else None
    return packed, scales, zeros, g_idx, b


def check(w4a16: ModuleType, x: torch.Tensor, layer: tuple, group_size: int, **overrides: object) -> torch.Tensor:
    """Run the kernel on ``x`` and assert it matches the reference; return the reference output (float32)."""
    weight, scales, zeros, g_idx, bias = layer
    bias = None if bias is None else bias.to(x.dtype)
    got = w4a16.linear_w4a16(x, weight, scales, zeros, group_size, g_idx, bias, **overrides)
    want = reference_linear_w4a16(x, weight, scales, zeros, group_size, g_idx, bias)
    assert got.shape == want.shape and got.dtype == x.dtype
    tol = TOLERANCE[x.dtype]
    scale = want.float().abs().max().item()
    assert scale > 0.5  # outputs of order one: a kernel returning zeros or garbage cannot pass
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)
    return want.float()


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("act_order", [False, True], ids=["groups", "act_order"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_matches_reference(w4a16: ModuleType, dtype: torch.dtype, group_size: int, act_order: bool, bias: bool,
                           rows: int) -> None:
    """Decode rows (1: the GEMV without act-order; 5: 16-row tiles, split over the input features when there are
    enough steps) and a larger step (33 rows: 64-row tiles); one scale per step or gathered per feature
    (act-order)."""
    layer = make_layer(OUT, IN, group_size, act_order, bias)
    x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = check(w4a16, x, layer, group_size)
    if act_order:  # the shuffled groups matter: reading them as k // group_size gives another product
        weight, scales, zeros, _, b = layer
        b = None if b is None else b.to(dtype)
        plain = reference_linear_w4a16(x, weight, scales, zeros, group_size, None, b).float()
        assert (plain - want).abs().max() > 100 * TOLERANCE[dtype] * want.abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("inp", "group_size", "act_order", "block_k", "num_splits"),
    [
        (256, 32, False, 32, 8),  # one step per split
        (256, 128, True, 32, 3),  # 8 steps over 3 splits: 3, 3, 2
        (256, 128, False, 128, 4),  # more splits than steps: empty splits add zeros
        (256, 32, False, 64, 2),  # steps spanning two groups: scales gathered per feature without g_idx
        (200, 40, False, 128, 2),  # in = 200: 32-feature steps, the last one masked (7 steps over 2 splits)
        (200, 40, True, 128, 1),
    ],
)
def test_tiles_and_splits(w4a16: ModuleType, dtype: torch.dtype, inp: int, group_size: int, act_order: bool,
                          block_k: int, num_splits: int) -> None:
    """Forced tiles and splits: uneven and empty splits, steps across groups, a masked last step."""
    layer = make_layer(OUT, inp, group_size, act_order, bias=True, seed=2)
    x = torch.randn(3, inp, generator=torch.Generator().manual_seed(3)).to(dtype)
    for swap_ab in (False, True):  # 32 wide: three column tiles, the last partial
        check(w4a16, x, layer, group_size, tiles=w4a16.W4A16Tiles(16, 32, block_k, 4, 2, swap_ab),
              num_splits=num_splits)
    check(w4a16, x, layer, group_size, tiles=w4a16.W4A16Tiles(32, 64, block_k, 4, 2), num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("num_splits", [None, 1, 2, 4])
@pytest.mark.parametrize("tiles", [None, (32, 16, 4)])
def test_gemv_matches_reference(w4a16: ModuleType, dtype: torch.dtype, group_size: int, rows: int,
                                num_splits: int | None, tiles: tuple[int, int, int] | None) -> None:
    """The GEMV (one-token steps without act-order; any number of rows when called directly): steps of up to
    128 features within one group, the zero point as ``sum q x - z sum x``, split over the features or not (a
    split count that does not divide the steps is halved until it does), at its tiles and narrower ones."""
    layer = make_layer(OUT, IN, group_size, act_order=False, bias=True, seed=5)
    weight, scales, zeros, _, bias = layer
    x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(6)).to(dtype)
    got = w4a16.gemv_w4a16(x, weight, scales, zeros, group_size, bias.to(dtype), num_splits, tiles)
    want = reference_linear_w4a16(x, weight, scales, zeros, group_size, None, bias.to(dtype)).float()
    tol = TOLERANCE[dtype] * want.abs().max().item()
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=TOLERANCE[dtype])
    if rows == 1:  # the path linear_w4a16 takes for it
        check(w4a16, x, layer, group_size, num_splits=num_splits)


def test_strided_input_and_empty_step(w4a16: ModuleType) -> None:
    """An input with a row stride (a slice of a wider buffer) reads in place; no rows gives ``[0, out]``."""
    layer = make_layer(OUT, IN, 64, act_order=False, bias=True)
    wide = torch.randn(4, IN + 64, generator=torch.Generator().manual_seed(4))
    check(w4a16, wide[:, 32 : 32 + IN], layer, 64)
    check(w4a16, wide.t().contiguous().t()[:, :IN], layer, 64)  # column-major: copied first
    weight, scales, zeros, _, bias = layer
    empty = w4a16.linear_w4a16(torch.empty(0, IN), weight, scales, zeros, 64, None, bias)
    assert empty.shape == (0, OUT) and empty.dtype == torch.float32


def test_bad_shapes_raise(w4a16: ModuleType) -> None:
    weight, scales, zeros, g_idx, bias = make_layer(OUT, IN, 32, act_order=True, bias=True)
    x = torch.randn(2, IN)
    linear = w4a16.linear_w4a16
    bad = [
        (torch.randn(2, IN - 8), weight, scales, zeros, 32, None, None),  # x's features disagree with the weight
        (torch.randn(2, 1, IN), weight, scales, zeros, 32, None, None),  # x not 2-D
        (x.to(torch.int32), weight, scales, zeros, 32, None, None),  # x not floating
        (x, weight.to(torch.int64), scales, zeros, 32, None, None),  # weight not int32
        (x, weight, scales, zeros, 48, None, None),  # group size not dividing in
        (x, weight, scales, zeros, 64, None, None),  # scales of another group size
        (x, weight, scales[:-1], zeros, 32, None, None),  # scales of fewer rows
        (x, weight, scales, zeros.int(), 32, None, None),  # zeros not uint8
        (x, weight, scales, zeros[:, :-1], 32, None, None),
        (x, weight, scales, zeros, 32, g_idx[:-1], None),  # g_idx too short
        (x, weight, scales, zeros, 32, g_idx.float(), None),
        (x, weight, scales, zeros, 32, None, bias[:-1]),  # bias too short
        (x, weight.t().contiguous().t(), scales, zeros, 32, None, None),  # weight column-major
    ]
    for args in bad:
        with pytest.raises(ValueError, match="w4a16 linear"):
            linear(*args)


def test_tile_choice_and_split_rule(interpreted: ModuleType) -> None:
    """Tiles grow with the rows (few variants over the power-of-two decode batches); a decode step of a 4096 x
    4096 layer fills a 132-SM GPU about twice; layers of many tiles and long steps are not split."""
    m = interpreted
    powers = [1 << i for i in range(14)]
    tiles = [m.w4a16_tiles(r) for r in powers]
    assert [t.block_m for t in tiles] == sorted(t.block_m for t in tiles)
    assert len(set(tiles)) <= 4 and m.w4a16_tiles(1).block_m == 16 and m.w4a16_tiles(16).block_m == 16
    assert m.w4a16_tiles(1).swap_ab and not m.w4a16_tiles(4096).swap_ab
    for r, t in zip(powers, tiles, strict=True):
        programs = -(-r // t.block_m) * (4096 // t.block_n)
        programs *= m.split_k(programs, 4096 // m.step_length(t.block_k, 128, 4096), 132)
        assert programs >= 132 and (r > 16 or programs >= 256)
    assert m.split_k(32, 32, 132) == 8  # batch 1 of 4096 x 4096: 32 column tiles of 128, 8 splits of 4 steps
    assert m.split_k(64, 4, 132) == 1  # too few steps to split
    assert m.split_k(132, 1024, 132) == 1 and m.split_k(1, 1024, 132) == m.MAX_SPLIT_K
    assert m.step_length(128, 32, 4096) == 32 and m.step_length(64, 128, 4096) == 64
    assert m.step_length(128, 40, 200) == 32 and m.step_length(128, 200, 400) == 32
    assert m.step_length(128, 96, 4032) == 32  # 96 = 3 x 32


def _kernels_compile() -> ModuleType:
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton ships no ptxas here")
    pytest.importorskip("triton.compiler")
    from triton.runtime.jit import JITFunction

    from pagedllm.backends.triton_gpu import w4a16_linear

    if not isinstance(w4a16_linear._w4a16_gemm_kernel, JITFunction):
        pytest.skip("imported under TRITON_INTERPRET=1: nothing to compile")
    return w4a16_linear


@pytest.mark.parametrize(
    ("dtype", "block_m", "per_step", "g_idx", "even_k"),
    [
        ("bf16", 16, True, False, True),  # decode, one scale per step
        ("fp16", 16, False, True, True),  # decode, act-order
        ("bf16", 128, True, False, True),  # large steps
        ("fp16", 64, False, False, False),  # gathered scales, masked last step
        ("fp32", 128, False, True, True),  # float32: full-precision products
    ],
)
@pytest.mark.parametrize("arch", [90, 80])
def test_kernel_compiles_for_sm90(dtype: str, block_m: int, per_step: bool, g_idx: bool, even_k: bool,
                                  arch: int) -> None:
    """The real compiler (not the interpreter) accepts the kernels' variants for an H100/H200 (sm_90) and an
    A100 (sm_80; not run on one)."""
    module = _kernels_compile()
    tiles = module.w4a16_tiles(block_m)
    pointers = {"out_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "w_ptr": "*i32", "scales_ptr": "*fp16",
                "zeros_ptr": "*u8", "g_idx_ptr": "*i32", "bias_ptr": f"*{dtype}"}
    compile_kernel(
        module._w4a16_gemm_kernel, pointers,
        {"GROUP_SIZE": 128, "HAS_G_IDX": g_idx, "GROUP_PER_STEP": per_step, "EVEN_K": even_k, "HAS_BIAS": True,
         "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "SWAP_AB": tiles.swap_ab, "BLOCK_M": tiles.block_m,
         "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k, "GROUP_M": module.GROUP_M},
        ("cuda", arch, 32), num_warps=tiles.num_warps, num_stages=tiles.num_stages, enable_fp_fusion=True,
    )  # fmt: skip
    if block_m == 16 and per_step:
        block_n, block_w, warps = module.gemv_tiles(128)
        compile_kernel(module._w4a16_gemv_kernel, {k: pointers[k] for k in ("out_ptr", "x_ptr", "w_ptr", "scales_ptr",
                                                                             "zeros_ptr", "bias_ptr")},
                       {"GROUP_SIZE": 128, "HAS_BIAS": True, "BLOCK_N": block_n, "BLOCK_W": block_w},
                       ("cuda", arch, 32), num_warps=warps, enable_fp_fusion=True)
        compile_kernel(module._split_k_sum_kernel, {"y_ptr": f"*{dtype}", "partial_ptr": "*fp32",
                                                    "bias_ptr": f"*{dtype}"},
                       {"HAS_BIAS": True, "BLOCK": module.REDUCE_BLOCK}, ("cuda", arch, 32), num_warps=4,
                       enable_fp_fusion=True)
