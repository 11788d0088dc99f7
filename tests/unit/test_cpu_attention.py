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
