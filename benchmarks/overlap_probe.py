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


def pre_attention(layer, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
    """A Llama decoder layer up to its attention: norm, then ``LlamaAttention.project_qkv``. Returns ``(q, k,
    v, residual)``."""
    if residual is None:
        residual, hidden = hidden, layer.input_layernorm(hidden)
    else:
        hidden, residual = layer.input_layernorm(hidden, residual)
    return *layer.self_attn.project_qkv(positions, hidden), residual


def post_attention(layer, attn_out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of the layer: output projection, norm with the residual add, MLP. Returns ``(hidden,
    residual)``."""
    hidden, residual = layer.post_attention_layernorm(layer.self_attn.o_proj(attn_out), residual)
    return layer.mlp(hidden), residual


def pipelined_forward(model, halves: list, aux: torch.cuda.Stream) -> list[torch.Tensor]:
    """Logits of each half in ``halves`` (``(ids, positions, metadata)`` each), computed as a two-stage
    pipeline: attention on ``aux``, everything else on the current stream, each half's attention started as
    soon as its q/k/v are ready. Tensors crossing streams are recorded on the stream that reads them."""
    main = torch.cuda.current_stream()
    layers = model.model.layers

    def attend(layer, q, k, v, md):
        aux.wait_stream(main)
        for t in (q, k, v):
            t.record_stream(aux)
        with torch.cuda.stream(aux):
            out = layer.self_attn.attn(q, k, v, md)
            done = torch.cuda.Event()
            done.record(aux)
        out.record_stream(main)
        return out, done

    state = []  # per half: [attention output, its event, residual]
    for ids, positions, md in halves:
        q, k, v, residual = pre_attention(layers[0], positions, model.model.embed_tokens(ids), None)
        state.append([*attend(layers[0], q, k, v, md), residual])
    hidden = [None] * len(halves)
    for i, layer in enumerate(layers):
        for h, (_, positions, md) in enumerate(halves):
            out, done, residual = state[h]
            main.wait_event(done)
            hidden[h], residual = post_attention(layer, out, residual)
            if i + 1 < len(layers):
                q, k, v, residual = pre_attention(layers[i + 1], positions, hidden[h], residual)
                state[h] = [*attend(layers[i + 1], q, k, v, md), residual]
            else:
                state[h][2] = residual
    return [model.compute_logits(model.model.norm(hidden[h], state[h][2])[0]) for h in range(len(halves))]


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

    def pipelined() -> None:
        logits = pipelined_forward(model, [(ids[:half], positions[:half], md_a),
                                           (ids[half:], positions[half:], md_b)], aux)
        out[:half], out[half:] = logits

    row: dict = {"batch": batch, "context": ctx}
    with torch.inference_mode():
        reference = None
        for name, fn in (("whole", whole), ("halves_serial", halves_serial), ("halves_streams", halves_streams),
                         ("pipelined", pipelined)):
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
    row["pipelined_vs_whole"] = round(row["pipelined_ms"] / row["whole_ms"], 3)
    weight = model.model.layers[0].mlp.gate_up_proj.weight
    x = torch.randn(half, weight.shape[1], dtype=weight.dtype, device=device)
    row["gate_up_half_batch_ms"] = round(device_time_us(lambda i: torch.nn.functional.linear(x, weight)) / 1e3, 4)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default="1024,512,256", help="largest first (they share a graph pool)")
    parser.add_argument("--context", type=int, default=576, help="tokens in the cache of every request")
    parser.add_argument("--carveouts", default="0", help="SMs kept from cuBLASLt GEMMs, one pass each")
    args = parser.parse_args()

    from pagedllm.core.config import EngineConfig
    from pagedllm.entrypoints.llm import LLM

    llm = LLM.from_config(EngineConfig(model=args.model, device="cuda", load_format="dummy", enforce_eager=True))
    runner = llm.llm_engine.executor.worker.runner
    aux = torch.cuda.Stream()
    results, keep = [], []
    for carveout in (int(c) for c in args.carveouts.split(",")):
        if carveout:
            torch.backends.cuda.preferred_blas_library("cublaslt")
        torch._C._set_sm_carveout_experimental(carveout or None)
        for batch in (int(b) for b in args.batches.split(",")):
            row = {"carveout": carveout, **probe_batch(runner, batch, args.context,
                                                       llm.llm_engine.model_config.vocab_size, aux, keep)}
            print(row, flush=True)
            results.append(row)
    write_results(args.out, "overlap_probe.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
