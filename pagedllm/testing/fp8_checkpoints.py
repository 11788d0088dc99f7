"""Tiny checkpoints stored in fp8 the way quantization tools write them, made from an unquantized one.

Used by the tests (and by anyone checking a backend on fp8 checkpoints) to load what AutoFP8 / vLLM's ``fp8``
method (also with DeepSeek-V3's 128 x 128 tiles) and llm-compressor's ``FP8_DYNAMIC`` / ``FP8_BLOCK``
(compressed-tensors) write, without those tools: the projections' weights in e4m3 with their scales, the rest
as it was, and ``quantization_config`` in config.json.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from pagedllm.backends.fp8_linear import FP8_MAX, dequantize_blocks, quantize_blocks, quantize_rows
from pagedllm.testing.checkpoints import write_checkpoint_variant

PROJECTION = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
"""The checkpoint tensors quantization tools store in fp8 for a Llama-family model (``ignore: [lm_head]``)."""

SCHEMES = ("compressed-tensors-channel", "compressed-tensors-tensor", "fp8", "fp8-block", "compressed-tensors-block",
           "fp8-static", "compressed-tensors-static")
"""``compressed-tensors-channel``: llm-compressor's FP8_DYNAMIC (``weight_scale [out, 1]`` in the weights'
dtype: from a float32 checkpoint, exactly the scales of ``quantization="fp8"``);
``compressed-tensors-tensor``: the same with one scale per tensor (``[1]``); ``fp8``: vLLM's/AutoFP8's
method with dynamic activations (a scalar float32 ``weight_scale``). With 128 x 128 tile scales
(``quantization="fp8_block"``): ``fp8-block``, the ``fp8`` method with ``weight_block_size: [128, 128]`` as
DeepSeek-V3 and Qwen3-FP8 store it (float32 ``weight_scale_inv [ceil(out / 128), ceil(in / 128)]``), and
``compressed-tensors-block``, llm-compressor's FP8_BLOCK (``weight_scale`` of that shape in the weights'
dtype, inputs in groups of 128). Every part of a merged projection (q, k, v; gate, up) must span whole
tiles for these two. With static input scales (a calibrated ``input_scale`` per projection: the largest
magnitude its input reaches over a calibration prompt, divided by 448): ``fp8-static``, AutoFP8's default
(``activation_scheme: static``, scalar float32 scales), and ``compressed-tensors-static``, llm-compressor's
FP8 (per-tensor weights and inputs, ``[1]`` scales in the weights' dtype).

Any scheme may also bring KV-cache scales (``kv_cache_scales=True``; the ``-FP8-KV`` checkpoints): one per layer
for keys and one for values, declared and named as each tool does (:func:`write_fp8_checkpoint`)."""


CALIBRATION = list(range(3, 67))
"""The token ids of the calibration prompt the static schemes' input scales come from."""


def _quantization_config(scheme: str) -> dict[str, object]:
    if scheme in ("fp8", "fp8-static"):
        return {"quant_method": "fp8", "activation_scheme": "static" if scheme == "fp8-static" else "dynamic"}
    if scheme == "fp8-block":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    strategy = scheme.rsplit("-", 1)[1]
    static = strategy == "static"
    strategy = "tensor" if static else strategy
    block = {"block_structure": [128, 128]} if strategy == "block" else {}
    inputs = {"strategy": "group", "group_size": 128} if strategy == "block" else {"strategy": "token"}
    if static:
        inputs = {"strategy": "tensor"}
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "kv_cache_scheme": None,
        "config_groups": {"group_0": {
            "targets": ["Linear"], "output_activations": None,
            "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
                        **block},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
                                  **inputs},
        }},
    }  # fmt: skip


def write_fp8_checkpoint(source: str | Path, directory: str | Path, scheme: str,
                         kv_cache_scales: bool = False) -> tuple[Path, Path]:
    """Write ``source`` (an unquantized safetensors checkpoint, one file) stored in fp8 by ``scheme`` (see
    :data:`SCHEMES`) to ``directory/fp8``, and the same weights dequantized (``e4m3 * scale`` in the source
    dtype; no ``quantization_config``) to ``directory/dequantized``, for a reference that loads no fp8.

    ``kv_cache_scales``: the fp8 checkpoint also gets KV-cache scales from :func:`calibrate_amax` (the
    largest magnitude over 448): for the ``fp8*`` schemes as AutoFP8 writes them (``kv_cache_quant_targets``;
    float32 scalars ``self_attn.k_proj.output_scale`` / ``v_proj.output_scale``), for the others as
    llm-compressor does (``kv_cache_scheme``; ``self_attn.k_scale`` / ``v_scale``, ``[1]`` in the weights' dtype).

    Returns ``(fp8 directory, dequantized directory)``. Raises ValueError for an unknown scheme.
    """
    from safetensors.torch import load_file

    if scheme not in SCHEMES:
        raise ValueError(f"unknown fp8 checkpoint scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    source, directory = Path(source), Path(directory)
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    input_amax, kv_amax = calibrate_amax(source, inputs=scheme.endswith("static"), kv_cache=kv_cache_scales)
    auto_fp8 = scheme.startswith("fp8")  # AutoFP8's names and scale layout, else llm-compressor's
    for name, tensor in load_file(str(source / "model.safetensors")).items():
        if not PROJECTION.search(name):
            quantized[name] = dequantized[name] = tensor
            continue
        scale_name = name.replace(".weight", ".weight_scale")
        if scheme.endswith("block"):
            q, scale = quantize_blocks(tensor)
            if scheme == "fp8-block":
                scale_name += "_inv"  # DeepSeek's name; float32
            else:
                scale = scale.to(tensor.dtype)  # llm-compressor: in the weights' dtype
            values = dequantize_blocks(q, scale)
        elif scheme == "compressed-tensors-channel":
            q, scale = quantize_rows(tensor)
            scale = scale.to(tensor.dtype)[:, None]  # as llm-compressor stores it: [out, 1] in the weights' dtype
            values = q.float() * scale.float()
        else:
            q, scale = quantize_rows(tensor.reshape(1, -1))  # the whole tensor as one row: one scale [1]
            q = q.reshape(tensor.shape)
            scale = scale.reshape(()) if scheme.startswith("fp8") else scale
            values = q.float() * scale.float()
        quantized[name], quantized[scale_name] = q, scale
        dequantized[name] = values.to(tensor.dtype)
        if input_amax:
            quantized[name.replace(".weight", ".input_scale")] = _static_scale(
                input_amax[name.removesuffix(".weight")], auto_fp8, tensor.dtype)
    if kv_cache_scales:
        for layer, amax in kv_amax.items():
            dtype = dequantized[f"{layer}.k_proj.weight"].dtype
            for which, value in zip("kv", amax, strict=True):
                tensor_name = f"{layer}.{which}_proj.output_scale" if auto_fp8 else f"{layer}.{which}_scale"
                quantized[tensor_name] = _static_scale(value, auto_fp8, dtype)
    config = _quantization_config(scheme)
    if kv_cache_scales and auto_fp8:
        config["kv_cache_quant_targets"] = ["k_proj", "v_proj"]
    elif kv_cache_scales:
        config["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                     "symmetric": True}
    return (write_checkpoint_variant(source, directory / "fp8", quantized, config),
            write_checkpoint_variant(source, directory / "dequantized", dequantized))


def _static_scale(amax: float, auto_fp8: bool, dtype: torch.dtype) -> torch.Tensor:
    """A calibrated static scale ``amax / FP8_MAX`` (an input's or a KV cache's) as each tool stores it: AutoFP8
    a float32 scalar, llm-compressor ``[1]`` in the weights' ``dtype``."""
    scale = torch.tensor(amax / FP8_MAX, dtype=torch.float32)
    return scale if auto_fp8 else scale.reshape(1).to(dtype)


def calibrate_amax(source: Path, inputs: bool, kv_cache: bool
                   ) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """What calibration tools derive static scales from, over the :data:`CALIBRATION` prompt through ``source``
    (a transformers checkpoint of the Llama family), in one forward pass (none when neither is asked):

    - with ``inputs``, the largest magnitude the input of each projection reaches, by module name
      (``model.layers.0.self_attn.q_proj``);
    - with ``kv_cache``, the largest magnitudes of each attention layer's keys and values, ``(keys, values)`` by
      module name (``model.layers.0.self_attn``), taken from the KV cache transformers fills, so the keys are
      those the cache stores (after Qwen3's q/k norms and the rotary embedding).

    Returns ``(input amax, KV amax)``; a dict not asked for is empty."""
    input_amax: dict[str, float] = {}
    if not (inputs or kv_cache):
        return input_amax, {}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()

    def record(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            input_amax[name] = max(input_amax.get(name, 0.0), float(args[0].abs().max()))

        return hook

    if inputs:
        for name, module in model.named_modules():
            if PROJECTION.search(name + ".weight"):
                module.register_forward_pre_hook(record(name))
    with torch.inference_mode():
        output = model(torch.tensor([CALIBRATION]), use_cache=True)
    if not kv_cache:
        return input_amax, {}
    cache = output["cache"] if "cache" in output else output["past_key_values"]  # renamed in transformers 5.2x
    # each layer iterates as (keys, values) or, in later releases, (keys, values, sliding-window state)
    return input_amax, {f"model.layers.{index}.self_attn": (float(layer[0].abs().max()), float(layer[1].abs().max()))
                        for index, layer in enumerate(cache)}
