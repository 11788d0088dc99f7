"""4-bit weights with 16-bit activations (``"w4a16"``), the reference every backend's ``linear_w4a16`` is
checked against.

The scheme of AWQ, GPTQ and compressed-tensors' ``pack-quantized`` checkpoints (``pagedllm.core.w4a16_formats``
converts each to the layout below when it loads): each projection's weight ``[out, in]`` is stored as unsigned
4-bit integers ``q`` (0..15) in groups of ``group_size`` consecutive input features, each group of each output
row with its own scale ``s`` and zero point ``z`` (0..16), so ``W[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)]``
with ``g(k) = k // group_size`` — or, in act-order checkpoints (GPTQ's ``desc_act``), ``g(k) = g_idx[k]``. The
inputs stay in the model dtype; ``y = x @ W.T + bias`` is computed in float32 (:func:`reference_linear_w4a16`).

The layout a backend receives (out-major, like every other weight, so the parts of merged projections and
tensor-parallel shards are slices of rows):

- ``weight [out, in // 8]`` int32: feature ``k`` of row ``n`` in bits ``4 * (k % 8)`` to ``4 * (k % 8) + 3``
  of word ``[n, k // 8]`` (:func:`pack_int4`, :func:`unpack_int4`);
- ``scales [out, in // group_size]`` float32 (the checkpoints' float16 or bfloat16 scales, exactly);
- ``zeros [out, in // group_size]`` uint8;
- ``g_idx [in]`` int32 or None (None: ``k // group_size``).
"""

from __future__ import annotations

import torch

PACK = 8  # 4-bit values per int32 word
GROUP_SIZES = (32, 64, 128)
"""The group sizes every backend runs (each a multiple of 8 that divides the input features); a checkpoint
with ``group_size: -1`` (one group per row) is loaded with ``group_size = in_features``."""
_SHIFTS = torch.arange(PACK, dtype=torch.int32) * 4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack ``q: [rows, cols]`` (integers 0..15, any integer dtype; ``cols`` a multiple of 8) along its last
    dimension: element ``j`` of a run of eight goes to bits ``4 * j`` of the word. Returns ``[rows, cols // 8]``
    int32 (two's complement: a 15 in the top nibble makes the word negative). Called when weights are
    quantized (online, and by the test checkpoint writers)."""
    rows, cols = q.shape
    if cols % PACK:
        raise ValueError(f"4-bit packing needs a multiple of {PACK} values per row, got {cols}")
    nibbles = q.to(torch.int64).reshape(rows, cols // PACK, PACK) & 0xF
    return as_int32_words((nibbles << _SHIFTS.to(q.device, torch.int64)).sum(dim=-1))


def as_int32_words(words: torch.Tensor) -> torch.Tensor:
    """32-bit words held as integers ``0 <= w < 2^32`` (int64) as the int32 tensor of the same bits (two's
    complement). Called wherever packed words are computed in int64."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: ``packed: [rows, words]`` int32 -> ``[rows, words * 8]`` uint8 (0..15)."""
    rows, words = packed.shape
    nibbles = (packed.to(torch.int32)[:, :, None] >> _SHIFTS.to(packed.device)) & 0xF
    return nibbles.reshape(rows, words * PACK).to(torch.uint8)


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The group of each input feature, ``[in_features]`` int64: ``g_idx`` when given, else ``k // group_size``."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.int64)
    return torch.arange(in_features, device=device) // group_size


def dequantize_w4a16(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 weight ``[out, in]`` of a ``"w4a16"`` layer: ``(q - zeros[:, g]) * scales[:, g]`` with ``q``
    unpacked from ``weight [out, in // 8]`` and ``g`` the group of each input feature (:func:`group_index`);
    shapes as in the module docstring."""
    q = unpack_int4(weight).float()
    groups = group_index(q.shape[1], group_size, g_idx, q.device)
    return (q - zeros.float()[:, groups]) * scales.float()[:, groups]


def reference_linear_w4a16(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` in float32 with ``W`` the dequantized 4-bit weight (:func:`dequantize_w4a16`).

    ``x: [num_tokens, in]`` in the model dtype; ``weight [out, in // 8]`` int32, ``scales``/``zeros [out, in //
    group_size]``, ``g_idx [in]`` int32 or None as in the module docstring; ``bias: [out]`` or None. Returns
    ``[num_tokens, out]`` in ``x.dtype``. The default of ``Backend.linear_w4a16`` and the conformance kit's
    reference."""
    y = x.float() @ dequantize_w4a16(weight, scales, zeros, group_size, g_idx).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_w4a16_act_order(
    w: torch.Tensor, group_size: int, order: torch.Tensor, symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_w4a16` with groups in act-order, as GPTQ's ``desc_act`` makes them: feature ``order[j]``
    (``order`` a permutation of the ``in`` features) lies in group ``j // group_size``. Returns ``(weight [out, in
    // 8] int32, scales, zeros [out, in // group_size], g_idx [in] int32)``, the weight's features in their own
    order. Called by the test checkpoint writers and the kernels' tests."""
    packed, scales, zeros = quantize_w4a16(w[:, order], group_size, symmetric, scale_dtype)
    weight = pack_int4(unpack_int4(packed)[:, torch.argsort(order)])
    g_idx = torch.empty(w.shape[1], dtype=torch.int32, device=w.device)
    g_idx[order] = (torch.arange(w.shape[1], device=w.device) // group_size).to(torch.int32)
    return weight, scales, zeros, g_idx


def quantize_w4a16(
    w: torch.Tensor, group_size: int, symmetric: bool = False, scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round ``w: [out, in]`` to nearest in groups of ``group_size`` input features (``in`` a multiple of it):
    asymmetric, each group's range ``[min(0, min), max(0, max)]`` onto 0..15 with ``scale = range / 15`` and
    ``zero = round(-min / scale)``, as AWQ and GPTQ do; ``symmetric``, ``scale = amax / 7.5`` and zero 8 (the
    zero point GPTQ's ``sym: true`` stores). Scales are rounded to ``scale_dtype`` before the values are. Returns
    ``(weight [out, in // 8] int32, scales [out, in // group_size] scale_dtype, zeros [out, in // group_size]
    uint8)``. Called by ``quantization="w4a16"`` speed runs' dummy weights and by the test checkpoint writers."""
    out, inp = w.shape
    if inp % group_size or group_size % PACK:
        raise ValueError(f"group_size {group_size}: must be a multiple of {PACK} dividing in_features {inp}")
    groups = w.float().reshape(out, inp // group_size, group_size)
    if symmetric:
        scale = (groups.abs().amax(dim=-1) / 7.5).clamp(min=1e-8).to(scale_dtype).float()
        zero = torch.full_like(scale, 8.0)
    else:
        low = groups.amin(dim=-1).clamp(max=0.0)
        high = groups.amax(dim=-1).clamp(min=0.0)
        scale = ((high - low) / 15.0).clamp(min=1e-8).to(scale_dtype).float()
        zero = torch.round(-low / scale).clamp(0, 15)
    q = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, 15)
    return pack_int4(q.reshape(out, inp).to(torch.int32)), scale.to(scale_dtype), zero.to(torch.uint8)
