"""Static-shape backends get every batch padded to a token bucket, with identical results."""

from __future__ import annotations

from pathlib import Path

from pagedllm import LLM, SamplingParams
from tests.conftest import assert_pool_free


def test_batches_padded_to_buckets_give_same_tokens(llama_dir: Path) -> None:
    prompts = [[1, 2, 3], list(range(5, 30)), [9, 8, 7, 6]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kwargs = dict(device="cpu", dtype="float32", block_size=4, kv_cache_memory_bytes=2 << 20)
    plain = LLM(str(llama_dir), **kwargs).generate(prompts, params, use_tqdm=False)

    llm = LLM(str(llama_dir), **kwargs)
    runner = llm.llm_engine.executor.worker.runner
    runner.token_buckets = [4, 16, 64]
    assert not runner.computes_sampled_rows_only  # the last layer keeps every row: one shape per bucket
    seen: list[int] = []
    runner.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    padded = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in padded] == [o.outputs[0].token_ids for o in plain]
    assert set(seen) <= {4, 16, 64} and 64 in seen and 4 in seen
    assert_pool_free(llm)
