"""Tile sweep of the GPU backends' attention kernels on the throughput workload's shapes.

Builds, in bf16 with a Llama-3-8B layer's heads (32 query heads, 8 KV heads, head size 128, block size
16, block tables permuted at random), the attention inputs of the workload's two kinds of step:

- prefill-heavy: ``--prefills`` fresh prompts of ``--prompt-len`` tokens after ``--decodes`` decodes;
- pure decode: ``--decodes`` requests one token behind, with ``--context`` tokens cached.

``--kv-dtype fp8`` stores the cache in float8_e4m3fn (the engine's ``--kv-cache-dtype fp8``). ``--tuning``
names whose default tiles are checked and timed first: ``nvidia`` (the ``cuda`` backend's), ``cdna`` or ``rdna``
(the ``rocm`` backend's; on an AMD GPU, whose ROCm build of torch calls it ``cuda`` too). Checks those default
tiles against a float32 PyTorch reference, then times every tile choice of a
sweep (each checked against the default's output) and prints microseconds per call, TFLOP/s for prefill
and TB/s of K/V read for decode. Writes ``attention_probe.json`` under ``--out``.

    PYTHONPATH=. python benchmarks/attention_probe.py --out /tmp/attn
"""

from __future__ import annotations

import argparse
import itertools

import torch
from device_timing import device_time_us, write_results

from pagedllm.backends.interface import AttentionMetadata, AttentionSpec
from pagedllm.backends.kv_storage import byte_view
from pagedllm.backends.triton_gpu.decode_attention import decode_attention
from pagedllm.backends.triton_gpu.prefill_attention import prefill_attention
from pagedllm.backends.triton_gpu.tuning import KernelTuning, nvidia


def tunings() -> dict[str, KernelTuning]:
    """The kernel tunings by name: the ``cuda`` backend's and the ``rocm`` backend's two families."""
    from pagedllm.backends.rocm.tuning import cdna, rdna

    return {"nvidia": nvidia(), "cdna": cdna(), "rdna": rdna()}

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def make_batch(query_lens: list[int], context_lens: list[int], num_decodes: int, device: str,
               kv_dtype: torch.dtype = DTYPE) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random query ``[tokens, HEADS, HEAD_DIM]``, a filled paged cache and the batch's metadata."""
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    blocks = [-(-s // BLOCK) for s in seq_lens]
    num_blocks = sum(blocks) + 1
    perm = torch.randperm(num_blocks - 1) + 1  # block 0 stays the null block
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks):
        tables[r, :n] = perm[used : used + n]
        used += n
    cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE).to(kv_dtype)
    query_start = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    query_start[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    num_tokens = int(query_start[-1])
    query = torch.randn(num_tokens, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    metadata = AttentionMetadata(
        num_tokens=num_tokens, num_decodes=num_decodes, query_start_loc=query_start.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device), block_tables=tables.to(device),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=BLOCK,
        query_start_loc_cpu=query_start, seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32),
    )  # fmt: skip
    return query, cache, metadata


def reference(query: torch.Tensor, cache: torch.Tensor, md: AttentionMetadata, requests: range) -> torch.Tensor:
    """Float32 causal attention of ``requests``' tokens, rows in batch order."""
    outs = []
    qs = md.query_start_loc_cpu.tolist()
    for r in requests:
        seq = int(md.seq_lens_cpu[r])
        n = -(-seq // BLOCK)
        ids = md.block_tables[r, :n].long()
        k, v = (byte_view(cache)[i, ids].view(cache.dtype).reshape(-1, KV_HEADS, HEAD_DIM)[:seq].float()
                .repeat_interleave(HEADS // KV_HEADS, 1) for i in (0, 1))
        q = query[qs[r] : qs[r + 1]].float()
        pos = torch.arange(seq - q.shape[0], seq, device=q.device)
        scores = torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM**0.5
        scores = scores.masked_fill(torch.arange(seq, device=q.device)[None, None, :] > pos[None, :, None], -1e30)
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(outs)


def sweep(name: str, run, rows: torch.Tensor, expected: torch.Tensor, configs, work: float, unit: str) -> list[dict]:
    """Time ``run(tiles)`` for every tile choice (None: the default), checking ``out[rows]`` each time."""
    results = []
    for tiles in configs:
        try:
            out = run(tiles)
            err = (out[rows].float() - expected).abs().max().item()
            us = device_time_us(lambda _, t=tiles: run(t))
        except Exception as exc:  # a tile choice the compiler refuses (shared memory, registers)
            results.append({"kernel": name, "tiles": tiles, "error": type(exc).__name__})
            continue
        results.append({"kernel": name, "tiles": tiles, "us": round(us, 1), unit: round(work / us / 1e6, 1),
                        "max_err": round(err, 4)})
        print(results[-1], flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--prefills", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decodes", type=int, default=240)
    parser.add_argument("--context", type=int, default=580)
    parser.add_argument("--kv-dtype", choices=list(KV_DTYPES), default="bf16")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--tuning", choices=["nvidia", "cdna", "rdna"], default="nvidia",
                        help="whose tiles are the defaults (None in the results)")
    args = parser.parse_args()
    tuning = tunings()[args.tuning]
    default_m, *default_prefill = tuning.prefill(HEAD_DIM, DTYPE)
    kv_dtype = KV_DTYPES[args.kv_dtype]
    default_decode = tuning.decode(HEAD_DIM, kv_dtype)
    torch.manual_seed(0)
    spec = AttentionSpec(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, scale=HEAD_DIM**-0.5)
    results = []

    n_dec, n_pf = args.decodes, args.prefills
    if not args.skip_prefill:  # prefill-heavy step: decodes first, then the prompts
        query, cache, md = make_batch([1] * n_dec + [args.prompt_len] * n_pf, [args.context] * n_dec + [0] * n_pf,
                                      n_dec, "cuda", kv_dtype)  # fmt: skip
        out = torch.empty_like(query)
        rows = torch.arange(n_dec, md.num_tokens, device="cuda")
        prefill_attention(out, query, cache, md, spec, block_m=default_m, tiles=tuple(default_prefill))
        expected = reference(query, cache, md, range(n_dec, n_dec + n_pf))
        err = (out[rows].float() - expected).abs().max().item()
        print(f"prefill default tiles vs float32 reference: max abs error {err:.4f}", flush=True)
        if err > 0.05:
            raise SystemExit("prefill attention is wrong")
        flop = n_pf * 2 * 2 * HEADS * HEAD_DIM * args.prompt_len * (args.prompt_len + 1) / 2

        def run_prefill(tiles, block_m=None):
            prefill_attention(out, query, cache, md, spec, block_m=block_m or default_m,
                              tiles=tiles or tuple(default_prefill))
            return out

        configs = [None, *itertools.product((16, 32, 64, 128), (4, 8), (1, 2, 3))]
        results += sweep("prefill", run_prefill, rows, expected, configs, flop, "TFLOPs")
        for block_m in (128, 256):
            results += [dict(r, block_m=block_m) for r in sweep(
                f"prefill block_m {block_m}", lambda t, b=block_m: run_prefill(t, b), rows, expected,
                [(64, 4, 2), (64, 8, 2), (64, 8, 3), (128, 8, 2), (32, 4, 2), (32, 8, 2)], flop, "TFLOPs")]  # fmt: skip

    if args.skip_decode:
        write_results(args.out, "attention_probe.json", results)
        return 0
    # pure decode step
    query, cache, md = make_batch([1] * n_dec, [args.context] * n_dec, n_dec, "cuda", kv_dtype)
    out = torch.empty_like(query)
    rows = torch.arange(n_dec, device="cuda")
    decode_attention(out, query, cache, md, spec, tiles=default_decode)
    expected = reference(query, cache, md, range(n_dec))
    err = (out.float() - expected).abs().max().item()
    print(f"decode default tiles vs float32 reference: max abs error {err:.4f}", flush=True)
    if err > 0.05:
        raise SystemExit("decode attention is wrong")
    kv_bytes = n_dec * (args.context + 1) * KV_HEADS * HEAD_DIM * 2 * cache.element_size()

    def run_decode(tiles):
        decode_attention(out, query, cache, md, spec, tiles=tiles or default_decode)
        return out

    configs = [None, *itertools.product((16, 32, 64, 128), (2, 4, 8), (1, 2, 3))]
    results += sweep("decode", run_decode, rows, expected, configs, kv_bytes, "TBps")
    write_results(args.out, "attention_probe.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
