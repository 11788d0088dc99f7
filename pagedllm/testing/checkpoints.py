"""Build tiny Hugging Face checkpoints locally (no hub): a BPE tokenizer trained on the Python standard
library's text and a randomly initialised model saved with ``save_pretrained`` as safetensors."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

# Small, architecture-specific configs: GQA everywhere, big enough to exercise several blocks per layer.
TINY_CONFIGS: dict[str, dict[str, object]] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, sliding_window=32, head_dim=16),
    # windows of 16 tokens on two of three layers
    "ministral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=16,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True),
    # head_dim 32, not hidden / heads = 16 (Qwen3 sets it apart); per-head q/k norms
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True),
    # Granite's four multipliers away from 1 (and a softmax scale away from head_dim ** -0.5 = 0.25); tied
    "granite": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                    embedding_multiplier=6.0, attention_multiplier=0.1, residual_multiplier=0.5, logits_scaling=4.0),
    # sliding-window layers of 16 tokens with their own rope theta beside full ones, head_dim 32 and a
    # query_pre_attn_scalar apart from it; tied
    "gemma3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=1024,
                   sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
    # Gemma 3's shape without q/k norms, one rope; attention scores unscaled (query_pre_attn_scalar 1) and
    # soft-capped at 2, so the cap binds on a tiny model (without it ~6% of greedy next tokens change; Gemma 2's
    # 50 would not bind), logits capped at 8
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=1, max_position_embeddings=1024,
                   sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   attn_logit_softcapping=2.0, final_logit_softcapping=8.0),
    # LongRoPE (Phi-3.5's long-context scaling) over 64 original positions: prompts below them take the short
    # factors, as transformers does
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, original_max_position_embeddings=64,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                  "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                  "long_factor": [2.0 + 0.5 * i for i in range(8)]}),
    "olmo2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024),
    # 8 experts, 2 per token; every layer sparse
    "mixtral": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, num_local_experts=8, num_experts_per_tok=2),
    # 8 experts, 3 per token, renormalized; layer 1 of 3 dense (mlp_only_layers)
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[1], tie_word_embeddings=False),
    # 8 experts, 2 per token (not renormalized) and a gated shared expert; layer 0 of 3 dense
    "qwen2_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0]),
}


def corpus_text(max_chars: int = 400_000) -> str:
    """Deterministic training text: the first standard-library modules' source, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars] + "\nnaïve café — 日本語 😀\n"


def build_tokenizer(directory: str | Path, vocab_size: int = 512, added_tokens: tuple[str, ...] = ()) -> object:
    """Train a byte-level BPE tokenizer and save it as a ``PreTrainedTokenizerFast`` in ``directory``;
    ``added_tokens`` become single (not special) tokens after the trained ones, as ``<think>`` is in Qwen3's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = corpus_text()
    tok.train_from_iterator((text[i : i + 4000] for i in range(0, len(text), 4000)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.add_tokens(list(added_tokens))
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(str(directory))
    return fast


def build_checkpoint(directory: str | Path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
                     vocab_size: int = 512, max_shard_size: str | None = None, added_tokens: tuple[str, ...] = (),
                     **overrides: object) -> Path:
    """Write a tiny random ``arch`` checkpoint (llama, mistral, ministral, qwen2, qwen3,
    granite, gemma2, gemma3, phi3, olmo2, mixtral, qwen3_moe or qwen2_moe) plus tokenizer
    (with ``added_tokens``: :func:`build_tokenizer`) to ``directory``.

    The weights are scaled up from transformers' default init so greedy continuations vary with the
    prompt (a near-uniform model would make every comparison trivially equal). Returns the directory.
    """
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory, vocab_size, added_tokens)
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                  "mixtral": transformers.MixtralConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
                  "qwen2_moe": transformers.Qwen2MoeConfig, "granite": transformers.GraniteConfig,
                  "gemma3": transformers.Gemma3TextConfig, "phi3": transformers.Phi3Config,
                  "gemma2": transformers.Gemma2Config,
                  "ministral": transformers.MinistralConfig, "olmo2": transformers.Olmo2Config}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
                 "mixtral": transformers.MixtralForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM,
                 "qwen2_moe": transformers.Qwen2MoeForCausalLM, "granite": transformers.GraniteForCausalLM,
                 "gemma3": transformers.Gemma3ForCausalLM, "phi3": transformers.Phi3ForCausalLM,
                 "gemma2": transformers.Gemma2ForCausalLM,
                 "ministral": transformers.MinistralForCausalLM, "olmo2": transformers.Olmo2ForCausalLM}[arch]
    kwargs = dict(TINY_CONFIGS[arch])
    kwargs.update(overrides)
    config = config_cls(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.mul_(8.0 if "embed" in name or "lm_head" in name else 2.0)
            elif "q_norm" in name or "k_norm" in name:  # q/k norms (Qwen3's per head, OLMo 2's whole): weights matter
                param.normal_(1.0, 0.3)
            elif "norm" in name and arch.startswith("gemma"):  # Gemma's norms scale by 1 + weight: offsets that matter
                param.normal_(0.0, 0.3)
            elif "norm" not in name:
                param.normal_(0.0, 0.2)
    model = model.to(dtype)
    save_kwargs: dict[str, object] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(directory), **save_kwargs)
    return directory


def write_checkpoint_variant(source: str | Path, target: str | Path, tensors: dict[str, torch.Tensor],
                             quantization_config: dict[str, object] | None = None) -> Path:
    """Write ``tensors`` as ``target/model.safetensors`` beside a copy of ``source``'s other files (config,
    tokenizer), with ``quantization_config`` put into config.json when given. Called by the quantized checkpoint
    writers for the quantized checkpoint and its dequantized twin. Returns ``target``."""
    import json
    import shutil

    from safetensors.torch import save_file

    target = Path(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    if quantization_config is not None:
        config = json.loads((target / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
