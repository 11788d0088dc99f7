"""The ``cpu`` backend's attention precision: float32 SDPA on float32 copies, or, for bf16 on CPUs that multiply
bf16 in hardware (AMX-BF16), SDPA on the bf16 inputs; both agree within bf16's rounding, and
``PAGEDLLM_CPU_ATTENTION_FP32=1`` keeps float32 everywhere."""

from __future__ import annotations

import pytest
import torch

from pagedllm.backends.cpu.backend import CpuBackend, bf16_attention_is_fast

make_batch = pytest.importorskip("tests.unit.test_cuda_kernels_interpreter").make_batch


@pytest.fixture
def float32_only(monkeypatch: pytest.MonkeyPatch):
    """The setting that keeps float32 attention, read afresh (the check is cached)."""
    monkeypatch.setenv("PAGEDLLM_CPU_ATTENTION_FP32", "1")
    bf16_attention_is_fast.cache_clear()
    yield
    monkeypatch.delenv("PAGEDLLM_CPU_ATTENTION_FP32")
    bf16_attention_is_fast.cache_clear()


def test_the_fp32_setting_turns_bf16_attention_off(float32_only: None) -> None:
    assert bf16_attention_is_fast() is False


def test_bf16_attention_agrees_with_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decodes of unlike lengths and a prefill over a cached prefix, with GQA, in bf16: this CPU's path (bf16 SDPA
    where AMX has it) against float32 attention, within bf16's rounding of the output."""
    batch = make_batch([1, 1, 1, 37], [40, 70, 5, 20], num_decodes=3, dtype=torch.bfloat16)
    backend = CpuBackend()

    def attend() -> torch.Tensor:
        return backend.attention(batch.query, batch.key, batch.value, batch.cache, batch.metadata, batch.spec).float()

    bf16_attention_is_fast.cache_clear()
    got = attend()
    monkeypatch.setenv("PAGEDLLM_CPU_ATTENTION_FP32", "1")
    bf16_attention_is_fast.cache_clear()
    try:
        want = attend()
    finally:
        monkeypatch.delenv("PAGEDLLM_CPU_ATTENTION_FP32")
        bf16_attention_is_fast.cache_clear()
    assert torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < 1e-2
    torch.testing.assert_close(got, want, atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_from_their_start_take_sdpas_causal_mask(dtype: torch.dtype) -> None:
    """Prefills with no cached context (of unlike lengths, so one is padded) use SDPA's own causal mask; their
    real rows equal the explicit mask's."""
    batch = make_batch([1, 1, 50, 23], [40, 70, 0, 0], num_decodes=2, dtype=dtype)
    backend = CpuBackend()
    plan = backend._plan_of(batch.metadata, batch.cache.shape[2])
    group = plan.prefills
    assert group is not None and group.from_start and not any(g.from_start for g in plan.decodes)
    causal = backend._attend(batch.query, group, batch.cache, batch.spec, 1.0)
    group.from_start = False
    masked = backend._attend(batch.query, group, batch.cache, batch.spec, 1.0)
    rows = group.valid.reshape(-1)
    torch.testing.assert_close(causal[rows].float(), masked[rows].float(), atol=1e-5 if dtype == torch.float32
                               else 2e-2, rtol=1e-5 if dtype == torch.float32 else 2e-2)
