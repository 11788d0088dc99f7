"""Offline throughput on the CPU: pagedllm against Hugging Face transformers and vLLM's CPU build.

One invocation runs the SAME workload (seeded random token-id prompts, greedy, EOS ignored, a fixed
number of new tokens each) through

* pagedllm, in-process, on the ``cpu`` backend (continuous batching, paged KV cache);
* transformers ``generate``, in-process: static batches of ``--hf-batch-size`` prompts, left-padded,
  greedy, EOS suppressed with ``min_new_tokens``;
* optionally vLLM's CPU build (``--vllm-python``: the interpreter of a separate venv), as a subprocess
  running a small driver that prints one JSON line with its timings;

and prints the workload, the hardware, and for each engine the median wall time, output tokens/s, total
(prompt + output) tokens/s and the ratio pagedllm/peer of output tokens/s (> 1: pagedllm is faster).

Every engine is warmed up once (a short generate) before the timed runs. Prefix caching is off in
pagedllm and vLLM so that ``--repeat`` reruns of the same prompts are not served from the cache.

``--speculative-config`` (prompt lookup) and ``--lora-path`` (a PEFT adapter on every prompt) run the same
feature in every engine: vLLM and pagedllm take them as they are; transformers runs its own prompt lookup (one
prompt at a time) or applies the adapter through PEFT.

Examples::

    python benchmarks/offline_cpu.py --build tiny --dtype float32
    python benchmarks/offline_cpu.py --build 100m --dtype bfloat16 --repeat 3 \\
        --vllm-python /opt/vllm-cpu-venv/bin/python

``--build`` makes random-init Llamas (float32 on disk, cast to ``--dtype`` at load):

* ``tiny``: ``checkpoints.TINY_CONFIGS["llama"]`` as is: hidden 64, 2 layers, 4 heads of 16, 2 KV heads,
  vocab 512: 0.14M parameters. vLLM's CPU attention has no head size 16, so vLLM cannot run it.
* ``7m``: hidden 256, 4 layers, 4 heads of 64, 2 KV heads, intermediate 768, vocab 8192, untied: 7.3M.
* ``100m``: hidden 768, 12 layers, 12 heads of 64, 4 KV heads, intermediate 2048, vocab 8192 (the BPE
  tokenizer trained on the standard library tops out near 8.2k tokens), untied embeddings: 88.1M.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Checkpoints --build can make: build_checkpoint keyword arguments on top of checkpoints.TINY_CONFIGS["llama"].
BUILD_CONFIGS: dict[str, dict[str, object]] = {
    "tiny": {},
    "7m": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False),
    "100m": dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                 tie_word_embeddings=False),
}
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pagedllm-bench"
RESULT_MARKER = "PAGEDLLM_BENCH_RESULT "
# Head sizes vLLM 0.32's CPU attention runs (CPUAttentionBackend.get_supported_head_sizes); tiny's 16 is not one.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# Run by the vLLM venv's interpreter: argv[1] is a JSON file with the model, prompts and settings.
VLLM_DRIVER = '''
import json, os, sys, time


def main():
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    t0 = time.perf_counter()
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    kwargs = dict(model=cfg["model"], enforce_eager=True, dtype=cfg["dtype"], seed=0,
                  max_model_len=cfg["max_model_len"], enable_prefix_caching=False)
    for name in ("max_num_seqs", "max_num_batched_tokens", "speculative_config"):
        if cfg.get(name):
            kwargs[name] = cfg[name]
    lora = cfg.get("lora")
    lora_requests = None
    if lora:
        from vllm.lora.request import LoRARequest
        kwargs.update(enable_lora=True, max_loras=lora["max_loras"], max_lora_rank=lora["max_lora_rank"])
        lora_requests = [LoRARequest(f"lora{i % lora['max_loras'] + 1}", i % lora["max_loras"] + 1, lora["path"])
                         for i in range(len(cfg["prompts"]))]
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t0
    warm = SamplingParams(temperature=0, max_tokens=cfg["warmup_output_len"], ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in cfg["warmup_prompts"]], warm, use_tqdm=False,
                 lora_request=lora_requests[:len(cfg["warmup_prompts"])] if lora_requests else None)
    params = SamplingParams(temperature=0, max_tokens=cfg["output_len"], ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in cfg["prompts"]]
    times, output_tokens = [], []
    for _ in range(cfg["repeat"]):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_requests)
        times.append(time.perf_counter() - start)
        output_tokens.append(sum(len(o.outputs[0].token_ids) for o in outs))
    info = {}
    try:
        sched = llm.llm_engine.vllm_config.scheduler_config
        info = {"max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens}
    except Exception:
        pass
    result = {"times": times, "output_tokens": output_tokens, "startup_s": startup_s,
              "version": vllm.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "settings": info}
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
'''.replace("MARKER", repr(RESULT_MARKER))


@dataclass
class Workload:
    """The prompts (token ids) every engine runs, and the number of new tokens for each."""

    prompts: list[list[int]]
    output_len: int
    warmup_prompts: list[list[int]]
    warmup_output_len: int

    @property
    def input_tokens(self) -> int:
        """Prompt tokens over all prompts."""
        return sum(len(p) for p in self.prompts)


@dataclass
class EngineResult:
    """Timings of one engine on the workload: one wall time (seconds) per timed repeat."""

    name: str
    times: list[float]
    output_tokens: int
    input_tokens: int
    startup_s: float
    version: str
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        """Median wall time of the timed repeats."""
        return statistics.median(self.times)

    @property
    def output_tps(self) -> float:
        """Generated tokens per second (at the median wall time)."""
        return self.output_tokens / self.median_s

    @property
    def total_tps(self) -> float:
        """Prompt plus generated tokens per second (at the median wall time)."""
        return (self.input_tokens + self.output_tokens) / self.median_s


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face checkpoint directory")
    src.add_argument("--build", choices=sorted(BUILD_CONFIGS),
                     help="build (once) a random-init Llama checkpoint into --cache-dir and use it")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where --build keeps checkpoints")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-input", type=int, default=32, help="shortest prompt, tokens")
    p.add_argument("--max-input", type=int, default=512, help="longest prompt, tokens")
    p.add_argument("--output-len", type=int, default=128, help="new tokens per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt lengths and token ids")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per engine; the median is reported")
    p.add_argument("--hf-batch-size", type=int, default=32, help="transformers static batch size")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    p.add_argument("--skip-pagedllm", action="store_true", help="do not run pagedllm (peers only)")
    p.add_argument("--vllm-python", help="interpreter of a venv with vLLM's CPU build; runs vLLM when given")
    p.add_argument("--vllm-threads-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND for vLLM (default: every core, e.g. 0-1)")
    p.add_argument("--vllm-timeout", type=float, default=1800.0, help="seconds before the vLLM run is killed")
    p.add_argument("--kv-cache-gib", type=int, default=2,
                   help="KV cache size for pagedllm (kv_cache_memory_bytes) and vLLM (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="for pagedllm and vLLM (default: each's own)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="for pagedllm and vLLM (default: each's own)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for pagedllm and transformers")
    p.add_argument("--speculative-config", type=json.loads, default=None,
                   help="prompt lookup, vLLM's form (e.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'): "
                        "pagedllm and vLLM take it as is; transformers runs its own prompt lookup "
                        "(prompt_lookup_num_tokens), which takes one prompt at a time")
    p.add_argument("--lora-path", default=None,
                   help="a PEFT LoRA adapter every prompt runs with (ids 1..--max-loras in turn, the same files) in "
                        "pagedllm and vLLM; transformers applies it through PEFT, unmerged")
    p.add_argument("--max-loras", type=int, default=4, help="adapter slots, with --lora-path")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank, with --lora-path")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if not 1 <= args.min_input <= args.max_input:
        p.error("need 1 <= --min-input <= --max-input")
    for name in ("num_prompts", "output_len", "repeat", "hf_batch_size", "kv_cache_gib"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def resolve_model(args: argparse.Namespace) -> Path:
    """The checkpoint directory: ``--model``, or the ``--build`` one (built on first use, stored as float32)."""
    if args.model:
        return Path(args.model).resolve()
    directory = (args.cache_dir / f"llama-{args.build}").resolve()
    done = directory / ".complete"
    if not done.is_file():
        from pagedllm.testing.checkpoints import build_checkpoint

        print(f"building the {args.build} checkpoint in {directory} ...", flush=True)
        build_checkpoint(directory, "llama", dtype=torch.float32, **BUILD_CONFIGS[args.build])
        done.write_text("ok\n")
    return directory


def make_workload(model_dir: Path, args: argparse.Namespace) -> Workload:
    """Seeded random prompts: lengths uniform in [min_input, max_input], ids uniform over non-special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with open(model_dir / "config.json") as f:
        vocab = min(len(tokenizer), int(json.load(f)["vocab_size"]))
    special = set(tokenizer.all_special_ids)
    pool = [i for i in range(vocab) if i not in special]
    rng = random.Random(args.seed)
    prompts = [[rng.choice(pool) for _ in range(rng.randint(args.min_input, args.max_input))]
               for _ in range(args.num_prompts)]
    warmup = [[rng.choice(pool) for _ in range(n)] for n in (16, 48)]
    return Workload(prompts, args.output_len, warmup, warmup_output_len=8)


def model_size(model_dir: Path) -> str:
    """Parameter count and shape from config.json (counted from the config, not the weights)."""
    with open(model_dir / "config.json") as f:
        c = json.load(f)
    h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or h // heads
    per_layer = h * head_dim * (2 * heads + 2 * kv_heads) + 3 * h * inter + 2 * h
    embeds = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    params = layers * per_layer + embeds + h
    return (f"{c.get('architectures', ['?'])[0]} {params / 1e6:.3g}M params (hidden {h}, {layers} layers, "
            f"{heads} heads, {kv_heads} KV heads, intermediate {inter}, vocab {vocab})")


def hardware() -> dict[str, object]:
    """CPU model, cores, memory, relevant ISA flags and the torch build."""
    info: dict[str, object] = {"cpu": platform.processor() or platform.machine(), "flags": ""}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["cpu"] = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
                info["flags"] = " ".join(f for f in wanted if f in flags)
                break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info["cores"] = os.cpu_count()
    info["usable_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["loadavg"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["python"] = platform.python_version()
    info["openblas_env"] = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    return info


def timed_runs(run: Callable[[], int], repeat: int) -> tuple[list[float], int]:
    """Call ``run`` (returns generated tokens) ``repeat`` times; wall times and the (checked) token count."""
    times, counts = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        counts.append(run())
        times.append(time.perf_counter() - start)
    if len(set(counts)) != 1:
        raise RuntimeError(f"generated token counts differ between repeats: {counts}")
    return times, counts[0]


def run_pagedllm(model_dir: Path, work: Workload, args: argparse.Namespace) -> EngineResult:
    """pagedllm's offline ``LLM.generate`` on the cpu backend, in this process."""
    import pagedllm
    from pagedllm import LLM, SamplingParams

    start = time.perf_counter()
    kwargs: dict[str, object] = dict(device="cpu", dtype=args.dtype, kv_cache_memory_bytes=args.kv_cache_gib * 2**30,
                                     max_model_len=args.max_input + args.output_len, enable_prefix_caching=False)
    if args.max_num_seqs:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.speculative_config:
        kwargs["speculative_config"] = args.speculative_config
    loras = None
    if args.lora_path:
        from pagedllm import LoRARequest

        kwargs.update(enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank)
        loras = [LoRARequest(f"lora{i % args.max_loras + 1}", i % args.max_loras + 1, args.lora_path)
                 for i in range(len(work.prompts))]
    llm = LLM(str(model_dir), **kwargs)
    startup = time.perf_counter() - start
    llm.generate(work.warmup_prompts, SamplingParams(temperature=0, max_tokens=work.warmup_output_len,
                                                     ignore_eos=True), use_tqdm=False,
                 lora_request=loras[:len(work.warmup_prompts)] if loras else None)
    params = SamplingParams(temperature=0, max_tokens=work.output_len, ignore_eos=True)

    def run() -> int:
        outs = llm.generate(work.prompts, params, use_tqdm=False, lora_request=loras)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    times, out_tokens = timed_runs(run, args.repeat)
    engine = llm.llm_engine
    notes = {"max_num_seqs": engine.scheduler.max_num_seqs, "max_num_batched_tokens": engine.max_num_batched_tokens,
             "block_size": engine.block_size, "torch_threads": torch.get_num_threads()}
    if args.speculative_config:
        stats = engine.stats()
        notes["draft_acceptance"] = round(stats.spec_decode_num_accepted_tokens
                                          / max(stats.spec_decode_num_draft_tokens, 1), 2)
    engine.shutdown()
    return EngineResult("pagedllm", times, out_tokens, work.input_tokens, startup,
                        getattr(pagedllm, "__version__", "?"), notes)


def run_transformers(model_dir: Path, work: Workload, args: argparse.Namespace) -> EngineResult:
    """transformers ``generate``: static left-padded batches, greedy, EOS suppressed by ``min_new_tokens``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    if args.lora_path:
        import peft

        model = peft.PeftModel.from_pretrained(model, args.lora_path, autocast_adapter_dtype=False).to(dtype).eval()
    lookup = {}
    if args.speculative_config:  # transformers' prompt lookup: one prompt at a time
        lookup = {"prompt_lookup_num_tokens": args.speculative_config["num_speculative_tokens"],
                  "max_matching_ngram_size": args.speculative_config.get("prompt_lookup_max", 4)}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    startup = time.perf_counter() - start

    def generate(prompts: list[list[int]], new_tokens: int) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None, **lookup)
        return (out.shape[1] - width) * len(prompts)

    bs = 1 if lookup else args.hf_batch_size
    generate(work.warmup_prompts[:bs], work.warmup_output_len)

    def run() -> int:
        return sum(generate(work.prompts[i : i + bs], work.output_len) for i in range(0, len(work.prompts), bs))

    times, out_tokens = timed_runs(run, args.repeat)
    notes = {"batch_size": bs, "attn_implementation": getattr(model.config, "_attn_implementation", None),
             "torch_threads": torch.get_num_threads(), **({"prompt_lookup": lookup} if lookup else {}),
             **({"lora": "peft"} if args.lora_path else {})}
    return EngineResult("transformers", times, out_tokens, work.input_tokens, startup, transformers.__version__, notes)


def run_vllm(model_dir: Path, work: Workload, args: argparse.Namespace) -> EngineResult:
    """vLLM's CPU build in a subprocess of ``--vllm-python``, through :data:`VLLM_DRIVER`."""
    with open(model_dir / "config.json") as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(f"vLLM's CPU attention does not support head_dim={head_dim} (only {VLLM_CPU_HEAD_SIZES}); "
                         "use --build 7m or 100m")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    bind = args.vllm_threads_bind or (f"0-{cores - 1}" if cores > 1 else "0")
    with tempfile.TemporaryDirectory(prefix="pagedllm-vllm-") as tmp:
        cfg = {"model": str(model_dir), "dtype": args.dtype, "prompts": work.prompts, "output_len": work.output_len,
               "warmup_prompts": work.warmup_prompts, "warmup_output_len": work.warmup_output_len,
               "repeat": args.repeat, "max_model_len": args.max_input + args.output_len,
               "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
               "speculative_config": args.speculative_config,
               "lora": {"path": str(Path(args.lora_path).resolve()), "max_loras": args.max_loras,
                        "max_lora_rank": args.max_lora_rank} if args.lora_path else None}
        cfg_path, driver_path, log_path = Path(tmp, "cfg.json"), Path(tmp, "driver.py"), Path(tmp, "vllm.log")
        cfg_path.write_text(json.dumps(cfg))
        driver_path.write_text(VLLM_DRIVER)
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=bind, VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib))
        env.pop("PYTHONPATH", None)
        print(f"  vllm: {args.vllm_python} (VLLM_CPU_OMP_THREADS_BIND={bind}), log in {log_path} while it runs",
              flush=True)
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run([args.vllm_python, str(driver_path), str(cfg_path)], cwd=tmp, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, timeout=args.vllm_timeout, check=False)
                rc: int | str = proc.returncode
            except subprocess.TimeoutExpired:
                rc = f"timed out after {args.vllm_timeout:.0f} s"
        text = log_path.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.startswith(RESULT_MARKER)]
    if rc != 0 or not lines:
        print("  vllm output, last lines:\n" + "\n".join(text.splitlines()[-40:]), file=sys.stderr, flush=True)
        errors = [ln for ln in text.splitlines() if "Error" in ln]
        raise RuntimeError(f"exit {rc}" + (f": {errors[-1].strip()[-300:]}" if errors else ""))
    res = json.loads(lines[-1][len(RESULT_MARKER):])
    if len(set(res["output_tokens"])) != 1:
        raise RuntimeError(f"vLLM generated token counts differ between repeats: {res['output_tokens']}")
    notes = {"threads_bind": bind, "torch": res["torch"], "torch_threads": res["torch_threads"], **res["settings"]}
    return EngineResult("vllm-cpu", res["times"], res["output_tokens"][0], work.input_tokens, res["startup_s"],
                        res["version"], notes)


def print_report(model_dir: Path, work: Workload, hw: dict[str, object], results: list[EngineResult],
                 errors: dict[str, str], args: argparse.Namespace) -> None:
    """The workload, the hardware, and one line per engine with the ratio pagedllm/peer."""
    lens = sorted(len(p) for p in work.prompts)
    print("\n=== offline CPU benchmark ===")
    print(f"model     : {model_dir}\n            {model_size(model_dir)}, dtype {args.dtype}")
    print(f"workload  : {len(work.prompts)} prompts, input tokens uniform in [{args.min_input}, {args.max_input}] "
          f"(seed {args.seed}): min {lens[0]} / median {statistics.median(lens):.0f} / mean "
          f"{statistics.mean(lens):.1f} / max {lens[-1]}, {work.input_tokens} in all; {work.output_len} new tokens "
          f"each ({work.output_len * len(work.prompts)} in all), greedy, EOS ignored; "
          f"{args.repeat} timed run(s) per engine after one warm-up, median reported")
    if args.speculative_config:
        print(f"speculative: {json.dumps(args.speculative_config)} (transformers: its prompt lookup, batch 1)")
    if args.lora_path:
        print(f"LoRA      : every prompt with {args.lora_path}, adapter ids 1..{args.max_loras} in turn "
              f"(transformers: PEFT, unmerged)")
    load = hw.get("loadavg")
    load_text = " / ".join(f"{x:.2f}" for x in load) if load else "?"
    print(f"hardware  : {hw['cpu']}, {hw['cores']} cores ({hw['usable_cores']} usable), {hw.get('mem_gib', '?')} GiB "
          f"RAM, flags [{hw['flags']}]; load average at start {load_text}")
    print(f"software  : python {hw['python']}, torch {hw['torch']} ({hw['torch_threads']} threads)"
          + (f", {hw['openblas_env']}" if hw["openblas_env"] else ""))
    if load and load[0] > 0.5 * int(hw["usable_cores"] or 1):
        print("WARNING   : the machine was busy when this started (load average above); timings are noisy")
    print()
    header = (f"{'engine':<13} {'version':<14} {'startup s':>9} {'wall s':>9} {'min-max s':>15} {'out tok/s':>10} "
              f"{'total tok/s':>11} {'pagedllm/peer':>13}")
    print(header)
    print("-" * len(header))
    ours = next((r for r in results if r.name == "pagedllm"), None)
    for r in results:
        ratio = "-" if ours is None or r is ours else f"{ours.output_tps / r.output_tps:.2f}x"
        spread = f"{min(r.times):.2f}-{max(r.times):.2f}"
        print(f"{r.name:<13} {r.version[:14]:<14} {r.startup_s:>9.1f} {r.median_s:>9.2f} {spread:>15} "
              f"{r.output_tps:>10.1f} {r.total_tps:>11.1f} {ratio:>13}")
    for r in results:
        print(f"  {r.name}: " + ", ".join(f"{k}={v}" for k, v in r.notes.items()))
    for name, err in errors.items():
        print(f"{name:<13} FAILED: {err}")
    print("ratio = pagedllm output tok/s / peer output tok/s (> 1: pagedllm faster); wall s = median; "
          "startup = load time, not counted")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when an engine failed."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hw = hardware()
    model_dir = resolve_model(args)
    work = make_workload(model_dir, args)
    engines: list[tuple[str, Callable[[Path, Workload, argparse.Namespace], EngineResult]]] = []
    if not args.skip_pagedllm:
        engines.append(("pagedllm", run_pagedllm))
    if not args.skip_hf:
        engines.append(("transformers", run_transformers))
    if args.vllm_python:
        engines.append(("vllm-cpu", run_vllm))
    results: list[EngineResult] = []
    errors: dict[str, str] = {}
    for name, runner in engines:
        print(f"running {name} ...", flush=True)
        try:
            results.append(runner(model_dir, work, args))
            gc.collect()  # drop the engine's weights and KV cache before the next one loads
        except Exception as exc:  # report the others anyway
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"  {name} failed: {errors[name]}", file=sys.stderr, flush=True)
        else:
            r = results[-1]
            print(f"  {name}: median {r.median_s:.2f} s, {r.output_tps:.1f} output tok/s", flush=True)
    print_report(model_dir, work, hw, results, errors, args)
    if args.json:
        payload = {"model": str(model_dir), "model_size": model_size(model_dir), "args": vars(args) | {
            "cache_dir": str(args.cache_dir), "json": str(args.json)}, "hardware": hw,
            "workload": {"num_prompts": len(work.prompts), "input_lens": [len(p) for p in work.prompts],
                         "output_len": work.output_len},
            "results": [asdict(r) | {"median_s": r.median_s, "output_tps": r.output_tps, "total_tps": r.total_tps}
                        for r in results], "errors": errors}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
