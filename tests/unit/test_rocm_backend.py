"""The ``rocm`` backend without AMD hardware, through the code paths its hardware would run.

- Availability and claims: on this machine (no ROCm build) it says why not; on a faked ROCm build it accepts the
  CDNA and RDNA GPUs its kernels are built for and refuses others with the reason; ``cuda`` then defers to it,
  and ``--device auto`` tries it before ``cuda``.
- The real AMD compiler: every kernel variant the backend launches, with its family's tiles, compiles through
  Triton's AMD backend to a code object for every supported architecture, within its LDS and without spilling
  registers (but where the tuning says).
- The numbers: :class:`RocmBackend`'s own methods (its tiles, its dispatch) run the kernels under Triton's
  interpreter against the ``cpu`` reference backend, as on a CDNA and on an RDNA GPU.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.backends.cuda.backend import CudaBackend
from pagedllm.backends.registry import PluginRegistry
from pagedllm.backends.rocm.backend import RocmBackend
from pagedllm.backends.rocm.tuning import (
    CDNA_ARCHS,
    LDS_BYTES,
    OCP_FP8_ARCHS,
    RDNA_ARCHS,
    SUPPORTED_ARCHS,
    tuning_for,
    wave_size,
)
from pagedllm.backends.triton_gpu.tuning import KernelTuning
from tests.unit.test_cuda_kernels_interpreter import (  # noqa: F401 - fixtures, used by name
    ATTENTION_CASES,
    DTYPES,
    KERNEL_MODULES,
    REFERENCE,
    TOLERANCE,
    interpreted_modules,
    kernels,
    make_batch,
)
from tests.unit.triton_compile import compile_kernel

GIB = 2**30
TORCH_TYPES = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32,
               "*fp8e4nv": torch.float8_e4m3fn, "*fp8e5": torch.float8_e5m2}
"""Triton's pointer types of the variants, as torch dtypes (what the backend chooses tiles by)."""


# --------------------------------------------------------------------------- availability and claims
def test_is_available_says_why_not_here() -> None:
    ok, reason = RocmBackend.is_available()
    assert not ok
    assert "not a ROCm build" in reason and "torch.version.hip" in reason


def fake_rocm(monkeypatch: pytest.MonkeyPatch, arch: str | None, total_memory: int = 192 * GIB) -> None:
    """Make torch look like a ROCm build that sees one AMD GPU of ``arch`` (None: no GPU visible)."""
    monkeypatch.setattr(torch.version, "hip", "6.4.43482", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: arch is not None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    properties = SimpleNamespace(gcnArchName=f"{arch}:sramecc+:xnack-", total_memory=total_memory)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: properties)


@pytest.mark.parametrize("arch", sorted(SUPPORTED_ARCHS))
def test_available_on_supported_gpus(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    fake_rocm(monkeypatch, arch)
    assert RocmBackend.is_available() == (True, "")
    ok, reason = CudaBackend.is_available()
    assert not ok and "use --device rocm" in reason


def test_refuses_what_it_is_not_built_for(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_rocm(monkeypatch, "gfx1030")  # RDNA2
    ok, reason = RocmBackend.is_available()
    assert not ok and "gfx1030" in reason and all(arch in reason for arch in SUPPORTED_ARCHS)
    fake_rocm(monkeypatch, None)
    ok, reason = RocmBackend.is_available()
    assert not ok and "sees no AMD GPU" in reason and "HIP_VISIBLE_DEVICES" in reason


def test_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the backend claims: no fp8 layers, 4-bit ones, graphs and asynchronous scheduling, and the larger
    scheduler defaults on an MI300X's 192 GB, the smaller ones on a 64 GB MI210."""
    backend = RocmBackend()
    assert (backend.name, backend.device_type, backend.dist_backend) == ("rocm", "cuda", "nccl")
    assert RocmBackend.priority > CudaBackend.priority
    fake_rocm(monkeypatch, "gfx942")
    claims = backend.capabilities()
    assert set(claims.dtypes) == set(claims.kv_cache_dtypes) == {torch.float16, torch.bfloat16, torch.float32}
    assert claims.quantizations == ("w4a16",)
    assert claims.can_capture_graphs and claims.runs_asynchronously and claims.compiles_kernels
    assert (claims.default_max_num_seqs, claims.default_max_num_batched_tokens) == (1024, 16384)
    for arch in SUPPORTED_ARCHS:  # an fp8 KV cache where the GPU converts OCP 8-bit floats in hardware
        fake_rocm(monkeypatch, arch)
        fp8 = {torch.float8_e4m3fn, torch.float8_e5m2} <= set(backend.capabilities().kv_cache_dtypes)
        assert fp8 == (arch in OCP_FP8_ARCHS), arch
    fake_rocm(monkeypatch, "gfx90a", total_memory=64 * GIB)
    assert (backend.capabilities().default_max_num_seqs, backend.capabilities().default_max_num_batched_tokens) == (
        256, 8192)


def test_registered_as_a_builtin_and_tried_before_cuda() -> None:
    registry = PluginRegistry(load_entry_points=False)
    entries = registry.backends()
    assert entries["rocm"].backend_cls is RocmBackend
    order = [entry.backend_cls.name for entry in registry.auto_order()]
    assert order.index("rocm") < order.index("cuda") < order.index("cpu")


# --------------------------------------------------------------------------- the AMD compiler
def kernel_variants(tuning: KernelTuning, fp8: bool = False) -> list[tuple[str, object, dict[str, str],
                                                                         dict[str, object], dict[str, object]]]:
    """``(label, kernel, pointer types, constexprs, options)`` of the launches the rocm backend makes with
    ``tuning``'s tiles: attention for Llama (head 128, GQA 4), Gemma 3 (head 256; with its window and soft cap),
    a head of 80 (GQA 8), Qwen2's MQA in fp32; the KV write; with ``fp8``, attention over an e4m3 or e5m2 cache
    and its scaled write; the fused ops; the MoE router, GEMVs and grouped GEMMs; the 4-bit GEMM at each of the
    family's tiles (with and without act-order), its GEMV and its split-K sum."""
    from pagedllm.backends.triton_gpu import decode_attention, fused_kernels, fused_moe, kv_cache_kernels, w4a16_linear
    from pagedllm.backends.triton_gpu import prefill_attention as prefill
    from pagedllm.backends.triton_gpu.attention_common import LOG2_E, block_d, dot_precision, unmasked_tiles

    variants = []

    def attention(query: str, cache: str, head_dim: int, group: int, splits: tuple[int, ...], label: str = "",
                  **constexprs: object) -> None:
        """The split-K decode (one variant per split count), the reduce and the prefill over a ``cache``-typed
        cache under ``query``-typed queries, with ``tuning``'s tiles for them; ``constexprs`` override the
        defaults (no window, no soft cap, unscaled values), then the KV write into that cache."""
        dtype, kv_dtype = TORCH_TYPES[query], TORCH_TYPES[cache]
        pointers = {"out_ptr": query, "q_ptr": query, "k_cache_ptr": cache, "v_cache_ptr": cache,
                    "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                    "query_start_loc_ptr": "*i32", "context_lens_ptr": "*i32"}
        shared = {"GROUP": group, "HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "BLOCK_SIZE": 16,
                  "SLIDING_WINDOW": 0, "SOFT_CAP": 0.0, "DOT_PRECISION": dot_precision(dtype),
                  "UNMASKED_TILES": unmasked_tiles(dtype), "V_SCALED": False, **constexprs}
        name = f"{query[1:]} head {head_dim}" + (f" {cache[1:]} cache" if cache != query else "") + label
        block_n, warps, stages = tuning.decode(head_dim, kv_dtype)
        for count in splits:
            variants.append((f"decode {name} splits {count}", decode_attention._decode_split_kernel, pointers,
                             {**shared, "BLOCK_G": max(16, group), "BLOCK_N": block_n, "NUM_SPLITS": count},
                             {"num_warps": warps, "num_stages": stages}))
        if max(splits) > 1:
            variants.append((f"decode reduce {name}", decode_attention._decode_reduce_kernel, pointers,
                             {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "NUM_SPLITS": max(splits),
                              "BLOCK_S": max(splits)}, {"num_warps": 4}))
        tile_m, block_n, warps, stages = tuning.prefill(head_dim, dtype)
        tile_m = max(tile_m, group, 16)
        variants.append((f"prefill {name}", prefill._prefill_kernel, pointers,
                         {**shared, "BLOCK_M": tile_m, "BLOCK_Q": tile_m // group, "BLOCK_N": block_n},
                         {"num_warps": warps, "num_stages": stages}))
        variants.append((f"write kv {name}", kv_cache_kernels._write_kv_kernel,
                         {"key_ptr": query, "value_ptr": query, "k_cache_ptr": cache, "v_cache_ptr": cache,
                          "slot_mapping_ptr": "*i64"},
                         {"NUM_KV_HEADS": 8, "HEAD_DIM": head_dim, "BLOCK_H": 8, "BLOCK_D": block_d(head_dim),
                          "BLOCK_SIZE": 16, "SCALED": shared["V_SCALED"]}, {}))

    for query, head_dim, group in (("*bf16", 128, 4), ("*bf16", 256, 2), ("*fp16", 80, 8), ("*fp32", 64, 4)):
        attention(query, query, head_dim, group, (1, 8))
    # Gemma 2/3's attention: a sliding window and soft-capped scores, head 256
    attention("*bf16", "*bf16", 256, 2, (1,), " window soft-cap", SLIDING_WINDOW=512, SOFT_CAP=50.0 * LOG2_E)
    if fp8:  # the KV cache in e4m3 and e5m2 under bf16 queries (scaled values), Llama's heads
        for cache in ("*fp8e4nv", "*fp8e5"):
            attention("*bf16", cache, 128, 4, (4,), V_SCALED=True)
    import triton.language as tl

    fused = {n: "*bf16" for n in ("out_ptr", "x_ptr", "residual_ptr", "weight_ptr", "q_out_ptr", "k_out_ptr", "k_ptr",
                                  "q_ptr", "q_weight_ptr", "k_weight_ptr")}
    fused.update(positions_ptr="*i64", cos_sin_ptr="*fp32", scale_ptr="*fp32")
    for residual in (False, True):
        variants.append((f"rms_norm residual={residual}", fused_kernels._rms_norm_kernel, fused,
                         {"HAS_RESIDUAL": residual, "QUANTIZE": False, "ROUND_TO": tl.bfloat16, "BLOCK": 4096,
                          "GROUP": 0}, {"num_warps": 8}))
    for norm in (False, True):
        variants.append((f"rotary norm={norm}", fused_kernels._rotary_kernel, fused,
                         {"NUM_Q_HEADS": 32, "NUM_K_HEADS": 8, "HALF": 64, "BLOCK_HQ": 32, "BLOCK_HK": 8,
                          "BLOCK_HALF": 64, "NORM": norm}, {}))
    variants.append(("silu_and_mul", fused_kernels._silu_and_mul_kernel, fused, {"BLOCK": 1024}, {}))
    # the MoE router and, up to 16 tokens, the experts' GEMVs (their default tiles)
    variants.append(("topk_softmax", fused_moe._topk_softmax_kernel, {"weights_ptr": "*fp32", "ids_ptr": "*i32",
                     "logits_ptr": "*bf16"}, {"TOP_K": 8, "BLOCK_E": 128, "BLOCK_K": 8, "RENORMALIZE": True,
                     "ROUND_TO": tl.bfloat16}, {"num_warps": 1}))
    n13, k13, warps13, n2, k2, warps2, at_once = fused_moe.GEMV_TILES
    gemv = {"h_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i32", "y_ptr": "*bf16",
            "weights_ptr": "*fp32"}
    variants.append(("moe gate|up gemv", fused_moe._moe_gate_up_gemv_kernel, gemv,
                     {"TOP_K": 8, "BLOCK_N": n13, "BLOCK_K": k13}, {"num_warps": warps13}))
    variants.append(("moe down gemv", fused_moe._moe_down_gemv_kernel, gemv,
                     {"TOP_K": 8, "BLOCK_N": n2, "BLOCK_K": k2, "EXPERTS_AT_ONCE": at_once}, {"num_warps": warps2}))
    moe = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "sorted_ids_ptr": "*i32", "block_experts_ptr": "*i32",
           "weights_ptr": "*fp32"}
    block_m, block_n, block_k, warps, stages = tuning.moe
    for rows_are_tokens in (True, False):
        variants.append((f"moe gemm rows_are_tokens={rows_are_tokens}", fused_moe._moe_gemm_kernel, moe,
                         {"NUM_EXPERTS": 128, "TOP_K": 8, "ROWS_ARE_TOKENS": rows_are_tokens,
                          "MUL_WEIGHTS": not rows_are_tokens, "DOT_PRECISION": None, "BLOCK_M": block_m,
                          "BLOCK_N": block_n, "BLOCK_K": block_k}, {"num_warps": warps, "num_stages": stages}))
    w4 = {"out_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*i32", "scales_ptr": "*fp32", "zeros_ptr": "*u8",
          "g_idx_ptr": "*i32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "partial_ptr": "*fp32"}
    for rows, t in tuning.w4a16:
        for g_idx in (False, True):
            variants.append((f"w4a16 gemm rows<={rows} g_idx={g_idx}", w4a16_linear._w4a16_gemm_kernel, w4,
                             {"GROUP_SIZE": 128, "HAS_G_IDX": g_idx, "GROUP_PER_STEP": not g_idx, "EVEN_K": True,
                              "HAS_BIAS": True, "DOT_PRECISION": None, "SWAP_AB": t.swap_ab, "BLOCK_M": t.block_m,
                              "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "GROUP_M": w4a16_linear.GROUP_M},
                             {"num_warps": t.num_warps, "num_stages": t.num_stages}))
    block_n, block_w, warps = w4a16_linear.gemv_tiles(128)
    variants.append(("w4a16 gemv", w4a16_linear._w4a16_gemv_kernel, w4,
                     {"GROUP_SIZE": 128, "HAS_BIAS": True, "BLOCK_N": block_n, "BLOCK_W": block_w},
                     {"num_warps": warps}))
    variants.append(("w4a16 split-K sum", w4a16_linear._split_k_sum_kernel, w4,
                     {"HAS_BIAS": True, "BLOCK": w4a16_linear.REDUCE_BLOCK}, {"num_warps": 4}))
    return variants


SPILLS_ALLOWED = {arch: ("head 256",) for arch in RDNA_ARCHS if arch.startswith("gfx11")}
"""Variants that may spill registers: heads of 256 on RDNA3, where every tile of the sweep spills (they run,
slower); see ``pagedllm.backends.rocm.tuning``."""


@pytest.mark.parametrize("arch", sorted(SUPPORTED_ARCHS))
def test_kernels_compile_for_amd_gpus(arch: str) -> None:
    """Triton's AMD backend (LLVM's AMDGPU target, linked to a code object) takes every variant with the tiles of
    the architecture's family, each within its LDS and without spilling vector registers to scratch memory (but
    :data:`SPILLS_ALLOWED`): what a first launch on that GPU compiles."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "amd").is_dir():
        pytest.skip("this triton has no AMD backend")
    for label, kernel, pointers, constexprs, options in kernel_variants(tuning_for(arch), arch in OCP_FP8_ARCHS):
        compiled = compile_kernel(kernel, pointers, constexprs, ("hip", arch, wave_size(arch)), **options)
        assert "hsaco" in compiled.asm, label
        assert compiled.metadata.shared <= LDS_BYTES[arch], f"{label}: {compiled.metadata.shared} bytes of LDS"
        spills = re.findall(r"\.vgpr_spill_count:\s*(\d+)", compiled.asm["amdgcn"])
        assert spills, label
        if not any(part in label for part in SPILLS_ALLOWED.get(arch, ())):
            assert all(n == "0" for n in spills), f"{label}: {spills} vector registers spilled"


def test_families() -> None:
    """CDNA and RDNA get their own tiles; RDNA compiles at 32 lanes a wavefront."""
    assert {tuning_for(arch).name for arch in CDNA_ARCHS} == {"cdna"}
    assert {tuning_for(arch).name for arch in RDNA_ARCHS} == {"rdna"}
    assert {wave_size(arch) for arch in CDNA_ARCHS} == {64} and {wave_size(arch) for arch in RDNA_ARCHS} == {32}


def test_kernels_refuse_tf32_where_amd_does() -> None:
    """Why 16-bit products take the target's default precision: AMD's compiler refuses ``tf32`` on gfx90a (the
    kernels once passed it for every dtype)."""
    pytest.importorskip("triton.backends.amd")
    from triton.compiler.errors import CompilationError

    from pagedllm.backends.triton_gpu import fused_moe

    moe = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "sorted_ids_ptr": "*i32", "block_experts_ptr": "*i32",
           "weights_ptr": "*fp32"}
    constexprs = {"NUM_EXPERTS": 8, "TOP_K": 2, "ROWS_ARE_TOKENS": True, "MUL_WEIGHTS": False, "DOT_PRECISION": "tf32",
                  "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
    with pytest.raises(CompilationError, match="input_precision"):
        compile_kernel(fused_moe._moe_gemm_kernel, moe, constexprs, ("hip", "gfx90a", 64), num_warps=4)


# --------------------------------------------------------------------------- the numbers, under the interpreter
@pytest.fixture(params=["gfx942", "gfx1100"])
def rocm(request: pytest.FixtureRequest, kernels: SimpleNamespace,  # noqa: F811
         monkeypatch: pytest.MonkeyPatch) -> Iterator[RocmBackend]:
    """A :class:`RocmBackend` on a faked MI300X (CDNA tiles) or Radeon RX 7900 (RDNA tiles) whose kernel imports
    get the interpreted modules (its methods import them on first use, by module path or from the package)."""
    fake_rocm(monkeypatch, request.param)
    package = importlib.import_module("pagedllm.backends.triton_gpu")
    for name in KERNEL_MODULES:
        module = getattr(kernels, name)
        monkeypatch.setitem(sys.modules, f"{package.__name__}.{name}", module)
        monkeypatch.setattr(package, name, module, raising=False)
    yield RocmBackend()


def test_tuning_follows_the_gpu(rocm: RocmBackend) -> None:
    """The tests below run the tiles of the faked GPU's family, not cuda's (the kernels' defaults)."""
    from pagedllm.backends.triton_gpu.prefill_attention import prefill_tiles

    assert rocm.kernel_tuning() == tuning_for(torch.cuda.get_device_properties(0).gcnArchName.split(":")[0])
    assert rocm.kernel_tuning().prefill(128, torch.float16) != prefill_tiles(128, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_reference(rocm: RocmBackend, case: str, dtype: torch.dtype) -> None:
    """``RocmBackend.write_kv_cache`` then ``attention``, with the CDNA tiles (128-row prefill tiles: several
    requests' tokens and GQA groups in one tile) and the RDNA ones (16-key tiles), against the ``cpu`` backend."""
    query_lens, context_lens, num_decodes, extra = ATTENTION_CASES[case]
    batch = make_batch(query_lens, context_lens, num_decodes, dtype=dtype, **extra)
    cache = batch.nan_cache.clone()
    real = batch.metadata.slot_mapping >= 0
    cache.view(2, -1, *cache.shape[3:])[:, batch.metadata.slot_mapping[real]] = float("nan")  # the kernel writes these
    rocm.write_kv_cache(batch.key, batch.value, cache, batch.metadata.slot_mapping)
    out = rocm.attention(batch.query, batch.key, batch.value, cache, batch.metadata, batch.spec)
    expected = REFERENCE.attention(batch.query, batch.key, batch.value, batch.cache, batch.metadata, batch.spec)
    rows = batch.real_rows
    torch.testing.assert_close(out[rows].float(), expected[rows].float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("case", ["decode", "mixed", "long_prefill", "gqa_group3"])
def test_attention_over_fp8_cache(rocm: RocmBackend, case: str, kv_dtype: torch.dtype) -> None:
    """fp16 queries over an 8-bit cache (written by the reference: the interpreter's fp8 store rounds its own way),
    through ``RocmBackend.attention`` with the family's tiles, against the ``cpu`` backend."""
    query_lens, context_lens, num_decodes, extra = ATTENTION_CASES[case]
    batch = make_batch(query_lens, context_lens, num_decodes, dtype=torch.float16, kv_dtype=kv_dtype, **extra)
    out = rocm.attention(batch.query, batch.key, batch.value, batch.nan_cache, batch.metadata, batch.spec)
    expected = REFERENCE.attention(batch.query, batch.key, batch.value, batch.cache, batch.metadata, batch.spec)
    rows = batch.real_rows
    torch.testing.assert_close(out[rows].float(), expected[rows].float(), **TOLERANCE[torch.float16])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_ops_match_reference(rocm: RocmBackend, dtype: torch.dtype) -> None:
    """RMSNorm (plain and with the residual add), the rotary embedding with and without Qwen3's q/k norms, and
    SiLU-and-mul through the backend's methods, against the ``cpu`` backend."""
    tol = TOLERANCE[dtype]
    x, residual = torch.randn(5, 96).to(dtype), torch.randn(5, 96).to(dtype)
    weight = (1 + 0.1 * torch.randn(96)).to(dtype)
    torch.testing.assert_close(rocm.rms_norm(x, weight, 1e-6), REFERENCE.rms_norm(x, weight, 1e-6), **tol)
    got = rocm.add_rms_norm(x, residual.clone(), weight, 1e-5)
    for a, b in zip(got, REFERENCE.add_rms_norm(x, residual.clone(), weight, 1e-5), strict=True):
        torch.testing.assert_close(a, b, **tol)
    head_dim, positions = 64, torch.tensor([0, 5, 63, 1, 17])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(64).float(), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    query, key = torch.randn(5, 4, head_dim).to(dtype), torch.randn(5, 2, head_dim).to(dtype)
    for a, b in zip(rocm.rotary_embedding(positions, query, key, cos_sin),
                    REFERENCE.rotary_embedding(positions, query, key, cos_sin), strict=True):
        torch.testing.assert_close(a, b, **tol)
    norms = ((1 + 0.2 * torch.randn(head_dim)).to(dtype), (1 + 0.2 * torch.randn(head_dim)).to(dtype), 1e-6)
    for a, b in zip(rocm.qk_norm_rotary_embedding(positions, query, key, *norms, cos_sin),
                    REFERENCE.qk_norm_rotary_embedding(positions, query, key, *norms, cos_sin), strict=True):
        torch.testing.assert_close(a, b, **tol)
    gate_up = (torch.randn(4, 2 * 300) * 3).to(dtype)
    torch.testing.assert_close(rocm.silu_and_mul(gate_up), REFERENCE.silu_and_mul(gate_up), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [3, 40])
def test_mixture_of_experts_matches_reference(rocm: RocmBackend, dtype: torch.dtype, tokens: int) -> None:
    """The router (``topk_softmax``) and the experts (``fused_moe``: the GEMVs at 3 tokens, the grouped GEMMs with
    the family's tiles at 40) through the backend's methods, against the ``cpu`` backend's."""
    gen = torch.Generator().manual_seed(tokens)
    hidden, inter, experts, top_k = 48, 36, 8, 2
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen).to(dtype)
    weights, ids = rocm.topk_softmax(logits, top_k, True)
    want_weights, want_ids = REFERENCE.topk_softmax(logits, top_k, True)
    assert torch.equal(ids.long(), want_ids.long())
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
    got = rocm.fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, REFERENCE.fused_moe(x, w13, w2, weights, ids), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 20, 40, 70])
@pytest.mark.parametrize("act_order", [False, True], ids=["groups", "act_order"])
def test_w4a16_matches_reference(rocm: RocmBackend, dtype: torch.dtype, rows: int, act_order: bool) -> None:
    """4-bit linear layers through ``RocmBackend.linear_w4a16`` (the GEMV at one token, then each row bucket of the
    family's GEMM tiles; act-order scales gathered per feature), against the ``cpu`` backend."""
    from pagedllm.backends.w4a16_linear import quantize_w4a16_act_order

    gen = torch.Generator().manual_seed(rows)
    out, inp, group_size = 80, 256, 64
    weight = torch.randn(out, inp, generator=gen) * inp**-0.5
    perm = torch.randperm(inp, generator=gen) if act_order else torch.arange(inp)
    packed, scales, zeros, g_idx = quantize_w4a16_act_order(weight, group_size, perm)
    g_idx = g_idx if act_order else None
    x, bias = torch.randn(rows, inp, generator=gen).to(dtype), torch.randn(out, generator=gen).to(dtype)
    got = rocm.linear_w4a16(x, packed, scales, zeros, group_size, g_idx, bias)
    expected = REFERENCE.linear_w4a16(x, packed, scales, zeros, group_size, g_idx, bias)
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])

