"""fp8 (e4m3) linear layers, the reference every backend's ``linear_fp8`` is checked against.

``EngineConfig.quantization="fp8"`` (vLLM's online "fp8"): after loading, each projection's weight
``[out, in]`` is stored as e4m3 with one float32 scale per output row (:func:`quantize_rows`), and at every
call the input ``[num_tokens, in]`` is quantized the same way per token, so ``y = (x_q @ w_q.T) * x_scale *
w_scale`` (:func:`reference_linear_fp8`). A scale maps a row's largest magnitude to e4m3's largest finite
value (448); values are rounded to nearest, ties to even. Embeddings, norms and the LM head stay in the
model dtype. A checkpoint stored in fp8 (``pagedllm.core.checkpoint_quantization``) brings its own e4m3
weights and scales (:func:`per_row_scale`); the inputs are quantized as above.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1e-12  # the smallest scale: an all-zero row quantizes to zeros, never 0 / 0


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
