"""KV caches holding scaled keys and values (interface 1.9): the store rule, the base class's defaults that let
older plugins run them, the layer that loads a checkpoint's scales, and the config check of their scheme."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.interface import AttentionSpec, Backend
from pagedllm.backends.kv_storage import divide_by_scale, inverse_scale
from pagedllm.conformance.cases import K_SCALE, V_SCALE, scenario_requests
from pagedllm.conformance.reference import build_attention_batch, reference_attention, tolerance
from pagedllm.core.checkpoint_quantization import checkpoint_kv_cache_scales
from pagedllm.core.models.layers import PagedAttention


class DefaultScaledKvBackend(CpuBackend):
    """The cpu kernels with the base class's scaled store and attention: what a 1.0-1.8 plugin runs."""

    write_kv_cache_scaled = Backend.write_kv_cache_scaled
    attention_scaled = Backend.attention_scaled


def test_the_store_multiplies_by_the_float32_inverse() -> None:
    assert inverse_scale(3.0) == float(torch.tensor(1 / 3, dtype=torch.float32))
    values = torch.tensor([3000.0, -7.5], dtype=torch.bfloat16)
    assert torch.equal(divide_by_scale(values, 3.0), values.float() * torch.tensor(1 / 3, dtype=torch.float32))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"KV cache scale .*: expected a positive finite number"):
            inverse_scale(bad)
    with pytest.raises(ValueError, match="its inverse exceeds float32's range"):
        inverse_scale(1e-45)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend_cls", [CpuBackend, DefaultScaledKvBackend])
def test_scaled_attention_matches_the_reference(backend_cls: type[CpuBackend], dtype: torch.dtype) -> None:
    """Both the cpu backend's own scaled ops and the base class's defaults (folding the scales into the score
    scale and the output) attend over what the scaled e4m3 cache stands for; unscaled ops over the same cache do
    not (the test can fail)."""
    backend = backend_cls()
    spec = AttentionSpec(8, 2, 64, 64**-0.5)
    batch = build_attention_batch(backend, torch.device("cpu"), scenario_requests("mixed", 16), spec, 16, dtype,
                                  torch.float8_e4m3fn, torch.Generator().manual_seed(0), k_scale=K_SCALE,
                                  v_scale=V_SCALE)
    batch.write(backend, batch.key, batch.value, batch.metadata.slot_mapping)
    expected = reference_attention(batch) / V_SCALE
    tol = tolerance(dtype, torch.float8_e4m3fn)
    actual = batch.attend(backend)[: batch.metadata.num_tokens].float() / V_SCALE
    torch.testing.assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol)
    unscaled = backend.attention(batch.query, batch.key, batch.value, batch.kv_cache, batch.metadata, batch.spec)
    assert not torch.allclose(unscaled[: batch.metadata.num_tokens].float() / V_SCALE, expected, atol=tol.atol,
                              rtol=tol.rtol)


def test_the_layer_takes_each_checkpoint_name_of_a_scale() -> None:
    layer = PagedAttention(AttentionSpec(4, 2, 64, 0.125), CpuBackend())
    assert (layer.k_scale, layer.v_scale) == (1.0, 1.0)
    layer.load_kv_scale("k_proj.output_scale", torch.tensor(2.5))
    layer.load_kv_scale("v_scale", torch.tensor([0.75], dtype=torch.bfloat16))
    assert (layer.k_scale, layer.v_scale) == (2.5, 0.75)
    layer.load_kv_scale("kv_scale", torch.tensor([[4.0]]))
    assert (layer.k_scale, layer.v_scale) == (4.0, 4.0)
    with pytest.raises(ValueError, match=r"KV-cache scale of shape \(2,\): expected one per layer"):
        layer.load_kv_scale("k_scale", torch.tensor([1.0, 2.0]))
    for bad in (0.0, -2.0, math.inf):
        with pytest.raises(ValueError, match=r"KV-cache scale .*: expected a positive finite value"):
            layer.load_kv_scale("k_scale", torch.tensor(bad))


def _config(**quantization: object) -> SimpleNamespace:
    return SimpleNamespace(quantization_config={"quant_method": "compressed-tensors", **quantization})


def test_kv_cache_schemes_are_checked() -> None:
    per_tensor = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    assert checkpoint_kv_cache_scales(_config(kv_cache_scheme=per_tensor))
    assert checkpoint_kv_cache_scales(SimpleNamespace(quantization_config={"quant_method": "fp8",
                                                                           "kv_cache_quant_targets": ["k_proj"]}))
    assert not checkpoint_kv_cache_scales(_config(kv_cache_scheme=None))
    assert not checkpoint_kv_cache_scales(SimpleNamespace())
    with pytest.raises(ValueError, match="kv_cache_scheme with strategy 'attn_head': not supported"):
        checkpoint_kv_cache_scales(_config(kv_cache_scheme={**per_tensor, "strategy": "attn_head"}))
    with pytest.raises(ValueError, match=r"strategy 'tensor' \(dynamic\): not supported"):
        checkpoint_kv_cache_scales(_config(kv_cache_scheme={**per_tensor, "dynamic": True}))
    with pytest.raises(ValueError, match="kv_cache_scheme of type 'int', 8 bits: not supported"):
        checkpoint_kv_cache_scales(_config(kv_cache_scheme={**per_tensor, "type": "int"}))
