"""The ``cuda`` backend's Triton kernels run on the CPU under Triton's interpreter, against the ``cpu``
reference backend (float32 PyTorch) and the ``Backend`` default fused ops.

The kernel modules are imported privately with ``TRITON_INTERPRET=1`` (the interpreter is chosen when
``@triton.jit`` decorates a function), then ``sys.modules`` is restored, so a GPU test later in the same
session still gets compiled kernels. Shapes are tiny: the interpreter runs every program in Python.
bfloat16 is left to the GPU tests (the interpreter mishandles some bf16 element-wise operations).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.cuda.backend import CudaBackend
from pagedllm.backends.interface import AttentionMetadata, AttentionSpec
from pagedllm.backends.kv_storage import to_cache_dtype
from tests.unit.triton_compile import compile_kernel

KERNEL_MODULES = (
    "attention_common",
    "decode_attention",
    "prefill_attention",
    "attention",
    "kv_cache_kernels",
    "fused_kernels",
    "gemv",
    "fp8_linear",
    "fused_moe",
    "w4a16_linear",
)
TOLERANCE = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 3e-3, "rtol": 3e-3}}
REFERENCE = CpuBackend()


@pytest.fixture(scope="module")
def interpreted_modules() -> SimpleNamespace:
    """The kernel modules imported with ``TRITON_INTERPRET=1``, without leaving them in ``sys.modules``."""
    package = importlib.import_module("pagedllm.backends.triton_gpu")
    names = [f"{package.__name__}.{m}" for m in KERNEL_MODULES]
    saved_modules = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    saved_attrs = {m: getattr(package, m) for m in KERNEL_MODULES if hasattr(package, m)}
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return SimpleNamespace(**{m: importlib.import_module(f"{package.__name__}.{m}") for m in KERNEL_MODULES})
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved_modules)
        for m in KERNEL_MODULES:
            if m in saved_attrs:
                setattr(package, m, saved_attrs[m])
            elif hasattr(package, m):
                delattr(package, m)


@pytest.fixture
def kernels(interpreted_modules: SimpleNamespace) -> Iterator[SimpleNamespace]:
    """The interpreted kernel modules, with triton's language patched for the interpreter during the test.

    ``@triton.jit`` picks the interpreter when it decorates a function, and triton's own standard library
    (``tl.sum``, ``tl.max``, ``tl.cdiv``, ...) was decorated when triton was first imported, usually
    compiled: during the test those functions are swapped for interpreted twins (what setting
    ``TRITON_INTERPRET=1`` before importing triton would give). The interpreter also patches
    ``triton.language`` itself and, for nested calls, never restores ``triton.language.core``; so the
    attributes of every ``triton.language*`` namespace and patched class are snapshotted before the test and
    put back after it, and compiled kernels (``test_kernels_compile_for_sm90``, GPU tests) see triton as
    it was.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with contextlib.suppress(ImportError):  # imported by the first launch; it must wrap the originals
        importlib.import_module("triton.experimental.gluon")
    modules = [m for n, m in list(sys.modules.items()) if m is not None and n.startswith("triton.language")]
    classes = [tl.tensor, tl.dtype, tl.core.condition, tl.core.tensor_descriptor_base]
    snapshots = [(obj, dict(vars(obj))) for obj in modules + classes]
    for module in modules:
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                setattr(module, attr, _TWINS.setdefault(id(value), InterpretedFunction(value.fn)))
    try:
        yield interpreted_modules
    finally:
        for obj, saved in snapshots:  # names the interpreter added (its helpers) stay: it caches code using them
            current = vars(obj)
            for attr, value in saved.items():
                if current.get(attr, _MISSING) is not value:
                    setattr(obj, attr, value)


_TWINS: dict[int, object] = {}
"""Interpreted twins by id of the compiled function (hashing a JITFunction parses its source), kept across
tests because the interpreter caches its rewrite of each function."""
_MISSING = object()


# --------------------------------------------------------------------------- batch factory
@dataclass
class Batch:
    """A mixed batch with its KV cache: ``cache`` for the reference (finite garbage in unused slots) and
    ``nan_cache`` for the kernels (NaN in every slot no request owns, so any stray read shows)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cache: torch.Tensor
    nan_cache: torch.Tensor
    metadata: AttentionMetadata
    spec: AttentionSpec
    real_rows: torch.Tensor


def make_batch(
    query_lens: list[int],
    context_lens: list[int],
    num_decodes: int,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    block_size: int = 16,
    sliding_window: int | None = None,
    num_padding: int = 0,
    permute: bool = True,
    seed: int = 0,
    kv_dtype: torch.dtype | None = None,
    logits_soft_cap: float | None = None,
) -> Batch:
    """Requests with ``query_lens`` new tokens over ``context_lens`` cached ones (the first ``num_decodes``
    have one new token), then ``num_padding`` captured-graph padding requests (``seq_len`` alternately 0
    and 1, slot -1, a block table row of zeros) inserted after the decodes. Blocks come from a random
    permutation of the pool (block 0 stays the null block) unless ``permute`` is False. The cache holds
    ``kv_dtype`` (default: ``dtype``), written by the reference backend."""
    gen = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or dtype
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    ids = torch.randperm(num_blocks - 1, generator=gen) + 1 if permute else torch.arange(1, num_blocks)
    max_blocks = max(blocks_per_seq) + 1
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks_per_seq):
        tables[r, :n] = ids[used : used + n].int()
        used += n

    def slots_of(r: int, positions: range) -> torch.Tensor:
        return torch.tensor([int(tables[r, p // block_size]) * block_size + p % block_size for p in positions])

    shape = REFERENCE.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    cache = to_cache_dtype(torch.randn(shape, generator=gen) * 100, kv_dtype)
    nan_cache = torch.full(shape, float("nan"), dtype=kv_dtype)
    for r, s in enumerate(seq_lens):
        kv = torch.randn(2, s, num_kv_heads, head_dim, generator=gen).to(dtype)
        for target in (cache, nan_cache):
            REFERENCE.write_kv_cache(kv[0], kv[1], target, slots_of(r, range(s)))
    # This step's keys/values are the cache rows at the new positions (write_kv_cache ran before attention).
    new_slots = torch.cat(
        [slots_of(r, range(c, s)) for r, (c, s) in enumerate(zip(context_lens, seq_lens, strict=True))]
    )
    key, value = (t.to(dtype) for t in REFERENCE.read_kv_cache(cache, new_slots))

    # Insert padding requests after the decodes: one token each, slot -1.
    pad_seq = [i % 2 for i in range(num_padding)]
    seq_all = seq_lens[:num_decodes] + pad_seq + seq_lens[num_decodes:]
    ctx_all = context_lens[:num_decodes] + [0] * num_padding + context_lens[num_decodes:]
    q_all = query_lens[:num_decodes] + [1] * num_padding + query_lens[num_decodes:]
    tables = torch.cat([tables[:num_decodes], torch.zeros(num_padding, max_blocks, dtype=torch.int32),
                        tables[num_decodes:]])  # fmt: skip
    n_dec = sum(query_lens[:num_decodes])
    slot_mapping = torch.cat([new_slots[:n_dec], torch.full((num_padding,), -1), new_slots[n_dec:]]).long()
    real_rows = torch.cat([torch.arange(n_dec), torch.arange(n_dec + num_padding, len(slot_mapping))])
    key = torch.cat([key[:n_dec], torch.zeros(num_padding, *key.shape[1:], dtype=dtype), key[n_dec:]])
    value = torch.cat([value[:n_dec], torch.zeros(num_padding, *value.shape[1:], dtype=dtype), value[n_dec:]])
    query_start = torch.tensor([0, *torch.tensor(q_all).cumsum(0).tolist()], dtype=torch.int32)
    metadata = AttentionMetadata(
        num_tokens=len(slot_mapping),
        num_decodes=num_decodes + num_padding,
        query_start_loc=query_start,
        seq_lens=torch.tensor(seq_all, dtype=torch.int32),
        context_lens=torch.tensor(ctx_all, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=slot_mapping,
        max_query_len=max(q_all),
        max_seq_len=max(seq_all),
        block_size=block_size,
        query_start_loc_cpu=query_start.clone(),
        seq_lens_cpu=torch.tensor(seq_all, dtype=torch.int32),
    )
    query = torch.randn(len(slot_mapping), num_heads, head_dim, generator=gen).to(dtype)
    spec = AttentionSpec(num_heads, num_kv_heads, head_dim, head_dim**-0.5, sliding_window, logits_soft_cap)
    return Batch(query, key, value, cache, nan_cache, metadata, spec, real_rows)


def check_attention(kernels: SimpleNamespace, batch: Batch, **overrides: int) -> torch.Tensor:
    """Run the kernels on ``batch.nan_cache`` and compare the real rows with the reference; return output."""
    expected = REFERENCE.attention(batch.query, batch.key, batch.value, batch.cache, batch.metadata, batch.spec)
    out = kernels.attention.paged_attention(batch.query, batch.nan_cache, batch.metadata, batch.spec, **overrides)
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    rows = batch.real_rows
    torch.testing.assert_close(out[rows].float(), expected[rows].float(), **TOLERANCE[batch.query.dtype])
    return out


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


# --------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache_round_trip_skips_padding(kernels: SimpleNamespace, dtype: torch.dtype) -> None:
    num_tokens, num_kv_heads, head_dim, block_size = 10, 3, 80, 16
    qkv = torch.randn(num_tokens, (4 + 2 * num_kv_heads) * head_dim).to(dtype)  # K/V as views of fused QKV
    key = qkv[:, 4 * head_dim : (4 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, (4 + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(6 * block_size)[:num_tokens]
    slots[[2, 7]] = -1
    cache = torch.zeros(CudaBackend().kv_cache_shape(6, block_size, num_kv_heads, head_dim), dtype=dtype)
    expected = cache.clone()
    kernels.kv_cache_kernels.write_kv_cache(key, value, cache, slots)
    REFERENCE.write_kv_cache(key, value, expected, slots)
    assert torch.equal(cache, expected)
    keep = slots >= 0
    got_k, got_v = CudaBackend().read_kv_cache(cache, slots[keep])
    assert torch.equal(got_k, key[keep]) and torch.equal(got_v, value[keep])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_write_kv_cache(kernels: SimpleNamespace, dtype: torch.dtype) -> None:
    """With scales the kernel stores each value times the float32 inverse of its scale, bit for bit as the
    reference (``kv_storage.divide_by_scale``), padding rows skipped."""
    num_tokens, num_kv_heads, head_dim, block_size = 12, 2, 64, 16
    key = (torch.randn(num_tokens, num_kv_heads, head_dim) * 300).to(dtype)
    value = (torch.randn(num_tokens, num_kv_heads, head_dim) * 7).to(dtype)
    slots = torch.randperm(4 * block_size)[:num_tokens]
    slots[[0, 5]] = -1
    cache = torch.zeros(CudaBackend().kv_cache_shape(4, block_size, num_kv_heads, head_dim), dtype=dtype)
    expected = cache.clone()
    kernels.kv_cache_kernels.write_kv_cache(key, value, cache, slots, 3.7, 0.3)
    REFERENCE.write_kv_cache_scaled(key, value, expected, slots, 3.7, 0.3)
    assert torch.equal(cache, expected)
    assert not torch.equal(cache, torch.zeros_like(cache))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["decode", "mixed", "long_prefill"])
def test_scaled_attention(kernels: SimpleNamespace, case: str, dtype: torch.dtype) -> None:
    """Over a cache of scaled keys and values, as ``CudaBackend.attention_scaled`` calls the kernels (the key
    scale in ``spec.scale``, the value scale inside the kernels), against the reference's scaled attention;
    with and without split-K."""
    query_lens, context_lens, num_decodes, extra = ATTENTION_CASES[case]
    batch = make_batch(query_lens, context_lens, num_decodes, dtype=dtype, **extra)
    k_scale, v_scale = 0.37, 5.0
    expected = REFERENCE.attention_scaled(batch.query, batch.key, batch.value, batch.cache, batch.metadata, batch.spec,
                                          k_scale, v_scale)
    folded = replace(batch.spec, scale=batch.spec.scale * k_scale)
    rows = batch.real_rows
    for splits in (None, 4):
        out = kernels.attention.paged_attention(batch.query, batch.nan_cache, batch.metadata, folded,
                                                num_splits=splits, v_scale=v_scale)
        torch.testing.assert_close(out[rows].float() / v_scale, expected[rows].float() / v_scale,
                                   **TOLERANCE[dtype])


# --------------------------------------------------------------------------- attention
ATTENTION_CASES = {
    # name: (query_lens, context_lens, num_decodes, extra make_batch arguments)
    "decode": ([1, 1, 1], [5, 37, 0], 3, {}),
    "prefill": ([7, 20], [0, 0], 0, {}),
    "prefill_over_prefix": ([5, 12], [16, 21], 0, {}),
    "mixed": ([1, 1, 9, 3], [30, 3, 0, 40], 2, {}),
    "identity_tables": ([1, 6], [20, 11], 1, {"permute": False}),
    "mha": ([1, 8], [19, 6], 1, {"num_heads": 2, "num_kv_heads": 2}),
    "gqa_group3": ([1, 8], [19, 6], 1, {"num_heads": 6, "num_kv_heads": 2}),
    "mqa": ([1, 8], [19, 6], 1, {"num_heads": 4, "num_kv_heads": 1}),
    "head80": ([1, 10], [23, 9], 1, {"head_dim": 80}),
    "head32": ([1, 10], [23, 9], 1, {"head_dim": 32}),
    "head8": ([1, 10], [23, 9], 1, {"head_dim": 8, "num_heads": 2, "num_kv_heads": 1}),
    "sliding_window": ([1, 1, 12, 5], [40, 4, 0, 30], 2, {"sliding_window": 7}),
    "block32": ([1, 9], [45, 30], 1, {"block_size": 32}),
    # key tiles wholly before a query tile's first position run unmasked: long prefixes and prompts
    "long_prefill": ([1, 40, 90], [100, 70, 0], 1, {}),
    # Gemma 2's soft-capped scores (a cap of 1 binds on these unit-scale scores), alone and in a window
    "soft_cap": ([1, 1, 40, 9], [100, 3, 0, 40], 2, {"logits_soft_cap": 1.0}),
    "soft_cap_window": ([1, 12, 5], [40, 0, 30], 1, {"logits_soft_cap": 1.0, "sliding_window": 7}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_reference(kernels: SimpleNamespace, case: str, dtype: torch.dtype) -> None:
    query_lens, context_lens, num_decodes, extra = ATTENTION_CASES[case]
    check_attention(kernels, make_batch(query_lens, context_lens, num_decodes, dtype=dtype, **extra))


FP8_KV = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]


@pytest.mark.parametrize("kv_dtype", FP8_KV)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["decode", "mixed", "long_prefill", "gqa_group3", "head80"])
def test_attention_over_fp8_cache(kernels: SimpleNamespace, case: str, dtype: torch.dtype,
                                  kv_dtype: torch.dtype) -> None:
    """An fp8 (e4m3 or e5m2) cache, written by the reference: the kernels convert its tiles to the query dtype
    as they load them. (The fp8 store is the GPU's: the interpreter rounds to fp8 its own way.)"""
    query_lens, context_lens, num_decodes, extra = ATTENTION_CASES[case]
    batch = make_batch(query_lens, context_lens, num_decodes, dtype=dtype, kv_dtype=kv_dtype, **extra)
    check_attention(kernels, batch)
    check_attention(kernels, batch, num_splits=4)


@pytest.mark.parametrize("num_splits", [None, 4])
def test_decode_rows_of_one_sequence(kernels: SimpleNamespace, num_splits: int | None) -> None:
    """Each new token of two requests as a decode row of its own (speculative decoding's draft rows): the split-K
    decode kernel gives what attention over the requests as chunks gives."""
    from pagedllm.conformance.reference import as_decode_rows

    batch = make_batch([4, 3, 1], [19, 6, 30], 0, seed=5)
    expected = REFERENCE.attention(batch.query, batch.key, batch.value, batch.cache, batch.metadata, batch.spec)
    out = kernels.attention.paged_attention(batch.query, batch.nan_cache, as_decode_rows(batch.metadata), batch.spec,
                                            num_splits=num_splits)
    rows = batch.real_rows
    torch.testing.assert_close(out[rows].float(), expected[rows].float(), **TOLERANCE[batch.query.dtype])


def test_prefill_tiles_split_requests(kernels: SimpleNamespace) -> None:
    """Several query tiles per request (16-row tiles, GQA group 2: 8 tokens a tile) and a window."""
    for window in (None, 5):
        batch = make_batch([1, 19, 26], [9, 3, 0], 1, sliding_window=window, seed=3)
        check_attention(kernels, batch, block_m=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 2, 4, 8])
def test_split_k_decode_with_padding_rows(kernels: SimpleNamespace, num_splits: int, dtype: torch.dtype) -> None:
    """Long decodes cut into splits (8 splits > tiles of some requests: empty splits), plus captured-graph
    padding requests that must neither crash nor disturb the real rows."""
    batch = make_batch([1, 1, 1], [150, 70, 3], 3, dtype=dtype, num_padding=2, seed=1)
    out = check_attention(kernels, batch, num_splits=num_splits)
    assert out.shape[0] == 5


def test_split_k_decode_with_sliding_window(kernels: SimpleNamespace) -> None:
    batch = make_batch([1, 1, 5], [200, 90, 100], 2, sliding_window=70, seed=2)
    check_attention(kernels, batch, num_splits=4)


def test_split_k_decode_with_soft_cap(kernels: SimpleNamespace) -> None:
    """Soft-capped scores merged across splits; the cap changes the result (the check is not vacuous)."""
    batch = make_batch([1, 1], [150, 70], 2, logits_soft_cap=1.0, seed=4)
    out = check_attention(kernels, batch, num_splits=4)
    uncapped = REFERENCE.attention(batch.query, batch.key, batch.value, batch.cache, batch.metadata,
                                   replace(batch.spec, logits_soft_cap=None))
    assert not torch.allclose(out[batch.real_rows].float(), uncapped[batch.real_rows].float(), atol=1e-2)


def test_write_then_attend_through_kernels(kernels: SimpleNamespace) -> None:
    """The hot path as the model runs it: kernel KV write of this step's tokens, then kernel attention."""
    batch = make_batch([1, 7], [12, 20], 1, num_padding=1, seed=4)
    cache = batch.nan_cache.clone()
    num_kv_heads, head_dim = cache.shape[-2:]
    cache.view(2, -1, num_kv_heads, head_dim)[:, batch.metadata.slot_mapping[batch.real_rows]] = float("nan")
    kernels.kv_cache_kernels.write_kv_cache(batch.key, batch.value, cache, batch.metadata.slot_mapping)
    batch.nan_cache = cache
    check_attention(kernels, batch)


def test_choose_num_splits_depends_on_shapes_only(kernels: SimpleNamespace) -> None:
    choose = kernels.decode_attention.choose_num_splits
    assert choose(1, 8, 8192, 64, num_sms=132) == 32  # one long request: fill the GPU
    assert choose(256, 8, 8192, 64, num_sms=132) == 1  # a big batch already fills it
    assert choose(1, 8, 256, 64, num_sms=132) == 1  # short contexts: splitting buys nothing
    assert all(choose(b, 8, 4096, 64, 132) & (choose(b, 8, 4096, 64, 132) - 1) == 0 for b in range(1, 300))


# --------------------------------------------------------------------------- fused ops
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_add_rms_norm(kernels: SimpleNamespace, dtype: torch.dtype) -> None:
    x = torch.randn(5, 96).to(dtype)
    residual = torch.randn(5, 96).to(dtype)
    weight = (1 + 0.1 * torch.randn(96)).to(dtype)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(
        kernels.fused_kernels.rms_norm(x, weight, 1e-6), REFERENCE.rms_norm(x, weight, 1e-6), **tol
    )
    expected_out, expected_sum = REFERENCE.add_rms_norm(x, residual.clone(), weight, 1e-5)
    out, new_residual = kernels.fused_kernels.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(out, expected_out, **tol)
    assert torch.equal(new_residual, expected_sum)  # the sum, rounded to dtype like the default
    x3 = torch.randn(3, 2, 64).to(dtype)  # per-head norm (q_norm/k_norm): leading dims kept
    w3 = torch.randn(64).to(dtype)
    torch.testing.assert_close(kernels.fused_kernels.rms_norm(x3, w3, 1e-6), REFERENCE.rms_norm(x3, w3, 1e-6), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_rotary_embedding(kernels: SimpleNamespace, head_dim: int, dtype: torch.dtype) -> None:
    num_tokens, num_heads, num_kv_heads = 6, 3, 1
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(64).float(), inv_freq)
    cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    query = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)  # strided views, as models pass
    key = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.tensor([0, 5, 63, 1, 17, 2])
    before = qkv.clone()
    q_out, k_out = kernels.fused_kernels.rotary_embedding(positions, query, key, cos_sin_cache)
    q_ref, k_ref = REFERENCE.rotary_embedding(positions, query, key, cos_sin_cache)
    assert torch.equal(qkv, before)
    torch.testing.assert_close(q_out, q_ref, **TOLERANCE[dtype])
    torch.testing.assert_close(k_out, k_ref, **TOLERANCE[dtype])
    # with Qwen3's per-head q/k norms first (qk_norm_rotary_embedding), against the default's two steps
    q_weight, k_weight = (1 + 0.2 * torch.randn(head_dim)).to(dtype), (1 + 0.2 * torch.randn(head_dim)).to(dtype)
    query.mul_(3.0).add_(0.5)  # an offset mean: RMS and std differ, as in real activations
    normed = kernels.fused_kernels.rotary_embedding(positions, query, key, cos_sin_cache,
                                                    head_norms=(q_weight, k_weight, 1e-6))
    expected = REFERENCE.qk_norm_rotary_embedding(positions, query, key, q_weight, k_weight, 1e-6, cos_sin_cache)
    for got, want in zip(normed, expected, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert not torch.allclose(normed[0], q_ref, **TOLERANCE[dtype])  # the norm did something


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(kernels: SimpleNamespace, dtype: torch.dtype) -> None:
    x = (torch.randn(4, 2 * 1100) * 3).to(dtype)  # 1100 columns: two column blocks, the second partial
    torch.testing.assert_close(kernels.fused_kernels.silu_and_mul(x), REFERENCE.silu_and_mul(x), **TOLERANCE[dtype])


@pytest.mark.parametrize("gemv_max_tokens", [0, 1 << 20], ids=["gemm", "gemv"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 8, 2), (5, 8, 3), (40, 4, 2)])
def test_fused_moe_matches_reference(kernels: SimpleNamespace, dtype: torch.dtype, tokens: int, experts: int,
                                     top_k: int, gemv_max_tokens: int) -> None:
    """The two grouped GEMMs over expert blocks, and the few-token GEMVs, against the expert-by-expert
    reference; 40 tokens over 4 experts fill more than one 64-row block per expert (and share experts in the
    GEMVs); columns (72, 48) and reductions (48, 36) not multiples of the tiles."""
    from pagedllm.backends.moe import moe_reference, route_tokens

    gen = torch.Generator().manual_seed(tokens)
    hidden, inter = 48, 36
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    weights, ids = route_tokens(torch.randn(tokens, experts, generator=gen), top_k, renormalize=True)
    got = kernels.fused_moe.fused_moe(x, w13, w2, weights, ids, kernels.fused_kernels.silu_and_mul,
                                      gemv_max_tokens=gemv_max_tokens)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, moe_reference(x, w13, w2, weights, ids), **TOLERANCE[dtype])


@pytest.mark.parametrize("at_once", [2, 4])
def test_fused_moe_gemv_loads_experts_together(kernels: SimpleNamespace, at_once: int) -> None:
    """The down GEMV loading several experts' tiles at once: 3 experts per token in loads of 2 (a partial second
    load) and of 4 (one masked slot)."""
    from pagedllm.backends.moe import moe_reference, route_tokens

    gen = torch.Generator().manual_seed(at_once)
    tokens, experts, top_k, hidden, inter = 3, 8, 3, 48, 36
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    weights, ids = route_tokens(torch.randn(tokens, experts, generator=gen), top_k, renormalize=True)
    got = kernels.fused_moe.fused_moe_gemv(x, w13, w2, weights, ids, tiles=(8, 64, 4, 4, 64, 1, at_once))
    torch.testing.assert_close(got, moe_reference(x, w13, w2, weights, ids), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "top_k", "renormalize", "rounded"),
                         [(3, 8, 2, True, False), (1, 128, 8, True, True), (6, 60, 4, False, True),
                          (4, 5, 5, False, False)])
def test_topk_softmax_matches_route_tokens(kernels: SimpleNamespace, dtype: torch.dtype, tokens: int, experts: int,
                                           top_k: int, renormalize: bool, rounded: bool) -> None:
    """The one-program router against torch's softmax and top-k: the same experts in the same order, the same
    weights (renormalized, rounded through ``dtype``); expert counts and ``top_k`` not powers of two, and
    every expert picked."""
    from pagedllm.backends.moe import route_tokens

    gen = torch.Generator().manual_seed(experts)
    steps = torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)])
    logits = ((steps.float() - experts / 2) / 8).to(dtype)  # distinct: no ties for the two top-k to break
    round_to = dtype if rounded else None
    weights, ids = kernels.fused_moe.topk_softmax(logits, top_k, renormalize, round_to)
    want_weights, want_ids = route_tokens(logits, top_k, renormalize, round_to)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=torch.finfo(dtype).eps if rounded else 1e-6, atol=1e-7)


def _assert_quantized_like(got: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor, kernels: SimpleNamespace,
                           rtol: float) -> None:
    """``got = (q, scale)`` is the interpreted quantizer's output on ``values`` (the unfused op's): scales
    within ``rtol`` (sums of squares in another order), nearly every e4m3 byte equal. Against the
    interpreted quantizer, not the reference, because the interpreter's fp8 cast does not round to nearest
    (it can even drop a carry into the exponent); bit-exactness against the reference is checked on the GPU."""
    q, scale = got
    want_q, want_scale = kernels.fp8_linear.quantize_rows(values)
    assert q.dtype == torch.float8_e4m3fn and q.shape == values.shape and scale.dtype == torch.float32
    torch.testing.assert_close(scale, want_scale, rtol=rtol, atol=0.0)
    same = (q.view(torch.uint8) == want_q.view(torch.uint8)).float().mean().item()
    assert same >= 0.98, f"only {same:.1%} of the e4m3 values equal the unfused op's"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_input_ops(kernels: SimpleNamespace, dtype: torch.dtype) -> None:
    """RMSNorm (with and without the residual add) and SiLU-and-mul quantizing their outputs per token for an
    fp8 projection: the unfused op's output, quantized; the residual sum as ``add_rms_norm``'s. The GEMV of
    an input quantized already equals the reference product."""
    from pagedllm.backends.fp8_linear import quantize_rows, reference_linear_fp8_quantized

    rtol = {torch.float32: 1e-5, torch.float16: 1e-3}[dtype]
    x, residual = (2 * torch.randn(5, 96) + 1).to(dtype), torch.randn(5, 96).to(dtype)
    weight = (1 + 0.1 * torch.randn(96)).to(dtype)
    _assert_quantized_like(kernels.fused_kernels.rms_norm_fp8(x, weight, 1e-6), REFERENCE.rms_norm(x, weight, 1e-6),
                           kernels, rtol)
    expected_out, expected_sum = REFERENCE.add_rms_norm(x, residual.clone(), weight, 1e-5)
    q, scale, new_residual = kernels.fused_kernels.add_rms_norm_fp8(x, residual, weight, 1e-5)
    _assert_quantized_like((q, scale), expected_out, kernels, rtol)
    assert torch.equal(new_residual, expected_sum)
    gate_up = (torch.randn(4, 2 * 1100) * 3).to(dtype)
    _assert_quantized_like(kernels.fused_kernels.silu_and_mul_fp8(gate_up), REFERENCE.silu_and_mul(gate_up),
                           kernels, rtol)
    x_q, x_scale = quantize_rows(torch.randn(1, 256))
    w_q, w_scale = quantize_rows(torch.randn(70, 256) / 16)
    bias = torch.randn(70).to(dtype)
    got = kernels.gemv.gemv_fp8_quantized(x_q, x_scale, w_q, w_scale, bias, dtype, config=(16, 64, 4))
    assert got is not None and got.dtype == dtype
    torch.testing.assert_close(got, reference_linear_fp8_quantized(x_q, x_scale, w_q, w_scale, bias, dtype),
                               **TOLERANCE[dtype])
    assert kernels.gemv.gemv_fp8_quantized(x_q, x_scale[None], w_q, w_scale, None, dtype) is None  # scale [1, 1]
    assert kernels.gemv.gemv_fp8_quantized(x_q.float(), x_scale, w_q, w_scale, None, dtype) is None  # not e4m3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "bias"), [(80, 256, True), (1030, 128, False), (4100, 192, True)])
def test_gemv_matches_linear(kernels: SimpleNamespace, n: int, k: int, bias: bool, dtype: torch.dtype) -> None:
    """One-token linear layers: partial row blocks (n not a multiple of BLOCK_N), every K tile size rule."""
    x = torch.randn(1, k).to(dtype)
    weight = (torch.randn(n, k) * k**-0.5).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    got = kernels.gemv.gemv(x, weight, b)
    assert got is not None and got.shape == (1, n) and got.dtype == dtype
    expected = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
    torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype])


def test_gemv_declines_what_it_does_not_take(kernels: SimpleNamespace) -> None:
    gemv = kernels.gemv.gemv
    weight = torch.randn(32, 128)
    assert gemv(torch.randn(2, 128), weight) is None  # two rows: a GEMM's job
    assert gemv(torch.randn(1, 100), torch.randn(32, 100)) is None  # K not a multiple of 64
    assert gemv(torch.randn(1, 128), weight.t().contiguous().t()) is None  # K not the unit-stride dim
    assert gemv(torch.randn(1, 128).half(), weight) is None  # mixed dtypes
    assert kernels.gemv.gemv_config(128256, 4096) == (16, 256, 4)  # the LM head: short tiles, many programs
    assert kernels.gemv.gemv_config(3072, 4096) == (8, 1024, 8)


def _on_fp8_grid(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Inputs the per-token quantizer maps onto e4m3 exactly (each row: e4m3 values, 448 among them, times a
    power of two), so the interpreter's fp8 cast, which does not round to nearest, cannot differ from it."""
    from pagedllm.backends.fp8_linear import quantize_rows

    grid, _ = quantize_rows(torch.randn(rows, cols))
    grid[:, 0] = 448.0
    return (grid.float() * 2.0 ** torch.arange(-6, rows - 6).float()[:, None]).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_quantizer_and_gemv(kernels: SimpleNamespace, dtype: torch.dtype) -> None:
    """The Triton per-token quantizer gives the reference's scales (any input) and values (inputs on the
    e4m3 grid), and so does the quantizer with a static scale; the fp8 GEMV, which quantizes its input itself,
    computes the reference fp8 linear layer."""
    from pagedllm.backends.fp8_linear import quantize_rows, quantize_with_scale, reference_linear_fp8

    x = torch.randn(5, 300).to(dtype) * 7
    x[2] = 0  # an all-zero row: the smallest scale, zeros
    got_q, got_scale = kernels.fp8_linear.quantize_rows(x)
    want_q, want_scale = quantize_rows(x)
    assert torch.equal(got_scale, want_scale) and got_q.dtype == want_q.dtype == torch.float8_e4m3fn
    on_grid = _on_fp8_grid(5, 300, dtype)
    got_q, _ = kernels.fp8_linear.quantize_rows(on_grid)
    assert torch.equal(got_q.view(torch.uint8), quantize_rows(on_grid)[0].view(torch.uint8))
    weight, weight_scale = quantize_rows(torch.randn(70, 256) / 16)
    for bias, config in ((None, (16, 64, 4)), (torch.randn(70).to(dtype), None)):  # None: (8, 256, 4)
        x1 = _on_fp8_grid(1, 256, dtype)
        got = kernels.gemv.gemv_fp8(x1, weight, weight_scale, bias, config=config)
        assert got is not None and got.shape == (1, 70) and got.dtype == dtype
        torch.testing.assert_close(got.float(), reference_linear_fp8(x1, weight, weight_scale, bias).float(),
                                   **TOLERANCE[dtype])
    # a static input scale (fp8 checkpoints with input_scale): values on its grid, the largest saturating
    static = on_grid[:, :128] * 0.5
    scale = torch.tensor([2.0**-7])  # 448 * 2^-7 = 3.5: the rows scaled by 2^-6 fit, the larger saturate
    got_q, got_scale = kernels.fp8_linear.quantize_with_scale(static, scale)
    want_q, want_scale = quantize_with_scale(static, scale)
    assert torch.equal(got_scale, want_scale) and torch.equal(got_scale, scale.expand(5))
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)) and got_q.float().abs().max() == 448
    assert kernels.gemv.gemv_fp8(torch.randn(2, 256), weight, weight_scale) is None  # two rows: a GEMM's job
    assert kernels.gemv.gemv_fp8(torch.randn(1, 256), weight.float(), weight_scale) is None  # not e4m3
    assert kernels.gemv.gemv_fp8_config(28672, 4096) == (16, 512, 4)  # gate|up: wide, shorter tiles
    assert kernels.gemv.gemv_fp8_config(4096, 14336) == (8, 1024, 4)
    assert kernels.gemv.gemv_fp8_config(70, 320) == (8, 64, 4) and kernels.gemv.gemv_fp8_config(70, 300) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_group_input_ops(kernels: SimpleNamespace, dtype: torch.dtype) -> None:
    """The same ops quantizing per token and group of 128 (``"fp8_block"`` inputs; groups of unlike magnitudes,
    a short last group, 5 rows): the interpreted group quantizer's scales and nearly every byte, the scales
    returned as ``[rows, groups]`` views of storage laid out for cuBLAS (rows padded to 8, column-major),
    which ``as_group_operands`` widens back without a copy. The GEMV of a quantized input equals the
    reference product."""
    from pagedllm.backends.fp8_linear import quantize_blocks, quantize_groups, reference_linear_fp8_block_quantized

    fp8 = kernels.fp8_linear
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3}[dtype]
    magnitudes = torch.tensor([1.0, 2.0**-6, 8.0]).repeat_interleave(128)[:300]
    x, residual = ((2 * torch.randn(5, 300) + 1) * magnitudes).to(dtype), torch.randn(5, 300).to(dtype)
    weight = (1 + 0.1 * torch.randn(300)).to(dtype)

    def check(got: tuple[torch.Tensor, ...], values: torch.Tensor) -> None:
        q, scale = got[:2]
        want_q, want_scale = fp8.quantize_groups(values, 8)
        assert q.shape == values.shape and scale.shape == (5, 3) and scale.stride() == (1, 8)
        torch.testing.assert_close(scale, want_scale[:, :5].t(), rtol=rtol, atol=0.0)
        same = (q.view(torch.uint8) == want_q[:5].view(torch.uint8)).float().mean().item()
        assert same >= 0.98, f"only {same:.1%} of the e4m3 values equal the unfused op's"
        padded_q, padded_scale = fp8.as_group_operands(q, scale)
        assert padded_q.shape == (8, 300) and padded_q.data_ptr() == q.data_ptr()
        assert padded_scale.shape == (3, 8) and padded_scale.data_ptr() == scale.data_ptr()

    fused = kernels.fused_kernels
    check(fused.rms_norm_fp8(x, weight, 1e-6, quantize="groups"), REFERENCE.rms_norm(x, weight, 1e-6))
    expected_out, expected_sum = REFERENCE.add_rms_norm(x, residual.clone(), weight, 1e-5)
    got = fused.add_rms_norm_fp8(x, residual, weight, 1e-5, quantize="groups")
    check(got, expected_out)
    assert torch.equal(got[2], expected_sum)
    gate_up = torch.randn(5, 600)
    gate_up[:, 300:] *= magnitudes
    check(fused.silu_and_mul_fp8(gate_up.to(dtype), quantize="groups"), REFERENCE.silu_and_mul(gate_up.to(dtype)))
    small = fused.rms_norm_fp8(x[:, :64], weight[:64], 1e-6, quantize="groups")  # narrower than one group
    assert small[1].shape == (5, 1) and small[0].shape == (5, 64)
    copied_q, copied_scale = fp8.as_group_operands(*quantize_groups(x))  # another layout: copied, padded
    assert copied_q.shape == (8, 300) and copied_scale.shape == (3, 8) and torch.equal(copied_scale[:, 5:],
                                                                                       torch.ones(3, 3))
    x_q, x_scale = quantize_groups(torch.randn(1, 512) * magnitudes.repeat(2)[:512])
    w_q, w_scale = quantize_blocks(torch.randn(200, 512) / 16)
    bias = torch.randn(200).to(dtype)
    got = kernels.gemv.gemv_fp8_block_quantized(x_q, x_scale, w_q, w_scale, bias, dtype, config=(16, 256, 4))
    assert got is not None and got.dtype == dtype
    want = reference_linear_fp8_block_quantized(x_q, x_scale, w_q, w_scale, bias, dtype).float()
    tol = TOLERANCE[dtype]["rtol"]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert kernels.gemv.gemv_fp8_block_quantized(x_q, x_scale[:, :2], w_q, w_scale, None, dtype) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_group_quantizer(kernels: SimpleNamespace, dtype: torch.dtype) -> None:
    """``"fp8_block"`` inputs: the Triton per-group quantizer gives the reference's scales (any input, a short
    last group, an all-zero group) transposed, and its values (inputs on the e4m3 grid); the rows padded to
    a multiple of four are zeros. The product itself (cuBLAS's block scales) runs on the GPU only; shapes it
    declines and float32 go through the reference."""
    from pagedllm.backends.fp8_linear import quantize_blocks, quantize_groups, reference_linear_fp8_block

    x = torch.randn(5, 300).to(dtype) * 7
    x[1, 128:256] = 0
    got_q, got_scale = kernels.fp8_linear.quantize_groups(x, 8)
    _, want_scale = quantize_groups(x)
    assert got_q.shape == (8, 300) and got_scale.shape == (3, 8) and got_q.dtype == torch.float8_e4m3fn
    assert torch.equal(got_scale[:, :5].t(), want_scale)
    assert not got_q[5:].float().any() and torch.equal(got_scale[:, 5:], torch.full((3, 3), 1e-12))
    on_grid = torch.cat([_on_fp8_grid(5, 128, dtype), _on_fp8_grid(5, 128, dtype).flip(0)], dim=1)
    got_q, _ = kernels.fp8_linear.quantize_groups(on_grid, 5)
    assert torch.equal(got_q.view(torch.uint8), quantize_groups(on_grid)[0].view(torch.uint8))
    weight, weight_scale = quantize_blocks(torch.randn(256, 384) / 16)
    takes = kernels.fp8_linear.block_product_takes
    assert takes(4096, 14336, torch.bfloat16) and takes(256, 512, torch.float16)
    assert not takes(256, 384, torch.bfloat16)  # three groups: cuBLAS summed them wrong (fp8_gemm_probe.py --block)
    assert not takes(200, 512, torch.bfloat16) and not takes(256, 512, torch.float32)
    x = torch.randn(3, 384).to(dtype)
    torch.testing.assert_close(kernels.fp8_linear.linear_fp8_block(x, weight, weight_scale),
                               reference_linear_fp8_block(x, weight, weight_scale), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_block_gemv(kernels: SimpleNamespace, dtype: torch.dtype) -> None:
    """One token through the GEMV with tile scales: each 128-feature group of the input quantized with its own
    scale (groups 2^12 apart, on the e4m3 grid so the interpreter's cast rounds as the reference does), each
    group's sums scaled by its input and tile scales; a partial last row of tiles, a bias."""
    from pagedllm.backends.fp8_linear import quantize_blocks, reference_linear_fp8_block

    x = torch.cat([_on_fp8_grid(1, 128, dtype) * 2.0 ** (12 * (g % 2) - 6) for g in range(4)], dim=1).to(dtype)
    weight, weight_scale = quantize_blocks(torch.randn(200, 512) / 16 * torch.tensor([1.0, 64.0]).repeat(256))
    gemv_fp8_block = kernels.gemv.gemv_fp8_block
    for bias, config in ((None, (16, 256, 4)), (torch.randn(200).to(dtype), None)):  # None: (8, 512, 4)
        got = gemv_fp8_block(x, weight, weight_scale, bias, config=config)
        assert got is not None and got.shape == (1, 200) and got.dtype == dtype
        want = reference_linear_fp8_block(x, weight, weight_scale, bias).float()
        tol = TOLERANCE[dtype]["rtol"]  # the groups' sums cancel: errors relative to the largest output
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert gemv_fp8_block(x, weight, weight_scale, config=(16, 64, 4)) is None  # a tile shorter than a group
    assert gemv_fp8_block(x, weight, weight_scale[:, :2]) is None  # scales of another shape
    assert gemv_fp8_block(torch.cat([x, x]), weight, weight_scale) is None  # two rows: a GEMM's job


# --------------------------------------------------------------------------- backend identity
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given on a machine without CUDA")
def test_is_available_says_why_not() -> None:
    ok, reason = CudaBackend.is_available()
    assert ok is False
    assert "CUDA" in reason or "ROCm" in reason


def test_identity_and_capabilities() -> None:
    backend = CudaBackend()
    assert (backend.name, backend.device_type, backend.dist_backend, backend.priority) == ("cuda", "cuda", "nccl", 10)
    caps = backend.capabilities()
    assert caps.block_sizes[0] == 16 and caps.can_capture_graphs and caps.supports_sliding_window
    assert caps.runs_asynchronously  # asynchronous scheduling by default
    # no GPU here: the scheduler defaults of GPUs under 70 GiB
    assert (caps.default_max_num_seqs, caps.default_max_num_batched_tokens) == (256, 8192)
    assert {64, 80, 128, 256} <= set(caps.head_sizes)
    assert backend.kv_cache_shape(7, 16, 2, 64) == (2, 7, 16, 2, 64)


@pytest.mark.parametrize(("capability", "cuda", "kv_fp8", "quantizations"), [
    ((8, 0), "13.0", False, ("w4a16",)), ((8, 9), "13.0", True, ("w4a16",)), ((9, 0), "12.8", True, ("fp8", "w4a16")),
    ((9, 0), "13.0", True, ("fp8", "fp8_block", "w4a16")), ((10, 0), "13.0", True, ("fp8", "w4a16")),
])  # fmt: skip
def test_fp8_claims_follow_the_compute_capability(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                                  cuda: str, kv_fp8: bool, quantizations: tuple[str, ...]) -> None:
    """The fp8 KV cache from 8.9 (Triton's e4m3 conversions), fp8 linear layers from 9.0 (where the row-wise
    scaled e4m3 product has run), tile scales on Hopper with CUDA 12.9 or later (cuBLAS's block scales); 4-bit
    weights (Triton kernels, compiled for sm_80 and sm_90 in the tests) everywhere."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(total_memory=80 << 30))
    monkeypatch.setattr(torch.version, "cuda", cuda)
    caps = CudaBackend().capabilities()
    assert (torch.float8_e4m3fn in caps.kv_cache_dtypes) == (torch.float8_e5m2 in caps.kv_cache_dtypes) == kv_fp8
    assert caps.quantizations == quantizations
    assert caps.default_max_num_seqs == 1024  # an 80 GiB GPU


def test_interpreted_kernels_do_not_leak(interpreted_modules: SimpleNamespace) -> None:
    """A GPU test later in the session must get compiled kernels, not the interpreted ones."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    assert isinstance(interpreted_modules.decode_attention._decode_split_kernel, InterpretedFunction)
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    module = importlib.import_module("pagedllm.backends.triton_gpu.decode_attention")
    assert module is not interpreted_modules.decode_attention
    assert isinstance(module._decode_split_kernel, JITFunction)
    assert isinstance(tl.sum, JITFunction) and isinstance(tl.cdiv, JITFunction)


def _compile_sm90(kernel: object, pointers: dict[str, str], constexprs: dict[str, object], **options: object) -> None:
    """Compile ``kernel`` for an H100 (sm_90) without a GPU (:func:`compile_kernel`)."""
    compile_kernel(kernel, pointers, constexprs, ("cuda", 90, 32), **options)


def test_kernels_compile_for_sm90() -> None:
    """The real compiler (not the interpreter) accepts the kernels: bf16 GQA decode/prefill, fused ops."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton ships no ptxas here")
    pytest.importorskip("triton.compiler")
    import triton.language as tl

    from pagedllm.backends.cuda import allreduce_norm
    from pagedllm.backends.triton_gpu import (
        decode_attention,
        fp8_linear,
        fused_kernels,
        fused_moe,
        gemv,
        kv_cache_kernels,
        prefill_attention,
    )

    bf16 = {n: "*bf16" for n in ("out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr", "key_ptr", "value_ptr")}
    ints = {n: "*i32" for n in ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr", "context_lens_ptr")}
    attention = {**bf16, **ints, "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32"}
    geometry = {"GROUP": 4, "HEAD_DIM": 80, "BLOCK_D": 128, "BLOCK_SIZE": 16, "SLIDING_WINDOW": 0}
    for v_scaled in (False, True):
        _compile_sm90(
            decode_attention._decode_split_kernel, attention,
            {**geometry, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 4, "DOT_PRECISION": "tf32",
             "UNMASKED_TILES": True, "V_SCALED": v_scaled}, num_warps=4, enable_fp_fusion=True,
        )  # fmt: skip
    _compile_sm90(
        decode_attention._decode_reduce_kernel, attention,
        {"HEAD_DIM": 80, "BLOCK_D": 128, "NUM_SPLITS": 4, "BLOCK_S": 4}, num_warps=4, enable_fp_fusion=True,
    )  # fmt: skip
    _compile_sm90(
        prefill_attention._prefill_kernel, attention,
        {**geometry, "BLOCK_M": 64, "BLOCK_Q": 16, "BLOCK_N": 32, "DOT_PRECISION": "tf32", "UNMASKED_TILES": True,
         "V_SCALED": False}, num_warps=4, enable_fp_fusion=True,
    )  # fmt: skip
    # fp32 MQA (the conformance kit's Qwen2): one masked loop, as the backend launches it for fp32
    fp32_attention = {**attention, **{n: "*fp32" for n in bf16}}
    _compile_sm90(
        prefill_attention._prefill_kernel, fp32_attention,
        {"GROUP": 4, "HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_SIZE": 16, "SLIDING_WINDOW": 0, "BLOCK_M": 32,
         "BLOCK_Q": 8, "BLOCK_N": 32, "DOT_PRECISION": "ieee", "UNMASKED_TILES": False, "V_SCALED": False},
        num_warps=4, num_stages=2, enable_fp_fusion=True,
    )  # fmt: skip
    for kv_type, scaled in (("*bf16", False), ("*fp8e4nv", False), ("*fp8e4nv", True), ("*fp8e5", True)):
        _compile_sm90(
            kv_cache_kernels._write_kv_kernel, {**bf16, "slot_mapping_ptr": "*i64", "k_cache_ptr": kv_type,
                                                "v_cache_ptr": kv_type},
            {"NUM_KV_HEADS": 8, "HEAD_DIM": 80, "BLOCK_H": 8, "BLOCK_D": 128, "BLOCK_SIZE": 16, "SCALED": scaled},
            enable_fp_fusion=False,
        )  # fmt: skip
    # an fp8 (e4m3) KV cache under bf16 queries: the tiles are converted to fp16 as they are loaded
    fp8_attention = {**attention, "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv"}
    fp8_geometry = {**geometry, "HEAD_DIM": 128}
    for fp8_type in ("*fp8e4nv", "*fp8e5"):
        _compile_sm90(
            decode_attention._decode_split_kernel, {**attention, "k_cache_ptr": fp8_type, "v_cache_ptr": fp8_type},
            {**fp8_geometry, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 1, "DOT_PRECISION": "tf32",
             "UNMASKED_TILES": True, "V_SCALED": True}, num_warps=4, num_stages=2, enable_fp_fusion=True,
        )  # fmt: skip
    _compile_sm90(
        prefill_attention._prefill_kernel, fp8_attention,
        {**fp8_geometry, "BLOCK_M": 64, "BLOCK_Q": 16, "BLOCK_N": 32, "DOT_PRECISION": "tf32", "UNMASKED_TILES": True,
         "V_SCALED": True}, num_warps=4, num_stages=2, enable_fp_fusion=True,
    )  # fmt: skip
    fused = {n: "*bf16" for n in ("out_ptr", "x_ptr", "residual_ptr", "weight_ptr", "q_out_ptr", "k_out_ptr", "k_ptr")}
    fused.update(q_ptr="*bf16", positions_ptr="*i64", cos_sin_ptr="*fp32", scale_ptr="*fp32")
    _compile_sm90(fused_kernels._rms_norm_kernel, fused,
                  {"HAS_RESIDUAL": True, "QUANTIZE": False, "ROUND_TO": tl.bfloat16, "BLOCK": 4096, "GROUP": 0},
                  num_warps=8, enable_fp_fusion=False)  # fmt: skip
    _compile_sm90(
        fused_kernels._rotary_kernel, fused,
        {"NUM_Q_HEADS": 32, "NUM_K_HEADS": 8, "HALF": 40, "BLOCK_HQ": 32, "BLOCK_HK": 8, "BLOCK_HALF": 64,
         "NORM": False}, enable_fp_fusion=False,
    )  # fmt: skip
    _compile_sm90(  # with Qwen3's q/k norms (head_dim 128)
        fused_kernels._rotary_kernel, {**fused, "q_weight_ptr": "*bf16", "k_weight_ptr": "*bf16"},
        {"NUM_Q_HEADS": 32, "NUM_K_HEADS": 8, "HALF": 64, "BLOCK_HQ": 32, "BLOCK_HK": 8, "BLOCK_HALF": 64,
         "NORM": True}, enable_fp_fusion=False,
    )  # fmt: skip
    _compile_sm90(fused_kernels._silu_and_mul_kernel, fused, {"BLOCK": 1024}, enable_fp_fusion=False)
    _compile_sm90(gemv._gemv_kernel, {"y_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16"},
                  {"HAS_BIAS": True, "BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4)  # fmt: skip
    # fp8 linear layers: the one-token GEMV over e4m3 weights, the per-token quantizer of the GEMM path
    for x_quantized in (False, True):  # the input quantized inside the GEMV, or given in e4m3 with its scale
        _compile_sm90(
            gemv._gemv_fp8_kernel,
            {"y_ptr": "*bf16", "x_ptr": "*fp8e4nv" if x_quantized else "*bf16", "x_scale_ptr": "*fp32",
             "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16"},
            {"HAS_BIAS": False, "BLOCK_N": 8, "BLOCK_K": 1024, "GROUP": 16, "X_QUANTIZED": x_quantized}, num_warps=4,
        )  # fmt: skip
    # the norm and the activation quantizing their outputs for an fp8 projection
    for group in (0, 128):  # per token; per token and group of 128 (fp8_block)
        _compile_sm90(fused_kernels._silu_and_mul_fp8_kernel,
                      {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "x_ptr": "*bf16"}, {"BLOCK": 16384, "GROUP": group},
                      num_warps=16, enable_fp_fusion=False)  # fmt: skip
        _compile_sm90(fused_kernels._rms_norm_kernel, {**fused, "out_ptr": "*fp8e4nv"},
                      {"HAS_RESIDUAL": True, "QUANTIZE": True, "ROUND_TO": tl.bfloat16, "BLOCK": 4096, "GROUP": group},
                      num_warps=8, enable_fp_fusion=False)  # fmt: skip
    quantizer = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
    _compile_sm90(fp8_linear._quantize_rows_kernel, quantizer, {"BLOCK": 16384}, num_warps=16)
    _compile_sm90(fp8_linear._quantize_with_scale_kernel, {**quantizer, "row_scale_ptr": "*fp32"}, {"BLOCK": 16384},
                  num_warps=16)
    # "fp8_block": the input quantized per token and 128 features (14336 features: 112 groups, padded to 128),
    # and the one-token GEMV with tile scales
    _compile_sm90(fp8_linear._quantize_groups_kernel, quantizer, {"GROUPS": 128, "GROUP": 128}, num_warps=16)
    for x_quantized in (False, True):
        _compile_sm90(
            gemv._gemv_fp8_block_kernel,
            {"y_ptr": "*bf16", "x_ptr": "*fp8e4nv" if x_quantized else "*bf16", "x_scale_ptr": "*fp32",
             "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16"},
            {"HAS_BIAS": True, "BLOCK_N": 8, "BLOCK_K": 1024, "GROUP": 16, "TILE": 128, "X_QUANTIZED": x_quantized},
            num_warps=4,
        )  # fmt: skip
    # mixture of experts: the grouped GEMM of the gate|up rows (rows are tokens) and of the down rows (weighted)
    moe = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "sorted_ids_ptr": "*i32", "block_experts_ptr": "*i32",
           "weights_ptr": "*fp32"}
    for rows_are_tokens in (True, False):
        _compile_sm90(
            fused_moe._moe_gemm_kernel, moe,
            {"NUM_EXPERTS": 128, "TOP_K": 8, "ROWS_ARE_TOKENS": rows_are_tokens, "MUL_WEIGHTS": not rows_are_tokens,
             "DOT_PRECISION": "tf32", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3,
        )  # fmt: skip
    # the tensor-parallel all-reduce + RMSNorm: peer pointers from int64, polling volatile loads
    for bits, dtype in ((16, "*bf16"), (32, "*fp32")):
        typed = {n: dtype for n in ("out_ptr", "x_ptr", "residual_ptr", "weight_ptr")}
        _compile_sm90(
            allreduce_norm._all_reduce_add_rms_norm_kernel, {**typed, "buffer_ptrs": "*i64", "epoch_ptr": "*i32"},
            {"RANK": 1, "WORLD": 2, "BITS": bits, "NUM_SLOTS": 3, "BLOCK": 4096}, num_warps=8, enable_fp_fusion=False,
        )  # fmt: skip


@pytest.mark.parametrize(("name", "cls"), [("cuda", "CudaBackend"), ("rocm", "RocmBackend")])
def test_plugin_registers_backend_without_importing_triton(name: str, cls: str) -> None:
    """Loading the GPU plugins and listing their claims import no triton (nor compile anything)."""
    code = (
        "import sys\n"
        "from pagedllm.backends.registry import PluginRegistry\n"
        f"from pagedllm.backends.{name}.backend import {cls}\n"
        "entries = PluginRegistry(load_entry_points=False).backends()\n"
        f"assert entries[{name!r}].backend_cls is {cls}, entries\n"
        f"{cls}().capabilities()\n"
        "assert 'triton' not in sys.modules, 'triton imported too early'\n"
    )
    root = str(Path(importlib.import_module("pagedllm").__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def bf16_batch_with_outlier_queries(case: str) -> tuple[Batch, torch.Tensor]:
    """A bf16 batch of ``ATTENTION_CASES[case]`` over an e4m3 cache whose queries hold two elements beyond
    fp16's range (1e6, -3e5), and the float32 reference attention with them clamped to +-65504: what the
    cuda kernels compute, since bf16 queries over an 8-bit float cache multiply the tiles in fp16."""
    query_lens, context_lens, num_decodes, extra = ATTENTION_CASES[case]
    batch = make_batch(query_lens, context_lens, num_decodes, dtype=torch.bfloat16, kv_dtype=torch.float8_e4m3fn,
                       **extra)  # fmt: skip
    batch.query[0, 0, 0], batch.query[-1, -1, 1] = 1e6, -3e5
    clamped = batch.query.float().clamp(-65504, 65504)
    expected = REFERENCE.attention(clamped, batch.key.float(), batch.value.float(), batch.cache.float(),
                                   batch.metadata, batch.spec)  # fmt: skip
    return batch, expected


@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_bf16_queries_over_fp8_cache(kernels: SimpleNamespace, case: str) -> None:
    """bf16 queries over an e4m3 cache: the tiles' products run in fp16 (every e4m3 value is exact there),
    with query elements beyond fp16's range clamped to +-65504 rather than made infinite. The tolerance is
    the bf16 output's rounding. (Under the interpreter the former bf16 products gave garbage here: its
    fp8-to-bf16 conversion is wrong; the GPU tests cover the device's numerics.)"""
    batch, expected = bf16_batch_with_outlier_queries(case)
    rows = batch.real_rows
    for num_splits in (1, 4):
        out = kernels.attention.paged_attention(batch.query, batch.nan_cache, batch.metadata, batch.spec,
                                                num_splits=num_splits)  # fmt: skip
        assert torch.isfinite(out[rows]).all()
        torch.testing.assert_close(out[rows].float(), expected[rows].float(), atol=8e-3, rtol=8e-3)
