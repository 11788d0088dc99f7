"""Which Triton kernel variants a run compiles, and when: a recorder for tests and probes of Triton backends.

A Triton kernel compiles one variant per specialization of its arguments (constexpr values, integers equal
to 1, integers and pointers divisible by 16) the first time a launch needs it. After an engine has started,
each such compile stalls the step that meets it, from tens of milliseconds (a read of Triton's disk cache)
to about a second: a serving engine's start should have compiled every variant its steps launch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Compile:
    """One variant compiled (or loaded from Triton's disk cache) while recording."""

    phase: str
    """What the run was doing (:attr:`TritonCompiles.phase` at the time)."""
    kernel: str
    """The kernel's name and what its variant is specialized on (:func:`describe`)."""


@dataclass
class TritonCompiles:
    """While active (a context manager), records every Triton kernel variant a launch had to compile: a miss
    of Triton's in-memory cache, through ``triton.knobs.runtime.jit_cache_hook``. Set :attr:`phase` to label
    what follows. Nested recorders are not supported (the hook is global; the previous one is restored)."""

    phase: str = ""
    records: list[Compile] = field(default_factory=list)
    _saved: Callable[..., object] | None = None

    def __enter__(self) -> TritonCompiles:
        import triton

        self._saved = triton.knobs.runtime.jit_cache_hook
        triton.knobs.runtime.jit_cache_hook = self._hook
        return self

    def __exit__(self, *exc: object) -> None:
        import triton

        triton.knobs.runtime.jit_cache_hook = self._saved

    def _hook(self, **kwargs: object) -> bool:
        self.records.append(Compile(self.phase, describe(kwargs)))
        return False  # a true value would make Triton skip the compile

    def in_phase(self, phase: str) -> list[Compile]:
        """The records made while :attr:`phase` was ``phase``."""
        return [r for r in self.records if r.phase == phase]

    def report(self) -> str:
        """One line per record: ``[phase] kernel``."""
        return "\n".join(f"[{r.phase}] {r.kernel}" for r in self.records)


def forget_compiled(package: str) -> int:
    """Drop the compiled variants that the Triton kernels of ``package``'s imported modules hold in memory, so a
    recorder sees what a fresh process would compile (Triton's disk cache stays: recompiles are quick loads).
    Returns the number of kernels cleared. Raises AttributeError if this Triton keeps them elsewhere (its
    ``JITFunction.device_caches``, from Triton 3.2 on)."""
    from triton.runtime.jit import JITFunction

    kernels = {id(v): v for name, module in list(sys.modules.items())
               if module is not None and (name == package or name.startswith(package + "."))
               for v in vars(module).values() if isinstance(v, JITFunction)}  # fmt: skip
    for kernel in kernels.values():
        kernel.device_caches.clear()
    return len(kernels)


def describe(hook_kwargs: dict[str, object]) -> str:
    """``name(warps=..., stages=...; constant args; args divisible by 16)`` from a ``jit_cache_hook`` call's
    keyword arguments (``fn``, ``compile``, ``repr``); ``repr`` alone where they are not in the form Triton
    3.4 to 3.9 give them."""
    try:
        info, spec = hook_kwargs["fn"], hook_kwargs["compile"]
        names = info.jit_function.arg_names  # type: ignore[attr-defined]

        def arg(path: object) -> str:
            return names[path[0]] if isinstance(path, tuple) and len(path) == 1 else str(path)

        constants = ", ".join(f"{arg(k)}={v}" for k, v in spec["constants"].items())  # type: ignore[index]
        attrs = spec["configs"][0]  # type: ignore[index]
        divisible = ",".join(arg(k) for k, v in attrs.items() if "divisibility" in str(v))
        return (f"{info.name}(warps={spec['num_warps']}, stages={spec['num_stages']}; {constants}; "  # type: ignore[attr-defined,index]
                f"divisible by 16: {divisible})")
    except (KeyError, AttributeError, IndexError, TypeError):
        return str(hook_kwargs.get("repr"))


def engine_workloads(vocab_size: int, seed: int = 0) -> list[tuple[str, list[list[int]], dict[str, object]]]:
    """Requests of the shapes a server meets, as ``(phase, prompts as token ids, SamplingParams keywords)``:
    one-token and short prompts, prompts longer than a 128-token step (chunked), a wide batch, mixed lengths,
    decodes of 700 tokens, parallel sampling, prefix-cache hits with logprobs. Needs a model of at least
    1024 positions and a step budget of at least 128 tokens."""
    gen = torch.Generator().manual_seed(seed)

    def prompts(count: int, length: int) -> list[list[int]]:
        return torch.randint(3, vocab_size, (count, length), generator=gen).tolist()

    shared = prompts(1, 96)[0]
    mixed = [p[:n] for p, n in zip(prompts(6, 200), (1, 5, 16, 17, 150, 200), strict=True)]
    return [
        ("one request, one-token prompt", prompts(1, 1), {"max_tokens": 6}),
        ("three requests", prompts(3, 17), {"max_tokens": 9}),
        ("chunked long prompts", prompts(3, 300), {"max_tokens": 4}),
        ("a wide batch", prompts(21, 33), {"max_tokens": 12}),
        ("mixed lengths", mixed, {"max_tokens": 16}),
        ("long decodes", prompts(2, 40), {"max_tokens": 700}),
        ("parallel sampling", prompts(2, 7), {"max_tokens": 10, "n": 3, "temperature": 0.8, "top_p": 0.9, "seed": 1}),
        ("prefix cache hits", [[*shared, 5], [*shared, 6, 7]], {"max_tokens": 5, "logprobs": 3}),
    ]


def run_workloads(llm: object, recorder: TritonCompiles) -> dict[str, float]:
    """Generate :func:`engine_workloads` on ``llm`` (an ``LLM``), each under its phase; returns each phase's
    seconds. Raises AssertionError if a request is lost."""
    from pagedllm import SamplingParams

    seconds = {}
    for phase, prompts, params in engine_workloads(llm.llm_engine.model_config.vocab_size):  # type: ignore[attr-defined]
        recorder.phase = phase
        start = time.perf_counter()
        outputs = llm.generate(prompts, SamplingParams(ignore_eos=True, **params), use_tqdm=False)  # type: ignore[attr-defined]
        seconds[phase] = time.perf_counter() - start
        assert len(outputs) == len(prompts), f"{phase}: {len(outputs)} outputs for {len(prompts)} prompts"
    return seconds
