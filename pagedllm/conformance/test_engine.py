"""Engine level: greedy generation through the backend equals the ``cpu`` reference backend's.

Tiny random checkpoints (GQA Llama, MQA Qwen2, sliding-window Mistral) are built on the fly with a head
size the backend claims and cached between runs (``--conformance-cache-dir``, default the pytest cache).
Each is run through the whole engine with a small token budget, so prompts are chunked and batched with
other requests' decodes, then with prompts sharing a cached prefix (prefill over cached blocks). At the
first token where the backend and the reference disagree, both tokens must be in the other's top
:data:`TOP_N` (two kernels may round a near tie differently, but never pick an unlikely token).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagedllm.conformance.cases import dtype_name, param
from pagedllm.conformance.checkpoints import ARCH_HEADS, cached_checkpoint, cached_fp8_kv_checkpoint
from pagedllm.conformance.plugin import ConformanceTarget, case_id, get_target
from pagedllm.core.config import KV_CACHE_DTYPES

TOP_N = 5
CHUNKED_BUDGET_TOKENS = 24
MAX_TOKENS = 10
KV_CACHE_BYTES = 32 << 20
ENGINE_DTYPES = ("float32", "bfloat16", "float16")


def kv_cache_dtype_name(dtype: torch.dtype) -> str | None:
    """The engine's ``kv_cache_dtype`` name of a KV-only cache dtype (e.g. ``fp8_e4m3``), None if it has none."""
    names = [name for name, value in KV_CACHE_DTYPES.items() if value == dtype and name.startswith("fp8_")]
    return names[0] if names else None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``engine_arch`` (mistral needs sliding window) and ``engine_kv_dtype`` (each KV-only
    cache dtype claimed, e.g. fp8)."""
    capabilities = get_target(metafunc.config).capabilities
    if "engine_kv_dtype" in metafunc.fixturenames:
        kv_only = [d for d in capabilities.kv_cache_dtypes if d not in capabilities.dtypes]
        params = [param(case_id(metafunc.config, f"kv_{dtype_name(d)}"), kv_cache_dtype_name(d),
                        skip=None if kv_cache_dtype_name(d) else f"{d} has no kv_cache_dtype name in the engine")
                  for d in kv_only]
        if not params:
            params = [param(case_id(metafunc.config, "kv_only"), None,
                            skip="no KV-only cache dtype claimed (every kv_cache_dtype is a model dtype)")]
        metafunc.parametrize("engine_kv_dtype", params)
    if "engine_arch" in metafunc.fixturenames:
        params = []
        for arch in ARCH_HEADS:
            skip = None
            if arch in ("mistral", "gemma2", "gemma3") and not capabilities.supports_sliding_window:
                skip = f"{arch} (sliding window) not run: sliding window not claimed"
            if arch == "gemma2" and not capabilities.supports_logits_soft_cap:
                skip = "gemma2 (attention soft cap) not run: logits soft cap not claimed"
            params.append(param(case_id(metafunc.config, arch), arch, skip=skip))
        metafunc.parametrize("engine_arch", params)


def engine_head_size(target: ConformanceTarget) -> int:
    """64 if claimed, else the smallest claimed head size of at least 16, else the smallest."""
    sizes = sorted(target.capabilities.head_sizes)
    if 64 in sizes:
        return 64
    return next((s for s in sizes if s >= 16), sizes[0])


def engine_dtype(target: ConformanceTarget) -> str:
    """float32 if claimed, else the first claimed dtype the engine accepts; skips when there is none."""
    claimed = [dtype_name(d) for d in target.capabilities.dtypes]
    for name in ("float32", *claimed):
        if name in claimed and name in ENGINE_DTYPES:
            return name
    pytest.skip(f"engine level needs one of {', '.join(ENGINE_DTYPES)}; claims {', '.join(claimed)}")
    raise AssertionError  # unreachable: skip raises


def checkpoint_dir(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory, arch: str, head_dim: int) -> Path:
    """Return the tiny ``arch`` checkpoint (``"llama-fp8kv"``: the Llama as an ``-FP8-KV`` checkpoint), from
    ``--conformance-cache-dir``, else the pytest cache, else a temporary directory of this session."""
    root_option = config.getoption("conformance_cache_dir")
    if root_option:
        root = Path(root_option)
    elif getattr(config, "cache", None) is not None:  # absent under -p no:cacheprovider
        root = Path(config.cache.mkdir("pagedllm-conformance"))
    else:
        root = tmp_path_factory.mktemp("pagedllm-conformance")
    if arch == "llama-fp8kv":
        return cached_fp8_kv_checkpoint(root, head_dim)
    return cached_checkpoint(root, arch, head_dim)


def prompts(gen: torch.Generator, vocab_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Return (first batch, second batch): lengths 1 to ~100 tokens; the second shares the first's prefixes."""
    def ids(n: int) -> list[int]:
        return torch.randint(1, vocab_size, (n,), generator=gen).tolist()

    first = [ids(n) for n in (1, 9, 40, 97)]
    second = [first[3][:64] + ids(5), first[2] + ids(17), ids(3)]
    return first, second


def generate(model: Path, device: str, dtype: str, budget: int | None, batches: tuple[list[list[int]], ...],
             kv_cache_dtype: str = "auto", quantization: str | None = None) -> list[list[object]]:
    """Run each batch of token-id prompts greedily through one engine; return the completions per batch."""
    from pagedllm.core.sampling_params import SamplingParams
    from pagedllm.entrypoints.llm import LLM

    llm = LLM(str(model), device=device, dtype=dtype, seed=0, max_model_len=256, kv_cache_dtype=kv_cache_dtype,
              quantization=quantization, kv_cache_memory_bytes=KV_CACHE_BYTES, max_num_batched_tokens=budget,
              max_num_seqs=8)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP_N, ignore_eos=True)
    try:
        outputs = [[out.outputs[0] for out in llm.generate(batch, params, use_tqdm=False)] for batch in batches]
        hits = llm.llm_engine.stats().prefix_cache_hit_tokens
        assert hits > 0, "the second batch should have prefilled over cached prefix blocks; no prefix cache hit"
        return outputs
    finally:
        llm.llm_engine.shutdown()


@pytest.fixture(scope="session")
def engine_reference_outputs() -> dict[tuple[str, str, int | None, str, str | None], list[list[object]]]:
    """The cpu backend's completions per (checkpoint, dtype, budget, kv_cache_dtype, quantization), computed
    once per session."""
    return {}


def check_against_cpu(
    target: ConformanceTarget, arch: str, kv_cache_dtype: str,
    reference_outputs: dict[tuple[str, str, int | None, str, str | None], list[list[object]]],
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, quantization: str | None = None,
) -> None:
    """Generate through ``target`` and through the cpu backend; fail at a divergence outside the top-N rule."""
    dtype = engine_dtype(target)
    # A small token budget chunks the long prompts and batches the chunks with other requests' decodes;
    # without chunked prefill, each prompt is prefilled whole.
    engine_budget = CHUNKED_BUDGET_TOKENS if target.capabilities.supports_chunked_prefill else None
    model = checkpoint_dir(request.config, tmp_path_factory, arch, engine_head_size(target))
    vocab_size = int(json.loads((model / "config.json").read_text())["vocab_size"])
    batches = prompts(torch.Generator().manual_seed(request.config.getoption("conformance_seed")), vocab_size)
    actual = generate(model, target.name, dtype, engine_budget, batches, kv_cache_dtype, quantization)
    key = (str(model), dtype, engine_budget, kv_cache_dtype, quantization)
    if key not in reference_outputs:
        reference_outputs[key] = generate(model, "cpu", dtype, engine_budget, batches, kv_cache_dtype, quantization)
    expected = reference_outputs[key]
    for batch_index, (got_batch, want_batch) in enumerate(zip(actual, expected, strict=True)):
        for prompt_index, (got, want) in enumerate(zip(got_batch, want_batch, strict=True)):
            where = f"batch {batch_index} prompt {prompt_index}"
            assert len(got.token_ids) == len(want.token_ids), f"{where}: lengths differ"
            for step, (a, b) in enumerate(zip(got.token_ids, want.token_ids, strict=True)):
                if a == b:
                    continue
                assert b in got.logprobs[step] and a in want.logprobs[step], (
                    f"{where}: token {step} is {a} on {target.name!r} but {b} on cpu, and they are not "
                    f"in each other's top {TOP_N}: {target.name} {got.token_ids} vs cpu {want.token_ids}"
                )
                break  # after an allowed divergence the continuations differ legitimately


def test_greedy_generation_matches_cpu(
    conformance_target: ConformanceTarget, engine_arch: str,
    engine_reference_outputs: dict[tuple[str, str, int | None, str, str | None], list[list[object]]],
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Greedy completions through the whole engine equal the cpu backend's (top-N rule at a divergence)."""
    check_against_cpu(conformance_target, engine_arch, "auto", engine_reference_outputs, request, tmp_path_factory)


def test_greedy_generation_with_kv_only_cache_matches_cpu(
    conformance_target: ConformanceTarget, engine_kv_dtype: str,
    engine_reference_outputs: dict[tuple[str, str, int | None, str, str | None], list[list[object]]],
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The same with the KV cache in a KV-only dtype the backend claims (e.g. ``kv_cache_dtype="fp8_e4m3"``),
    on the GQA Llama: the cpu backend stores the same format, so both attend over the same rounded keys."""
    check_against_cpu(conformance_target, "llama", engine_kv_dtype, engine_reference_outputs, request,
                      tmp_path_factory)


def test_greedy_generation_with_fp8_linear_matches_cpu(
    conformance_target: ConformanceTarget,
    engine_reference_outputs: dict[tuple[str, str, int | None, str, str | None], list[list[object]]],
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The same with ``quantization="fp8"`` (when claimed), on the GQA Llama: both backends store the same
    e4m3 weights and quantize each token's input the same way."""
    if "fp8" not in conformance_target.capabilities.quantizations:
        pytest.skip("fp8 linear layers not claimed (quantizations)")
    check_against_cpu(conformance_target, "llama", "auto", engine_reference_outputs, request, tmp_path_factory,
                      quantization="fp8")


def test_greedy_generation_with_fp8_block_linear_matches_cpu(
    conformance_target: ConformanceTarget,
    engine_reference_outputs: dict[tuple[str, str, int | None, str, str | None], list[list[object]]],
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The same with ``quantization="fp8_block"`` (when claimed): 128 x 128 tile scales, inputs quantized per
    token and group of 128 features."""
    if "fp8_block" not in conformance_target.capabilities.quantizations:
        pytest.skip("fp8_block linear layers not claimed (quantizations)")
    check_against_cpu(conformance_target, "llama", "auto", engine_reference_outputs, request, tmp_path_factory,
                      quantization="fp8_block")


def test_greedy_generation_with_w4a16_linear_matches_cpu(
    conformance_target: ConformanceTarget,
    engine_reference_outputs: dict[tuple[str, str, int | None, str, str | None], list[list[object]]],
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The same with ``quantization="w4a16"`` (when claimed): both backends round the same weights to 4 bits in
    groups and multiply the unquantized inputs by them."""
    if "w4a16" not in conformance_target.capabilities.quantizations:
        pytest.skip("w4a16 linear layers not claimed (quantizations)")
    check_against_cpu(conformance_target, "llama", "auto", engine_reference_outputs, request, tmp_path_factory,
                      quantization="w4a16")


def test_greedy_generation_with_kv_cache_scales_matches_cpu(
    conformance_target: ConformanceTarget,
    engine_reference_outputs: dict[tuple[str, str, int | None, str, str | None], list[list[object]]],
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The same on an ``-FP8-KV`` checkpoint of the GQA Llama (fp8 weights with static input scales, per-layer
    KV-cache scales) with the KV cache in e4m3 (when ``fp8`` and that cache are claimed): every layer stores its
    keys and values divided by its scales (``write_kv_cache_scaled``) and attends through ``attention_scaled``."""
    capabilities = conformance_target.capabilities
    if "fp8" not in capabilities.quantizations or torch.float8_e4m3fn not in capabilities.kv_cache_dtypes:
        pytest.skip("needs fp8 linear layers (quantizations) and an e4m3 KV cache (kv_cache_dtypes) claimed")
    check_against_cpu(conformance_target, "llama-fp8kv", "fp8_e4m3", engine_reference_outputs, request,
                      tmp_path_factory)
