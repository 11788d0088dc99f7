#!/usr/bin/env python3
"""Train pagedllm's built-in demo model: a tiny Llama trained on the Python standard library.

The result is an ordinary Hugging Face checkpoint directory (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``) that both ``transformers``
and pagedllm load, so pagedllm works out of the box without a model hub.

Everything is derived from data that ships with Python itself (the ``*.py`` sources of the standard
library), every random choice is seeded, and training runs on a single CPU thread.

Example (the command used for ``pagedllm/demo/checkpoint``)::

    python scripts/train_demo_model.py --out pagedllm/demo/checkpoint

By default the learning-rate schedule follows the wall-clock budget (``--minutes``), so the number of
steps depends on the machine. Pass ``--steps N`` to make the run step-based and bit-for-bit
reproducible on the same software stack.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

EOS_TOKEN = "<|endoftext|>"

#: Directories of the standard library that are skipped: third-party code, test suites, and
#: data-like modules (codec tables, pydoc's topic dump) and GUI code that teach the model little about Python.
EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "encodings",
        "pydoc_data",
        "lib2to3",
        # GUI code (Tk calls) is a large, repetitive share of the standard library that skews the samples.
        "tkinter",
        "idlelib",
        "turtledemo",
    }
)

#: Renders each message as ``# role: content`` on its own line; with ``add_generation_prompt`` it ends
#: with ``# assistant:`` so the model continues as the assistant.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '# ' + message['role'] + ': ' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '# assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class Corpus:
    """The training text: one string per source file, split into training and validation files."""

    train: list[str]
    val: list[str]
    n_files: int
    n_bytes: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("pagedllm/demo/checkpoint"), help="output directory")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget of the training loop")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="fixed number of optimizer steps (overrides --minutes; fully reproducible)",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="torch device to train on (the shipped model used cpu)")
    # data / tokenizer
    p.add_argument(
        "--stdlib", type=Path, default=None, help="standard library directory (default: sysconfig)"
    )
    p.add_argument("--max-corpus-mb", type=float, default=16.0, help="cap on the corpus size (MB of source)")
    p.add_argument(
        "--val-fraction", type=float, default=0.03, help="fraction of files held out for validation"
    )
    p.add_argument(
        "--exclude-dirs",
        default=",".join(sorted(EXCLUDED_DIRS)),
        help="comma-separated directory names of the standard library to skip",
    )
    p.add_argument("--vocab-size", type=int, default=4096)
    # model
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--max-position-embeddings", type=int, default=1024)
    # optimisation
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final LR as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument(
        "--autocast",
        choices=["bfloat16", "none"],
        default="bfloat16",
        help="CPU autocast dtype for forward/backward (weights and optimizer state stay float32)",
    )
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches for the final eval")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def collect_corpus(
    stdlib: Path,
    max_bytes: int,
    val_fraction: float,
    seed: int,
    excluded_dirs: frozenset[str] = EXCLUDED_DIRS,
) -> Corpus:
    """Read a deterministic subset of the standard library's ``*.py`` files.

    Files are listed in sorted order, filtered (no directory of their path in ``excluded_dirs``), shuffled
    with a seeded RNG, and taken until ``max_bytes`` is reached; the last ``val_fraction`` of them is held
    out for validation.
    """
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if set(rel.parts[:-1]) & excluded_dirs:
            continue
        files.append(path)
    random.Random(seed).shuffle(files)
    texts: list[str] = []
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n").replace("\t", "    ")
        if not text.strip() or EOS_TOKEN in text:
            continue
        if total + len(text.encode()) > max_bytes:
            break
        texts.append(text)
        total += len(text.encode())
    n_val = max(1, int(len(texts) * val_fraction))
    return Corpus(train=texts[:-n_val], val=texts[-n_val:], n_files=len(texts), n_bytes=total)


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer and wrap it for ``transformers``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_corpus(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """Tokenize files and concatenate them into one stream, each file followed by ``<|endoftext|>``."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Create the (randomly initialised, float32) Llama model."""
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="silu",
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config)


def random_batches(
    data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """Yield endless batches of random ``seq_len + 1`` token windows from ``data``."""
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        yield data[starts[:, None] + offsets]


def lr_at(progress: float, step: int, args: argparse.Namespace) -> float:
    """Linear warmup for ``warmup_steps`` steps, then cosine decay to ``min_lr_ratio * lr`` at progress 1."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def lm_loss(model: LlamaForCausalLM, batch: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """Next-token cross-entropy of a ``(B, T + 1)`` batch: positions ``0..T-1`` predict ``1..T``."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1)
    )


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, data: torch.Tensor, args: argparse.Namespace) -> float:
    """Mean loss on ``eval_batches`` fixed (seeded) validation batches."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = random_batches(data, args.batch_size, args.seq_len, gen)
    losses = []
    for _ in range(args.eval_batches):
        batch = next(batches).to(args.device)
        losses.append(lm_loss(model, batch).item())
    model.train()
    return sum(losses) / len(losses)


def train(
    model: LlamaForCausalLM, data: torch.Tensor, args: argparse.Namespace
) -> list[tuple[int, int, float, float]]:
    """Train ``model`` in place; return the loss curve as ``(step, tokens, loss, elapsed_s)`` rows."""
    gen = torch.Generator().manual_seed(args.seed)
    batches = random_batches(data, args.batch_size, args.seq_len, gen)
    opt = make_optimizer(model, args)
    budget_s = args.minutes * 60.0
    curve: list[tuple[int, int, float, float]] = []
    model.train()
    t0 = time.perf_counter()
    step = tokens = 0
    running = 0.0
    n_running = 0
    while True:
        elapsed = time.perf_counter() - t0
        progress = step / args.steps if args.steps else elapsed / budget_s
        if progress >= 1.0:
            break
        lr = lr_at(progress, step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(batches).to(args.device)
        inputs = batch[:, :-1]
        loss = lm_loss(model, batch, autocast=args.autocast == "bfloat16")
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tokens += inputs.numel()
        running += loss.item()
        n_running += 1
        if step % args.log_every == 0 or step == 1:
            elapsed = time.perf_counter() - t0
            avg = running / n_running
            curve.append((step, tokens, avg, elapsed))
            print(
                f"step {step:6d}  tokens {tokens:10d}  loss {avg:.4f}  lr {lr:.2e}  {elapsed:7.1f}s  "
                f"{tokens / max(elapsed, 1e-9):7.0f} tok/s",
                flush=True,
            )
            running, n_running = 0.0, 0
    if n_running:
        curve.append((step, tokens, running / n_running, time.perf_counter() - t0))
    return curve


def write_loss_curve(path: Path, curve: Sequence[tuple[int, int, float, float]]) -> None:
    """Write the loss curve as a TSV file with a header row."""
    lines = ["step\ttokens\tloss\telapsed_s"]
    lines += [f"{s}\t{t}\t{loss:.4f}\t{e:.1f}" for s, t, loss, e in curve]
    path.write_text("\n".join(lines) + "\n")


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save model (bfloat16 safetensors), generation config and tokenizer into ``out``."""
    eos = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False
    )
    model.to("cpu", torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def greedy_sample(path: Path, prompt: str, max_new_tokens: int = 64) -> str:
    """Reload the checkpoint from disk (float32) and greedily complete ``prompt``."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
    return tok.decode(out[0], skip_special_tokens=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whole pipeline: corpus, tokenizer, model, training, checkpoint, sample."""
    args = parse_args(argv)
    # Keep the Rust tokenizer (rayon, read lazily on first use) and torch on `--threads` cores:
    # the machine is shared.
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t_start = time.perf_counter()

    stdlib = args.stdlib or Path(sysconfig.get_paths()["stdlib"])
    excluded = frozenset(d for d in args.exclude_dirs.split(",") if d)
    corpus = collect_corpus(stdlib, int(args.max_corpus_mb * 1e6), args.val_fraction, args.seed, excluded)
    print(f"corpus: {corpus.n_files} files, {corpus.n_bytes / 1e6:.2f} MB from {stdlib}", flush=True)

    tokenizer = train_tokenizer(corpus.train, args.vocab_size)
    train_ids = encode_corpus(tokenizer, corpus.train)
    val_ids = encode_corpus(tokenizer, corpus.val)
    print(
        f"tokenizer: vocab {len(tokenizer)}; train {len(train_ids)} tokens, val {len(val_ids)} tokens "
        f"({corpus.n_bytes / (len(train_ids) + len(val_ids)):.2f} bytes/token); "
        f"{time.perf_counter() - t_start:.0f}s",
        flush=True,
    )

    seed_everything(args.seed)
    model = build_model(args, tokenizer).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    t_train = time.perf_counter()
    curve = train(model, train_ids, args)
    train_s = time.perf_counter() - t_train
    val_loss = evaluate(model, val_ids, args)
    print(
        f"training: {curve[-1][0]} steps, {curve[-1][1]} tokens, {train_s:.0f}s; "
        f"final train loss {curve[-1][2]:.4f}, val loss {val_loss:.4f}",
        flush=True,
    )

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    save_checkpoint(model, tokenizer, args.out)
    write_loss_curve(args.out / "loss_curve.tsv", curve)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"saved {args.out} ({size / 1e6:.2f} MB): {sorted(f.name for f in args.out.iterdir())}", flush=True)

    summary = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "steps": curve[-1][0],
        "tokens": curve[-1][1],
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "final_train_loss": round(curve[-1][2], 4),
        "val_loss": round(val_loss, 4),
        "parameters": n_params,
        "checkpoint_bytes": size,
    }
    print("summary: " + json.dumps(summary), flush=True)
    print("sample (greedy, from the saved checkpoint):")
    print(greedy_sample(args.out, "def fibonacci(n):"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
