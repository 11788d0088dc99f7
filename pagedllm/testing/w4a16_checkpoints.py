"""Tiny 4-bit checkpoints stored the way AutoAWQ, GPTQ (AutoGPTQ / GPTQModel) and llm-compressor
(compressed-tensors ``pack-quantized``) write them, made from an unquantized one by rounding to nearest.

Used by the tests (and by anyone checking a backend on 4-bit checkpoints) without those tools: the projections'
weights packed in the tool's layout with its scales and zero points, the rest as it was, and
``quantization_config`` in config.json; plus the same weights dequantized, for a reference (transformers) that
loads no 4-bit weights.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from pagedllm.backends.w4a16_linear import (
    PACK,
    as_int32_words,
    dequantize_w4a16,
    pack_int4,
    quantize_w4a16_act_order,
    unpack_int4,
)
from pagedllm.core.w4a16_formats import GPTQ_V1_OFFSET
from pagedllm.testing.checkpoints import write_checkpoint_variant

PROJECTION = re.compile(r"\.(q|k|v|o|gate|up|down|qkv|gate_up)_proj\.weight$")
"""The checkpoint tensors the tools quantize in a Llama-family model, Phi-3's fused ``qkv_proj`` and
``gate_up_proj`` among them (never the LM head or the embeddings)."""

SCHEMES = ("awq", "gptq", "gptq-sym", "gptq-act-order", "gptq-v2", "compressed-tensors", "compressed-tensors-asym")
"""``awq``: AutoAWQ's GEMM layout (asymmetric, float16 scales); ``gptq``: GPTQ's original format as GPTQModel
writes it (``checkpoint_format: gptq``, each word of zero points minus 0x11111111, float16 scales, asymmetric),
``gptq-sym`` the same symmetric (zero points 8), ``gptq-act-order`` with ``desc_act: true`` (the groups number a
permutation of the features), ``gptq-v2`` GPTQModel's ``gptq_v2`` format (zero points as they are);
``compressed-tensors``: llm-compressor's W4A16 (symmetric, scales in the weights' dtype), ``compressed-tensors-asym``
its W4A16_ASYM."""

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the feature AutoAWQ puts in each nibble of a word


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` 4-bit values -> ``[rows, cols // 8]`` AWQ words (along the columns, AutoAWQ's order)."""
    rows, cols = values.shape
    return pack_int4(values.reshape(rows, cols // PACK, PACK)[:, :, list(AWQ_ORDER)].reshape(rows, cols))


def quantization_config(scheme: str, group_size: int) -> dict[str, object]:
    """The ``quantization_config`` the tool writes into config.json for ``scheme`` (:data:`SCHEMES`)."""
    if scheme == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    if scheme.startswith("gptq"):
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": scheme == "gptq-act-order",
                "sym": scheme == "gptq-sym", "true_sequential": True, "damp_percent": 0.01,
                "checkpoint_format": "gptq_v2" if scheme == "gptq-v2" else "gptq"}
    symmetric = scheme == "compressed-tensors"
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"], "input_activations": None, "output_activations": None,
            "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
                        "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"}}},
    }


def _quantize(weight: torch.Tensor, scheme: str, group_size: int, scale_dtype: torch.dtype,
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One projection's tensors in ``scheme`` (by suffix) and its dequantized float32 weight."""
    out, inp = weight.shape
    symmetric = scheme in ("gptq-sym", "compressed-tensors")
    # one permutation per input width: the parts of a merged projection share their input, so GPTQ orders them alike
    perm = torch.randperm(inp, generator=torch.Generator().manual_seed(inp)) if scheme == "gptq-act-order" \
        else torch.arange(inp)
    packed, scales, zeros, g_idx = quantize_w4a16_act_order(weight, group_size, perm, symmetric, scale_dtype)
    values = unpack_int4(packed)
    dequantized = dequantize_w4a16(packed, scales, zeros, group_size, g_idx)
    if scheme == "awq":
        return {"qweight": _pack_awq(values.t()), "qzeros": _pack_awq(zeros.t()), "scales": scales.t().contiguous()}, \
            dequantized
    if scheme.startswith("gptq"):
        qzeros = pack_int4(zeros.t()).to(torch.int64)
        if scheme != "gptq-v2":  # GPTQModel's original format: each word minus 0x11111111, borrowing
            qzeros = (qzeros - GPTQ_V1_OFFSET) & 0xFFFFFFFF
        return {"qweight": packed.t().contiguous(), "qzeros": as_int32_words(qzeros),
                "scales": scales.t().contiguous(), "g_idx": g_idx}, dequantized
    tensors = {"weight_packed": packed, "weight_scale": scales,
               "weight_shape": torch.tensor([out, inp], dtype=torch.int64)}
    if not symmetric:
        tensors["weight_zero_point"] = pack_int4(zeros.t().contiguous()).t().contiguous()
    return tensors, dequantized


def write_w4a16_checkpoint(source: str | Path, directory: str | Path, scheme: str, group_size: int = 32,
                           ) -> tuple[Path, Path]:
    """Write ``source`` (an unquantized safetensors checkpoint, one file) with its projections stored in 4 bits
    by ``scheme`` (:data:`SCHEMES`), in groups of ``group_size`` input features, to ``directory/w4a16``, and
    the same weights dequantized (in the source dtype, no ``quantization_config``) to ``directory/dequantized``.
    AWQ and GPTQ scales are float16, compressed-tensors' in the weights' dtype. Returns ``(4-bit directory,
    dequantized directory)``. Raises ValueError for an unknown scheme."""
    from safetensors.torch import load_file

    if scheme not in SCHEMES:
        raise ValueError(f"unknown 4-bit checkpoint scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    source, directory = Path(source), Path(directory)
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(str(source / "model.safetensors")).items():
        if not PROJECTION.search(name):
            quantized[name] = dequantized[name] = tensor
            continue
        scale_dtype = tensor.dtype if scheme.startswith("compressed") else torch.float16
        parts, values = _quantize(tensor, scheme, group_size, scale_dtype)
        layer = name.removesuffix(".weight")
        quantized.update({f"{layer}.{suffix}": part for suffix, part in parts.items()})
        dequantized[name] = values.to(tensor.dtype)
    return (write_checkpoint_variant(source, directory / "w4a16", quantized, quantization_config(scheme, group_size)),
            write_checkpoint_variant(source, directory / "dequantized", dequantized))


def write_with_compressed_tensors(source: str | Path, directory: str | Path, symmetric: bool = True,
                                  group_size: int = 32) -> Path:
    """Write ``source`` (an unquantized checkpoint) as llm-compressor would with its ``W4A16`` (``symmetric``) or
    ``W4A16_ASYM`` preset, through the compressed-tensors library itself (not this module's layouts): each
    projection's scales and zero points from the minimum and maximum of its groups of ``group_size``, then the
    library's ``pack-quantized`` compressor and its ``quantization_config``; the tokenizer files copied.
    Returns ``directory``. Needs the ``compressed-tensors`` package (a test dependency) and transformers."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from transformers import AutoModelForCausalLM

    source, directory = Path(source), Path(directory)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    scheme = preset_name_to_scheme("W4A16" if symmetric else "W4A16_ASYM", targets=["Linear"])
    scheme.weights.group_size = group_size
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "quantization_scheme", None) is None:
                continue
            groups = module.weight.reshape(module.weight.shape[0], -1, group_size)
            scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), module.quantization_scheme.weights)
            module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
            module.weight_zero_point.data.copy_(zero_point.to(module.weight_zero_point.dtype))
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(directory))
    compressor.update_config(str(directory))
    for path in source.iterdir():
        if path.suffix != ".safetensors" and path.name != "config.json" and path.is_file():
            shutil.copy(path, directory / path.name)
    return directory
