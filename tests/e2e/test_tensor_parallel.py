"""End-to-end tensor parallelism on the cpu backend with gloo: ``tp=2`` must equal ``tp=1`` token for token.

Tiny float32 checkpoints: Llama (4 heads, 2 KV heads: split across the ranks) and Qwen2 (4 heads, 1 KV
head: replicated on both ranks; q/k/v biases; tied embeddings, which make this tiny one repeat its last
token, so an untied variant too), under the ``mp`` executor and the ``ray`` executor (a small local Ray
instance). Besides the tokens, the top logprobs of every step must agree. Also: a worker killed
mid-generation makes the driver raise within seconds, no process outlives its driver, and misconfiguration
is refused before anything starts.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pagedllm.core.config import EngineConfig
from pagedllm.core.distributed import WorkerFailedError
from pagedllm.core.engine import LLMEngine
from pagedllm.core.outputs import CompletionOutput
from pagedllm.core.sampling_params import SamplingParams
from pagedllm.entrypoints.llm import LLM
from tests.conftest import assert_pool_free

PROMPTS: list[list[int]] = [[1, 2, 3, 4, 5], [100, 200, 300], list(range(10, 40))]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
ENGINE_KWARGS: dict[str, object] = dict(device="cpu", dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 22)
LOGPROB_ATOL = 1e-4  # tp=2 sums the same products in another order
CHECKPOINTS: dict[str, tuple[str, dict[str, object]]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    "qwen3": ("qwen3", {}),  # per-head q/k norms, replicated on both ranks
    "mixtral": ("mixtral", {}),  # every expert's features split over the ranks, the router replicated
    "qwen3_moe": ("qwen3_moe", {}),  # sparse and dense layers
    "qwen2_moe": ("qwen2_moe", {}),  # a shared expert split like the experts, its gate replicated
    "granite": ("granite", {}),  # multipliers on partial sums (linear), tied embeddings
    "gemma3": ("gemma3", {}),  # attention and MLP outputs all-reduced before their post-norms
    "gemma2": ("gemma2", {}),  # each rank's heads soft-capped
    # every rank's rows of q, k, v, gate, up and columns of down span whole 128 x 128 tiles ("fp8_block")
    "llama-tiled": ("llama", {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                              "num_key_value_heads": 4, "head_dim": 64}),
}


@pytest.fixture(scope="module")
def references(checkpoint_factory):
    """``references(name)``: a tiny checkpoint of CHECKPOINTS and its single-device (tp=1) greedy completions
    of PROMPTS, built once per module."""
    cache: dict[str, tuple[Path, list[CompletionOutput]]] = {}

    def get(name: str) -> tuple[Path, list[CompletionOutput]]:
        if name not in cache:
            arch, overrides = CHECKPOINTS[name]
            model_dir = checkpoint_factory(arch, **overrides)
            cache[name] = (model_dir, generate(model_dir)[0])
        return cache[name]

    return get


def generate(model_dir: Path, check: Callable[[LLM], None] | None = None,
             **kwargs: object) -> tuple[list[CompletionOutput], list[int]]:
    """Run PROMPTS to completion on a fresh engine (``check(llm)`` first, to inspect it), check the pool is
    free, shut down; returns the completions and the pids the executor's workers had."""
    llm = LLM(str(model_dir), **ENGINE_KWARGS, **kwargs)
    try:
        if check is not None:
            check(llm)
        outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert_pool_free(llm)
        pids = list(getattr(llm.llm_engine.executor, "worker_pids", []))
    finally:
        llm.llm_engine.shutdown()
    return [o.outputs[0] for o in outputs], pids


def assert_same_completions(expected: list[CompletionOutput], actual: list[CompletionOutput]) -> None:
    """Same tokens, and the same top logprobs up to float32 reordering."""
    for prompt, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert got.token_ids == want.token_ids, f"prompt {prompt}: tp=2 {got.token_ids} != tp=1 {want.token_ids}"
        for step, (want_top, got_top) in enumerate(zip(want.logprobs, got.logprobs, strict=True)):
            assert set(got_top) == set(want_top), f"prompt {prompt} step {step}: top tokens differ"
            for token, logprob in want_top.items():
                assert abs(got_top[token].logprob - logprob.logprob) < LOGPROB_ATOL, (prompt, step, token)


def wait_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    """Wait until no process in ``pids`` exists; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _exists(pid)]
        time.sleep(0.1)
    return alive


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped yet) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen2-untied", "qwen3", "mixtral", "qwen3_moe",
                                  "qwen2_moe", "granite", "gemma3", "gemma2"])
def test_mp_tp2_equals_tp1(references, name: str) -> None:
    model_dir, expected = references(name)
    actual, pids = generate(model_dir, tensor_parallel_size=2)
    assert_same_completions(expected, actual)
    assert len(pids) == 1
    assert wait_gone(pids) == []
    assert not dist.is_initialized()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_mp_tp2_async_scheduling_equals_tp1(references, monkeypatch, graphs: bool) -> None:
    """Asynchronous scheduling with tp=2: rank 0 broadcasts the sampled tokens each step reads to rank 1 on
    the devices; tokens and logprobs equal tp=1's, eagerly and through decode graphs."""
    from pagedllm.backends.registry import get_registry
    from tests.e2e.graph_cpu_backend import GraphCpuBackend

    model_dir, expected = references("llama")
    if graphs:
        monkeypatch.setattr(get_registry(), "resolve_backend", lambda device: GraphCpuBackend)
    actual, pids = generate(model_dir, tensor_parallel_size=2, async_scheduling=True)
    assert_same_completions(expected, actual)
    assert wait_gone(pids) == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("gather", [False, True], ids=["lm-head-after-replay", "lm-head-in-graph"])
def test_mp_tp2_decode_graphs_route_collectives_through_the_communicator(references, monkeypatch, gather) -> None:
    """A backend that can capture graphs and offers a communicator: tp=2 records decode graphs, small
    all-reduces go through the communicator, the LM head is in the graphs exactly when the communicator can
    all-gather its output, and the tokens still equal tp=1's."""
    from pagedllm.backends.registry import get_registry
    from tests.e2e.graph_cpu_backend import GatherGraphCpuBackend, GraphCpuBackend

    model_dir, expected = references("llama")
    backend = GatherGraphCpuBackend if gather else GraphCpuBackend
    monkeypatch.setattr(get_registry(), "resolve_backend", lambda device: backend)
    llm = LLM(str(model_dir), **ENGINE_KWARGS, tensor_parallel_size=2)
    try:
        worker = llm.llm_engine.executor.worker
        graphs = worker.runner.graph_runner
        assert graphs is not None and graphs.with_logits == gather
        communicator = worker.tp_group.communicator
        calls_at_start, gathers_at_start = communicator.calls, communicator.gathers
        outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert_pool_free(llm)
        # two all-reduces per layer of every step, plus the embedding's
        assert communicator.calls - calls_at_start >= 2 * llm.llm_engine.model_config.num_layers * 8
        assert (communicator.gathers - gathers_at_start >= 8) == gather
    finally:
        llm.llm_engine.shutdown()
    assert_same_completions(expected, [o.outputs[0] for o in outputs])


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray instance for this module (never an outside cluster)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.timeout(180)
def test_mp_tp2_fp8_kv_cache_equals_tp1(references, monkeypatch) -> None:
    """``kv_cache_dtype="fp8"`` with tp=2 and decode graphs: each rank stores its heads in e4m3, the
    communicator is still asked for the model dtype's collectives, and the tokens equal tp=1's fp8 run."""
    from pagedllm.backends.registry import get_registry
    from tests.e2e.graph_cpu_backend import GraphCpuBackend

    model_dir, _ = references("llama")
    expected, _ = generate(model_dir, kv_cache_dtype="fp8")
    monkeypatch.setattr(get_registry(), "resolve_backend", lambda device: GraphCpuBackend)
    llm = LLM(str(model_dir), **ENGINE_KWARGS, tensor_parallel_size=2, kv_cache_dtype="fp8")
    try:
        worker = llm.llm_engine.executor.worker
        assert worker.kv_dtype == torch.float8_e4m3fn and worker.tp_group.communicator.dtype == torch.float32
        outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert_pool_free(llm)
    finally:
        llm.llm_engine.shutdown()
    assert_same_completions(expected, [o.outputs[0] for o in outputs])


@pytest.mark.timeout(180)
def test_mp_tp2_fp8_linear_stays_close_to_tp1(references) -> None:
    """``quantization="fp8"`` with tp=2: each rank quantizes its slice of a row-parallel layer (and that slice
    of each token's input) with its own scales, as vLLM does, so the numbers are not tp=1's. The completions
    follow tp=1's fp8 run up to a near tie: where the tokens first differ, each is in the other's top 3."""
    model_dir, _ = references("llama")
    expected, _ = generate(model_dir, quantization="fp8")

    def check(llm: LLM) -> None:
        assert rank0_layer(llm).self_attn.o_proj.weight.dtype == torch.float8_e4m3fn

    outputs, _ = generate(model_dir, check, tensor_parallel_size=2, quantization="fp8")
    assert_same_up_to_a_near_tie(expected, outputs)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("scheme", ["fp8", "fp8-static", "fp8-static-kv"])
def test_mp_tp2_fp8_checkpoint_stays_close_to_tp1(references, tmp_path: Path, scheme: str) -> None:
    """A checkpoint stored in fp8 with one scale per tensor (q, k, v: three, in one fused layer each rank
    slices): each rank loads its rows of the column-parallel layers with their scales and all rows' scales of
    the row-parallel ones (with ``fp8-static``, every layer's input scale whole; ``-kv``: also KV-cache scales,
    taken whole by each rank's fp8 cache of its heads); as with ``quantization="fp8"``, tp=1's tokens up to a
    near tie."""
    from pagedllm.testing.fp8_checkpoints import write_fp8_checkpoint

    kv = scheme.endswith("-kv")
    fp8_dir, _ = write_fp8_checkpoint(references("llama")[0], tmp_path, scheme.removesuffix("-kv"),
                                      kv_cache_scales=kv)
    cache = {"kv_cache_dtype": "fp8"} if kv else {}
    kv_scales: list[tuple[float, float]] = []  # tp=1's, per layer

    def tp1_scales(llm: LLM) -> None:
        layers = llm.llm_engine.executor.worker.runner.model.attention_layers()
        kv_scales.extend((layer.k_scale, layer.v_scale) for layer in layers)

    expected, _ = generate(fp8_dir, tp1_scales, **cache)
    assert kv_scales and all((k != 1.0 and v != 1.0) == kv for k, v in kv_scales)

    def check(llm: LLM) -> None:
        layer = rank0_layer(llm)
        qkv = layer.self_attn.qkv_proj
        assert layer.self_attn.o_proj.weight.dtype == qkv.weight.dtype == torch.float8_e4m3fn
        scales = [part.unique() for part in qkv.weight_scale.split(qkv.shard_sizes)]  # rank 0's q, k, v rows
        assert [len(part) for part in scales] == [1, 1, 1] and len(set(torch.cat(scales).tolist())) == 3
        static = getattr(layer.mlp.down_proj, "input_scale", None)
        assert (static is not None and float(static) > 0) == scheme.startswith("fp8-static")
        assert (layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale) == kv_scales[0]

    outputs, _ = generate(fp8_dir, check, tensor_parallel_size=2, **cache)
    assert_same_up_to_a_near_tie(expected, outputs)


@pytest.mark.timeout(180)
def test_mp_tp2_tile_checkpoint_equals_tp1(references, tmp_path: Path) -> None:
    """A checkpoint with 128 x 128 tile scales (DeepSeek's ``weight_scale_inv``) whose shards fall on tiles:
    each rank loads its tile rows of the column-parallel layers and its tile columns of the row-parallel
    ones, and quantizes the same 128-feature groups of each input as tp=1; the all-reduce sums in another
    order, which can move an activation across an e4m3 rounding boundary (measured here: one logprob 0.04
    apart at step 5), so the tokens are tp=1's up to a near tie."""
    from pagedllm.testing.fp8_checkpoints import write_fp8_checkpoint

    fp8_dir, _ = write_fp8_checkpoint(references("llama-tiled")[0], tmp_path, "fp8-block")
    expected, _ = generate(fp8_dir)

    def check(llm: LLM) -> None:
        layer = rank0_layer(llm)
        assert llm.llm_engine.config.quantization == "fp8_block"
        assert layer.self_attn.qkv_proj.weight_scale.shape == (3, 2)  # rank 0: q, k, v rows 128 each; in 256
        assert layer.mlp.down_proj.weight_scale.shape == (2, 2)  # out 256; rank 0's 256 of the 512 inputs
        assert layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn

    outputs, _ = generate(fp8_dir, check, tensor_parallel_size=2)
    assert_same_up_to_a_near_tie(expected, outputs)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("scheme", ["awq", "gptq-sym", "compressed-tensors-asym"])
def test_mp_tp2_w4a16_checkpoint_equals_tp1(references, tmp_path: Path, scheme: str) -> None:
    """A 4-bit checkpoint in groups of 32: each rank loads its rows (words, scales, zero points) of the
    column-parallel layers and its input features' words and groups of the row-parallel ones; the inputs stay
    float32, so tp=2 equals tp=1 up to the order of the sums."""
    from pagedllm.testing.w4a16_checkpoints import write_w4a16_checkpoint

    quantized, _ = write_w4a16_checkpoint(references("llama")[0], tmp_path, scheme)
    expected, _ = generate(quantized)

    def check(llm: LLM) -> None:
        layer = rank0_layer(llm)
        qkv, down = layer.self_attn.qkv_proj, layer.mlp.down_proj
        assert qkv.weight.shape == (64, 8) and qkv.weight_scale.shape == (64, 2)  # 2 of 4 heads, 1 of 2 KV heads
        assert down.weight.shape == (64, 8) and down.weight_zero.shape == (64, 2)  # 64 of the 128 inputs

    outputs, _ = generate(quantized, check, tensor_parallel_size=2)
    assert_same_completions(expected, outputs)


def test_act_order_checkpoints_need_tp1(references, tmp_path: Path) -> None:
    """GPTQ's act-order groups span the input features of every rank: refused at tp=2, with the reason."""
    from pagedllm.testing.w4a16_checkpoints import write_w4a16_checkpoint

    quantized, _ = write_w4a16_checkpoint(references("llama")[0], tmp_path, "gptq-act-order")
    with pytest.raises(Exception, match="act-order"):
        generate(quantized, tensor_parallel_size=2)


def rank0_layer(llm: LLM) -> torch.nn.Module:
    """The first decoder layer of rank 0's model (the driver's worker)."""
    return llm.llm_engine.executor.worker.runner.model.model.layers[0]


def assert_same_up_to_a_near_tie(expected: list[CompletionOutput], actual: list[CompletionOutput]) -> None:
    """The completions are the same until, if ever, they part at a near tie: where the tokens first differ,
    each is in the other's top 3."""
    for prompt, (want, got) in enumerate(zip(expected, actual, strict=True)):
        for step, (a, b) in enumerate(zip(got.token_ids, want.token_ids, strict=True)):
            if a != b:
                assert b in got.logprobs[step] and a in want.logprobs[step], (prompt, step, got, want)
                break


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_ray_tp2_equals_tp1(references, local_ray, name: str) -> None:
    model_dir, expected = references(name)
    actual, pids = generate(model_dir, tensor_parallel_size=2, distributed_executor_backend="ray")
    assert_same_completions(expected, actual)
    assert len(pids) == 2
    deadline = time.monotonic() + 15  # the placement group is given back (asynchronously)
    while local_ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert local_ray.available_resources().get("CPU", 0) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tensor_parallel_size": 3}, "4 attention heads are not divisible by tensor_parallel_size=3"),
        ({"tensor_parallel_size": 2, "distributed_executor_backend": "mpi"}, "must be one of mp, ray"),
    ],
)
def test_misconfiguration_is_refused_before_any_process_starts(references, overrides, message) -> None:
    model_dir, _ = references("llama")
    children = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match=message):
        LLM(str(model_dir), **ENGINE_KWARGS, **overrides)
    assert set(multiprocessing.active_children()) == children


@pytest.mark.timeout(120)
def test_killed_worker_makes_the_driver_raise_quickly(references) -> None:
    model_dir, _ = references("llama")
    engine = LLMEngine(EngineConfig(model=str(model_dir), tensor_parallel_size=2, **ENGINE_KWARGS))
    try:
        engine.add_request(None, PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        for _ in range(3):
            engine.step()
        (pid,) = engine.executor.worker_pids
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerFailedError, match=r"rank 1 \(pid \d+\) died with signal SIGKILL"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < 30
        with pytest.raises(WorkerFailedError):  # the executor stays failed
            engine.step()
    finally:
        engine.shutdown()
    assert not dist.is_initialized()  # the next tensor-parallel engine of this process can start


DRIVER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pagedllm.entrypoints.llm import LLM

    if __name__ == "__main__":
        llm = LLM(sys.argv[1], device="cpu", dtype="float32", tensor_parallel_size=2, kv_cache_memory_bytes=1 << 22)
        print(*llm.llm_engine.executor.worker_pids, flush=True)
        time.sleep(600)
    """
)


@pytest.mark.timeout(120)
def test_workers_exit_when_the_driver_is_killed(references, tmp_path: Path) -> None:
    model_dir, _ = references("llama")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER_SCRIPT)
    driver = subprocess.Popen([sys.executable, str(script), str(model_dir)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 1 and _exists(pids[0])
    finally:
        driver.kill()
        driver.wait()
    assert wait_gone(pids) == []
