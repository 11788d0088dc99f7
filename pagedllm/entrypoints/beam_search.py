"""Beam search on top of the engine (``LLM.beam_search``), as vLLM's offline API runs it.

Each step asks the engine for one token of every live beam with its ``2 * beam_width`` most likely
continuations (raw logprobs); a candidate ending in an end-of-sequence token is complete, and of the others
the ``beam_width`` with the highest cumulative logprob per prompt go on. At the end the complete
and live beams are ranked by ``cum_logprob / len(tokens) ** length_penalty`` (``tokens``: prompt and
completion, the EOS not counted), vLLM's score. The beams of one prompt share their prefix in the KV cache
through prefix caching, so a step recomputes only the new token of each beam.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pagedllm.core.outputs import Logprob, RequestOutput
from pagedllm.core.sampling_params import SamplingParams


@dataclass(slots=True)
class BeamSearchParams:
    """``beam_width`` beams per prompt, at most ``max_tokens`` new tokens each; ``ignore_eos`` keeps beams going
    past an end-of-sequence token; ``length_penalty`` is the exponent of the length in the final score."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.beam_width, int) and self.beam_width >= 1):
            raise ValueError(f"BeamSearchParams.beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"BeamSearchParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")


@dataclass(slots=True)
class BeamSearchSequence:
    """One beam: ``tokens`` (the prompt's then the completion's), the completion's per-token logprobs (each
    step's candidates), its cumulative logprob and, with a tokenizer, the text of all its tokens."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finished: bool = False


@dataclass(slots=True)
class BeamSearchOutput:
    """The ``beam_width`` best beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_score(beam: BeamSearchSequence, eos_token_ids: frozenset[int], length_penalty: float) -> float:
    """vLLM's ranking score: ``cum_logprob / length ** length_penalty``, the length counting the prompt and
    the completion but not a final end-of-sequence token."""
    length = len(beam.tokens) - (1 if beam.tokens and beam.tokens[-1] in eos_token_ids else 0)
    return beam.cum_logprob / (length**length_penalty)


def beam_search(generate: Callable[[list[list[int]], SamplingParams], list[RequestOutput]],
                prompts: Sequence[list[int]], params: BeamSearchParams, eos_token_ids: frozenset[int],
                decode: Callable[[list[int]], str] | None) -> list[BeamSearchOutput]:
    """Run beam search for ``prompts`` (token ids). ``generate(token_lists, params)`` runs one engine call
    (``LLM.generate``); ``decode`` fills each beam's text. Returns one :class:`BeamSearchOutput` per prompt."""
    width = params.beam_width
    step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * width, ignore_eos=True,
                                 detokenize=False)
    live = [[BeamSearchSequence(list(p))] for p in prompts]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        flat = [(i, beam) for i, beams in enumerate(live) for beam in beams]
        if not flat:
            break
        outputs = generate([beam.tokens for _, beam in flat], step_params)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), output in zip(flat, outputs, strict=True):
            step = output.outputs[0].logprobs
            assert step, "beam search needs the step's logprobs"
            for token, lp in step[0].items():
                new = BeamSearchSequence([*beam.tokens, token], [*beam.logprobs, step[0]],
                                         beam.cum_logprob + lp.logprob)
                if not params.ignore_eos and token in eos_token_ids:
                    new.finished = True
                    done[i].append(new)  # every candidate that ends is kept, as vLLM keeps them
                else:
                    candidates[i].append(new)
        for i, pool in enumerate(candidates):  # one length per prompt's pool: the score orders as cum_logprob
            live[i] = sorted(pool, key=lambda b: b.cum_logprob, reverse=True)[:width]
    results = []
    for i in range(len(prompts)):
        ranked = sorted(done[i] + live[i], key=lambda b: beam_score(b, eos_token_ids, params.length_penalty),
                        reverse=True)[:width]
        for beam in ranked:
            beam.text = decode(beam.tokens) if decode is not None else None
        results.append(BeamSearchOutput(ranked))
    return results
