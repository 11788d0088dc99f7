"""Tiny LoRA adapters for tests and benchmarks: random, non-zero updates of a model's projections, written as
PEFT saves them (``adapter_config.json``, ``adapter_model.safetensors``) without needing PEFT (the GPU image
lacks it) or the base weights (dummy-weight benchmarks have none), and the transformers + PEFT model that loads
the same files (the reference pagedllm's output is compared with)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")


def write_lora_adapter(base_dir: str | Path, directory: str | Path, targets: Sequence[str] = ALL_TARGETS,
                       r: int = 8, alpha: float = 16.0, seed: int = 0, use_rslora: bool = False,
                       magnitude: float = 3.0) -> Path:
    """Write a rank-``r`` adapter of ``targets`` for the model in ``base_dir`` (a checkpoint, or a ``config.json``
    directory for dummy weights: the shapes come from the transformers model built on the meta device) to
    ``directory``: for each ``nn.Linear`` ``<module>.<target>`` of weight ``[out, in]`` a ``lora_A`` ``[r, in]``
    and a ``lora_B`` ``[out, r]``, uniform within ``magnitude / sqrt(fan_in)`` (PEFT's
    ``init_lora_weights=False`` draws them within ``1 / sqrt(fan_in)``; tests triple that so the update changes
    greedy tokens). Returns ``directory``."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)

    def uniform(rows: int, cols: int) -> torch.Tensor:
        return (torch.rand(rows, cols, generator=generator) * 2 - 1) * (magnitude / math.sqrt(cols))

    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in targets:
            tensors[f"base_model.model.{name}.lora_A.weight"] = uniform(r, module.in_features)
            tensors[f"base_model.model.{name}.lora_B.weight"] = uniform(module.out_features, r)
    if not tensors:
        raise ValueError(f"no projection named {list(targets)} in the model at {base_dir}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir),
                      "r": r, "lora_alpha": alpha, "target_modules": list(targets), "use_rslora": use_rslora,
                      "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False}
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return directory


def build_lora_adapter(base_dir: str | Path, directory: str | Path, targets: Sequence[str] = ALL_TARGETS,
                       r: int = 8, alpha: float = 16.0, seed: int = 0, use_rslora: bool = False) -> object:
    """:func:`write_lora_adapter`, then the float32 transformers model with those files applied by PEFT (a
    ``peft.PeftModel``, in eval mode), so a test compares with PEFT's reading of the very same adapter."""
    import peft
    import transformers

    write_lora_adapter(base_dir, directory, targets, r, alpha, seed, use_rslora)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, str(directory)).eval()
