"""fp8 (e4m3) linear layers, the reference every backend's ``linear_fp8`` is checked against.

``EngineConfig.quantization="fp8"`` (vLLM's online "fp8"): after loading, each projection's weight
``[out, in]`` is stored as e4m3 with one float32 scale per output row (:func:`quantize_rows`), and at every
call the input ``[num_tokens, in]`` is quantized the same way per token, so ``y = (x_q @ w_q.T) * x_scale *
w_scale`` (:func:`reference_linear_fp8`). A scale maps a row's largest magnitude to e4m3's largest finite
value (448); values are rounded to nearest, ties to even. Embeddings, norms and the LM head stay in the
model dtype. A checkpoint stored in fp8 (``pagedllm.core.checkpoint_quantization``) brings its own e4m3
weights and scales (:func:`per_row_scale`); the inputs are quantized as above.

``"fp8_block"`` (DeepSeek-V3's and Qwen3-FP8's scheme, vLLM's ``fp8`` with ``weight_block_size: [128, 128]``):
one float32 scale per 128 x 128 tile of the weight (:func:`quantize_blocks`) and per group of 128 consecutive
input features of each token (:func:`quantize_groups`), so ``y[m, n] = sum_g (x_q[m, g] . w_q[n, g]) *
x_scale[m, g] * w_scale[n // 128, g]`` over the groups ``g`` of 128 features
(:func:`reference_linear_fp8_block`). Every scale is :func:`quantize_rows`'s, over the group or the tile.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1e-12  # the smallest scale: an all-zero row quantizes to zeros, never 0 / 0
FP8_BLOCK = 128  # "fp8_block": the side of a weight tile and the length of an input group


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x: [rows, cols]`` (any float dtype) to e4m3 with its own scale.

    Returns ``(q [rows, cols] float8_e4m3fn, scale [rows] float32)`` with ``x ~= q * scale[:, None]``:
    ``scale = max(amax(|row|) / 448, MIN_SCALE)``, ``q = round(clamp(row * (1 / scale), -448, 448))``, every
    step in float32 and correctly rounded (the same bits on any device): two divisions per row, one multiply
    per element (what a kernel can afford; a division per element costs a GPU kernel far more). Called once
    per weight at load, and per call on the input by the reference linear.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # tensor operands, not Python numbers: CUDA builds of torch multiply by the reciprocal of a scalar
    # divisor (not correctly rounded), which would give other scales on a GPU than on the CPU
    scale = (amax / torch.full_like(amax, FP8_MAX)).clamp(min=MIN_SCALE)
    inverse = torch.ones_like(scale) / scale
    q = (xf * inverse[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x: [rows, cols]`` to e4m3 with a given ``scale: [1]`` float32 (a checkpoint's static
    ``input_scale``), as :func:`quantize_rows` quantizes a row once its scale is known: ``q = round(clamp(x *
    (1 / scale), -448, 448))``. Returns ``(q [rows, cols] float8_e4m3fn, scale [rows] float32)`` (the scale per
    token, as ``Backend.linear_fp8_quantized`` takes it). Called per call on the inputs of layers with static
    input scales; PyTorch ops, so on any device."""
    scale = scale.float().reshape(1)
    inverse = torch.ones_like(scale) / scale
    q = (x.float() * inverse).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.expand(x.shape[0]).contiguous()


def per_row_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint's weight scale as one float32 scale per output row: ``scale`` of one element (per tensor:
    every row takes it) or of ``rows`` elements (``[rows]`` or ``[rows, 1]``, per channel); any float dtype.
    Called when an fp8 checkpoint is loaded. Raises ValueError naming the shape otherwise."""
    if scale.numel() == 1:
        return scale.float().reshape(1).expand(rows).contiguous()
    if tuple(scale.shape) not in ((rows,), (rows, 1)):
        raise ValueError(f"weight scale of shape {tuple(scale.shape)}: expected one per tensor or one per each of "
                         f"the {rows} output rows")
    return scale.float().reshape(rows)


def reference_linear_fp8(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` with ``x`` quantized per token first, in float32.

    ``x: [num_tokens, in]`` in the model dtype; ``weight: [out, in]`` float8_e4m3fn and ``weight_scale:
    [out]`` float32 from :func:`quantize_rows`; ``bias: [out]`` or None. Returns ``[num_tokens, out]`` in
    ``x.dtype``. The default of ``Backend.linear_fp8`` and the conformance kit's reference.
    """
    return reference_linear_fp8_quantized(*quantize_rows(x), weight, weight_scale, bias, x.dtype)


def reference_linear_fp8_quantized(
    x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The fp8 linear layer of an input already quantized per token (``x_q: [num_tokens, in]`` e4m3,
    ``x_scale: [num_tokens]`` float32, as :func:`quantize_rows` gives them), in float32; ``weight``,
    ``weight_scale``, ``bias`` as in :func:`reference_linear_fp8`. Returns ``[num_tokens, out]`` in
    ``out_dtype``. The default of ``Backend.linear_fp8_quantized``."""
    y = (x_q.float() @ weight.float().t()) * x_scale.float()[:, None] * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _padded(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``x`` padded with zeros to ``[rows, cols]`` (itself when it has that shape)."""
    if tuple(x.shape) == (rows, cols):
        return x
    return torch.nn.functional.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def _blocks(size: int) -> int:
    return -(-size // FP8_BLOCK)


def quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x: [rows, cols]`` per group of ``FP8_BLOCK`` consecutive elements of a row (the last group
    of a row may be shorter), each as :func:`quantize_rows` quantizes a row. Returns ``(q [rows, cols]
    float8_e4m3fn, scale [rows, ceil(cols / 128)] float32)``. The inputs of ``"fp8_block"`` linear layers,
    per call, in the reference."""
    rows, cols = x.shape
    groups = _blocks(cols)
    q, scale = quantize_rows(_padded(x, rows, groups * FP8_BLOCK).reshape(rows * groups, FP8_BLOCK))
    return q.reshape(rows, groups * FP8_BLOCK)[:, :cols], scale.reshape(rows, groups)


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w: [out, in]`` per ``FP8_BLOCK x FP8_BLOCK`` tile (edge tiles may be smaller), each tile as
    :func:`quantize_rows` quantizes a row. Returns ``(q [out, in] float8_e4m3fn, scale [ceil(out / 128),
    ceil(in / 128)] float32)``. Called once per weight at load for ``quantization="fp8_block"``."""
    out, inp = w.shape
    bo, bi = _blocks(out), _blocks(inp)
    tiles = _padded(w, bo * FP8_BLOCK, bi * FP8_BLOCK).reshape(bo, FP8_BLOCK, bi, FP8_BLOCK).transpose(1, 2)
    q, scale = quantize_rows(tiles.reshape(bo * bi, FP8_BLOCK * FP8_BLOCK))
    q = q.reshape(bo, bi, FP8_BLOCK, FP8_BLOCK).transpose(1, 2).reshape(bo * FP8_BLOCK, bi * FP8_BLOCK)
    return q[:out, :inp].contiguous(), scale.reshape(bo, bi)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q: [rows, cols]`` e4m3 times its group scales ``scale: [rows, ceil(cols / 128)]`` (as
    :func:`quantize_groups` gives them), in float32."""
    return q.float() * scale.float().repeat_interleave(FP8_BLOCK, 1)[:, : q.shape[1]]


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q: [out, in]`` e4m3 times its tile scales ``scale: [ceil(out / 128), ceil(in / 128)]``, in float32."""
    out, inp = q.shape
    expanded = scale.float().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return q.float() * expanded[:out, :inp]


def block_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """The shape of an ``"fp8_block"`` weight's scales: one per 128 x 128 tile."""
    return _blocks(out_features), _blocks(in_features)


def scale_block_range(start: int, size: int, total: int) -> tuple[int, int]:
    """The tiles of an ``"fp8_block"`` scale, along one dimension, that cover elements ``[start, start + size)``
    of a dimension of ``total`` elements: ``(first tile, number of tiles)``. Called when a checkpoint's tile
    scales are cut for one part of a merged projection or one tensor-parallel shard. Raises ValueError unless
    the range starts on a tile boundary and ends on one or at ``total`` (a tile split between two parts or
    ranks has no scale of its own)."""
    if start % FP8_BLOCK or (size % FP8_BLOCK and start + size != total):
        raise ValueError(f"fp8_block: rows or columns [{start}, {start + size}) of {total} do not fall on the "
                         f"{FP8_BLOCK} x {FP8_BLOCK} tiles of the weight scales (parts of merged projections and "
                         f"tensor-parallel shards must be multiples of {FP8_BLOCK})")
    return start // FP8_BLOCK, _blocks(size)


def reference_linear_fp8_block(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``"fp8_block"`` linear layer in float32: ``x: [num_tokens, in]`` (model dtype) quantized per group
    of 128 features (:func:`quantize_groups`), ``weight: [out, in]`` float8_e4m3fn with ``weight_scale:
    [ceil(out / 128), ceil(in / 128)]`` float32 (:func:`quantize_blocks`), ``bias: [out]`` or None. Returns
    ``[num_tokens, out]`` in ``x.dtype``. The default of ``Backend.linear_fp8_block`` and the conformance kit's
    reference."""
    return reference_linear_fp8_block_quantized(*quantize_groups(x), weight, weight_scale, bias, x.dtype)


def reference_linear_fp8_block_quantized(
    x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The ``"fp8_block"`` linear layer of an input already quantized per token and group of 128 features
    (``x_q: [num_tokens, in]`` e4m3, ``x_scale: [num_tokens, ceil(in / 128)]`` float32, as
    :func:`quantize_groups` gives them), in float32; ``weight``, ``weight_scale``, ``bias`` as in
    :func:`reference_linear_fp8_block`. Returns ``[num_tokens, out]`` in ``out_dtype``. The default of
    ``Backend.linear_fp8_block_quantized``."""
    y = dequantize_groups(x_q, x_scale) @ dequantize_blocks(weight, weight_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
