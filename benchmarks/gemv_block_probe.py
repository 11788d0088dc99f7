"""The fp8 GEMV with 128 x 128 tile scales (``gemv_fp8_block``) and two restructurings of its kernel, compiled
for every input dtype and a sweep of tiles: which configurations Triton compiles (one, float32 input at
``BLOCK_K=512``, failed once in Triton 3.6's TritonGPUOptimizeDotOperands pass, RESULTS.md run 123), each
checked against the float32 reference, and each variant's time per call on the Llama-3-8B projections (bf16
input, CUDA graphs of back-to-back calls over rotating weights, as ``gemv_probe.py`` times them).

Variants: ``current`` (the input loaded as ``[BLOCK_K]``, reshaped to ``[GROUPS, 128]`` for its group scales
and back), ``grouped_x`` (the input loaded and kept as ``[GROUPS, 128]``; the weight tile reshaped to
``[BLOCK_N, GROUPS, 128]``), ``grouped_w`` (both loaded three-dimensional).

    python benchmarks/gemv_block_probe.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_probe import graph_time_us

from pagedllm.backends.fp8_linear import (
    FP8_BLOCK,
    quantize_blocks,
    reference_linear_fp8_block,
)
from pagedllm.backends.triton_gpu import gemv
from pagedllm.backends.triton_gpu.fp8_linear import e4m3_scale, e4m3_scaled


@triton.jit
def _variant_kernel(y_ptr, x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, N, K, stride_w, stride_s, stride_xs,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                    TILE: tl.constexpr, X_QUANTIZED: tl.constexpr, W_3D: tl.constexpr):
    pid = tl.program_id(0)
    GROUPS: tl.constexpr = BLOCK_K // TILE
    groups = tl.arange(0, GROUPS)
    in_tile = tl.arange(0, TILE)
    x_offsets = groups[:, None] * TILE + in_tile[None, :]  # [GROUPS, TILE]
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    scale_row = w_scale_ptr + ((pid * BLOCK_N) // TILE) * stride_s
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if W_3D:
            w = tl.load(w_rows[:, :, None] + k + x_offsets[None, :, :], mask=row_mask[:, None, None], other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
        else:
            w = tl.load(w_rows + k + tl.arange(0, BLOCK_K)[None, :], mask=row_mask[:, None], other=0.0,
                        eviction_policy="evict_first")
            w = tl.reshape(w.to(tl.float32), [BLOCK_N, GROUPS, TILE])
        if X_QUANTIZED:
            x_scale = tl.load(x_scale_ptr + (k // TILE + groups) * stride_xs)
            x = tl.load(x_ptr + k + x_offsets).to(tl.float32)
        else:
            x = tl.load(x_ptr + k + x_offsets).to(tl.float32)
            x_scale, x_inverse = e4m3_scale(tl.max(tl.abs(x), axis=1))
            x = e4m3_scaled(x, x_inverse[:, None]).to(w_ptr.dtype.element_ty).to(tl.float32)
        runs = tl.sum(tl.reshape(w * x[None, :, :], [BLOCK_N, GROUPS, TILE // GROUP, GROUP]), 3)
        acc += tl.sum(runs, 2) * (x_scale * tl.load(scale_row + k // TILE + groups))[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def variant(w_3d: bool):
    def run(x, weight, weight_scale, bias, config):
        n, k = weight.shape
        block_n, block_k, warps = config
        y = torch.empty(1, n, dtype=x.dtype, device=x.device)
        _variant_kernel[(triton.cdiv(n, block_n),)](
            y, x, weight_scale, weight, weight_scale, bias if bias is not None else weight_scale, n, k,
            weight.stride(0), weight_scale.stride(0), 1, HAS_BIAS=bias is not None, BLOCK_N=block_n,
            BLOCK_K=block_k, GROUP=gemv.FP8_GROUP, TILE=FP8_BLOCK, X_QUANTIZED=False, W_3D=w_3d, num_warps=warps)
        return y
    return run


VARIANTS = {"current": lambda x, w, s, b, c: gemv.gemv_fp8_block(x, w, s, b, c),
            "grouped_x": variant(False), "grouped_w": variant(True)}
CONFIGS = [(8, 128, 4), (8, 256, 4), (8, 512, 4), (8, 1024, 4), (16, 512, 4), (16, 1024, 4), (16, 512, 8)]
CHECK_SHAPES = [(256, 512), (256, 1024), (384, 2048)]
TIME_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "triton": triton.__version__,
                                  "checks": [], "times_us": {}}
    for name, fn in VARIANTS.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for n, k in CHECK_SHAPES:
                w = torch.randn(n, k, generator=gen) * k**-0.5
                q, s = quantize_blocks(w)
                x = torch.randn(1, k, generator=gen).to(dtype)
                bias = torch.randn(n, generator=gen).to(dtype)
                want = reference_linear_fp8_block(x.float(), q, s, bias.float())
                for config in CONFIGS:
                    if k % config[1]:
                        continue
                    row = {"variant": name, "dtype": str(dtype), "n": n, "k": k, "config": config}
                    try:
                        got = fn(x.cuda(), q.cuda(), s.cuda(), bias.cuda(), config)
                        torch.cuda.synchronize()
                        row["rel_err"] = float((got.float().cpu() - want).norm() / want.norm())
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        traceback.print_exc(limit=1)
                    results["checks"].append(row)
                    print(json.dumps(row), flush=True)
    for shape, (n, k) in TIME_SHAPES.items():
        config = gemv.gemv_fp8_config(n, k)
        rotate = max(2, (400 << 20) // (n * k))
        weights = [quantize_blocks(torch.randn(n, k, generator=gen) * k**-0.5) for _ in range(min(rotate, 4))]
        weights = [(q.cuda(), s.cuda()) for q, s in weights] * (rotate // min(rotate, 4) + 1)
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16).cuda()
        for name, fn in VARIANTS.items():
            try:
                def call(ws: tuple, fn=fn, x=x, config=config) -> torch.Tensor:
                    return fn(x, ws[0], ws[1], None, config)

                us = graph_time_us(call, weights[:rotate])
            except Exception as exc:
                us = f"{type(exc).__name__}"
            results["times_us"][f"{shape} {name}"] = us
            print(f"{shape} ({n}x{k}, tiles {config}) {name}: {us if isinstance(us, str) else f'{us:.1f} us'}"
                  + ("" if isinstance(us, str) else f", {n * k / us / 1e3:.0f} GB/s"), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
