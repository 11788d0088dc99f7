"""Build a registered model class and fill it from safetensors files (single or sharded) or randomly."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from pagedllm.backends.fp8_linear import FP8_MAX
from pagedllm.backends.interface import Backend
from pagedllm.backends.kv_storage import is_fp8
from pagedllm.core.checkpoint_quantization import KV_SCALE_TENSOR
from pagedllm.core.config import QUANTIZATIONS, ModelConfig
from pagedllm.core.models.layers import (
    add_input_scale,
    bind_linear_op,
    prepare_fp8_weights,
    quantize_linear_layers,
    use_fp8_inputs,
)
from pagedllm.core.w4a16_loading import (
    ONLINE_GROUP_SIZE,
    finish_w4a16,
    prepare_w4a16_weights,
    quantize_w4a16_layers,
    w4a16_tensors,
)

logger = logging.getLogger(__name__)


def model_class_for(architecture: str) -> type[nn.Module]:
    """Return the class registered for ``architecture`` (through the ``pagedllm_register_models`` hook).

    Raises ValueError listing the supported architectures.
    """
    from pagedllm.backends.registry import get_registry

    models = get_registry().models()
    if architecture not in models:
        raise ValueError(
            f"unknown model architecture {architecture!r} (config.json 'architectures'); supported: "
            f"{', '.join(sorted(models))}. A plugin can add one through pagedllm_register_models"
        )
    return models[architecture]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: those named by ``model.safetensors.index.json``, else ``*.safetensors``.

    Raises FileNotFoundError naming what is missing.
    """
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [directory / n for n in names]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors file in {directory}; only safetensors checkpoints are loaded "
            f"(or use load_format='dummy' for random weights)"
        )
    return files


def iterate_weights(directory: Path, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from every safetensors file of the checkpoint, one tensor at a time.

    ``lazy``: yield safetensors slices (``get_slice``) instead of tensors, valid until the next item; the
    model reads only the parts it needs (a tensor-parallel rank its shard: ``slice[a:b]``, whole: ``[:]``).
    """
    from safetensors import safe_open

    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, (f.get_slice(name) if lazy else f.get_tensor(name))


def fill_dummy_weights(model: nn.Module, device: torch.device, seed: int | None) -> None:
    """Fill every parameter with small uniform random values, the same for any tensor-parallel size.

    A sharded parameter (one with ``full_shape`` and ``weight_loader``, see
    ``pagedllm.core.distributed.parallel_layers``) draws its whole unsharded tensor and loads its part, so
    each rank holds the slice of what one device would hold.
    """
    generator = torch.Generator(device=device).manual_seed(seed or 0)
    for param in model.parameters():
        full_shape = getattr(param, "full_shape", None)
        if full_shape is None or tuple(full_shape) == tuple(param.shape):
            _fill_random(param.data, generator)
        else:
            full = torch.empty(full_shape, dtype=param.dtype, device=device)
            param.weight_loader(param, _fill_random(full, generator))


def _fill_random(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``tensor`` filled in place with small uniform values, or for the integers of ``"w4a16"`` layers (packed
    4-bit words, zero points) with random 4-bit values; returns it."""
    if tensor.is_floating_point():
        return tensor.uniform_(-1e-2, 1e-2, generator=generator)
    if tensor.dtype == torch.uint8:  # zero points
        return tensor.random_(0, 16, generator=generator)
    return tensor.random_(-(2**31), 2**31 - 1, generator=generator)  # int32 words of eight 4-bit values


DUMMY_INPUT_SCALE = 1.0 / FP8_MAX
"""The static input scale every projection gets with dummy weights when config.json declares static input
scales (inputs up to 1 in magnitude map onto e4m3's range): speed runs of such checkpoints."""


DUMMY_KV_SCALE = 1.0 / FP8_MAX
"""The KV-cache scale of every layer with dummy weights when config.json declares KV-cache scales and the cache
is fp8: speed runs of ``-FP8-KV`` checkpoints through the scaled kernels."""


def load_model(
    model_config: ModelConfig, backend: Backend, device: torch.device, load_format: str, seed: int | None = 0,
    quantization: str | None = None, kv_cache_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Instantiate the model on ``device`` in the configured dtype and load its weights.

    ``load_format``: ``auto``/``safetensors`` read the checkpoint; ``dummy`` fills every parameter with
    small random values (for speed runs with a config-only directory). ``quantization="fp8"`` /
    ``"fp8_block"``: the projections' weights in e4m3 with per-row / per-tile scales, computing through the
    backend's fp8 ops: read as they are from a checkpoint stored in fp8 (``model_config.quantization``, which
    must then equal ``quantization``; :func:`prepare_fp8_weights`), else quantized once loaded
    (:func:`quantize_linear_layers`; with dummy weights and static input scales in config.json, every
    projection also gets :data:`DUMMY_INPUT_SCALE`). ``kv_cache_dtype``: the KV cache's (None: the model's);
    an 8-bit float cache takes the checkpoint's KV-cache scales, if it declares them, into its attention layers
    (else they are skipped; with dummy weights every scale is :data:`DUMMY_KV_SCALE`). Raises ValueError naming
    any parameter the checkpoint does not fill, or a model with no quantizable layer under fp8.
    """
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantization!r}")
    cls = model_class_for(model_config.architecture)
    with _default_dtype(model_config.dtype), torch.device(device):
        model = cls(model_config.hf_config, backend)
    bind_linear_op(model, backend.linear)
    block = quantization == "fp8_block"
    stored = model_config.quantization is not None and load_format != "dummy"
    if stored and quantization != model_config.quantization:
        raise ValueError(f"the checkpoint's weights are stored in {model_config.quantization!r}; loading them "
                         f"with quantization {quantization!r} is not possible")
    w4a16 = model_config.w4a16 if quantization == "w4a16" else None  # a 4-bit checkpoint, or its dummy
    stored_fp8 = stored and w4a16 is None
    count = 0
    if w4a16 is not None:  # dummy weights of an act-order checkpoint number their groups in order
        count = prepare_w4a16_weights(model, backend, w4a16 if load_format != "dummy" else w4a16._replace(
            act_order=False))
    if stored_fp8:
        count = prepare_fp8_weights(model, backend, block, static_inputs=model_config.input_scales == "static")
        _check_quantizable(count, model_config, quantization)
    fp8_cache = kv_cache_dtype is not None and is_fp8(kv_cache_dtype)
    if load_format == "dummy":
        fill_dummy_weights(model, device, seed)
        if model_config.kv_cache_scales and fp8_cache:
            for layer in model.attention_layers():
                layer.k_scale = layer.v_scale = DUMMY_KV_SCALE
            logger.info("dummy weights with KV-cache scales: every k_scale and v_scale %g", DUMMY_KV_SCALE)
    else:
        lazy = bool(getattr(cls, "supports_tensor_parallel", False))
        weights = iterate_weights(Path(model_config.path), lazy=lazy)
        weights = _kv_cache_scales(weights, model_config.kv_cache_scales, fp8_cache)
        if w4a16 is not None:
            weights = w4a16_tensors(weights, w4a16)
        loaded = model.load_weights(_block_scale_names(weights) if stored_fp8 and block else weights)
        expected = {name for name, _ in model.named_parameters()}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(
                f"checkpoint {model_config.path} does not provide parameter(s): {', '.join(missing[:8])}"
                + (" ..." if len(missing) > 8 else "")
            )
    if w4a16 is not None:
        reordered = finish_w4a16(model)
        logger.info("w4a16 checkpoint (%s, groups of %s%s): %d linear layers loaded in 4 bits (%d with their "
                    "act-order columns sorted by group); weights %.1f MiB", w4a16.method,
                    w4a16.group_size if w4a16.group_size > 0 else "a row", ", act-order" * w4a16.act_order, count,
                    reordered, _parameter_bytes(model) / 2**20)
    elif quantization == "w4a16":
        before = _parameter_bytes(model)
        count = quantize_w4a16_layers(model, backend)
        logger.info("w4a16: %d linear layers stored in 4 bits in groups of %d; weights %.1f MiB -> %.1f MiB", count,
                    ONLINE_GROUP_SIZE, before / 2**20, _parameter_bytes(model) / 2**20)
    elif stored_fp8:
        logger.info("%s checkpoint: %d linear layers loaded in e4m3 with their scales (%s input scales); weights "
                    "%.1f MiB", quantization, count, model_config.input_scales, _parameter_bytes(model) / 2**20)
    elif quantization is not None:
        before = _parameter_bytes(model)
        count = quantize_linear_layers(model, backend, block)
        _check_quantizable(count, model_config, quantization)
        logger.info("%s: %d linear layers stored in e4m3 with %s scales; weights %.1f MiB -> %.1f MiB",
                    quantization, count, "128 x 128 tile" if block else "per-row", before / 2**20,
                    _parameter_bytes(model) / 2**20)
        if load_format == "dummy" and model_config.input_scales == "static":
            for module in model.modules():  # a speed run of a checkpoint with static input scales
                if getattr(module, "quantizable", False):
                    add_input_scale(module, DUMMY_INPUT_SCALE)
            logger.info("dummy weights with static input scales: every input_scale %g", DUMMY_INPUT_SCALE)
    if quantization in ("fp8", "fp8_block"):
        use_fp8_inputs(model)
    return model.eval()


def _kv_cache_scales(weights: Iterable[tuple[str, object]], declared: bool, used: bool) -> Iterator[tuple[str, object]]:
    """The checkpoint's tensors, its KV-cache scales (``KV_SCALE_TENSOR``) among them only when ``used`` (an fp8
    cache, whose layers take them: ``PagedAttention.load_kv_scale``); with a cache in the model dtype they are
    not needed and are skipped (logged). Raises ValueError for a KV-cache scale that config.json does not
    declare (``declared``: ``ModelConfig.kv_cache_scales``)."""
    skipped = passed = 0
    for name, tensor in weights:
        if KV_SCALE_TENSOR.search(name):
            if not declared:
                raise ValueError(f"checkpoint tensor {name!r} is a KV-cache scale, but config.json's "
                                 f"quantization_config declares none (kv_cache_scheme or kv_cache_quant_targets)")
            if not used:
                skipped += 1
                continue
            passed += 1
        yield name, tensor
    if skipped:
        logger.info("skipped the checkpoint's %d KV-cache scale tensors: the KV cache stores the model dtype", skipped)
    if passed:
        logger.info("the fp8 KV cache takes the checkpoint's %d KV-cache scale tensors", passed)


def _block_scale_names(weights: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """The checkpoint's tensors with DeepSeek's name for tile scales, ``weight_scale_inv`` (what dequantizing
    multiplies by, despite the name), read as ``weight_scale``, the name compressed-tensors and pagedllm use."""
    for name, tensor in weights:
        yield (name[: -len("_inv")] if name.endswith(".weight_scale_inv") else name), tensor


def _check_quantizable(count: int, model_config: ModelConfig, quantization: str | None) -> None:
    if count == 0:
        raise ValueError(f"quantization={quantization!r}: {model_config.architecture} has no linear layer marked "
                         "quantizable (see pagedllm.core.models.layers.quantize_linear_layers)")


def _parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (scales included), shared tensors counted once."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
