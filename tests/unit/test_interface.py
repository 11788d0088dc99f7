"""The backend interface: version rule, capabilities dataclass, documented public surface, neutral defaults."""

from __future__ import annotations

import inspect

import pytest
import torch

from pagedllm.backends import interface
from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.interface import (
    INTERFACE_VERSION,
    AttentionMetadata,
    Backend,
    BackendCapabilities,
    InterfaceVersionError,
    check_interface_version,
    format_version,
    is_compatible_version,
)
from pagedllm.core.config import EngineConfig, resolve_scheduler_limits

MAJOR, MINOR = INTERFACE_VERSION


def caps(**overrides: object) -> BackendCapabilities:
    """Tiny valid capabilities with ``overrides``."""
    values: dict[str, object] = dict(dtypes=(torch.float32,), kv_cache_dtypes=(torch.float32,), block_sizes=(16,),
                                     head_sizes=(64,))
    values.update(overrides)
    return BackendCapabilities(**values)  # type: ignore[arg-type]


def test_version_is_two_ints_and_formats() -> None:
    assert isinstance(MAJOR, int) and isinstance(MINOR, int)
    assert format_version((1, 0)) == "1.0"


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ((MAJOR, MINOR), True),
        ((MAJOR, 0), True),
        ((MAJOR, MINOR + 1), False),  # uses something we do not have
        ((MAJOR + 1, 0), False),
        ((MAJOR - 1, 99), False),
        ((1,), False),
        ("1.0", False),
        ((1.0, 0), False),
        ((True, 0), False),
    ],
)
def test_is_compatible_version(version: object, ok: bool) -> None:
    assert is_compatible_version(version) is ok  # type: ignore[arg-type]


def test_check_interface_version_names_backend_origin_and_both_versions() -> None:
    class Future(CpuBackend):
        name = "future"
        interface_version = (MAJOR + 1, 0)

    with pytest.raises(InterfaceVersionError) as excinfo:
        check_interface_version(Future, "distribution 'future-pagedllm' 3.1")
    message = str(excinfo.value)
    assert "'future'" in message and "future-pagedllm" in message
    assert f"{MAJOR + 1}.0" in message and format_version(INTERFACE_VERSION) in message
    assert "upgrade pagedllm" in message


def test_check_interface_version_refuses_malformed_and_old() -> None:
    class Malformed(CpuBackend):
        name = "malformed"
        interface_version = "1.0"  # type: ignore[assignment]

    class Old(CpuBackend):
        name = "old"
        interface_version = (MAJOR - 1, 5)

    with pytest.raises(InterfaceVersionError, match=r"must be a \(major, minor\) tuple"):
        check_interface_version(Malformed, "here")
    with pytest.raises(InterfaceVersionError, match="built for backend interface"):
        check_interface_version(Old, "here")
    check_interface_version(CpuBackend, "pagedllm")  # the built-in is current


def test_capabilities_normalize_and_validate() -> None:
    c = caps(block_sizes=[16, 32], head_sizes=[64])
    assert c.block_sizes == (16, 32) and c.head_sizes == (64,)
    with pytest.raises(ValueError, match="dtypes"):
        caps(dtypes=())
    with pytest.raises(ValueError, match="kv_cache_dtypes"):
        caps(kv_cache_dtypes=("float32",))
    with pytest.raises(ValueError, match="block_sizes"):
        caps(block_sizes=(0,))
    with pytest.raises(ValueError, match="head_sizes"):
        caps(head_sizes=())
    with pytest.raises(ValueError, match="token_buckets"):
        caps(needs_static_shapes=True)
    assert caps(needs_static_shapes=True, token_buckets=(64, 128)).token_buckets == (64, 128)
    with pytest.raises(ValueError, match="default_max_num_seqs"):
        caps(default_max_num_seqs=0)
    with pytest.raises(ValueError, match="default_max_num_batched_tokens"):
        caps(default_max_num_batched_tokens=-8)
    assert (caps().default_max_num_seqs, caps().default_max_num_batched_tokens) == (256, None)


def test_scheduler_limits_default_to_the_backends() -> None:
    """Unset ``max_num_seqs``/``max_num_batched_tokens`` come from the capabilities; explicit values win;
    a backend naming no budget gets ``max(2048, max_num_seqs)``."""
    large = caps(default_max_num_seqs=1024, default_max_num_batched_tokens=16384)
    assert resolve_scheduler_limits(EngineConfig(), large) == (1024, 16384)
    assert resolve_scheduler_limits(EngineConfig(max_num_seqs=8), large) == (8, 16384)
    assert resolve_scheduler_limits(EngineConfig(max_num_batched_tokens=512), large) == (1024, 512)
    assert resolve_scheduler_limits(EngineConfig(max_num_seqs=4096), caps()) == (4096, 4096)


def test_capabilities_summary_and_dict() -> None:
    c = caps(dtypes=(torch.bfloat16, torch.float32), kv_cache_dtypes=(torch.float8_e4m3fn,), block_sizes=(32, 16),
             head_sizes=(128, 64), supports_sliding_window=False, can_capture_graphs=True,
             needs_static_shapes=True, token_buckets=(8, 64), runs_asynchronously=True)
    assert c.summary() == ("bfloat16,float32; kv float8_e4m3fn; blocks 16,32; heads 64,128; chunked-prefill; "
                           "graphs; tp; async; static-shapes 8,64")
    d = c.as_dict()
    assert d["dtypes"] == ["bfloat16", "float32"] and d["block_sizes"] == [32, 16]
    assert d["needs_static_shapes"] is True and d["token_buckets"] == [8, 64]


def test_every_public_backend_method_is_documented() -> None:
    """Each public method and attribute of Backend has a docstring; tensor methods write out their shapes."""
    for name, member in inspect.getmembers(Backend):
        if name.startswith("_") or not callable(member):
            continue
        doc = inspect.getdoc(member) or ""
        assert len(doc) > 40, f"Backend.{name} needs a docstring (when called, arguments, returns)"
        params = inspect.signature(member).parameters
        if any(p in params for p in ("query", "key", "x", "kv_cache", "src_to_dst")):
            assert "[" in doc and "]" in doc, f"Backend.{name}'s docstring must write out tensor shapes"
    for name in ("name", "device_type", "dist_backend", "interface_version", "priority"):
        assert f"    {name}:" in inspect.getsource(Backend), name
    assert "[num_tokens, num_heads, head_dim]" in inspect.getdoc(Backend.attention)


def test_dataclasses_document_every_field() -> None:
    source = inspect.getsource(interface)
    for cls in (BackendCapabilities, AttentionMetadata, interface.AttentionSpec):
        cls_source = inspect.getsource(cls)
        for field_name in cls.__dataclass_fields__:
            after = cls_source.split(f"    {field_name}:", 1)[1].split("\n", 2)
            assert after[1].strip().startswith('"""'), f"{cls.__name__}.{field_name} needs a docstring"
    assert "slot_mapping" in source


def test_abstract_methods_are_the_contract() -> None:
    assert Backend.__abstractmethods__ == {
        "is_available", "capabilities", "memory_info", "kv_cache_shape", "write_kv_cache", "read_kv_cache",
        "copy_blocks", "attention",
    }


def test_neutral_defaults() -> None:
    backend = CpuBackend()
    assert backend.interface_version == INTERFACE_VERSION
    assert backend.device() == torch.device("cpu")
    backend.synchronize()
    backend.configure({"anything": 1})  # neutral default: options for other plugins are ignored
    backend.init_device(0, 1)
    with pytest.raises(NotImplementedError, match="cannot capture graphs"):
        backend.capture_graph(lambda: None)
    x = torch.randn(3, 8)
    gate_up = torch.randn(3, 8)
    assert torch.allclose(backend.silu_and_mul(gate_up), torch.nn.functional.silu(gate_up[:, :4]) * gate_up[:, 4:])
    normed, residual = backend.add_rms_norm(x, x, torch.ones(8), 1e-6)
    assert torch.allclose(residual, 2 * x) and torch.allclose(normed, backend.rms_norm(2 * x, torch.ones(8), 1e-6))
    budget = backend.kv_cache_budget_bytes(0.5)
    assert 0 < budget <= backend.memory_info()[0]


def test_metadata_counts() -> None:
    metadata = AttentionMetadata(
        num_tokens=4, num_decodes=2, query_start_loc=torch.tensor([0, 1, 2, 4], dtype=torch.int32),
        seq_lens=torch.tensor([3, 5, 2], dtype=torch.int32), context_lens=torch.tensor([2, 4, 0], dtype=torch.int32),
        block_tables=torch.zeros(3, 2, dtype=torch.int32), slot_mapping=torch.arange(4), max_query_len=2,
        max_seq_len=5, block_size=4,
    )
    assert metadata.num_requests == 3 and metadata.num_prefills == 1
