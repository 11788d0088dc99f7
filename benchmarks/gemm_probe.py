"""How fast the model's linear layers run at throughput batch sizes: cuBLAS against a Triton GEMM.

First, one prefill step's projections back to back (``--step-tokens``), whole or cut into row chunks: do
cuBLAS's kernels for fewer rows (faster per FLOP in short bursts below) stay faster in a step's sustained run?
Then (``--layout-tokens``) each projection laid out another way: the weight stored transposed (``x @ W_t``
with ``W_t: [K, N]`` contiguous), or its output columns cut in halves (two products): does cuBLAS pick a
faster kernel for them? Then, per shape:

For each projection of a Llama-3-8B-shaped model (``[N, K]`` weights) and each token count ``M``, times
``x @ W.T`` in bf16 through ``torch.nn.functional.linear`` (cuBLAS, with torch's preferred BLAS library set to
``cublas`` and to ``cublaslt``) and through a Triton GEMM that loads its tiles with tensor descriptors (TMA),
over a sweep of tile shapes; checks each result against cuBLAS's and prints TFLOP/s per variant. Weights
rotate over four copies so the small ones are not served from L2. Writes ``gemm_probe.json`` under ``--out``.

    PYTHONPATH=. python benchmarks/gemm_probe.py --out /tmp/gemm
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from device_timing import device_time_us, write_results

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
CONFIGS = [  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages
    (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4), (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4), (64, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (64, 64, 128, 8, 4, 4),
]


@triton.jit
def _matmul_kernel(x_desc, w_desc, y_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
        a = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        b = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        acc = tl.dot(a, b.T, acc)
    y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(y_desc.dtype))


def triton_linear(x: torch.Tensor, w: torch.Tensor, config: tuple[int, ...]) -> torch.Tensor:
    """``x @ w.T`` for ``x: [M, K]``, ``w: [N, K]`` (both contiguous) with one tile configuration."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, gm, warps, stages = config
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
    y_desc = TensorDescriptor.from_tensor(y, [bm, bn])
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _matmul_kernel[grid](x_desc, w_desc, y_desc, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
                         NUM_STAGES=stages, num_warps=warps)
    return y


def step_gemms_ms(tokens: int, chunk: int | None, layers: int = 32) -> float:
    """Milliseconds of one prefill step's projections (qkv, o, gate_up, down for ``layers`` layers, cuBLAS)
    at ``tokens`` rows, run back to back as a step runs them (so the clocks settle as in the engine), each
    product whole or cut into ``chunk``-row pieces written into one output. Two layers' weights alternate."""
    shapes = [SHAPES[name] for name in ("qkv", "o", "gate_up", "down")]
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for n, k in shapes] for _ in range(2)]
    inputs = [torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]
    outputs = [torch.empty(tokens, n, device="cuda", dtype=torch.bfloat16) for n, _ in shapes]
    step = chunk or tokens

    def run(layer: int) -> None:
        for x, w, y in zip(inputs, weights[layer % 2], outputs, strict=True):
            for start in range(0, tokens, step):
                torch.mm(x[start : start + step], w.t(), out=y[start : start + step])

    return device_time_us(run, iters=layers, runs=3, warmup=4) * layers / 1e3


def layout_tflops(m: int, n: int, k: int) -> dict[str, float]:
    """TFLOP/s of ``[m, k] @ [n, k].T`` as ``F.linear`` (cuBLAS and cuBLASLt), with the weight stored
    transposed (``torch.mm(x, w_t)``) and as two products over halves of ``n``; two weight copies alternate."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(2)]
    wts = [w.t().contiguous() for w in ws]
    halves = [(w[: n // 2].contiguous(), w[n // 2 :].contiguous()) for w in ws]
    variants = {
        "linear": lambda i: torch.nn.functional.linear(x, ws[i % 2]),
        "transposed": lambda i: torch.mm(x, wts[i % 2]),
        "n_halves": lambda i: [torch.nn.functional.linear(x, h) for h in halves[i % 2]],
    }
    flop = 2 * m * n * k
    row = {name: round(flop / device_time_us(fn, iters=10, warmup=2) / 1e6, 1) for name, fn in variants.items()}
    torch.backends.cuda.preferred_blas_library("cublaslt")
    row["transposed_lt"] = round(flop / device_time_us(variants["transposed"], iters=10, warmup=2) / 1e6, 1)
    torch.backends.cuda.preferred_blas_library("cublas")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="256,1024,8192",
                        help="row counts of the per-shape sweep (cuBLAS, cuBLASLt, Triton tiles); empty: skip it")
    parser.add_argument("--step-tokens", default="8192,16384",
                        help="token counts of the whole-step run (see step_gemms_ms); empty: skip it")
    parser.add_argument("--layout-tokens", default="",
                        help="token counts of the layout comparison (see layout_tflops); empty: skip it")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for m in (int(t) for t in args.layout_tokens.split(",") if t):
        for name, (n, k) in SHAPES.items():
            if name != "lm_head":
                row = {"layout_M": m, "shape": name, **layout_tflops(m, n, k)}
                print(row, flush=True)
                results.append(row)
                torch.cuda.empty_cache()
    for m in (int(t) for t in args.step_tokens.split(",") if t):
        for chunk in (None, *(c for c in (8192, 4096, 2048, 1024) if c < m)):
            ms = step_gemms_ms(m, chunk)
            torch.cuda.empty_cache()
            row = {"step_tokens": m, "chunk": chunk, "ms": round(ms, 2),
                   "TFLOPs": round(32 * sum(2 * m * n * k for name, (n, k) in SHAPES.items() if name != "lm_head")
                                   / ms / 1e9, 1)}
            print(row, flush=True)
            results.append(row)
    for m in (int(t) for t in args.tokens.split(",") if t):
        for name, (n, k) in SHAPES.items():
            if name == "lm_head" and m > 256:
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(4)]
            flop = 2 * m * n * k
            row = {"M": m, "shape": name, "N": n, "K": k}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                row[lib] = round(flop / device_time_us(lambda i, x=x, ws=weights: torch.nn.functional.linear(
                    x, ws[i % len(ws)]), warmup=len(weights)) / 1e6, 1)
            torch.backends.cuda.preferred_blas_library("cublas")
            ref = torch.nn.functional.linear(x, weights[0]).float()
            best = (0.0, None)
            for config in CONFIGS:
                try:
                    err = (triton_linear(x, weights[0], config).float() - ref).abs().max().item()
                    if err > 0.05 * ref.abs().max().item():
                        row[f"bad_{config}"] = err
                        continue
                    tflops = flop / device_time_us(lambda i, c=config, x=x, ws=weights: triton_linear(
                        x, ws[i % len(ws)], c), warmup=len(weights)) / 1e6
                except Exception as exc:  # a tile shape the compiler refuses (shared memory): skip it
                    row[f"fail_{config}"] = type(exc).__name__
                    continue
                best = max(best, (round(tflops, 1), config), key=lambda b: b[0])
            row["triton_best"], row["triton_config"] = best
            print(row, flush=True)
            results.append(row)
            del x, weights
            torch.cuda.empty_cache()
    write_results(args.out, "gemm_probe.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
