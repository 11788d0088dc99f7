"""The one abstract attention/memory backend every accelerator implements.

The hardware-neutral core (scheduler, block manager, model runner, model definitions) talks to an
accelerator only through :class:`Backend`. A backend is registered through pluggy (see
``pagedllm.backends.hookspecs``) exactly like a third-party plugin, and its behaviour is checked against
the ``cpu`` reference backend by the conformance kit (``pagedllm.conformance``).

Shapes used throughout:

- ``num_tokens``: tokens in the flat batch of one step (prefill chunks and decodes mixed),
- ``num_requests``: requests in that batch; decodes (one new token) come first, then prefills,
- ``num_heads`` / ``num_kv_heads`` / ``head_dim``: attention geometry of one layer,
- a KV cache is one tensor per layer whose layout the backend chooses (:meth:`Backend.kv_cache_shape`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace

import torch

from pagedllm.backends.kv_storage import divide_by_scale
from pagedllm.backends.moe import moe_reference, route_tokens

# The interface version a backend declares in ``Backend.interface_version``: (major, minor). The minor is
# raised when something is added (a method with a neutral default, a capability field with a default), so
# older backends keep working; the major is raised when something a backend relies on changes or goes.
# A backend is compatible when its major equals ours and its minor is not newer than ours (it may use
# nothing we do not have). History: 1.0 (pagedllm 0.1) — the first interface; 1.1 — ``Backend.configure``
# receives the plugin's own command-line options; 1.2 — ``Backend.create_communicator`` (a device all-reduce
# that captured graphs may contain, for tensor-parallel decode graphs); 1.3 — ``Backend.linear`` (the
# model's linear layers), ``DeviceCommunicator.all_reduce_add_rms_norm`` (an all-reduce fused with the
# residual add and norm after it) and ``BackendCapabilities.runs_asynchronously``; 1.4 — the scheduler
# defaults ``BackendCapabilities.default_max_num_seqs`` and ``default_max_num_batched_tokens``; 1.5 — fp8
# linear layers: ``Backend.linear_fp8`` and ``BackendCapabilities.quantizations``; ``Backend.weights_loaded``;
# 1.6 — fp8 inputs quantized by the op before the projection: ``Backend.rms_norm_fp8``, ``add_rms_norm_fp8``,
# ``silu_and_mul_fp8`` and ``linear_fp8_quantized``; 1.7 — fp8 weights with 128 x 128 tile scales:
# ``Backend.linear_fp8_block`` and the ``"fp8_block"`` name in ``BackendCapabilities.quantizations``; 1.8 —
# per-head q/k norms with the rotary embedding: ``Backend.qk_norm_rotary_embedding``; the fp8 input ops for
# tile-scaled layers: ``Backend.rms_norm_fp8_groups``, ``add_rms_norm_fp8_groups``, ``silu_and_mul_fp8_groups``
# and ``linear_fp8_block_quantized``; fp8 layers with static input scales: ``Backend.linear_fp8_static``; 1.9 —
# KV caches holding scaled keys and values (the per-layer ``k_scale``/``v_scale`` of fp8 checkpoints):
# ``Backend.write_kv_cache_scaled`` and ``Backend.attention_scaled``; 1.10 — ``BackendCapabilities.compiles_kernels``
# (the engine's start runs warm-up steps, so no request waits for a kernel compile); 1.11 — mixture-of-experts
# layers: ``Backend.fused_moe``; 1.12 — GeGLU MLPs (Gemma): ``Backend.gelu_and_mul``; 1.13 — the routers of
# mixture-of-experts layers: ``Backend.topk_softmax``; attention logits soft-capped (Gemma 2):
# ``AttentionSpec.logits_soft_cap`` and ``BackendCapabilities.supports_logits_soft_cap``; 1.14 — 4-bit weights
# with 16-bit activations (AWQ, GPTQ, compressed-tensors checkpoints): ``Backend.linear_w4a16`` and the
# ``"w4a16"`` name in ``BackendCapabilities.quantizations``.
INTERFACE_VERSION: tuple[int, int] = (1, 14)


class InterfaceVersionError(ValueError):
    """A backend declares an interface version this pagedllm cannot run (or a malformed one)."""


def format_version(version: tuple[int, int]) -> str:
    """Return ``"MAJOR.MINOR"`` for an interface version tuple (e.g. ``(1, 0) -> "1.0"``)."""
    return ".".join(str(part) for part in version)


def is_compatible_version(plugin_version: tuple[int, int]) -> bool:
    """Tell whether a backend implementing ``plugin_version`` can run on this pagedllm.

    Returns True when the majors are equal and the plugin's minor is <= ours; False otherwise, including
    for a malformed version (anything but two non-negative ints).
    """
    if not _is_version(plugin_version):
        return False
    return plugin_version[0] == INTERFACE_VERSION[0] and plugin_version[1] <= INTERFACE_VERSION[1]


def check_interface_version(backend_cls: type[Backend], origin: str) -> None:
    """Refuse a backend class whose declared ``interface_version`` this pagedllm cannot run.

    ``origin`` names where the class comes from (e.g. ``"distribution 'acme-pagedllm' 1.2"``) and is put
    in the message. Returns None when compatible; raises :class:`InterfaceVersionError` naming the backend,
    its origin, its version and ours, and saying what to do.
    """
    declared = getattr(backend_cls, "interface_version", None)
    name = getattr(backend_cls, "name", "") or backend_cls.__qualname__
    if not _is_version(declared):
        raise InterfaceVersionError(
            f"backend {name!r} from {origin} declares interface_version={declared!r}; it must be a "
            f"(major, minor) tuple of ints such as {INTERFACE_VERSION!r}"
        )
    if not is_compatible_version(declared):
        newer = tuple(declared) > INTERFACE_VERSION
        advice = (
            "upgrade pagedllm, or install a version of the plugin built for this one"
            if newer
            else f"install a version of the plugin built for backend interface {format_version(INTERFACE_VERSION)}"
        )
        raise InterfaceVersionError(
            f"backend {name!r} from {origin} implements backend interface {format_version(declared)}, but "
            f"this pagedllm provides interface {format_version(INTERFACE_VERSION)} (compatible: "
            f"{INTERFACE_VERSION[0]}.0 to {format_version(INTERFACE_VERSION)}); {advice}"
        )


def _is_version(version: object) -> bool:
    return (
        isinstance(version, tuple)
        and len(version) == 2
        and all(isinstance(part, int) and not isinstance(part, bool) and part >= 0 for part in version)
    )


@dataclass(frozen=True, slots=True)
class BackendCapabilities:
    """What a backend can do; the core adapts to it and never asks which vendor it is.

    The conformance kit tests exactly the combinations claimed here.
    """

    dtypes: tuple[torch.dtype, ...]
    """Model/activation dtypes the attention and fused ops accept."""
    kv_cache_dtypes: tuple[torch.dtype, ...]
    """Dtypes the KV cache may be stored in: the model dtypes, and KV-only formats such as
    ``torch.float8_e4m3fn`` (the engine's ``kv_cache_dtype="fp8"``) whose tiles the attention converts to the
    query dtype as it reads them."""
    block_sizes: tuple[int, ...]
    """KV block sizes (token slots per block) supported; the core picks the configured one if listed,
    else the first."""
    head_sizes: tuple[int, ...]
    """Head dimensions supported by the attention kernels."""
    needs_static_shapes: bool = False
    """True for compile-to-fixed-shape devices: the core pads batches to ``token_buckets``."""
    token_buckets: tuple[int, ...] = ()
    """Padded token counts to use when ``needs_static_shapes``."""
    supports_chunked_prefill: bool = True
    """False: a prompt is always prefilled in one step (the token budget is raised to fit it)."""
    supports_sliding_window: bool = True
    """Whether ``AttentionSpec.sliding_window`` is honoured."""
    supports_logits_soft_cap: bool = False
    """Whether ``AttentionSpec.logits_soft_cap`` is honoured; the engine refuses a model that needs it (Gemma 2)
    on a backend that does not say so. Added in 1.13."""
    can_capture_graphs: bool = False
    """Whether :meth:`Backend.capture_graph` records replayable device graphs."""
    supports_distributed: bool = True
    """Whether several processes of this backend can run tensor parallel through ``dist_backend``."""
    runs_asynchronously: bool = False
    """True when launched work runs on the device apart from the host (queued to a stream, as on GPUs): the
    engine then schedules asynchronously unless told not to (the next step is launched while the current
    one runs). False where the host computes the step itself (the ``cpu`` backend). Added in 1.3."""
    default_max_num_seqs: int = 256
    """The running-request cap (``max_num_seqs``) the engine uses when none is given: large enough that a
    decode step keeps the device's matrix units busy, small enough for its memory. Added in 1.4."""
    default_max_num_batched_tokens: int | None = None
    """The per-step token budget (``max_num_batched_tokens``) the engine uses when none is given; None:
    ``max(2048, max_num_seqs)``. Added in 1.4."""
    quantizations: tuple[str, ...] = ()
    """Quantization schemes of the model's linear layers (the engine's ``quantization``) this backend runs:
    ``"fp8"`` — e4m3 weights with per-row scales and per-token input scales, through :meth:`Backend.linear_fp8`
    (see ``pagedllm.backends.fp8_linear``; added in 1.5); ``"fp8_block"`` — e4m3 weights with a scale per 128 x
    128 tile and inputs with a scale per token and 128 features, through :meth:`Backend.linear_fp8_block`
    (added in 1.7); ``"w4a16"`` — 4-bit weights in groups with scales and zero points, inputs in the model
    dtype, through :meth:`Backend.linear_w4a16` (see ``pagedllm.backends.w4a16_linear``; added in 1.14).
    Claimed only where it runs on every dtype of ``dtypes``."""
    compiles_kernels: bool = False
    """True where kernels compile a variant per argument specialization on their first launch (Triton's JIT,
    ``torch.compile``): the engine's start then runs throw-away steps of every shape class its steps have
    (``ModelRunner.warm_up``: a mixed step, and decode steps at every power of two up to ``max_num_seqs`` when
    no graphs are recorded, else the graph capture's), so no request waits for a compile. A variant chosen by
    the decode batch size must, for every size between two consecutive powers of two, be the variant of one
    of them (a monotone choice moving at most one step per doubling). Added in 1.10."""

    def __post_init__(self) -> None:
        """Normalize the sequences to tuples and refuse claims no engine could use.

        Raises ValueError naming the field: an empty dtype/size list, a non-positive size, or
        ``needs_static_shapes`` without ``token_buckets``.
        """
        for name in ("dtypes", "kv_cache_dtypes", "block_sizes", "head_sizes", "token_buckets", "quantizations"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not all(isinstance(q, str) and q for q in self.quantizations):
            raise ValueError(f"BackendCapabilities.quantizations must hold names, got {self.quantizations!r}")
        for name in ("dtypes", "kv_cache_dtypes"):
            values = getattr(self, name)
            if not values or not all(isinstance(v, torch.dtype) for v in values):
                raise ValueError(f"BackendCapabilities.{name} must be a non-empty tuple of torch.dtype, got {values!r}")
        for name in ("block_sizes", "head_sizes", "token_buckets"):
            values = getattr(self, name)
            if not all(isinstance(v, int) and v >= 1 for v in values):
                raise ValueError(f"BackendCapabilities.{name} must hold positive ints, got {values!r}")
            if name != "token_buckets" and not values:
                raise ValueError(f"BackendCapabilities.{name} must not be empty")
        for name in ("default_max_num_seqs", "default_max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"BackendCapabilities.{name} must be a positive int, got {value!r}")
        if self.needs_static_shapes and not self.token_buckets:
            raise ValueError("BackendCapabilities.needs_static_shapes requires token_buckets (padded token counts)")

    def summary(self) -> str:
        """Return a one-line human summary, e.g. ``"float32,bfloat16; blocks 16,32; heads 64,128; chunked"``.

        Used by ``pagedllm backends``; lists are shown sorted, dtypes without the ``torch.`` prefix.
        """
        parts = [",".join(_dtype_name(d) for d in self.dtypes)]
        if set(self.kv_cache_dtypes) != set(self.dtypes):
            parts.append("kv " + ",".join(_dtype_name(d) for d in self.kv_cache_dtypes))
        if self.quantizations:
            parts.append("quantization " + ",".join(self.quantizations))
        parts.append("blocks " + ",".join(str(v) for v in sorted(self.block_sizes)))
        parts.append("heads " + ",".join(str(v) for v in sorted(self.head_sizes)))
        flags = [
            flag
            for flag, on in (
                ("chunked-prefill", self.supports_chunked_prefill),
                ("sliding-window", self.supports_sliding_window),
                ("soft-cap", self.supports_logits_soft_cap),
                ("graphs", self.can_capture_graphs),
                ("tp", self.supports_distributed),
                ("async", self.runs_asynchronously),
                ("warm-up", self.compiles_kernels),
                ("static-shapes " + ",".join(str(v) for v in self.token_buckets), self.needs_static_shapes),
            )
            if on
        ]
        return "; ".join(parts + flags)

    def as_dict(self) -> dict[str, object]:
        """Return the capabilities as JSON-ready values (dtypes as names such as ``"bfloat16"``)."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("dtypes", "kv_cache_dtypes"):
                value = [_dtype_name(d) for d in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """Per-layer constants of an attention call.

    ``sliding_window``: a query at position p sees keys at positions in ``(p - sliding_window, p]``;
    None means full causal attention. ``logits_soft_cap``: each scaled score ``s = scale * q . k`` becomes
    ``cap * tanh(s / cap)`` before the mask and the softmax; None leaves it.
    """

    num_heads: int
    """Query heads of the layer (on this tensor-parallel rank)."""
    num_kv_heads: int
    """Key/value heads; ``num_heads % num_kv_heads == 0``. Query head ``h`` reads KV head
    ``h // (num_heads // num_kv_heads)`` (MHA: equal counts, GQA: groups, MQA: one KV head)."""
    head_dim: int
    """Size of one head; one of ``BackendCapabilities.head_sizes``."""
    scale: float
    """Multiplier of ``q . k`` before the softmax (usually ``head_dim ** -0.5``)."""
    sliding_window: int | None = None
    """See the class docstring; only set when ``BackendCapabilities.supports_sliding_window``."""
    logits_soft_cap: float | None = None
    """See the class docstring; only set when ``BackendCapabilities.supports_logits_soft_cap``. Added in 1.13."""


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs to know about one flat batch, built once per step by the model runner.

    Requests are ordered decodes first (``query_len == 1``), then prefills (chunks of one or more
    tokens, possibly over cached prefix blocks). Token ``t`` of request ``r`` is row
    ``query_start_loc[r] + t`` of the flat batch and sits at position ``context_lens[r] + t``. Several decode
    "requests" may be rows of one sequence at consecutive positions, sharing its block table (speculative
    decoding's draft rows, the last layer's sampled rows): the cache holds every row's keys and values before
    attention, so a row sees the rows before it (the conformance kit's ``decode_rows`` cases).

    Slot mapping, worked example with ``block_size=4``: a request with block table ``[7, 2]`` whose
    tokens at positions 3, 4, 5 are in this step writes them to slots ``7*4+3=31``, ``2*4+0=8``,
    ``2*4+1=9``. A slot of ``-1`` marks a padding token that must not be written.
    """

    num_tokens: int
    """Real tokens in the batch (rows of ``slot_mapping`` that are >= 0 come first)."""
    num_decodes: int
    """Leading requests that add exactly one token each."""
    query_start_loc: torch.Tensor
    """``[num_requests + 1]`` int32 on device: prefix sums of the new-token counts."""
    seq_lens: torch.Tensor
    """``[num_requests]`` int32 on device: context + new tokens of each request."""
    context_lens: torch.Tensor
    """``[num_requests]`` int32 on device: tokens already in the KV cache before this step."""
    block_tables: torch.Tensor
    """``[num_requests, max_blocks_per_seq]`` int32 on device; unused entries are 0."""
    slot_mapping: torch.Tensor
    """``[num_tokens_padded]`` int64 on device: the KV slot of each token, -1 for padding."""
    max_query_len: int
    """Largest new-token count of one request in the batch (1 for a pure decode batch)."""
    max_seq_len: int
    """Largest ``seq_lens`` entry."""
    block_size: int
    """Token slots per KV block, as passed to :meth:`Backend.kv_cache_shape`."""
    query_start_loc_cpu: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int32))
    """Host copy of ``query_start_loc`` for backends that plan work on the host."""
    seq_lens_cpu: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    """Host copy of ``seq_lens``."""

    @property
    def num_requests(self) -> int:
        """Number of requests in the batch."""
        return int(self.seq_lens.shape[0])

    @property
    def num_prefills(self) -> int:
        """Requests after the decodes: prompt chunks of any length, possibly over cached prefix blocks."""
        return self.num_requests - self.num_decodes


class DeviceCommunicator(abc.ABC):
    """A backend's own collectives over the ranks of one tensor-parallel group, for small tensors.

    Returned by :meth:`Backend.create_communicator`. Unlike ``torch.distributed`` collectives they may be
    recorded in a captured graph and replayed: tensor-parallel decode graphs send every all-reduce through
    :meth:`all_reduce`, and, when :attr:`max_gather_bytes` covers the LM head's output, its all-gather
    through :meth:`all_gather` (else the LM head runs after the replay). Every rank calls them in the same
    order, eagerly or while a graph is captured; they must not synchronize the host.
    """

    max_bytes: int
    """The largest tensor (in bytes) :meth:`all_reduce` takes; larger ones go through ``torch.distributed``."""
    max_gather_bytes: int = 0
    """The largest per-rank tensor (in bytes) :meth:`all_gather` takes; 0: it offers none."""

    @abc.abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Return the element-wise sum of ``x`` over the ranks; called by the row-parallel layers and the
        vocabulary-parallel embedding on their ``[num_tokens, hidden]`` outputs. ``x`` is contiguous, in the
        model dtype, at most :attr:`max_bytes` bytes. May return a new tensor."""

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Return every rank's ``x`` concatenated along ``dim`` in rank order; called by the vocabulary-parallel
        LM head on its ``[num_sampled, vocab / world_size]`` logits. ``x`` is contiguous, the same shape on
        every rank, at most :attr:`max_gather_bytes` bytes. Default: not offered."""
        raise NotImplementedError(f"{type(self).__name__} offers no all-gather (max_gather_bytes is 0)")

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Sum ``x`` over the ranks, add ``residual`` and normalize, in one pass; or None to decline.

        Called where a row-parallel layer's output meets the next RMSNorm (twice per decoder layer) with
        ``x``: this rank's partial sum ``[num_tokens, hidden]``, contiguous, model dtype, at most
        :attr:`max_bytes`; ``residual``: same shape and dtype, contiguous; ``weight``: ``[hidden]``. Returns
        ``(normed, residual)`` exactly as :meth:`Backend.add_rms_norm` would on the summed ``x`` (the sum
        rounded to the model dtype before the add), with ``residual`` updated in place; every rank must get
        bit-identical results. Returning None (every rank alike) makes the caller run :meth:`all_reduce` and
        the backend's ``add_rms_norm``. Default: None. Added in 1.3.
        """
        return None


class Backend(abc.ABC):
    """Abstract accelerator backend: device life, KV cache layout and writes, paged attention, fused ops.

    Life of a backend, in call order: the registry asks the class :meth:`is_available` (``--device``,
    ``pagedllm backends``); the engine builds one instance per process with no arguments (the constructor
    must be cheap and touch no hardware), reads :meth:`capabilities`, then each worker calls
    :meth:`init_device`, :meth:`device`, :meth:`kv_cache_shape` and :meth:`kv_cache_budget_bytes` once;
    every step calls, per layer, :meth:`write_kv_cache` then :meth:`attention`, plus the fused ops the
    model uses; :meth:`copy_blocks` runs when shared blocks are copied. Methods called on the per-token
    path (``write_kv_cache``, ``attention``, fused ops) must not synchronize the host.

    A subclass must implement the abstract methods; the others have neutral defaults that are correct on
    any device (the conformance kit checks overrides against them).
    """

    name: str = ""
    """One lower-case word (``[a-z][a-z0-9_]*``, not ``auto``): the folder, entry point, ``--device``
    value and test id (e.g. ``cpu``)."""
    device_type: str = "cpu"
    """The torch device type tensors live on (``cpu``, ``cuda``, ``xpu``, ...)."""
    dist_backend: str = "gloo"
    """The ``torch.distributed`` backend for tensor parallelism (``gloo``, ``nccl``, ``xccl``, ...)."""
    interface_version: tuple[int, int] = INTERFACE_VERSION
    """The ``(major, minor)`` interface version this backend implements; checked at registration
    (:func:`check_interface_version`). A third-party backend must set it in its own class, as the literal
    it was written against (e.g. ``(1, 0)``), never as ``INTERFACE_VERSION``, which always equals ours:
    the registry refuses a third-party backend that only inherits this default."""
    priority: int = 0
    """Order for ``--device auto`` among available backends of the same origin: higher is tried first
    (third-party backends come before built-in ones whatever their priority)."""

    # ------------------------------------------------------------------ identity and capabilities
    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> tuple[bool, str]:
        """Tell whether this backend can run on this machine; called by the registry for ``--device``
        and ``pagedllm backends``.

        Cheap, never raises: vendor SDKs are imported inside a try. Returns ``(True, "")`` or
        ``(False, reason)`` where the reason tells the operator what is missing.
        """

    @abc.abstractmethod
    def capabilities(self) -> BackendCapabilities:
        """Return what this backend supports; called when the engine is configured, by
        ``pagedllm backends`` and by the conformance kit (which tests exactly these claims).

        Cheap, no device work; may be called on a machine where :meth:`is_available` is False (it then
        describes what the backend would support). Returns a :class:`BackendCapabilities`.
        """

    # ------------------------------------------------------------------ device life
    def configure(self, options: Mapping[str, object]) -> None:  # noqa: B027 - neutral default
        """Receive engine options meant for plugins; called once per worker, right after construction and
        before :meth:`init_device`.

        ``options``: ``EngineConfig.extra`` — the values of every option plugins added through
        ``pagedllm_add_cli_options`` (keyed by argparse ``dest``, e.g. ``{"acme_profile": True}``) plus
        whatever ``LLM(..., extra={...})`` passed. Returns None. Default: ignore them. Added in 1.1.
        """

    def init_device(self, rank: int, world_size: int) -> None:  # noqa: B027 - neutral default
        """Bind this process to its device; called once per worker before any tensor is created.

        ``rank``: this process's index in its tensor-parallel group (0 without TP); ``world_size``: the
        group size (1 without TP). Returns None. Default: nothing to do.
        """

    def weights_loaded(self) -> None:  # noqa: B027 - neutral default
        """Called once per worker when the model's weights are in place as they will be stored (after an fp8
        quantization freed the loaded ones), before the profiling forward that precedes
        :meth:`kv_cache_budget_bytes`. A backend that sizes the KV pool from its peak memory restarts that
        count here, so the transient peak of loading is not held against the pool. Default: nothing to do.
        Added in 1.5.
        """

    def device(self, rank: int = 0) -> torch.device:
        """Return the torch device of local rank ``rank``; called after :meth:`init_device` to place
        weights, the KV pool and step inputs. Default: ``torch.device(device_type)``."""
        return torch.device(self.device_type)

    def device_count(self) -> int | None:
        """Return how many devices of this backend this machine has, or None when any number of ranks may
        share the host (``cpu``); called before a tensor-parallel engine starts, to refuse more ranks than
        devices. Cheap, no device work.

        Default: ``torch.accelerator.device_count()`` when torch's current accelerator is of this backend's
        ``device_type``, else 1.
        """
        accelerator = getattr(torch, "accelerator", None)
        current = accelerator.current_accelerator() if accelerator is not None else None
        if current is not None and current.type == self.device_type:
            return int(accelerator.device_count())
        return 1

    @abc.abstractmethod
    def memory_info(self) -> tuple[int, int]:
        """Return ``(free_bytes, total_bytes)`` of the memory KV blocks would be allocated in.

        Called after the profiling forward (through :meth:`kv_cache_budget_bytes`) to size the KV pool.
        """

    def kv_cache_budget_bytes(self, memory_utilization: float) -> int:
        """Return the bytes the KV pool may take; called after the model is loaded and profiled.

        Default: ``memory_utilization * free_bytes``. Backends with a better rule override it.
        """
        free_bytes, _ = self.memory_info()
        return int(free_bytes * memory_utilization)

    def synchronize(self) -> None:  # noqa: B027 - neutral default
        """Wait for queued device work to finish; called by profiling, benchmarks and tests only, never per
        token. Default: nothing to wait for (synchronous devices)."""

    # ------------------------------------------------------------------ KV cache
    @abc.abstractmethod
    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Return the shape of one layer's KV cache tensor; the backend owns the layout.

        Called once when the KV pool is sized and allocated (``torch.zeros(shape, dtype, device)`` per
        layer, dtype one of ``capabilities().kv_cache_dtypes``). The tensor holds keys and values of
        ``num_blocks * block_size`` token slots of ``num_kv_heads`` heads of ``head_dim``, in any order the
        backend's kernels like (e.g. ``[2, num_blocks, block_size, num_kv_heads, head_dim]``); the core
        only allocates it and hands it back. Its element count must grow linearly with ``num_blocks``.
        """

    @abc.abstractmethod
    def write_kv_cache(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Store this step's keys and values in the paged cache, in place; called once per layer per step,
        just before :meth:`attention`.

        ``key``, ``value``: ``[num_tokens, num_kv_heads, head_dim]`` in the model dtype (cast to the
        cache's dtype on store: to nearest, ties to even; 8-bit floats saturate at their largest finite value;
        no scale: ``kv_storage.to_cache_dtype``); ``kv_cache``: one layer's tensor of :meth:`kv_cache_shape`;
        ``slot_mapping``: ``[num_tokens]`` int64 on the device, the slot of each token (see
        :class:`AttentionMetadata`), -1 for tokens not to store (padding). Returns None; no slot other
        than the mapped ones may change.
        """

    @abc.abstractmethod
    def read_kv_cache(
        self, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(key, value)`` stored at the given slots, each ``[num_slots, num_kv_heads, head_dim]``
        in the cache's dtype.

        ``slot_mapping``: ``[num_slots]`` int64 slot ids (no -1). Not on the hot path: used by the
        conformance kit to check writes and block copies round-trip whatever the layout.
        """

    @abc.abstractmethod
    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        """Copy whole blocks, in every layer's cache, in place; called by the engine before a step that
        writes into a block another request shares (copy-on-write).

        ``kv_caches``: every layer's cache tensor; ``src_to_dst``: ``[num_pairs, 2]`` int64 on the device,
        each row ``(src_block_id, dst_block_id)``; destinations are distinct and never sources. Returns
        None; all slots of each destination block become those of its source, nothing else changes.
        """

    # ------------------------------------------------------------------ attention
    @abc.abstractmethod
    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        spec: AttentionSpec,
    ) -> torch.Tensor:
        """Causal attention of the mixed batch over the paged cache; called once per layer per step,
        after :meth:`write_kv_cache` stored this step's keys and values.

        ``query``: ``[num_tokens, num_heads, head_dim]``; ``key``/``value``: ``[num_tokens,
        num_kv_heads, head_dim]`` (this step's, also already in the cache); ``kv_cache``: the layer's
        cache; ``metadata``: the batch (:class:`AttentionMetadata`); ``spec``: the layer's heads, scale
        and window (:class:`AttentionSpec`). Token ``t`` of request ``r``, at position ``p =
        context_lens[r] + t``, attends to that request's positions ``0..p`` (within the sliding window),
        read through ``metadata.block_tables``; query head ``h`` uses KV head ``h // (num_heads //
        num_kv_heads)``. Returns a new ``[num_tokens, num_heads, head_dim]`` tensor in ``query``'s dtype;
        every row of a real token must be written, rows of padding tokens (slot -1) may hold anything.
        """

    # ------------------------------------------------------------------ scaled KV caches
    def write_kv_cache_scaled(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
        k_scale: float, v_scale: float,
    ) -> None:
        """:meth:`write_kv_cache` of ``key / k_scale`` and ``value / v_scale``: called instead of it, once per
        layer per step, by the layers of a model whose fp8 KV cache takes the checkpoint's per-layer scales
        (``k_scale``/``v_scale`` of ``-FP8-KV`` checkpoints; a scale maps the layer's largest key or value onto
        the format's largest finite value, so none saturates).

        ``key``, ``value``: ``[num_tokens, num_kv_heads, head_dim]`` in the model dtype (unscaled); the cache and
        ``slot_mapping`` as in :meth:`write_kv_cache`; ``k_scale``, ``v_scale``: positive finite floats. Each
        value is stored as ``kv_storage.to_cache_dtype(kv_storage.divide_by_scale(x, scale))``: multiplied in
        float32 by the float32 inverse of its scale, then cast as :meth:`write_kv_cache` casts. Default: the
        products rounded to ``key``'s dtype, then :meth:`write_kv_cache` (one extra rounding, well inside an
        8-bit cache's precision). Added in 1.9.
        """
        self.write_kv_cache(divide_by_scale(key, k_scale).to(key.dtype),
                            divide_by_scale(value, v_scale).to(value.dtype), kv_cache, slot_mapping)

    def attention_scaled(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        spec: AttentionSpec,
        k_scale: float,
        v_scale: float,
    ) -> torch.Tensor:
        """:meth:`attention` over a cache written by :meth:`write_kv_cache_scaled`: every cached key counts as
        ``k_scale`` times what is stored, every value as ``v_scale`` times; called instead of :meth:`attention`
        by the layers that write scaled.

        ``key``/``value``: this step's, as the layer computed them (unscaled); the rest as in :meth:`attention`.
        Returns ``[num_tokens, num_heads, head_dim]`` in ``query``'s dtype. Default: :meth:`attention` with the
        score scale times ``k_scale`` (``q . (k_scale k) = k_scale (q . k)``) over this step's keys and values
        divided by their scales, its output times ``v_scale`` (the output is linear in the values). Added in
        1.9.
        """
        out = self.attention(query, divide_by_scale(key, k_scale).to(key.dtype),
                             divide_by_scale(value, v_scale).to(value.dtype), kv_cache, metadata,
                             replace(spec, scale=spec.scale * k_scale))
        return out * v_scale

    # ------------------------------------------------------------------ optional fused ops
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm as Hugging Face computes it: float32 variance, then ``weight * x.to(dtype)``; called by
        every norm layer of the model, per step.

        ``x``: ``[num_tokens, hidden]``; ``weight``: ``[hidden]``; ``eps``: added to the mean square.
        Returns ``[num_tokens, hidden]``; ``x`` is not modified.
        """
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual add then RMSNorm: returns ``(rms_norm(x + residual), x + residual)``; called by the norm
        layers that follow a residual connection, per step.

        ``x``, ``residual``: ``[num_tokens, hidden]``; ``weight``: ``[hidden]``. Returns two ``[num_tokens,
        hidden]`` tensors. Backends may fuse both and may write into ``residual`` in place (the
        caller uses only the returned tensors).
        """
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply rotary embedding (Hugging Face "rotate half" / NeoX layout).

        ``positions``: ``[num_tokens]`` int64; ``query``: ``[num_tokens, num_heads, head_dim]``;
        ``key``: ``[num_tokens, num_kv_heads, head_dim]``; ``cos_sin_cache``: ``[max_position,
        head_dim]`` float32, cos in the first half of the last dim and sin in the second. Returns the
        rotated ``(query, key)`` in their dtype (new tensors or the inputs rotated in place). Called by
        every attention layer, per step, before :meth:`write_kv_cache`.
        """
        cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(query.dtype)
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(query.dtype)

        def rotate_half(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((-x2, x1), dim=-1)

        return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin

    def qk_norm_rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, q_weight: torch.Tensor,
        k_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of every head of ``query`` (weights ``q_weight``) and of ``key`` (``k_weight``), then
        :meth:`rotary_embedding`; called by the attention layers of models that norm q and k per head before
        the rotary embedding (Qwen3), per step, instead of :meth:`rotary_embedding`.

        ``query: [num_tokens, num_heads, head_dim]``, ``key: [num_tokens, num_kv_heads, head_dim]`` (views of a
        fused q|k|v output are fine); ``q_weight``, ``k_weight``: ``[head_dim]``; ``eps``: the norms'; the
        rest as in :meth:`rotary_embedding`. Returns the normed and rotated ``(query, key)`` in their dtype.
        Default: :meth:`rms_norm` over ``[num_tokens * heads, head_dim]`` rows, then :meth:`rotary_embedding`
        (so a backend that fuses only those ops keeps them). Added in 1.8.
        """
        head_dim = query.shape[-1]
        q = self.rms_norm(query.reshape(-1, head_dim), q_weight, eps).view(query.shape)
        k = self.rms_norm(key.reshape(-1, head_dim), k_weight, eps).view(key.shape)
        return self.rotary_embedding(positions, q, k, cos_sin_cache)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias``; called by every linear layer of the model (projections and the LM head),
        per step, so a backend can pick its own kernel by shape (e.g. a GEMV for one-token decode steps).

        ``x``: ``[num_tokens, in_features]``; ``weight``: ``[out_features, in_features]``; ``bias``:
        ``[out_features]`` or None; one dtype. Returns ``[num_tokens, out_features]`` in that dtype. Default:
        ``torch.nn.functional.linear``. Added in 1.3.
        """
        return torch.nn.functional.linear(x, weight, bias)

    def linear_fp8(
        self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """An fp8 linear layer: ``x`` quantized per token to e4m3, times the e4m3 ``weight``, both scales
        applied (``pagedllm.backends.fp8_linear``); called instead of :meth:`linear` by every projection of a
        model loaded with ``quantization="fp8"`` (not the LM head), per step, only when
        ``"fp8" in capabilities().quantizations``.

        ``x``: ``[num_tokens, in_features]`` in the model dtype; ``weight``: ``[out_features, in_features]``
        ``torch.float8_e4m3fn``; ``weight_scale``: ``[out_features]`` float32; ``bias``: ``[out_features]`` in
        the model dtype or None. Returns ``[num_tokens, out_features]`` in ``x.dtype``. Default: the float32
        PyTorch reference (``reference_linear_fp8``), which the conformance kit compares every backend with.
        Added in 1.5.
        """
        from pagedllm.backends.fp8_linear import reference_linear_fp8

        return reference_linear_fp8(x, weight, weight_scale, bias)

    def linear_fp8_block(
        self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """An fp8 linear layer with tile scales: ``x`` quantized to e4m3 per token and group of 128 features,
        times the e4m3 ``weight`` whose 128 x 128 tiles each have a scale (``pagedllm.backends.fp8_linear``);
        called instead of :meth:`linear` by every projection of a model loaded with
        ``quantization="fp8_block"`` (a DeepSeek-V3- or Qwen3-FP8-style checkpoint, or online), per step, only
        when ``"fp8_block" in capabilities().quantizations``.

        ``x``: ``[num_tokens, in_features]`` in the model dtype; ``weight``: ``[out_features, in_features]``
        ``torch.float8_e4m3fn``; ``weight_scale``: ``[ceil(out_features / 128), ceil(in_features / 128)]``
        float32; ``bias``: ``[out_features]`` in the model dtype or None. Returns ``[num_tokens,
        out_features]`` in ``x.dtype``. Default: the float32 PyTorch reference (``reference_linear_fp8_block``),
        which the conformance kit compares every backend with. Added in 1.7.
        """
        from pagedllm.backends.fp8_linear import reference_linear_fp8_block

        return reference_linear_fp8_block(x, weight, weight_scale, bias)

    def linear_w4a16(
        self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
        g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A linear layer with 4-bit weights: ``x @ W.T + bias`` with ``W[n, k] = (q[n, k] - zeros[n, g(k)]) *
        scales[n, g(k)]`` (``pagedllm.backends.w4a16_linear``); called instead of :meth:`linear` by every
        projection of a model loaded with ``quantization="w4a16"`` (an AWQ, GPTQ or compressed-tensors 4-bit
        checkpoint, or online), per step, only when ``"w4a16" in capabilities().quantizations``.

        ``x``: ``[num_tokens, in_features]`` in the model dtype; ``weight``: ``[out_features, in_features // 8]``
        int32, eight 4-bit values ``q`` per word, feature ``k`` in bits ``4 * (k % 8)``; ``scales``:
        ``[out_features, in_features // group_size]`` float32; ``zeros``: the same shape, uint8 (0..16);
        ``group_size``: input features per group (a multiple of 8 dividing ``in_features``); ``g_idx``:
        ``[in_features]`` int32, the group of each feature (act-order checkpoints), or None for ``k //
        group_size``; ``bias``: ``[out_features]`` in the model dtype or None. Returns ``[num_tokens,
        out_features]`` in ``x.dtype``. Default: the float32 PyTorch reference (``reference_linear_w4a16``),
        which the conformance kit compares every backend with. Added in 1.14.
        """
        from pagedllm.backends.w4a16_linear import reference_linear_w4a16

        return reference_linear_w4a16(x, weight, scales, zeros, group_size, g_idx, bias)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """Gated MLP activation ``silu(x[:, :d]) * x[:, d:]``; called by every MLP of the model, per step.

        ``x``: ``[num_tokens, 2 * d]`` (gate then up). Returns ``[num_tokens, d]`` in ``x``'s dtype.
        """
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def gelu_and_mul(self, x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
        """GeGLU activation ``gelu(x[:, :d]) * x[:, d:]`` (``approximate``: ``"tanh"`` or ``"none"``, as
        ``torch.nn.functional.gelu`` takes it); called by every MLP of a Gemma model, per step.

        ``x``: ``[num_tokens, 2 * d]`` (gate then up). Returns ``[num_tokens, d]`` in ``x``'s dtype. Added in
        1.12.
        """
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.gelu(gate, approximate=approximate) * up

    def topk_softmax(self, router_logits: torch.Tensor, top_k: int, renormalize: bool,
                     round_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The router of a mixture-of-experts layer: each token's ``top_k`` experts by softmax probability;
        called by every sparse layer, per step, before :meth:`fused_moe`.

        ``router_logits``: ``[num_tokens, num_experts]`` in the model dtype. The probabilities are computed in
        float32; with ``renormalize`` the ``top_k`` weights are divided by their sum; with ``round_to`` they are
        rounded through that dtype last. Returns ``(topk_weights [num_tokens, top_k] float32, topk_ids
        [num_tokens, top_k] int32)``, each row by falling probability. Default: torch's softmax and top-k
        (``pagedllm.backends.moe.route_tokens``). Added in 1.13.
        """
        return route_tokens(router_logits, top_k, renormalize, round_to)

    def fused_moe(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
        """The experts of a mixture-of-experts layer (Mixtral, Qwen3-MoE); called by every sparse layer, per step,
        after the model's router picked each token's experts.

        ``x``: ``[num_tokens, hidden]``; ``w13``: ``[num_experts, 2 * inter, hidden]`` (each expert's gate rows,
        then its up rows); ``w2``: ``[num_experts, hidden, inter]``; ``topk_weights``: ``[num_tokens, top_k]``
        float32; ``topk_ids``: ``[num_tokens, top_k]`` int32, distinct experts per token (:meth:`topk_softmax`).
        Returns ``[num_tokens, hidden]`` in ``x``'s dtype: ``sum_j topk_weights[t, j] * w2[e] @
        silu_and_mul(w13[e] @ x[t])`` with ``e = topk_ids[t, j]`` (this rank's partial sum when ``inter`` is
        sharded). Default: expert by expert through :meth:`linear` and :meth:`silu_and_mul`
        (``pagedllm.backends.moe.moe_reference``), which reads the routing back to the host, so a backend that
        captures decode graphs must override it. Added in 1.11.
        """
        return moe_reference(x, w13, w2, topk_weights, topk_ids, self.linear, self.silu_and_mul)

    # ------------------------------------------------------------------ optional fp8 input ops (1.6)
    # With fp8 linear layers the op before a projection may hand it its input already quantized per token
    # (``pagedllm.backends.fp8_linear.quantize_rows`` of what the op would return), so a backend can fuse the
    # quantization into the norm or activation kernel. Each default composes the ops above with the reference
    # quantization; an override must give what that composition gives up to the summation order the plain
    # op may choose (a norm's sum of squares), within one e4m3 step. Called only for models loaded with
    # ``quantization="fp8"`` on a backend that claims it, without tensor parallelism across the norm.
    def rms_norm_fp8(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`rms_norm` quantized per token: ``x``: ``[num_tokens, hidden]``; returns ``(q [num_tokens,
        hidden] float8_e4m3fn, scale [num_tokens] float32)`` of ``quantize_rows(rms_norm(x, weight, eps))``.
        Called by the first norm of a model whose next projection is fp8. Added in 1.6."""
        from pagedllm.backends.fp8_linear import quantize_rows

        return quantize_rows(self.rms_norm(x, weight, eps))

    def add_rms_norm_fp8(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`add_rms_norm` with its normed output quantized per token: returns ``(q [num_tokens, hidden]
        float8_e4m3fn, scale [num_tokens] float32, x + residual)``; may write into ``residual`` in place, as
        :meth:`add_rms_norm` may. Called by the norms before fp8 projections. Added in 1.6."""
        from pagedllm.backends.fp8_linear import quantize_rows

        normed, residual = self.add_rms_norm(x, residual, weight, eps)
        return (*quantize_rows(normed), residual)

    def silu_and_mul_fp8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`silu_and_mul` quantized per token: ``x``: ``[num_tokens, 2 * d]``; returns ``(q [num_tokens,
        d] float8_e4m3fn, scale [num_tokens] float32)``. Called by MLPs whose down projection is fp8. Added in
        1.6."""
        from pagedllm.backends.fp8_linear import quantize_rows

        return quantize_rows(self.silu_and_mul(x))

    def linear_fp8_quantized(
        self, x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
        bias: torch.Tensor | None, out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """:meth:`linear_fp8` of an input quantized by one of the ops above: ``x_q: [num_tokens, in_features]``
        float8_e4m3fn, ``x_scale: [num_tokens]`` float32; ``weight``, ``weight_scale``, ``bias`` as in
        :meth:`linear_fp8`. Returns ``[num_tokens, out_features]`` in ``out_dtype`` (the model dtype). Default:
        the float32 reference (``reference_linear_fp8_quantized``). Added in 1.6."""
        from pagedllm.backends.fp8_linear import reference_linear_fp8_quantized

        return reference_linear_fp8_quantized(x_q, x_scale, weight, weight_scale, bias, out_dtype)

    def linear_fp8_static(
        self, x: torch.Tensor, input_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`linear_fp8` with a static input scale: ``x`` quantized with ``input_scale`` (``[1]`` float32,
        a checkpoint's calibrated scale; ``pagedllm.backends.fp8_linear.quantize_with_scale``: values beyond
        the scale's range saturate), the rest as :meth:`linear_fp8`. Called by every projection of a
        checkpoint stored in fp8 with static input scales, per step. Returns ``[num_tokens, out_features]`` in
        ``x.dtype``. Default: that quantization in PyTorch, then :meth:`linear_fp8_quantized`. Added in 1.8."""
        from pagedllm.backends.fp8_linear import quantize_with_scale

        return self.linear_fp8_quantized(*quantize_with_scale(x, input_scale), weight, weight_scale, bias, x.dtype)

    # ------------------------------------------------------------------ optional fp8 group input ops (1.8)
    # The same for ``"fp8_block"`` projections, whose inputs are quantized per token and group of 128
    # features (``pagedllm.backends.fp8_linear.quantize_groups``): the scales are ``[num_tokens, ceil(features
    # / 128)]`` float32 (any strides). The same rule for overrides as above. Called only for models loaded with
    # ``quantization="fp8_block"`` on a backend that claims it, without tensor parallelism across the norm.
    def rms_norm_fp8_groups(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`rms_norm` quantized per token and group of 128: ``x``: ``[num_tokens, hidden]``; returns ``(q
        [num_tokens, hidden] float8_e4m3fn, scale [num_tokens, ceil(hidden / 128)] float32)`` of
        ``quantize_groups(rms_norm(x, weight, eps))``. Called by the first norm of a model whose next
        projection is ``"fp8_block"``. Added in 1.8."""
        from pagedllm.backends.fp8_linear import quantize_groups

        return quantize_groups(self.rms_norm(x, weight, eps))

    def add_rms_norm_fp8_groups(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`add_rms_norm` with its normed output quantized per token and group of 128: returns ``(q,
        scale [num_tokens, ceil(hidden / 128)], x + residual)``; may write into ``residual`` in place. Called by
        the norms before ``"fp8_block"`` projections. Added in 1.8."""
        from pagedllm.backends.fp8_linear import quantize_groups

        normed, residual = self.add_rms_norm(x, residual, weight, eps)
        return (*quantize_groups(normed), residual)

    def silu_and_mul_fp8_groups(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`silu_and_mul` quantized per token and group of 128: ``x``: ``[num_tokens, 2 * d]``; returns
        ``(q [num_tokens, d] float8_e4m3fn, scale [num_tokens, ceil(d / 128)] float32)``. Called by MLPs whose
        down projection is ``"fp8_block"``. Added in 1.8."""
        from pagedllm.backends.fp8_linear import quantize_groups

        return quantize_groups(self.silu_and_mul(x))

    def linear_fp8_block_quantized(
        self, x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
        bias: torch.Tensor | None, out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """:meth:`linear_fp8_block` of an input quantized by one of the three ops above: ``x_q: [num_tokens,
        in_features]`` float8_e4m3fn, ``x_scale: [num_tokens, ceil(in_features / 128)]`` float32; ``weight``,
        ``weight_scale``, ``bias`` as in :meth:`linear_fp8_block`. Returns ``[num_tokens, out_features]`` in
        ``out_dtype``. Default: the float32 reference (``reference_linear_fp8_block_quantized``). Added in 1.8."""
        from pagedllm.backends.fp8_linear import reference_linear_fp8_block_quantized

        return reference_linear_fp8_block_quantized(x_q, x_scale, weight, weight_scale, bias, out_dtype)

    # ------------------------------------------------------------------ optional step capture
    def capture_graph(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record ``fn`` (a decode step over static buffers) once and return a replay callable.

        Called by the model runner at start-up only when ``capabilities().can_capture_graphs``; replay
        re-runs the recorded device work on whatever the static buffers hold. Default: not supported.
        """
        raise NotImplementedError(f"backend {self.name!r} cannot capture graphs")

    def create_communicator(
        self, process_group: object, device: torch.device, dtype: torch.dtype, max_bytes: int,
        max_gather_bytes: int = 0,
    ) -> DeviceCommunicator | None:
        """Return a :class:`DeviceCommunicator` for ``process_group`` (a ``torch.distributed`` group), or None.

        Called once per rank of a tensor-parallel group, on every rank at the same time (it may be a
        collective), after the KV pool is allocated and before decode graphs are captured; only when
        ``capabilities().can_capture_graphs``. ``dtype``: the model's; ``max_bytes``: the largest decode
        all-reduce (largest graph batch x hidden size x element size); ``max_gather_bytes``: the LM head's
        largest per-rank output (largest graph batch x vocabulary slice x element size), which the
        communicator may offer to all-gather. Default: None — collectives then go through
        ``torch.distributed`` only and tensor-parallel decode runs without graphs. Added in 1.2.
        """
        return None
