"""The Hugging Face transformers peer for the offline benchmarks: static batching with ``generate``."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pagedllm.bench.workloads import BenchRequest


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


def load_hf_model(model_dir: str, dtype: torch.dtype, device: torch.device, dummy: bool) -> torch.nn.Module:
    """The transformers model of ``model_dir`` (random weights from its config when ``dummy``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dummy:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
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


def run_hf(model: torch.nn.Module, requests: list[BenchRequest], device: torch.device, batch_size: int | None,
           sync: callable) -> HfResult:
    """Run every request in arrival order in static batches of ``batch_size``.

    ``batch_size=None`` finds the largest power of two up to 256 that does not run out of memory on the
    first batch, as a user tuning transformers would. Returns the wall time of the whole workload.
    """
    sizes = [batch_size] if batch_size else [256, 128, 64, 32, 16, 8, 4, 2, 1]
    for size in sizes:
        try:
            with torch.inference_mode():
                _generate_batch(model, requests[: min(size, 2)], device)  # warm-up
                sync()
                start = time.perf_counter()
                for i in range(0, len(requests), size):
                    _generate_batch(model, requests[i: i + size], device)
                sync()
            return HfResult(time.perf_counter() - start, size)
        except torch.OutOfMemoryError:
            release_device_memory(device)
            if size == sizes[-1]:
                raise
    raise RuntimeError("unreachable")


def weight_bytes(model_dir: str | Path, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in ``dtype`` (from its config, without loading it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * torch.empty(0, dtype=dtype).element_size()
