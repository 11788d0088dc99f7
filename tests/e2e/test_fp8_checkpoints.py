"""Checkpoints stored in fp8 (``quantization_config`` in config.json): loaded as they are, with no
``quantization`` argument, computing what ``quantization="fp8"`` (per-row scales) or ``"fp8_block"`` (128 x 128
tile scales) computes; and what is refused, with why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.core.checkpoint_quantization import checkpoint_fp8
from pagedllm.testing.fp8_checkpoints import write_fp8_checkpoint
from tests.e2e.hf_reference import assert_greedy_matches_rounded_reference, merged_input_scales

MAX_TOKENS = 10
ENGINE = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=64, num_kv_blocks=256)
TILED = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
"""Tiny sizes whose projections' parts (q 256, k 128, v 128; gate, up 512) span whole 128 x 128 tiles."""


@pytest.fixture(scope="module")
def fp8_checkpoint(checkpoint_factory, tmp_path_factory):
    """``fp8_checkpoint(arch, scheme)``: ``(fp8 dir, dequantized twin dir)`` of the tiny float32 checkpoint
    (``arch`` ending in ``-tiled``: that architecture with :data:`TILED`'s sizes)."""
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(arch: str, scheme: str) -> tuple[Path, Path]:
        if (arch, scheme) not in cache:
            target = tmp_path_factory.mktemp(f"{arch}_{scheme}")
            base, tiled = arch.removesuffix("-tiled"), arch.endswith("-tiled")
            source = checkpoint_factory(base, **TILED) if tiled else checkpoint_factory(arch)
            cache[arch, scheme] = write_fp8_checkpoint(source, target, scheme)
        return cache[arch, scheme]

    return get


def _model(llm: LLM) -> torch.nn.Module:
    return llm.llm_engine.executor.worker.runner.model


def assert_same_parameters(stored: LLM, online: LLM) -> None:
    """The two engines' models hold the same parameters, byte for byte and in the same dtypes."""
    ours, theirs = dict(_model(stored).named_parameters()), dict(_model(online).named_parameters())
    assert ours.keys() == theirs.keys()
    for name, param in ours.items():
        assert param.dtype == theirs[name].dtype, name
        assert torch.equal(param.view(torch.uint8), theirs[name].view(torch.uint8)), name


def greedy_outputs(llm: LLM) -> list[tuple[list[int], list[dict[int, float]]]]:
    """Greedy tokens and top-3 logprobs of three prompts, :data:`MAX_TOKENS` each."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, logprobs=3)
    outputs = llm.generate([[1, 2, 3, 4, 5], list(range(10, 40)), [100, 200, 300]], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outputs]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q|k|v biases
def test_a_per_row_checkpoint_computes_exactly_what_online_fp8_computes(checkpoint_factory, fp8_checkpoint,
                                                                       arch: str) -> None:
    """llm-compressor's FP8_DYNAMIC layout of a float32 model holds the very e4m3 weights and scales that
    ``quantization="fp8"`` makes of it: the same logprobs, bit for bit, and the same stored weights."""
    fp8_dir, _ = fp8_checkpoint(arch, "compressed-tensors-channel")
    stored = LLM(str(fp8_dir), **ENGINE)
    online = LLM(str(checkpoint_factory(arch)), quantization="fp8", **ENGINE)
    assert stored.llm_engine.config.quantization == "fp8"
    assert_same_parameters(stored, online)
    assert _model(stored).model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert greedy_outputs(stored) == greedy_outputs(online)


@pytest.mark.parametrize("scheme", ["fp8", "compressed-tensors-tensor"])
def test_per_tensor_checkpoints_match_transformers(fp8_checkpoint, scheme: str) -> None:
    """One scale per tensor (q, k and v each their own, in one fused layer): token for token what transformers
    generates on the dequantized weights with per-token e4m3 inputs, logprobs within ROUNDED_LOGPROB_GAP."""
    fp8_dir, dequantized_dir = fp8_checkpoint("llama", scheme)
    llm = LLM(str(fp8_dir), **ENGINE)
    qkv = _model(llm).model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn
    q, k, v = qkv.weight_scale.split(qkv.shard_sizes)
    assert all(len(part.unique()) == 1 for part in (q, k, v)) and len({q[0].item(), k[0].item(), v[0].item()}) == 3
    assert_greedy_matches_rounded_reference(llm, dequantized_dir, MAX_TOKENS, fp8_linear=True, fp8_weights_stored=True)


@pytest.mark.parametrize("scheme", ["fp8-static", "compressed-tensors-static"])
def test_static_input_scale_checkpoints_match_transformers(fp8_checkpoint, scheme: str) -> None:
    """AutoFP8's default layout (``activation_scheme: static``) and llm-compressor's FP8 (per-tensor weights
    and inputs): every projection's input quantized with the checkpoint's calibrated ``input_scale`` (the
    largest of q/k/v's, of gate/up's), so the norms and the activation hand over no quantized inputs; token
    for token what transformers generates on the dequantized weights with inputs rounded by those scales,
    logprobs within ROUNDED_LOGPROB_GAP."""
    fp8_dir, dequantized_dir = fp8_checkpoint("llama", scheme)
    llm = LLM(str(fp8_dir), **ENGINE)
    layer = _model(llm).model.layers[0]
    scales = merged_input_scales(fp8_dir)
    assert llm.llm_engine.model_config.input_scales == "static"
    assert layer.self_attn.qkv_proj.input_scale.item() == pytest.approx(scales["model.layers.0.self_attn.q_proj"])
    assert layer.input_layernorm.fp8_output is None and layer.mlp.fp8_activation is None
    assert_greedy_matches_rounded_reference(llm, dequantized_dir, MAX_TOKENS, fp8_linear=True, fp8_weights_stored=True,
                                            fp8_input_scales=scales)


def test_dummy_weights_with_static_input_scales(checkpoint_factory, tmp_path: Path) -> None:
    """A config-only directory declaring static input scales (``benchmarks/llama3_8b_fp8_static_config``'s
    kind) loads with dummy weights for speed runs: the projections quantized online, each with the dummy
    static scale, so they run the static path (``linear_fp8_static``)."""
    from pagedllm.core.loader import DUMMY_INPUT_SCALE

    config = json.loads((checkpoint_factory("llama") / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(tmp_path), load_format="dummy", **ENGINE)
    layer = _model(llm).model.layers[0]
    assert llm.llm_engine.config.quantization == "fp8" and layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.self_attn.o_proj.input_scale.item() == pytest.approx(DUMMY_INPUT_SCALE)
    assert layer.post_attention_layernorm.fp8_output is None
    assert calls_while_generating(llm, "linear_fp8_static") > 0


def calls_while_generating(llm: LLM, op: str) -> int:
    """How many times the engine's backend runs its method ``op`` while ``llm`` generates 4 tokens for one prompt
    (which it must)."""
    backend = llm.llm_engine.executor.worker.backend
    calls = []
    original = getattr(backend, op)
    setattr(backend, op, lambda *args: calls.append(1) or original(*args))
    outputs = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 4
    return len(calls)


def test_broken_static_input_scales_are_refused(fp8_checkpoint, tmp_path: Path) -> None:
    fp8_dir, _ = fp8_checkpoint("llama", "fp8-static")
    name = "model.layers.1.mlp.down_proj.input_scale"
    missing = checkpoint_variant(fp8_dir, tmp_path / "missing", edit_tensors=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"does not provide parameter\(s\): model.layers.1.mlp.down_proj.input_sc"):
        LLM(str(missing), **ENGINE)
    zero = checkpoint_variant(fp8_dir, tmp_path / "zero", edit_tensors=lambda t: t.update({name: torch.tensor(0.0)}))
    with pytest.raises(ValueError, match=r"down_proj.input_scale': input scale 0.0: expected a positive finite"):
        LLM(str(zero), **ENGINE)
    per_row = checkpoint_variant(fp8_dir, tmp_path / "per_row", edit_tensors=lambda t: t.update({name: torch.ones(3)}))
    with pytest.raises(ValueError, match=r"input scale of shape \(3,\): expected one per tensor"):
        LLM(str(per_row), **ENGINE)


@pytest.mark.parametrize(("arch", "scheme"), [("llama", "fp8-block"), ("llama", "compressed-tensors-block"),
                                              ("qwen3", "fp8-block")])
def test_a_tile_checkpoint_computes_exactly_what_online_fp8_block_computes(checkpoint_factory, fp8_checkpoint,
                                                                         arch: str, scheme: str) -> None:
    """DeepSeek-V3's / Qwen3-FP8's layout (``weight_block_size: [128, 128]``, ``weight_scale_inv``) and
    llm-compressor's FP8_BLOCK of a float32 model hold the very e4m3 weights and tile scales that
    ``quantization="fp8_block"`` makes of it: the same stored parameters, the same logprobs bit for bit
    (Qwen3: its per-head q/k norms stay in the model dtype)."""
    fp8_dir, _ = fp8_checkpoint(f"{arch}-tiled", scheme)
    stored = LLM(str(fp8_dir), **ENGINE)
    online = LLM(str(checkpoint_factory(arch, **TILED)), quantization="fp8_block", **ENGINE)
    assert stored.llm_engine.config.quantization == "fp8_block"
    assert_same_parameters(stored, online)
    qkv = _model(stored).model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (4, 2)  # 512 rows, 256 columns
    assert greedy_outputs(stored) == greedy_outputs(online)


def test_tile_checkpoint_matches_transformers(fp8_checkpoint) -> None:
    """A tile-scaled checkpoint, asked for as ``quantization="fp8"`` (vLLM's name for both layouts): token
    for token what transformers generates on its dequantized weights with inputs rounded to e4m3 per group of
    128 features, logprobs within ROUNDED_LOGPROB_GAP."""
    fp8_dir, dequantized_dir = fp8_checkpoint("llama-tiled", "fp8-block")
    llm = LLM(str(fp8_dir), quantization="fp8", **ENGINE)
    assert llm.llm_engine.config.quantization == "fp8_block"
    assert_greedy_matches_rounded_reference(llm, dequantized_dir, MAX_TOKENS, fp8_linear=True, fp8_weights_stored=True,
                                            fp8_block=True)


def test_tiles_that_straddle_parts_are_refused(fp8_checkpoint) -> None:
    """The default tiny Llama's k and v parts (32 rows each) share a tile row with q's: no tile scale of the
    checkpoint belongs to one part, so loading it names the rows (``weight_scale_inv`` is read as
    ``weight_scale``)."""
    fp8_dir, _ = fp8_checkpoint("llama", "fp8-block")
    with pytest.raises(ValueError, match=r"k_proj.weight_scale'.*rows or columns \[64, 96\) of 128 do not "
                                         r"fall on the 128 x 128 tiles"):
        LLM(str(fp8_dir), **ENGINE)


def test_loading_logs_what_the_checkpoint_stores(fp8_checkpoint, caplog: pytest.LogCaptureFixture) -> None:
    fp8_dir, _ = fp8_checkpoint("llama", "fp8")
    with caplog.at_level("INFO", logger="pagedllm.core.loader"):
        LLM(str(fp8_dir), device="cpu", quantization="fp8", num_kv_blocks=16)  # asked for and stored: the same
    assert "fp8 checkpoint: 8 linear layers loaded in e4m3 with their scales (dynamic input scales)" in caplog.text


GOOD_CT = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
    "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}


def _ct(weights: dict | None = None, inputs: dict | str | None = "keep", **top: object) -> dict:
    group = json.loads(json.dumps(GOOD_CT["config_groups"]["g"]))
    group["weights"].update(weights or {})
    if inputs != "keep":
        group["input_activations"] = inputs if inputs is None else {**group["input_activations"], **inputs}
    return {**GOOD_CT, "config_groups": {"g": group}, **top}


@pytest.mark.parametrize(("config", "message"), [
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
     "weight_block_size with activation_scheme 'static'"),
    ({"quant_method": "fp8", "activation_scheme": "per-token"}, "activation_scheme 'per-token'"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 64]},
     r"weight_block_size \[64, 64\] \(only \[128, 128\] tiles\)"),
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq': not supported"),
    (_ct(format="pack-quantized"), "format 'pack-quantized'"),
    (_ct({"type": "int", "num_bits": 4}), "weights of type 'int', 4 bits"),
    (_ct({"strategy": "group", "group_size": 128}), "weight strategy 'group'"),
    (_ct({"strategy": "block"}), "block_structure None"),
    (_ct({"strategy": "block", "block_structure": [128, 128]}), "block-wise weights with input activations in "
                                                                "strategy 'token', group size None"),
    (_ct(inputs=None), "weight-only fp8"),
    (_ct(inputs={"dynamic": False}), "static input activation scales in strategy 'token'"),
    (_ct({"strategy": "block", "block_structure": [128, 128]}, {"dynamic": False, "strategy": "tensor"}),
     "static input activation scales in strategy 'tensor' with 'block' weights"),
    ({**GOOD_CT, "config_groups": {"g": "fp8"}}, "config group 'g' that is not a mapping"),
])  # fmt: skip
def test_unsupported_quantization_configs_are_refused(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        checkpoint_fp8(SimpleNamespace(quantization_config=config))
    assert "pagedllm loads quant_method 'fp8' with activation_scheme 'dynamic'" in str(info.value)


def test_supported_configs_and_unquantized_checkpoints() -> None:
    assert checkpoint_fp8(SimpleNamespace(quantization_config=GOOD_CT)).quantization == "fp8"
    assert checkpoint_fp8(SimpleNamespace(quantization_config={"quant_method": "fp8"})).quantization == "fp8"
    deepseek = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert checkpoint_fp8(SimpleNamespace(quantization_config=deepseek)).quantization == "fp8_block"
    ct_block = _ct({"strategy": "block", "block_structure": [128, 128]}, {"strategy": "group", "group_size": 128})
    assert checkpoint_fp8(SimpleNamespace(quantization_config=ct_block)).quantization == "fp8_block"
    mixed = {**ct_block, "config_groups": {**ct_block["config_groups"], "h": GOOD_CT["config_groups"]["g"]}}
    with pytest.raises(ValueError, match="mixing schemes"):
        checkpoint_fp8(SimpleNamespace(quantization_config=mixed))
    assert checkpoint_fp8(SimpleNamespace()).quantization is None
    static = {"quant_method": "fp8", "activation_scheme": "static"}
    ct_static = _ct({"strategy": "tensor"}, {"strategy": "tensor", "dynamic": False})
    for config, inputs in ((static, "static"), (ct_static, "static"), (GOOD_CT, "dynamic"), (deepseek, "dynamic")):
        assert checkpoint_fp8(SimpleNamespace(quantization_config=config)).input_scales == inputs
    assert checkpoint_fp8(SimpleNamespace(quantization_config=ct_static)).quantization == "fp8"
    assert checkpoint_fp8(SimpleNamespace()).input_scales is None
    static_and_dynamic = {**ct_static, "config_groups": {**ct_static["config_groups"],
                                                         "h": GOOD_CT["config_groups"]["g"]}}
    with pytest.raises(ValueError, match="mixing schemes"):
        checkpoint_fp8(SimpleNamespace(quantization_config=static_and_dynamic))


def checkpoint_variant(source: Path, target: Path, edit_tensors=None, edit_config=None) -> Path:
    """A copy of the checkpoint ``source`` at ``target``, its tensors (a dict) and config.json (parsed) edited in
    place by the given callables."""
    shutil.copytree(source, target)
    if edit_tensors:
        tensors = load_file(str(target / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


def test_broken_fp8_checkpoints_are_refused_with_the_reason(fp8_checkpoint, tmp_path: Path) -> None:
    fp8_dir, dequantized_dir = fp8_checkpoint("llama", "fp8")
    down = "model.layers.1.mlp.down_proj.weight"
    bnb = checkpoint_variant(fp8_dir, tmp_path / "bnb",
                             edit_config=lambda c: c.update(quantization_config={"quant_method": "bitsandbytes"}))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes': not supported"):
        LLM(str(bnb), device="cpu", num_kv_blocks=16)
    undeclared = checkpoint_variant(fp8_dir, tmp_path / "undeclared",
                                    edit_config=lambda c: c.pop("quantization_config"))
    with pytest.raises(ValueError, match=r"0.mlp.down_proj.weight': dtype mismatch: the layer stores torch.float32, "
                                         r"the checkpoint torch.float8_e4m3fn"):
        LLM(str(undeclared), device="cpu", num_kv_blocks=16)

    def unquantize_one(tensors: dict[str, torch.Tensor]) -> None:  # one layer left out of the quantization
        tensors[down] = load_file(str(dequantized_dir / "model.safetensors"))[down]
        del tensors[down + "_scale"]

    mixed = checkpoint_variant(fp8_dir, tmp_path / "mixed", edit_tensors=unquantize_one)
    with pytest.raises(ValueError, match=r"down_proj.weight': dtype mismatch: the layer stores torch.float8_e4m3fn"):
        LLM(str(mixed), device="cpu", num_kv_blocks=16)
    no_scale = checkpoint_variant(fp8_dir, tmp_path / "no_scale", edit_tensors=lambda t: t.pop(down + "_scale"))
    with pytest.raises(ValueError, match=r"does not provide parameter\(s\): model.layers.1.mlp.down_proj.weight_sc"):
        LLM(str(no_scale), device="cpu", num_kv_blocks=16)
    bad_scale = checkpoint_variant(fp8_dir, tmp_path / "bad_scale",
                         edit_tensors=lambda t: t.update({down + "_scale": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"weight scale of shape \(3,\)"):
        LLM(str(bad_scale), device="cpu", num_kv_blocks=16)
