"""One Triton kernel for the end of a row-parallel layer: all-reduce, residual add and RMSNorm.

Tensor-parallel decode ends every attention and MLP block with an all-reduce of a few KB followed by the
next norm's residual add; as two kernels that is two launches and a round trip through memory per block,
64 times per step of a 32-layer model. This kernel does all three, across the ranks of one host, through
symmetric memory (every rank maps every other rank's buffers):

1. *push*: program ``i`` writes its rows of this rank's partial sum into every peer's receive buffer;
2. *signal*: it stores the call's epoch into the peer's flag for (program ``i``, this rank) with release
   semantics at system scope, then spins (acquire) until each peer's flag for program ``i`` reaches the
   same epoch — only the matching programs of the ranks meet, never the whole grid;
3. *reduce*: it sums the ranks' rows in rank order in float32 (so every rank computes bit-identical
   results), rounds to the model dtype, adds the residual as Hugging Face does (in the model dtype), writes
   the new residual, and writes the RMSNorm of it.

Epochs (one int32 per program, in device memory, advanced by the kernel itself) make the kernel safe to
record in a CUDA graph and replay: nothing on the host changes between calls. Receive buffers alternate
between two slots by epoch parity, so a rank that runs ahead into the next call writes the slot its peer
is not reading; it cannot run two calls ahead, because the next call waits for the peer's signal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PROGRAMS = 32
"""Programs (and flag pairs) per call; rows beyond are looped over. At most the SM count, so every program
of the grid is resident at once on both GPUs and no program waits on a peer that cannot be scheduled."""


@triton.jit
def _all_reduce_add_rms_norm_kernel(
    out_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    buffer_ptrs,
    flag_ptrs,
    epoch_ptr,
    num_rows,
    hidden,
    slot_elems,
    eps,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    dtype = x_ptr.dtype.element_ty
    epoch = tl.load(epoch_ptr + pid) + 1
    slot = epoch % 2

    # 1. push this rank's rows into region [slot][RANK] of every peer's receive buffer
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            dst = tl.load(buffer_ptrs + peer).to(tl.pointer_type(dtype)) + (slot * WORLD + RANK) * slot_elems
            for row in range(pid, num_rows, num_programs):
                x = tl.load(x_ptr + row * hidden + offs, mask=mask)
                tl.store(dst + row * hidden + offs, x, mask=mask)
    tl.debug_barrier()  # every thread's stores happen before the release below

    # 2. meet the same program of every peer
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            peer_flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(peer_flags + pid * WORLD + RANK, epoch, sem="release", scope="sys")
    own_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            while tl.atomic_add(own_flags + pid * WORLD + peer, 0, sem="acquire", scope="sys") < epoch:
                pass
    tl.debug_barrier()  # every thread reads after the acquire above

    # 3. sum in rank order, add the residual, normalize
    received = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(dtype)) + slot * WORLD * slot_elems
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for row in range(pid, num_rows, num_programs):
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            if peer == RANK:
                part = tl.load(x_ptr + row * hidden + offs, mask=mask, other=0.0)
            else:
                part = tl.load(received + peer * slot_elems + row * hidden + offs, mask=mask, other=0.0,
                               cache_modifier=".cg")  # written by the peer: not from this SM's L1
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
    a call takes. Holds per rank a receive buffer of ``2 x world_size x max_bytes``, ``MAX_PROGRAMS x
    world_size`` int32 flags (both symmetric) and ``MAX_PROGRAMS`` local epochs, all zero at the start; the
    constructor ends with a ``torch.distributed`` barrier so no peer signals into memory not yet cleared.
    """

    def __init__(self, symm_mem: object, process_group: object, device: torch.device, dtype: torch.dtype,
                 max_bytes: int) -> None:
        import torch.distributed as dist

        self.slot_elems = max(1, max_bytes // dtype.itemsize)
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self._buffer = symm_mem.empty(2 * self.world_size * self.slot_elems, dtype=dtype, device=device)
        self._flags = symm_mem.empty(MAX_PROGRAMS * self.world_size, dtype=torch.int32, device=device)
        self._flags.zero_()
        self._epochs = torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=device)
        # every rank's address of each buffer, as int64 device arrays the kernel indexes by rank
        self._buffer_ptrs = self._peer_pointers(symm_mem.rendezvous(self._buffer, process_group), device)
        self._flag_ptrs = self._peer_pointers(symm_mem.rendezvous(self._flags, process_group), device)
        torch.cuda.synchronize(device)
        dist.barrier(group=process_group, device_ids=[device.index])

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(rms_norm(sum_over_ranks(x) + residual) * weight, sum_over_ranks(x) + residual)``.

        ``x``: this rank's partial sum ``[num_tokens, hidden]``, contiguous, at most ``max_bytes``;
        ``residual``: same shape and dtype, contiguous, updated in place and returned; ``weight``:
        ``[hidden]``. Every rank calls it with the same shape, in the same order.
        """
        num_rows, hidden = x.shape
        out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
        if num_rows == 0:
            return out, residual
        block = triton.next_power_of_2(hidden)
        _all_reduce_add_rms_norm_kernel[(min(num_rows, MAX_PROGRAMS),)](
            out, x, residual, weight, self._buffer_ptrs, self._flag_ptrs,
            self._epochs, num_rows, hidden, self.slot_elems, eps,
            RANK=self.rank, WORLD=self.world_size, BLOCK=block, num_warps=8 if block <= 4096 else 16,
            enable_fp_fusion=False,
        )  # fmt: skip
        return out, residual

    @staticmethod
    def _peer_pointers(handle: object, device: torch.device) -> torch.Tensor:
        return torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)  # type: ignore[attr-defined]
