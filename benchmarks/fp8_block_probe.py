"""What ``torch._scaled_mm`` offers this GPU for ``"fp8_block"`` linear layers (128 x 128 weight tiles, inputs
scaled per token and group of 128 features), against the float32 reference and against row-wise fp8 and bf16.

1. Checks: for several token counts and projection shapes, the block-scaled product (scales of the input
   ``[M, K/128]`` column-major, of the weight ``[N/128, K/128]`` row-major, passed transposed) against
   ``reference_linear_fp8_block``; a combination ``_scaled_mm`` refuses is recorded, not fatal.
2. A step's projections back to back (Llama-3-8B shapes, 32 layers, two layers' weights alternating) at
   ``--step-tokens`` rows: bf16 ``F.linear``, row-wise fp8 products and block-wise fp8 products (inputs
   quantized beforehand), in ms and TFLOP/s (``fp8_gemm_probe.step_rows``; RESULTS.md run 73 named the modes
   ``bf16``, ``fp8_row``, ``fp8_block``).

Writes ``fp8_block_probe.json`` under ``--out``. Example::

    PYTHONPATH=. python benchmarks/fp8_block_probe.py --out /tmp/fp8b
"""

from __future__ import annotations

import argparse

import torch
from device_timing import write_results
from fp8_gemm_probe import step_rows

from pagedllm.backends.fp8_linear import quantize_blocks, quantize_groups, reference_linear_fp8_block


def block_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``_scaled_mm`` with 1x128 input scales (made column-major) and 128x128 weight scales."""
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale.t().contiguous().t(), scale_b=w_scale.t(),
                            out_dtype=out_dtype)


def checks() -> list[dict]:
    """Relative errors (to the reference's largest magnitude) of the block-scaled product."""
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--step-tokens", default="16384,1000,64")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}", flush=True)
    results = checks()
    results += step_rows(args.step_tokens, (("bf16", False), ("fp8_gemm", False), ("fp8_block_gemm", False)))
    write_results(args.out, "fp8_block_probe.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
