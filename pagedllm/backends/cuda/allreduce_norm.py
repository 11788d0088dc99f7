"""One Triton kernel for the end of a row-parallel layer: all-reduce, residual add and RMSNorm.

Tensor-parallel decode ends every attention and MLP block with an all-reduce of a few KB followed by the
next norm's residual add; as two kernels that is two launches and a round trip through memory per block,
64 times per step of a 32-layer model. This kernel does all three, across the ranks of one host, through
symmetric memory (every rank maps every other rank's buffers):

1. *push*: program ``i`` writes its rows of this rank's partial sum into every peer's receive buffer;
2. *receive*: it reads the peers' rows from its own receive buffer, again and again until none of them holds
   the "not written" marker (negative zero, which senders never send: they turn it into positive zero), and
   puts the marker back for a later call — no flags, no fences, no barrier: the data is its own signal
   (the "Lamport" scheme of TensorRT-LLM's one-shot all-reduce);
3. *reduce*: it sums the ranks' rows in rank order in float32 (so every rank computes bit-identical
   results), rounds to the model dtype, adds the residual as Hugging Face does (in the model dtype), writes
   the new residual, and writes the RMSNorm of it.

Receive buffers rotate over three slots by a per-program epoch (int32 in device memory, advanced by the
kernel itself, so a CUDA graph can record and replay it). A rank can run at most one call ahead of its
peers (the next call waits for their data), so it never writes into a slot a peer is still reading or has
not cleared yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PROGRAMS = 32
"""Programs per call; rows beyond are looped over. At most the SM count, so every program of the grid is
resident at once on both GPUs and none waits for a peer program that cannot be scheduled."""
SLOTS = 3
"""Receive slots per rank, used in turn."""


@triton.jit
def _bits(x, BITS: tl.constexpr):
    """``x`` reinterpreted as integers of its width (``BITS``: 16 or 32)."""
    if BITS == 16:
        out = x.to(tl.int16, bitcast=True)
    else:
        out = x.to(tl.int32, bitcast=True)
    return out


@triton.jit
def _all_reduce_add_rms_norm_kernel(
    out_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    buffer_ptrs,
    epoch_ptr,
    num_rows,
    hidden,
    slot_elems,
    eps,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    BITS: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    dtype = x_ptr.dtype.element_ty
    marker = -(1 << (BITS - 1))  # the bits of -0.0
    unwritten = tl.full([BLOCK], marker, tl.int16 if BITS == 16 else tl.int32).to(dtype, bitcast=True)
    epoch = tl.load(epoch_ptr + pid) + 1
    region = (epoch % NUM_SLOTS) * WORLD * slot_elems

    # 1. push this rank's rows (never -0.0) into part RANK of the slot in every peer's receive buffer
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            dst = tl.load(buffer_ptrs + peer).to(tl.pointer_type(dtype)) + region + RANK * slot_elems
            for row in range(pid, num_rows, num_programs):
                x = tl.load(x_ptr + row * hidden + offs, mask=mask)
                x = tl.where(_bits(x, BITS) == marker, 0.0, x).to(dtype)
                tl.store(dst + row * hidden + offs, x, mask=mask)

    # 2-3. receive, sum in rank order, add the residual, normalize
    received = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(dtype)) + region
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for row in range(pid, num_rows, num_programs):
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            if peer == RANK:
                part = tl.load(x_ptr + row * hidden + offs, mask=mask, other=0.0)
                part = tl.where(_bits(part, BITS) == marker, 0.0, part).to(dtype)  # as the peers received it
            else:
                src = received + peer * slot_elems + row * hidden + offs
                part = tl.load(src, mask=mask, other=0.0, volatile=True)
                while tl.max((mask & (_bits(part, BITS) == marker)).to(tl.int32), 0) > 0:
                    part = tl.load(src, mask=mask, other=0.0, volatile=True)
                tl.store(src, unwritten, mask=mask)  # ready for the call that uses this slot next
            total += part.to(tl.float32)
        residual = tl.load(residual_ptr + row * hidden + offs, mask=mask, other=0.0)
        h = (total.to(dtype).to(tl.float32) + residual.to(tl.float32)).to(dtype)  # HF adds in the model dtype
        tl.store(residual_ptr + row * hidden + offs, h, mask=mask)
        h32 = h.to(tl.float32)
        variance = tl.sum(h32 * h32, 0) / hidden
        normed = (h32 * tl.rsqrt(variance + eps)).to(dtype)
        tl.store(out_ptr + row * hidden + offs, (w * normed.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(epoch_ptr + pid, epoch)


class AllReduceAddRMSNorm:
    """The buffers of :func:`_all_reduce_add_rms_norm_kernel` for one group, set up collectively.

    ``symm_mem``: ``torch.distributed._symmetric_memory``; ``max_bytes``: the largest partial sum (per rank)
    a call takes; ``dtype``: 16- or 32-bit floating. Holds per rank a symmetric receive buffer of ``SLOTS x
    world_size x max_bytes`` filled with the "not written" marker, and ``MAX_PROGRAMS`` local epochs at zero;
    the constructor ends with a ``torch.distributed`` barrier so no peer writes into a buffer not yet filled.
    """

    def __init__(self, symm_mem: object, process_group: object, device: torch.device, dtype: torch.dtype,
                 max_bytes: int) -> None:
        import torch.distributed as dist

        if dtype.itemsize not in (2, 4) or not dtype.is_floating_point:
            raise ValueError(f"the fused all-reduce + RMSNorm takes 16- or 32-bit floats, not {dtype}")
        self.slot_elems = max(1, max_bytes // dtype.itemsize)
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self._bits = 8 * dtype.itemsize
        self._buffer = symm_mem.empty(SLOTS * self.world_size * self.slot_elems, dtype=dtype, device=device)
        int_type = torch.int16 if self._bits == 16 else torch.int32
        self._buffer.view(int_type).fill_(-(1 << (self._bits - 1)))  # -0.0 everywhere: nothing written yet
        self._epochs = torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=device)
        handle = symm_mem.rendezvous(self._buffer, process_group)
        # every rank's address of its receive buffer, as an int64 device array the kernel indexes by rank
        self._buffer_ptrs = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group=process_group, device_ids=[device.index])

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(rms_norm(sum_over_ranks(x) + residual) * weight, sum_over_ranks(x) + residual)``.

        ``x``: this rank's partial sum ``[num_tokens, hidden]``, contiguous, at most ``max_bytes``;
        ``residual``: same shape and dtype, contiguous, updated in place and returned; ``weight``:
        ``[hidden]``. Every rank calls it with the same shape, in the same order. A negative zero in ``x``
        counts as a positive zero (the sum is the same unless every rank's value is -0.0).
        """
        num_rows, hidden = x.shape
        out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
        if num_rows == 0:
            return out, residual
        block = triton.next_power_of_2(hidden)
        _all_reduce_add_rms_norm_kernel[(min(num_rows, MAX_PROGRAMS),)](
            out, x, residual, weight, self._buffer_ptrs, self._epochs, num_rows, hidden, self.slot_elems, eps,
            RANK=self.rank, WORLD=self.world_size, BITS=self._bits, NUM_SLOTS=SLOTS, BLOCK=block,
            num_warps=8 if block <= 4096 else 16, enable_fp_fusion=False,
        )  # fmt: skip
        return out, residual
