"""Op level: ``write_kv_cache`` / ``read_kv_cache`` round trips and ``copy_blocks``, whatever the layout.

The kit never reads the cache tensor directly (the backend owns its layout): it writes through
``write_kv_cache`` and reads back through ``read_kv_cache`` every slot of the pool. Caches start poisoned
with NaN, so a slot that should have been written and was not, or one written that should not have
been, shows.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.backends.kv_storage import to_cache_dtype
from pagedllm.conformance.cases import (
    K_SCALE,
    V_SCALE,
    base_block_size,
    base_head_size,
    dtype_name,
    kv_cache_cases,
    kv_only_cases,
    param,
)
from pagedllm.conformance.plugin import ConformanceTarget, case_id, get_target
from pagedllm.conformance.reference import poisoned_allocations, stored_value, tolerance

NUM_KV_HEADS = 2
NUM_BLOCKS = 6


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``kv_case`` over every claimed block size and KV cache dtype, ``scaled_kv_case`` over every
    KV-only cache dtype and model dtype (one skipped case when no KV-only dtype is claimed)."""
    if not {"kv_case", "scaled_kv_case"} & set(metafunc.fixturenames):
        return
    capabilities = get_target(metafunc.config).capabilities
    if "kv_case" in metafunc.fixturenames:
        params = []
        for block_size, dtype, kv_dtype in kv_cache_cases(capabilities):
            parts = [f"b{block_size}", dtype] + ([f"kv_{dtype_name(kv_dtype)}"] if kv_dtype != dtype else [])
            params.append(param(case_id(metafunc.config, *parts), (block_size, dtype, kv_dtype)))
        metafunc.parametrize("kv_case", params)
    if "scaled_kv_case" in metafunc.fixturenames:
        params = [param(case_id(metafunc.config, "scaled", dtype, f"kv_{dtype_name(kv_dtype)}"), (dtype, kv_dtype))
                  for dtype, kv_dtype in kv_only_cases(capabilities)]
        if not params:
            dtype = capabilities.dtypes[0]
            params = [param(case_id(metafunc.config, "scaled", dtype), (dtype, dtype),
                            skip="no KV-only cache dtype claimed (scales are taken by 8-bit caches)")]
        metafunc.parametrize("scaled_kv_case", params)


def poisoned_cache(target: ConformanceTarget, num_blocks: int, block_size: int, kv_dtype: torch.dtype) -> torch.Tensor:
    """A cache of the backend's layout filled with NaN (or the dtype's largest value if it has no NaN)."""
    shape = target.backend.kv_cache_shape(num_blocks, block_size, NUM_KV_HEADS, base_head_size(target.capabilities))
    cache = torch.empty(shape, dtype=kv_dtype, device=target.device)
    return cache.fill_(float("nan") if kv_dtype.is_floating_point else torch.iinfo(kv_dtype).max)


def read_all(target: ConformanceTarget, cache: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot's key and value, as float32 on the CPU, checking ``read_kv_cache``'s shapes."""
    slots = torch.arange(num_slots, dtype=torch.int64, device=target.device)
    keys, values = target.backend.read_kv_cache(cache, slots)
    expected = (num_slots, NUM_KV_HEADS, base_head_size(target.capabilities))
    assert tuple(keys.shape) == expected and tuple(values.shape) == expected, (
        f"read_kv_cache returned {tuple(keys.shape)}/{tuple(values.shape)}, expected {expected}"
    )
    return keys.float().cpu(), values.float().cpu()


def assert_slots(
    actual: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype, kv_dtype: torch.dtype
) -> None:
    """Exact match when the cache stores the model dtype, else the KV dtype's tolerance; NaN == NaN."""
    if kv_dtype == dtype:
        ok = torch.equal(actual.nan_to_num(12345.0), expected.nan_to_num(12345.0))
    else:
        tol = tolerance(kv_dtype)
        ok = torch.allclose(actual, expected, atol=tol.atol, rtol=tol.rtol, equal_nan=True)
    if not ok:
        bad = ~torch.isclose(actual, expected, equal_nan=True).flatten(1).all(-1)
        rows = bad.nonzero().flatten().tolist()
        pytest.fail(f"{what}: {len(rows)} slot(s) differ, first {rows[:8]}", pytrace=False)


def test_write_then_read_back(
    conformance_target: ConformanceTarget, kv_case: tuple[int, torch.dtype, torch.dtype],
    conformance_generator: torch.Generator,
) -> None:
    """Written slots read back what was written; padding rows (slot -1) and every other slot stay untouched;
    a second write overwrites."""
    block_size, dtype, kv_dtype = kv_case
    target, gen = conformance_target, conformance_generator
    head_dim = base_head_size(target.capabilities)
    num_slots = NUM_BLOCKS * block_size
    cache = poisoned_cache(target, NUM_BLOCKS, block_size, kv_dtype)
    expected_k, expected_v = read_all(target, cache, num_slots)
    assert bool(expected_k.isnan().all()) or not kv_dtype.is_floating_point, "read_kv_cache of a NaN cache is not NaN"

    for round_index in range(2):  # round 1 overwrites half of round 0's slots and adds new ones
        num_tokens = max(1, num_slots // 2)
        slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
        padding = torch.randperm(num_tokens + 3, generator=gen)[:3]  # rows to mark -1 among the tokens
        slot_mapping = torch.empty(num_tokens + 3, dtype=torch.int64)
        real_rows = torch.ones(num_tokens + 3, dtype=torch.bool)
        real_rows[padding] = False
        slot_mapping[real_rows] = slots
        slot_mapping[~real_rows] = -1
        key = torch.randn(num_tokens + 3, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
        value = torch.randn(num_tokens + 3, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
        with poisoned_allocations():
            target.backend.write_kv_cache(key.to(target.device), value.to(target.device), cache,
                                          slot_mapping.to(target.device))
        expected_k[slots] = to_cache_dtype(key[real_rows], kv_dtype).float()
        expected_v[slots] = to_cache_dtype(value[real_rows], kv_dtype).float()
        actual_k, actual_v = read_all(target, cache, num_slots)
        assert_slots(actual_k, expected_k, f"keys after write {round_index}", dtype, kv_dtype)
        assert_slots(actual_v, expected_v, f"values after write {round_index}", dtype, kv_dtype)


def test_scaled_write_then_read_back(
    conformance_target: ConformanceTarget, scaled_kv_case: tuple[torch.dtype, torch.dtype],
    conformance_generator: torch.Generator,
) -> None:
    """``write_kv_cache_scaled`` stores keys divided by ``k_scale`` and values by ``v_scale``: keys and values far
    past the format's range (``K_SCALE``, ``V_SCALE`` times a normal sample) read back as that sample, rounded to
    the cache's dtype; padding rows and every other slot stay untouched."""
    dtype, kv_dtype = scaled_kv_case
    target, gen = conformance_target, conformance_generator
    block_size = base_block_size(target.capabilities)
    head_dim = base_head_size(target.capabilities)
    num_slots = NUM_BLOCKS * block_size
    cache = poisoned_cache(target, NUM_BLOCKS, block_size, kv_dtype)
    expected_k, expected_v = read_all(target, cache, num_slots)
    num_tokens = num_slots // 2
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slot_mapping = torch.cat([slots, torch.full((3,), -1)])
    key = (torch.randn(num_tokens + 3, NUM_KV_HEADS, head_dim, generator=gen) * K_SCALE).to(dtype)
    value = (torch.randn(num_tokens + 3, NUM_KV_HEADS, head_dim, generator=gen) * V_SCALE).to(dtype)
    with poisoned_allocations():
        target.backend.write_kv_cache_scaled(key.to(target.device), value.to(target.device), cache,
                                             slot_mapping.to(target.device), K_SCALE, V_SCALE)
    expected_k[slots] = stored_value(key[:num_tokens], kv_dtype, K_SCALE) / K_SCALE
    expected_v[slots] = stored_value(value[:num_tokens], kv_dtype, V_SCALE) / V_SCALE
    actual_k, actual_v = read_all(target, cache, num_slots)
    assert_slots(actual_k, expected_k, f"keys written with k_scale {K_SCALE}", dtype, kv_dtype)
    assert_slots(actual_v, expected_v, f"values written with v_scale {V_SCALE}", dtype, kv_dtype)


def test_copy_blocks(
    conformance_target: ConformanceTarget, kv_case: tuple[int, torch.dtype, torch.dtype],
    conformance_generator: torch.Generator,
) -> None:
    """``copy_blocks`` copies whole blocks in every layer, poisoned destinations included, and nothing else."""
    block_size, dtype, kv_dtype = kv_case
    target, gen = conformance_target, conformance_generator
    head_dim = base_head_size(target.capabilities)
    num_blocks, num_layers = 8, 2
    num_slots = num_blocks * block_size
    caches = [poisoned_cache(target, num_blocks, block_size, kv_dtype) for _ in range(num_layers)]
    order = torch.randperm(num_blocks, generator=gen)
    src, dst = order[:3], order[3:6]
    dst_slots = (dst[:, None] * block_size + torch.arange(block_size)[None, :]).flatten()
    every_slot = torch.arange(num_slots, dtype=torch.int64, device=target.device)
    for cache in caches:  # fill every slot, then poison the destinations again
        key = torch.randn(num_slots, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
        value = torch.randn(num_slots, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
        target.backend.write_kv_cache(key.to(target.device), value.to(target.device), cache, every_slot)
        nan = torch.full((dst_slots.shape[0], NUM_KV_HEADS, head_dim), float("nan"), dtype=dtype)
        target.backend.write_kv_cache(nan.to(target.device), nan.to(target.device), cache, dst_slots.to(target.device))
    before = [read_all(target, cache, num_slots) for cache in caches]
    src_to_dst = torch.stack([src, dst], dim=1).to(torch.int64).to(target.device)
    with poisoned_allocations():
        target.backend.copy_blocks(caches, src_to_dst)
    for layer, cache in enumerate(caches):
        for index, (old, new) in enumerate(zip(before[layer], read_all(target, cache, num_slots), strict=True)):
            expected = old.view(num_blocks, block_size, NUM_KV_HEADS, head_dim).clone()
            expected[dst] = expected[src]
            what = f"layer {layer} {'values' if index else 'keys'} after copy_blocks {src.tolist()}->{dst.tolist()}"
            assert_slots(new, expected.view(num_slots, NUM_KV_HEADS, head_dim), what, dtype, kv_dtype)
    # no pairs: nothing changes
    after = [read_all(target, cache, num_slots) for cache in caches]
    target.backend.copy_blocks(caches, torch.empty(0, 2, dtype=torch.int64, device=target.device))
    for layer, cache in enumerate(caches):
        for old, new in zip(after[layer], read_all(target, cache, num_slots), strict=True):
            assert_slots(new, old, f"layer {layer} after copy_blocks with no pairs", dtype, kv_dtype)
