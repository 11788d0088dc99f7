"""The ``"w4a16"`` reference (4-bit packing, rounding, the linear layer) and the checkpoint formats' converters
and declarations."""

from __future__ import annotations

import pytest
import torch

from pagedllm.backends.w4a16_linear import (
    dequantize_w4a16,
    pack_int4,
    quantize_w4a16,
    reference_linear_w4a16,
    unpack_int4,
)
from pagedllm.core import w4a16_formats as formats
from pagedllm.core.w4a16_loading import W4A16Format, checkpoint_w4a16
from pagedllm.testing.w4a16_checkpoints import _quantize, quantization_config


def test_packing_puts_feature_k_in_nibble_k_mod_8() -> None:
    values = torch.arange(16, dtype=torch.int32).reshape(1, 16) % 16
    words = pack_int4(values)
    assert words.tolist() == [[0x76543210, 0xFEDCBA98 - 2**32]]  # as a signed int32
    assert torch.equal(unpack_int4(words), values.to(torch.uint8))
    random = torch.randint(0, 16, (5, 64))
    assert torch.equal(unpack_int4(pack_int4(random)).long(), random)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int32))


@pytest.mark.parametrize("symmetric", [False, True])
def test_rounding_to_nearest_stays_within_half_a_step(symmetric: bool) -> None:
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    packed, scales, zeros = quantize_w4a16(w, 64, symmetric, torch.float32)
    assert packed.shape == (32, 32) and scales.shape == zeros.shape == (32, 4) and zeros.dtype == torch.uint8
    if symmetric:
        assert bool((zeros == 8).all())
    error = (dequantize_w4a16(packed, scales, zeros, 64) - w).abs()
    step = scales.repeat_interleave(64, dim=1)
    assert bool((error <= step * 0.5 + 1e-6).all())
    assert error.max() > 0.01  # the rounding is real


def test_reference_linear_is_the_dequantized_product_with_act_order_groups() -> None:
    gen = torch.Generator().manual_seed(1)
    w, x, bias = torch.randn(24, 64, generator=gen), torch.randn(3, 64, generator=gen), torch.randn(24, generator=gen)
    packed, scales, zeros = quantize_w4a16(w, 32)
    g_idx = (torch.arange(64) // 32)[torch.randperm(64, generator=gen)].to(torch.int32)
    expected = x @ (unpack_int4(packed).float() - zeros.float()[:, g_idx.long()]).mul(
        scales.float()[:, g_idx.long()]).t() + bias
    got = reference_linear_w4a16(x, packed, scales, zeros, 32, g_idx, bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    half = reference_linear_w4a16(x.half(), packed, scales, zeros, 32)
    assert half.dtype == torch.float16


@pytest.mark.parametrize("scheme", ["awq", "gptq", "gptq-v2", "compressed-tensors-asym"])
def test_converters_undo_each_tools_layout(scheme: str) -> None:
    """A projection written in a tool's layout (the tests' writer) reads back as the weight it was made from."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=gen)
    parts, dequantized = _quantize(w, scheme, 32, torch.float16 if not scheme.startswith("compressed") else w.dtype)
    if scheme == "awq":
        weight, scales, zeros = formats.awq_to_w4a16(parts["qweight"], parts["qzeros"], parts["scales"])
    elif scheme.startswith("gptq"):
        weight, scales, zeros, g_idx = formats.gptq_to_w4a16(parts["qweight"], parts["qzeros"], parts["scales"],
                                                             parts["g_idx"], 32, 0 if scheme == "gptq-v2" else 1)
        assert g_idx is None
    else:
        weight, scales, zeros, _ = formats.compressed_to_w4a16(parts["weight_packed"], parts["weight_scale"],
                                                               parts["weight_zero_point"], None, 32)
    assert torch.equal(dequantize_w4a16(weight, scales, zeros, 32), dequantized)


def test_awq_nibble_order() -> None:
    """AutoAWQ packs features 0, 2, 4, 6, 1, 3, 5, 7 of eight into nibbles 0..7 of a word."""
    word = torch.tensor([[0x75316420]], dtype=torch.int32)
    assert formats.unpack_awq(word).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]


def test_gptq_original_format_stores_each_word_of_zero_points_minus_0x11111111() -> None:
    """As GPTQModel writes and reads them: a zero point of 0 borrows from the next one, and adding the word back
    restores both (symmetric weights: every zero point 8, stored 0x77777777)."""
    assert formats.gptq_zeros(torch.tensor([[0x77777777]], dtype=torch.int32), 1).t().tolist() == [[8] * 8]
    zeros = torch.tensor([[0, 3, 0, 15, 1, 0, 8, 2]], dtype=torch.int32)
    word = int(pack_int4(zeros)) % 2**32 - 0x11111111  # the zero points 0 borrow from their neighbours
    stored = torch.tensor([[word if word < 2**31 else word - 2**32]], dtype=torch.int32)
    assert formats.gptq_zeros(stored, 1).t().tolist() == zeros.tolist()
    assert formats.gptq_zeros(stored, 0).t().tolist()[0][:2] == [15, 1]  # gptq_v2 reads the nibbles as they are


@pytest.mark.parametrize("scheme", ["awq", "gptq", "gptq-act-order", "gptq-v2", "compressed-tensors",
                                    "compressed-tensors-asym"])
def test_declared_formats(scheme: str) -> None:
    fmt = checkpoint_w4a16(quantization_config(scheme, 64))
    method = "gptq" if scheme.startswith("gptq") else scheme.removesuffix("-asym")
    assert fmt == W4A16Format(method, 64, 1 if scheme in ("gptq", "gptq-act-order") else 0,
                              scheme == "gptq-act-order", scheme == "compressed-tensors")


def test_unquantized_and_fp8_checkpoints_are_not_w4a16() -> None:
    assert checkpoint_w4a16(None) is None
    assert checkpoint_w4a16({"quant_method": "fp8", "activation_scheme": "dynamic"}) is None
    assert checkpoint_w4a16({"quant_method": "compressed-tensors", "format": "float-quantized"}) is None


@pytest.mark.parametrize(("config", "message"), [
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "AWQ bits 8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point false"),
    ({"quant_method": "awq", "bits": 4, "group_size": 256}, "group_size 256"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "modules_to_not_convert": ["mlp.down_proj"]},
     "left unquantized"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ bits 3"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"-:.*down": {}}}, "dynamic"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "weights": {"type": "int", "num_bits": 8, "strategy": "group", "group_size": 128}}}}, "8 bits"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "weights": {"type": "int", "num_bits": 4, "strategy": "tensor"}}}}, "strategy 'tensor'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128},
        "input_activations": {"type": "int", "num_bits": 8}}}}, "quantized input activations"),
])
def test_what_is_not_computed_is_refused_with_the_reason(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        checkpoint_w4a16(config)


class _Projection(torch.nn.Module):
    quantizable = True

    def __init__(self, out: int, inp: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out, inp))


@pytest.mark.parametrize("equal_groups", [True, False])
def test_act_order_columns_are_sorted_by_group_when_the_groups_are_equal(equal_groups: bool) -> None:
    """GPTQ's act-order (every group ``group_size`` features, in a permuted order): the loader sorts the weight's
    columns by group and permutes the input instead, so the kernels read one scale per step; groups of unequal
    sizes keep their ``g_idx``. Either way the layer computes the checkpoint's product."""
    from pagedllm.backends.cpu.backend import CpuBackend
    from pagedllm.core.w4a16_loading import finish_w4a16, prepare_w4a16_weights

    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(_Projection(16, 64))
    prepare_w4a16_weights(model, CpuBackend(), W4A16Format("gptq", 32, 1, True, False))
    layer = model[0]
    packed, scales, zeros = quantize_w4a16(torch.randn(16, 64, generator=gen), 32)
    in_group_0 = 32 if equal_groups else 29  # else three more features in group 1 than in group 0
    g_idx = (torch.arange(64) >= in_group_0)[torch.randperm(64, generator=gen)].to(torch.int32)
    layer.weight.data.copy_(packed)
    layer.weight_scale.data.copy_(scales)
    layer.weight_zero.data.copy_(zeros)
    layer.g_idx.data.copy_(g_idx)
    x = torch.randn(5, 64, generator=gen)
    want = reference_linear_w4a16(x, packed, scales, zeros, 32, g_idx)
    assert finish_w4a16(model) == int(equal_groups)
    assert (layer.g_idx is None) == equal_groups and (layer.input_perm is not None) == equal_groups
    torch.testing.assert_close(layer.linear_op(x, layer.weight, None), want, rtol=1e-5, atol=1e-5)
