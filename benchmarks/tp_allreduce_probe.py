"""All-reduce on two GPUs for tensor-parallel decode: correctness and latency of NCCL (``torch.distributed``)
against the ``cuda`` backend's symmetric-memory communicator, eagerly and replayed from CUDA graphs.

Decode all-reduces are small (batch x hidden x 2 bytes: 8 KB at batch 1 for a 4096-wide model, 2 MB at
256) and there are two per layer, so their latency, and whether they can live inside a captured graph,
decide tensor-parallel decode speed. For each size this prints the time per all-reduce: NCCL eager,
symmetric memory eager, and symmetric memory replayed from a graph of 64 back-to-back all-reduces (what a
32-layer decode step holds); then the same for the all-reduce fused with the residual add and RMSNorm that
follow it in a decoder (one kernel) against the two kernels it replaces, with its results checked against
theirs and between the ranks (they must be bit-identical). Last, NCCL all-reduces captured in a graph are
replayed with host syncs and eager NCCL calls between replays, under a time limit, to see whether that
combination runs or hangs here.

Usage (a machine with >= 2 GPUs): ``python benchmarks/tp_allreduce_probe.py [--out results.json]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
from device_timing import device_time_us

HIDDEN = 4096
BATCHES = [1, 8, 64, 256]
PER_GRAPH = 64  # all-reduces recorded per graph: two per layer of a 32-layer model
TIME_LIMIT_S = 60.0


def _time_ms(fn, iters: int) -> float:
    """Mean milliseconds of ``fn()`` over ``iters`` runs, by CUDA events, after 5 warm-up runs."""
    return device_time_us(lambda _: fn(), iters, runs=1, warmup=5) / 1e3


def _rank_main(rank: int, world: int, port: int, queue: multiprocessing.Queue, nccl_graph: bool) -> None:
    import torch.distributed as dist

    from pagedllm.backends.cuda.backend import CudaBackend

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device)
    group = dist.group.WORLD
    dtype = torch.bfloat16
    result: dict[str, object] = {"rank": rank}
    try:
        backend = CudaBackend()
        comm = backend.create_communicator(group, device, dtype, max(BATCHES) * HIDDEN * 2)
        result["communicator"] = type(comm).__name__ if comm is not None else None
        if nccl_graph:
            result.update(_nccl_in_graph(backend, device, dtype))
        elif comm is not None:
            result["sizes"] = [_measure(backend, comm, device, dtype, batch) for batch in BATCHES]
            result["fused"] = [_measure_fused(backend, comm, device, dtype, batch) for batch in BATCHES]
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def _measure(backend, comm, device: torch.device, dtype: torch.dtype, batch: int) -> dict[str, object]:
    import torch.distributed as dist

    gen = torch.Generator(device=device).manual_seed(1234 + dist.get_rank())
    x = torch.randn(batch, HIDDEN, device=device, dtype=dtype, generator=gen)
    expected = x.float().clone()
    dist.all_reduce(expected)  # float32 sum through NCCL
    got = comm.all_reduce(x)
    err = (got.float() - expected).abs().max().item()
    ulp = expected.abs().max().item() * 2**-7  # one bf16 rounding of the largest sum
    out: dict[str, object] = {"batch": batch, "bytes": x.numel() * x.element_size(), "max_abs_err": err,
                              "ok_eager": err <= ulp}
    y = x.clone()
    out["nccl_eager_ms"] = _time_ms(lambda: dist.all_reduce(y), 200)
    out["symm_eager_ms"] = _time_ms(lambda: comm.all_reduce(x), 200)

    # a graph of PER_GRAPH chained all-reduces (each feeds the next, scaled back so values stay finite)
    static = x.clone()
    holder: dict[str, torch.Tensor] = {}

    def chain() -> None:
        h = static
        for _ in range(PER_GRAPH):
            h = comm.all_reduce(h) * 0.5
        holder["out"] = h

    replay = backend.capture_graph(chain)  # as the engine records its decode graphs
    # replay on new inputs: the result must equal the eager chain on the same inputs
    for trial in range(3):
        static.copy_(torch.randn(batch, HIDDEN, device=device, dtype=dtype, generator=gen))
        replay()
        replayed = holder["out"].clone()
        eager = static
        for _ in range(PER_GRAPH):
            eager = comm.all_reduce(eager) * 0.5
        if not torch.equal(replayed, eager):
            out["ok_graph"] = False
            out["graph_mismatch_trial"] = trial
            break
    else:
        out["ok_graph"] = True
    out["symm_graph_ms"] = _time_ms(replay, 50) / PER_GRAPH
    return out


def _measure_fused(backend, comm, device: torch.device, dtype: torch.dtype, batch: int) -> dict[str, object]:
    """The fused all-reduce + add + RMSNorm against ``comm.all_reduce`` then ``backend.add_rms_norm``."""
    import torch.distributed as dist

    rank = dist.get_rank()
    gen = torch.Generator(device=device).manual_seed(99 + rank)  # partial sums differ per rank
    shared = torch.Generator(device=device).manual_seed(7)  # residual and weight are the same on every rank
    x = torch.randn(batch, HIDDEN, device=device, dtype=dtype, generator=gen)
    residual = torch.randn(batch, HIDDEN, device=device, dtype=dtype, generator=shared)
    weight = torch.rand(HIDDEN, device=device, dtype=dtype, generator=shared) + 0.5
    eps = 1e-5

    def fused(h: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        got = comm.all_reduce_add_rms_norm(h, res, weight, eps)
        assert got is not None, "the communicator declined the fused all-reduce + RMSNorm"
        return got

    def unfused(h: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return backend.add_rms_norm(comm.all_reduce(h), res, weight, eps)

    if rank == 1:
        torch.cuda._sleep(20_000_000)  # rank 1 arrives late: rank 0's kernel must wait for it, not read stale data
    normed, res = fused(x, residual.clone())
    ref_normed, ref_res = unfused(x, residual.clone())
    out: dict[str, object] = {"batch": batch,
                              "normed_max_diff": (normed.float() - ref_normed.float()).abs().max().item(),
                              "residual_max_diff": (res.float() - ref_res.float()).abs().max().item()}
    both = torch.cat([normed, res]).float()
    peer = both.clone()
    dist.broadcast(peer, src=0)
    out["ranks_identical"] = bool(torch.equal(both, peer))

    static_x, static_res = x.clone(), residual.clone()
    holder: dict[str, torch.Tensor] = {}

    def chain(step) -> None:
        h, r = static_x, static_res
        for _ in range(PER_GRAPH):
            h, r = step(h, r)
        holder["out"] = h

    fused_graph = backend.capture_graph(lambda: chain(fused))
    static_res.copy_(residual)
    fused_graph()
    replayed = holder["out"].clone()
    static_res.copy_(residual)
    chain(fused)
    out["graph_equals_eager"] = bool(torch.equal(replayed, holder["out"]))
    unfused_graph = backend.capture_graph(lambda: chain(unfused))
    out["fused_graph_ms"] = _time_ms(fused_graph, 50) / PER_GRAPH
    out["unfused_graph_ms"] = _time_ms(unfused_graph, 50) / PER_GRAPH
    return out


def _nccl_in_graph(backend, device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    """Capture PER_GRAPH NCCL all-reduces in a graph; replay 200 times with an eager NCCL all-reduce and a
    host sync (an ``.item()``) between replays, the pattern of decode steps between prefill steps."""
    import torch.distributed as dist

    static = torch.ones(8, HIDDEN, device=device, dtype=dtype)
    eager = torch.ones(64, HIDDEN, device=device, dtype=dtype)

    def chain() -> None:
        for _ in range(PER_GRAPH):
            dist.all_reduce(static)
            static.mul_(0.5)

    replay = backend.capture_graph(chain)  # as the engine records its decode graphs
    start = time.perf_counter()
    for _ in range(200):
        replay()
        dist.all_reduce(eager)
        eager.fill_(1.0)
        float(static[0, 0].item())
    return {"nccl_graph_replays": 200, "nccl_graph_s": time.perf_counter() - start,
            "nccl_graph_value": float(static[0, 0].item())}


def _run(nccl_graph: bool) -> list[dict[str, object]] | str:
    """Start both ranks; returns their results, or why there are none (a time-out is reported, not raised)."""
    from pagedllm.core.distributed.parallel_state import free_port

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, queue, nccl_graph), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    results = []
    deadline = time.monotonic() + TIME_LIMIT_S
    while len(results) < 2 and time.monotonic() < deadline:
        try:
            results.append(queue.get(timeout=1.0))
        except Exception:
            if all(p.exitcode is not None for p in procs):
                break
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()) if len(results) == 2 else 0.5)
        if p.is_alive():
            p.kill()
    if len(results) < 2:
        return f"no result from {2 - len(results)} rank(s) within {TIME_LIMIT_S:.0f} s (hang or crash)"
    return sorted(results, key=lambda r: r["rank"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        print("needs 2 GPUs", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")}}
    report["symmetric_memory"] = _run(nccl_graph=False)
    report["nccl_in_graph"] = _run(nccl_graph=True)
    print(json.dumps(report, indent=1))
    sym = report["symmetric_memory"]
    if isinstance(sym, list) and "sizes" in sym[0]:
        print(f"{'batch':>6} {'bytes':>9} {'NCCL eager':>11} {'symm eager':>11} {'symm graph':>11}  correct")
        for row in sym[0]["sizes"]:
            print(f"{row['batch']:>6} {row['bytes']:>9} {row['nccl_eager_ms'] * 1e3:>9.1f}us "
                  f"{row['symm_eager_ms'] * 1e3:>9.1f}us {row['symm_graph_ms'] * 1e3:>9.1f}us  "
                  f"{row['ok_eager'] and row['ok_graph']}")
        print(f"{'batch':>6} {'fused graph':>12} {'2 kernels':>10}  diff vs 2 kernels (normed, residual)  "
              "ranks identical, graph = eager")
        for row, peer_row in zip(sym[0].get("fused", []), sym[1].get("fused", []), strict=False):
            print(f"{row['batch']:>6} {row['fused_graph_ms'] * 1e3:>10.1f}us {row['unfused_graph_ms'] * 1e3:>8.1f}us  "
                  f"{row['normed_max_diff']:.3g}, {row['residual_max_diff']:.3g}  "
                  f"{peer_row['ranks_identical']}, {row['graph_equals_eager']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
