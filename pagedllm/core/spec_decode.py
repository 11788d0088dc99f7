"""Speculative decoding with n-gram prompt lookup (vLLM's ``speculative_config={"method": "ngram", ...}``).

After each step, a decoding request whose last ``n`` tokens (``prompt_lookup_max`` down to ``prompt_lookup_min``)
occurred earlier in its prompt or output proposes the tokens that followed them there: up to
``num_speculative_tokens`` drafts. The next step runs its last token and the drafts at once, so the model gives
a distribution at every one of those positions, and samples each position as usual. Draft ``i`` is accepted
while the token sampled at its position equals it; the first token sampled that differs (or, with all drafts
accepted, the one after the last) is the step's own new token. For a draft that is one fixed token, this is
exactly rejection sampling: the draft survives with its probability ``p(d)``, and a rejected position yields a
token drawn from ``p`` without ``d``, renormalized. Greedy or not, the output has the distribution it has
without drafts; a step just yields up to ``1 + num_speculative_tokens`` tokens per request.

A seeded request's generator draws once per row; once its drafts are checked it is set back to where it stood
after the last row kept (``Sampler.keep_draws``), so each of its tokens is drawn with the same random numbers as
without drafts and its output is the same token for token. A structured output's drafts are cut
at the first token its grammar does not allow (``GrammarMatcher.valid_drafts``), and each position is sampled
under its grammar's state after the drafts before it (``GrammarMatcher.fill_bitmask``'s ``after``). Penalties,
``min_tokens`` and bad words count a position's earlier drafts as output, as they will be if accepted
(``Sampler.make_batch``'s ``drafts_before``). Logprobs are those of each position's own distribution, as without
drafts. With tensor parallelism every rank runs the same
rows; rank 0 samples and checks them. With decode graphs, a step of decodes with drafts replays one, each token a
decode row (``ModelRunner.execute``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pagedllm.core.request import Request


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """``method`` ``"ngram"``; each step proposes up to ``num_speculative_tokens`` drafts per request, from the
    longest of its last ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens found earlier in its context."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    method: str = "ngram"

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative_config method must be 'ngram' (prompt lookup), got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"speculative_config num_speculative_tokens must be >= 1, got "
                             f"{self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

    @staticmethod
    def from_dict(values: dict[str, Any]) -> SpeculativeConfig:
        """Read vLLM's dict (``--speculative-config`` JSON); a ValueError names an unknown or missing key."""
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown} (this engine takes {sorted(known)})")
        if "num_speculative_tokens" not in values:
            raise ValueError("speculative_config needs num_speculative_tokens")
        return SpeculativeConfig(**values)


def propose_ngram(tokens: list[int] | np.ndarray, num_drafts: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``num_drafts`` tokens that followed the most recent earlier occurrence of ``tokens``' last ``n``
    tokens that has that many after it (else the most recent one), for the largest ``n`` in ``max_n .. min_n``
    that occurs; [] when none does. Called once per step
    for each request that may take drafts: the earlier places of the last token are found in one pass, and
    only those are checked for longer matches."""
    length = len(tokens)
    if length < min_n + 1 or num_drafts < 1:
        return []
    array = np.asarray(tokens, dtype=np.int64)
    ends = np.flatnonzero(array[: length - 1] == array[-1])  # earlier places of the last token (tokens follow)
    matched = [ends]  # matched[k - 1]: the places where the last k tokens occur, ending there
    for k in range(1, min(max_n, length - 1)):
        previous = matched[-1]
        previous = previous[previous >= k]
        matched.append(previous[array[previous - k] == array[length - 1 - k]])
    for n in range(len(matched), min_n - 1, -1):
        places = matched[n - 1]
        if len(places):  # the latest place with num_drafts tokens after it, else the latest (a short loop)
            whole = places[places < length - num_drafts]
            start = int(whole[-1] if len(whole) else places[-1]) + 1
            return array[start : start + num_drafts].tolist()
    return []


def context_tokens(request: Request) -> np.ndarray:
    """``request.all_token_ids`` as an int64 array, kept on the request and extended by the tokens appended since
    the last call (a step adds a few), so a long context is not converted again at every step."""
    tokens = request.all_token_ids
    buffer, filled = request.spec_context
    if buffer is None or len(buffer) < len(tokens):
        grown = np.empty(max(2 * len(tokens), 256), dtype=np.int64)
        if buffer is not None:
            grown[:filled] = buffer[:filled]
        buffer = grown
    if filled < len(tokens):
        buffer[filled : len(tokens)] = tokens[filled:]
    request.spec_context = (buffer, len(tokens))
    return buffer[: len(tokens)]


def takes_drafts(request: Request) -> bool:
    """Whether ``request``'s positions can be sampled in one step (see the module docstring): not an embedding,
    and a structured output only while its grammar applies (not while a reasoning model thinks before it: the
    drafts could end the thinking, after which the grammar would apply)."""
    structured = request.structured
    return request.pooling is None and (structured is None or structured.active)


def accepted_drafts(drafts: list[int], sampled: list[int]) -> int:
    """How many of ``drafts`` the tokens ``sampled`` at their positions accept: the length of their common
    prefix (``sampled`` has one more token than ``drafts``)."""
    count = 0
    for draft, token in zip(drafts, sampled, strict=False):
        if draft != token:
            break
        count += 1
    return count
