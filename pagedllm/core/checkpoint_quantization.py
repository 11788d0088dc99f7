"""What a checkpoint's ``config.json`` says about quantized weights (``quantization_config``), checked against
what pagedllm computes.

pagedllm runs fp8 linear layers one way (``pagedllm.backends.fp8_linear``): e4m3 weights with a float32 scale
per output row, inputs quantized to e4m3 per token at each call. A checkpoint whose projections are already
stored that way (or with one scale per tensor, which is the same computation with equal row scales) is loaded
as it is, without its bf16 weights ever existing:

- vLLM's ``fp8`` method (AutoFP8, ``quant_method: "fp8"``) with ``activation_scheme: "dynamic"``: a scalar
  ``weight_scale`` per layer. vLLM scales such inputs per tensor; pagedllm per token, as for every fp8 layer.
- compressed-tensors' ``float-quantized`` format (llm-compressor's ``FP8_DYNAMIC``, the ``-FP8-dynamic``
  checkpoints): 8-bit float weights with the ``channel`` (``weight_scale [out, 1]``) or ``tensor`` strategy,
  8-bit float input activations quantized dynamically.

Refused, with the reason: static input scales (``input_scale``, calibrated per tensor: pagedllm would ignore
them), weight-only fp8, block- or group-wise weight scales, and every other method (AWQ, GPTQ, bitsandbytes...).
"""

from __future__ import annotations

from collections.abc import Mapping

SUPPORTED = (
    "quant_method 'fp8' with activation_scheme 'dynamic' and no weight_block_size, or 'compressed-tensors' "
    "in format 'float-quantized' with 8-bit float weights (strategy 'channel' or 'tensor') and dynamic 8-bit "
    "float input activations"
)


def checkpoint_quantization(hf_config: object) -> str | None:
    """The quantization (a name of ``pagedllm.core.config.QUANTIZATIONS``) the checkpoint's weights are stored
    in, or None for an unquantized checkpoint. Called when the model config is read.

    ``hf_config``: the Hugging Face config; its ``quantization_config`` may be a dict or a transformers
    quantization config object. Raises ValueError naming what the checkpoint declares and what is supported.
    """
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    if not isinstance(config, Mapping):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    method = config.get("quant_method")
    if method == "fp8":
        _check_fp8_method(config)
    elif method == "compressed-tensors":
        _check_compressed_tensors(config)
    else:
        raise ValueError(f"checkpoint quantized with quant_method {method!r}: not supported; pagedllm loads "
                         f"{SUPPORTED}")
    return "fp8"


def _refuse(what: str) -> ValueError:
    return ValueError(f"fp8 checkpoint with {what}: not supported; pagedllm loads {SUPPORTED}")


def _check_fp8_method(config: Mapping[str, object]) -> None:
    scheme = config.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise _refuse(f"activation_scheme {scheme!r} (static input scales)")
    if config.get("weight_block_size"):
        raise _refuse(f"weight_block_size {config['weight_block_size']!r} (block-wise weight scales)")


def _check_compressed_tensors(config: Mapping[str, object]) -> None:
    fmt = config.get("format")
    if fmt != "float-quantized":
        raise _refuse(f"compressed-tensors format {fmt!r}")
    groups = config.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise _refuse("no config_groups")
    for name, group in groups.items():
        if not isinstance(group, Mapping):
            raise _refuse(f"config group {name!r} that is not a mapping")
        weights = group.get("weights") or {}
        inputs = group.get("input_activations")
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise _refuse(f"{name}: weights of type {weights.get('type')!r}, {weights.get('num_bits')} bits")
        if weights.get("strategy") not in ("channel", "tensor"):
            raise _refuse(f"{name}: weight strategy {weights.get('strategy')!r}")
        if not inputs:
            raise _refuse(f"{name}: unquantized input activations (weight-only fp8)")
        if inputs.get("type") != "float" or inputs.get("num_bits") != 8:
            raise _refuse(f"{name}: input activations of type {inputs.get('type')!r}, {inputs.get('num_bits')} "
                          f"bits")
        if not inputs.get("dynamic"):
            raise _refuse(f"{name}: static input activation scales")
