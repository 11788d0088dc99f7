"""Batch-1 linear layers of the Llama-3-8B shape, tp=1 and tp=2 slices: cuBLAS (``torch.nn.functional.linear``)
against the ``cuda`` backend's Triton GEMV (``backends/cuda/gemv.py``: its default tiles, and the best of a
sweep), each replayed from a CUDA graph of back-to-back calls on rotating weights (more bytes than L2 holds,
as in a decode step), reported as time per call and bytes read per second.

Decides whether a Triton GEMV for one-token steps is worth offering, and checks its tile rule: decode at
batch 1 reads every weight once, and the halved shapes of tp=2 (qkv 3072x4096, o 4096x2048) are where
cuBLAS was measured slow.

With ``--fp8``: the e4m3 weights of ``quantization="fp8"`` (the projections; the LM head stays bf16) through
``gemv_fp8`` with its default tiles and the best of a sweep, each checked against the float32 reference,
beside cuBLAS bf16 on the same shapes.

    python benchmarks/gemv_probe.py [--fp8] [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from pagedllm.backends.fp8_linear import quantize_rows, reference_linear_fp8
from pagedllm.backends.triton_gpu.gemv import gemv, gemv_config, gemv_fp8, gemv_fp8_config

SHAPES = {  # name: (N, K) of the weight [N, K]
    "qkv tp1": (6144, 4096), "o tp1": (4096, 4096), "gate_up tp1": (28672, 4096), "down tp1": (4096, 14336),
    "qkv tp2": (3072, 4096), "o tp2": (4096, 2048), "gate_up tp2": (14336, 4096), "down tp2": (4096, 7168),
    "lm_head tp1": (128256, 4096), "lm_head tp2": (64128, 4096),
}
CALLS = 32
ROTATE_BYTES = 400 * 2**20  # distinct weights per shape: well past the 50 MB L2


def graph_time_us(fn, weights: list[torch.Tensor]) -> float:
    """Microseconds per call of ``fn(w)``, from a graph of CALLS calls over ``weights`` in turn."""
    fn(weights[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(weights[i % len(weights)])
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (20 * CALLS)


FP8_CONFIGS = list(itertools.product([8, 16, 32], [256, 512, 1024], [4, 8]))  # (BLOCK_N, BLOCK_K, warps)


def probe_fp8() -> dict[str, object]:
    """Each projection's e4m3 weight at batch 1: cuBLAS bf16 on a bf16 weight, ``gemv_fp8``'s default tiles
    and the best of FP8_CONFIGS; results per shape, printed as they come."""
    dev = torch.device("cuda")
    report: dict[str, object] = {"device": torch.cuda.get_device_name(), "fp8": True, "shapes": {}}
    for name, (n, k) in SHAPES.items():
        if name.startswith("lm_head"):
            continue
        count = max(2, ROTATE_BYTES // (n * k))
        pairs = [quantize_rows(torch.randn(n, k, device=dev) * 0.02) for _ in range(count)]
        bf16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(max(2, count // 2))]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = reference_linear_fp8(x, *pairs[0]).float()
        tol = 1e-2 * ref.abs().max().item() + 1e-3
        row: dict[str, object] = {"bytes": n * k}
        row["cublas_bf16_us"] = graph_time_us(lambda w, x=x: torch.nn.functional.linear(x, w), bf16)
        del bf16
        row["default_config"] = gemv_fp8_config(n, k)
        row["default_us"] = graph_time_us(lambda p, x=x: gemv_fp8(x, *p), pairs)
        best: tuple[float, tuple[int, ...]] | None = None
        for config in FP8_CONFIGS:
            if k % config[1]:
                continue
            err = (gemv_fp8(x, *pairs[0], config=config).float() - ref).abs().max().item()
            if err > tol:
                row.setdefault("errors", []).append([*config, err])
                continue
            t = graph_time_us(lambda p, x=x, c=config: gemv_fp8(x, *p, config=c), pairs)
            row.setdefault("sweep", []).append([*config, round(t, 2)])
            if best is None or t < best[0]:
                best = (t, config)
        if best:
            row.update(best_us=best[0], best_config=best[1])
        report["shapes"][name] = row
        del pairs
        torch.cuda.empty_cache()
        tb = lambda us, size=n * k: size / us / 1e6  # noqa: E731 - TB/s of e4m3 weight
        line = f"{name:12} {n:>6}x{k:<6} cuBLAS bf16 {row['cublas_bf16_us']:6.1f} us"
        line += f" | default {row['default_us']:6.1f} us {tb(row['default_us']):4.2f} TB/s {row['default_config']}"
        if best:
            line += f" | best {best[0]:6.1f} us {tb(best[0]):4.2f} TB/s {best[1]}"
        print(line + (f" | {len(row['errors'])} configs wrong" if "errors" in row else ""), flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--fp8", action="store_true", help="the e4m3 GEMV of quantization='fp8'")
    args = parser.parse_args()
    if args.fp8:
        report = probe_fp8()
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
        return 0
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    report: dict[str, object] = {"device": torch.cuda.get_device_name(), "shapes": {}}
    configs = list(itertools.product([2, 4, 8, 16], [256, 512, 1024], [4, 8]))
    for name, (n, k) in SHAPES.items():
        count = max(2, ROTATE_BYTES // (n * k * 2))
        weights = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(count)]
        x = torch.randn(1, k, device=dev, dtype=dtype)
        ref = torch.nn.functional.linear(x.float(), weights[0].float())
        row: dict[str, object] = {"bytes": n * k * 2}
        row["cublas_us"] = graph_time_us(lambda w, x=x: torch.nn.functional.linear(x, w), weights)
        rule = gemv_config(n, k)
        row["default_config"] = rule
        row["default_us"] = graph_time_us(lambda w, x=x: gemv(x, w), weights)
        best = None
        for bn, bk, warps in configs if n * k * 2 < 2**28 else []:  # the LM head: its default tiles only
            if k % bk:
                continue
            got = gemv(x, weights[0], config=(bn, bk, warps))
            err = (got.float() - ref).abs().max().item()
            if err > 2e-2 * ref.abs().max().item() + 1e-3:
                row.setdefault("errors", []).append([bn, bk, warps, err])
                continue
            t = graph_time_us(lambda w, x=x, bn=bn, bk=bk, warps=warps: gemv(x, w, config=(bn, bk, warps)), weights)
            if best is None or t < best[0]:
                best = (t, bn, bk, warps)
        if best:
            row.update(triton_us=best[0], block_n=best[1], block_k=best[2], warps=best[3])
        report["shapes"][name] = row
        del weights
        torch.cuda.empty_cache()
        tb = lambda us, size=n * k * 2: size / us / 1e6  # noqa: E731 - TB/s
        line = f"{name:12} {n:>6}x{k:<6} cuBLAS {row['cublas_us']:6.1f} us {tb(row['cublas_us']):4.2f} TB/s"
        line += f" | default {row['default_us']:6.1f} us {tb(row['default_us']):4.2f} TB/s {rule}"
        if best:
            line += f" | best {best[0]:6.1f} us {tb(best[0]):4.2f} TB/s (BLOCK_N {best[1]}, BLOCK_K {best[2]}, "
            line += f"{best[3]} warps)"
        print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
