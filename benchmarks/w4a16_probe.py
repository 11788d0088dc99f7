"""Time the 4-bit (``"w4a16"``) kernels on Llama-3-8B's projections against bf16 cuBLAS on the same GPU.

For each projection (q|k|v, o, gate|up, down; groups of 128) and token count: the GEMV at its default and other
tiles (few tokens) and the dequantizing GEMM, each checked against the float32 reference first, then timed in
CUDA graphs over enough copies of the weights that they stream from memory (not L2). Prints one line per case:
microseconds, the 4-bit weight's bandwidth, and bf16 cuBLAS's time on the dense weight.

    PYTHONPATH=. python benchmarks/w4a16_probe.py [--rows 1,2,4,8,16,64,256,1024] [--sweep]
"""

from __future__ import annotations

import argparse
import math

import torch

from pagedllm.backends.triton_gpu import w4a16_linear as kernels
from pagedllm.backends.w4a16_linear import quantize_w4a16, reference_linear_w4a16

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GROUP = 128
GEMV_SWEEP = ((16, 16, 2), (32, 16, 4), (64, 16, 4), (32, 8, 2), (64, 8, 4), (128, 16, 8), (64, 16, 8))
STREAMED_BYTES = 300e6  # more than the H200's 50 MB L2 many times over


def graph_us(calls: list) -> float:
    """Median microseconds per call of ``calls`` replayed in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] * 1e3 / len(calls)


def random_layers(n: int, k: int, copies: int) -> list[tuple[torch.Tensor, ...]]:
    """``copies`` random 4-bit layers ``(weight, scales, zeros)`` of ``[n, k]`` on the GPU."""
    return [(torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda"),
             torch.rand(n, k // GROUP, device="cuda") * 0.01,
             torch.randint(0, 16, (n, k // GROUP), dtype=torch.uint8, device="cuda")) for _ in range(copies)]


def check(path: str, n: int, k: int, rows: int, run) -> None:
    """Raise AssertionError unless ``run(x, weight, scales, zeros)`` matches the reference on one real layer."""
    weight, scales, zeros = quantize_w4a16(torch.randn(n, k, device="cuda") * k**-0.5, GROUP,
                                           scale_dtype=torch.float32)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    got = run(x, weight, scales, zeros).float()
    want = reference_linear_w4a16(x.float(), weight, scales, zeros, GROUP)
    error = ((got - want).norm() / want.norm()).item()
    assert error < 1e-2, f"{path} {n}x{k} rows {rows}: relative error {error:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,64,256,1024")
    parser.add_argument("--sweep", action="store_true", help="also time the GEMV at the tiles of GEMV_SWEEP")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; GEMV_ROWS {kernels.GEMV_ROWS}, GEMV_TILES {kernels.GEMV_TILES}, "
          f"groups of {GROUP}, bf16 inputs")
    for name, (n, k) in SHAPES.items():
        int4_bytes = n * k // 2 + n * (k // GROUP) * 5
        layers = random_layers(n, k, max(2, math.ceil(STREAMED_BYTES / int4_bytes)))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                 for _ in range(max(2, math.ceil(STREAMED_BYTES / (2 * n * k))))]
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            paths = {"default": lambda x, w, s, z: kernels.linear_w4a16(x, w, s, z, GROUP),
                     "gemm": lambda x, w, s, z: kernels.linear_w4a16(x, w, s, z, GROUP,
                                                                     tiles=kernels.w4a16_tiles(x.shape[0]))}
            if rows <= 16:
                paths["gemv"] = lambda x, w, s, z: kernels.gemv_w4a16(x, w, s, z, GROUP)
                if args.sweep and rows <= 4:
                    for tiles in GEMV_SWEEP:
                        paths[f"gemv{tiles}"] = lambda x, w, s, z, t=tiles: kernels.gemv_w4a16(x, w, s, z, GROUP,
                                                                                               tiles=t)
            dense_us = graph_us([lambda w=w, x=x: x @ w.t() for w in dense])
            for path, run in paths.items():
                check(path, n, k, rows, run)
                us = graph_us([lambda layer=layer, run=run, x=x: run(x, *layer) for layer in layers])
                print(f"{name:8s} rows {rows:5d} {path:22s} {us:8.1f} us  {int4_bytes / us / 1e3:6.0f} GB/s of 4-bit "
                      f"weight | bf16 cuBLAS {dense_us:8.1f} us ({dense_us / us:4.2f}x)", flush=True)


if __name__ == "__main__":
    main()
