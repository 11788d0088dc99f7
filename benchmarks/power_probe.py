"""Is the throughput run bound by the GPU's power limit, and does the data in the matrices change its speed?

Runs one prefill step's projections (qkv, o, gate_up, down of a Llama-3-8B-shaped layer, cuBLAS bf16, ``M``
rows; two layers' weights alternating) back to back for ``--seconds`` per case, while a thread samples the
GPU's power draw, SM clock and clock-event reasons through NVML every 50 ms. One case per way of filling the
weights and inputs:

- ``pagedllm-dummy``: weights uniform in [-0.01, 0.01] (``load_format="dummy"``), inputs as the engine's
  norms leave them with those weights (unit-RMS rows times a uniform [-0.01, 0.01] norm weight);
- ``transformers-init``: weights normal with std 0.02 (transformers' ``from_config`` init), inputs unit
  normal (its norm weights are ones);
- ``unit-scaled``: weights ``randn / sqrt(K)``, inputs unit normal (the other probes' data);
- ``zeros``: every weight and input zero (no bit toggles in the multipliers).

Prints TFLOP/s, mean power, the median SM clock and how often the software power cap was active, per case;
writes ``power_probe.json`` under ``--out``.

    PYTHONPATH=. python benchmarks/power_probe.py --out /tmp/power
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import pynvml
import torch
from device_timing import write_results

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down: [N, K]
SW_POWER_CAP = 0x4  # nvmlClocksEventReasonSwPowerCap


def _fill(kind: str, shape: tuple[int, int], weight: bool, gen: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
    if kind == "zeros":
        return t.zero_()
    if kind == "pagedllm-dummy":
        if weight:
            return t.uniform_(-1e-2, 1e-2, generator=gen)
        norm_weight = torch.empty(shape[1], device="cuda").uniform_(-1e-2, 1e-2, generator=gen)
        return (torch.randn(shape, device="cuda", generator=gen) * norm_weight).to(torch.bfloat16)
    if kind == "transformers-init":
        return t.normal_(0.0, 0.02, generator=gen) if weight else t.normal_(generator=gen)
    if kind == "unit-scaled":
        return t.normal_(generator=gen).div_(shape[1] ** 0.5) if weight else t.normal_(generator=gen)
    raise ValueError(kind)


class Sampler(threading.Thread):
    """NVML samples (power in W, SM clock in MHz, clock-event reasons) every ``period`` s until stopped."""

    def __init__(self, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.period, self.samples, self.stop = period, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3,
                                 pynvml.nvmlDeviceGetClockInfo(self.handle, pynvml.NVML_CLOCK_SM),
                                 pynvml.nvmlDeviceGetCurrentClocksEventReasons(self.handle)))
            time.sleep(self.period)


def run_case(kind: str, tokens: int, seconds: float) -> dict[str, float]:
    """TFLOP/s of the step's projections over ``seconds`` of back-to-back runs (after 1 s to let the power
    settle), with the power and clock samples of that time."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [[_fill(kind, s, True, gen) for s in SHAPES] for _ in range(2)]
    inputs = [_fill(kind, (tokens, k), False, gen) for _, k in SHAPES]
    outputs = [torch.empty(tokens, n, device="cuda", dtype=torch.bfloat16) for n, _ in SHAPES]
    flops_per_layer = sum(2 * tokens * n * k for n, k in SHAPES)

    def layers(count: int) -> None:
        for i in range(count):
            for x, w, y in zip(inputs, weights[i % 2], outputs, strict=True):
                torch.mm(x, w.t(), out=y)

    layers(8)
    torch.cuda.synchronize()
    start_settle = time.perf_counter()
    while time.perf_counter() - start_settle < 1.0:
        layers(32)
        torch.cuda.synchronize()
    sampler = Sampler()
    sampler.start()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    count, began = 0, time.perf_counter()
    start.record()
    while time.perf_counter() - began < seconds:
        layers(32)
        count += 32
        torch.cuda.synchronize()
    end.record()
    end.synchronize()
    sampler.stop.set()
    sampler.join()
    elapsed = start.elapsed_time(end) / 1e3
    power, clock, reasons = zip(*sampler.samples, strict=True)
    return {"tflops": flops_per_layer * count / elapsed / 1e12, "power_w": statistics.mean(power),
            "sm_clock_mhz": statistics.median(clock),
            "power_capped": sum(bool(r & SW_POWER_CAP) for r in reasons) / len(reasons), "samples": len(reasons)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=16384, help="rows of each product (a mixed step's tokens)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cases", default="pagedllm-dummy,transformers-init,unit-scaled,zeros,pagedllm-dummy")
    args = parser.parse_args()
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    limit = pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1e3
    max_clock = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
    print(f"{torch.cuda.get_device_name()}: power limit {limit:.0f} W, max SM clock {max_clock} MHz; "
          f"{args.tokens} rows, {args.seconds:.0f} s per case")
    results = {"device": torch.cuda.get_device_name(), "power_limit_w": limit, "max_sm_clock_mhz": max_clock,
               "tokens": args.tokens, "cases": []}
    for kind in args.cases.split(","):
        r = run_case(kind, args.tokens, args.seconds)
        results["cases"].append({"kind": kind, **r})
        print(f"{kind:>18}: {r['tflops']:6.1f} TFLOP/s  {r['power_w']:5.0f} W  SM {r['sm_clock_mhz']:5.0f} MHz  "
              f"power-capped {100 * r['power_capped']:3.0f}% of {r['samples']} samples", flush=True)
    write_results(args.out, "power_probe.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
