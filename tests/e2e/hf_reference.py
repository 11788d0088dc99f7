"""Greedy reference generations from Hugging Face transformers on the same checkpoint files."""

from __future__ import annotations

from pathlib import Path

import torch

from pagedllm.backends.kv_storage import to_cache_dtype


def _register_rounded_kv_attention(kv_dtype: torch.dtype) -> str:
    """Register with transformers an SDPA attention whose keys and values are first rounded to ``kv_dtype``
    (what a KV cache stored in that dtype gives back); return its ``attn_implementation`` name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, object]:
        rounded = [to_cache_dtype(t, kv_dtype).to(t.dtype) for t in (key, value)]
        return sdpa_attention_forward(module, query, *rounded, attention_mask, **kwargs)

    name = f"sdpa_kv_{str(kv_dtype).removeprefix('torch.')}"
    AttentionInterface.register(name, attention)
    return name


def hf_greedy(
    model_dir: Path, prompts_ids: list[list[int]], max_new_tokens: int, dtype: torch.dtype = torch.float32,
    top_logprobs: int = 0, kv_dtype: torch.dtype | None = None,
) -> list[tuple[list[int], list[dict[int, float]]]]:
    """Generate each prompt alone (no padding) with ``do_sample=False``; EOS is suppressed for exactly
    ``max_new_tokens`` tokens. ``kv_dtype``: attend over keys and values rounded to it, as a KV cache in
    that dtype stores them. Returns ``(token_ids, per-token top-k {id: logprob})`` per prompt."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": _register_rounded_kv_attention(kv_dtype)} if kv_dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **extra).eval()
    results = []
    with torch.inference_mode():
        for ids in prompts_ids:
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=model.config.pad_token_id)
            tokens = out.sequences[0, len(ids):].tolist()
            tops = []
            if top_logprobs:
                for step_logits in out.logits:
                    lp = torch.log_softmax(step_logits[0].float(), -1).topk(top_logprobs)
                    tops.append(dict(zip(lp.indices.tolist(), lp.values.tolist(), strict=True)))
            results.append((tokens, tops))
    return results
