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
          kv_cache_memory_bytes=8 << 20, tensor_parallel_size=tp, async_scheduling=asynchronous)
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

    return {arch: build_checkpoint(tmp_path_factory.mktemp(arch), arch) for arch in ("llama", "qwen2")}


def _generate(model_dir: Path, tp: int, asynchronous: bool = False) -> dict:
    """Greedy completions of PROMPTS in a new process; also whether rank 0 captured decode graphs and holds a
    communicator, and the KV usage left after the requests finished."""
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(model_dir), str(tp), json.dumps(PROMPTS),
                           str(int(asynchronous))], capture_output=True, text=True, timeout=150)  # fmt: skip
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
def test_tp2_async_scheduling_equals_tp1(checkpoints: dict[str, Path]) -> None:
    """Asynchronous scheduling with tp=2: each step's input tokens are broadcast from rank 0's GPU."""
    tp1 = _generate(checkpoints["llama"], 1)
    tp2 = _generate(checkpoints["llama"], 2, asynchronous=True)
    assert tp2["graphs"] and tp2["kv_usage"] == 0.0
    assert tp2["tokens"] == tp1["tokens"]
