"""The store cast of KV caches: 8-bit floats saturate whatever torch's own cast does past the largest value."""

from __future__ import annotations

import torch

from pagedllm.backends.kv_storage import byte_view, copy_blocks, is_fp8, read_slots, to_cache_dtype


def test_fp8_store_rounds_to_nearest_and_saturates() -> None:
    values = torch.tensor([500.0, -1e4, float("nan"), 1.0, 0.3, 17.0, 100000.0], dtype=torch.bfloat16)
    e4m3 = to_cache_dtype(values, torch.float8_e4m3fn).float()
    assert e4m3[[0, 1, 3]].tolist() == [448.0, -448.0, 1.0]
    assert bool(e4m3[2].isnan())
    assert e4m3[4].item() == 0.3125 and e4m3[5].item() == 16.0  # nearest; the tie 17 goes to even 16
    assert to_cache_dtype(values, torch.float8_e5m2).float()[6].item() == 57344.0  # e5m2's largest, not inf


def test_model_dtypes_are_a_plain_cast_and_bytes_move_exactly() -> None:
    assert is_fp8(torch.float8_e4m3fn) and is_fp8(torch.float8_e5m2)
    assert not any(is_fp8(d) for d in (torch.bfloat16, torch.float32, torch.uint8, torch.int8))
    values = torch.randn(4, 3)
    assert torch.equal(to_cache_dtype(values, torch.bfloat16), values.to(torch.bfloat16))
    fp8 = to_cache_dtype(values, torch.float8_e4m3fn)
    assert byte_view(fp8).dtype == torch.uint8 and byte_view(fp8).shape == fp8.shape
    assert byte_view(values) is values
    copy = torch.zeros_like(fp8)
    byte_view(copy)[[2, 0]] = byte_view(fp8)[[2, 0]]
    assert torch.equal(copy[[0, 2]].float(), fp8[[0, 2]].float()) and not copy[1].float().any()


def test_copy_blocks_moves_whole_blocks_in_every_layer() -> None:
    """Each destination block of each layer (keys and values) becomes its source; nothing else changes."""
    for dtype in (torch.float8_e4m3fn, torch.bfloat16):
        layers = [to_cache_dtype(torch.randn(2, 5, 4, 2, 3) * 100, dtype) for _ in range(2)]
        before = [layer.float().clone() for layer in layers]
        copy_blocks(layers, torch.tensor([[1, 3], [4, 0]]))
        for layer, old in zip(layers, before, strict=True):
            expected = old.clone()
            expected[:, 3], expected[:, 0] = old[:, 1], old[:, 4]
            assert torch.equal(layer.float(), expected)
        copy_blocks(layers, torch.zeros(0, 2, dtype=torch.int64))  # no pairs: nothing to do
        copy_blocks([], torch.tensor([[1, 3]]))
        assert torch.equal(layers[0].float()[:, 3], before[0][:, 1])


def test_read_slots_gathers_keys_and_values_in_the_cache_dtype() -> None:
    """Slot ``s`` is token ``s % block_size`` of block ``s // block_size``; both halves, in slot order."""
    for dtype in (torch.float8_e4m3fn, torch.bfloat16):
        cache = to_cache_dtype(torch.randn(2, 3, 4, 2, 5) * 10, dtype)
        keys, values = read_slots(cache, torch.tensor([9, 0, 4]))
        assert keys.dtype == values.dtype == dtype and keys.shape == (3, 2, 5)
        for i, (block, token) in enumerate(((2, 1), (0, 0), (1, 0))):
            assert torch.equal(keys[i].float(), cache[0, block, token].float())
            assert torch.equal(values[i].float(), cache[1, block, token].float())
