"""What a checkpoint's ``config.json`` says about quantized weights (``quantization_config``), checked against
what pagedllm computes.

pagedllm runs fp8 linear layers in two schemes (``pagedllm.backends.fp8_linear``), with inputs always quantized
dynamically at each call. A checkpoint whose projections are already stored in one of them is loaded as it
is, without its bf16 weights ever existing:

- ``fp8`` (e4m3 weights with a float32 scale per output row, inputs per token; one scale per tensor is the
  same computation with equal row scales):
  - vLLM's ``fp8`` method (AutoFP8, ``quant_method: "fp8"``) with ``activation_scheme: "dynamic"``: a scalar
    ``weight_scale`` per layer. vLLM scales such inputs per tensor; pagedllm per token, as for every fp8 layer.
  - compressed-tensors' ``float-quantized`` format (llm-compressor's ``FP8_DYNAMIC``, the ``-FP8-dynamic``
    checkpoints): 8-bit float weights with the ``channel`` (``weight_scale [out, 1]``) or ``tensor``
    strategy, 8-bit float input activations quantized dynamically per token.
- ``fp8_block`` (a scale per 128 x 128 weight tile, inputs per token and 128 features):
  - vLLM's ``fp8`` method with ``weight_block_size: [128, 128]`` (DeepSeek-V3, Qwen3-*-FP8): the scales as
    ``weight_scale_inv [ceil(out / 128), ceil(in / 128)]`` (despite the name, what dequantization multiplies
    by), dynamic activations.
  - compressed-tensors with the weights' ``block`` strategy, ``block_structure: [128, 128]`` (llm-compressor's
    ``FP8_BLOCK``), input activations in ``group`` strategy with ``group_size: 128``, dynamic.

Refused, with the reason: static input scales (``input_scale``, calibrated per tensor: pagedllm would ignore
them), weight-only fp8, block sizes other than 128 x 128, group-wise weight scales, and every other method
(AWQ, GPTQ, bitsandbytes...).
"""

from __future__ import annotations

from collections.abc import Mapping

SUPPORTED = (
    "quant_method 'fp8' with activation_scheme 'dynamic' (and no weight_block_size, or [128, 128]), or "
    "'compressed-tensors' in format 'float-quantized' with 8-bit float weights (strategy 'channel' or 'tensor' "
    "with dynamic per-token 8-bit float input activations, or strategy 'block' with block_structure [128, 128] "
    "and dynamic 8-bit float input activations in groups of 128)"
)
BLOCK = [128, 128]  # the only weight tile pagedllm's "fp8_block" computes


def checkpoint_quantization(hf_config: object) -> str | None:
    """The quantization (``"fp8"`` or ``"fp8_block"``, names of ``pagedllm.core.config.QUANTIZATIONS``) the
    checkpoint's weights are stored in, or None for an unquantized checkpoint. Called when the model config is read.

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
        return _check_fp8_method(config)
    if method == "compressed-tensors":
        return _check_compressed_tensors(config)
    raise ValueError(f"checkpoint quantized with quant_method {method!r}: not supported; pagedllm loads "
                     f"{SUPPORTED}")


def _refuse(what: str) -> ValueError:
    return ValueError(f"fp8 checkpoint with {what}: not supported; pagedllm loads {SUPPORTED}")


def _check_fp8_method(config: Mapping[str, object]) -> str:
    scheme = config.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise _refuse(f"activation_scheme {scheme!r} (static input scales)")
    block = config.get("weight_block_size")
    if not block:
        return "fp8"
    if list(block) != BLOCK:
        raise _refuse(f"weight_block_size {block!r} (only [128, 128] tiles)")
    return "fp8_block"


def _check_compressed_tensors(config: Mapping[str, object]) -> str:
    fmt = config.get("format")
    if fmt != "float-quantized":
        raise _refuse(f"compressed-tensors format {fmt!r}")
    groups = config.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise _refuse("no config_groups")
    schemes: set[str] = set()
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
        if not inputs.get("dynamic"):
            raise _refuse(f"{name}: static input activation scales")
        if strategy == "block" and (inputs.get("strategy"), inputs.get("group_size")) != ("group", 128):
            raise _refuse(f"{name}: block-wise weights with input activations in strategy "
                          f"{inputs.get('strategy')!r}, group size {inputs.get('group_size')!r}")
        schemes.add("fp8_block" if strategy == "block" else "fp8")
    if len(schemes) > 1:
        raise _refuse("config groups mixing block-wise and per-row weight scales")
    return schemes.pop()
