"""fp8 linear layers (``quantization="fp8"``): what they compute, what they store, what is refused."""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.core.config import EngineConfig
from pagedllm.entrypoints.engine_args import add_engine_args, engine_config_from_args
from tests.e2e.hf_reference import assert_greedy_matches_rounded_reference

MAX_TOKENS = 10


def test_names_and_options() -> None:
    assert EngineConfig(quantization="fp8").quantization == "fp8"
    with pytest.raises(ValueError, match=r"quantization must be None or one of fp8, fp8_block, w4a16, awq, gptq, "
                                         r"compressed-tensors; got 'int4'"):
        EngineConfig(quantization="int4")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args(["--quantization", "fp8"])).quantization == "fp8"
    assert engine_config_from_args(parser.parse_args([])).quantization is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "bitsandbytes"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q|k|v
def test_greedy_equals_transformers_with_fp8_projections(checkpoint_factory, arch: str) -> None:
    """Token for token what transformers generates when its projections see e4m3-rounded weights and
    inputs (the LM head left alone), under chunked prefill and prefix caching; the projections' weights
    are stored in e4m3, the embeddings and the LM head in the model dtype."""
    model_dir = checkpoint_factory(arch)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", quantization="fp8", block_size=4,
              max_num_batched_tokens=64, num_kv_blocks=256)
    model = llm.llm_engine.executor.worker.runner.model
    stored = {name: p.dtype for name, p in model.named_parameters()}
    assert stored["model.layers.0.self_attn.qkv_proj.weight"] == torch.float8_e4m3fn
    assert stored["model.layers.0.mlp.down_proj.weight"] == torch.float8_e4m3fn
    assert stored["model.embed_tokens.weight"] == torch.float32
    assert all(dtype == torch.float32 for name, dtype in stored.items() if "lm_head" in name or "norm" in name)
    assert_greedy_matches_rounded_reference(llm, model_dir, MAX_TOKENS, fp8_linear=True)


def test_loading_logs_what_fp8_stores(llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="pagedllm.core.loader"):
        LLM(str(llama_dir), device="cpu", quantization="fp8", num_kv_blocks=16)
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fp8: ")]
    assert len(messages) == 1 and "fp8: 8 linear layers stored in e4m3" in messages[0], caplog.text  # 2 layers x 4
    before, after = (float(v) for v in re.findall(r"([0-9.]+) MiB", messages[0]))
    assert after < before


def test_a_model_without_quantizable_layers_is_refused(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin's model whose linear layers are not marked ``quantizable`` cannot silently run unquantized."""
    from pagedllm.core.distributed.parallel_layers import RowParallelLinear
    from pagedllm.core.models.layers import MergedLinear

    monkeypatch.setattr(MergedLinear, "quantizable", False)
    monkeypatch.setattr(RowParallelLinear, "quantizable", False)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no linear layer marked quantizable"):
        LLM(str(llama_dir), device="cpu", quantization="fp8", num_kv_blocks=16)


def test_a_quantization_the_backend_does_not_claim_is_refused(llama_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    unclaimed = replace(CpuBackend().capabilities(), quantizations=())
    monkeypatch.setattr(CpuBackend, "capabilities", lambda self: unclaimed)
    with pytest.raises(ValueError, match=r"backend 'cpu' does not support quantization 'fp8'; supported: none"):
        LLM(str(llama_dir), device="cpu", quantization="fp8", num_kv_blocks=16)


FP8_INPUT_OPS = {"fp8": ("rms_norm_fp8", "add_rms_norm_fp8", "silu_and_mul_fp8", "linear_fp8_quantized", "linear_fp8"),
                 "fp8_block": ("rms_norm_fp8_groups", "add_rms_norm_fp8_groups", "silu_and_mul_fp8_groups",
                               "linear_fp8_block_quantized", "linear_fp8_block")}
"""scheme -> the backend ops its norms, activation and projections call: first norm, later norms, activation,
projection of a quantized input, projection quantizing its own (o_proj)."""


@pytest.mark.parametrize("quantization", ["fp8", "fp8_block"])
def test_norms_and_activation_quantize_the_fp8_projections_inputs(llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  quantization: str) -> None:
    """Each layer's norms and MLP activation hand its fp8 projections their inputs quantized as they take
    them — per token (``"fp8"``: ``rms_norm_fp8``/``add_rms_norm_fp8``/``silu_and_mul_fp8``, then
    ``linear_fp8_quantized``) or per token and group of 128 (``"fp8_block"``: the ``*_groups`` ops, then
    ``linear_fp8_block_quantized``); only the attention output is quantized inside its projection. That
    computes exactly what quantizing every input inside the projection does: the same logprobs, bit for
    bit, with the switches off."""
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", quantization=quantization, num_kv_blocks=64)
    model = llm.llm_engine.executor.worker.runner.model
    layers = list(model.model.layers)
    assert all(layer.input_layernorm.fp8_output == layer.post_attention_layernorm.fp8_output
               == layer.mlp.fp8_activation == quantization for layer in layers)
    assert model.model.norm.fp8_output is None  # before the LM head, which stays in the model dtype
    backend = llm.llm_engine.executor.worker.backend
    calls: dict[str, int] = {}

    def counting(name: str) -> object:
        method = getattr(backend, name)

        def counted(*args: object) -> object:
            calls[name] = calls.get(name, 0) + 1
            return method(*args)

        return counted

    first_norm, norm, activation, quantized, projection = FP8_INPUT_OPS[quantization]
    for name in FP8_INPUT_OPS[quantization]:
        monkeypatch.setattr(backend, name, counting(name))
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
    prompts = [[1, 2, 3, 4, 5], list(range(10, 40))]

    def run() -> list[object]:
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params, use_tqdm=False)]

    fused = run()
    steps = calls[first_norm]  # the first layer's input norm, once per forward
    assert steps > 0 and calls[norm] == steps * (2 * len(layers) - 1)
    assert calls[activation] == steps * len(layers) and calls[projection] == steps * len(layers)  # o_proj
    assert calls[quantized] == steps * 3 * len(layers)
    for layer in layers:
        layer.input_layernorm.fp8_output = layer.post_attention_layernorm.fp8_output = None
        layer.mlp.fp8_activation = None
    calls.clear()
    assert run() == fused and quantized not in calls
