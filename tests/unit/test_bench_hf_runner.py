"""The transformers peer of the offline benchmarks: which static batch sizes it tries and how it falls back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedllm.bench.hf_runner import candidate_batch_sizes, kv_bytes_per_token, largest_batch_tokens, run_hf
from pagedllm.bench.workloads import BenchRequest
from pagedllm.core.config import ModelConfig


@pytest.mark.parametrize(
    ("num_requests", "batch_size", "expected"),
    [
        (1000, None, [1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1]),
        (256, None, [256, 128, 64, 32, 16, 8, 4, 2, 1]),
        (5, None, [8, 4, 2, 1]),
        (1, None, [1]),
        (1000, 128, [128]),
    ],
)
def test_candidate_batch_sizes_start_from_one_batch_for_the_whole_workload(
    num_requests: int, batch_size: int | None, expected: list[int]
) -> None:
    assert candidate_batch_sizes(num_requests, batch_size) == expected


class FakeGenerator(torch.nn.Module):
    """Runs out of memory on batches larger than ``fits``; records the batch of every call."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits
        self.batches: list[tuple[int, int, int]] = []  # (rows, prompt columns, new tokens)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 **kwargs: object) -> torch.Tensor:
        if input_ids.shape[0] > self.fits:
            raise torch.OutOfMemoryError("fake: batch too large")
        assert kwargs["min_new_tokens"] == max_new_tokens  # EOS cannot end a row early
        self.batches.append((input_ids.shape[0], input_ids.shape[1], max_new_tokens))
        return input_ids


def test_run_hf_uses_the_largest_batch_that_fits_and_times_only_that_run() -> None:
    requests = [BenchRequest([1] * (3 + i % 4), 2 + i % 3) for i in range(10)]
    model = FakeGenerator(fits=4)
    result = run_hf(model, requests, torch.device("cpu"), None, lambda: None)
    assert result.batch_size == 4
    assert result.elapsed_s >= 0
    # 16 and 8 each pass their warm-up batch of 2 and run out of memory on their first batch of 10 and 8 rows
    assert [rows for rows, _, _ in model.batches] == [2, 2, 2, 4, 4, 2]
    timed = model.batches[3:]
    # each static batch is padded to its longest prompt and generates its longest output
    assert timed[0][1:] == (6, 4)


def test_run_hf_raises_when_nothing_fits() -> None:
    with pytest.raises(torch.OutOfMemoryError):
        run_hf(FakeGenerator(fits=0), [BenchRequest([1, 2], 1)], torch.device("cpu"), None, lambda: None)


def test_kv_bytes_per_token_and_tokens_of_the_largest_padded_batch() -> None:
    # 2 layers x 2 KV heads x head_dim 4 x (K and V) x 2 bytes: 64 bytes per token of a row
    hf_config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16,
                                head_dim=None)
    model_config = ModelConfig("tiny", hf_config, "LlamaForCausalLM", torch.bfloat16, 64, frozenset(), {})
    assert kv_bytes_per_token(model_config) == 64
    requests = [BenchRequest([1] * 3, 2), BenchRequest([1] * 5, 1), BenchRequest([1] * 2, 9)]
    # batches of 2: (2 rows x (5 + 2)) = 14 and (1 row x (2 + 9)) = 11 padded tokens
    assert largest_batch_tokens(requests, 2) == 14
    assert largest_batch_tokens(requests, 4) == 3 * (5 + 9)


def test_run_hf_skips_batches_whose_kv_cache_exceeds_the_budget() -> None:
    requests = [BenchRequest([1] * 4, 4) for _ in range(16)]  # 8 padded tokens a row
    model = FakeGenerator(fits=64)
    result = run_hf(model, requests, torch.device("cpu"), None, lambda: None, kv_budget_tokens=4 * 8)
    assert result.batch_size == 4
    assert max(rows for rows, _, _ in model.batches) == 4  # 16 and 8 were never tried
    # an explicit batch size is taken as given
    model = FakeGenerator(fits=64)
    assert run_hf(model, requests, torch.device("cpu"), 8, lambda: None, kv_budget_tokens=8).batch_size == 8
    # a budget below one row still tries batches of one (and lets the device say whether it fits)
    assert run_hf(FakeGenerator(fits=64), requests, torch.device("cpu"), None, lambda: None, 1).batch_size == 1
