"""4-bit checkpoints (AWQ, GPTQ, compressed-tensors ``pack-quantized``) loaded as they are and computing, token for
token, what transformers computes on their dequantized weights; ``quantization="w4a16"`` online; dummy weights for
speed runs; and what is refused, with why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.testing.w4a16_checkpoints import SCHEMES, write_w4a16_checkpoint
from tests.conftest import assert_pool_free
from tests.e2e.hf_reference import hf_greedy

MAX_TOKENS = 10
ENGINE = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=64, num_kv_blocks=256)
PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 40)), [100, 200, 300], [*range(10, 30), 7, 8]]
LOGPROB_GAP = 1e-4  # float32 products of the same dequantized weights, summed in another order


@pytest.fixture(scope="module")
def w4a16_checkpoint(checkpoint_factory, tmp_path_factory):
    """``w4a16_checkpoint(arch, scheme)``: ``(4-bit dir, dequantized twin dir)`` of the tiny float32 checkpoint."""
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(arch: str, scheme: str) -> tuple[Path, Path]:
        if (arch, scheme) not in cache:
            cache[arch, scheme] = write_w4a16_checkpoint(checkpoint_factory(arch), tmp_path_factory.mktemp(scheme),
                                                         scheme)
        return cache[arch, scheme]

    return get


def _model(llm: LLM) -> torch.nn.Module:
    return llm.llm_engine.executor.worker.runner.model


def assert_matches_transformers(llm: LLM, dequantized: Path, unquantized: Path | None = None,
                                load_kwargs: dict[str, object] | None = None) -> None:
    """Greedy tokens of :data:`PROMPTS` (prefix-sharing, chunked) equal transformers' on the dequantized weights,
    top logprobs within :data:`LOGPROB_GAP`; with ``unquantized``, some logprob is far from that model's (the
    4-bit weights are really used); every KV block back in the pool. ``load_kwargs``: for transformers'
    ``from_pretrained``."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, logprobs=3)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    expected = hf_greedy(dequantized, PROMPTS, MAX_TOKENS, top_logprobs=3, load_kwargs=load_kwargs)
    for prompt, out, (tokens, tops) in zip(PROMPTS, outputs, expected, strict=True):
        assert out.outputs[0].token_ids == tokens, f"prompt of {len(prompt)} tokens diverged"
        for ours, theirs in zip(out.outputs[0].logprobs, tops, strict=True):
            for token, logprob in theirs.items():
                assert abs(ours[token].logprob - logprob) < LOGPROB_GAP
    if unquantized is not None:
        plain = hf_greedy(unquantized, PROMPTS, MAX_TOKENS, top_logprobs=3)
        assert [o.outputs[0].token_ids for o in outputs] != [tokens for tokens, _ in plain]
    assert_pool_free(llm)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_checkpoints_match_transformers_on_the_dequantized_weights(checkpoint_factory, w4a16_checkpoint,
                                                                   scheme: str) -> None:
    """Each tool's layout, loaded with no ``quantization`` argument: every projection in 4 bits (one int32 word
    per eight weights, float32 scales, uint8 zero points), the tokens transformers generates on the same
    weights dequantized."""
    quantized, dequantized = w4a16_checkpoint("llama", scheme)
    llm = LLM(str(quantized), **ENGINE)
    assert llm.llm_engine.config.quantization == "w4a16"
    layer = _model(llm).model.layers[0]
    qkv, down = layer.self_attn.qkv_proj, layer.mlp.down_proj
    assert qkv.weight.dtype == torch.int32 and qkv.weight.shape == (128, 8) and down.weight.shape == (64, 16)
    assert qkv.weight_scale.shape == qkv.weight_zero.shape == (128, 2) and qkv.weight_zero.dtype == torch.uint8
    assert qkv.g_idx is None  # act-order: the columns sorted by group, the input permuted to match
    assert (qkv.input_perm is not None) == (down.input_perm is not None) == (scheme == "gptq-act-order")
    assert_matches_transformers(llm, dequantized, checkpoint_factory("llama"))


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_checkpoint_written_by_compressed_tensors_matches_transformers(checkpoint_factory, tmp_path: Path,
                                                                         symmetric: bool) -> None:
    """A checkpoint the compressed-tensors library itself packs (llm-compressor's W4A16 and W4A16_ASYM presets,
    groups of 32), read by pagedllm's own converters: the tokens transformers generates on it, decompressed by
    the same library (``CompressedTensorsConfig(dequantize=True)``)."""
    from transformers import CompressedTensorsConfig

    from pagedllm.testing.w4a16_checkpoints import write_with_compressed_tensors

    quantized = write_with_compressed_tensors(checkpoint_factory("llama"), tmp_path / "ct", symmetric)
    llm = LLM(str(quantized), **ENGINE)
    assert llm.llm_engine.model_config.w4a16.symmetric == symmetric
    assert_matches_transformers(llm, quantized, checkpoint_factory("llama"),
                                load_kwargs={"quantization_config": CompressedTensorsConfig(dequantize=True)})


def test_qwen2_biases_and_vllm_names(w4a16_checkpoint) -> None:
    """Qwen2's q/k/v biases stay in the model dtype beside the 4-bit weights; vLLM's name for the format
    (``quantization="awq"``) is accepted for an AWQ checkpoint."""
    quantized, dequantized = w4a16_checkpoint("qwen2", "awq")
    llm = LLM(str(quantized), quantization="awq", **ENGINE)
    assert llm.llm_engine.config.quantization == "w4a16"
    assert _model(llm).model.layers[0].self_attn.qkv_proj.bias.dtype == torch.float32
    assert_matches_transformers(llm, dequantized)


@pytest.mark.parametrize("scheme", ["awq", "gptq-act-order"])
def test_phi3_fused_projections(w4a16_checkpoint, scheme: str) -> None:
    """Phi-3 stores q|k|v and gate|up fused in its checkpoint: their 4-bit words, scales and zero points are split
    into the parts as its float weights are (AWQ packs along the fused outputs, GPTQ along the inputs)."""
    quantized, dequantized = w4a16_checkpoint("phi3", scheme)
    llm = LLM(str(quantized), **ENGINE)
    assert _model(llm).model.layers[0].mlp.gate_up_proj.weight.dtype == torch.int32
    assert_matches_transformers(llm, dequantized)


def test_online_w4a16_rounds_like_a_checkpoint(checkpoint_factory, tmp_path: Path) -> None:
    """``quantization="w4a16"`` on an unquantized model: groups of 128 input features where they fit, else 64
    or 32 (this tiny model: 64 and 128 features, so 64 and 128), float32 scales; the tokens of transformers
    on the weights so rounded."""
    from safetensors.torch import load_file, save_file

    from pagedllm.backends.w4a16_linear import dequantize_w4a16, quantize_w4a16
    from pagedllm.testing.w4a16_checkpoints import PROJECTION

    source = checkpoint_factory("llama")
    llm = LLM(str(source), quantization="w4a16", **ENGINE)
    layer = _model(llm).model.layers[0]
    assert (layer.self_attn.qkv_proj.group_size, layer.mlp.down_proj.group_size) == (64, 128)
    tensors = load_file(str(source / "model.safetensors"))
    for name, weight in tensors.items():
        if PROJECTION.search(name):
            group = 128 if weight.shape[1] % 128 == 0 else 64
            tensors[name] = dequantize_w4a16(*quantize_w4a16(weight, group, scale_dtype=torch.float32), group)
    target = tmp_path / "rounded"
    target.mkdir()
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            (target / path.name).write_bytes(path.read_bytes())
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    assert_matches_transformers(llm, target)


def test_dummy_weights_of_a_4bit_config(checkpoint_factory, tmp_path: Path) -> None:
    """A config-only directory declaring an AWQ checkpoint (``benchmarks/llama3_8b_awq_config``'s kind) loads
    with dummy weights for speed runs: every projection in 4 bits, random words and zero points, generating
    through ``linear_w4a16``."""
    config = json.loads((checkpoint_factory("llama") / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
                                     "zero_point": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(tmp_path), load_format="dummy", **ENGINE)
    down = _model(llm).model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.int32 and down.group_size == 32 and int(down.weight_zero.max()) <= 15
    backend = llm.llm_engine.executor.worker.backend
    calls = []
    original = backend.linear_w4a16
    backend.linear_w4a16 = lambda *args: calls.append(1) or original(*args)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4 and len(calls) >= 4 * 7


def test_refused_with_the_reason(checkpoint_factory, w4a16_checkpoint, tmp_path: Path) -> None:
    """vLLM's 4-bit names on an unquantized checkpoint; fp8 asked of a 4-bit one; 4-bit mixture-of-experts
    models; a checkpoint whose g_idx is out of order without act-order declared."""
    with pytest.raises(ValueError, match="'gptq' loads a checkpoint stored in 4 bits"):
        LLM(str(checkpoint_factory("llama")), quantization="gptq", **ENGINE)
    quantized, _ = w4a16_checkpoint("llama", "gptq-act-order")
    with pytest.raises(ValueError, match="stored in 'w4a16'"):
        LLM(str(quantized), quantization="fp8", **ENGINE)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        LLM(str(checkpoint_factory("mixtral")), quantization="w4a16", **ENGINE)
    undeclared = tmp_path / "undeclared"
    undeclared.mkdir()
    for path in quantized.iterdir():
        (undeclared / path.name).write_bytes(path.read_bytes())
    config = json.loads((undeclared / "config.json").read_text())
    config["quantization_config"]["desc_act"] = False
    (undeclared / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="out of feature order"):
        LLM(str(undeclared), **ENGINE)
