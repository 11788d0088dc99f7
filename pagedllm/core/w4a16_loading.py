"""Loading 4-bit checkpoints (AWQ, GPTQ, compressed-tensors ``pack-quantized``) into ``"w4a16"`` layers.

:func:`checkpoint_w4a16` reads what config.json's ``quantization_config`` declares (refusing, with the reason,
what pagedllm does not compute); :func:`prepare_w4a16_weights` gives every projection the parameters of the
``"w4a16"`` layout (``pagedllm.backends.w4a16_linear``) before the checkpoint is read; :func:`w4a16_tensors`
converts the checkpoint's tensors, one at a time as they stream past, to that layout under the parameter names
``weight``, ``weight_scale``, ``weight_zero`` and ``g_idx``, which the layers' loaders then slice like any
weight (parts of merged projections, tensor-parallel shards). :func:`quantize_w4a16_layers` quantizes an
unquantized model the same way (``quantization="w4a16"``, round to nearest in groups of 128).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import torch
from torch import nn

from pagedllm.backends.interface import Backend
from pagedllm.backends.w4a16_linear import GROUP_SIZES, PACK, pack_int4, quantize_w4a16, unpack_int4
from pagedllm.core import w4a16_formats as formats

ONLINE_GROUP_SIZE = max(GROUP_SIZES)
"""The groups of ``quantization="w4a16"`` on an unquantized model (a layer whose input features 128 does not
divide takes the largest of 64 and 32 that does)."""
SUPPORTED = ("4-bit weights in groups of 32, 64 or 128 input features (or one group per row) with 16-bit "
             "activations: quant_method 'awq' (version 'gemm', zero_point true), 'gptq' (checkpoint_format "
             "'gptq' or 'gptq_v2', desc_act true or false) or 'compressed-tensors' in format 'pack-quantized' "
             "(int weights, strategy 'group' or 'channel', symmetric or not, no input activation quantization)")
KEEP_UNQUANTIZED = ("lm_head",)  # the modules a w4a16 checkpoint may leave unquantized


class W4A16Format(NamedTuple):
    """What a 4-bit checkpoint stores: :func:`checkpoint_w4a16`'s answer."""

    method: str
    """``"awq"``, ``"gptq"`` or ``"compressed-tensors"``."""
    group_size: int
    """Input features per scale; -1: one scale per output row."""
    zero_offset: int
    """1 for GPTQ's original format, whose words of zero points are stored minus 0x11111111
    (``pagedllm.core.w4a16_formats.gptq_zeros``), else 0."""
    act_order: bool
    """Whether the checkpoint numbers groups out of feature order (``g_idx`` tensors, GPTQ's ``desc_act``)."""
    symmetric: bool
    """compressed-tensors only: no zero-point tensors (every zero point is 8)."""


def checkpoint_w4a16(config: Mapping[str, object] | None) -> W4A16Format | None:
    """The 4-bit format of a checkpoint, from its ``quantization_config`` (a mapping; None: unquantized), or
    None when it is not one of AWQ, GPTQ or compressed-tensors' ``pack-quantized``. Called once, when the model
    config is read. Raises ValueError naming what such a checkpoint declares that pagedllm does not compute."""
    if not config:
        return None
    method = config.get("quant_method")
    if method == "awq":
        return _awq(config)
    if method == "gptq":
        return _gptq(config)
    if method == "compressed-tensors" and config.get("format") == "pack-quantized":
        return _compressed(config)
    return None


def _refuse(what: str) -> ValueError:
    return ValueError(f"4-bit checkpoint with {what}: not supported; pagedllm loads {SUPPORTED}")


def _group_size(value: object) -> int:
    """A declared group size: one of :data:`GROUP_SIZES`, or -1 (also for none declared) for one per row."""
    if value is None or value == -1:
        return -1
    if value in GROUP_SIZES:
        return int(value)  # type: ignore[arg-type]
    raise _refuse(f"group_size {value!r}")


def _unconverted(modules: object) -> None:
    extra = [m for m in (modules or []) if not any(m == k or m.endswith("." + k) for k in KEEP_UNQUANTIZED)]
    if extra:
        raise _refuse(f"projections left unquantized ({', '.join(map(str, extra[:4]))}; only {KEEP_UNQUANTIZED} "
                      f"may be)")


def _awq(config: Mapping[str, object]) -> W4A16Format:
    bits = config.get("bits", config.get("w_bit"))
    if bits != 4:
        raise _refuse(f"AWQ bits {bits!r}")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse(f"AWQ version {version!r} (only 'gemm', AutoAWQ's default layout)")
    if not config.get("zero_point", True):
        raise _refuse("AWQ zero_point false")
    _unconverted(config.get("modules_to_not_convert"))
    group = _group_size(config.get("group_size", config.get("q_group_size")))
    return W4A16Format("awq", group, 0, False, False)


def _gptq(config: Mapping[str, object]) -> W4A16Format:
    if config.get("bits") != 4:
        raise _refuse(f"GPTQ bits {config.get('bits')!r}")
    fmt = config.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse(f"GPTQ checkpoint_format {fmt!r}")
    if config.get("dynamic"):
        raise _refuse("GPTQ 'dynamic' per-module overrides")
    _unconverted(config.get("modules_to_not_convert"))
    group = _group_size(config.get("group_size"))
    return W4A16Format("gptq", group, 1 if fmt == "gptq" else 0, bool(config.get("desc_act")), False)


def _compressed(config: Mapping[str, object]) -> W4A16Format:
    groups = config.get("config_groups") or {}
    if not isinstance(groups, Mapping) or len(groups) != 1:
        raise _refuse("compressed-tensors config_groups other than one group")
    (name, group), = groups.items()
    weights = (group or {}).get("weights") or {}
    if (weights.get("type"), weights.get("num_bits")) != ("int", 4):
        raise _refuse(f"{name}: weights of type {weights.get('type')!r}, {weights.get('num_bits')} bits")
    if group.get("input_activations"):
        raise _refuse(f"{name}: quantized input activations")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise _refuse(f"{name}: weight strategy {strategy!r}")
    group_size = _group_size(weights.get("group_size") if strategy == "group" else -1)
    act_order = weights.get("actorder") not in (None, False, "static")
    _unconverted(config.get("ignore"))
    return W4A16Format("compressed-tensors", group_size, 0, act_order, bool(weights.get("symmetric", True)))


def w4a16_tensors(weights: Iterable[tuple[str, object]], fmt: W4A16Format) -> Iterator[tuple[str, object]]:
    """The checkpoint's tensors with every 4-bit projection's converted to the ``"w4a16"`` layout (read whole,
    on the CPU; the rest passes as it came): ``{layer}.weight [out, in // 8]`` int32, ``.weight_scale [out,
    groups]``, ``.weight_zero [out, groups]`` uint8 and, for act-order checkpoints, ``.g_idx [in]`` int32 (else
    dropped; the layer checks it numbers the features in order). compressed-tensors' ``weight_shape`` is
    dropped, and its symmetric layers get zero points of 8. Called by the loader as the checkpoint is read."""
    for name, tensor in weights:
        layer, _, suffix = name.rpartition(".")
        converted = _convert(fmt, suffix, tensor)
        if converted is None:
            yield name, tensor
            continue
        for param, value in converted:
            yield f"{layer}.{param}", value


def _read(tensor: object) -> torch.Tensor:
    return tensor if isinstance(tensor, torch.Tensor) else tensor[...]  # type: ignore[index]


def _convert(fmt: W4A16Format, suffix: str, tensor: object) -> list[tuple[str, torch.Tensor]] | None:
    """``(parameter, tensor)`` pairs for one checkpoint tensor of a 4-bit layer, or None for any other."""
    if fmt.method in ("awq", "gptq") and suffix == "scales":
        return [("weight_scale", formats.transposed_scales(_read(tensor)))]
    if fmt.method == "awq":
        if suffix == "qweight":
            return [("weight", formats.awq_weight(_read(tensor)))]
        if suffix == "qzeros":
            return [("weight_zero", formats.awq_zeros(_read(tensor)))]
        return None
    if fmt.method == "gptq":
        if suffix == "qweight":
            return [("weight", formats.gptq_weight(_read(tensor)))]
        if suffix == "qzeros":
            return [("weight_zero", formats.gptq_zeros(_read(tensor), fmt.zero_offset))]
        return _g_idx(fmt, tensor) if suffix == "g_idx" else None
    if suffix == "weight_packed":
        packed = _read(tensor)
        if not fmt.symmetric:
            return [("weight", packed)]
        groups = 1 if fmt.group_size == -1 else packed.shape[1] * PACK // fmt.group_size
        return [("weight", packed), ("weight_zero", formats.symmetric_zeros(packed.shape[0], groups))]
    if suffix == "weight_zero_point":
        return [("weight_zero", formats.compressed_zeros(_read(tensor)))]
    if suffix == "weight_g_idx":
        return _g_idx(fmt, tensor)
    return [] if suffix == "weight_shape" else None


def _g_idx(fmt: W4A16Format, tensor: object) -> list[tuple[str, torch.Tensor]]:
    """An act-order checkpoint's ``g_idx`` for its layer; without act-order it must number the features in order
    (GPTQ writes one either way) and is dropped."""
    g_idx = _read(tensor).to(torch.int32)
    if fmt.act_order:
        return [("g_idx", g_idx)]
    group_size = g_idx.numel() if fmt.group_size == -1 else fmt.group_size
    if formats.act_order(g_idx, group_size) is not None:
        raise ValueError("a g_idx numbers the groups out of feature order, but the quantization_config declares no "
                         "act-order (desc_act / actorder)")
    return []


class W4A16LinearOp:
    """The ``linear_op`` of a ``"w4a16"`` layer, called like ``LinearOp`` ``(x, weight, bias)``: the backend's
    ``linear_w4a16`` with the layer's ``weight_scale``, ``weight_zero``, ``group_size`` and ``g_idx`` (read from
    the layer at each call, so wherever its parameters are), the input's features first permuted by the layer's
    ``input_perm`` when it has one (:func:`finish_w4a16`)."""

    def __init__(self, backend: Backend, layer: nn.Module) -> None:
        self.backend = backend
        self.layer = layer

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        layer = self.layer
        if layer.input_perm is not None:  # an act-order layer whose columns were sorted by group (finish_w4a16)
            x = x.index_select(1, layer.input_perm)
        g_idx = layer.g_idx if isinstance(layer.g_idx, torch.Tensor) else None
        return self.backend.linear_w4a16(x, weight, layer.weight_scale, layer.weight_zero, layer.group_size, g_idx,
                                         bias)


def _projections(model: nn.Module) -> list[nn.Module]:
    from pagedllm.core.models.moe import FusedMoE

    if any(isinstance(m, FusedMoE) for m in model.modules()):
        raise ValueError("w4a16: mixture-of-experts models are not supported with 4-bit weights (their experts "
                         "run through fused_moe, which takes 16-bit or fp8 weights)")
    layers = [m for m in model.modules() if getattr(m, "quantizable", False)]
    if not layers:
        raise ValueError(f"w4a16: {type(model).__name__} has no linear layer marked quantizable")
    return layers


def _layer_group_size(module: nn.Module, group_size: int) -> int:
    inp = module.weight.shape[1]
    size = inp if group_size == -1 else group_size
    if inp % PACK or inp % size:
        raise ValueError(f"w4a16: {type(module).__name__} with {inp} input features (per rank) cannot hold groups "
                         f"of {size} packed {PACK} to a word")
    return size


def prepare_w4a16_weights(model: nn.Module, backend: Backend, fmt: W4A16Format) -> int:
    """Give every projection of ``model`` empty ``"w4a16"`` parameters — ``weight [out, in // 8]`` int32,
    ``weight_scale [out, groups]`` float32, ``weight_zero [out, groups]`` uint8 and, for act-order checkpoints,
    ``g_idx [in]`` int32 — loaded by the layer's own loaders from :func:`w4a16_tensors`' output, and make it
    compute through ``backend`` (:class:`W4A16LinearOp`). Called by the loader before it reads a 4-bit
    checkpoint (or fills dummy weights for one). Returns the number of layers prepared. Raises ValueError for
    a mixture-of-experts model, a layer whose input features the groups do not divide, or act-order with a
    row-parallel layer split over ranks (its groups span the ranks)."""
    layers = _projections(model)
    for module in layers:
        group_size = _layer_group_size(module, fmt.group_size)
        split_rows = getattr(getattr(module, "tp", None), "world_size", 1) > 1 and hasattr(module, "load_columns")
        if fmt.act_order and split_rows:
            raise ValueError("w4a16: act-order (g_idx) checkpoints need tensor_parallel_size 1: a row-parallel "
                             "layer's groups span the ranks")
        out, inp = module.weight.shape
        device = module.weight.device
        _store(module, backend, group_size,
               torch.empty(out, inp // PACK, dtype=torch.int32, device=device),
               torch.empty(out, inp // group_size, dtype=torch.float32, device=device),
               torch.empty(out, inp // group_size, dtype=torch.uint8, device=device),
               torch.empty(inp, dtype=torch.int32, device=device) if fmt.act_order else None)
        if hasattr(module, "load_columns"):  # a row-parallel layer: its rank's input features
            for param in _params(module):
                param.weight_loader = module.load_columns
    return len(layers)


def quantize_w4a16_layers(model: nn.Module, backend: Backend) -> int:
    """Quantize every projection of an unquantized ``model`` to ``"w4a16"`` (round to nearest, asymmetric, groups
    of :data:`ONLINE_GROUP_SIZE` or smaller, float32 scales; :func:`quantize_w4a16`), freeing each float weight
    as it goes. Called by the loader for ``quantization="w4a16"``. Returns the number of layers quantized."""
    layers = _projections(model)
    for module in layers:
        inp = module.weight.shape[1]
        group_size = _layer_group_size(module, next((g for g in sorted(GROUP_SIZES, reverse=True) if inp % g == 0),
                                                    ONLINE_GROUP_SIZE))
        weight, scales, zeros = quantize_w4a16(module.weight.data, group_size, scale_dtype=torch.float32)
        _store(module, backend, group_size, weight, scales, zeros, None)
    return len(layers)


def finish_w4a16(model: nn.Module) -> int:
    """Give act-order layers groups in feature order: drop the ``g_idx`` of layers whose checkpoint numbers the
    features in order, and where every group has ``group_size`` features (GPTQ's act-order: a permutation of
    the features), sort the weight's columns by group and keep the permutation as ``input_perm [in]`` (int64),
    which the layer applies to its input before the product (:class:`W4A16LinearOp`), as vLLM's GPTQ kernels
    do. The product is the same up to the order of its sums, and the kernels take one scale per step instead of
    gathering one per feature (5 to 9 times faster on an H200). Called by the loader once an act-order checkpoint
    is read. Returns the number of layers whose columns were sorted."""
    sorted_layers = 0
    for module in model.modules():
        if not isinstance(getattr(module, "g_idx", None), nn.Parameter):
            continue
        g_idx = module.g_idx.data
        in_order = torch.arange(g_idx.numel(), device=g_idx.device, dtype=torch.int32) // module.group_size
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], in_order):
            continue  # groups of unequal sizes: the kernels gather per feature
        if not torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
            module.weight.data = pack_int4(unpack_int4(module.weight.data)[:, perm])
            module.input_perm = perm
            sorted_layers += 1
        module.g_idx = None
    return sorted_layers


def _params(module: nn.Module) -> list[nn.Parameter]:
    names = ("weight", "weight_scale", "weight_zero", "g_idx")
    return [p for p in (getattr(module, n, None) for n in names) if isinstance(p, nn.Parameter)]


def _store(module: nn.Module, backend: Backend, group_size: int, weight: torch.Tensor, scales: torch.Tensor,
           zeros: torch.Tensor, g_idx: torch.Tensor | None) -> None:
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.weight_scale = nn.Parameter(scales, requires_grad=False)
    module.weight_zero = nn.Parameter(zeros, requires_grad=False)
    module.g_idx = None if g_idx is None else nn.Parameter(g_idx, requires_grad=False)
    module.group_size = group_size
    module.input_perm = None
    module.linear_op = W4A16LinearOp(backend, module)
