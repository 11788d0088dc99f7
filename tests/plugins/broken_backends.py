"""Deliberately wrong backends: the conformance kit's own tests prove it catches each of them.

Each reuses the cpu reference kernels and breaks exactly one thing.
"""

from __future__ import annotations

import torch

from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.hookspecs import hookimpl
from pagedllm.backends.interface import AttentionMetadata, AttentionSpec, Backend


class OffByOneSlotBackend(CpuBackend):
    """Stores every token one slot too far (``slot + 1``), the classic slot-mapping bug."""

    name = "broken_slot"
    interface_version = (1, 0)
    priority = -1000

    def write_kv_cache(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Write at ``slot + 1`` (padding rows still skipped)."""
        shifted = torch.where(slot_mapping >= 0, slot_mapping + 1, slot_mapping)
        num_slots = kv_cache[0].numel() // (kv_cache.shape[-1] * kv_cache.shape[-2])
        keep = (shifted >= 0) & (shifted < num_slots)
        super().write_kv_cache(key[keep], value[keep], kv_cache, shifted[keep])


class WrongGqaBackend(CpuBackend):
    """Query head ``h`` reads KV head ``h % num_kv_heads`` instead of ``h // group`` (MHA and MQA unaffected)."""

    name = "broken_gqa"
    interface_version = (1, 0)
    priority = -1000

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        spec: AttentionSpec,
    ) -> torch.Tensor:
        """Permute query heads so the reference kernel's ``h // group`` lands on ``h % num_kv_heads``."""
        group = spec.num_heads // spec.num_kv_heads
        index = torch.tensor([(h % spec.num_kv_heads) * group + h // spec.num_kv_heads
                              for h in range(spec.num_heads)])
        permuted = torch.empty_like(query)
        permuted[:, index] = query
        return super().attention(permuted, key, value, kv_cache, metadata, spec)[:, index]


class UnwrittenRowBackend(CpuBackend):
    """Returns an uninitialized output whose last row is never written."""

    name = "broken_unwritten"
    interface_version = (1, 0)
    priority = -1000

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        spec: AttentionSpec,
    ) -> torch.Tensor:
        """Copy all rows but the last real one into a fresh ``torch.empty``."""
        out = torch.empty_like(query)
        last = metadata.num_tokens - 1
        out[:last] = super().attention(query, key, value, kv_cache, metadata, spec)[:last]
        return out


class WrongRmsNormBackend(CpuBackend):
    """A "fused" RMSNorm that divides by the standard deviation instead of the root mean square."""

    name = "broken_rms_norm"
    interface_version = (1, 0)
    priority = -1000

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``weight * x / sqrt(var(x) + eps)``: wrong whenever the mean is not zero."""
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.var(-1, keepdim=True, unbiased=False) + eps)).to(x.dtype)


class UnquantizedInputFp8Backend(CpuBackend):
    """An fp8 linear layer that multiplies the e4m3 weights by the input as given, never quantizing it."""

    name = "broken_fp8_linear"
    interface_version = (1, 5)
    priority = -1000

    def linear_fp8(self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ dequant(weight).T + bias``: off by the input's rounding to e4m3."""
        return torch.nn.functional.linear(x.float(), weight.float() * weight_scale[:, None],
                                          None if bias is None else bias.float()).to(x.dtype)


class QuantizedInputOpsBackend(CpuBackend):
    """The ``cpu`` backend with the ops that hand fp8 projections their inputs written out over two quantizers,
    per token (:meth:`quantize_tokens`) and per token and group (:meth:`quantize_token_groups`), the
    reference's here; each broken backend below gets one of them wrong."""

    priority = -1000

    def quantize_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from pagedllm.backends.fp8_linear import quantize_rows

        return quantize_rows(x)

    def quantize_token_groups(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from pagedllm.backends.fp8_linear import quantize_groups

        return quantize_groups(x)

    def rms_norm_fp8(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize_tokens(self.rms_norm(x, weight, eps))

    def add_rms_norm_fp8(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normed, residual = self.add_rms_norm(x, residual, weight, eps)
        return (*self.quantize_tokens(normed), residual)

    def silu_and_mul_fp8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize_tokens(self.silu_and_mul(x))

    def rms_norm_fp8_groups(self, x: torch.Tensor, weight: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize_token_groups(self.rms_norm(x, weight, eps))

    def add_rms_norm_fp8_groups(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normed, residual = self.add_rms_norm(x, residual, weight, eps)
        return (*self.quantize_token_groups(normed), residual)

    def silu_and_mul_fp8_groups(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize_token_groups(self.silu_and_mul(x))


class FnuzScaleFp8InputsBackend(QuantizedInputOpsBackend):
    """Quantizes the outputs it hands fp8 projections with e4m3fnuz's largest value (240) where e4m3fn's is 448:
    the dequantized values stay close, the scales are 448/240 too large."""

    name = "broken_fp8_inputs"
    interface_version = (1, 8)

    def quantize_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (x.float().abs().amax(-1) / 240.0).clamp(min=1e-12)
        return (x.float() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn), scale


class DynamicStaticFp8Backend(CpuBackend):
    """Ignores a checkpoint's static input scale and quantizes each token's input dynamically, as for dynamic
    checkpoints: close values, but nothing saturates where the calibrated scale says it must."""

    name = "broken_fp8_static"
    interface_version = (1, 8)
    priority = -1000

    def linear_fp8_static(self, x: torch.Tensor, input_scale: torch.Tensor, weight: torch.Tensor,
                          weight_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear_fp8(x, weight, weight_scale, bias)


class PerTokenInputFp8BlockBackend(CpuBackend):
    """A tile-scaled fp8 layer (``"fp8_block"``) that quantizes its input per token, as the per-row scheme does,
    instead of per group of 128 features: small groups beside large ones lose their precision."""

    name = "broken_fp8_block"
    interface_version = (1, 7)
    priority = -1000

    def linear_fp8_block(self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
        from pagedllm.backends.fp8_linear import dequantize_blocks, quantize_rows

        q, scale = quantize_rows(x)
        y = (q.float() * scale[:, None]) @ dequantize_blocks(weight, weight_scale).t()
        return (y if bias is None else y + bias.float()).to(x.dtype)


class PerTokenGroupInputsBackend(QuantizedInputOpsBackend):
    """Hands ``"fp8_block"`` projections inputs quantized per token, the token's scale repeated for every group
    of 128: the shapes are right, the small groups beside large ones lose their precision."""

    name = "broken_fp8_groups"
    interface_version = (1, 8)

    def quantize_token_groups(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = self.quantize_tokens(x)
        return q, scale[:, None].expand(-1, -(-x.shape[1] // 128)).contiguous()


class TokenNormQkRotaryBackend(CpuBackend):
    """Norms every token's query (and key) over all its heads at once where Qwen3's q/k norms take each head
    alone (right when every head has the same magnitude)."""

    name = "broken_qk_norm"
    interface_version = (1, 8)
    priority = -1000

    def qk_norm_rotary_embedding(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                 q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(x.shape[0], -1)
            inverse_rms = torch.rsqrt(rows.float().pow(2).mean(-1, keepdim=True) + eps)
            return (rows.float() * inverse_rms).to(x.dtype).view(x.shape) * weight

        return self.rotary_embedding(positions, norm(query, q_weight), norm(key, k_weight), cos_sin_cache)


class UnscaledKeysBackend(CpuBackend):
    """Stores scaled keys and values and scales the values it reads, but scores the stored keys as they are
    (``k_scale`` left out of the score scale): right only when ``k_scale`` is 1."""

    name = "broken_kv_scales"
    interface_version = (1, 9)
    priority = -1000

    def attention_scaled(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                         metadata: AttentionMetadata, spec: AttentionSpec, k_scale: float,
                         v_scale: float) -> torch.Tensor:
        return super().attention_scaled(query, key, value, kv_cache, metadata, spec, 1.0, v_scale)


BROKEN: tuple[type[Backend], ...] = (OffByOneSlotBackend, WrongGqaBackend, UnwrittenRowBackend, WrongRmsNormBackend,
                                     UnquantizedInputFp8Backend, FnuzScaleFp8InputsBackend,
                                     PerTokenInputFp8BlockBackend, PerTokenGroupInputsBackend, TokenNormQkRotaryBackend,
                                     DynamicStaticFp8Backend, UnscaledKeysBackend)


@hookimpl
def pagedllm_register_backends() -> list[type[Backend]]:
    """Provide every broken backend."""
    return list(BROKEN)
