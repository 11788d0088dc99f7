"""What a request asks for (:class:`LoRARequest`, vLLM's) and what a PEFT adapter directory holds
(:class:`AdapterConfig`, read from its ``adapter_config.json``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ADAPTED_LAYERS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                  "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
"""Our projection -> the checkpoint projections that are its parts, in order."""
FUSED_TARGETS = ("qkv_proj", "gate_up_proj")
"""Fused projections an adapter may train whole (Phi-3's checkpoints fuse q|k|v and gate|up): one ``lora_A`` and
a ``lora_B`` over all the parts' rows."""
SUPPORTED_TARGETS = tuple(part for parts in ADAPTED_LAYERS.values() for part in parts) + FUSED_TARGETS
"""The projections an adapter may train (the Llama family's names and Phi-3's fused ones; Mixtral's w1/w3/w2 and
the experts are not)."""


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """An adapter for one request, as vLLM names it: ``lora_name`` (shown to clients), ``lora_int_id`` (a
    positive id, unique per adapter: requests with the same id share the adapter's loaded weights and prefix
    cache entries) and ``lora_path`` (a PEFT adapter directory: ``adapter_config.json`` and
    ``adapter_model.safetensors``)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be a positive integer, got {self.lora_int_id}")


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """The parts of a PEFT ``adapter_config.json`` the engine uses: the rank ``r``, the projections trained
    (``target_modules``, short names) and the ``scaling`` of the update (``lora_alpha / r``, or ``lora_alpha /
    sqrt(r)`` with ``use_rslora``)."""

    r: int
    target_modules: tuple[str, ...]
    scaling: float


@lru_cache(maxsize=64)
def read_adapter_config(path: str) -> AdapterConfig:
    """Read and check ``path/adapter_config.json``. Raises ValueError naming the problem: no such file, not a
    LoRA adapter, a target the engine cannot apply, DoRA, or bias training."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"LoRA adapter {path!r}: no adapter_config.json there (a PEFT adapter directory is needed)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {path!r}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise ValueError(f"LoRA adapter {path!r}: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {path!r}: trained biases (bias={config['bias']!r}) are not supported")
    if not (Path(path) / "adapter_model.safetensors").is_file():
        raise ValueError(f"LoRA adapter {path!r}: no adapter_model.safetensors there")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"LoRA adapter {path!r}: per-module ranks or alphas (rank_pattern, alpha_pattern) are not "
                         f"supported")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regular expression in PEFT: name the modules instead
        raise ValueError(f"LoRA adapter {path!r}: target_modules as a pattern ({targets!r}) is not supported; "
                         f"list the modules")
    short = tuple(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    unsupported = [t for t in short if t not in SUPPORTED_TARGETS]
    if unsupported:
        raise ValueError(f"LoRA adapter {path!r}: target modules {unsupported} are not supported (supported: "
                         f"{list(SUPPORTED_TARGETS)})")
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return AdapterConfig(r, short, scaling)


def check_adapter(lora_request: LoRARequest, max_rank: int) -> AdapterConfig:
    """The adapter's config (:func:`read_adapter_config`), checked against the engine's ``max_lora_rank``: a
    ValueError naming the adapter when its rank is above it. Called when an adapter is first given (the server's
    ``--lora-modules``, a request's ``lora_request``)."""
    adapter = read_adapter_config(lora_request.lora_path)
    if adapter.r > max_rank:
        raise ValueError(f"LoRA adapter {lora_request.lora_name!r} has rank {adapter.r}, above max_lora_rank "
                         f"{max_rank}")
    return adapter
