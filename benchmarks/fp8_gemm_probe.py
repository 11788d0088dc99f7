"""What fp8 linear layers (``quantization="fp8"``) give on this GPU against bf16, layer by layer and per step.

1. Checks: the Triton per-token quantizer against the PyTorch reference (bit for bit), and
   ``torch._scaled_mm`` with row-wise scales against the float32 reference product, for several token counts
   and output dtypes (an unsupported combination is recorded, not fatal).
2. A step's projections back to back (qkv, o, gate_up, down of a Llama-3-8B-shaped model, 32 layers, two
   layers' weights alternating) at ``--step-tokens`` rows: bf16 ``F.linear`` against fp8 (quantizer +
   ``_scaled_mm``) and against the fp8 products alone (inputs quantized beforehand), in ms and TFLOP/s.
3. One token (batch-1 decode): per projection and the LM head, our bf16 GEMV, cuBLAS bf16 and fp8.

With ``--block`` (``quantization="fp8_block"``: 128 x 128 weight tiles, inputs scaled per token and group of
128 features): 1. the block-scaled ``_scaled_mm`` against ``reference_linear_fp8_block`` for several token
counts and shapes; 2. the step's products in bf16, row-wise fp8 and block-wise fp8 (inputs quantized
beforehand). (RESULTS.md runs 73 and 76 ran it as ``fp8_block_probe.py``, trees ``7920b9a`` + the probe and
``210eb13``.) With ``--inputs``: the norm and the activation before a projection, alone, followed by the
quantizer (per token, per group) and fused with it.

Writes ``fp8_gemm_probe.json`` (``fp8_block_probe.json`` with ``--block``) under ``--out``. Example::

    PYTHONPATH=. python benchmarks/fp8_gemm_probe.py --out /tmp/fp8
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from device_timing import device_time_us, write_results
from gemm_probe import SHAPES as MODEL_SHAPES

from pagedllm.backends.fp8_linear import (
    quantize_blocks,
    quantize_groups,
    reference_linear_fp8,
    reference_linear_fp8_block,
)
from pagedllm.backends.fp8_linear import quantize_rows as reference_quantize_rows
from pagedllm.backends.triton_gpu.fp8_linear import linear_fp8, quantize_rows
from pagedllm.backends.triton_gpu.gemv import gemv

SHAPES = {name: shape for name, shape in MODEL_SHAPES.items() if name != "lm_head"}  # a step's projections


def checks() -> list[dict]:
    """Quantizer bit-exactness and product errors (relative to the reference's largest magnitude)."""
    rows = []
    for m, k in ((16384, 14336), (1000, 4096), (7, 4096)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x[0, 3] = 3e4
        x[-1] = 0
        q, s = quantize_rows(x)
        rq, rs = reference_quantize_rows(x)
        rows.append({"check": "quantize", "M": m, "K": k, "scale_equal": bool(torch.equal(s, rs)),
                     "q_bytes_differ": int((q.view(torch.uint8) != rq.view(torch.uint8)).sum())})
    n, k = SHAPES["qkv"]
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    wq, ws = reference_quantize_rows(w)
    for m in (1, 7, 16, 1000):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = reference_linear_fp8(x, wq, ws).float()
            row = {"check": "linear_fp8", "M": m, "dtype": str(dtype)}
            try:
                y = linear_fp8(x, wq, ws)
                row["max_rel_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
                row["out_dtype"] = str(y.dtype)
            except Exception as exc:  # recorded: which shapes/dtypes _scaled_mm refuses here
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            for fast in (False, True):
                xq, xs = quantize_rows(x.to(torch.bfloat16))
                try:
                    y = torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :],
                                         out_dtype=dtype if dtype != torch.float32 else torch.float32,
                                         use_fast_accum=fast)
                    row[f"direct_out_{dtype}_fast{fast}"] = "ok"
                except Exception as exc:
                    row[f"direct_out_{dtype}_fast{fast}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(row, flush=True)
            rows.append(row)
    return rows


def block_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``_scaled_mm`` with 1x128 input scales (made column-major) and 128x128 weight scales."""
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale.t().contiguous().t(), scale_b=w_scale.t(),
                            out_dtype=out_dtype)


def block_checks() -> list[dict]:
    """``--block``: relative errors (to the reference's largest magnitude) of ``_scaled_mm`` with 1 x 128
    input scales (column-major) and 128 x 128 weight scales (row-major, passed transposed) against
    ``reference_linear_fp8_block``; a combination it refuses is recorded, not fatal."""
    rows = []
    for n, k in ((6144, 4096), (4096, 14336), (256, 384), (64, 64), (200, 136)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        w_q, w_s = quantize_blocks(w)
        for m in (1, 3, 4, 16, 1000):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = reference_linear_fp8_block(x, w_q, w_s).float()
                row = {"check": "block_mm", "M": m, "N": n, "K": k, "dtype": str(dtype)}
                try:
                    y = block_mm(*quantize_groups(x), w_q, w_s, dtype).float()
                    row["max_rel_err"] = float((y - ref).abs().max() / ref.abs().max())
                except Exception as exc:  # recorded: which shapes _scaled_mm refuses
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(row, flush=True)
                rows.append(row)
    return rows


def step_ms(tokens: int, mode: str, fast_accum: bool = False, layers: int = 32) -> float:
    """Milliseconds of a step's 4 x ``layers`` projections at ``tokens`` rows: ``bf16`` (``F.linear``), ``fp8``
    (quantize the input, then ``_scaled_mm``), ``fp8_gemm`` (the products alone) or ``fp8_block_gemm`` (the
    products alone with 1 x 128 input and 128 x 128 weight scales, ``quantization="fp8_block"``)."""
    shapes = list(SHAPES.values())
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for n, k in shapes] for _ in range(2)]
    inputs = [torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]
    if mode == "bf16":
        def run(layer: int) -> None:
            for x, w in zip(inputs, weights[layer % 2], strict=True):
                torch.nn.functional.linear(x, w)
    elif mode == "fp8_block_gemm":
        tile_weights = [[quantize_blocks(w) for w in ws] for ws in weights]
        group_inputs = [(xq, xs.t().contiguous().t()) for xq, xs in (quantize_groups(x) for x in inputs)]

        def run(layer: int) -> None:
            for (xq, xs), (wq, ws) in zip(group_inputs, tile_weights[layer % 2], strict=True):
                torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)
    else:
        qweights = [[reference_quantize_rows(w) for w in ws] for ws in weights]
        qinputs = [quantize_rows(x) for x in inputs]

        def run(layer: int) -> None:
            for x, xqs, (wq, ws) in zip(inputs, qinputs, qweights[layer % 2], strict=True):
                xq, xs = quantize_rows(x) if mode == "fp8" else xqs
                torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=torch.bfloat16,
                                 use_fast_accum=fast_accum)
    return device_time_us(run, iters=layers, runs=3, warmup=4) * layers / 1e3


def step_rows(step_tokens: str, modes: Sequence[tuple[str, bool]]) -> list[dict]:
    """For each token count of ``step_tokens`` (comma-separated) and each ``(mode, fast_accum)`` of ``modes``,
    :func:`step_ms` as a printed row with its TFLOP/s (or the error, for a mode the GPU refuses)."""
    rows = []
    for m in (int(t) for t in step_tokens.split(",") if t):
        flop = 32 * sum(2 * m * n * k for n, k in SHAPES.values())
        for mode, fast in modes:
            row: dict[str, object] = {"step_tokens": m, "mode": mode, "fast_accum": fast}
            try:
                ms = step_ms(m, mode, fast)
                row.update(ms=round(ms, 2), TFLOPs=round(flop / ms / 1e9, 1))
            except Exception as exc:  # recorded, not fatal
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            torch.cuda.empty_cache()
            print(row, flush=True)
            rows.append(row)
    return rows


def one_token() -> list[dict]:
    """Per-call microseconds at one token: bf16 GEMV (ours), cuBLAS bf16, fp8 (quantizer + ``_scaled_mm``)."""
    rows = []
    for name, (n, k) in MODEL_SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(4)]
        qs = [reference_quantize_rows(w) for w in ws]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row = {"one_token": name, "N": n, "K": k,
               "gemv_bf16_us": device_time_us(lambda i, x=x, ws=ws: gemv(x, ws[i % 4], None), warmup=4),
               "cublas_bf16_us": device_time_us(lambda i, x=x, ws=ws: torch.nn.functional.linear(x, ws[i % 4]),
                                                warmup=4)}
        try:
            row["fp8_us"] = device_time_us(lambda i, x=x, qs=qs: linear_fp8(x, *qs[i % 4]), warmup=4)
        except Exception as exc:
            row["fp8_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        row = {key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}
        print(row, flush=True)
        rows.append(row)
    return rows


def input_op_calls(tokens: int) -> dict[str, tuple[Callable[[], object], Callable[[str], object]]]:
    """For ``tokens`` rows of a Llama-3-8B step: op name -> (the bf16 op, the op fused with a quantization
    ``"rows"`` or ``"groups"``)."""
    from pagedllm.backends.triton_gpu import fused_kernels

    k, d = SHAPES["qkv"][1], SHAPES["down"][1]
    x, residual = (torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(tokens, 2 * d, device="cuda", dtype=torch.bfloat16)
    return {"add_rms_norm": (lambda: fused_kernels.add_rms_norm(x, residual, weight, 1e-5)[0],
                             lambda q: fused_kernels.add_rms_norm_fp8(x, residual, weight, 1e-5, quantize=q)),
            "silu_and_mul": (lambda: fused_kernels.silu_and_mul(gate_up),
                             lambda q: fused_kernels.silu_and_mul_fp8(gate_up, quantize=q))}


def input_op_row(plain: Callable[[], object], fused: Callable[[str], object]) -> dict[str, float]:
    """Microseconds of ``plain``, of ``plain`` then each Triton quantizer, and of ``fused`` for each scheme."""
    from pagedllm.backends.triton_gpu.fp8_linear import padded_rows
    from pagedllm.backends.triton_gpu.fp8_linear import quantize_groups as triton_quantize_groups

    def groups(x: torch.Tensor) -> object:
        return triton_quantize_groups(x, padded_rows(x.shape[0]))

    row = {"bf16_us": device_time_us(lambda i: plain())}
    for scheme, quantize in (("rows", quantize_rows), ("groups", groups)):
        row[f"then_{scheme}_us"] = device_time_us(lambda i, quantize=quantize: quantize(plain()))
        row[f"fused_{scheme}_us"] = device_time_us(lambda i, scheme=scheme: fused(scheme))
    return {key: round(v, 1) for key, v in row.items()}


def input_ops(step_tokens: str) -> list[dict]:
    """Per-call microseconds of the ops before a projection at each token count of ``step_tokens``: the
    residual add + RMSNorm (hidden 4096) and SiLU-and-mul (14336 out) in bf16; each followed by the Triton
    quantizer (per token, per token and group of 128); and each fused with that quantization (``--inputs``)."""
    rows = []
    for m in (int(t) for t in step_tokens.split(",") if t):
        for name, (plain, fused) in input_op_calls(m).items():
            row = {"input_op": name, "tokens": m, **input_op_row(plain, fused)}
            print(row, flush=True)
            rows.append(row)
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--step-tokens", default="16384,8192,1000,256")
    parser.add_argument("--block", action="store_true", help="the block-scaled product of fp8_block")
    parser.add_argument("--inputs", action="store_true", help="the ops that quantize a projection's input, alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.inputs:
        write_results(args.out, "fp8_input_ops.json", input_ops(args.step_tokens))
        return 0
    if args.block:
        results = block_checks()
        results += step_rows(args.step_tokens, (("bf16", False), ("fp8_gemm", False), ("fp8_block_gemm", False)))
        write_results(args.out, "fp8_block_probe.json", results)
        return 0
    results = checks()
    modes = (("bf16", False), ("fp8", False), ("fp8_gemm", False), ("fp8", True), ("fp8_gemm", True))
    results += step_rows(args.step_tokens, modes)
    results += one_token()
    write_results(args.out, "fp8_gemm_probe.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
