"""Batch-1 decode steps of a tensor-parallel engine, timed part by part, with rank 0's kernels by device time.

For ``--tp N`` (run once per N, in its own process: one tensor-parallel group per process) this builds the
engine on ``--model`` (a config directory, dummy weights, bf16), runs a ``--input-len`` prompt, then times
``--steps`` decode steps with host timers and CUDA events around each part of the step (the timer of
``benchmarks/cuda_step_profile.py``, plus marks inside the executor: ``send_done_ms`` when the step was
written to the other ranks, ``thread_start_ms`` when rank 0's thread began it, ``replay_start_ms``), and
profiles 16 more with torch.profiler (rank 0's process: its GPU's kernels and its host calls). With
``--tp`` above 1 the steps are timed twice: through the executor as it is (rank 0 on its own thread), then
``inline`` (rank 0's step run on the calling thread, the other ranks sent the step first), to price the
thread handoff. Prints the kernel table, then the medians; writes both under ``--out``.

    python benchmarks/tp_step_profile.py --model benchmarks/llama3_8b_config --tp 2 --out /tmp/tp2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_step_profile import StepTimer, _fake_cuda_timing, profile_table, summarize


def add_executor_marks(timer: StepTimer) -> None:
    """Record when the step reached the other ranks and when rank 0's thread began it (ms after launch)."""
    executor = timer.engine.executor
    worker = executor.worker
    send, execute = executor._send, worker.execute

    def timed_send(call):
        send(call)
        timer.sub["send_done_ms"] = 1e3 * (time.perf_counter() - timer.launch_start)

    def timed_execute(so, *args):
        timer.sub["thread_start_ms"] = 1e3 * (time.perf_counter() - timer.launch_start)
        return execute(so, *args)

    executor._send = timed_send
    worker.execute = timed_execute


def run_inline(executor) -> None:
    """Make ``executor.execute`` send the step to ranks 1..N-1, then run rank 0's part on the caller's thread."""
    from pagedllm.core.distributed.mp_worker import WorkerCall

    def execute(so, sampled_token_ids=None):
        executor._send(WorkerCall("execute", (so,), reply=False))
        return executor.worker.execute(so, sampled_token_ids)

    executor.execute = execute


def time_steps(timer: StepTimer, steps: int, label: str) -> dict:
    timer.records.clear()
    for _ in range(steps):
        timer.step()
    return summarize(timer.records, label)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--device", default="cuda", help="cpu only checks the script's plumbing")
    args = parser.parse_args()
    from pagedllm import LLM, SamplingParams

    if args.device == "cpu":
        _fake_cuda_timing()
    args.out.mkdir(parents=True, exist_ok=True)
    llm = LLM(args.model, device=args.device, dtype="bfloat16", load_format="dummy", tensor_parallel_size=args.tp,
              max_num_seqs=8, max_model_len=args.max_model_len)
    engine = llm.llm_engine
    prompt = np.random.default_rng(0).integers(10, min(120000, engine.model_config.vocab_size), args.input_len).tolist()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)

    timer = StepTimer(engine)
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=2 * args.steps + 40, ignore_eos=True))
    timer.step()  # the prefill
    if args.tp > 1:
        add_executor_marks(timer)
    summary = time_steps(timer, args.steps, f"batch-1 decode, tp={args.tp}")
    table = profile_table(lambda: [timer.step() for _ in range(16)], args.out / f"kernels_tp{args.tp}.txt", 30)
    if args.tp > 1:
        run_inline(engine.executor)
        summary["inline"] = time_steps(timer, args.steps, f"batch-1 decode, tp={args.tp}, rank 0 inline")
    while engine.has_unfinished_requests():
        engine.step()
    engine.shutdown()
    summary["tp"] = args.tp
    (args.out / f"summary_tp{args.tp}.json").write_text(json.dumps(summary, indent=1))
    print(f"rank 0 kernels of 16 decode steps (tp={args.tp}):")
    print(table)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
