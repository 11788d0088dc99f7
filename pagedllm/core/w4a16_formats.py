"""The 4-bit checkpoint formats pagedllm loads, converted to the ``"w4a16"`` layout of
``pagedllm.backends.w4a16_linear`` (``weight [out, in // 8]`` int32 packed along the input features, ``scales``
and ``zeros [out, groups]``, ``g_idx [in]`` or None). The per-tensor functions are called as each checkpoint tensor
is read (``pagedllm.core.w4a16_loading``), on the CPU; the whole-projection ones (``*_to_w4a16``) by tests and
tools.

- AWQ (AutoAWQ's ``GEMM`` version, ``quant_method: awq``): ``qweight [in, out // 8]`` and ``qzeros [in // g, out
  // 8]`` packed along the output features, eight to a word in the order 0, 2, 4, 6, 1, 3, 5, 7 (the value of
  feature ``8 c + j`` in nibble ``AWQ_NIBBLE[j]`` of word ``c``); ``scales [in // g, out]``;
  ``W = (q - z) * s``.
- GPTQ (AutoGPTQ / GPTQModel, ``quant_method: gptq``): ``qweight [in // 8, out]`` packed along the input
  features in order; ``qzeros [groups, out // 8]`` packed along the output features in order, holding the zero
  point minus one in the original format (``checkpoint_format: gptq``; ``gptq_v2`` stores it as it is);
  ``scales [groups, out]``; ``g_idx [in]`` (act-order checkpoints, ``desc_act: true``, number the groups out of
  order).
- compressed-tensors ``pack-quantized`` (llm-compressor's ``W4A16``, ``W4A16_ASYM``): ``weight_packed [out, in //
  8]`` packed along the input features in order, each value stored plus 8 (the signed -8..7 as 0..15);
  ``weight_scale [out, groups]``; with asymmetric weights ``weight_zero_point [ceil(out / 8), groups]`` packed
  along the output features the same way; ``weight_g_idx [in]`` with act-order.
"""

from __future__ import annotations

import torch

from pagedllm.backends.w4a16_linear import PACK, as_int32_words, pack_int4, unpack_int4

AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)
"""The nibble of an AWQ word holding each of its eight features (AutoAWQ packs features 0, 2, 4, 6, 1, 3, 5, 7
into nibbles 0..7)."""


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """``[rows, words]`` AWQ words -> ``[rows, words * 8]`` uint8 (0..15), features in order."""
    nibbles = unpack_int4(packed).reshape(packed.shape[0], packed.shape[1], PACK)
    return nibbles[:, :, list(AWQ_NIBBLE)].reshape(packed.shape[0], -1)


def awq_weight(qweight: torch.Tensor) -> torch.Tensor:
    """AWQ's ``qweight [in, out // 8]`` as the ``"w4a16"`` ``weight [out, in // 8]`` int32."""
    return pack_int4(unpack_awq(qweight).t())


def awq_zeros(qzeros: torch.Tensor) -> torch.Tensor:
    """AWQ's ``qzeros [groups, out // 8]`` as ``zeros [out, groups]`` uint8."""
    return unpack_awq(qzeros).t().contiguous()


def transposed_scales(scales: torch.Tensor) -> torch.Tensor:
    """AWQ's or GPTQ's ``scales [groups, out]`` as ``scales [out, groups]``."""
    return scales.t().contiguous()


def gptq_weight(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ's ``qweight [in // 8, out]`` (packed along the input features, in order) as ``weight [out, in //
    8]`` int32: the same words, transposed."""
    return qweight.t().contiguous()


GPTQ_V1_OFFSET = 0x11111111
"""What GPTQ's original format (``checkpoint_format: gptq``) subtracts from each packed word of zero points: one
from each of its eight, borrowing across them as GPTQModel writes and reads it."""


def gptq_zeros(qzeros: torch.Tensor, zero_offset: int) -> torch.Tensor:
    """GPTQ's ``qzeros [groups, out // 8]`` as ``zeros [out, groups]`` uint8. ``zero_offset`` 1: the ``gptq``
    format, whose words hold the zero points packed minus :data:`GPTQ_V1_OFFSET` (so a zero point of 0 borrows
    from the next one; adding the word back restores both, as GPTQModel reads them — AutoGPTQ 0.7.1 wrote such a
    zero point as the nibble 15 and no reading recovers it); 0: ``gptq_v2``, the zero points as they are."""
    if zero_offset:
        qzeros = as_int32_words((qzeros.to(torch.int64) + GPTQ_V1_OFFSET * zero_offset) & 0xFFFFFFFF)
    return unpack_int4(qzeros).t().contiguous()


def compressed_zeros(weight_zero_point: torch.Tensor, out: int | None = None) -> torch.Tensor:
    """compressed-tensors' ``weight_zero_point [ceil(out / 8), groups]`` (packed along the output features,
    each stored plus 8 like the values) as ``zeros [out, groups]`` uint8: the values' and the zero points'
    offsets cancel, so the nibbles are the zero points. ``out`` None: every row the words hold (``8 *
    ceil(out / 8)``; as the checkpoint streams past, the layer's own shape check then refuses a padded one)."""
    return unpack_int4(weight_zero_point.t().contiguous()).t()[:out].contiguous()


def symmetric_zeros(out: int, groups: int) -> torch.Tensor:
    """The zero points of compressed-tensors' symmetric weights (no zero-point tensor): ``[out, groups]`` of 8,
    the offset its packed values carry."""
    return torch.full((out, groups), 8, dtype=torch.uint8)


def awq_to_w4a16(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole AWQ projection as ``(weight, scales, zeros)`` in the ``"w4a16"`` layout."""
    return awq_weight(qweight), transposed_scales(scales), awq_zeros(qzeros)


def gptq_to_w4a16(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, group_size: int,
    zero_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A whole GPTQ projection as ``(weight, scales, zeros, g_idx)`` in the ``"w4a16"`` layout (``g_idx`` None
    when it numbers the features in order)."""
    return (gptq_weight(qweight), transposed_scales(scales), gptq_zeros(qzeros, zero_offset),
            act_order(g_idx, group_size))


def compressed_to_w4a16(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
    g_idx: torch.Tensor | None, group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A whole compressed-tensors ``pack-quantized`` projection as ``(weight, scales, zeros, g_idx)`` in the
    ``"w4a16"`` layout (``weight_zero_point`` None for symmetric weights)."""
    out, groups = weight_scale.shape
    zeros = symmetric_zeros(out, groups) if weight_zero_point is None else compressed_zeros(weight_zero_point, out)
    return weight_packed.contiguous(), weight_scale.contiguous(), zeros, act_order(g_idx, group_size)


def act_order(g_idx: torch.Tensor | None, group_size: int) -> torch.Tensor | None:
    """``g_idx [in]`` as int32, or None when it numbers the features in order (``k // group_size``)."""
    if g_idx is None:
        return None
    g_idx = g_idx.to(torch.int32)
    in_order = torch.arange(g_idx.numel(), dtype=torch.int32) // group_size
    return None if torch.equal(g_idx, in_order) else g_idx.contiguous()
