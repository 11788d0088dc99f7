"""Sampling on the device: logit biases, allowed tokens and structured outputs' grammars, penalties,
temperature, top-k/top-p/min-p, per-request seeds, logprobs.

One call per step over all sampled requests; the only host transfer is the final token ids (and the
logprobs when asked), never one sync per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pagedllm.core.request import Request
from pagedllm.core.sampling_params import blocked_bad_words
from pagedllm.core.structured_output import disallowed_by_bitmask

ARGMAX_CHUNKS = 128
""":func:`row_argmax` cuts a wide row into this many chunks, reduced in parallel."""


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for ``x: [num_rows, vocab]``: int64 ``[num_rows]``, the first maximal index (a NaN
    counts as the maximum), as torch returns it.

    With few rows and a wide vocabulary torch reduces each row on one SM (28 µs for one row of 128k
    logits on an H200, in every batch-1 decode step); here such rows are cut into :data:`ARGMAX_CHUNKS`
    chunks reduced in parallel, then the chunk maxima (about 10 µs, in five small kernels).
    """
    num_rows, vocab = x.shape
    if num_rows > 16 or vocab < 128 * ARGMAX_CHUNKS:
        return x.argmax(dim=-1)
    chunk = -(-vocab // ARGMAX_CHUNKS)
    if chunk * ARGMAX_CHUNKS != vocab:  # padding never wins: -inf, after every real index
        x = torch.nn.functional.pad(x, (0, chunk * ARGMAX_CHUNKS - vocab), value=float("-inf"))
    values, index = x.view(num_rows, ARGMAX_CHUNKS, chunk).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)  # the first chunk holding the maximum
    return (best * chunk + index.gather(1, best)).squeeze(1)


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters of one step as device tensors (row = one request to sample)."""

    temperature: torch.Tensor  # [R] float32, 1.0 for greedy rows (unused there)
    is_greedy: torch.Tensor  # [R] bool
    top_k: torch.Tensor | None  # [R] int64 (vocab size = off), None if no row uses it
    top_p: torch.Tensor | None  # [R] float32, None if no row uses it
    min_p: torch.Tensor | None  # [R] float32, None if no row uses it
    presence_penalty: torch.Tensor | None  # [R]
    frequency_penalty: torch.Tensor | None  # [R]
    repetition_penalty: torch.Tensor | None  # [R]
    output_counts: torch.Tensor | None  # [R, vocab] float32 counts of generated tokens
    seen_mask: torch.Tensor | None  # [R, vocab] bool: token in prompt or output (repetition penalty)
    blocked_tokens: list[tuple[int, list[int]]]  # (row, token ids) masked out (min_tokens, bad_words)
    logit_biases: list[tuple[int, torch.Tensor, torch.Tensor]]  # (row, token ids [k] int64, biases [k] float32)
    disallowed: list[tuple[int, torch.Tensor]]  # (row, [vocab] bool: True where allowed_token_ids leaves it out)
    grammar_rows: torch.Tensor | None  # [G] int64: rows whose structured output constrains them
    grammar_bitmask: torch.Tensor | None  # [G, ceil(vocab / 32)] int32: the tokens their grammars allow next
    generators: list[torch.Generator | None]  # per-row generator of seeded requests
    all_greedy: bool
    max_num_logprobs: int | None


@dataclass(slots=True)
class SamplerOutput:
    """Sampled tokens and, when asked, logprobs of the raw model distribution (host tensors).

    ``device_token_ids: [R] int64`` stays on the device (the next step may read its input tokens there).
    A sampler called with ``sync=False`` leaves ``token_ids`` empty until :meth:`resolve`, which waits
    for the tokens' copy to the host only, not for work queued after it.
    """

    token_ids: list[int]
    sampled_logprobs: torch.Tensor | None = None  # [R] float32
    sampled_ranks: torch.Tensor | None = None  # [R] int64, 1 = most likely
    top_token_ids: torch.Tensor | None = None  # [R, k] int64
    top_logprobs: torch.Tensor | None = None  # [R, k] float32
    device_token_ids: torch.Tensor | None = None  # [R] int64, on the logits' device
    _host_token_ids: torch.Tensor | None = field(default=None, init=False, repr=False)  # [R] int64, being copied
    _copied: torch.Event | None = field(default=None, init=False, repr=False)  # recorded after that copy

    def start_copy(self) -> None:
        """Queue the copy of ``device_token_ids`` to the host and mark its end (no wait)."""
        assert self.device_token_ids is not None
        ids = self.device_token_ids
        self._host_token_ids = ids.to("cpu", non_blocking=True)  # into pinned memory on an accelerator
        if ids.device.type != "cpu":
            self._copied = torch.Event(device=ids.device)
            self._copied.record()

    def resolve(self) -> list[int]:
        """Return ``token_ids``, first waiting for the copy :meth:`start_copy` queued if needed."""
        if self._host_token_ids is not None:
            if self._copied is not None:
                self._copied.synchronize()
            self.token_ids = self._host_token_ids.tolist()
            self._host_token_ids = self._copied = None
        return self.token_ids


class Sampler:
    """Turns logits ``[num_sampled, vocab]`` into tokens, keeping one generator per seeded request."""

    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self._request_generators: dict[str, torch.Generator] = {}
        # per row of the last step sampled randomly: its seeded generator's state after the row's draw
        self._states_after: dict[int, torch.Tensor] = {}
        # device tensors built once per request from its logit_bias / allowed_token_ids
        self._request_biases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._request_disallowed: dict[str, torch.Tensor] = {}

    def forget(self, request_id: str) -> None:
        """Drop what was kept for a finished request (its generator, bias and allowed-token tensors)."""
        self._request_generators.pop(request_id, None)
        self._request_biases.pop(request_id, None)
        self._request_disallowed.pop(request_id, None)

    def keep_draws(self, request_id: str, row: int) -> None:
        """Set ``request_id``'s seeded generator back to where it stood after the last step's row ``row``: called
        once a request's drafts are checked, with its last kept row, so the draws of its rejected positions are
        drawn again for the tokens that take their place (as if the step had sampled only the kept rows). No-op
        for a request without a generator or a row that drew none."""
        generator = self._request_generators.get(request_id)
        state = self._states_after.get(row)
        if generator is not None and state is not None:
            generator.set_state(state)

    def make_batch(self, requests: list[Request], vocab_size: int,
                   drafts_before: list[list[int]] | None = None) -> SamplingBatch:
        """Build the step's :class:`SamplingBatch` from the requests to sample, in row order.

        ``drafts_before`` (speculative decoding): per row, the draft tokens that row's position comes after
        (a request with drafts has a row per position): penalties, ``min_tokens`` and bad words count them as
        output, as they will be if accepted."""
        device = self.device
        params = [r.sampling_params for r in requests]
        num_rows = len(requests)
        before = drafts_before or [[]] * num_rows

        def outputs(row: int) -> list[int]:
            return requests[row].output_token_ids + before[row] if before[row] else requests[row].output_token_ids

        def to_device(values: list, dtype: torch.dtype) -> torch.Tensor:
            # Built on the host, then copied without waiting: a plain torch.tensor(..., device=...) would
            # block until the device has finished the step's forward.
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        def column(values: list[float], off: float, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            if all(v == off for v in values):
                return None
            return to_device(values, dtype)

        greedy = [p.is_greedy for p in params]
        top_k = column([float(min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size) for p in params],
                       float(vocab_size))
        presence = column([p.presence_penalty for p in params], 0.0)
        frequency = column([p.frequency_penalty for p in params], 0.0)
        repetition = column([p.repetition_penalty for p in params], 1.0)
        output_counts = seen_mask = None
        if presence is not None or frequency is not None:
            output_counts = torch.zeros(num_rows, vocab_size, device=device)
            for row in range(num_rows):
                if tokens := outputs(row):
                    ids = torch.tensor(tokens, device=device)
                    output_counts[row].scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
        if repetition is not None:
            seen_mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)
            for row, r in enumerate(requests):
                seen_mask[row, torch.tensor(r.all_token_ids + before[row], device=device)] = True
        blocked = []
        for row, r in enumerate(requests):
            p = r.sampling_params
            stops: set[int] = set()
            if r.num_output_tokens + len(before[row]) < p.min_tokens:
                stops = set(p.stop_token_ids or [])
                if not p.ignore_eos:
                    stops |= set(r.eos_token_ids)
            if p.bad_words_token_ids:
                stops.update(blocked_bad_words(p.bad_words_token_ids, outputs(row)))
            if stops:
                blocked.append((row, sorted(stops)))
        generators: list[torch.Generator | None] = []
        for r in requests:
            seed = r.sampling_params.seed
            if seed is None or r.sampling_params.is_greedy:
                generators.append(None)
                continue
            if r.request_id not in self._request_generators:
                g = torch.Generator(device=device)
                g.manual_seed(seed)
                self._request_generators[r.request_id] = g
            generators.append(self._request_generators[r.request_id])
        biases, disallowed, grammar_rows, grammar_bitmask = self._constraints(requests, vocab_size, to_device,
                                                                              before)
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingBatch(
            temperature=to_device([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                                  torch.float32),
            is_greedy=to_device(greedy, torch.bool),
            top_k=None if top_k is None else top_k.long(),
            top_p=column([p.top_p for p in params], 1.0),
            min_p=column([p.min_p for p in params], 0.0),
            presence_penalty=presence,
            frequency_penalty=frequency,
            repetition_penalty=repetition,
            output_counts=output_counts,
            seen_mask=seen_mask,
            blocked_tokens=blocked,
            logit_biases=biases,
            disallowed=disallowed,
            grammar_rows=grammar_rows,
            grammar_bitmask=grammar_bitmask,
            generators=generators,
            all_greedy=all(greedy),
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
        )

    def _constraints(self, requests: list[Request], vocab_size: int,
                     to_device: Callable[[list, torch.dtype], torch.Tensor], before: list[list[int]]) -> tuple[
                         list[tuple[int, torch.Tensor, torch.Tensor]], list[tuple[int, torch.Tensor]],
                         torch.Tensor | None, torch.Tensor | None]:
        """The rows' logit biases and allowed-token masks (device tensors built once per request and kept
        until :meth:`forget`), and the rows a structured output constrains with their grammars' bitmask (filled
        on the host each step, then copied; a request's draft rows, after ``before[row]``, each from its
        grammar's state after those drafts): :class:`SamplingBatch`'s ``logit_biases``, ``disallowed``,
        ``grammar_rows`` and ``grammar_bitmask``."""
        biases, disallowed, constrained = [], [], []
        for row, r in enumerate(requests):
            p = r.sampling_params
            if p.logit_bias:
                if r.request_id not in self._request_biases:
                    self._request_biases[r.request_id] = (to_device(list(p.logit_bias), torch.int64),
                                                          to_device(list(p.logit_bias.values()), torch.float32))
                biases.append((row, *self._request_biases[r.request_id]))
            if p.allowed_token_ids is not None:
                if r.request_id not in self._request_disallowed:
                    mask = torch.ones(vocab_size, dtype=torch.bool)
                    mask[p.allowed_token_ids] = False
                    self._request_disallowed[r.request_id] = mask.to(self.device, non_blocking=True)
                disallowed.append((row, self._request_disallowed[r.request_id]))
            if r.structured is not None and r.structured.active:
                constrained.append(row)
        if not constrained:
            return biases, disallowed, None, None
        bitmask = torch.full((len(constrained), -(-vocab_size // 32)), -1, dtype=torch.int32)
        for i, row in enumerate(constrained):
            requests[row].structured.fill_bitmask(bitmask, i, before[row])  # type: ignore[union-attr]
        return biases, disallowed, to_device(constrained, torch.int64), bitmask.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, sync: bool = True) -> SamplerOutput:
        """Sample one token per row of ``logits: [num_rows, vocab]``.

        ``sync=False``: return once the sampling and the tokens' copy to the host are queued; read them
        with :meth:`SamplerOutput.resolve` (logprobs, when asked, are still read at once).
        """
        out = SamplerOutput(token_ids=[])
        self._states_after.clear()  # this step's rows only (``keep_draws``)
        if (batch.all_greedy and batch.max_num_logprobs is None and not batch.blocked_tokens
                and not batch.logit_biases and not batch.disallowed and batch.grammar_rows is None
                and batch.repetition_penalty is None and batch.output_counts is None):
            # Plain greedy: argmax in the logits' own dtype (upcasting changes no value, so no index).
            return self._finish(out, row_argmax(logits), sync)
        given = logits
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_num_logprobs is not None else None
        if batch.logit_biases or batch.disallowed or batch.grammar_rows is not None or batch.blocked_tokens:
            if logits is given:  # never write into the caller's tensor (.float() copied any other dtype)
                logits = logits.clone()
            for row, token_ids, values in batch.logit_biases:
                logits[row].index_add_(0, token_ids, values)
            for row, mask in batch.disallowed:
                logits[row].masked_fill_(mask, float("-inf"))
            if batch.grammar_rows is not None and batch.grammar_bitmask is not None:
                masked = logits.index_select(0, batch.grammar_rows).masked_fill_(
                    disallowed_by_bitmask(batch.grammar_bitmask, logits.shape[-1]), float("-inf"))
                logits.index_copy_(0, batch.grammar_rows, masked)
            # min_tokens and bad_words: -inf before the penalties is -inf after them (they scale or shift)
            for row, token_ids in batch.blocked_tokens:
                logits[row, token_ids] = float("-inf")
        logits = self._apply_penalties(logits, batch)
        greedy_ids = row_argmax(logits)
        if batch.all_greedy:
            sampled = greedy_ids
        else:
            sampled = torch.where(batch.is_greedy, greedy_ids, self._sample(logits, batch))
        if raw_logprobs is not None:
            assert batch.max_num_logprobs is not None
            sampled_lp = raw_logprobs.gather(1, sampled[:, None]).squeeze(1)
            out.sampled_logprobs = sampled_lp.cpu()
            out.sampled_ranks = ((raw_logprobs > sampled_lp[:, None]).sum(-1) + 1).cpu()
            if batch.max_num_logprobs > 0:
                top = raw_logprobs.topk(batch.max_num_logprobs, dim=-1)
                out.top_logprobs, out.top_token_ids = top.values.cpu(), top.indices.cpu()
        return self._finish(out, sampled, sync)

    @staticmethod
    def _finish(out: SamplerOutput, sampled: torch.Tensor, sync: bool) -> SamplerOutput:
        out.device_token_ids = sampled
        if sync:
            out.token_ids = sampled.tolist()
        else:
            out.start_copy()
        return out

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if batch.repetition_penalty is not None and batch.seen_mask is not None:
            penalty = batch.repetition_penalty[:, None].expand_as(logits)
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(batch.seen_mask, penalized, logits)
        if batch.output_counts is not None:
            if batch.frequency_penalty is not None:
                logits = logits - batch.frequency_penalty[:, None] * batch.output_counts
            if batch.presence_penalty is not None:
                logits = logits - batch.presence_penalty[:, None] * (batch.output_counts > 0).float()
        return logits

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits / batch.temperature[:, None]
        if batch.top_k is not None:
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (batch.top_k - 1).clamp(min=0)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if batch.min_p is not None:
            threshold = probs.max(dim=-1, keepdim=True).values * batch.min_p[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        if batch.top_p is not None:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            cumulative = sorted_probs.cumsum(dim=-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            remove_sorted = (cumulative - sorted_probs) >= batch.top_p[:, None]
            remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
            probs = probs.masked_fill(remove, 0.0)
        # Gumbel-style race: argmax(p / q) with q ~ Exp(1) samples from p; seeded rows use their own stream
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, generator in enumerate(batch.generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
                self._states_after[row] = generator.get_state()  # host bookkeeping (CUDA: seed and offset)
        return (probs / noise).argmax(dim=-1)
