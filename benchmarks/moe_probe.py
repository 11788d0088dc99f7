"""How fast the ``cuda`` backend's mixture-of-experts layer runs, per tile configuration, on Qwen3-30B-A3B's layer
(128 experts, 8 per token, hidden 2048, 768 features per expert; bf16).

For each token count (decode batches and prefill chunks) and each tile configuration (BLOCK_M, BLOCK_N, BLOCK_K,
warps, stages), times ``fused_moe`` (the sort into expert blocks, both grouped GEMMs, SiLU-and-mul and the sum) by
CUDA events after a warm-up, checks its output against the expert-by-expert reference (``moe_reference`` on the
GPU through cuBLAS), and prints milliseconds, TFLOP/s of the routed work and the bandwidth of the expert weights
it must read (each routed expert once). Beside it, in the same run, the expert-by-expert reference on the GPU
(a cuBLAS product per routed expert after a host sync, as transformers' eager experts compute). Writes
``moe_probe.json`` under ``--out``.

    PYTHONPATH=. python benchmarks/moe_probe.py --out /tmp/moe
"""

from __future__ import annotations

import argparse

import torch
from device_timing import device_time_us, write_results

from pagedllm.backends.cuda import fused_moe as kernels
from pagedllm.backends.cuda.backend import CudaBackend
from pagedllm.backends.moe import moe_reference
from pagedllm.core.models.moe import route_tokens

EXPERTS, TOP_K, HIDDEN, INTER = 128, 8, 2048, 768
CONFIGS = [(64, 64, 32, 4, 3), (16, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3),
           (64, 64, 64, 4, 4), (128, 64, 64, 4, 3), (32, 128, 128, 4, 3)]


def probe(tokens: int, w13: torch.Tensor, w2: torch.Tensor, backend: CudaBackend, gen: torch.Generator) -> dict:
    """Every configuration of :data:`CONFIGS` and the reference at ``tokens`` tokens; prints and returns them."""
    x = torch.randn(tokens, HIDDEN, generator=gen, device="cuda", dtype=torch.bfloat16)
    weights, ids = route_tokens(torch.randn(tokens, EXPERTS, generator=gen, device="cuda"), TOP_K, True)
    expected = moe_reference(x, w13, w2, weights, ids).float()
    routed = int(torch.unique(ids).numel())
    flops = 2 * tokens * TOP_K * 3 * HIDDEN * INTER
    weight_bytes = routed * 3 * HIDDEN * INTER * 2
    row: dict = {"tokens": tokens, "routed_experts": routed, "configs": []}
    for tiles in CONFIGS:
        def step(_: int, tiles: tuple[int, ...] = tiles) -> torch.Tensor:
            return kernels.fused_moe(x, w13, w2, weights, ids, backend.silu_and_mul, tiles)

        err = ((step(0).float() - expected).norm() / expected.norm()).item()
        us = device_time_us(step, iters=10, runs=3, warmup=2)
        row["configs"].append({"tiles": tiles, "us": us, "rel_err": err})
        print(f"T={tokens:6d} tiles={tiles}: {us / 1e3:8.3f} ms  {flops / us / 1e6:7.1f} TFLOP/s  "
              f"{weight_bytes / us / 1e3:7.1f} GB/s of routed weights  rel err {err:.2e}", flush=True)
    row["reference_us"] = device_time_us(lambda _: moe_reference(x, w13, w2, weights, ids), iters=3, runs=3)
    print(f"T={tokens:6d} expert-by-expert reference (cuBLAS, host sync): {row['reference_us'] / 1e3:8.3f} ms",
          flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="1,16,64,256,1024,4096,16384")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen, **dev) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen, **dev) / INTER**0.5
    print(f"{torch.cuda.get_device_name()}; Qwen3-30B-A3B layer: {EXPERTS} experts, top {TOP_K}, hidden {HIDDEN}, "
          f"inter {INTER}, bf16")
    backend = CudaBackend()
    results = [probe(int(t), w13, w2, backend, gen) for t in args.tokens.split(",")]
    write_results(args.out, "moe_probe.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
