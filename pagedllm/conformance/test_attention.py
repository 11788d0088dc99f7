"""Op level: ``Backend.attention`` over the paged cache against the float32 reference.

Every case lays its blocks out in a random permutation of the pool, writes the cached context through
the backend, poisons unwritten KV slots (a large finite value) and uninitialized allocations (NaN), then
runs the step as the engine does: ``write_kv_cache`` of the new tokens, then ``attention``.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.conformance.cases import (
    AttentionCase,
    attention_cases,
    base_block_size,
    base_head_size,
    num_padding_tokens,
    param,
)
from pagedllm.conformance.plugin import ConformanceTarget, case_id, get_target
from pagedllm.conformance.reference import (
    AttentionBatch,
    RequestShape,
    as_decode_rows,
    build_attention_batch,
    describe_mismatch,
    poisoned_allocations,
    reference_attention,
    tolerance,
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``attention_case`` from the backend's capabilities, and ``rows_dtype`` over its dtypes."""
    if "attention_case" in metafunc.fixturenames:
        capabilities = get_target(metafunc.config).capabilities
        metafunc.parametrize(
            "attention_case",
            [param(case_id(metafunc.config, *case.id_parts()), case, skip=skip)
             for case, skip in attention_cases(capabilities)],
        )
    if "rows_dtype" in metafunc.fixturenames:
        capabilities = get_target(metafunc.config).capabilities
        metafunc.parametrize("rows_dtype", [param(case_id(metafunc.config, "decode_rows", dtype), dtype)
                                            for dtype in capabilities.dtypes])


def check_attention(batch: AttentionBatch, out: torch.Tensor, dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    """Fail unless ``out`` has the query's shape and dtype and its real rows match the reference (both divided by
    the batch's ``v_scale``, so the tolerances keep meaning outputs of magnitude ~1)."""
    assert tuple(out.shape) == tuple(batch.query.shape), (
        f"attention returned shape {tuple(out.shape)}, expected [num_tokens, num_heads, head_dim] = "
        f"{tuple(batch.query.shape)}"
    )
    assert out.dtype == dtype, f"attention returned {out.dtype}, expected the query's dtype {dtype}"
    actual = out[: batch.metadata.num_tokens].float().cpu() / batch.v_scale
    expected = reference_attention(batch) / batch.v_scale
    tol = tolerance(dtype, kv_dtype)
    if not torch.allclose(actual, expected, atol=tol.atol, rtol=tol.rtol):
        pytest.fail(
            f"attention differs from the float32 reference (atol={tol.atol}, rtol={tol.rtol}):\n"
            + describe_mismatch(batch, actual, expected, tol),
            pytrace=False,
        )


def build_case(target: ConformanceTarget, case: AttentionCase, generator: torch.Generator) -> AttentionBatch:
    """Build the batch of ``case`` (skipping when no token bucket of a static-shape backend fits it)."""
    requests = case.requests()
    num_tokens = sum(r.query_len for r in requests)
    padding = num_padding_tokens(num_tokens, target.capabilities, case.padded)
    if padding is None:
        pytest.skip(f"{num_tokens} tokens exceed the largest claimed token bucket")
    return build_attention_batch(target.backend, target.device, requests, case.spec(), case.block_size,
                                 case.dtype, case.kv_dtype, generator, num_padding_tokens=padding,
                                 k_scale=case.k_scale, v_scale=case.v_scale)


def test_attention(
    conformance_target: ConformanceTarget, attention_case: AttentionCase, conformance_generator: torch.Generator
) -> None:
    """One step (write this step's K/V, then attend) matches the reference for the case's batch; the
    ``kv_scaled`` cases through ``write_kv_cache_scaled`` and ``attention_scaled``."""
    backend = conformance_target.backend
    batch = build_case(conformance_target, attention_case, conformance_generator)
    with poisoned_allocations():
        batch.write(backend, batch.key, batch.value, batch.metadata.slot_mapping)
        out = batch.attend(backend)
    check_attention(batch, out, attention_case.dtype, attention_case.kv_dtype)


def test_attention_graph_replay(conformance_target: ConformanceTarget, conformance_generator: torch.Generator) -> None:
    """A decode step captured with ``capture_graph`` and replayed on new inputs matches the reference."""
    capabilities = conformance_target.capabilities
    if not capabilities.can_capture_graphs:
        pytest.skip("graph capture not claimed")
    backend = conformance_target.backend
    dtype = capabilities.dtypes[0]
    case = AttentionCase("decode", "gqa", base_head_size(capabilities), base_block_size(capabilities), dtype, dtype)
    batch = build_case(conformance_target, case, conformance_generator)
    query, key, value = batch.query.clone(), batch.key.clone(), batch.value.clone()
    out = torch.empty_like(query)

    def step() -> None:
        backend.write_kv_cache(key, value, batch.kv_cache, batch.metadata.slot_mapping)
        out.copy_(backend.attention(query, key, value, batch.kv_cache, batch.metadata, batch.spec))

    replay = backend.capture_graph(step)
    # new inputs in the static buffers, then replay: the graph must read them, not the captured values
    new_query = torch.randn(query.shape, generator=conformance_generator).to(dtype)
    new_key = torch.randn(key.shape, generator=conformance_generator).to(dtype)
    new_value = torch.randn(value.shape, generator=conformance_generator).to(dtype)
    query.copy_(new_query)
    key.copy_(new_key)
    value.copy_(new_value)
    replay()
    backend.synchronize()
    batch.query = query
    for index in range(len(batch.requests)):  # every request is a decode: its last position is the new token
        batch.full_keys[index][-1] = new_key[index].to(case.kv_dtype).float().cpu()
        batch.full_values[index][-1] = new_value[index].to(case.kv_dtype).float().cpu()
    check_attention(batch, out, dtype, case.kv_dtype)


def test_decode_rows_of_one_sequence(conformance_target: ConformanceTarget, rows_dtype: torch.dtype,
                                     conformance_generator: torch.Generator) -> None:
    """Several decode rows of one sequence in one step, at consecutive positions (speculative decoding runs a
    request's last token and its drafts so, through decode graphs too): the step writes all their keys and
    values, then each row attends to its sequence up to its own position, as the float32 reference computes."""
    capabilities = conformance_target.capabilities
    head, block = base_head_size(capabilities), base_block_size(capabilities)
    requests = [RequestShape(block + 3, 4), RequestShape(2 * block - 1, 3), RequestShape(5, 1)]
    padding = num_padding_tokens(sum(r.query_len for r in requests), capabilities, False)
    if padding is None:
        pytest.skip("the rows exceed the largest claimed token bucket")
    case = AttentionCase("mixed", "gqa", head, block, rows_dtype, rows_dtype)
    batch = build_attention_batch(conformance_target.backend, conformance_target.device, requests, case.spec(),
                                  block, rows_dtype, rows_dtype, conformance_generator, num_padding_tokens=padding)
    backend = conformance_target.backend
    with poisoned_allocations():
        batch.write(backend, batch.key, batch.value, batch.metadata.slot_mapping)
        out = backend.attention(batch.query, batch.key, batch.value, batch.kv_cache,
                                as_decode_rows(batch.metadata), batch.spec)
    check_attention(batch, out, rows_dtype, rows_dtype)
