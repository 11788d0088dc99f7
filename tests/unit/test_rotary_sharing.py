"""Every attention layer of a model shares one rotary cos|sin cache per layer type (rope parameters), and a
second model built from another config gets its own."""

from __future__ import annotations

from pagedllm import LLM


def test_layers_share_one_rotary_cache_per_layer_type(checkpoint_factory) -> None:
    llm = LLM(str(checkpoint_factory("gemma3")), device="cpu", dtype="float32")
    layers = llm.llm_engine.executor.worker.runner.model.model.layers
    sliding, full, sliding_again = (layer.self_attn.rotary_emb for layer in layers)
    assert sliding is sliding_again and sliding is not full
    assert not sliding.cos_sin_cache.equal(full.cos_sin_cache)  # rope theta 1e4 against 1e6
    other = LLM(str(checkpoint_factory("llama")), device="cpu", dtype="float32")
    llama_layers = other.llm_engine.executor.worker.runner.model.model.layers
    assert llama_layers[0].self_attn.rotary_emb is llama_layers[1].self_attn.rotary_emb
    assert llama_layers[0].self_attn.rotary_emb is not sliding
