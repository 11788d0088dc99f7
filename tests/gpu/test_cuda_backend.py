"""The ``cuda`` backend on a real GPU: compiled Triton kernels in fp32/fp16/bf16 against the float32 reference
(the ``cpu`` backend on upcast inputs), and greedy generation on a tiny checkpoint equal to the ``cpu``
backend's, token for token in float32, with and without CUDA-graph capture.

Skipped on machines without CUDA (CI); run on a GPU with ``python -m pytest tests/gpu -q``. The interpreter
twins of the kernel tests (``tests/unit/test_cuda_kernels_interpreter.py``) run everywhere.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from pagedllm.backends.cpu.backend import CpuBackend  # noqa: E402
from pagedllm.backends.interface import AttentionMetadata, Backend  # noqa: E402
from pagedllm.backends.kv_storage import byte_view, to_cache_dtype  # noqa: E402

REFERENCE = CpuBackend()
GREEDY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]  # fmt: skip
# Elementwise tolerance against the float32 reference, and the bound on ||out - ref|| / ||ref||.
TOLERANCE = {
    torch.float32: ({"atol": 2e-4, "rtol": 2e-4}, 1e-5),
    torch.float16: ({"atol": 6e-3, "rtol": 6e-3}, 2e-3),
    torch.bfloat16: ({"atol": 4e-2, "rtol": 4e-2}, 1.5e-2),
}


def _helpers():
    """``make_batch`` and the attention cases of the interpreter tests (imported lazily: they need triton)."""
    from tests.unit import test_cuda_kernels_interpreter as interp

    return interp


def to_cuda(metadata: AttentionMetadata) -> AttentionMetadata:
    """The same batch with its device tensors on the GPU (host copies stay on the host)."""
    fields = {}
    for name in ("query_start_loc", "seq_lens", "context_lens", "block_tables", "slot_mapping"):
        fields[name] = getattr(metadata, name).cuda()
    return AttentionMetadata(
        num_tokens=metadata.num_tokens, num_decodes=metadata.num_decodes, max_query_len=metadata.max_query_len,
        max_seq_len=metadata.max_seq_len, block_size=metadata.block_size,
        query_start_loc_cpu=metadata.query_start_loc_cpu, seq_lens_cpu=metadata.seq_lens_cpu, **fields,
    )  # fmt: skip


def assert_close_to_reference(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Elementwise closeness and a relative-norm bound; NaN never passes."""
    tol, rel_bound = TOLERANCE[dtype]
    out, expected = out.float().cpu(), expected.float().cpu()
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    rel = ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    assert rel < rel_bound, f"relative error {rel:.2e} >= {rel_bound:.0e}"
    torch.testing.assert_close(out, expected, **tol)


def check_attention(batch, dtype: torch.dtype, **overrides: int) -> torch.Tensor:
    """Compiled kernels on ``batch.nan_cache`` (NaN in every slot no request owns) vs the float32 reference
    on the upcast inputs; returns the kernel output (on the GPU)."""
    from pagedllm.backends.triton_gpu.attention import paged_attention

    expected = REFERENCE.attention(batch.query.float(), batch.key.float(), batch.value.float(), batch.cache.float(),
                                   batch.metadata, batch.spec)  # fmt: skip
    out = paged_attention(batch.query.cuda(), batch.nan_cache.cuda(), to_cuda(batch.metadata), batch.spec,
                          **overrides)  # fmt: skip
    assert out.shape == batch.query.shape and out.dtype == dtype and out.is_cuda
    rows = batch.real_rows
    assert_close_to_reference(out[rows.cuda()], expected[rows], dtype)
    return out


# --------------------------------------------------------------------------- attention
ATTENTION_CASE_NAMES = [
    "decode", "prefill", "prefill_over_prefix", "mixed", "identity_tables", "mha", "gqa_group3", "mqa", "head80",
    "head32", "head8", "sliding_window", "block32", "long_prefill", "soft_cap", "soft_cap_window",
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASE_NAMES)
def test_attention_cases(case: str, dtype: torch.dtype) -> None:
    interp = _helpers()
    query_lens, context_lens, num_decodes, extra = interp.ATTENTION_CASES[case]
    check_attention(interp.make_batch(query_lens, context_lens, num_decodes, dtype=dtype, **extra), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["decode", "mixed", "gqa_group3", "head80", "long_prefill", "soft_cap_window"])
def test_attention_with_the_rocm_tiles(case: str, dtype: torch.dtype) -> None:
    """The ``rocm`` backend's CDNA tiles (128 x 64 prefill tiles, one stage) and RDNA tiles (64 x 16 prefill, 16-key
    decode tiles) through a real GPU compiler: not AMD's, which no machine here has, but the same kernels and tiles
    computing on a device against the reference."""
    from pagedllm.backends.rocm.tuning import cdna, rdna

    interp = _helpers()
    query_lens, context_lens, num_decodes, extra = interp.ATTENTION_CASES[case]
    batch = interp.make_batch(query_lens, context_lens, num_decodes, dtype=dtype, **extra)
    fp8 = interp.make_batch(query_lens, context_lens, num_decodes, dtype=dtype, kv_dtype=torch.float8_e4m3fn,
                            **extra)  # the 8-bit cache gfx950 and RDNA4 take  # fmt: skip
    for tuning in (cdna(), rdna()):
        check_attention(batch, dtype, tuning=tuning)
        check_attention(batch, dtype, tuning=tuning, num_splits=4)
        check_attention(fp8, dtype, tuning=tuning)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 2, 4, 8, 32])
def test_split_k_decode_with_padding_rows(num_splits: int, dtype: torch.dtype) -> None:
    batch = _helpers().make_batch([1, 1, 1], [150, 70, 3], 3, dtype=dtype, num_padding=2, seed=1)
    check_attention(batch, dtype, num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_tiles_and_window(dtype: torch.dtype) -> None:
    for window in (None, 5):
        batch = _helpers().make_batch([1, 19, 26], [9, 3, 0], 1, sliding_window=window, seed=3, dtype=dtype)
        check_attention(batch, dtype, block_m=16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama3_8b_geometry(dtype: torch.dtype) -> None:
    """32 query heads, 8 KV heads of 128, 16-token blocks: long decodes (split-K chosen from shapes), a
    fresh 600-token prefill and a 300-token chunk over a 512-token cached prefix, in one batch."""
    batch = _helpers().make_batch([1, 1, 1, 1, 600, 300], [1500, 700, 37, 0, 0, 512], 4, num_heads=32,
                                  num_kv_heads=8, head_dim=128, dtype=dtype, seed=5)  # fmt: skip
    check_attention(batch, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache_round_trip(dtype: torch.dtype) -> None:
    from pagedllm.backends.cuda.backend import CudaBackend

    backend = CudaBackend()
    num_tokens, num_kv_heads, head_dim, block_size = 37, 8, 128, 16
    qkv = torch.randn(num_tokens, (32 + 2 * num_kv_heads) * head_dim, device="cuda").to(dtype)
    key = qkv[:, 32 * head_dim : (32 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, (32 + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(10 * block_size, device="cuda")[:num_tokens]
    slots[[2, 7, 30]] = -1
    cache = torch.full(backend.kv_cache_shape(10, block_size, num_kv_heads, head_dim), 7.0, dtype=dtype,
                       device="cuda")  # fmt: skip
    expected = cache.cpu().clone()
    backend.write_kv_cache(key, value, cache, slots)
    REFERENCE.write_kv_cache(key.cpu(), value.cpu(), expected, slots.cpu())
    assert torch.equal(cache.cpu(), expected)
    keep = slots >= 0
    got_k, got_v = backend.read_kv_cache(cache, slots[keep])
    assert torch.equal(got_k, key[keep]) and torch.equal(got_v, value[keep])


FP8_KV = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]


@pytest.mark.parametrize("kv_dtype", FP8_KV)
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_fp8_kv_cache_stores_what_the_reference_stores(dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    """An e4m3 or e5m2 cache stores what the cpu backend stores, bit for bit: torch's cast (to nearest even)
    with values past the format's largest (448; 57344) saturated (torch 2.11's own e4m3 cast gives NaN there),
    NaN kept; padding rows and other slots untouched."""
    from pagedllm.backends.cuda.backend import CudaBackend

    backend = CudaBackend()
    assert kv_dtype in backend.capabilities().kv_cache_dtypes
    num_tokens, num_kv_heads, head_dim, block_size = 37, 8, 128, 16
    key = (torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda") * 200).to(dtype)  # some past 448
    value = (torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda") * 3).to(dtype)
    key[0, 0, :4] = torch.tensor([float("nan"), 6e4, -6e4, 0.0], device="cuda").to(dtype)
    slots = torch.randperm(10 * block_size, device="cuda")[:num_tokens]
    slots[[2, 7, 30]] = -1
    shape = backend.kv_cache_shape(10, block_size, num_kv_heads, head_dim)
    cache = torch.full(shape, 7.0, device="cuda").to(kv_dtype)
    expected = cache.cpu().clone()
    backend.write_kv_cache(key, value, cache, slots)
    REFERENCE.write_kv_cache(key.cpu(), value.cpu(), expected, slots.cpu())
    ours, torchs = byte_view(cache.cpu()), byte_view(expected)
    both_nan = cache.cpu().float().isnan() & expected.float().isnan()
    differ = (ours != torchs) & ~both_nan
    where = differ.nonzero()[:8].tolist()
    inputs = torch.stack([key.cpu().float(), value.cpu().float()])
    row_of_slot = {int(s): i for i, s in enumerate(slots.tolist()) if s >= 0}
    examples = []
    for kv, block, offset, head, dim in where:
        row = row_of_slot.get(block * block_size + offset)  # None: a slot no row was written to
        value_in = None if row is None else float(inputs[kv, row, head, dim])
        examples.append((value_in, int(ours[kv, block, offset, head, dim]), int(torchs[kv, block, offset, head, dim])))
    assert not differ.any(), f"{int(differ.sum())} bytes differ from torch's: (input, ours, torch) {examples}"
    assert int(both_nan.sum()) == int(expected.float().isnan().sum()) == 1
    assert float(cache.float().nan_to_num(0).abs().max()) == torch.finfo(kv_dtype).max
    keep = slots >= 0
    got_k, _ = backend.read_kv_cache(cache, slots[keep])
    want_k = to_cache_dtype(key[keep].cpu(), kv_dtype).float()
    assert torch.equal(got_k.cpu().float().nan_to_num(1234.0), want_k.nan_to_num(1234.0))  # NaN bits may differ


@pytest.mark.parametrize("kv_dtype", FP8_KV)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["decode", "prefill_over_prefix", "mixed", "gqa_group3", "head80", "long_prefill"])
def test_attention_over_fp8_cache(case: str, dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    """Keys and values stored in e4m3 or e5m2: the kernels read them converted to the query dtype (fp16 for
    bf16 queries); the reference is float32 attention over the same stored values."""
    interp = _helpers()
    query_lens, context_lens, num_decodes, extra = interp.ATTENTION_CASES[case]
    batch = interp.make_batch(query_lens, context_lens, num_decodes, dtype=dtype, kv_dtype=kv_dtype,
                              **extra)  # fmt: skip
    check_attention(batch, dtype)
    check_attention(batch, dtype, num_splits=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_fp8_kv_write_stores_what_the_reference_stores(dtype: torch.dtype) -> None:
    """``write_kv_cache_scaled`` into e4m3: the bytes the cpu backend stores (each value times the float32 inverse
    of its scale, then the saturating cast), for keys and values far past 448 before the scales."""
    from pagedllm.backends.cuda.backend import CudaBackend

    backend = CudaBackend()
    num_tokens, num_kv_heads, head_dim, block_size = 37, 8, 128, 16
    key = (torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda") * 3000).to(dtype)
    value = (torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda") * 0.01).to(dtype)
    slots = torch.randperm(10 * block_size, device="cuda")[:num_tokens]
    slots[[2, 30]] = -1
    cache = torch.full(backend.kv_cache_shape(10, block_size, num_kv_heads, head_dim), 7.0,
                       device="cuda").to(torch.float8_e4m3fn)
    expected = cache.cpu().clone()
    backend.write_kv_cache_scaled(key, value, cache, slots, 29.3, 1.7e-4)
    REFERENCE.write_kv_cache_scaled(key.cpu(), value.cpu(), expected, slots.cpu(), 29.3, 1.7e-4)
    differ = byte_view(cache.cpu()) != byte_view(expected)
    assert not differ.any(), f"{int(differ.sum())} bytes differ from the reference's"
    assert 100.0 < float(cache.float().abs().max()) <= 448.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["decode", "mixed", "long_prefill"])
def test_scaled_attention_over_fp8_cache(case: str, dtype: torch.dtype) -> None:
    """``attention_scaled`` over an e4m3 cache: the key scale in the scores, the value scale on the output,
    against the reference's scaled attention over the same stored bytes (with and without split-K)."""
    from pagedllm.backends.cuda.backend import CudaBackend
    from pagedllm.backends.triton_gpu.attention import paged_attention

    interp = _helpers()
    query_lens, context_lens, num_decodes, extra = interp.ATTENTION_CASES[case]
    batch = interp.make_batch(query_lens, context_lens, num_decodes, dtype=dtype, kv_dtype=torch.float8_e4m3fn,
                              **extra)  # fmt: skip
    k_scale, v_scale = 0.23, 41.0
    expected = REFERENCE.attention_scaled(batch.query.float(), batch.key.float(), batch.value.float(), batch.cache,
                                          batch.metadata, batch.spec, k_scale, v_scale) / v_scale
    metadata, rows = to_cuda(batch.metadata), batch.real_rows
    out = CudaBackend().attention_scaled(batch.query.cuda(), batch.key.cuda(), batch.value.cuda(),
                                         batch.nan_cache.cuda(), metadata, batch.spec, k_scale, v_scale)
    assert out.dtype == dtype
    assert_close_to_reference(out[rows.cuda()].float() / v_scale, expected[rows], dtype)
    folded = replace(batch.spec, scale=batch.spec.scale * k_scale)
    split = paged_attention(batch.query.cuda(), batch.nan_cache.cuda(), metadata, folded, num_splits=4,
                            v_scale=v_scale)
    assert_close_to_reference(split[rows.cuda()].float() / v_scale, expected[rows], dtype)


def test_bf16_queries_beyond_fp16_range_over_fp8_cache() -> None:
    """Over an 8-bit float cache, bf16 queries multiply the tiles in fp16: a query element beyond fp16's
    range is clamped to +-65504 (not made infinite), so the rows stay finite and equal attention with the
    clamped query."""
    from pagedllm.backends.triton_gpu.attention import paged_attention

    batch, expected = _helpers().bf16_batch_with_outlier_queries("mixed")
    out = paged_attention(batch.query.cuda(), batch.nan_cache.cuda(), to_cuda(batch.metadata), batch.spec)
    rows = batch.real_rows
    assert_close_to_reference(out[rows.cuda()], expected[rows], torch.bfloat16)  # finite, as it checks


def test_decode_attention_replays_in_a_graph() -> None:
    """Captured once, replayed over new lengths and block tables in the same static buffers."""
    from pagedllm.backends.triton_gpu.attention import paged_attention

    interp = _helpers()
    first = interp.make_batch([1, 1, 1, 1], [40, 3, 200, 1], 4, num_heads=8, num_kv_heads=2, head_dim=128,
                              dtype=torch.bfloat16, seed=6, permute=False)  # fmt: skip
    second = interp.make_batch([1, 1, 1, 1], [7, 90, 15, 130], 4, num_heads=8, num_kv_heads=2, head_dim=128,
                               dtype=torch.bfloat16, seed=7, permute=False)  # fmt: skip
    width = max(first.metadata.block_tables.shape[1], second.metadata.block_tables.shape[1])
    num_blocks = max(first.cache.shape[1], second.cache.shape[1])

    def padded(batch) -> tuple[torch.Tensor, AttentionMetadata]:
        cache = torch.zeros(2, num_blocks, *batch.cache.shape[2:], dtype=batch.cache.dtype)
        cache[:, : batch.cache.shape[1]] = batch.cache
        tables = torch.zeros(batch.metadata.block_tables.shape[0], width, dtype=torch.int32)
        tables[:, : batch.metadata.block_tables.shape[1]] = batch.metadata.block_tables
        batch.metadata.block_tables = tables
        return cache, batch.metadata

    cache, static = padded(first)
    cache, static, query = cache.cuda(), to_cuda(static), first.query.cuda()
    out = torch.empty_like(query)

    def step() -> None:
        out.copy_(paged_attention(query, cache, static, first.spec))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for batch in (first, second):
        new_cache, metadata = padded(batch)
        cache.copy_(new_cache.cuda())
        query.copy_(batch.query.cuda())
        static.seq_lens.copy_(metadata.seq_lens.cuda())
        static.context_lens.copy_(metadata.context_lens.cuda())
        static.block_tables.copy_(metadata.block_tables.cuda())
        graph.replay()
        expected = REFERENCE.attention(batch.query.float(), batch.key.float(), batch.value.float(),
                                       new_cache.float(), metadata, batch.spec)  # fmt: skip
        assert_close_to_reference(out, expected, torch.bfloat16)


# --------------------------------------------------------------------------- fused ops
def _fused():
    from pagedllm.backends.triton_gpu import fused_kernels

    return fused_kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 4096])
def test_rms_norm_and_add_rms_norm(dtype: torch.dtype, hidden: int) -> None:
    fused = _fused()
    x = torch.randn(33, hidden, device="cuda").to(dtype)
    residual = torch.randn(33, hidden, device="cuda").to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    expected = Backend.rms_norm(REFERENCE, x, weight, 1e-5)  # the default, same dtype, on the GPU
    torch.testing.assert_close(fused.rms_norm(x, weight, 1e-5), expected, atol=1e-6, rtol=8e-3)
    assert_close_to_reference(fused.rms_norm(x, weight, 1e-5), REFERENCE.rms_norm(x.float(), weight.float(), 1e-5),
                              dtype)  # fmt: skip
    expected_out, expected_sum = Backend.add_rms_norm(REFERENCE, x, residual.clone(), weight, 1e-5)
    out, new_residual = fused.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=8e-3)
    assert torch.equal(new_residual, expected_sum)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_rotary_embedding(dtype: torch.dtype, head_dim: int) -> None:
    fused = _fused()
    num_tokens, num_heads, num_kv_heads = 19, 32, 8
    inv_freq = 1.0 / (500000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(8192).float(), inv_freq)
    cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).cuda()
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda").to(dtype)
    query = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    before = qkv.clone()
    q_out, k_out = fused.rotary_embedding(positions, query, key, cos_sin_cache)
    q_def, k_def = Backend.rotary_embedding(REFERENCE, positions, query, key, cos_sin_cache)
    assert torch.equal(qkv, before)
    torch.testing.assert_close(q_out, q_def, atol=1e-6, rtol=1e-2)
    torch.testing.assert_close(k_out, k_def, atol=1e-6, rtol=1e-2)
    q_ref, k_ref = REFERENCE.rotary_embedding(positions.cpu(), query.float().cpu(), key.float().cpu(),
                                              cos_sin_cache.cpu())  # fmt: skip
    assert_close_to_reference(q_out, q_ref, dtype)
    assert_close_to_reference(k_out, k_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    fused = _fused()
    x = (torch.randn(37, 2 * 14336, device="cuda") * 3).to(dtype)
    out = fused.silu_and_mul(x)
    torch.testing.assert_close(out, Backend.silu_and_mul(REFERENCE, x), atol=1e-6, rtol=1e-2)
    assert_close_to_reference(out, REFERENCE.silu_and_mul(x.float().cpu()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168), (1000, 4160)])
def test_linear_takes_one_token_inputs_through_the_gemv(dtype: torch.dtype, n: int, k: int) -> None:
    """Batch-1 linear layers (the tp=2 halves of an 8B model, and an odd shape) through the Triton GEMV,
    against the float32 reference; two-token inputs stay on cuBLAS, exactly ``torch.nn.functional.linear``."""
    from pagedllm.backends.cuda.backend import CudaBackend

    backend = CudaBackend()
    weight = (torch.randn(n, k, device="cuda") * k**-0.5).to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    x = torch.randn(2, k, device="cuda").to(dtype)
    one = backend.linear(x[:1], weight, bias)
    assert one.shape == (1, n) and one.dtype == dtype
    reference = torch.nn.functional.linear(x[:1].float().cpu(), weight.float().cpu(), bias.float().cpu())
    assert_close_to_reference(one, reference, dtype)
    assert torch.equal(backend.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))


# --------------------------------------------------------------------------- engine
def _prompts(tokenizer) -> list[list[int]]:
    from pagedllm.testing.checkpoints import corpus_text

    ids = tokenizer(corpus_text(60_000)).input_ids
    long = ids[1000:1300]
    return [ids[:1], ids[5000:5007], ids[7000:7033], ids[9000:9150], long, long[:200] + ids[20:40], ids[300:317]]


MORE_ARCHS = ("ministral", "granite", "gemma2", "gemma3", "phi3", "olmo2", "qwen2_moe")
"""Architectures checked greedy against the ``cpu`` backend only (beside :data:`GREEDY_ARCHS`)."""


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pagedllm.testing.checkpoints import build_checkpoint

    return {arch: build_checkpoint(tmp_path_factory.mktemp(arch), arch)
            for arch in (*GREEDY_ARCHS, *MORE_ARCHS)}


class Completions(list):
    """The greedy token ids of each prompt (compared as a plain list of lists), with the top-2 logprobs of
    each position kept for :func:`assert_same_tokens`'s message."""

    def __init__(self, outputs: list) -> None:
        super().__init__(o.outputs[0].token_ids for o in outputs)
        self.logprobs = [o.outputs[0].logprobs for o in outputs]


def _engine(model_dir: Path, device: str, dtype: str, **kwargs: object):
    """An ``LLM`` with 64-token steps, at most 8 sequences and an 8 MiB KV cache of 16-token blocks."""
    from pagedllm import LLM

    return LLM(str(model_dir), device=device, dtype=dtype, block_size=16, max_num_batched_tokens=64,
               max_num_seqs=8, kv_cache_memory_bytes=8 << 20, **kwargs)  # fmt: skip


def _generate(model_dir: Path, device: str, dtype: str, params: list | None = None,
              **kwargs: object) -> tuple[Completions, object]:
    """Greedy completions of :func:`_prompts` (``params``: one ``SamplingParams`` per prompt, default greedy with
    top-2 logprobs)."""
    from pagedllm import SamplingParams

    llm = _engine(model_dir, device, dtype, **kwargs)
    default = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    outputs = llm.generate(_prompts(llm.get_tokenizer()), params or default, use_tqdm=False)
    return Completions(outputs), llm


def assert_same_tokens(got: Completions, expected: Completions) -> None:
    """Every prompt's tokens equal; a failure names the prompt, the first position that differs, both tokens
    and both runs' top-2 logprobs there (a near tie reads as two close values)."""
    for i, (ours, ref) in enumerate(zip(got, expected, strict=True)):
        if ours != ref:
            j = next((k for k, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), min(len(ours), len(ref)))
            raise AssertionError(f"prompt {i} diverged at token {j}: got {ours[j:j + 1]}, expected {ref[j:j + 1]}; "
                                 f"logprobs there: got {_top_logprobs(got, i, j)}, expected "
                                 f"{_top_logprobs(expected, i, j)}")


def _top_logprobs(completions: Completions, prompt: int, position: int) -> dict[int, float]:
    steps = completions.logprobs[prompt]
    return {t: round(lp.logprob, 6) for t, lp in steps[position].items()} if position < len(steps) else {}


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
@pytest.mark.parametrize("arch", [*GREEDY_ARCHS, *MORE_ARCHS])
def test_greedy_equals_cpu_fp32(tiny_checkpoints: dict[str, Path], arch: str, enforce_eager: bool) -> None:
    """Chunked prefill (64-token steps), mixed batches and decode steps; graphs replay the decode steps.
    Synchronous scheduling (the next test covers the default on ``cuda``, asynchronous)."""
    expected, _ = _generate(tiny_checkpoints[arch], "cpu", "float32")
    got, llm = _generate(tiny_checkpoints[arch], "cuda", "float32", enforce_eager=enforce_eager,
                         async_scheduling=False)
    runner = llm.llm_engine.executor.worker.runner
    assert (runner.graph_runner is None) == enforce_eager
    assert_same_tokens(got, expected)


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_async_scheduling_greedy_equals_cpu_fp32(tiny_checkpoints: dict[str, Path], enforce_eager: bool) -> None:
    """The next step launched before the previous one's tokens are read: its input tokens come from the
    sampled tokens on the GPU (through the graphs' static input buffer, or the eager path's). This is what
    ``cuda`` runs by default."""
    expected, _ = _generate(tiny_checkpoints["llama"], "cpu", "float32")
    got, llm = _generate(tiny_checkpoints["llama"], "cuda", "float32", enforce_eager=enforce_eager)
    assert llm.llm_engine.config.async_scheduling is True
    assert_same_tokens(got, expected)


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_speculative_decoding_greedy_equals_cpu_fp32(tiny_checkpoints: dict[str, Path], enforce_eager: bool) -> None:
    """Prompt-lookup drafts on ``cuda`` (eagerly, and replayed in the decode graphs as one decode row per token):
    tokens equal the ``cpu`` backend's without drafts over 96 tokens, where the tiny model's loops are predicted."""
    from pagedllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True, logprobs=2)] * 7
    expected, _ = _generate(tiny_checkpoints["llama"], "cpu", "float32", params)
    got, llm = _generate(tiny_checkpoints["llama"], "cuda", "float32", params, enforce_eager=enforce_eager,
                         speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    assert_same_tokens(got, expected)
    assert llm.llm_engine.stats().spec_decode_num_accepted_tokens > 0


def test_speculative_decoding_seeded_sampling_equals_no_drafts(tiny_checkpoints: dict[str, Path]) -> None:
    """Seeded random sampling on ``cuda`` with drafts gives the tokens it gives without them: the request's CUDA
    generator is set back past the draws of rejected positions (its state read and set on the host)."""
    from pagedllm import SamplingParams

    params = [SamplingParams(temperature=0.4, max_tokens=64, ignore_eos=True, seed=100 + i) for i in range(7)]
    expected, _ = _generate(tiny_checkpoints["llama"], "cuda", "float32", params, async_scheduling=False)
    got, llm = _generate(tiny_checkpoints["llama"], "cuda", "float32", params,
                         speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    assert_same_tokens(got, expected)
    stats = llm.llm_engine.stats()
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_lora_adapters_greedy_equal_cpu_fp32(tiny_checkpoints: dict[str, Path], tmp_path: Path,
                                             enforce_eager: bool) -> None:
    """Two LoRA adapters (every projection at rank 8; three at rank 4 with rsLoRA) and the base model
    interleaved in one batch on ``cuda`` (eagerly, and in the decode graphs, which read each row's adapter
    slot): tokens equal the ``cpu`` backend's with the same adapters (which CI holds equal to transformers + PEFT)."""
    from pagedllm import LoRARequest
    from pagedllm.testing.lora_adapters import write_lora_adapter

    model = tiny_checkpoints["llama"]
    loras = [None, LoRARequest("wide", 1, str(write_lora_adapter(model, tmp_path / "wide", r=8, seed=1))),
             LoRARequest("narrow", 2, str(write_lora_adapter(model, tmp_path / "narrow", ("q_proj", "v_proj",
                                                                                         "down_proj"),
                                                             r=4, alpha=4.0, seed=2, use_rslora=True)))]

    def run(device: str, **kwargs: object) -> Completions:
        llm = _engine(model, device, "float32", enable_lora=True, max_loras=2, max_lora_rank=8, **kwargs)
        prompts = _prompts(llm.get_tokenizer())
        from pagedllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
        batch = [p for p in prompts for _ in loras]
        outputs = llm.generate(batch, params, use_tqdm=False, lora_request=loras * len(prompts))
        return Completions(outputs)

    expected = run("cpu")
    for adapter in (1, 2):  # each adapter changes some prompt's tokens
        assert any(expected[i + adapter] != expected[i] for i in range(0, len(expected), len(loras)))
    assert_same_tokens(run("cuda", enforce_eager=enforce_eager), expected)


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_sampling_controls_equal_cpu_fp32(tiny_checkpoints: dict[str, Path], enforce_eager: bool) -> None:
    """logit_bias, allowed_token_ids, bad_words, min_tokens and a repetition penalty, one per prompt beside plain
    greedy rows, with asynchronous scheduling (the sampler's per-request tensors built on the GPU)."""
    from pagedllm import SamplingParams

    def params() -> list:
        greedy = dict(temperature=0.0, max_tokens=24, logprobs=2)
        return [SamplingParams(**greedy, ignore_eos=True), SamplingParams(**greedy, logit_bias={5: 8.0, 9: -3.0}),
                SamplingParams(**greedy, allowed_token_ids=[3, 5, 40, 41, 42, 300]),
                SamplingParams(**greedy, bad_words=["the", "def"]), SamplingParams(**greedy, min_tokens=20),
                SamplingParams(**greedy, repetition_penalty=1.3), SamplingParams(**greedy, ignore_eos=True)]

    expected, _ = _generate(tiny_checkpoints["llama"], "cpu", "float32", params())
    got, llm = _generate(tiny_checkpoints["llama"], "cuda", "float32", params(), enforce_eager=enforce_eager)
    assert llm.llm_engine.config.async_scheduling is True
    assert set(got[2]) <= {3, 5, 40, 41, 42, 300}
    assert_same_tokens(got, expected)


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_prompt_logprobs_equal_cpu_fp32(tiny_checkpoints: dict[str, Path], enforce_eager: bool) -> None:
    """Prompt logprobs over 64-token chunks (the last layer computing the sampled and the prompt rows), beside
    requests that ask for none, with asynchronous scheduling: equal to the cpu backend's within float32
    rounding, the ranks and top-2 tokens alike away from near-ties."""
    from pagedllm import SamplingParams

    def params() -> list:
        asks = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=2)
        return [asks if i % 2 else SamplingParams(temperature=0.0, max_tokens=4) for i in range(7)]

    cpu = _engine(tiny_checkpoints["llama"], "cpu", "float32")
    gpu = _engine(tiny_checkpoints["llama"], "cuda", "float32", enforce_eager=enforce_eager)
    prompts = _prompts(cpu.get_tokenizer())
    want = cpu.generate(prompts, params(), use_tqdm=False)
    got = gpu.generate(prompts, params(), use_tqdm=False)
    for i, (ours, ref) in enumerate(zip(got, want, strict=True)):
        if i % 2 == 0:
            assert ours.prompt_logprobs is None and ref.prompt_logprobs is None
            continue
        assert len(ours.prompt_logprobs) == len(ref.prompt_logprobs) == len(ref.prompt_token_ids)
        for position in range(1, len(ref.prompt_token_ids)):
            token = ref.prompt_token_ids[position]
            a, b = ours.prompt_logprobs[position], ref.prompt_logprobs[position]
            assert a[token].logprob == pytest.approx(b[token].logprob, abs=1e-4)
            assert abs(a[token].rank - b[token].rank) <= 1
            top_a, top_b = ([lp.logprob for lp in e.values() if lp.rank <= 2] for e in (a, b))
            assert sorted(top_a) == pytest.approx(sorted(top_b), abs=1e-4)


@pytest.mark.parametrize(("enforce_eager", "drafts"), [(True, False), (False, False), (False, True)],
                         ids=["eager", "graphs", "graphs-drafts"])
def test_structured_outputs_equal_cpu_fp32(tiny_checkpoints: dict[str, Path], enforce_eager: bool,
                                           drafts: bool) -> None:
    """Greedy completions under a JSON schema, a regular expression, a choice and an EBNF grammar beside free
    rows, with asynchronous scheduling (the grammars' bitmasks filled on the host, applied on the GPU), or with
    prompt-lookup drafts (synchronous; each draft row masked under the grammar's state after the drafts before
    it): equal to the cpu backend's without drafts token for token, and each finished one follows its
    structure."""
    pytest.importorskip("xgrammar")
    from pagedllm import SamplingParams
    from pagedllm.core.sampling_params import StructuredOutputsParams
    from tests.e2e.test_structured_outputs import CASES

    cases = [CASES[0], CASES[3], CASES[4], CASES[5]]

    def params() -> list:
        greedy = dict(temperature=0.0, max_tokens=48, logprobs=2)
        return [SamplingParams(**greedy, ignore_eos=True),
                *(SamplingParams(**greedy, structured_outputs=so) for so, _ in cases),
                SamplingParams(**greedy, structured_outputs=StructuredOutputsParams(json_object=True,
                                                                                    disable_any_whitespace=True)),
                SamplingParams(**greedy, ignore_eos=True)]

    cpu = _engine(tiny_checkpoints["llama"], "cpu", "float32")
    spec = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}} if drafts else {}
    gpu = _engine(tiny_checkpoints["llama"], "cuda", "float32", enforce_eager=enforce_eager, **spec)
    assert gpu.llm_engine.config.async_scheduling is not drafts
    prompts = _prompts(cpu.get_tokenizer())
    want = cpu.generate(prompts, params(), use_tqdm=False)
    got = gpu.generate(prompts, params(), use_tqdm=False)
    assert_same_tokens(Completions(got), Completions(want))
    for (_, check), out in zip(cases[:3], got[1:4], strict=True):  # the schema, the regex, the choice complete
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        check(out.outputs[0].text)
    assert re.fullmatch(r"\((?:[a-c],)*[a-c]?", got[4].outputs[0].text)  # the grammar's list: a valid prefix
    if drafts:
        assert gpu.llm_engine.stats().spec_decode_num_accepted_tokens > 0


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_embeddings_equal_cpu_fp32(tiny_checkpoints: dict[str, Path], enforce_eager: bool) -> None:
    """Last-token embeddings (the pooled rows copied to the host asynchronously; those steps never replay a
    graph) beside generation, with asynchronous scheduling: equal to the cpu backend's within float32 rounding."""
    from pagedllm import PoolingParams, SamplingParams

    cpu = _engine(tiny_checkpoints["qwen3"], "cpu", "float32")
    gpu = _engine(tiny_checkpoints["qwen3"], "cuda", "float32", enforce_eager=enforce_eager)
    prompts = _prompts(cpu.get_tokenizer())
    engine = gpu.llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"gen-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        engine.add_request(f"emb-{i}", prompt, PoolingParams(dimensions=24))
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    want = cpu.embed(prompts, PoolingParams(dimensions=24), use_tqdm=False)
    for i, expected in enumerate(want):
        got = torch.tensor(done[f"emb-{i}"].outputs.embedding)
        torch.testing.assert_close(got, torch.tensor(expected.outputs.embedding), atol=1e-4, rtol=1e-4)
    assert engine.kv_cache_usage() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_last_layer_of_sampled_rows_only(tiny_checkpoints: dict[str, Path], arch: str, dtype: torch.dtype) -> None:
    """A mixed step whose last layer computes only the sampled rows (their attention through the decode
    kernel) gives the logits of the whole batch's step (that row through the prefill kernel) and the same
    KV cache, bit for bit."""
    from tests.unit.test_sampled_rows import MIXED_STEP, run_both_ways, runner_over_random_cache

    runner = runner_over_random_cache(tiny_checkpoints[arch], device="cuda", dtype=str(dtype).split(".")[-1],
                                      block_size=16, kv_cache_memory_bytes=8 << 20, enforce_eager=True)
    logits, reference, caches, reference_caches = run_both_ways(runner, MIXED_STEP)
    assert logits.shape == reference.shape and logits.shape[0] == 3
    assert_close_to_reference(logits, reference, dtype)
    for cache, expected in zip(caches, reference_caches, strict=True):
        assert torch.equal(byte_view(cache), byte_view(expected))


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_fp8_kv_cache_greedy_equals_cpu_fp32(tiny_checkpoints: dict[str, Path], enforce_eager: bool) -> None:
    """``kv_cache_dtype="fp8"`` on both backends: the same rounded keys and values, the same tokens."""
    expected, _ = _generate(tiny_checkpoints["llama"], "cpu", "float32", kv_cache_dtype="fp8")
    got, llm = _generate(tiny_checkpoints["llama"], "cuda", "float32", enforce_eager=enforce_eager,
                         kv_cache_dtype="fp8")
    assert llm.llm_engine.executor.worker.kv_dtype == torch.float8_e4m3fn
    assert_same_tokens(got, expected)


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_fp8_kv_scales_greedy_equals_cpu_fp32(tiny_checkpoints: dict[str, Path], tmp_path: Path,
                                              enforce_eager: bool) -> None:
    """An ``-FP8-KV`` checkpoint (llm-compressor's naming) with ``kv_cache_dtype="fp8"``: each layer's cache
    holds keys and values divided by its calibrated scales, written and read by the scaled kernels; the same
    tokens as the cpu backend's."""
    from pagedllm.testing.fp8_checkpoints import write_fp8_checkpoint

    fp8_dir, _ = write_fp8_checkpoint(tiny_checkpoints["llama"], tmp_path, "compressed-tensors-static",
                                      kv_cache_scales=True)
    expected, _ = _generate(fp8_dir, "cpu", "float32", kv_cache_dtype="fp8")
    got, llm = _generate(fp8_dir, "cuda", "float32", enforce_eager=enforce_eager, kv_cache_dtype="fp8")
    layers = llm.llm_engine.executor.worker.runner.model.attention_layers()
    assert all(layer.k_scale != 1.0 and layer.v_scale != 1.0 for layer in layers)
    assert_same_tokens(got, expected)


def test_bf16_generation_runs_with_graphs(tiny_checkpoints: dict[str, Path]) -> None:
    """bf16 is not bit-equal to the cpu backend (different summation orders); it must run, stay in the
    vocabulary and agree with the cpu backend's bf16 greedy tokens on most prompts' first tokens."""
    got, llm = _generate(tiny_checkpoints["llama"], "cuda", "bfloat16")
    expected, _ = _generate(tiny_checkpoints["llama"], "cpu", "bfloat16")
    vocab = llm.llm_engine.model_config.vocab_size
    assert all(len(t) == 24 and all(0 <= x < vocab for x in t) for t in got)
    agree = sum(ours[:4] == ref[:4] for ours, ref in zip(got, expected, strict=True))
    assert agree >= len(got) // 2, f"only {agree}/{len(got)} prompts agree on their first 4 tokens"


def test_kv_budget_from_memory_utilization() -> None:
    """``total * utilization`` minus torch's peak since ``weights_loaded`` and the memory outside torch's pool:
    weights loaded in the model dtype then freed (an fp8 quantization) are not held against the pool."""
    import gc

    from pagedllm.backends.cuda.backend import CudaBackend

    gc.collect()
    backend = CudaBackend()
    backend.init_device(0, 1)
    loaded = torch.empty(10 << 30, dtype=torch.uint8, device="cuda")  # 10 GiB of weights, then quantized
    held = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB stored "weights"
    del loaded
    backend.weights_loaded()
    transient = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")  # a profiling forward's activations
    del transient
    total = torch.cuda.mem_get_info()[1]
    budget = backend.kv_cache_budget_bytes(0.5)
    assert budget <= 0.5 * total - (1.5 * 2**30)
    assert budget > 0.5 * total - (1.5 * 2**30) - (8 << 30)  # context and workspaces take far less than 8 GiB
    torch.empty(budget, dtype=torch.uint8, device="cuda")  # and it can be allocated now
    del held


# --------------------------------------------------------------------------- no compiles once started
COMPILE_CONFIGS = {
    "bf16": {"dtype": "bfloat16"},
    "fp32": {"dtype": "float32"},
    "bf16-fp8": {"dtype": "bfloat16", "kv_cache_dtype": "fp8", "quantization": "fp8"},
}


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
@pytest.mark.parametrize("config", list(COMPILE_CONFIGS))
def test_no_kernel_compiles_once_started(tiny_checkpoints: dict[str, Path], config: str, enforce_eager: bool) -> None:
    """Once ``LLM(...)`` has returned, no request shape makes a Triton kernel compile (each would stall a
    step): the engine's start (profiling run, decode graphs or their eager warm-up) compiled every variant
    its steps launch."""
    from pagedllm import LLM
    from pagedllm.backends.cuda.backend import CudaBackend
    from pagedllm.testing.triton_compiles import TritonCompiles, forget_compiled, run_workloads

    claims = CudaBackend().capabilities()
    if "quantization" in COMPILE_CONFIGS[config] and "fp8" not in claims.quantizations:
        pytest.skip("this GPU runs no fp8 linear layers")
    forget_compiled("pagedllm.backends")  # as in a fresh process: earlier tests compiled some variants
    llm = LLM(str(tiny_checkpoints["llama"]), device="cuda", block_size=16, max_num_batched_tokens=128,
              max_num_seqs=32, kv_cache_memory_bytes=32 << 20, enforce_eager=enforce_eager,
              **COMPILE_CONFIGS[config])  # fmt: skip
    with TritonCompiles() as compiles:
        run_workloads(llm, compiles)
    assert not compiles.records, "kernels compiled after start:\n" + compiles.report()
