"""Which Triton kernel variants compile during an engine's start and after it, and what they cost.

Starts an ``LLM`` (a tiny checkpoint built here, or ``--model``: a checkpoint or a ``config.json``
directory with ``--load-format dummy``), recording every Triton compile (``pagedllm.testing.triton_compiles``)
during the start, then runs ``engine_workloads`` twice: a phase's time in the first pass less its time in
the second is what the compiles it met cost. Prints and writes (``--out``) one JSON object.

    PYTHONPATH=. python benchmarks/compile_probe.py --device cuda --dtype bfloat16 [--enforce-eager] --out DIR
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: a tiny Llama checkpoint built in a temp dir")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--gc-freeze", action="store_true", help="freeze the heap after start, as the server does")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=128)
    parser.add_argument("--profile-phase", default=None,
                        help="run this phase once more on a fresh engine under cProfile and print the top functions")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from pagedllm import LLM
    from pagedllm.core.heap import freeze_heap
    from pagedllm.testing.checkpoints import build_checkpoint
    from pagedllm.testing.triton_compiles import TritonCompiles, run_workloads

    model = args.model or str(build_checkpoint(Path(tempfile.mkdtemp()), "llama"))
    with TritonCompiles(phase="start") as compiles:
        start = time.perf_counter()
        llm = LLM(model, device=args.device, dtype=args.dtype, load_format=args.load_format,
                  kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
                  enforce_eager=args.enforce_eager, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=1024)  # fmt: skip
        start_s = time.perf_counter() - start
        if args.gc_freeze:
            freeze_heap()
        first = run_workloads(llm, compiles)
    second = run_workloads(llm, TritonCompiles())
    after = [r for r in compiles.records if r.phase != "start"]
    result = {
        "config": vars(args),
        "start_s": round(start_s, 2),
        "compiles_at_start": len(compiles.in_phase("start")),
        "compiles_after_start": [f"[{r.phase}] {r.kernel}" for r in after],
        "phases": {p: {"first_s": round(first[p], 3), "second_s": round(second[p], 3),
                       "compiles": len(compiles.in_phase(p))} for p in first},
        "start_variants": [r.kernel for r in compiles.in_phase("start")],
    }  # fmt: skip
    if args.profile_phase:
        del llm  # its KV pool: the fresh engine sizes its own from the free memory
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        result["profile"] = profile_first_pass(llm_factory=lambda: LLM(
            model, device=args.device, dtype=args.dtype, load_format=args.load_format,
            kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization, enforce_eager=args.enforce_eager,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=1024,
        ), phase=args.profile_phase)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = f"compiles_{args.dtype}{'_eager' if args.enforce_eager else ''}.json"
        (Path(args.out) / name).write_text(text)


def profile_first_pass(llm_factory: object, phase: str) -> list[str]:
    """Start a fresh engine, run the workloads before ``phase``, then ``phase`` under cProfile; returns the
    top 30 lines by cumulative time."""
    import cProfile
    import io
    import pstats

    from pagedllm import SamplingParams
    from pagedllm.testing.triton_compiles import engine_workloads

    llm = llm_factory()  # type: ignore[operator]
    for name, prompts, params in engine_workloads(llm.llm_engine.model_config.vocab_size):
        sampling = SamplingParams(ignore_eos=True, **params)
        if name != phase:
            llm.generate(prompts, sampling, use_tqdm=False)
            continue
        profiler = cProfile.Profile()
        profiler.runcall(llm.generate, prompts, sampling, use_tqdm=False)
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(30)
        return stream.getvalue().splitlines()
    raise ValueError(f"no phase {phase!r}")


if __name__ == "__main__":
    main()
