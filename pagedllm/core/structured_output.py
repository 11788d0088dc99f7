"""Structured outputs (``SamplingParams.structured_outputs``) through xgrammar, as vLLM's default backend.

The engine compiles a request's structure into a grammar once (compiled grammars are cached by their spec)
and gives each of its completions a matcher. Before a step samples, the sampler asks every such matcher for
the tokens its grammar allows next (a bitmask) and masks the others out of the logits, on the device; after
the step, the output processor advances the matcher by the sampled token and finishes the completion once the
grammar is complete. xgrammar is imported only when a request asks for structure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from pagedllm.core.sampling_params import StructuredOutputsParams

INSTALL_HINT = "structured outputs need xgrammar: pip install 'pagedllm[structured]' (or pip install xgrammar)"


class GrammarMatcher:
    """One completion's place in its grammar (an ``xgrammar.GrammarMatcher``). With ``waits_for`` (a reasoning
    model's end-of-thinking tag) the grammar is not :attr:`active` until the completion's text holds that tag:
    the thinking before it is free, the answer after it follows the grammar."""

    def __init__(self, matcher: Any, waits_for: str | None = None) -> None:
        self._matcher = matcher
        self.waits_for = waits_for

    @property
    def active(self) -> bool:
        """Whether the grammar applies to the next token (the sampler masks it, :meth:`accept` takes it)."""
        return self.waits_for is None

    def observe(self, text: str) -> None:
        """Called after each token while not :attr:`active`, with the completion's text so far: once it holds
        the tag waited for, the grammar applies from the next token on."""
        if self.waits_for is not None and self.waits_for in text:
            self.waits_for = None

    def fill_bitmask(self, bitmask: torch.Tensor, row: int, after: list[int] | None = None) -> None:
        """Write the tokens allowed next into row ``row`` of ``bitmask`` (``[rows, ceil(vocab / 32)]`` int32 on
        the host; bit ``t % 32`` of word ``t // 32`` set for an allowed token ``t``). With ``after`` (the draft
        tokens before a speculative row, which :meth:`valid_drafts` vouched for): the tokens allowed once those
        are taken; the matcher is left where it was."""
        for token_id in after or ():
            if not self._matcher.accept_token(token_id):
                raise RuntimeError(f"draft token {token_id} breaks the grammar it was checked against")
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if after:
            self._matcher.rollback(len(after))

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled ``token_id``; False if the grammar does not allow it."""
        return bool(self._matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        """True once the grammar is complete and its end (a stop token) was accepted."""
        return bool(self._matcher.is_terminated())

    def valid_drafts(self, drafts: list[int]) -> list[int]:
        """The longest prefix of ``drafts`` (speculative decoding) the grammar allows from here, short of a token
        that would complete it (the completion ends there: no position after it to sample); the matcher is
        left where it was. Called when drafts are proposed, while :attr:`active`."""
        taken = 0
        for token_id in drafts:
            if not self._matcher.accept_token(token_id):
                break
            if self._matcher.is_terminated():  # it completes the grammar: not a draft
                self._matcher.rollback(1)
                break
            taken += 1
        if taken:
            self._matcher.rollback(taken)
        return drafts[:taken]


class StructuredOutputs:
    """The engine's grammar compiler for one tokenizer: built on the first request that asks for structure."""

    def __init__(self, tokenizer: object, vocab_size: int, stop_token_ids: list[int] | None = None) -> None:
        """``stop_token_ids``: the tokens that end a completion (the engine's EOS ids: generation_config's and the
        tokenizer's), the only ones a complete structure allows next."""
        try:
            import xgrammar
        except ImportError as exc:
            raise ValueError(f"SamplingParams.structured_outputs: {INSTALL_HINT}") from exc
        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=stop_token_ids or None)
        self._compiler = xgrammar.GrammarCompiler(info)
        self._compiled: dict[tuple[str, str, bool], Any] = {}

    def compile(self, params: StructuredOutputsParams) -> Callable[[], GrammarMatcher]:
        """Compile ``params`` (cached by its spec); returns a factory of fresh matchers, one per completion
        (active from the start). Raises ValueError naming the field for a spec xgrammar rejects."""
        key = params.key
        if key not in self._compiled:
            try:
                self._compiled[key] = self._compile(*key)
            except (RuntimeError, ValueError) as exc:
                raise ValueError(f"SamplingParams.structured_outputs is invalid ({key[0]}): {exc}") from exc
        grammar = self._compiled[key]
        return lambda: GrammarMatcher(self._xgr.GrammarMatcher(grammar))

    def _compile(self, kind: str, spec: str, no_whitespace: bool) -> Any:
        compiler = self._compiler
        if kind == "json":
            return compiler.compile_json_schema(spec, any_whitespace=not no_whitespace)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=not no_whitespace)
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "choice":  # one string literal per choice, escaped as JSON escapes them (EBNF's escapes)
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in json.loads(spec)))
        return compiler.compile_grammar(spec)


def disallowed_by_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``bitmask: [rows, words]`` int32 (on the logits' device) -> ``[rows, vocab_size]`` bool, True where the
    token is not allowed. Plain tensor ops, so every backend's device runs it."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]: bit j of word w is token 32 w + j
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size] == 0
