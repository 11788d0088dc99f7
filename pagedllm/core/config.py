"""Engine configuration: what the user asks for (:class:`EngineConfig`) and what the model is
(:class:`ModelConfig`, read once from the checkpoint directory)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pagedllm.core.checkpoint_quantization import (
    CheckpointFp8,
    checkpoint_fp8,
    checkpoint_kv_cache_scales,
    quantization_config,
)
from pagedllm.core.reasoning import REASONING_TAGS
from pagedllm.core.spec_decode import SpeculativeConfig
from pagedllm.core.w4a16_loading import W4A16Format, checkpoint_w4a16

if TYPE_CHECKING:
    from pagedllm.backends.interface import BackendCapabilities

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# The KV cache's storage formats by vLLM's names; "auto" stores the model dtype. 8-bit floats hold half the
# bytes of bf16/fp16 (twice the tokens in the same pool, half the bytes read per decode), rounded to nearest
# and saturated at the format's largest finite value on store, divided by the checkpoint's per-layer KV-cache
# scales where it brings them (else scale 1.0, vLLM's default).
KV_CACHE_DTYPES: dict[str, torch.dtype] = {
    **_DTYPES,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

QUANTIZATIONS = ("fp8", "fp8_block", "w4a16")
"""The schemes of quantized linear layers (``EngineConfig.quantization``, ``BackendCapabilities.quantizations``):
``fp8`` (vLLM's online fp8), e4m3 weights with a scale per output row and inputs with a scale per token;
``fp8_block``, e4m3 weights with a scale per 128 x 128 tile and inputs with a scale per token and 128 features
(DeepSeek-V3's and Qwen3-FP8's scheme), see ``pagedllm.backends.fp8_linear``; ``w4a16``, 4-bit weights in groups
with scales and zero points, inputs in the model dtype (AWQ, GPTQ and compressed-tensors' ``pack-quantized``
checkpoints, or online), see ``pagedllm.backends.w4a16_linear``."""

W4A16_NAMES = ("awq", "gptq", "compressed-tensors")
"""vLLM's names for 4-bit checkpoints, which ``EngineConfig.quantization`` also accepts for one stored in
``w4a16``."""


SCHEDULING_POLICIES = ("fcfs", "priority")
"""``EngineConfig.scheduling_policy`` values (vLLM's): arrival order, or each request's priority."""


def check_choice(name: str, value: object, choices: Sequence[str], optional: bool = False) -> None:
    """Raise ValueError (``"<name> must be [None or ]one of ...; got ..."``) unless ``value`` is one of ``choices``
    (or None, when ``optional``)."""
    if (value is None and optional) or value in choices:
        return
    raise ValueError(f"{name} must be {'None or ' if optional else ''}one of {', '.join(choices)}; got {value!r}")


@dataclass(slots=True)
class EngineConfig:
    """Everything ``LLM(...)``, ``pagedllm serve`` and ``pagedllm generate`` accept (vLLM's names).

    ``model=None`` selects the built-in demo model. ``kv_cache_dtype`` stores the KV cache in the model
    dtype (``"auto"``) or another format the backend claims (``"fp8"``: see :data:`KV_CACHE_DTYPES`).
    ``quantization="fp8"`` stores the projections' weights in e4m3 with per-row scales once loaded and runs
    them as fp8 products (vLLM's online ``fp8``; the embeddings and LM head stay in ``dtype``; see
    ``pagedllm.backends.fp8_linear``), where the backend claims it; ``"fp8_block"`` likewise with tile scales. A
    checkpoint stored in fp8 (see ``pagedllm.core.checkpoint_quantization``) runs in its scheme whether this
    is set or not (``"fp8"`` is accepted for a checkpoint in ``"fp8_block"``, as vLLM's ``fp8`` method covers
    both).
    ``num_kv_blocks`` sets the KV pool size in blocks (like vLLM's ``num_gpu_blocks_override``); else
    ``kv_cache_memory_bytes`` sizes it in bytes; else the backend's budget for ``gpu_memory_utilization``
    is used. ``async_scheduling`` schedules and launches
    each step before the previous one's tokens are read back, so host work overlaps the device (with tensor
    parallelism, ``mp`` executor only; a request that stops runs one token more, discarded); None (the
    default) turns it on where it pays: see :func:`resolve_async_scheduling`. ``scheduling_policy``: ``"fcfs"``
    (arrival order) or ``"priority"`` (each request's ``priority``, lower first, then arrival; the lowest is
    preempted first), as vLLM's. ``enable_lora`` lets requests name a PEFT LoRA adapter
    (``pagedllm.core.lora``): up to ``max_loras`` adapters run at once, each of rank up to ``max_lora_rank``.
    ``reasoning_parser`` (``"deepseek_r1"`` or ``"qwen3"``: ``pagedllm.core.reasoning``) names a reasoning model's
    thinking markup: a structured output then applies to the answer after the thinking, and the server splits
    replies' thinking from their answers. ``speculative_config`` (vLLM's dict, e.g. ``{"method": "ngram",
    "num_speculative_tokens": 4}``: ``pagedllm.core.spec_decode``) turns on speculative decoding by prompt
    lookup (synchronous scheduling only).
    """

    model: str | None = None
    tokenizer: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    load_format: str = "auto"
    seed: int | None = 0
    block_size: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    max_logprobs: int = 20
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"
    async_scheduling: bool | None = None
    scheduling_policy: str = "fcfs"
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    reasoning_parser: str | None = None
    speculative_config: dict[str, Any] | None = None
    served_model_name: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, ("auto", *_DTYPES))
        check_choice("kv_cache_dtype", self.kv_cache_dtype, ("auto", *KV_CACHE_DTYPES))
        check_choice("quantization", self.quantization, (*QUANTIZATIONS, *W4A16_NAMES), optional=True)
        check_choice("load_format", self.load_format, LOAD_FORMATS)
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        for name in ("max_num_seqs", "block_size", "max_model_len", "max_num_batched_tokens", "kv_cache_memory_bytes",
                     "num_kv_blocks", "max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        check_choice("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        check_choice("reasoning_parser", self.reasoning_parser, tuple(REASONING_TAGS), optional=True)
        if self.speculative_config is not None:
            SpeculativeConfig.from_dict(self.speculative_config)
            if self.async_scheduling:
                raise ValueError("speculative_config needs synchronous scheduling (a step's accepted drafts decide "
                                 "the next step's input): leave async_scheduling off")
        if self.async_scheduling and not self.can_schedule_asynchronously():
            raise ValueError("async_scheduling with tensor parallelism needs the mp executor (rank 0 on the "
                             "driver's device, where the sampled tokens are)")

    def can_schedule_asynchronously(self) -> bool:
        """False for tensor parallelism through Ray: only the ``mp`` executor keeps rank 0 on the driver's
        device, where the sampled tokens the next step reads are."""
        return self.tensor_parallel_size == 1 or self.distributed_executor_backend == "mp"

    def resolved_model(self) -> str:
        """The checkpoint directory: ``model``, or the built-in demo model when it is None."""
        if self.model is not None:
            return self.model
        from pagedllm.demo import demo_model_path

        return demo_model_path()


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the KV cache is stored in: ``model_dtype`` for ``"auto"``, else the named one of
    :data:`KV_CACHE_DTYPES` (``"fp8"`` is ``torch.float8_e4m3fn``)."""
    return model_dtype if kv_cache_dtype == "auto" else KV_CACHE_DTYPES[kv_cache_dtype]


def resolve_scheduler_limits(config: EngineConfig, capabilities: BackendCapabilities) -> tuple[int, int]:
    """``(max_num_seqs, max_num_batched_tokens)`` as the engine runs them: the config's values when set;
    by default the backend's (:attr:`BackendCapabilities.default_max_num_seqs` and
    ``default_max_num_batched_tokens``, the latter ``max(2048, max_num_seqs)`` when the backend names none).
    Static-shape and no-chunked-prefill adjustments to the budget are the engine's."""
    max_num_seqs = config.max_num_seqs or capabilities.default_max_num_seqs
    budget = (config.max_num_batched_tokens or capabilities.default_max_num_batched_tokens
              or max(2048, max_num_seqs))
    return max_num_seqs, budget


def resolve_async_scheduling(config: EngineConfig, runs_asynchronously: bool) -> bool:
    """Whether the engine schedules asynchronously: ``config.async_scheduling`` when set; by default (None)
    on when the backend ``runs_asynchronously`` (its device runs apart from the host, so launching the
    next step early overlaps them; vLLM's default too) and the executor allows it, off otherwise."""
    if config.async_scheduling is not None:
        return config.async_scheduling
    return runs_asynchronously and config.can_schedule_asynchronously() and config.speculative_config is None


@dataclass(slots=True)
class ModelConfig:
    """What the checkpoint says: architecture, Hugging Face config, dtype, lengths, EOS ids, quantization."""

    path: str
    hf_config: object
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: frozenset[int]
    generation_defaults: dict[str, object]
    quantization: str | None = None
    """What the checkpoint's weights are stored in (``quantization_config``; see
    ``pagedllm.core.checkpoint_quantization``, ``pagedllm.core.w4a16_loading``): ``fp8``, ``fp8_block``,
    ``w4a16`` or None."""
    w4a16: W4A16Format | None = None
    """The 4-bit format of a ``w4a16`` checkpoint (AWQ, GPTQ or compressed-tensors; group size, zero points,
    act-order), else None."""
    input_scales: str | None = None
    """How those fp8 projections scale their inputs: ``"dynamic"``, ``"static"`` (a calibrated ``input_scale``
    per layer in the checkpoint) or None (unquantized)."""
    kv_cache_scales: bool = False
    """Whether the checkpoint brings per-layer KV-cache scales (``k_scale``/``v_scale``; the ``-FP8-KV``
    checkpoints): an fp8 KV cache stores keys and values divided by them; a cache in the model dtype needs none
    and skips them (``checkpoint_kv_cache_scales``)."""

    @property
    def num_layers(self) -> int:
        """Decoder layers."""
        return int(self.hf_config.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        """KV heads of one layer."""
        cfg = self.hf_config
        return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)

    @property
    def head_dim(self) -> int:
        """Attention head size."""
        cfg = self.hf_config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream (the row-parallel layers' all-reduce width)."""
        return int(self.hf_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size (rows of the LM head)."""
        return int(self.hf_config.vocab_size)


def load_model_config(path: str, dtype: str, max_model_len: int | None) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json`` if present) from a local directory.

    Raises FileNotFoundError naming the missing file, ValueError for a config without architectures, a
    ``max_model_len`` beyond the model's positions or a ``quantization_config`` pagedllm does not load.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {path!r} does not exist (no model hub here: give a local path)")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: a Hugging Face checkpoint needs config.json")
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"{config_file}: cannot read the model config: {exc}") from exc
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ValueError(f"{config_file} names no 'architectures'; cannot pick a model class")
    # a multimodal checkpoint (e.g. Gemma 3 from 4B up) is served by its text stack: the model is built from the
    # text config, while dtype, EOS ids, generation defaults and quantization stay the top-level config's
    model_hf_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    model_positions = int(getattr(model_hf_config, "max_position_embeddings", 2048))
    if max_model_len is None:
        max_model_len = model_positions
    elif max_model_len > model_positions:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {model_positions}"
        )
    eos_ids, defaults = _generation_config(directory, hf_config)
    w4a16 = checkpoint_w4a16(quantization_config(hf_config))
    stored = CheckpointFp8("w4a16", None) if w4a16 is not None else checkpoint_fp8(hf_config)
    return ModelConfig(
        path=str(directory),
        hf_config=model_hf_config,
        architecture=architectures[0],
        dtype=_resolve_dtype(dtype, hf_config),
        max_model_len=max_model_len,
        eos_token_ids=eos_ids,
        generation_defaults=defaults,
        quantization=stored.quantization,
        w4a16=w4a16,
        input_scales=stored.input_scales,
        kv_cache_scales=checkpoint_kv_cache_scales(hf_config),
    )


def _resolve_dtype(dtype: str, hf_config: object) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype)
    return config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32


def _as_ids(value: object) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}  # type: ignore[union-attr]


def _generation_config(directory: Path, hf_config: object) -> tuple[frozenset[int], dict[str, object]]:
    eos = _as_ids(getattr(hf_config, "eos_token_id", None))
    defaults: dict[str, object] = {}
    gen_file = directory / "generation_config.json"
    if gen_file.is_file():
        with open(gen_file) as f:
            gen = json.load(f)
        eos |= _as_ids(gen.get("eos_token_id"))
        if gen.get("do_sample", False):
            for key in ("temperature", "top_p", "top_k", "min_p"):
                if key in gen:
                    defaults[key] = gen[key]
        else:
            defaults["temperature"] = 0.0
        if "repetition_penalty" in gen:
            defaults["repetition_penalty"] = gen["repetition_penalty"]
    return frozenset(eos), defaults

