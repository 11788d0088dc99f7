"""What a checkpoint's ``config.json`` says about quantized weights (``quantization_config``), checked against
what pagedllm computes.

pagedllm runs fp8 linear layers in two schemes (``pagedllm.backends.fp8_linear``), with inputs quantized
dynamically at each call, or, for per-row weights, with one calibrated scale per layer that the checkpoint
brings (``input_scale``: static input scales; :func:`checkpoint_fp8` reads which). A checkpoint whose projections
are already stored in one of them is loaded as it is, without its bf16 weights ever existing:

- ``fp8`` (e4m3 weights with a float32 scale per output row, inputs per token; one scale per tensor is the
  same computation with equal row scales):
  - vLLM's ``fp8`` method (AutoFP8, ``quant_method: "fp8"``) with ``activation_scheme: "dynamic"``: a scalar
    ``weight_scale`` per layer. vLLM scales such inputs per tensor; pagedllm per token, as for every fp8 layer.
    With ``activation_scheme: "static"`` (AutoFP8's default, the ``-FP8`` checkpoints of Meta-Llama-3 and
    others) each layer also has a scalar ``input_scale``: its inputs are quantized with that scale, as vLLM
    does (the parts of a merged projection, which share their input, take the largest of their scales).
  - compressed-tensors' ``float-quantized`` format (llm-compressor's ``FP8_DYNAMIC``, the ``-FP8-dynamic``
    checkpoints): 8-bit float weights with the ``channel`` (``weight_scale [out, 1]``) or ``tensor``
    strategy, 8-bit float input activations quantized dynamically per token — or statically per tensor
    (llm-compressor's ``FP8``: ``input_scale`` per layer, as above).
- ``fp8_block`` (a scale per 128 x 128 weight tile, inputs per token and 128 features):
  - vLLM's ``fp8`` method with ``weight_block_size: [128, 128]`` (DeepSeek-V3, Qwen3-*-FP8): the scales as
    ``weight_scale_inv [ceil(out / 128), ceil(in / 128)]`` (despite the name, what dequantization multiplies
    by), dynamic activations.
  - compressed-tensors with the weights' ``block`` strategy, ``block_structure: [128, 128]`` (llm-compressor's
    ``FP8_BLOCK``), input activations in ``group`` strategy with ``group_size: 128``, dynamic.

Refused, with the reason: static input scales with tile-scaled weights or per token, weight-only fp8, block
sizes other than 128 x 128, group-wise weight scales, config groups mixing schemes, and every other method
(bitsandbytes...) but the 4-bit ones ``pagedllm.core.w4a16_loading`` reads (AWQ, GPTQ, compressed-tensors'
``pack-quantized``). KV-cache scales (:func:`checkpoint_kv_cache_scales`, one per layer for keys and
one for values) are taken by an fp8 KV cache (``kv_cache_dtype="fp8"``), which then stores keys and values
divided by them, and skipped with a cache in the model dtype; scales per head or channel are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

SUPPORTED = (
    "quant_method 'fp8' with activation_scheme 'dynamic' (and no weight_block_size, or [128, 128]) or 'static' "
    "(no weight_block_size), or 'compressed-tensors' in format 'float-quantized' with 8-bit float weights "
    "(strategy 'channel' or 'tensor' with 8-bit float input activations dynamic per token or static per "
    "tensor, or strategy 'block' with block_structure [128, 128] and dynamic 8-bit float input activations in "
    "groups of 128)"
)
BLOCK = [128, 128]  # the only weight tile pagedllm's "fp8_block" computes


class CheckpointFp8(NamedTuple):
    """What a checkpoint's weights are stored in: :func:`checkpoint_fp8`'s answer."""

    quantization: str | None
    """``"fp8"`` or ``"fp8_block"`` (names of ``pagedllm.core.config.QUANTIZATIONS``); None: unquantized."""
    input_scales: str | None
    """How the fp8 projections scale their inputs: ``"dynamic"`` (computed at each call) or ``"static"`` (a
    calibrated ``input_scale`` per layer, stored in the checkpoint; per-row weights only); None: unquantized."""


def checkpoint_fp8(hf_config: object) -> CheckpointFp8:
    """The fp8 scheme the checkpoint's weights are stored in (both fields None for an unquantized checkpoint).
    Called once, when the model config is read.

    ``hf_config``: the Hugging Face config; its ``quantization_config`` may be a dict or a transformers
    quantization config object. Raises ValueError naming what the checkpoint declares and what is supported.
    """
    config = quantization_config(hf_config)
    if config is None:
        return CheckpointFp8(None, None)
    method = config.get("quant_method")
    if method == "fp8":
        return CheckpointFp8(*_check_fp8_method(config))
    if method == "compressed-tensors":
        return CheckpointFp8(*_check_compressed_tensors(config))
    raise ValueError(f"checkpoint quantized with quant_method {method!r}: not supported; pagedllm loads "
                     f"{SUPPORTED}")


KV_SCALE_TENSOR = re.compile(r"\.self_attn\.(k_scale|v_scale|kv_scale|k_proj\.output_scale|v_proj\.output_scale)$")
"""The names under which fp8 checkpoints store KV-cache scales (compressed-tensors' ``k_scale``/``v_scale``,
AutoFP8's ``k_proj.output_scale``/``v_proj.output_scale``, the older ``kv_scale``)."""


def checkpoint_kv_cache_scales(hf_config: object) -> bool:
    """Whether the checkpoint declares per-layer KV-cache scales (compressed-tensors' ``kv_cache_scheme``,
    AutoFP8's ``kv_cache_quant_targets``; the ``-FP8-KV`` checkpoints). With ``kv_cache_dtype="fp8"`` each
    attention layer's cache then holds keys and values divided by its scales (without them: scale 1, vLLM's
    default too); with a cache in the model dtype the loader skips them. Called when the model config is read.
    Raises ValueError for a ``kv_cache_scheme`` other than 8-bit floats with one static scale per tensor."""
    config = quantization_config(hf_config)
    if config is None:
        return False
    scheme = config.get("kv_cache_scheme")
    if scheme:
        if not isinstance(scheme, Mapping):
            raise ValueError(f"kv_cache_scheme {scheme!r}: expected a mapping")
        if (scheme.get("type", "float"), scheme.get("num_bits", 8)) != ("float", 8):
            raise ValueError(f"kv_cache_scheme of type {scheme.get('type')!r}, {scheme.get('num_bits')} bits: not "
                             f"supported; pagedllm's fp8 KV cache takes 8-bit float scales")
        if scheme.get("strategy", "tensor") != "tensor" or scheme.get("dynamic"):
            raise ValueError(f"kv_cache_scheme with strategy {scheme.get('strategy')!r}"
                             f"{' (dynamic)' if scheme.get('dynamic') else ''}: not supported; pagedllm's fp8 KV "
                             f"cache takes one static scale per layer for keys and one for values")
    return bool(scheme or config.get("kv_cache_quant_targets"))


def quantization_config(hf_config: object) -> Mapping[str, object] | None:
    """``hf_config.quantization_config`` as a mapping (a dict or a transformers config object), or None. Called
    when the model config is read."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None or isinstance(config, Mapping):
        return config
    return config.to_dict() if hasattr(config, "to_dict") else vars(config)


def _refuse(what: str) -> ValueError:
    return ValueError(f"fp8 checkpoint with {what}: not supported; pagedllm loads {SUPPORTED}")


def _check_fp8_method(config: Mapping[str, object]) -> tuple[str, str]:
    inputs = config.get("activation_scheme", "dynamic")
    if inputs not in ("dynamic", "static"):
        raise _refuse(f"activation_scheme {inputs!r}")
    block = config.get("weight_block_size")
    if not block:
        return "fp8", inputs
    if list(block) != BLOCK:
        raise _refuse(f"weight_block_size {block!r} (only [128, 128] tiles)")
    if inputs == "static":
        raise _refuse("weight_block_size with activation_scheme 'static' (tile-scaled weights take dynamic "
                      "inputs in groups of 128)")
    return "fp8_block", inputs


def _check_compressed_tensors(config: Mapping[str, object]) -> tuple[str, str]:
    fmt = config.get("format")
    if fmt != "float-quantized":
        raise _refuse(f"compressed-tensors format {fmt!r}")
    groups = config.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise _refuse("no config_groups")
    schemes: set[tuple[str, str]] = set()
    for name, group in groups.items():
        if not isinstance(group, Mapping):
            raise _refuse(f"config group {name!r} that is not a mapping")
        weights = group.get("weights") or {}
        inputs = group.get("input_activations")
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise _refuse(f"{name}: weights of type {weights.get('type')!r}, {weights.get('num_bits')} bits")
        strategy = weights.get("strategy")
        if strategy not in ("channel", "tensor", "block"):
            raise _refuse(f"{name}: weight strategy {strategy!r}")
        if strategy == "block" and list(weights.get("block_structure") or []) != BLOCK:
            raise _refuse(f"{name}: block_structure {weights.get('block_structure')!r} (only [128, 128] tiles)")
        if not inputs:
            raise _refuse(f"{name}: unquantized input activations (weight-only fp8)")
        if inputs.get("type") != "float" or inputs.get("num_bits") != 8:
            raise _refuse(f"{name}: input activations of type {inputs.get('type')!r}, {inputs.get('num_bits')} "
                          f"bits")
        static = not inputs.get("dynamic")
        if static and (strategy == "block" or inputs.get("strategy") != "tensor"):
            raise _refuse(f"{name}: static input activation scales in strategy {inputs.get('strategy')!r} with "
                          f"{strategy!r} weights (static scales are taken per tensor, with per-row weights)")
        if strategy == "block" and (inputs.get("strategy"), inputs.get("group_size")) != ("group", 128):
            raise _refuse(f"{name}: block-wise weights with input activations in strategy "
                          f"{inputs.get('strategy')!r}, group size {inputs.get('group_size')!r}")
        schemes.add(("fp8_block" if strategy == "block" else "fp8", "static" if static else "dynamic"))
    if len(schemes) > 1:
        raise _refuse("config groups mixing schemes (block-wise and per-row weight scales, or static and "
                      "dynamic input scales)")
    return schemes.pop()
