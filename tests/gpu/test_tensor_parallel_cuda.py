"""Tensor parallelism on two GPUs: ``tp=2`` with decode graphs (all-reduces through the ``cuda`` backend's
symmetric-memory communicator inside them) must give the tokens of ``tp=1``, in float32 on tiny checkpoints.

Each engine runs in a fresh Python process, as a served model does: one tensor-parallel group per process
(torch's symmetric memory keeps per-group state for the life of the process).

Skipped unless two CUDA GPUs are visible; run with ``python -m pytest tests/gpu -q`` on such a machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

PROMPTS: list[list[int]] = [[1, 2, 3, 4, 5], [100, 200, 300], list(range(10, 90)), [7] * 33]

GENERATE = """
import json, sys
from pagedllm import LLM, SamplingParams
model_dir, tp, prompts, asynchronous = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] == "1"
llm = LLM(model_dir, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=64, max_num_seqs=8,
          kv_cache_memory_bytes=8 << 20, tensor_parallel_size=tp, async_scheduling=asynchronous,
          kv_cache_dtype=sys.argv[5], quantization=sys.argv[6] if sys.argv[6] != "none" else None)
try:
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    worker = llm.llm_engine.executor.worker
    print(json.dumps({"tokens": [o.outputs[0].token_ids for o in outputs],
                      "kv_usage": llm.llm_engine.kv_cache_usage(),
                      "graphs": worker.runner.graph_runner is not None,
                      "communicator": worker.tp_group.communicator is not None}))
finally:
    llm.llm_engine.shutdown()
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pagedllm.testing.checkpoints import build_checkpoint

    built = {arch: build_checkpoint(tmp_path_factory.mktemp(arch), arch) for arch in ("llama", "qwen2")}
    tiled = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    return {**built, "llama_tiled": build_checkpoint(tmp_path_factory.mktemp("llama_tiled"), "llama", **tiled)}


def _generate(model_dir: Path, tp: int, asynchronous: bool = False, kv_cache_dtype: str = "auto",
              quantization: str = "none") -> dict:
    """Greedy completions of PROMPTS in a new process; also whether rank 0 captured decode graphs and holds a
    communicator, and the KV usage left after the requests finished."""
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(model_dir), str(tp), json.dumps(PROMPTS),
                           str(int(asynchronous)), kv_cache_dtype, quantization], capture_output=True, text=True,
                          timeout=150)  # fmt: skip
    assert proc.returncode == 0, f"tp={tp} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(330)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_with_graphs_equals_tp1(checkpoints: dict[str, Path], arch: str) -> None:
    """Llama splits its 2 KV heads over the ranks; Qwen2 (1 KV head) replicates it; both with decode graphs."""
    tp1 = _generate(checkpoints[arch], 1)
    tp2 = _generate(checkpoints[arch], 2)
    assert tp1["graphs"] and tp2["communicator"] and tp2["graphs"], "tp=2 must capture graphs through the communicator"
    assert tp1["kv_usage"] == 0.0 and tp2["kv_usage"] == 0.0
    for i, (ours, ref) in enumerate(zip(tp2["tokens"], tp1["tokens"], strict=True)):
        assert ours == ref, f"prompt {i}: tp=2 {ours} != tp=1 {ref}"


@pytest.mark.timeout(330)
def test_tp2_fp8_kv_cache_with_graphs_equals_tp1(checkpoints: dict[str, Path]) -> None:
    """The KV cache in e4m3 on both ranks; the communicator still carries the model dtype, so decode graphs
    are recorded through it; the tokens equal tp=1's with the same cache."""
    tp1 = _generate(checkpoints["llama"], 1, kv_cache_dtype="fp8")
    tp2 = _generate(checkpoints["llama"], 2, kv_cache_dtype="fp8")
    assert tp2["communicator"] and tp2["graphs"] and tp2["kv_usage"] == 0.0
    assert tp2["tokens"] == tp1["tokens"]


@pytest.mark.timeout(330)
def test_tp2_fp8_linear_with_graphs_runs(checkpoints: dict[str, Path]) -> None:
    """fp8 linear layers on both ranks, decode graphs through the communicator. Each rank scales its slice
    of a row-parallel layer itself (as vLLM does), so tokens may leave tp=1's at a near tie: most prompts
    agree on their first tokens."""
    tp1 = _generate(checkpoints["llama"], 1, quantization="fp8")
    tp2 = _generate(checkpoints["llama"], 2, quantization="fp8")
    assert tp2["communicator"] and tp2["graphs"] and tp2["kv_usage"] == 0.0
    agree = sum(ours[:4] == ref[:4] for ours, ref in zip(tp2["tokens"], tp1["tokens"], strict=True))
    assert agree >= len(PROMPTS) // 2, (tp2["tokens"], tp1["tokens"])


@pytest.mark.timeout(330)
def test_tp2_fp8_block_with_graphs_runs(checkpoints: dict[str, Path]) -> None:
    """128 x 128 tile-scaled fp8 layers (``quantization="fp8_block"``) on both ranks of a Llama whose shards
    are whole tiles, their inputs quantized per group by the norms and the activation, decode graphs through
    the communicator: most prompts agree with tp=1 on their first tokens (each rank scales its slice of a
    row-parallel layer's input itself)."""
    tp1 = _generate(checkpoints["llama_tiled"], 1, quantization="fp8_block")
    tp2 = _generate(checkpoints["llama_tiled"], 2, quantization="fp8_block")
    assert tp2["communicator"] and tp2["graphs"] and tp2["kv_usage"] == 0.0
    agree = sum(ours[:4] == ref[:4] for ours, ref in zip(tp2["tokens"], tp1["tokens"], strict=True))
    assert agree >= len(PROMPTS) // 2, (tp2["tokens"], tp1["tokens"])


@pytest.mark.timeout(330)
def test_tp2_async_scheduling_equals_tp1(checkpoints: dict[str, Path]) -> None:
    """Asynchronous scheduling with tp=2: each step's input tokens are broadcast from rank 0's GPU."""
    tp1 = _generate(checkpoints["llama"], 1)
    tp2 = _generate(checkpoints["llama"], 2, asynchronous=True)
    assert tp2["graphs"] and tp2["kv_usage"] == 0.0
    assert tp2["tokens"] == tp1["tokens"]


FUSED = """
import json, os, sys
import torch, torch.distributed as dist
from pagedllm.backends.cuda.backend import CudaBackend
from pagedllm.core.distributed.parallel_state import DistributedInit, init_tensor_parallel

def rank_main(rank, port, queue):
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = init_tensor_parallel("nccl", DistributedInit("127.0.0.1", port), rank, 2, device)
    backend = CudaBackend()
    report = []
    for dtype in (torch.bfloat16, torch.float32):
        comm = backend.create_communicator(group.process_group, device, dtype, 40 * 4096 * dtype.itemsize)
        for rows, hidden in ((1, 4096), (3, 1000), (40, 4096)):  # 40 rows: more than the kernel's programs
            for call in range(4):  # every receive slot in turn, then the first again
                gen = torch.Generator(device=device).manual_seed(10 * call + rank)
                shared = torch.Generator(device=device).manual_seed(99 + call)
                x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
                x[0, :8] = -0.0  # negative zeros are values too
                residual = torch.randn(rows, hidden, device=device, dtype=dtype, generator=shared)
                weight = torch.rand(hidden, device=device, dtype=dtype, generator=shared) + 0.5
                if rank == call % 2:
                    torch.cuda._sleep(5_000_000)  # one rank late, then the other
                normed, res = comm.all_reduce_add_rms_norm(x, residual.clone(), weight, 1e-5)
                ref_normed, ref_res = backend.add_rms_norm(comm.all_reduce(x), residual.clone(), weight, 1e-5)
                both = torch.cat([normed, res]).float()
                peer = both.clone()
                dist.broadcast(peer, src=0)
                report.append({"dtype": str(dtype), "rows": rows, "hidden": hidden, "call": call,
                               "normed_err": (normed.float() - ref_normed.float()).abs().max().item(),
                               "residual_err": (res.float() - ref_res.float()).abs().max().item(),
                               "ranks_equal": bool(torch.equal(both, peer))})
    queue.put((rank, report))
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    import multiprocessing
    from pagedllm.core.distributed.parallel_state import free_port
    ctx = multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    print(json.dumps(results[1]))
"""


@pytest.mark.timeout(200)
def test_fused_all_reduce_add_rms_norm_equals_two_kernels(tmp_path: Path) -> None:
    """The communicator's one-kernel all-reduce + residual add + RMSNorm gives what the all-reduce followed by
    the backend's add_rms_norm gives, on both ranks bit for bit: bf16 and fp32, one row, a width that is not
    a power of two, more rows than programs, every receive slot, either rank arriving late."""
    script = tmp_path / "fused.py"
    script.write_text(FUSED)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 2 * 3 * 4
    for case in report:
        assert case["ranks_equal"], case
        assert case["residual_err"] == 0.0, case  # the sum rounded once, then the add: as the two kernels do
        assert case["normed_err"] <= (1e-2 if case["dtype"] == "torch.bfloat16" else 1e-5), case
