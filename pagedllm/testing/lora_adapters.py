"""Tiny LoRA adapters for tests: random, non-zero updates of a tiny checkpoint's projections, written as PEFT
saves them (``adapter_config.json``, ``adapter_model.safetensors``) without needing PEFT (the GPU image lacks
it), and the transformers + PEFT model that loads the same files (the reference pagedllm's output is compared
with)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_lora_adapter(base_dir: str | Path, directory: str | Path, targets: Sequence[str] = ALL_TARGETS,
                       r: int = 8, alpha: float = 16.0, seed: int = 0, use_rslora: bool = False) -> Path:
    """Write a rank-``r`` adapter of ``targets`` for the checkpoint in ``base_dir`` to ``directory``: for each
    ``<module>.<target>.weight`` of shape ``[out, in]`` a ``lora_A`` ``[r, in]`` and a ``lora_B`` ``[out, r]``,
    both drawn as PEFT's ``init_lora_weights=False`` draws them (uniform within ``1/sqrt(fan_in)``) and tripled
    so the update changes greedy tokens. Returns ``directory``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)

    def uniform(rows: int, cols: int) -> torch.Tensor:
        bound = 3.0 / math.sqrt(cols)
        return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound

    tensors: dict[str, torch.Tensor] = {}
    for weights in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            for key in sorted(f.keys()):
                module, _, leaf = key.rpartition(".")
                if leaf != "weight" or module.rpartition(".")[2] not in targets:
                    continue
                out_features, in_features = f.get_slice(key).get_shape()
                tensors[f"base_model.model.{module}.lora_A.weight"] = uniform(r, in_features)
                tensors[f"base_model.model.{module}.lora_B.weight"] = uniform(out_features, r)
    if not tensors:
        raise ValueError(f"no projection named {list(targets)} in the checkpoint at {base_dir}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir), "r": r,
              "lora_alpha": alpha, "target_modules": list(targets), "use_rslora": use_rslora, "bias": "none",
              "lora_dropout": 0.0, "fan_in_fan_out": False}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
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
