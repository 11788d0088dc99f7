"""``-FP8-KV`` checkpoints: per-layer KV-cache scales (compressed-tensors' ``k_scale``/``v_scale``, AutoFP8's
``k_proj.output_scale``/``v_proj.output_scale``), taken by an fp8 KV cache and skipped by one in the model dtype.

The checkpoints are tiny Llamas whose keys and values are made 2^14 times larger (``k_proj``/``v_proj`` weights
times 2^14, ``q_proj``/``o_proj`` divided by it): the same model to the last bit in float32, but keys and values
in the tens of thousands, which an unscaled e4m3 cache (largest value 448) cannot hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagedllm import LLM
from pagedllm.testing.fp8_checkpoints import write_fp8_checkpoint
from tests.e2e.test_fp8_checkpoints import ENGINE, calls_while_generating, checkpoint_variant, greedy_outputs

INFLATION = 2.0**14
SCALES = {"fp8-static": ("k_proj.output_scale", "v_proj.output_scale"),
          "compressed-tensors-static": ("k_scale", "v_scale")}
"""The two namings of KV-cache scales, by the checkpoint scheme that writes them."""


def inflate_kv(tensors: dict[str, torch.Tensor]) -> None:
    """Keys and values ``INFLATION`` times larger, queries and the output projection's weights that much
    smaller: attention scores and layer outputs unchanged (a power of two scales exactly)."""
    for name in list(tensors):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensors[name] = tensors[name] * INFLATION
        elif name.endswith(("q_proj.weight", "o_proj.weight")):
            tensors[name] = tensors[name] / INFLATION


@pytest.fixture(scope="module")
def kv_checkpoints(checkpoint_factory, tmp_path_factory):
    """``kv_checkpoints(scheme)``: ``(plain, inflated)`` fp8 checkpoints of ``scheme`` with calibrated KV-cache
    scales, from the tiny float32 Llama and from its :func:`inflate_kv` twin."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(scheme: str) -> tuple[Path, Path]:
        if scheme not in cache:
            root = tmp_path_factory.mktemp(f"kv_{scheme}")
            source = checkpoint_factory("llama")
            inflated = checkpoint_variant(source, root / "inflated_source", edit_tensors=inflate_kv)
            plain, _ = write_fp8_checkpoint(source, root / "plain", scheme, kv_cache_scales=True)
            big, _ = write_fp8_checkpoint(inflated, root / "inflated", scheme, kv_cache_scales=True)
            cache[scheme] = plain, big
        return cache[scheme]

    return get


def _layers(llm: LLM) -> list[torch.nn.Module]:
    return llm.llm_engine.executor.worker.runner.model.attention_layers()


@pytest.mark.parametrize("scheme", list(SCALES))
def test_an_fp8_cache_takes_the_checkpoints_kv_scales(kv_checkpoints, tmp_path: Path, scheme: str) -> None:
    """With ``kv_cache_dtype="fp8"`` each layer stores keys and values divided by its scales: the inflated
    checkpoint then computes exactly what the plain one does (tokens and logprobs equal), and close to the model
    dtype cache (the first tokens equal); the same inflated checkpoint without its scales saturates the cache
    and does not."""
    plain, inflated = kv_checkpoints(scheme)
    scaled = LLM(str(inflated), kv_cache_dtype="fp8", **ENGINE)
    layers = _layers(scaled)
    assert all(layer.k_scale > 1.0 and layer.v_scale > 1.0 for layer in layers)  # calibrated: ~2^14 * amax / 448
    reference = LLM(str(plain), kv_cache_dtype="fp8", **ENGINE)
    assert [layer.k_scale for layer in layers] == [layer.k_scale * INFLATION for layer in _layers(reference)]
    outputs = greedy_outputs(scaled)
    assert outputs == greedy_outputs(reference)
    model_dtype_cache = greedy_outputs(LLM(str(inflated), **ENGINE))
    assert all(layer.k_scale == 1.0 for layer in _layers(LLM(str(inflated), **ENGINE)))  # skipped
    assert [tokens[:4] for tokens, _ in outputs] == [tokens[:4] for tokens, _ in model_dtype_cache]

    def drop_scales(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.endswith(SCALES[scheme])]:
            del tensors[name]

    unscaled = checkpoint_variant(inflated, tmp_path / "unscaled", edit_tensors=drop_scales)
    unscaled_outputs = greedy_outputs(LLM(str(unscaled), kv_cache_dtype="fp8", **ENGINE))
    assert [tokens for tokens, _ in unscaled_outputs] != [tokens for tokens, _ in outputs]


def test_kv_cache_scales_are_checked_and_must_be_declared(kv_checkpoints, tmp_path: Path) -> None:
    """A scale that is not one positive value is refused naming its tensor; scale tensors config.json does not
    declare are refused, whatever the cache; a scheme with a scale per head is refused when the config is read."""
    plain, _ = kv_checkpoints("compressed-tensors-static")
    name = "model.layers.1.self_attn.v_scale"
    zero = checkpoint_variant(plain, tmp_path / "zero", edit_tensors=lambda t: t.update({name: torch.zeros(1)}))
    with pytest.raises(ValueError, match=rf"'{name}': KV-cache scale 0.0: expected a positive finite value"):
        LLM(str(zero), kv_cache_dtype="fp8", **ENGINE)
    LLM(str(zero), **ENGINE)  # the model dtype cache never reads them
    undeclared = checkpoint_variant(plain, tmp_path / "undeclared",
                                    edit_config=lambda c: c["quantization_config"].pop("kv_cache_scheme"))
    for kv_cache_dtype in ("auto", "fp8"):
        with pytest.raises(ValueError, match=r"self_attn.k_scale' is a KV-cache scale, but config.json's "
                                             r"quantization_config declares none"):
            LLM(str(undeclared), kv_cache_dtype=kv_cache_dtype, **ENGINE)
    per_head = checkpoint_variant(plain, tmp_path / "per_head", edit_config=lambda c: c["quantization_config"][
        "kv_cache_scheme"].update(strategy="attn_head"))
    with pytest.raises(ValueError, match="kv_cache_scheme with strategy 'attn_head': not supported"):
        LLM(str(per_head), **ENGINE)


def test_dummy_weights_with_kv_cache_scales(checkpoint_factory, tmp_path: Path) -> None:
    """A config-only directory declaring KV-cache scales (``benchmarks/llama3_8b_fp8_kv_config``'s kind) loads with
    dummy weights for speed runs: with an fp8 cache every layer gets :data:`DUMMY_KV_SCALE` and the steps go
    through the scaled ops; with the model dtype cache, none."""
    from pagedllm.core.loader import DUMMY_KV_SCALE

    config = json.loads((checkpoint_factory("llama") / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static",
                                     "kv_cache_quant_targets": ["k_proj", "v_proj"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(tmp_path), load_format="dummy", kv_cache_dtype="fp8", **ENGINE)
    assert all(layer.k_scale == layer.v_scale == DUMMY_KV_SCALE for layer in _layers(llm))
    assert calls_while_generating(llm, "attention_scaled") > 0
    plain = LLM(str(tmp_path), load_format="dummy", **ENGINE)
    assert all(layer.k_scale == layer.v_scale == 1.0 for layer in _layers(plain))


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_other_architectures_take_their_kv_scales(checkpoint_factory, tmp_path: Path, arch: str) -> None:
    """Qwen3 (keys normed per head before the rotary embedding: scales calibrated on what the cache stores) and
    Qwen2 (biased k/v projections) as ``-FP8-KV`` checkpoints: each layer takes its scales, and the fp8 cache's
    first tokens are the model dtype cache's."""
    plain, _ = write_fp8_checkpoint(checkpoint_factory(arch), tmp_path, "compressed-tensors-static",
                                    kv_cache_scales=True)
    scaled = LLM(str(plain), kv_cache_dtype="fp8", **ENGINE)
    assert all(layer.k_scale != 1.0 and layer.v_scale != 1.0 for layer in _layers(scaled))
    outputs, reference = greedy_outputs(scaled), greedy_outputs(LLM(str(plain), **ENGINE))
    assert [tokens[:3] for tokens, _ in outputs] == [tokens[:3] for tokens, _ in reference]
