"""Gemma 2's attention soft cap: greedy parity with transformers is in ``test_hf_parity.py``; here a backend
that does not claim the soft cap is refused when the engine starts, naming what the model needs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pagedllm import LLM
from pagedllm.backends.cpu.backend import CpuBackend


def test_a_backend_without_the_soft_cap_is_refused(checkpoint_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir: Path = checkpoint_factory("gemma2")
    claimed = CpuBackend().capabilities()
    assert claimed.supports_logits_soft_cap
    monkeypatch.setattr(CpuBackend, "capabilities", lambda self: replace(claimed, supports_logits_soft_cap=False))
    refused = (r"backend 'cpu' does not support attention logit soft-capping, which Gemma2ForCausalLM needs "
               r"\(attn_logit_softcapping=2.0\)")
    with pytest.raises(ValueError, match=refused):
        LLM(str(model_dir), device="cpu", num_kv_blocks=16)
