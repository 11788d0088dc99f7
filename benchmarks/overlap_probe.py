"""Does a decode step get faster when two halves of its batch run on two streams at once?

At a large decode batch about half of a step is attention, which streams K/V at copy bandwidth, and half is
GEMMs, which are bound by the tensor cores. Two independent halves of the batch on two streams let the GPU run
one half's attention beside the other half's GEMMs (the idea of NanoFlow's nano-batches). This probe builds
the engine's model on ``--model`` (dummy weights, the ``cuda`` backend), fills a decode batch of ``B``
requests at context ``--context`` with distinct KV blocks, and times, as captured graphs replayed on the
device (the way decode steps run):

- ``whole``: the model and its LM head on the batch;
- ``halves_serial``: the two halves one after the other on one stream (the cost of halving alone);
- ``halves_streams``: the two halves on two streams, joined at the end.

The logits of the two-stream graph are checked against the whole batch's. Writes ``overlap_probe.json``
under ``--out``. Example::

    PYTHONPATH=. python benchmarks/overlap_probe.py --model benchmarks/llama3_8b_config --out /tmp/overlap
"""

from __future__ import annotations

import argparse

import torch
from device_timing import device_time_us, write_results


def probe_batch(runner, batch: int, ctx: int, vocab: int, aux: torch.cuda.Stream, keep: list) -> dict:
    """Time the three graphs for ``batch`` decodes at context ``ctx`` (see the module docstring). The graphs
    go into ``keep``: freeing a graph of the shared pool before the next capture trips an allocator assert
    in torch 2.11."""
    from pagedllm.backends.interface import AttentionMetadata

    model, backend, bs = runner.model, runner.backend, runner.block_size
    device = torch.device("cuda")
    per_seq = (ctx + bs) // bs  # blocks holding ctx + 1 tokens
    tables = torch.arange(1, 1 + batch * per_seq, dtype=torch.int32, device=device).view(batch, per_seq)
    ids = torch.randint(0, vocab, (batch,), device=device)
    positions = torch.full((batch,), ctx, dtype=torch.int64, device=device)
    slots = tables[:, ctx // bs].long() * bs + ctx % bs

    def metadata(lo: int, hi: int) -> AttentionMetadata:
        n = hi - lo
        return AttentionMetadata(
            num_tokens=n, num_decodes=n, query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
            seq_lens=torch.full((n,), ctx + 1, dtype=torch.int32, device=device),
            context_lens=torch.full((n,), ctx, dtype=torch.int32, device=device),
            block_tables=tables[lo:hi], slot_mapping=slots[lo:hi], max_query_len=1,
            max_seq_len=runner.max_blocks_per_seq * bs, block_size=bs,
            query_start_loc_cpu=torch.arange(n + 1, dtype=torch.int32),
            seq_lens_cpu=torch.full((n,), ctx + 1, dtype=torch.int32))

    half = batch // 2
    md_all, md_a, md_b = metadata(0, batch), metadata(0, half), metadata(half, batch)
    with torch.inference_mode():
        one = model.compute_logits(model(ids[:1], positions[:1], metadata(0, 1)))
    out = torch.empty(batch, one.shape[-1], dtype=one.dtype, device=device)

    def forward(lo: int, hi: int, md: AttentionMetadata) -> None:
        out[lo:hi] = model.compute_logits(model(ids[lo:hi], positions[lo:hi], md))

    def whole() -> None:
        forward(0, batch, md_all)

    def halves_serial() -> None:
        forward(0, half, md_a)
        forward(half, batch, md_b)

    def halves_streams() -> None:
        main_stream = torch.cuda.current_stream()
        aux.wait_stream(main_stream)
        forward(0, half, md_a)
        with torch.cuda.stream(aux):
            forward(half, batch, md_b)
        main_stream.wait_stream(aux)

    row: dict = {"batch": batch, "context": ctx}
    with torch.inference_mode():
        reference = None
        for name, fn in (("whole", whole), ("halves_serial", halves_serial), ("halves_streams", halves_streams)):
            replay = backend.capture_graph(fn)
            keep.append(replay)
            replay()
            torch.cuda.synchronize()
            if reference is None:
                reference = out.float().clone()
            else:
                row[f"{name}_max_abs_diff"] = round((out.float() - reference).abs().max().item(), 4)
            row[f"{name}_ms"] = round(device_time_us(lambda i, r=replay: r(), iters=10, runs=5, warmup=3) / 1e3, 3)
    row["streams_vs_whole"] = round(row["halves_streams_ms"] / row["whole_ms"], 3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default="1024,512,256", help="largest first (they share a graph pool)")
    parser.add_argument("--context", type=int, default=576, help="tokens in the cache of every request")
    args = parser.parse_args()

    from pagedllm.core.config import EngineConfig
    from pagedllm.entrypoints.llm import LLM

    llm = LLM.from_config(EngineConfig(model=args.model, device="cuda", load_format="dummy", enforce_eager=True))
    runner = llm.llm_engine.executor.worker.runner
    aux = torch.cuda.Stream()
    results, keep = [], []
    for batch in (int(b) for b in args.batches.split(",")):
        row = probe_batch(runner, batch, args.context, llm.llm_engine.model_config.vocab_size, aux, keep)
        print(row, flush=True)
        results.append(row)
        torch.cuda.empty_cache()
    write_results(args.out, "overlap_probe.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
