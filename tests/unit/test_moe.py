"""Mixture-of-experts pieces: the routing, the reference expert computation against a dense one, the
device-side sort of pairs into expert blocks, and loading stacked or per-expert checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pagedllm import LLM, SamplingParams
from pagedllm.backends.moe import expert_blocks, moe_reference, route_tokens


def dense_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, masked by the routing: an independent float64 reference."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        gate, up = (x @ w13[e].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[e].T
        out += (weights.double() * (ids == e)).sum(-1, keepdim=True) * y
    return out


def routed_inputs(tokens: int, experts: int = 8, top_k: int = 2, hidden: int = 32, inter: int = 24, seed: int = 0):
    """Seeded float32 CPU operands of ``fused_moe``: ``(x, w13, w2, topk_weights, topk_ids)`` (also the GPU
    tests')."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    weights, ids = route_tokens(torch.randn(tokens, experts, generator=gen), top_k, renormalize=True)
    return x, w13, w2, weights, ids


def test_route_tokens_picks_the_most_probable_experts() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.0]])
    weights, ids = route_tokens(logits, 2, renormalize=False)
    assert ids.dtype == torch.int32 and ids.tolist() == [[1, 3], [0, 3]]
    assert torch.allclose(weights, torch.softmax(logits, -1).gather(1, ids.long()))
    renormalized, _ = route_tokens(logits, 2, renormalize=True)
    assert torch.allclose(renormalized.sum(-1), torch.ones(2))


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_moe_reference_equals_dense_computation(tokens: int) -> None:
    x, w13, w2, weights, ids = routed_inputs(tokens)
    out = moe_reference(x, w13, w2, weights, ids)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), dense_moe(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("tokens", "top_k", "block_m"), [(1, 2, 16), (7, 3, 4), (40, 2, 16), (300, 8, 64)])
def test_expert_blocks_hold_each_pair_once_in_blocks_of_one_expert(tokens: int, top_k: int, block_m: int) -> None:
    experts = 16
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).to(torch.int32)
    blocks = expert_blocks(ids, experts, block_m)
    pairs = tokens * top_k
    assert blocks.num_pairs == pairs and blocks.sorted_ids.numel() % block_m == 0
    assert blocks.sorted_ids.numel() == blocks.block_experts.numel() * block_m
    assert blocks.sorted_ids.numel() >= pairs + experts * (block_m - 1)
    real = blocks.sorted_ids[blocks.sorted_ids < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # every pair once
    flat = ids.reshape(-1)
    for b, expert in enumerate(blocks.block_experts.tolist()):
        rows = blocks.sorted_ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < pairs]
        if expert == experts:  # past the last expert's blocks: padding only
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and bool((flat[rows.long()] == expert).all())
            assert rows.tolist() == sorted(rows.tolist())  # by token within an expert
    assert list(blocks.block_experts) == sorted(blocks.block_experts.tolist())


def copy_without_weights(model_dir: Path, out: Path) -> Path:
    """``out`` holding ``model_dir``'s config and tokenizer files, not its weights."""
    out.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors") and not f.name.endswith(".safetensors.index.json"):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def stacked_copy(model_dir: Path, tmp_path: Path) -> Path:
    """The checkpoint re-saved with each block's experts stacked, as transformers 5 holds them in memory
    (``experts.gate_up_proj [E, 2 * inter, hidden]``, ``experts.down_proj [E, hidden, inter]``)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {name: tensor.contiguous() for name, tensor in hf.state_dict().items()}
    assert any(name.endswith("experts.gate_up_proj") for name in state)
    out = copy_without_weights(model_dir, tmp_path / "stacked")
    save_file(state, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_stacked_and_per_expert_checkpoints_generate_alike(checkpoint_factory, tmp_path: Path, arch: str) -> None:
    model_dir = checkpoint_factory(arch)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [100, 3, 44]]
    per_expert = LLM(str(model_dir), device="cpu", dtype="float32").generate(prompts, params, use_tqdm=False)
    stacked = LLM(str(stacked_copy(model_dir, tmp_path)), device="cpu", dtype="float32").generate(
        prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in stacked] == [o.outputs[0].token_ids for o in per_expert]


def test_missing_or_quantized_experts_are_refused(checkpoint_factory, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model_dir = checkpoint_factory("mixtral")
    state = load_file(str(model_dir / "model.safetensors"))
    out = copy_without_weights(model_dir, tmp_path / "broken")
    missing = {k: v for k, v in state.items() if k != "model.layers.1.block_sparse_moe.experts.3.w3.weight"}
    save_file(missing, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"not provide parameter\(s\): model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        LLM(str(out), device="cpu", dtype="float32")
    scaled = dict(state, **{"model.layers.0.block_sparse_moe.experts.0.w1.weight_scale": torch.ones(1)})
    save_file(scaled, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="quantized expert weights are not supported"):
        LLM(str(out), device="cpu", dtype="float32")


def test_latency_floor_counts_the_routed_experts_only(checkpoint_factory) -> None:
    """A one-token step of a mixture of experts reads top_k of its experts: the bench's weight-read floor
    counts their share of the stacked expert weights, and the rest whole."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pagedllm.bench.hf_runner import weight_bytes

    model_dir = checkpoint_factory("qwen3_moe")
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < experts < total
    routed = experts * config.num_experts_per_tok / config.num_experts
    assert weight_bytes(model_dir, torch.bfloat16) == pytest.approx(2 * (total - experts + routed))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_fp8_quantizes_attention_and_dense_layers_not_the_experts(checkpoint_factory, arch: str) -> None:
    llm = LLM(str(checkpoint_factory(arch)), device="cpu", dtype="float32", quantization="fp8")
    model = llm.llm_engine.executor.worker.runner.model
    layer = model.model.layers[1]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.mlp.experts.gate_up_proj.dtype == layer.mlp.gate.weight.dtype == torch.float32
    if arch == "qwen2_moe":  # the shared expert is a dense MLP: fp8; its one-row gate is not
        assert layer.mlp.shared_expert.gate_up_proj.weight.dtype == torch.float8_e4m3fn
        assert layer.mlp.shared_expert_gate.weight.dtype == torch.float32
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6
