"""How fast the ``cuda`` backend's mixture-of-experts layer runs, per tile configuration, on Qwen3-30B-A3B's layer
(128 experts, 8 per token, hidden 2048, 768 features per expert; bf16).

For each token count (decode batches and prefill chunks) and each tile configuration of the grouped GEMMs
(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages: the sort into expert blocks, both GEMMs, SiLU-and-mul and the sum) and,
up to ``--gemv-max-tokens`` tokens, of the few-token GEMVs (``GEMV_TILES``' fields), times ``fused_moe`` by CUDA
events after a warm-up, checks its output against the expert-by-expert reference (``moe_reference`` on the GPU
through cuBLAS), and prints microseconds, TFLOP/s of the routed work and the bandwidth of the expert weights it
must read (each routed expert once). Timed as decode steps run: ``--graph-calls`` calls over as many routings,
captured in one CUDA graph and replayed (no launch overhead; the experts mostly not in L2), per call. Beside it,
in the same run, the expert-by-expert reference on the GPU (a cuBLAS product per routed expert after a host
sync, as transformers' eager experts compute; eager). Writes ``moe_probe.json`` under ``--out``.

    PYTHONPATH=. python benchmarks/moe_probe.py --out /tmp/moe
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
from device_timing import device_time_us, write_results

from pagedllm.backends.cuda.backend import CudaBackend
from pagedllm.backends.moe import moe_reference, route_tokens
from pagedllm.backends.triton_gpu import fused_moe as kernels

EXPERTS, TOP_K, HIDDEN, INTER = 128, 8, 2048, 768
CONFIGS = [(64, 64, 32, 4, 3), (16, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3),
           (64, 64, 64, 4, 4), (128, 64, 64, 4, 3), (32, 128, 128, 4, 3)]
GEMV_CONFIGS = [(8, 512, 4, 2, 256, 1, 1), (8, 256, 2, 2, 256, 1, 1), (8, 256, 2, 2, 256, 4, 8),
                (8, 256, 2, 2, 256, 2, 4), (8, 256, 2, 4, 256, 4, 8), (8, 256, 2, 1, 256, 2, 8),
                (8, 256, 2, 2, 128, 2, 8), (8, 256, 2, 4, 128, 4, 4), (8, 256, 2, 2, 256, 2, 2),
                (16, 512, 4, 8, 256, 8, 8)]


def graph_time_us(call: Callable[[int], torch.Tensor], calls: int) -> float:
    """Device time per call of ``call(0) .. call(calls - 1)`` captured in one CUDA graph, replayed."""
    for i in range(calls):  # compile and warm up outside the capture
        call(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i)
    return device_time_us(lambda _: graph.replay(), iters=10, runs=3, warmup=2) / calls


def probe(tokens: int, w13: torch.Tensor, w2: torch.Tensor, backend: CudaBackend, gen: torch.Generator,
          gemv_max_tokens: int, calls: int) -> dict:
    """Every configuration of :data:`CONFIGS` (and of :data:`GEMV_CONFIGS` up to ``gemv_max_tokens`` tokens) and
    the reference at ``tokens`` tokens; prints and returns them."""
    xs = [torch.randn(tokens, HIDDEN, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(calls)]
    routes = [route_tokens(torch.randn(tokens, EXPERTS, generator=gen, device="cuda"), TOP_K, True)
              for _ in range(calls)]
    x, (weights, ids) = xs[0], routes[0]
    expected = moe_reference(x, w13, w2, weights, ids).float()
    routed = sum(int(torch.unique(i).numel()) for _, i in routes) / calls
    flops = 2 * tokens * TOP_K * 3 * HIDDEN * INTER
    weight_bytes = routed * 3 * HIDDEN * INTER * 2
    row: dict = {"tokens": tokens, "routed_experts": routed, "configs": []}
    cases: list[tuple[str, tuple[int, ...], Callable[..., torch.Tensor]]] = [
        ("gemm", tiles, partial(kernels.fused_moe, silu_and_mul=backend.silu_and_mul, tiles=tiles, gemv_max_tokens=0))
        for tiles in CONFIGS]
    if tokens <= gemv_max_tokens:
        cases += [("gemv", tiles, partial(kernels.fused_moe_gemv, tiles=tiles)) for tiles in GEMV_CONFIGS]
    for path, tiles, moe in cases:
        err = ((moe(x, w13, w2, weights, ids).float() - expected).norm() / expected.norm()).item()
        us = graph_time_us(lambda i, moe=moe: moe(xs[i], w13, w2, *routes[i]), calls)
        row["configs"].append({"path": path, "tiles": tiles, "us": us, "rel_err": err})
        print(f"T={tokens:6d} {path} tiles={tiles}: {us:9.1f} us  {flops / us / 1e6:7.1f} TFLOP/s  "
              f"{weight_bytes / us / 1e3:7.1f} GB/s of routed weights  rel err {err:.2e}", flush=True)
    row["reference_us"] = device_time_us(lambda _: moe_reference(x, w13, w2, weights, ids), iters=3, runs=3)
    print(f"T={tokens:6d} expert-by-expert reference (cuBLAS, host sync, eager): {row['reference_us']:9.1f} us",
          flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="1,2,4,8,16,64,256,1024,4096,16384")
    parser.add_argument("--gemv-max-tokens", type=int, default=16, help="time the GEMVs up to this many tokens")
    parser.add_argument("--graph-calls", type=int, default=4, help="calls (routings) per captured graph")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen, **dev) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen, **dev) / INTER**0.5
    print(f"{torch.cuda.get_device_name()}; Qwen3-30B-A3B layer: {EXPERTS} experts, top {TOP_K}, hidden {HIDDEN}, "
          f"inter {INTER}, bf16")
    backend = CudaBackend()
    results = [probe(int(t), w13, w2, backend, gen, args.gemv_max_tokens, args.graph_calls)
               for t in args.tokens.split(",")]
    write_results(args.out, "moe_probe.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
