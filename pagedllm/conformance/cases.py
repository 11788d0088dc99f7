"""Which cases the kit runs, derived from what the backend claims.

Every value the backend claims is covered at least once, and the values the issue requires of every
backend (dtypes float32/float16/bfloat16, head sizes 64/80/128) are always generated: those the backend
does not claim become skipped cases whose reason says so, so the final report shows exactly what was
not tested. Rather than the full product (thousands of cases), the kit crosses the scenarios with the
head layouts and dtypes at a base head and block size, then sweeps each claimed head size and each
claimed block size over the mixed-batch scenario.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from pagedllm.backends.interface import AttentionSpec, BackendCapabilities
from pagedllm.conformance.reference import RequestShape

STANDARD_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
REQUIRED_HEAD_SIZES: tuple[int, ...] = (64, 80, 128)
HEAD_LAYOUTS: dict[str, tuple[int, int]] = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1)}
"""Layout name -> (num_heads, num_kv_heads)."""
SCENARIOS: tuple[str, ...] = ("decode", "prefill", "prefix_prefill", "mixed")
PADDING_TOKENS = 5
"""Padding rows (slot -1) appended by the ``padded`` cases on backends without static shapes."""
K_SCALE = 1000.0
V_SCALE = 300.0
"""The KV-cache scales of the ``kv_scaled`` cases: keys and values that large saturate an unscaled 8-bit cache
(e4m3's largest value is 448), and neither is a power of two, so a scale used the wrong way round shows."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> "bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def scenario_requests(scenario: str, block_size: int) -> list[RequestShape]:
    """Return the requests of one scenario, sized in blocks so they cross block boundaries.

    ``decode``: one new token over contexts from 0 to two blocks and more; ``prefill``: prompts from
    scratch; ``prefix_prefill``: new tokens over cached full blocks, and one chunk resuming mid-block;
    ``mixed``: decodes and prefills together; ``window``: long enough for a sliding window to cut in;
    ``soft_cap``: decodes and prefills, some over cached blocks, long enough for a window too.
    """
    bs = block_size
    shapes = {
        "decode": [(0, 1), (1, 1), (bs - 1, 1), (bs, 1), (2 * bs + 3, 1)],
        "prefill": [(0, 2), (0, bs + 1), (0, 2 * bs + 5), (0, 7)],
        "prefix_prefill": [(bs, 3), (2 * bs, bs + 2), (bs + 3, 5), (4 * bs, 2)],
        "mixed": [(5, 1), (0, 7), (2 * bs + 1, 1), (bs, bs + 3), (3, 4)],
        "window": [(3 * bs + 2, 1), (2 * bs, 6), (0, 2 * bs + 3)],
        "soft_cap": [(3 * bs + 2, 1), (bs - 1, 1), (2 * bs, 6), (0, 2 * bs + 3)],
    }[scenario]
    return [RequestShape(context_len, query_len) for context_len, query_len in shapes]


def sliding_window_for(block_size: int) -> int:
    """A window shorter than the ``window`` scenario's sequences and not a multiple of the block size."""
    return block_size + 3


SOFT_CAP = 1.0
"""The soft cap of the ``soft_cap`` attention cases."""


@dataclass(frozen=True, slots=True)
class AttentionCase:
    """One attention test: scenario, head layout and size, block size, dtypes, optional window."""

    scenario: str
    layout: str
    head_dim: int
    block_size: int
    dtype: torch.dtype
    kv_dtype: torch.dtype
    sliding_window: int | None = None
    padded: bool = False
    logits_soft_cap: float | None = None
    """Set (the ``soft_cap`` cases): scores soft-capped as Gemma 2's are."""
    k_scale: float = 1.0
    v_scale: float = 1.0
    """Other than 1.0 (the ``kv_scaled`` cases): the cache holds keys and values divided by these, written and
    read through ``write_kv_cache_scaled`` / ``attention_scaled``."""

    @property
    def num_heads(self) -> int:
        """Query heads."""
        return HEAD_LAYOUTS[self.layout][0]

    @property
    def num_kv_heads(self) -> int:
        """KV heads."""
        return HEAD_LAYOUTS[self.layout][1]

    def spec(self) -> AttentionSpec:
        """The layer constants of this case (scale ``head_dim ** -0.5``)."""
        return AttentionSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5,
                             self.sliding_window, self.logits_soft_cap)

    def requests(self) -> list[RequestShape]:
        """The batch's requests."""
        scenario = "window" if self.sliding_window else self.scenario
        if scenario in ("padded", "kv_only", "kv_scaled"):
            scenario = "mixed"
        return scenario_requests(scenario, self.block_size)

    def id_parts(self) -> tuple[object, ...]:
        """Parts of the test id after the backend name."""
        parts: list[object] = [self.scenario, self.layout, f"h{self.head_dim}", f"b{self.block_size}", self.dtype]
        if self.kv_dtype != self.dtype:
            parts.append(f"kv_{dtype_name(self.kv_dtype)}")
        if self.sliding_window:
            parts.append(f"w{self.sliding_window}")
        if self.logits_soft_cap:
            parts.append(f"cap{self.logits_soft_cap:g}")
        return tuple(parts)


def num_padding_tokens(num_tokens: int, capabilities: BackendCapabilities, padded: bool) -> int | None:
    """Padding rows to append: up to the smallest token bucket on static-shape backends, else
    :data:`PADDING_TOKENS` for ``padded`` cases and 0 otherwise. None when no bucket is large enough."""
    if capabilities.needs_static_shapes:
        fitting = [b for b in capabilities.token_buckets if b >= num_tokens + (1 if padded else 0)]
        return min(fitting) - num_tokens if fitting else None
    return PADDING_TOKENS if padded else 0


def base_head_size(capabilities: BackendCapabilities) -> int:
    """64 if claimed, else 128 or 80, else the first claimed head size."""
    for size in (64, 128, 80):
        if size in capabilities.head_sizes:
            return size
    return capabilities.head_sizes[0]


def base_block_size(capabilities: BackendCapabilities) -> int:
    """16 if claimed (the engine's default), else the first claimed block size."""
    return 16 if 16 in capabilities.block_sizes else capabilities.block_sizes[0]


def all_dtypes(capabilities: BackendCapabilities) -> list[torch.dtype]:
    """The standard dtypes, then any other dtype the backend claims."""
    return list(STANDARD_DTYPES) + [d for d in capabilities.dtypes if d not in STANDARD_DTYPES]


def dtype_skip(capabilities: BackendCapabilities, dtype: torch.dtype) -> str | None:
    """The skip reason for a dtype the backend does not claim, else None."""
    if dtype in capabilities.dtypes:
        return None
    claimed = ", ".join(dtype_name(d) for d in capabilities.dtypes)
    return f"dtype {dtype_name(dtype)} not claimed (claims {claimed})"


def param(case_id: str, *values: object, skip: str | None = None) -> object:
    """``pytest.param(*values, id=case_id)``, skipped with ``skip`` as the reason when given."""
    marks = [pytest.mark.skip(reason=skip)] if skip else []
    return pytest.param(*values, id=case_id, marks=marks)


def attention_cases(capabilities: BackendCapabilities) -> Iterator[tuple[AttentionCase, str | None]]:
    """Yield every distinct attention case with its skip reason (None: run it)."""
    seen: set[AttentionCase] = set()
    for case, skip in _attention_cases(capabilities):
        if case not in seen:
            seen.add(case)
            yield case, skip


def _attention_cases(capabilities: BackendCapabilities) -> Iterator[tuple[AttentionCase, str | None]]:
    head, block = base_head_size(capabilities), base_block_size(capabilities)
    claimed_dtypes = list(capabilities.dtypes)
    # scenarios x head layouts x dtypes at the base sizes
    for scenario in SCENARIOS:
        for layout in HEAD_LAYOUTS:
            for dtype in all_dtypes(capabilities):
                yield AttentionCase(scenario, layout, head, block, dtype, dtype), dtype_skip(capabilities, dtype)
    # each head size (required or claimed) and each claimed block size, over a mixed GQA batch
    for size in sorted(set(REQUIRED_HEAD_SIZES) | set(capabilities.head_sizes)):
        skip = None if size in capabilities.head_sizes else (
            f"head size {size} not claimed (claims {', '.join(map(str, sorted(capabilities.head_sizes)))})")
        for dtype in claimed_dtypes:
            yield AttentionCase("mixed", "gqa", size, block, dtype, dtype), skip
    for size in sorted(capabilities.block_sizes):
        for dtype in claimed_dtypes:
            yield AttentionCase("mixed", "gqa", head, size, dtype, dtype), None
    # KV-only cache formats (e.g. fp8): every model dtype stored in them
    kv_only = list(kv_only_cases(capabilities))
    for dtype, kv_dtype in kv_only:
        yield AttentionCase("kv_only", "gqa", head, block, dtype, kv_dtype), None
    if not kv_only:
        yield (AttentionCase("kv_only", "gqa", head, block, claimed_dtypes[0], claimed_dtypes[0]),
               "no KV-only cache dtype claimed (every kv_cache_dtype is a model dtype, tested above)")
    # the same caches holding scaled keys and values (the per-layer scales of -FP8-KV checkpoints)
    scales = {"k_scale": K_SCALE, "v_scale": V_SCALE}
    for dtype, kv_dtype in kv_only:
        yield AttentionCase("kv_scaled", "gqa", head, block, dtype, kv_dtype, **scales), None
    if not kv_only:
        yield (AttentionCase("kv_scaled", "gqa", head, block, claimed_dtypes[0], claimed_dtypes[0], **scales),
               "no KV-only cache dtype claimed (scales are taken by 8-bit caches)")
    # sliding window and padding rows
    window = sliding_window_for(block)
    skip = None if capabilities.supports_sliding_window else "sliding window not claimed"
    for dtype in claimed_dtypes:
        yield AttentionCase("window", "gqa", head, block, dtype, dtype, sliding_window=window), skip
    for dtype in claimed_dtypes:
        yield AttentionCase("padded", "gqa", head, block, dtype, dtype, padded=True), None
    # soft-capped scores (Gemma 2), with a sliding window too; a cap of 1 binds on the kit's unit-scale scores
    skip = None if capabilities.supports_logits_soft_cap else "logits soft cap not claimed"
    for dtype in claimed_dtypes:
        yield AttentionCase("soft_cap", "gqa", head, block, dtype, dtype, logits_soft_cap=SOFT_CAP), skip
    skip = skip or (None if capabilities.supports_sliding_window else "sliding window not claimed")
    yield (AttentionCase("soft_cap", "gqa", head, block, claimed_dtypes[0], claimed_dtypes[0],
                         sliding_window=window, logits_soft_cap=SOFT_CAP), skip)


def kv_only_cases(capabilities: BackendCapabilities) -> Iterator[tuple[torch.dtype, torch.dtype]]:
    """Yield ``(model dtype, kv dtype)`` for every KV-only cache dtype (one that is not a model dtype, e.g. fp8:
    the caches scaled stores are taken by) and claimed model dtype, KV dtype outermost."""
    for kv_dtype in capabilities.kv_cache_dtypes:
        if kv_dtype not in capabilities.dtypes:
            for dtype in capabilities.dtypes:
                yield dtype, kv_dtype


def kv_cache_cases(capabilities: BackendCapabilities) -> Iterator[tuple[int, torch.dtype, torch.dtype]]:
    """Yield ``(block_size, model dtype, kv dtype)`` for every claimed block size and KV cache dtype."""
    for size in sorted(capabilities.block_sizes):
        for kv_dtype in capabilities.kv_cache_dtypes:
            dtype = kv_dtype if kv_dtype in capabilities.dtypes else capabilities.dtypes[0]
            yield size, dtype, kv_dtype
