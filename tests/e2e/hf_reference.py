"""Greedy reference generations from Hugging Face transformers on the same checkpoint files."""

from __future__ import annotations

from pathlib import Path

import torch

from pagedllm.backends.fp8_linear import (
    dequantize_blocks,
    dequantize_groups,
    quantize_blocks,
    quantize_groups,
    quantize_rows,
    quantize_with_scale,
)
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


def _fake_quantize_fp8(model: torch.nn.Module, weights: bool = True, block: bool = False,
                       input_scales: dict[str, float] | None = None) -> None:
    """Make every ``nn.Linear`` of ``model`` but the LM head compute what an fp8 linear layer computes: its
    weight replaced by the dequantized e4m3 rows (with ``block``: tiles; unless ``weights`` is False: they are
    dequantized e4m3 already), its input by the dequantized per-token (``block``: per-group; with
    ``input_scales``, module name -> static scale: with that scale) e4m3 values."""

    def quantize_input(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        rows = x.reshape(-1, x.shape[-1])
        if block:
            values = dequantize_groups(*quantize_groups(rows))
        else:
            static = getattr(module, "static_input_scale", None)
            q, scale = quantize_rows(rows) if static is None else quantize_with_scale(rows, torch.tensor([static]))
            values = q.float() * scale[:, None]
        return (values.to(x.dtype).reshape(x.shape), *args[1:])

    for name, module in model.named_modules():
        if input_scales is not None and name in input_scales:
            module.static_input_scale = input_scales[name]
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            if weights:
                if block:
                    module.weight.data = dequantize_blocks(*quantize_blocks(module.weight.data)).to(module.weight.dtype)
                else:
                    q, scale = quantize_rows(module.weight.data)
                    module.weight.data = (q.float() * scale[:, None]).to(module.weight.dtype)
            module.register_forward_pre_hook(quantize_input)


def hf_greedy(
    model_dir: Path, prompts_ids: list[list[int]], max_new_tokens: int, dtype: torch.dtype = torch.float32,
    top_logprobs: int = 0, kv_dtype: torch.dtype | None = None, fp8_linear: bool = False,
    fp8_weights_stored: bool = False, fp8_block: bool = False, fp8_input_scales: dict[str, float] | None = None,
    load_kwargs: dict[str, object] | None = None,
) -> list[tuple[list[int], list[dict[int, float]]]]:
    """Generate each prompt alone (no padding) with ``do_sample=False``; EOS is suppressed for exactly
    ``max_new_tokens`` tokens. ``kv_dtype``: attend over keys and values rounded to it, as a KV cache in
    that dtype stores them. ``fp8_linear``: the projections compute as ``quantization="fp8"`` defines them
    (see :func:`_fake_quantize_fp8`); with ``fp8_weights_stored`` their weights are an fp8 checkpoint's,
    dequantized (``write_fp8_checkpoint``'s twin), and only their inputs are rounded; with ``fp8_block`` as
    ``quantization="fp8_block"`` defines them; ``fp8_input_scales`` (module name -> scale): inputs rounded with
    those static scales; ``load_kwargs``: more arguments of ``from_pretrained``. Returns ``(token_ids,
    per-token top-k {id: logprob})`` per prompt."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": _register_rounded_kv_attention(kv_dtype)} if kv_dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **extra, **(load_kwargs or {})).eval()
    if fp8_linear:
        _fake_quantize_fp8(model, weights=not fp8_weights_stored, block=fp8_block, input_scales=fp8_input_scales)
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


def merged_input_scales(fp8_dir: Path) -> dict[str, float]:
    """The static input scales of an fp8 checkpoint by transformers module name, each merged projection's
    parts (q, k, v; gate, up) given the largest of their scales, as pagedllm loads them."""
    from safetensors.torch import load_file

    scales = {name.removesuffix(".input_scale"): float(t.float().max())
              for name, t in load_file(str(fp8_dir / "model.safetensors")).items() if name.endswith(".input_scale")}
    groups = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}

    def group(name: str) -> str:
        prefix, _, last = name.rpartition(".")
        return f"{prefix}.{groups.get(last, last)}"

    largest: dict[str, float] = {}
    for name, scale in scales.items():
        largest[group(name)] = max(largest.get(group(name), 0.0), scale)
    return {name: largest[group(name)] for name in scales}


ROUNDED_LOGPROB_GAP = 1e-3
"""How far a top logprob may be from the reference that rounds as pagedllm does, for all but one in twenty of
them. Nearly all are within 5e-5, but the two sum their float32 products in different orders, and which order a
CPU's kernels take depends on its instruction set: an input that lands next to an e4m3 rounding boundary can
round to the neighbouring value in one and not the other. That moved one logprob of the tile-scaled checkpoint's
run by 2.8e-4 on one AVX-512 machine, by 3.8e-3 on another (avx512_fp16), and by under 1e-4 on an AVX2 one."""

ROUNDING_FLIP_GAP = 2e-2
"""The bound on every top logprob's distance to the rounded reference: what one input rounded to its neighbouring
e4m3 value can move (the e4m3 step is 1/8 to 1/16 of a value)."""


def assert_greedy_matches_rounded_reference(llm: object, model_dir: Path, max_tokens: int, **rounding: object) -> None:
    """Generate ``mixed_prompts`` (chunked, sharing prefixes) with ``llm`` and check, against
    :func:`hf_greedy` with ``rounding`` (``kv_dtype=...`` or ``fp8_linear=True``: transformers rounding as
    pagedllm does): the same tokens; top logprobs within :data:`ROUNDED_LOGPROB_GAP` of that reference's (all but
    one in twenty; every one within :data:`ROUNDING_FLIP_GAP`) and some more than 5e-3 from the unrounded
    model's (the rounding is real and measured); prefix-cache hits; every KV block back in the pool."""
    from pagedllm import SamplingParams
    from tests.conftest import assert_pool_free
    from tests.e2e.test_hf_parity import mixed_prompts

    prompts = mixed_prompts(llm.get_tokenizer())
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, logprobs=5)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    expected = hf_greedy(model_dir, prompts, max_tokens, top_logprobs=5, **rounding)
    plain = hf_greedy(model_dir, prompts, max_tokens, top_logprobs=5)
    gaps_to_rounded, gap_to_plain = [], 0.0
    for prompt, out, (ref, ref_tops), (_, plain_tops) in zip(prompts, outputs, expected, plain, strict=True):
        assert out.outputs[0].token_ids == ref, f"prompt of {len(prompt)} tokens diverged"
        for ours, theirs, unrounded in zip(out.outputs[0].logprobs, ref_tops, plain_tops, strict=True):
            token = max(theirs, key=theirs.get)
            gaps_to_rounded.append(abs(ours[token].logprob - theirs[token]))
            gap_to_plain = max(gap_to_plain, abs(ours[token].logprob - unrounded.get(token, -float("inf"))))
    beyond = [gap for gap in gaps_to_rounded if gap >= ROUNDED_LOGPROB_GAP]
    assert len(beyond) * 20 <= len(gaps_to_rounded) and max(gaps_to_rounded) < ROUNDING_FLIP_GAP, beyond
    assert gap_to_plain > 5e-3, gap_to_plain
    assert llm.llm_engine.stats().prefix_cache_hit_tokens > 0
    assert_pool_free(llm)


def hf_prompt_logprobs(model_dir: Path, prompts_ids: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt, ``log_softmax`` of transformers' float32 logits at every position: ``[len(prompt), vocab]``
    (row ``p`` is the distribution of token ``p + 1``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1) for ids in prompts_ids]
