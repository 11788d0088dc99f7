"""Sampling parameters of one request, validated when built (vLLM's names and meanings)."""

from __future__ import annotations

import copy
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    """Which steps report a request's output (vLLM's name): every step that gave it a token
    (``CUMULATIVE``: the whole completion so far, for streaming), or only the step that finished it
    (``FINAL_ONLY``: what ``LLM.generate`` asks for, so no snapshot is built per token)."""

    CUMULATIVE = "cumulative"
    FINAL_ONLY = "final_only"


@dataclass(slots=True)
class StructuredOutputsParams:
    """Constrain a completion to a structure (vLLM's ``StructuredOutputsParams``): exactly one of ``json`` (a JSON
    schema, as a dict or its text), ``json_object`` (any JSON object), ``regex``, ``choice`` (one of these strings)
    or ``grammar`` (an EBNF grammar, GBNF's syntax). ``disable_any_whitespace`` keeps JSON to single spaces
    between its parts. Compiled with xgrammar when the request is added; an invalid one raises ValueError."""

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if self.choice is not None:
            self.choice = list(self.choice)
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"SamplingParams.structured_outputs must set exactly one of json, json_object, regex, "
                             f"choice, grammar; got {given or 'none'}")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"SamplingParams.structured_outputs choice must be non-empty strings, got {self.choice!r}")

    @property
    def key(self) -> tuple[str, str, bool]:
        """``(kind, spec, disable_any_whitespace)``: what the grammar is compiled from (a cache key)."""
        import json

        if self.json is not None:
            spec = self.json if isinstance(self.json, str) else json.dumps(self.json, sort_keys=True)
            return "json", spec, self.disable_any_whitespace
        if self.json_object:
            return "json_object", "", self.disable_any_whitespace
        if self.regex is not None:
            return "regex", self.regex, False
        if self.choice is not None:
            return "choice", json.dumps(self.choice), False
        return "grammar", str(self.grammar), False


@dataclass(slots=True)
class SamplingParams:
    """How to sample the completion(s) of one prompt.

    ``temperature=0`` means greedy. ``top_k=-1`` (or 0) and ``top_p=1`` disable those filters.
    ``stop`` strings end the completion; they are left out of the text unless
    ``include_stop_str_in_output``. ``logprobs=k`` returns, for each generated token, its logprob and
    the top ``k`` alternatives; ``prompt_logprobs=k`` the same for every prompt token after the first
    (``RequestOutput.prompt_logprobs``; such a prompt is computed whole, never taken from the prefix cache).
    ``seed`` makes sampling reproducible whatever else is in the batch.
    ``output_kind`` says which steps report the request (:class:`RequestOutputKind`).
    ``logit_bias`` (token id -> bias in [-100, 100]) is added to the logits before any penalty or filter;
    ``allowed_token_ids`` keeps only those tokens (as vLLM's; the EOS token too only if listed); ``bad_words``
    are never generated (as vLLM's: each word, with and without a leading space, as token sequences; the last
    token of a sequence is blocked where the completion's last tokens are the rest of it). Logprobs stay those
    of the model's own distribution. ``structured_outputs`` (:class:`StructuredOutputsParams`) keeps the completion
    to a JSON schema, a regular expression, a choice or a grammar. ``truncate_prompt_tokens=k`` keeps only the
    prompt's last ``k`` tokens (-1: the model's maximum length). Invalid values raise ``ValueError`` naming the
    field.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    truncate_prompt_tokens: int | None = None
    # filled by the engine: the tokenizer's EOS ids and generation_config defaults
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    # filled by the engine from bad_words: the token sequences to block (:func:`bad_words_token_ids`)
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if self.logit_bias is not None:
            self.logit_bias = dict(self.logit_bias) or None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words) or None
        self._validate()

    def _validate(self) -> None:
        checks: list[tuple[bool, str, str]] = [
            (isinstance(self.n, int) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}"),
            (self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (off) or >= 1, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", f"must be in [-2, 2], got "
             f"{self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", f"must be in [-2, 2], got "
             f"{self.frequency_penalty}"),
            (self.repetition_penalty > 0.0, "repetition_penalty", f"must be > 0, got "
             f"{self.repetition_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", f"must be >= 1, got "
             f"{self.max_tokens}"),
            (self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", f"must be >= 0, got {self.logprobs}"),
            (self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
             "prompt_logprobs", f"must be an integer >= 0, got {self.prompt_logprobs!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64), "seed",
             f"must be an integer in [-2**63, 2**64), got {self.seed!r}"),
            (self.logit_bias is None or all(_is_token_id(t) and _is_bias(b) for t, b in self.logit_bias.items()),
             "logit_bias", f"must map token ids (integers >= 0) to numbers in [-100, 100], got {self.logit_bias!r}"),
            (self.allowed_token_ids is None or (len(self.allowed_token_ids) > 0
                                                and all(_is_token_id(t) for t in self.allowed_token_ids)),
             "allowed_token_ids", f"must be a non-empty list of token ids (integers >= 0), got "
             f"{self.allowed_token_ids!r}"),
            (self.bad_words is None or all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words",
             f"must be non-blank strings, got {self.bad_words!r}"),
            (self.truncate_prompt_tokens is None or _is_truncation(self.truncate_prompt_tokens),
             "truncate_prompt_tokens", f"{_TRUNCATION_RULE}, got {self.truncate_prompt_tokens!r}"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {message}")

    @property
    def is_greedy(self) -> bool:
        """True when the argmax is taken (temperature 0)."""
        return self.temperature < _GREEDY_EPS

    def clone(self) -> SamplingParams:
        """Return an independent copy (the engine fills per-request fields): the fields' values shared, the
        mutable containers (``stop``, ``stop_token_ids``, ``all_stop_token_ids``, ``logit_bias``,
        ``allowed_token_ids``, ``bad_words``, ``bad_words_token_ids``) copied. A tenth of what a deep copy takes
        (about 6 against 62 us here), once per request and per parallel sample."""
        new = copy.copy(self)
        new.stop = list(self.stop)
        new.stop_token_ids = list(self.stop_token_ids)
        new.all_stop_token_ids = set(self.all_stop_token_ids)
        if self.logit_bias is not None:
            new.logit_bias = dict(self.logit_bias)
        if self.allowed_token_ids is not None:
            new.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            new.bad_words = list(self.bad_words)
        new.bad_words_token_ids = [list(ids) for ids in self.bad_words_token_ids]
        return new

    def named_token_ids(self) -> list[tuple[str, list[int]]]:
        """``(field, token ids)`` of every field naming token ids (``stop_token_ids``, ``logit_bias``'s keys,
        ``allowed_token_ids``), for the engine's check against the vocabulary."""
        return [("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias or ())),
                ("allowed_token_ids", self.allowed_token_ids or [])]


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_bias(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and -100.0 <= value <= 100.0


def bad_words_token_ids(words: list[str], encode: Callable[[str], list[int]]) -> list[list[int]]:
    """The token sequences that spell ``words`` (``SamplingParams.bad_words``), as vLLM derives them: each word
    (leading spaces stripped) as it opens the text, and with one leading space as it follows another word, the
    latter only when it is a different sequence of the same length (a tokenizer with a prefix-space marker).
    ``encode`` tokenizes without special tokens. Called by the engine once per request."""
    sequences: list[list[int]] = []
    for word in words:
        bare = encode(word.lstrip())
        if bare:
            sequences.append(bare)
        spaced = encode(" " + word.lstrip())
        if spaced and (not bare or (spaced[0] != bare[0] and len(spaced) == len(bare))):
            sequences.append(spaced)
    return sequences


def blocked_bad_words(sequences: list[list[int]], output_token_ids: list[int]) -> list[int]:
    """The tokens ``sequences`` (:func:`bad_words_token_ids`) forbid next after ``output_token_ids``: a
    one-token word always, a longer one when the completion ends with all of it but its last token."""
    blocked = []
    for seq in sequences:
        prefix = len(seq) - 1
        if prefix == 0 or (len(output_token_ids) >= prefix and output_token_ids[-prefix:] == seq[:-1]):
            blocked.append(seq[-1])
    return blocked


_TRUNCATION_RULE = "must be -1 (the model's maximum length) or >= 1"


def _is_truncation(value: object) -> bool:
    return isinstance(value, int) and (value >= 1 or value == -1)


def truncated_prompt(token_ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """``token_ids`` cut to their last ``keep`` tokens (``SamplingParams.truncate_prompt_tokens``; -1 keeps
    ``max_model_len``, None everything), as vLLM truncates: from the left. Raises ValueError naming the field
    for any other ``keep`` (the server cuts before it builds the ``SamplingParams``)."""
    if keep is None:
        return token_ids
    if not _is_truncation(keep):
        raise ValueError(f"SamplingParams.truncate_prompt_tokens {_TRUNCATION_RULE}, got {keep!r}")
    keep = max_model_len if keep == -1 else keep
    return token_ids[-keep:] if len(token_ids) > keep else token_ids
