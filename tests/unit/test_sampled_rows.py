"""The last layer computes only the sampled rows: the same logits and the same KV cache as the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.core.model_runner import ModelInput, ModelRunner
from pagedllm.core.scheduler import ScheduledRequest
from tests.conftest import assert_pool_free

KWARGS = dict(device="cpu", dtype="float32", block_size=4, kv_cache_memory_bytes=2 << 20)


# one step: a decode, a prompt's last chunk, a chunk that does not end its prompt, a whole short prompt (15 rows;
# any block size of 4 or more)
MIXED_STEP = [
    ScheduledRequest("decode", [17], 9, [1, 2, 3], needs_sample=True),
    ScheduledRequest("prompt-end", [5, 6, 7, 8, 9], 4, [4, 5, 6], needs_sample=True),
    ScheduledRequest("chunk", [3, 1, 4, 1, 5, 9], 0, [7, 8], needs_sample=False),
    ScheduledRequest("prompt", [2, 7, 1], 0, [9], needs_sample=True),
]


def runner_over_random_cache(model_dir: Path, **kwargs: object) -> ModelRunner:
    """The model runner of a new engine, its KV caches filled with random context for the step to read."""
    runner = LLM(str(model_dir), **kwargs).llm_engine.executor.worker.runner
    generator = torch.Generator().manual_seed(0)
    for cache in runner.kv_caches:
        cache.copy_(torch.randn(cache.shape, generator=generator).to(cache.dtype))
    return runner


@pytest.fixture
def runner(llama_dir: Path) -> ModelRunner:
    return runner_over_random_cache(llama_dir, **KWARGS)


def whole_batch_logits(runner: ModelRunner, model_input: ModelInput) -> torch.Tensor:
    """Every row through every layer, then the sampled rows' logits (what the runner did before)."""
    hidden = runner.model(model_input.input_ids, model_input.positions, model_input.metadata)
    return runner.model.compute_logits(hidden[model_input.logits_indices])


def rows_seen_by_mlps(runner: ModelRunner) -> list[list[int]]:
    """Per layer, the row count of each call of its MLP (hooks stay for the runner's life)."""
    seen: list[list[int]] = [[] for _ in runner.model.model.layers]
    for i, layer in enumerate(runner.model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].shape[0]))
    return seen


def run_both_ways(runner: ModelRunner, scheduled: list[ScheduledRequest]
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(logits, reference logits, caches, reference caches)`` of one step from the same starting caches."""
    before = [cache.clone() for cache in runner.kv_caches]
    model_input = runner.prepare(scheduled)
    assert model_input.sampled is not None
    logits = runner.compute_logits(model_input)
    caches = [cache.clone() for cache in runner.kv_caches]
    for cache, saved in zip(runner.kv_caches, before, strict=True):
        cache.copy_(saved)
    reference = whole_batch_logits(runner, runner.prepare(scheduled))
    return logits, reference, caches, runner.kv_caches


def test_mixed_step_samples_the_same_logits_and_stores_every_key(runner: ModelRunner) -> None:
    seen = rows_seen_by_mlps(runner)
    logits, reference, caches, reference_caches = run_both_ways(runner, MIXED_STEP)
    assert logits.shape == reference.shape == (3, runner.model.config.vocab_size)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    for cache, expected in zip(caches, reference_caches, strict=True):
        assert torch.equal(cache, expected)
    # first the pruned step, then the whole batch: the last layer's MLP ran on the 3 sampled rows of 15
    assert seen[0] == [15, 15] and seen[-1] == [3, 15]


def test_step_that_samples_nothing_only_stores_the_last_layers_keys(runner: ModelRunner) -> None:
    scheduled = [ScheduledRequest("chunk", list(range(1, 11)), 4, [1, 2, 3, 4], needs_sample=False)]
    seen = rows_seen_by_mlps(runner)
    logits, reference, caches, reference_caches = run_both_ways(runner, scheduled)
    assert logits.shape == reference.shape == (0, runner.model.config.vocab_size)
    for cache, expected in zip(caches, reference_caches, strict=True):
        assert torch.equal(cache, expected)
    assert seen[-1] == [10]  # only the whole-batch reference ran the last MLP


def test_pure_decode_step_runs_every_row(runner: ModelRunner) -> None:
    scheduled = [ScheduledRequest(f"r{i}", [i + 1], 5, [1 + i], needs_sample=True) for i in range(3)]
    assert runner.prepare(scheduled).sampled is None


def test_chunked_prefill_generation_equal_with_and_without(llama_dir: Path) -> None:
    """Prompts cut into chunks by a small token budget, decoded beside other prompts' chunks: tokens and
    logprobs as with every row through the last layer."""
    prompts = [list(range(3, 40)), [5, 9, 2], list(range(50, 71)), [8] * 11]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    outputs = {}
    for pruned in (True, False):
        llm = LLM(str(llama_dir), max_num_batched_tokens=16, **KWARGS)
        runner = llm.llm_engine.executor.worker.runner
        runner.model_takes_sampled_rows = pruned
        outputs[pruned] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        assert_pool_free(llm)
    for got, want in zip(outputs[True], outputs[False], strict=True):
        assert got.token_ids == want.token_ids and len(got.logprobs) == 8
        for step_got, step_want in zip(got.logprobs, want.logprobs, strict=True):
            assert step_got.keys() == step_want.keys()
            for token, entry in step_got.items():
                assert entry.logprob == pytest.approx(step_want[token].logprob, abs=1e-5)



@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 7])
def test_sampled_metadata_values_and_aligned_arrays(runner: ModelRunner, num_rows: int) -> None:
    """One single-token query per sampled row, at that row's position over its request's block table; each
    device array starts on 16 bytes (Triton compiles another kernel variant for an unaligned pointer)."""
    scheduled = [ScheduledRequest(f"p{i}", list(range(1, 4 + i)), i, [1 + i], needs_sample=True)
                 for i in range(num_rows)] + [ScheduledRequest("chunk", [5] * 6, 0, [9, 10], needs_sample=False)]
    model_input = runner.prepare(scheduled)
    sampled, full = model_input.sampled, model_input.metadata
    last_rows = full.query_start_loc[1 : num_rows + 1].long() - 1
    assert torch.equal(sampled.indices, last_rows)
    md = sampled.metadata
    assert (md.num_tokens, md.num_decodes, md.max_query_len) == (num_rows, num_rows, 1)
    assert torch.equal(md.query_start_loc, torch.arange(num_rows + 1, dtype=torch.int32))
    assert torch.equal(md.seq_lens, (model_input.positions[last_rows] + 1).int())
    assert torch.equal(md.seq_lens, full.seq_lens[:num_rows]) and torch.equal(md.seq_lens_cpu, md.seq_lens)
    assert torch.equal(md.context_lens, md.seq_lens - 1)
    assert torch.equal(md.block_tables, full.block_tables[:num_rows])
    assert md.max_seq_len == int(md.seq_lens.max())
    for array in (sampled.indices, md.query_start_loc, md.seq_lens, md.context_lens, md.block_tables):
        assert array.data_ptr() % 16 == 0
