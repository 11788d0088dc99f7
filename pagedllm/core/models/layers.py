"""Neutral building blocks of decoder models: norms, rotary embedding, fused linear layers, paged attention.

Layers compute through the backend's fused-op hooks (``rms_norm``, ``rotary_embedding``, ``silu_and_mul``)
and its paged attention, so model code never names a device. Linear layers hold a ``linear_op`` (plain
``torch.nn.functional.linear`` until :func:`bind_linear_op` gives them the backend's ``linear``); those marked
``quantizable`` (the projections, not the LM head) may have their weights stored in fp8 by
:func:`quantize_linear_layers` (or read so from a checkpoint stored in fp8: :func:`prepare_fp8_weights`), with
a scale per output row (``"fp8"``) or per 128 x 128 tile (``"fp8_block"``); before fp8 projections the norms
and activations hand them their inputs quantized (:class:`Fp8Activation`, :func:`use_fp8_inputs`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.backends.fp8_linear import (
    FP8_DTYPE,
    block_scale_shape,
    per_row_scale,
    quantize_blocks,
    quantize_rows,
    scale_block_range,
)
from pagedllm.backends.interface import AttentionMetadata, AttentionSpec, Backend
from pagedllm.core.distributed.parallel_state import get_tp_group
from pagedllm.core.sampled_rows import SampledRows

LinearOp = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``(x [num_tokens, in], weight [out, in], bias [out] | None) -> [num_tokens, out]``, as ``Backend.linear``."""


def bind_linear_op(model: nn.Module, linear: LinearOp) -> None:
    """Make every linear layer of ``model`` (each module with a ``linear_op`` attribute) compute through
    ``linear``, the backend's :meth:`Backend.linear`; called by the loader once the model is built."""
    for module in model.modules():
        if hasattr(module, "linear_op"):
            module.linear_op = linear


@dataclass(frozen=True, slots=True)
class Fp8Activation:
    """An activation already quantized by the op that produced it (a norm, the MLP activation), for the fp8
    projection that consumes it: ``q [num_tokens, features]`` float8_e4m3fn, ``scale`` float32 ``[num_tokens]``
    (per token, for an ``"fp8"`` projection) or ``[num_tokens, ceil(features / 128)]`` (per token and group,
    for an ``"fp8_block"`` one), ``dtype`` the model dtype the projection returns."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


class Fp8LinearOp:
    """The ``linear_op`` of a layer whose weight is stored in e4m3, called like :data:`LinearOp` ``(x, weight,
    bias)``, with the layer's ``weight_scale`` (read from the layer at each call, so it is wherever the layer's
    parameters are): per output row (``[out]``), the backend's ``linear_fp8``, or its ``linear_fp8_quantized``
    for an :class:`Fp8Activation`, or its ``linear_fp8_static`` when the layer has a static ``input_scale``
    (``[1]``, from the checkpoint); per tile (``block``, ``[ceil(out / 128), ceil(in / 128)]``), its
    ``linear_fp8_block``, or ``linear_fp8_block_quantized``."""

    def __init__(self, backend: Backend, layer: nn.Module, block: bool = False) -> None:
        self.backend = backend
        self.layer = layer
        self.block = block

    def __call__(self, x: torch.Tensor | Fp8Activation, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        input_scale = getattr(self.layer, "input_scale", None)
        if input_scale is not None:  # a checkpoint's static input scale (per-row weights)
            return self.backend.linear_fp8_static(x, input_scale, weight, self.layer.weight_scale, bias)
        if isinstance(x, Fp8Activation):
            quantized = self.backend.linear_fp8_block_quantized if self.block else self.backend.linear_fp8_quantized
            return quantized(x.q, x.scale, weight, self.layer.weight_scale, bias, x.dtype)
        if self.block:
            return self.backend.linear_fp8_block(x, weight, self.layer.weight_scale, bias)
        return self.backend.linear_fp8(x, weight, self.layer.weight_scale, bias)


def fp8_input_of(layer: nn.Module) -> str | None:
    """The scheme in which ``layer`` (a linear layer) takes its input quantized — ``"fp8"`` (per token) or
    ``"fp8_block"`` (per token and group of 128) — so its producer may hand it an :class:`Fp8Activation`; None
    for a layer that is not fp8 or scales its inputs statically."""
    op = getattr(layer, "linear_op", None)
    if not isinstance(op, Fp8LinearOp) or getattr(layer, "input_scale", None) is not None:
        return None  # not fp8, or its inputs take the checkpoint's static scale
    return "fp8_block" if op.block else "fp8"


def use_fp8_inputs(model: nn.Module) -> None:
    """Let the ops before fp8 projections quantize their outputs themselves: calls ``use_fp8_inputs()`` on
    every module of ``model`` that defines it (a decoder layer sets its norms' and MLP's switches by
    :func:`fp8_input_of`). Called by the loader once the projections are fp8."""
    for module in model.modules():
        if module is not model and hasattr(module, "use_fp8_inputs"):
            module.use_fp8_inputs()


def quantize_linear_layers(model: nn.Module, backend: Backend, block: bool = False) -> int:
    """Store the weight of every ``quantizable`` linear layer of ``model`` in e4m3 with float32 scales
    (``weight_scale`` parameter): one per output row, or with ``block`` one per 128 x 128 tile; the layer then
    computes through ``backend`` (:class:`Fp8LinearOp`). Called by the loader once the weights are filled, for
    ``quantization="fp8"`` / ``"fp8_block"``; each layer's original weight is freed as it goes. Returns the
    number of layers quantized.
    """
    quantize = quantize_blocks if block else quantize_rows
    count = 0
    for module in model.modules():
        if getattr(module, "quantizable", False):
            weight, scale = quantize(module.weight.data)
            _store_fp8(module, weight, scale, backend, block)
            count += 1
    return count


def prepare_fp8_weights(model: nn.Module, backend: Backend, block: bool = False, static_inputs: bool = False) -> int:
    """Give every ``quantizable`` linear layer of ``model`` an empty e4m3 ``weight`` (its loader kept) and an
    empty float32 ``weight_scale`` parameter (``[out]``, or with ``block`` ``[ceil(out / 128), ceil(in /
    128)]``) loaded by the layer's ``load_weight_scale``, and with ``static_inputs`` an ``input_scale``
    (``[1]``, :func:`load_input_scale`), computing through ``backend`` (:class:`Fp8LinearOp`). Called by the
    loader before it reads a checkpoint stored in fp8, whose tensors then fill them. Returns the number of
    layers prepared."""
    count = 0
    for module in model.modules():
        if getattr(module, "quantizable", False):
            old = module.weight
            weight = torch.empty(old.shape, dtype=FP8_DTYPE, device=old.device)
            shape = block_scale_shape(*old.shape) if block else old.shape[:1]
            scale = torch.empty(shape, dtype=torch.float32, device=old.device)
            _store_fp8(module, weight, scale, backend, block)
            for attr in ("weight_loader", "full_shape"):
                if hasattr(old, attr):
                    setattr(module.weight, attr, getattr(old, attr))
            loader = getattr(module, "load_weight_scale", None)
            if loader is None:
                raise ValueError(f"{type(module).__name__} is quantizable but has no load_weight_scale: it cannot "
                                 "load a checkpoint stored in fp8")
            module.weight_scale.weight_loader = loader
            if static_inputs:
                add_input_scale(module, 0.0)
                module.input_scale.weight_loader = load_input_scale
            count += 1
    return count


def add_input_scale(module: nn.Module, value: float) -> None:
    """Give the fp8 linear layer ``module`` a static input scale: an ``input_scale`` parameter (``[1]`` float32,
    on the weight's device) holding ``value``; its inputs are then quantized with it (:class:`Fp8LinearOp`).
    Called by :func:`prepare_fp8_weights` (0, until the checkpoint's scale is loaded) and, for speed runs of
    such checkpoints with dummy weights, by the loader."""
    scale = torch.full((1,), value, dtype=torch.float32, device=module.weight.device)
    module.input_scale = nn.Parameter(scale, requires_grad=False)


def load_input_scale(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Load a checkpoint's static ``input_scale`` (one positive value, any float dtype) into ``param`` (``[1]``
    float32, zero until loaded), keeping the larger when several arrive: the parts of a merged projection
    (q, k, v; gate, up) share their input and take the largest of their scales, as vLLM does. Raises
    ValueError naming the shape or the value otherwise."""
    param.data.clamp_(min=positive_scale(loaded, "input scale", "tensor"))


def positive_scale(loaded: torch.Tensor, what: str, per: str) -> float:
    """The one positive finite value of a checkpoint's scale tensor ``loaded`` (any shape of one element, any
    float dtype; a lazy safetensors slice is read), as a float. Called when static input scales and KV-cache
    scales load. Raises ValueError naming ``what`` and the shape (``expected one per {per}``) or the value."""
    if not isinstance(loaded, torch.Tensor):
        loaded = loaded[...]
    if loaded.numel() != 1:
        raise ValueError(f"{what} of shape {tuple(loaded.shape)}: expected one per {per}")
    value = float(loaded.float().item())
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{what} {value!r}: expected a positive finite value")
    return value


def _store_fp8(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor, backend: Backend, block: bool) -> None:
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.weight_scale = nn.Parameter(scale, requires_grad=False)
    module.linear_op = Fp8LinearOp(backend, module, block)


def copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy the checkpoint tensor ``loaded`` into ``target``. Raises ValueError naming both shapes when they
    differ, or both dtypes when one is e4m3 and the other not (an e4m3 layer filled from unquantized
    weights, or e4m3 weights read without their scales, would be silently wrong)."""
    if target.shape != loaded.shape:
        raise ValueError(f"shape mismatch: expected {tuple(target.shape)}, got {tuple(loaded.shape)}")
    if (target.dtype == FP8_DTYPE) != (loaded.dtype == FP8_DTYPE):
        raise ValueError(f"dtype mismatch: the layer stores {target.dtype}, the checkpoint {loaded.dtype} (fp8 "
                         f"weights load only into layers that config.json's quantization_config makes fp8, "
                         f"and all of them must be fp8)")
    target.copy_(loaded)


class RMSNorm(nn.Module):
    """RMSNorm computed by the backend; ``forward(x, residual)`` also fuses the residual add.

    ``reduce_partial_input``: with a residual, ``x`` is this rank's partial sum from a row-parallel layer
    built with ``reduce_results=False``; it is summed over the tensor-parallel group (current when the norm
    is built) together with the add, in one kernel where the backend's communicator offers it.
    """

    def __init__(self, hidden_size: int, eps: float, backend: Backend, reduce_partial_input: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.backend = backend
        self.tp = get_tp_group() if reduce_partial_input else None
        self.fp8_output: str | None = None  # an fp8 projection's scheme when it consumes the output (use_fp8_inputs)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | Fp8Activation, torch.Tensor] | torch.Tensor | Fp8Activation:
        """``x``: ``[num_tokens, hidden]``. Without ``residual``: the normed x. With it: ``(normed(x +
        residual), x + residual)``, ``x`` first summed over the ranks if ``reduce_partial_input``. With
        ``fp8_output`` the normed x comes quantized as that scheme's projection takes it (:class:`Fp8Activation`),
        except after the tensor-parallel sum (its fused kernel writes the model dtype; the projection quantizes
        it)."""
        eps = self.variance_epsilon
        if residual is None:
            if self.fp8_output is not None:
                norm = self.backend.rms_norm_fp8_groups if self.fp8_output == "fp8_block" else self.backend.rms_norm_fp8
                return Fp8Activation(*norm(x, self.weight, eps), x.dtype)
            return self.backend.rms_norm(x, self.weight, eps)
        if self.tp is not None and self.tp.world_size > 1:
            return self.tp.all_reduce_add_rms_norm(x, residual, self.weight, eps, self.backend)
        if self.fp8_output is not None:
            add_norm = (self.backend.add_rms_norm_fp8_groups if self.fp8_output == "fp8_block"
                        else self.backend.add_rms_norm_fp8)
            q, scale, residual = add_norm(x, residual, self.weight, eps)
            return Fp8Activation(q, scale, x.dtype), residual
        return self.backend.add_rms_norm(x, residual, self.weight, eps)


def rope_inv_freq(hf_config: object, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Return ``(inv_freq [head_dim // 2] float32, attention_scaling)`` as Hugging Face computes them.

    Reads ``rope_parameters`` (transformers 5; keyed by layer type, e.g. Gemma 3's ``sliding_attention`` and
    ``full_attention``, when the layers differ: ``layer_type`` picks one) or ``rope_theta``/``rope_scaling``
    (transformers 4). Plain RoPE is computed here; scaled variants (``linear``, ``llama3``, ``yarn``, ...) use
    transformers' own init functions so they match exactly.
    """
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    per_layer_type = layer_type is not None and isinstance(params.get(layer_type), dict)
    if per_layer_type:
        params = params[layer_type]
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (theta**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r} in config.json")
    extra = {"layer_type": layer_type} if per_layer_type else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, **extra)
    return inv_freq.float(), float(scaling)


def rope_cos_sin(hf_config: object, head_dim: int, max_position: int, layer_type: str | None = None) -> torch.Tensor:
    """The ``[max_position, head_dim]`` float32 cos|sin cache of :func:`rope_inv_freq`'s frequencies, times its
    attention scaling. LongRoPE (Phi-3/3.5 long-context checkpoints) takes its short factors for the positions
    below ``original_max_position_embeddings`` and its long factors from there on, as vLLM does (transformers
    switches every position to the long factors once a sequence passes that length). Raises ValueError for a
    partial rotary embedding (``partial_rotary_factor`` below 1)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    partial = float(params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)) or 1.0)
    if partial < 1.0:
        raise ValueError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported")

    def cos_sin(inv_freq: torch.Tensor, scaling: float, start: int, stop: int) -> torch.Tensor:
        freqs = torch.arange(start, stop, dtype=torch.float32)[:, None] * inv_freq[None, :]
        return torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)

    inv_freq, scaling = rope_inv_freq(hf_config, head_dim, layer_type)
    if params.get("rope_type") != "longrope":
        return cos_sin(inv_freq, scaling, 0, max_position)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = int(params.get("original_max_position_embeddings")
                   or getattr(hf_config, "original_max_position_embeddings", max_position))
    long_freq, long_scaling = ROPE_INIT_FUNCTIONS["longrope"](hf_config, None, seq_len=original + 1)
    split = min(original, max_position)
    return torch.cat((cos_sin(inv_freq, scaling, 0, split),
                      cos_sin(long_freq.float(), float(long_scaling), split, max_position)))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a precomputed ``[max_position, head_dim]`` float32 cos|sin cache
    (``layer_type``: which of a config's per-layer-type rope parameters, see :func:`rope_inv_freq`). Build it
    through :func:`shared_rotary_embedding`, so the layers of one model share one cache."""

    def __init__(self, hf_config: object, head_dim: int, max_position: int, backend: Backend,
                 layer_type: str | None = None) -> None:
        super().__init__()
        self.register_buffer("cos_sin_cache", rope_cos_sin(hf_config, head_dim, max_position, layer_type),
                             persistent=False)
        self.backend = backend

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions: [num_tokens]``, ``query: [num_tokens, num_heads, head_dim]``, ``key: [num_tokens,
        num_kv_heads, head_dim]``; returns the rotated pair."""
        return self.backend.rotary_embedding(positions, query, key, self.cos_sin_cache)

    def with_head_norms(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` after every head of ``query`` and ``key`` went through ``q_norm`` / ``k_norm``
        (RMSNorms over ``head_dim``, one epsilon), in one backend op (Qwen3)."""
        return self.backend.qk_norm_rotary_embedding(positions, query, key, q_norm.weight, k_norm.weight,
                                                     q_norm.variance_epsilon, self.cos_sin_cache)


_ROTARY_CACHES: weakref.WeakValueDictionary[tuple[object, ...], RotaryEmbedding] = weakref.WeakValueDictionary()


def shared_rotary_embedding(hf_config: object, head_dim: int, max_position: int, backend: Backend,
                            layer_type: str | None = None) -> RotaryEmbedding:
    """The :class:`RotaryEmbedding` of these arguments, one module (one cos|sin cache) for every layer of a model
    that asks with the same config object: a 32-layer model of 128K positions would otherwise hold 32 caches of
    128 MiB. Kept while a model holds it."""
    key = (id(hf_config), head_dim, max_position, id(backend), layer_type, torch.get_default_device().type)
    rotary = _ROTARY_CACHES.get(key)
    if rotary is None:
        rotary = _ROTARY_CACHES[key] = RotaryEmbedding(hf_config, head_dim, max_position, backend, layer_type)
    return rotary


class MergedLinear(nn.Module):
    """Several linear layers on the same input stored as one matrix (e.g. q|k|v or gate|up).

    ``shard_sizes`` are the output sizes of the parts, in order; ``load_shard`` copies a checkpoint tensor
    of part ``index`` into its rows. Tensor-parallel subclasses override ``load_shard``.
    """

    quantizable = True  # see quantize_linear_layers

    def __init__(self, in_features: int, shard_sizes: Sequence[int], bias: bool) -> None:
        super().__init__()
        self.shard_sizes = list(shard_sizes)
        self.full_shard_sizes = list(shard_sizes)  # the parts' sizes in the checkpoint (tensor parallel: more)
        self.weight = nn.Parameter(torch.empty(sum(shard_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(shard_sizes))) if bias else None
        self.linear_op: LinearOp = nn.functional.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [num_tokens, in_features]`` -> ``[num_tokens, sum(shard_sizes)]``."""
        return self.linear_op(x, self.weight, self.bias)

    def load_shard(self, param_name: str, index: int, loaded: torch.Tensor) -> None:
        """Copy part ``index`` of ``weight``, ``bias`` or an fp8 checkpoint's ``weight_scale`` (``param_name``)
        from a checkpoint tensor (or a lazy safetensors slice, read whole here); a tile scale (``"fp8_block"``)
        fills the tile rows of the part, which must fall on tile boundaries."""
        if param_name == "input_scale":
            load_input_scale(self.input_scale, loaded)
            return
        if not isinstance(loaded, torch.Tensor):
            loaded = loaded[...]
        if param_name == "g_idx":
            self.load_g_idx(loaded)
            return
        param = getattr(self, param_name)
        start, size = sum(self.shard_sizes[:index]), self.shard_sizes[index]
        if param_name == "weight_scale" and not hasattr(self, "group_size"):  # fp8 (w4a16's are rows, as weight's)
            if param.dim() == 2:
                start, size = scale_block_range(start, size, sum(self.shard_sizes))
            else:
                loaded = per_row_scale(loaded, size)
        copy_checked(param.data[start : start + size], loaded)

    def load_g_idx(self, loaded: torch.Tensor) -> None:
        """Load an act-order ``"w4a16"`` checkpoint's ``g_idx [in]`` (the group of each input feature), which
        every part of the merged projection brings: the first fills the layer's, the others must equal it (the
        parts are computed as one matrix). Raises ValueError otherwise."""
        loaded = loaded.to(torch.int32)
        if getattr(self, "g_idx_loaded", False):
            if not torch.equal(self.g_idx.data.cpu(), loaded):
                raise ValueError("the parts of a merged projection number their groups differently (g_idx); "
                                 "pagedllm computes them as one matrix")
            return
        copy_checked(self.g_idx.data, loaded)
        self.g_idx_loaded = True

    def load_weight_scale(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Load one checkpoint scale for all parts at once (per tensor, ``[sum(full_shard_sizes)(, 1)]``, or
        the tiles ``[ceil(sum(full_shard_sizes) / 128), ceil(in / 128)]``) part by part; see
        :func:`prepare_fp8_weights`."""
        if not isinstance(loaded, torch.Tensor):
            loaded = loaded[...]
        total = sum(self.full_shard_sizes)
        if param.dim() == 2:
            expected = block_scale_shape(total, self.weight.shape[1])
            if tuple(loaded.shape) != expected:
                raise ValueError(f"weight scale of shape {tuple(loaded.shape)}: expected the tiles {expected}")
            offset = 0
            for index, size in enumerate(self.full_shard_sizes):
                first, count = scale_block_range(offset, size, total)
                self.load_shard("weight_scale", index, loaded[first : first + count])
                offset += size
            return
        scales = per_row_scale(loaded, total)
        for index, part in enumerate(scales.split(self.full_shard_sizes)):
            self.load_shard("weight_scale", index, part)


class PagedAttention(nn.Module):
    """Writes this step's K/V into the layer's paged cache and attends through the backend.

    ``k_scale``/``v_scale``: the layer's KV-cache scales (1.0 unless an fp8 cache takes the checkpoint's,
    :meth:`load_kv_scale`): other than 1.0, the cache holds ``key / k_scale`` and ``value / v_scale``, written
    and read through ``Backend.write_kv_cache_scaled`` and ``Backend.attention_scaled``.
    """

    def __init__(self, spec: AttentionSpec, backend: Backend) -> None:
        super().__init__()
        self.spec = spec
        self.backend = backend
        self.kv_cache: torch.Tensor = torch.empty(0)  # bound by the model runner after allocation
        self.k_scale = 1.0
        self.v_scale = 1.0

    @property
    def scaled(self) -> bool:
        """Whether the cache holds scaled keys or values (a scale other than 1.0)."""
        return self.k_scale != 1.0 or self.v_scale != 1.0

    def load_kv_scale(self, name: str, loaded: torch.Tensor) -> None:
        """Take a checkpoint's KV-cache scale: ``name`` is ``"k_scale"``/``"k_proj.output_scale"`` (keys),
        ``"v_scale"``/``"v_proj.output_scale"`` (values) or ``"kv_scale"`` (both); ``loaded``: one positive
        finite value (any shape of one element, any float dtype; a lazy safetensors slice is read). Called by
        the model's ``load_weights`` when the KV cache is fp8. Raises ValueError naming the shape or value."""
        value = positive_scale(loaded, "KV-cache scale", "layer (per tensor)")
        if name in ("k_scale", "k_proj.output_scale", "kv_scale"):
            self.k_scale = value
        if name in ("v_scale", "v_proj.output_scale", "kv_scale"):
            self.v_scale = value

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, metadata: AttentionMetadata,
        sampled: SampledRows | None = None,
    ) -> torch.Tensor:
        """``query: [num_tokens, num_heads, head_dim]``, ``key/value: [num_tokens, num_kv_heads, head_dim]``;
        every token's key and value are stored. Returns ``[num_tokens, num_heads * head_dim]``, or, with
        ``sampled`` (the model's last layer), ``[num_sampled, num_heads * head_dim]``: only those rows attend."""
        self.store(key, value, metadata)
        if sampled is not None:
            rows = sampled.indices
            query, key, value, metadata = query[rows], key[rows], value[rows], sampled.metadata
        if self.scaled:
            out = self.backend.attention_scaled(query, key, value, self.kv_cache, metadata, self.spec, self.k_scale,
                                                self.v_scale)
        else:
            out = self.backend.attention(query, key, value, self.kv_cache, metadata, self.spec)
        return out.reshape(out.shape[0], -1)

    def store(self, key: torch.Tensor, value: torch.Tensor, metadata: AttentionMetadata) -> None:
        """Write ``key/value: [num_tokens, num_kv_heads, head_dim]`` to their slots (``metadata.slot_mapping``),
        divided by the layer's scales where they are not 1."""
        if self.scaled:
            self.backend.write_kv_cache_scaled(key, value, self.kv_cache, metadata.slot_mapping, self.k_scale,
                                               self.v_scale)
        else:
            self.backend.write_kv_cache(key, value, self.kv_cache, metadata.slot_mapping)
