"""The decode-graph path pads batches to buckets and must give exactly the eager results.

The cpu backend cannot record graphs, so here "capture" returns the step function itself: replay re-runs
it over the static buffers, which exercises the bucketing, padding and buffer plumbing of the core.
"""

from __future__ import annotations

from pathlib import Path

from pagedllm import LLM, SamplingParams
from pagedllm.core.graph_runner import capture_sizes
from tests.conftest import assert_pool_free


def test_capture_sizes_cover_max_num_seqs() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(20)[-3:] == [8, 16, 20]
    assert capture_sizes(256)[-1] == 256


def test_replayed_decode_equals_eager(llama_dir: Path) -> None:
    prompts = [[1, 2, 3], list(range(5, 40)), [7] * 3, list(range(100, 117)), [9, 8]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    kwargs = dict(device="cpu", dtype="float32", block_size=4, kv_cache_memory_bytes=2 << 20, max_num_seqs=6)
    eager = LLM(str(llama_dir), **kwargs).generate(prompts, params, use_tqdm=False)

    llm = LLM(str(llama_dir), **kwargs)
    runner = llm.llm_engine.executor.worker.runner
    runner.backend.capture_graph = lambda fn: fn  # replay = run the recorded step again
    runner.capture_decode_graphs(max_num_seqs=6)
    calls = []
    original_run = runner.graph_runner.run
    runner.graph_runner.run = lambda *a, **k: calls.append(len(a[0])) or original_run(*a, **k)
    replayed = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in replayed] == [o.outputs[0].token_ids for o in eager]
    assert calls and max(calls) == 5  # five decodes replayed through the bucket of 6
    assert_pool_free(llm)


def test_replayed_decode_without_lm_head_equals_eager(llama_dir: Path) -> None:
    """Tensor-parallel graphs end at the final norm; the LM head runs after the replay."""
    prompts = [[1, 2, 3], list(range(5, 40)), [7] * 3]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kwargs = dict(device="cpu", dtype="float32", block_size=4, kv_cache_memory_bytes=2 << 20, max_num_seqs=4)
    eager = LLM(str(llama_dir), **kwargs).generate(prompts, params, use_tqdm=False)

    llm = LLM(str(llama_dir), **kwargs)
    runner = llm.llm_engine.executor.worker.runner
    runner.backend.capture_graph = lambda fn: fn
    runner.capture_decode_graphs(max_num_seqs=4, with_logits=False)
    replayed = llm.generate(prompts, params, use_tqdm=False)
    model_config = llm.llm_engine.model_config
    assert runner.graph_runner.outputs.shape[-1] == model_config.hidden_size != model_config.vocab_size
    assert [o.outputs[0].token_ids for o in replayed] == [o.outputs[0].token_ids for o in eager]
    assert_pool_free(llm)
