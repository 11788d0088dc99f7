"""Tiny PEFT LoRA adapters for tests: random, non-zero updates of a tiny checkpoint's projections, saved as PEFT
saves them (``adapter_config.json``, ``adapter_model.safetensors``), and the transformers + PEFT model that
applies them (the reference pagedllm's output is compared with)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_lora_adapter(base_dir: str | Path, directory: str | Path, targets: Sequence[str] = ALL_TARGETS,
                       r: int = 8, alpha: float = 16.0, seed: int = 0, use_rslora: bool = False) -> object:
    """Write a rank-``r`` adapter of ``targets`` for the checkpoint in ``base_dir`` to ``directory`` (both
    matrices random, scaled up so the update changes greedy tokens); returns the float32 transformers model
    with the adapter applied (a ``peft.PeftModel``)."""
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                             use_rslora=use_rslora)
    adapted = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.mul_(3.0)
    adapted.save_pretrained(str(directory))
    return adapted.eval()
