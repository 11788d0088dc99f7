"""Greedy reference generations from Hugging Face transformers on the same checkpoint files."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_greedy(
    model_dir: Path, prompts_ids: list[list[int]], max_new_tokens: int, dtype: torch.dtype = torch.float32,
    top_logprobs: int = 0,
) -> list[tuple[list[int], list[dict[int, float]]]]:
    """Generate each prompt alone (no padding) with ``do_sample=False``; EOS is suppressed for exactly
    ``max_new_tokens`` tokens. Returns ``(token_ids, per-token top-k {id: logprob})`` per prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
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
