from __future__ import annotations

import math

import pytest
import torch

from pagedllm.core.request import Request
from pagedllm.core.sampler import Sampler, row_argmax
from pagedllm.core.sampling_params import SamplingParams, bad_words_token_ids, blocked_bad_words

VOCAB = 50


def make_request(request_id: str, params: SamplingParams, prompt: list[int] | None = None,
                 outputs: list[int] | None = None, eos: frozenset[int] = frozenset()) -> Request:
    r = Request(request_id, prompt or [1, 2, 3], params, 0.0, eos_token_ids=eos)
    for t in outputs or []:
        r.append_output_token(t)
    return r


def sample(sampler: Sampler, requests: list[Request], logits: torch.Tensor) -> list[int]:
    return sampler(logits, sampler.make_batch(requests, logits.shape[-1])).token_ids


def test_greedy_and_top_k_one_are_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    sampler = Sampler(torch.device("cpu"), seed=1)
    reqs = [make_request("g", SamplingParams(temperature=0)), make_request("k", SamplingParams(top_k=1)),
            make_request("k2", SamplingParams(temperature=2.0, top_k=1)),
            make_request("g2", SamplingParams(temperature=0))]
    assert sample(sampler, reqs, logits) == logits.argmax(-1).tolist()


def test_seeded_sampling_independent_of_batch_composition() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    alone = Sampler(torch.device("cpu"), seed=0)
    seeded = make_request("s", SamplingParams(temperature=1.0, seed=42))
    first = [sample(alone, [seeded], logits[1:2])[0] for _ in range(5)]
    mixed = Sampler(torch.device("cpu"), seed=123)
    seeded2 = make_request("s2", SamplingParams(temperature=1.0, seed=42))
    others = [make_request("u1", SamplingParams(temperature=1.0)), make_request("u2", SamplingParams(temperature=0.5))]
    second = [sample(mixed, [others[0], seeded2, others[1]], logits)[1] for _ in range(5)]
    assert first == second
    assert len(set(first)) > 1  # it really samples


def test_temperature_sampling_follows_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    sampler = Sampler(torch.device("cpu"), seed=0)
    req = make_request("t", SamplingParams(temperature=1.0))
    batch = sampler.make_batch([req] * 4000, 3)
    counts = torch.bincount(torch.tensor(sampler(logits.expand(4000, 3), batch).token_ids), minlength=3)
    assert counts.tolist()[0] == pytest.approx(2800, abs=150)
    assert counts.tolist()[2] == pytest.approx(400, abs=100)


def test_top_p_and_min_p_filter_tail() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(500, 4)
    sampler = Sampler(torch.device("cpu"), seed=0)
    top_p = sampler(logits, sampler.make_batch([make_request("p", SamplingParams(top_p=0.8))] * 500, 4)).token_ids
    assert set(top_p) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    min_p = sampler(logits, sampler.make_batch([make_request("m", SamplingParams(min_p=0.25))] * 500, 4)).token_ids
    assert set(min_p) == {0, 1, 2}  # 0.05 < 0.25 * 0.5


def test_penalties_match_hand_computed_case() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    req = make_request("r", params, prompt=[3], outputs=[0, 0, 1])
    sampler = Sampler(torch.device("cpu"))
    batch = sampler.make_batch([req], 4)
    penalized = Sampler._apply_penalties(logits.clone(), batch)
    # token 0: 2.0/2 - 0.25*2 - 0.5 = 0.0; token 1: -1*2 - 0.25 - 0.5 = -2.75; token 2 unseen: 0.5;
    # token 3 (prompt only): 1.0/2 = 0.5
    assert penalized.tolist() == [[0.0, -2.75, 0.5, 0.5]]
    assert sampler(logits, batch).token_ids == [2]


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    logits = torch.tensor([[5.0, 1.0, 4.0, 0.0]])
    sampler = Sampler(torch.device("cpu"))
    req = make_request("m", SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2]), eos=frozenset({0}))
    assert sample(sampler, [req], logits) == [1]
    req.append_output_token(1)
    req.append_output_token(1)
    assert sample(sampler, [req], logits) == [0]


def test_logprobs_are_of_raw_distribution_with_ranks() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    sampler = Sampler(torch.device("cpu"))
    req = make_request("l", SamplingParams(temperature=0, logprobs=2))
    out = sampler(logits, sampler.make_batch([req], 4))
    expected = torch.log_softmax(logits, -1)[0]
    assert out.token_ids == [1]
    assert out.top_token_ids.tolist() == [[1, 2]]
    assert out.top_logprobs[0].tolist() == pytest.approx(expected[[1, 2]].tolist())
    assert out.sampled_ranks.tolist() == [1]
    assert math.isclose(float(out.sampled_logprobs[0]), float(expected[1]), rel_tol=1e-6)


def test_logit_bias_is_added_before_penalties_and_logprobs_stay_raw() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    sampler = Sampler(torch.device("cpu"))
    reqs = [make_request("b", SamplingParams(temperature=0, logprobs=1, logit_bias={0: 2.5, 1: -1.0})),
            make_request("plain", SamplingParams(temperature=0)),
            make_request("rep", SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={3: 2.5}),
                         prompt=[3])]
    out = sampler(logits, sampler.make_batch(reqs, 4))
    # row 0: [3.5, 2.0, 2.0, 0.0]; row 2: token 3 biased to 2.5, then halved as a seen token -> 1.25 < 3.0
    assert out.token_ids == [0, 1, 1]
    assert float(out.sampled_logprobs[0]) == pytest.approx(float(torch.log_softmax(logits[0], -1)[0]))
    assert logits[0].tolist() == [1.0, 3.0, 2.0, 0.0]  # the caller's logits untouched


def test_allowed_token_ids_keep_only_those_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(400, VOCAB)
    sampler = Sampler(torch.device("cpu"), seed=0)
    allowed = make_request("a", SamplingParams(temperature=1.0, allowed_token_ids=[4, 9, 31]))
    free = make_request("f", SamplingParams(temperature=1.0))
    batch = sampler.make_batch([allowed, free] * 200, VOCAB)
    tokens = sampler(logits, batch).token_ids
    assert set(tokens[0::2]) == {4, 9, 31}
    assert len(set(tokens[1::2]) - {4, 9, 31}) > 10  # the other rows still sample the whole vocabulary
    greedy = make_request("g", SamplingParams(temperature=0, allowed_token_ids=[5, 6]))
    assert sample(sampler, [greedy], logits[:1]) == [5 + int(logits[0, 6] > logits[0, 5])]
    assert set(sampler._request_disallowed) == {"a", "g"}
    for rid in ("a", "g"):
        sampler.forget(rid)
    assert not sampler._request_disallowed and not sampler._request_biases


def test_bad_words_block_single_tokens_always_and_longer_ones_after_their_prefix() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 7] = 5.0  # the favourite everywhere
    logits[:, 8] = 4.0
    sampler = Sampler(torch.device("cpu"))
    params = SamplingParams(temperature=0, bad_words=["x"])
    params.bad_words_token_ids = [[7], [3, 8]]  # as the engine fills them: "x" is [7], "yz" is [3, 8]
    reqs = [make_request("a", params, outputs=[1, 2]), make_request("b", params.clone(), outputs=[2, 3]),
            make_request("c", SamplingParams(temperature=0), outputs=[3])]
    # a: 7 blocked -> 8; b: 7 blocked and, after 3, 8 too -> the next best (index 0 of the zeros); c: free
    assert sample(sampler, reqs, logits) == [8, 0, 7]


def test_rows_after_drafts_count_them_as_output() -> None:
    """Speculative decoding samples a request at several positions at once; ``drafts_before`` gives each row
    the drafts its position follows: penalties, ``min_tokens`` and bad words see them as output."""
    sampler = Sampler(torch.device("cpu"))
    penalized = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    req = make_request("p", penalized, prompt=[3], outputs=[0])
    logits = torch.tensor([[2.0, 1.0, 0.5, 1.0]] * 2)
    batch = sampler.make_batch([req, req], 4, drafts_before=[[], [1, 1]])
    penalized_logits = Sampler._apply_penalties(logits.clone(), batch)
    # row 0 saw token 0 once; row 1 saw 0 once and 1 twice: 1.0 / 2 - 0.25 * 2 - 0.5 = -0.5
    assert penalized_logits[0, 1].item() == 1.0 and penalized_logits[1, 1].item() == -0.5
    ending = make_request("m", SamplingParams(temperature=0, min_tokens=3), outputs=[1], eos=frozenset({0}))
    eos_first = torch.tensor([[5.0, 1.0, 4.0, 0.0]] * 3)
    batch = sampler.make_batch([ending] * 3, 4, drafts_before=[[], [2], [2, 2]])
    assert sampler(eos_first, batch).token_ids == [2, 2, 0]  # the third row follows 3 outputs: EOS allowed
    params = SamplingParams(temperature=0, bad_words=["yz"])
    params.bad_words_token_ids = [[3, 8]]
    worded = make_request("w", params, outputs=[1])
    eight_first = torch.zeros(2, VOCAB)
    eight_first[:, 8] = 5.0
    batch = sampler.make_batch([worded] * 2, VOCAB, drafts_before=[[], [3]])
    assert sampler(eight_first, batch).token_ids == [8, 0]  # after the draft 3, 8 would finish the bad word


def test_bad_words_token_ids_as_vllm_derives_them() -> None:
    vocab = {"hi": [5], " hi": [6], "ab": [1, 2], " ab": [1, 2], "big": [7, 8], " big": [9]}
    assert bad_words_token_ids(["hi", " ab", "big"], lambda text: vocab[text]) == [[5], [6], [1, 2], [7, 8]]
    assert blocked_bad_words([[5], [1, 2]], []) == [5]
    assert blocked_bad_words([[5], [1, 2]], [4, 1]) == [5, 2]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"n": 0}, "n"), ({"top_k": -5}, "top_k"), ({"max_tokens": 0}, "max_tokens"), ({"min_p": 2.0}, "min_p"),
     ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"presence_penalty": 3.0}, "presence_penalty"),
     ({"logprobs": -1}, "logprobs"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"stop": [""]}, "stop"),
     ({"logit_bias": {1: 101.0}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
     ({"logit_bias": {1: float("nan")}}, "logit_bias"), ({"logit_bias": {"1": 1.0}}, "logit_bias"),
     ({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
     ({"bad_words": [" "]}, "bad_words"), ({"bad_words": [3]}, "bad_words")],
)
def test_invalid_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("vocab", [16384, 20011, 128256])
def test_row_argmax_equals_torch_argmax(vocab: int) -> None:
    """The chunked argmax of few wide rows: first maximal index on ties (within and across chunks, in the
    padded last chunk), all -inf rows, NaN as the maximum — exactly what ``torch.argmax`` returns."""
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(4, vocab, generator=gen).to(torch.bfloat16)
    x[0, [3, vocab // 2, vocab - 1]] = 50.0  # ties across chunks
    x[1, [vocab - 2, vocab - 1]] = 50.0  # ties in the last (padded) chunk
    x[2] = float("-inf")
    x[3, [900, 17]] = float("nan")
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    assert row_argmax(x).tolist()[:3] == [3, vocab - 2, 0]
    wide_batch = torch.randn(32, vocab, generator=gen)  # many rows: torch's own reduction
    assert torch.equal(row_argmax(wide_batch), wide_batch.argmax(dim=-1))
