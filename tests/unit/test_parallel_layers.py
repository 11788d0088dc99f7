"""Tensor-parallel layers without processes: exact at world size 1, and correct shards at world size 2.

Ranks of a 2-way group are simulated in one process by :class:`LocalGroup`, whose collectives return this
rank's partial result; the test then sums (all-reduce) or concatenates (all-gather) the ranks' parts itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.core.config import EngineConfig, load_model_config
from pagedllm.core.distributed import check_tensor_parallel_config
from pagedllm.core.distributed.parallel_layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pagedllm.core.distributed.parallel_state import TensorParallelGroup, kv_heads_per_rank, use_tp_group
from pagedllm.core.loader import fill_dummy_weights, iterate_weights, load_model, model_class_for
from pagedllm.core.models.layers import MergedLinear

torch.manual_seed(0)


@dataclass(slots=True)
class LocalGroup(TensorParallelGroup):
    """One simulated rank: collectives return the local part for the test to combine."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x


def ranks(world_size: int = 2) -> list[LocalGroup]:
    return [LocalGroup(rank, world_size) for rank in range(world_size)]


def lazy(tmp_path: Path, tensors: dict[str, torch.Tensor]):
    """Save ``tensors`` and return an opener yielding safetensors slices (what the loader passes)."""
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return safe_open(str(path), framework="pt", device="cpu")


# ---------------------------------------------------------------------- world size 1: exactly the plain layers
def test_world_size_one_is_exactly_the_plain_layers() -> None:
    x = torch.randn(5, 16)
    weight, bias = torch.randn(24, 16), torch.randn(24)

    merged = MergedLinear(16, [8, 8, 8], bias=True)
    column = MergedColumnParallelLinear(16, [8, 8, 8], bias=True)
    for layer in (merged, column):
        for i in range(3):
            layer.load_shard("weight", i, weight[8 * i : 8 * (i + 1)])
            layer.load_shard("bias", i, bias[8 * i : 8 * (i + 1)])
    assert torch.equal(column(x), merged(x))

    row = RowParallelLinear(16, 24, bias=True)
    row.weight.weight_loader(row.weight, weight)
    row.bias.data.copy_(bias)
    assert torch.equal(row(x), nn.functional.linear(x, weight, bias))

    table = torch.randn(50, 16)
    embedding = VocabParallelEmbedding(50, 16)
    embedding.weight.weight_loader(embedding.weight, table)
    ids = torch.tensor([0, 7, 49, 3])
    assert torch.equal(embedding(ids), nn.functional.embedding(ids, table))
    head = ParallelLMHead(50, 16)
    head.weight = embedding.weight  # tied
    assert torch.equal(head(x), x @ table.T)


# ---------------------------------------------------------------------- world size 2: shards and their sums
def test_merged_column_parallel_shards_each_part(tmp_path: Path) -> None:
    gate, up = torch.randn(8, 6), torch.randn(8, 6)
    x = torch.randn(3, 6)
    outs = []
    with lazy(tmp_path, {"gate": gate, "up": up}) as f:
        for tp in ranks():
            layer = MergedColumnParallelLinear(6, [8, 8], bias=False, tp=tp)
            layer.load_shard("weight", 0, f.get_slice("gate"))
            layer.load_shard("weight", 1, f.get_slice("up"))
            rows = slice(4 * tp.rank, 4 * tp.rank + 4)
            assert torch.equal(layer.weight, torch.cat([gate[rows], up[rows]]))
            outs.append(layer(x))
    # gate columns of both ranks then up columns of both ranks give the unsharded output
    full = x @ torch.cat([gate, up]).T
    assert torch.allclose(torch.cat([outs[0][:, :4], outs[1][:, :4], outs[0][:, 4:], outs[1][:, 4:]], -1), full)


@pytest.mark.parametrize(
    ("num_kv_heads", "expected_kv_heads"), [(4, [[0, 1], [2, 3]]), (2, [[0], [1]]), (1, [[0], [0]])]
)
def test_qkv_parallel_splits_or_replicates_kv_heads(
    tmp_path: Path, num_kv_heads: int, expected_kv_heads: list[list[int]]
) -> None:
    head_dim, num_heads, hidden = 2, 4, 8
    q = torch.randn(num_heads * head_dim, hidden)
    k = torch.randn(num_kv_heads * head_dim, hidden)
    v = torch.randn(num_kv_heads * head_dim, hidden)
    with lazy(tmp_path, {"q": q, "k": k, "v": v}) as f:
        for tp, kv_heads in zip(ranks(), expected_kv_heads, strict=True):
            layer = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias=False, tp=tp)
            assert (layer.num_heads, layer.num_kv_heads) == (2, len(kv_heads))
            for index, name in enumerate("qkv"):
                layer.load_shard("weight", index, f.get_slice(name))
            q_part, k_part, v_part = layer.weight.split(layer.shard_sizes)
            assert torch.equal(q_part, q.view(num_heads, head_dim, hidden)[2 * tp.rank : 2 * tp.rank + 2].flatten(0, 1))
            assert torch.equal(k_part, k.view(num_kv_heads, head_dim, hidden)[kv_heads].flatten(0, 1))
            assert torch.equal(v_part, v.view(num_kv_heads, head_dim, hidden)[kv_heads].flatten(0, 1))


def test_row_parallel_partial_sums_add_up(tmp_path: Path) -> None:
    weight, bias, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    total = torch.zeros(3, 5)
    with lazy(tmp_path, {"w": weight}) as f:
        for tp in ranks():
            layer = RowParallelLinear(8, 5, bias=True, tp=tp)
            layer.weight.weight_loader(layer.weight, f.get_slice("w"))
            layer.bias.data.copy_(bias)
            assert torch.equal(layer.weight, weight[:, 4 * tp.rank : 4 * tp.rank + 4])
            total += layer(x[:, 4 * tp.rank : 4 * tp.rank + 4]) - bias  # each simulated rank adds the bias once
    assert torch.allclose(total + bias, x @ weight.T + bias, atol=1e-6)


def test_row_parallel_without_reduction_leaves_partial_sums_with_the_bias_on_rank_zero() -> None:
    """``reduce_results=False``: each rank returns its partial product, rank 0's holding the bias once, so
    summing the ranks' outputs (what the next norm does) gives the full layer."""
    weight, bias, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    parts = []
    for tp in ranks():
        layer = RowParallelLinear(8, 5, bias=True, tp=tp, reduce_results=False)
        layer.weight.data.copy_(weight[:, 4 * tp.rank : 4 * tp.rank + 4])
        layer.bias.data.copy_(bias)
        parts.append(layer(x[:, 4 * tp.rank : 4 * tp.rank + 4]))
    assert torch.allclose(parts[0] - bias, x[:, :4] @ weight[:, :4].T, atol=1e-6)  # the bias on rank 0 only
    assert torch.allclose(parts[1], x[:, 4:] @ weight[:, 4:].T, atol=1e-6)
    assert torch.allclose(parts[0] + parts[1], x @ weight.T + bias, atol=1e-6)


@dataclass(slots=True)
class SummingGroup(TensorParallelGroup):
    """Two simulated ranks whose all-reduce adds a fixed peer part (the fused path falls back to it)."""

    peer_part: torch.Tensor | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.peer_part


def test_norm_with_partial_input_sums_over_the_ranks_before_its_residual_add() -> None:
    from pagedllm.core.models.layers import RMSNorm

    backend = CpuBackend()
    mine, peer, residual = torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 16)
    with use_tp_group(SummingGroup(0, 2, peer_part=peer)):
        norm = RMSNorm(16, 1e-6, backend, reduce_partial_input=True)
    plain = RMSNorm(16, 1e-6, backend)
    normed, new_residual = norm(mine, residual.clone())
    expected_normed, expected_residual = plain(mine + peer, residual.clone())
    assert torch.equal(new_residual, expected_residual) and torch.equal(normed, expected_normed)
    assert torch.equal(norm(mine), plain(mine))  # no residual: the input is already whole (the embedding's)


def test_loaded_models_compute_their_linear_layers_through_the_backend(llama_dir: Path) -> None:
    """Every projection and the LM head call ``Backend.linear`` (a backend picks its kernel by shape)."""

    class CountingBackend(CpuBackend):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[int, int]] = []

        def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            self.calls.append((x.shape[0], weight.shape[0]))
            return super().linear(x, weight, bias)

    config = load_model_config(str(llama_dir), "float32", None)
    backend = CountingBackend()
    model = load_model(config, backend, torch.device("cpu"), "auto")
    hidden = torch.randn(2, config.hf_config.hidden_size)
    model.compute_logits(hidden)
    assert backend.calls == [(2, config.hf_config.vocab_size)]
    linear_layers = [m for m in model.modules() if hasattr(m, "linear_op")]
    assert len(linear_layers) == 4 * config.hf_config.num_hidden_layers + 1  # qkv, o, gate_up, down; LM head
    assert all(m.linear_op == backend.linear for m in linear_layers)


def test_vocab_parallel_embedding_and_head_pad_an_odd_vocabulary(tmp_path: Path) -> None:
    vocab, dim = 7, 4  # 4 rows per rank; rank 1 holds 3 real rows and one zero padding row
    table = torch.randn(vocab, dim)
    ids = torch.tensor([0, 3, 4, 6, 2])
    hidden = torch.randn(2, dim)
    embedded, logits = torch.zeros(len(ids), dim), []
    with lazy(tmp_path, {"e": table}) as f:
        for tp in ranks():
            embedding = VocabParallelEmbedding(vocab, dim, tp=tp)
            embedding.weight.weight_loader(embedding.weight, f.get_slice("e"))
            assert embedding.weight.shape == (4, dim)
            embedded += embedding(ids)
            head = ParallelLMHead(vocab, dim, tp=tp)
            head.weight = embedding.weight
            logits.append(head(hidden))
    assert torch.equal(embedded, table[ids])
    assert torch.allclose(torch.cat(logits, -1)[:, :vocab], hidden @ table.T)
    assert torch.equal(torch.cat(logits, -1)[:, vocab:], torch.zeros(2, 1))


def test_layers_refuse_sizes_that_do_not_divide() -> None:
    tp = LocalGroup(0, 3)
    with pytest.raises(ValueError, match="not divisible by tensor_parallel_size 3"):
        RowParallelLinear(8, 4, bias=False, tp=tp)
    with pytest.raises(ValueError, match="number of attention heads"):
        QKVParallelLinear(8, 2, 4, 4, bias=False, tp=tp)
    with pytest.raises(ValueError, match="KV heads cannot be split"):
        kv_heads_per_rank(4, 3)
    with pytest.raises(ValueError, match="replicated"):
        kv_heads_per_rank(2, 3)


# ---------------------------------------------------------------------- whole model: loading and dummy weights
def test_lazy_loading_equals_eager_loading_at_world_size_one(llama_dir: Path) -> None:
    config = load_model_config(str(llama_dir), "float32", None)
    model = load_model(config, CpuBackend(), torch.device("cpu"), "auto")
    _, first = next(iter(iterate_weights(llama_dir, lazy=True)))
    assert not isinstance(first, torch.Tensor)  # a slice: only the parts a rank needs are read
    eager = dict(iterate_weights(llama_dir))
    assert torch.equal(model.model.embed_tokens.weight, eager["model.embed_tokens.weight"])
    qkv = torch.cat([eager[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, qkv)


def test_dummy_weights_are_the_same_model_at_any_world_size(llama_dir: Path) -> None:
    config = load_model_config(str(llama_dir), "float32", None)
    cls = model_class_for(config.architecture)
    full = cls(config.hf_config, CpuBackend())
    fill_dummy_weights(full, torch.device("cpu"), 3)
    for tp in ranks():
        with use_tp_group(tp):
            shard = cls(config.hf_config, CpuBackend())
        fill_dummy_weights(shard, torch.device("cpu"), 3)
        attn, full_attn = shard.model.layers[1].self_attn, full.model.layers[1].self_attn
        half = full_attn.o_proj.weight.shape[1] // 2
        assert torch.equal(attn.o_proj.weight, full_attn.o_proj.weight[:, tp.rank * half : (tp.rank + 1) * half])
        q_rows = attn.q_size
        expected_q = full_attn.qkv_proj.weight[tp.rank * q_rows : (tp.rank + 1) * q_rows]
        assert torch.equal(attn.qkv_proj.weight[:q_rows], expected_q)
        rows = shard.model.embed_tokens.num_local
        start = shard.model.embed_tokens.vocab_start
        assert torch.equal(shard.model.embed_tokens.weight[:rows], full.model.embed_tokens.weight[start : start + rows])
        assert torch.equal(shard.model.norm.weight, full.model.norm.weight)


# ---------------------------------------------------------------------- refused up front
class NoDistributedBackend(CpuBackend):
    """A cpu backend that says it cannot run distributed."""

    def capabilities(self):
        from dataclasses import replace

        return replace(super().capabilities(), supports_distributed=False)


class OneDeviceBackend(CpuBackend):
    """A backend with a single device."""

    def device_count(self) -> int | None:
        return 1


@pytest.mark.parametrize(
    ("backend_cls", "overrides", "message"),
    [
        (NoDistributedBackend, {}, "supports_distributed=False"),
        (OneDeviceBackend, {}, "needs 2 devices but backend 'cpu' sees 1"),
        (CpuBackend, {"tensor_parallel_size": 3}, "4 attention heads are not divisible by tensor_parallel_size=3"),
        (CpuBackend, {"distributed_executor_backend": "mpi"}, "must be one of mp, ray"),
    ],
)
def test_misconfiguration_is_refused_up_front(llama_dir: Path, backend_cls, overrides, message) -> None:
    config = EngineConfig(model=str(llama_dir), device="cpu", **{"tensor_parallel_size": 2, **overrides})
    model_config = load_model_config(str(llama_dir), "float32", None)
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel_config(config, model_config, backend_cls)


def test_one_device_backend_may_still_span_machines_with_ray(llama_dir: Path) -> None:
    config = EngineConfig(model=str(llama_dir), device="cpu", tensor_parallel_size=2,
                          distributed_executor_backend="ray")
    check_tensor_parallel_config(config, load_model_config(str(llama_dir), "float32", None), OneDeviceBackend)


# ---------------------------------------------------------------------- the backend's device communicator
class _Recorder:
    max_bytes = 64

    def __init__(self) -> None:
        self.seen: list[torch.Size] = []

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape)
        return x * 2


def test_small_all_reduces_go_through_the_communicator(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    recorder = _Recorder()
    group = TensorParallelGroup(0, 2, None, recorder)
    through_dist: list[torch.Size] = []
    monkeypatch.setattr(dist, "all_reduce", lambda x, group=None: through_dist.append(x.shape))
    small = torch.ones(4, 4)  # 64 bytes: the communicator's
    assert torch.equal(group.all_reduce(small), torch.full((4, 4), 2.0))
    large = torch.ones(4, 5)  # 80 bytes: torch.distributed, in place
    assert group.all_reduce(large) is large
    assert recorder.seen == [torch.Size([4, 4])] and through_dist == [torch.Size([4, 5])]


def test_default_backend_has_no_communicator_and_one_rank_agrees_with_itself() -> None:
    assert CpuBackend().create_communicator(None, torch.device("cpu"), torch.float32, 1 << 20) is None
    assert TensorParallelGroup().all_agree(True, torch.device("cpu"))
    assert not TensorParallelGroup().all_agree(False, torch.device("cpu"))
