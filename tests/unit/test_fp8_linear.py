"""The fp8 linear layer's reference (``pagedllm.backends.fp8_linear``) and how a model is quantized."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.fp8_linear import (
    FP8_MAX,
    MIN_SCALE,
    dequantize_blocks,
    per_row_scale,
    quantize_blocks,
    quantize_groups,
    quantize_rows,
    reference_linear_fp8,
    reference_linear_fp8_block,
    scale_block_range,
)
from pagedllm.backends.interface import BackendCapabilities
from pagedllm.core.distributed.parallel_layers import ParallelLMHead, RowParallelLinear
from pagedllm.core.models.layers import MergedLinear, quantize_linear_layers


def test_quantize_rows_maps_each_row_amax_to_448_and_rounds_to_nearest() -> None:
    x = torch.randn(6, 50, dtype=torch.float64) * torch.logspace(-3, 3, 6, dtype=torch.float64)[:, None]
    x[4] = 0.0
    x[5, 7] = -1e6  # one outlier sets its row's scale
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (6,)
    amax = x.float().abs().amax(-1)
    torch.testing.assert_close(scale[:4], amax[:4] / FP8_MAX, rtol=0, atol=0)
    assert scale[4] == MIN_SCALE and torch.all(q[4].float() == 0)  # an all-zero row: zeros, no 0 / 0
    assert q[5, 7].float() == -FP8_MAX
    assert torch.all(q.float().abs().amax(-1)[[0, 1, 2, 3, 5]] == FP8_MAX)
    # round to nearest: within half a step of e4m3 (3 mantissa bits) of the scaled value, never a step off
    scaled = x.float() / scale[:, None]
    error = (q.float() - scaled).abs()
    step = torch.exp2(torch.floor(torch.log2(scaled.abs().clamp(min=2.0**-6))) - 3)
    assert torch.all(error <= step / 2 + 1e-6)


def test_reference_linear_fp8_is_the_dequantized_product() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(9, 64), torch.randn(24, 64) / 8, torch.randn(24)
    wq, ws = quantize_rows(w)
    xq, xs = quantize_rows(x)
    dequantized = (xq.float() * xs[:, None]) @ (wq.float() * ws[:, None]).t() + b
    for dtype in (torch.float32, torch.bfloat16):
        got = reference_linear_fp8(x.to(dtype), wq, ws, b.to(dtype))
        assert got.dtype == dtype and got.shape == (9, 24)
        if dtype == torch.float32:
            torch.testing.assert_close(got, dequantized, rtol=1e-5, atol=1e-5)
    # and it is a fair approximation of the unquantized layer (e4m3: ~6% per element, averaged by the sum)
    plain = x @ w.t() + b
    assert (reference_linear_fp8(x, wq, ws, b) - plain).abs().max() < 0.1 * plain.abs().max()
    # the Backend default is the reference
    torch.testing.assert_close(CpuBackend().linear_fp8(x, wq, ws, b), reference_linear_fp8(x, wq, ws, b))


def test_quantize_linear_layers_leaves_the_lm_head_and_embeddings_alone() -> None:
    model = nn.ModuleDict({"qkv": MergedLinear(32, [16, 8, 8], bias=True), "o": RowParallelLinear(32, 32, bias=False),
                           "head": ParallelLMHead(100, 32), "norm": nn.LayerNorm(32)})
    for p in model.parameters():
        nn.init.normal_(p)
    x = torch.randn(3, 32)
    calls: list[tuple[int, ...]] = []

    class Recording(CpuBackend):
        def linear_fp8(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
            calls.append(tuple(weight.shape))
            return super().linear_fp8(x, weight, scale, bias)

    head_weight = model["head"].weight.detach().clone()
    expected = reference_linear_fp8(x, *quantize_rows(model["qkv"].weight.detach()), model["qkv"].bias.detach())
    assert quantize_linear_layers(model, Recording()) == 2
    assert model["qkv"].weight.dtype == model["o"].weight.dtype == torch.float8_e4m3fn
    assert model["qkv"].weight_scale.shape == (32,) and "weight_scale" in dict(model["o"].named_parameters())
    assert torch.equal(model["head"].weight, head_weight) and model["norm"].weight.dtype == torch.float32
    torch.testing.assert_close(model["qkv"](x), expected)
    model["o"](x)
    assert calls == [(32, 32), (32, 32)]


def test_capabilities_name_the_quantizations() -> None:
    caps = BackendCapabilities(dtypes=(torch.float32,), kv_cache_dtypes=(torch.float32,), block_sizes=(16,),
                               head_sizes=(64,), quantizations=["fp8"])
    assert caps.quantizations == ("fp8",) and "quantization fp8" in caps.summary()
    assert caps.as_dict()["quantizations"] == ["fp8"]
    with pytest.raises(ValueError, match="quantizations must hold names"):
        BackendCapabilities(dtypes=(torch.float32,), kv_cache_dtypes=(torch.float32,), block_sizes=(16,),
                            head_sizes=(64,), quantizations=[""])


def test_per_row_scale_reads_the_checkpoint_layouts() -> None:
    """Per tensor (``[]``, ``[1]``) and per channel (``[rows]``, ``[rows, 1]``, bf16 too) become float32 rows."""
    assert torch.equal(per_row_scale(torch.tensor(0.5), 3), torch.full((3,), 0.5))
    assert torch.equal(per_row_scale(torch.tensor([0.25]), 2), torch.full((2,), 0.25))
    rows = torch.tensor([[1.5], [2.0], [0.125]], dtype=torch.bfloat16)
    got = per_row_scale(rows, 3)
    assert got.dtype == torch.float32 and got.tolist() == [1.5, 2.0, 0.125]
    assert per_row_scale(rows[:, 0], 3).tolist() == [1.5, 2.0, 0.125]
    with pytest.raises(ValueError, match=r"weight scale of shape \(2, 2\): expected one per tensor or one per each"):
        per_row_scale(torch.ones(2, 2), 4)


def test_groups_and_tiles_are_rows_of_their_own() -> None:
    """``fp8_block``: each 128-feature group of a token and each 128 x 128 tile of a weight (edges shorter)
    is quantized exactly as ``quantize_rows`` quantizes a row made of its elements."""
    torch.manual_seed(0)
    x = torch.randn(3, 300) * torch.tensor([1.0, 100.0, 0.01])[:, None]
    x[2, 256:] = 0  # an all-zero last group
    q, scale = quantize_groups(x)
    assert q.shape == (3, 300) and scale.shape == (3, 3)
    for row, group in ((0, 0), (1, 1), (2, 2), (0, 2)):
        want_q, want_scale = quantize_rows(x[row : row + 1, group * 128 : (group + 1) * 128])
        assert scale[row, group] == want_scale[0]
        assert torch.equal(q[row, group * 128 : (group + 1) * 128].view(torch.uint8), want_q[0].view(torch.uint8))
    assert scale[2, 2] == MIN_SCALE
    w = torch.randn(200, 300)
    wq, ws = quantize_blocks(w)
    assert wq.shape == (200, 300) and ws.shape == (2, 3)
    want_q, want_scale = quantize_rows(w[128:200, 256:300].reshape(1, -1))  # the corner tile: 72 x 44
    assert ws[1, 2] == want_scale[0] and torch.equal(wq[128:, 256:].reshape(-1).view(torch.uint8),
                                                     want_q[0].view(torch.uint8))
    assert (dequantize_blocks(wq, ws) - w).abs().max() <= ws.max() * 16  # half an e4m3 step at the top binade


def test_reference_linear_fp8_block_is_the_dequantized_product() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 256), torch.randn(130, 256) / 16, torch.randn(130)
    wq, ws = quantize_blocks(w)
    xq, xs = quantize_groups(x)
    dequantized = (xq.float() * xs.repeat_interleave(128, 1)) @ dequantize_blocks(wq, ws).t() + b
    torch.testing.assert_close(reference_linear_fp8_block(x, wq, ws, b), dequantized, rtol=1e-5, atol=1e-5)
    plain = x @ w.t() + b
    assert (reference_linear_fp8_block(x, wq, ws, b) - plain).abs().max() < 0.1 * plain.abs().max()
    got = CpuBackend().linear_fp8_block(x.bfloat16(), wq, ws, b.bfloat16())  # the Backend default
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference_linear_fp8_block(x.bfloat16(), wq, ws, b.bfloat16()))


def test_tile_scales_cut_only_on_tile_boundaries() -> None:
    assert scale_block_range(0, 256, 512) == (0, 2)
    assert scale_block_range(384, 128, 512) == (3, 1)
    assert scale_block_range(256, 100, 356) == (2, 1)  # the last part may end mid-tile, at the end
    for start, size, total in ((64, 128, 512), (0, 100, 512)):
        with pytest.raises(ValueError, match=rf"\[{start}, {start + size}\) of {total} do not fall on the 128 x 128"):
            scale_block_range(start, size, total)


def test_quantize_linear_layers_in_tiles() -> None:
    """``block=True``: tile scales ``[ceil(out / 128), ceil(in / 128)]`` and ``linear_fp8_block``; the layers
    take inputs quantized per token and group (``"fp8_block"``) from the op before them, and then compute what
    they compute quantizing the input themselves."""
    from pagedllm.backends.fp8_linear import quantize_groups
    from pagedllm.core.models.layers import Fp8Activation, fp8_input_of

    model = nn.ModuleDict({"qkv": MergedLinear(256, [256, 128, 128], bias=False),
                           "o": RowParallelLinear(256, 200, bias=True)})
    for p in model.parameters():
        nn.init.normal_(p)
    x = torch.randn(3, 256)
    expected = reference_linear_fp8_block(x, *quantize_blocks(model["o"].weight.detach()), model["o"].bias.detach())
    assert quantize_linear_layers(model, CpuBackend(), block=True) == 2
    assert model["qkv"].weight_scale.shape == (4, 2) and model["o"].weight_scale.shape == (2, 2)
    torch.testing.assert_close(model["o"](x), expected)
    assert fp8_input_of(model["qkv"]) == fp8_input_of(model["o"]) == "fp8_block"
    assert torch.equal(model["o"](Fp8Activation(*quantize_groups(x), x.dtype)), model["o"](x))
    assert fp8_input_of(nn.Linear(4, 4)) is None
