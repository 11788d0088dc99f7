"""The Hugging Face transformers peer for the offline benchmarks: static batching with ``generate``."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pagedllm.bench.workloads import BenchRequest
from pagedllm.core.loader import fill_dummy_weights

if TYPE_CHECKING:
    from pagedllm.core.config import ModelConfig


@dataclass(slots=True)
class HfResult:
    """Wall time of the whole workload and the batch size used."""

    elapsed_s: float
    batch_size: int


def release_device_memory(device: torch.device) -> None:
    """Return cached allocator memory after an engine is dropped (so the peer can use it)."""
    gc.collect()
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "empty_cache"):
        module.empty_cache()


def load_hf_model(model_dir: str, dtype: torch.dtype, device: torch.device, dummy: bool,
                  dummy_init: str = "transformers", lora_path: str | None = None) -> torch.nn.Module:
    """The transformers model of ``model_dir``, in ``dtype`` on ``device``. With ``dummy``, random weights from its
    config: transformers' own initialization (``dummy_init="transformers"``: normal linear weights, norm weights
    of one) or pagedllm's ``load_format="dummy"`` fill (``"pagedllm"``: every parameter uniform in [-0.01, 0.01],
    so both engines multiply matrices of the same distribution). With ``lora_path``, the PEFT adapter there
    applied by PEFT, unmerged (its products run beside the base layer's, as pagedllm runs them), in ``dtype``;
    a RuntimeError says so when PEFT is not installed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dummy:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if dummy_init == "pagedllm":
            fill_dummy_weights(model, device, seed=None)
        elif dummy_init != "transformers":
            raise ValueError(f"unknown dummy_init {dummy_init!r}: 'transformers' or 'pagedllm'")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    if lora_path is not None:
        try:
            import peft
        except ImportError as exc:
            raise RuntimeError("the transformers peer applies --lora-path through PEFT, which is not installed "
                               "(pip install peft), or run --backend pagedllm alone") from exc
        model = peft.PeftModel.from_pretrained(model, lora_path, autocast_adapter_dtype=False).to(device, dtype)
    return model.eval()


def _generate_batch(model: torch.nn.Module, batch: list[BenchRequest], device: torch.device) -> None:
    """Left-padded static batch; every row generates the batch's longest output (EOS suppressed)."""
    max_in = max(len(r.prompt_token_ids) for r in batch)
    max_out = max(r.output_len for r in batch)
    pad = 0
    ids = torch.full((len(batch), max_in), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), max_in), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r.prompt_token_ids)
        ids[i, max_in - n:] = torch.tensor(r.prompt_token_ids)
        mask[i, max_in - n:] = 1
    model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                   max_new_tokens=max_out, min_new_tokens=max_out, pad_token_id=pad)


def candidate_batch_sizes(num_requests: int, batch_size: int | None) -> list[int]:
    """The static batch sizes :func:`run_hf` tries, in order: ``[batch_size]`` when given, else the powers of
    two from the smallest that holds all ``num_requests`` down to 1 (the first that fits is used)."""
    if batch_size:
        return [batch_size]
    largest = 1 << max(num_requests - 1, 0).bit_length()
    return [largest >> i for i in range(largest.bit_length())]


def kv_bytes_per_token(model_config: ModelConfig) -> int:
    """Bytes transformers' KV cache holds per token of one row: K and V of every layer, in the model's dtype."""
    return (2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim
            * model_config.dtype.itemsize)


def largest_batch_tokens(requests: list[BenchRequest], size: int) -> int:
    """The KV cache of the largest static batch of ``size``, in tokens: its rows padded to the batch's longest
    prompt plus its longest output."""
    return max(
        len(batch) * (max(len(r.prompt_token_ids) for r in batch) + max(r.output_len for r in batch))
        for batch in (requests[i: i + size] for i in range(0, len(requests), size))
    )


def run_hf(model: torch.nn.Module, requests: list[BenchRequest], device: torch.device, batch_size: int | None,
           sync: Callable[[], object], kv_budget_tokens: int | None = None) -> HfResult:
    """Run every request in arrival order in static batches of ``batch_size``.

    ``batch_size=None`` uses the largest batch that fits: the sizes of :func:`candidate_batch_sizes`, largest
    first, less those whose KV cache alone (:func:`largest_batch_tokens`) would exceed ``kv_budget_tokens``
    (what the free device memory holds; None: no such check), each abandoned when its first batch runs out of
    device memory. The check up front matters for long outputs: the cache grows with every token, so running
    out of memory could otherwise come minutes into a batch. Only the run at the size that fits is timed.
    Returns the wall time of the whole workload and that size.
    """
    sizes = candidate_batch_sizes(len(requests), batch_size)
    if batch_size is None and kv_budget_tokens is not None:
        sizes = [s for s in sizes if largest_batch_tokens(requests, s) <= kv_budget_tokens] or [1]
    for size in sizes:
        try:
            return HfResult(_timed_run(model, requests, device, size, sync), size)
        except torch.OutOfMemoryError:
            if size == sizes[-1]:
                raise
        # out of the except block: the failed attempt's frames (and their tensors) are gone
        release_device_memory(device)
    raise RuntimeError("unreachable")


def _timed_run(model: torch.nn.Module, requests: list[BenchRequest], device: torch.device, size: int,
               sync: Callable[[], object]) -> float:
    """Seconds to run ``requests`` in static batches of ``size``, after a warm-up batch of two."""
    with torch.inference_mode():
        _generate_batch(model, requests[: min(size, 2)], device)
        sync()
        start = time.perf_counter()
        for i in range(0, len(requests), size):
            _generate_batch(model, requests[i: i + size], device)
        sync()
    return time.perf_counter() - start


def weight_bytes(model_dir: str | Path, dtype: torch.dtype, quantization: str | None = None,
                 group_size: int = 128) -> int:
    """Bytes of the model's parameters in ``dtype`` (from its config, without loading it); with
    ``quantization="fp8"`` / ``"fp8_block"``, as pagedllm stores them: the projections (every ``nn.Linear`` but
    the LM head) at one byte per weight plus a float32 scale per output row / per 128 x 128 tile, the rest in
    ``dtype``; with ``"w4a16"`` at half a byte per weight plus a float32 scale and a uint8 zero point per
    ``group_size`` weights of a row. A mixture of experts' stacked expert weights (``experts.*``, ``[num_experts,
    ...]``; in ``dtype`` under any quantization) count at ``num_experts_per_tok / num_experts``: what a one-token
    step reads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pagedllm.backends.fp8_linear import block_scale_shape

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    size = torch.empty(0, dtype=dtype).element_size()
    total = sum(p.numel() for p in model.parameters()) * size
    top_k = getattr(config, "num_experts_per_tok", None)
    for name, param in model.named_parameters():
        if top_k and ".experts." in name and param.dim() == 3:  # [num_experts, out, in]: top_k of them are read
            total -= param.numel() * size * (param.shape[0] - top_k) // param.shape[0]
    if quantization is not None:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                rows, cols = module.weight.shape
                if quantization == "w4a16":
                    total -= rows * cols * size - rows * cols // 2 - 5 * rows * -(-cols // group_size)
                    continue
                scales = math.prod(block_scale_shape(rows, cols)) if quantization == "fp8_block" else rows
                total -= rows * cols * (size - 1) - 4 * scales
    return total
