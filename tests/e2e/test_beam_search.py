"""``LLM.beam_search``: the beams equal a reference beam search of the same rule over transformers' logits on
the same checkpoint; the end-of-sequence and length-penalty rules on a scripted distribution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.core.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.entrypoints.beam_search import BeamSearchParams, BeamSearchSequence, beam_score, beam_search
from tests.conftest import assert_pool_free


def reference_beam_search(model_dir: Path, prompt: list[int], width: int, max_tokens: int,
                          length_penalty: float) -> list[tuple[list[int], float]]:
    """The rule of ``pagedllm.entrypoints.beam_search`` (no end-of-sequence met here) over transformers'
    float32 logits: ``(tokens, cum_logprob)`` of the best ``width`` beams."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    live = [(list(prompt), 0.0)]
    with torch.inference_mode():
        for _ in range(max_tokens):
            pool = []
            for tokens, cum in live:
                lp = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), -1).topk(2 * width)
                pool += [([*tokens, t], cum + v) for t, v in zip(lp.indices.tolist(), lp.values.tolist(), strict=True)]
            live = sorted(pool, key=lambda b: b[1], reverse=True)[:width]
    return sorted(live, key=lambda b: b[1] / len(b[0]) ** length_penalty, reverse=True)


@pytest.mark.parametrize("length_penalty", [1.0, 0.3])
def test_beams_equal_a_reference_over_transformers(llama_dir: Path, length_penalty: float) -> None:
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", block_size=4, kv_cache_memory_bytes=8 << 20,
              enable_prefix_caching=True)
    prompts = [[5, 17, 200, 33, 8], [90, 91, 92]]
    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True, length_penalty=length_penalty)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outputs, strict=True):
        expected = reference_beam_search(llama_dir, prompt, 3, 5, length_penalty)
        assert [b.tokens for b in out.sequences] == [tokens for tokens, _ in expected]
        assert [b.cum_logprob for b in out.sequences] == pytest.approx([cum for _, cum in expected], abs=1e-4)
        assert all(len(b.logprobs) == 5 and b.text for b in out.sequences)
    assert llm.llm_engine.stats().prefix_cache_hit_tokens > 0  # the beams reuse their prompt's blocks
    with pytest.raises(ValueError, match=r"beam_width must be <= 10"):
        llm.beam_search([[1, 2]], BeamSearchParams(beam_width=11, max_tokens=2))
    assert_pool_free(llm)


def _scripted_generate(table: dict[tuple[int, ...], dict[int, float]]):
    """An engine stand-in: each prompt's next-token logprobs come from ``table`` (keyed by its tokens)."""
    def generate(batch: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        outputs = []
        for tokens in batch:
            step = {t: Logprob(lp) for t, lp in table[tuple(tokens)].items()}
            completion = CompletionOutput(0, "", [max(step, key=lambda t: step[t].logprob)], None, [step])
            outputs.append(RequestOutput("x", None, tokens, [completion], True))
        return outputs
    return generate


def test_ending_beams_complete_and_the_length_penalty_ranks_them() -> None:
    eos = frozenset({0})
    # after [1]: EOS is the likeliest; the live beams go on through 2 and 3
    table = {(1,): {0: -0.1, 2: -1.0, 3: -2.0, 4: -9.0}, (1, 2): {0: -5.0, 5: -0.5, 6: -0.7, 7: -9.0},
             (1, 3): {0: -6.0, 5: -0.2, 6: -3.0, 7: -9.0}}
    results = beam_search(_scripted_generate(table), [[1]], BeamSearchParams(beam_width=2, max_tokens=2),
                          eos, None)
    beams = results[0].sequences
    assert [b.tokens for b in beams] == [[1, 0], [1, 2, 5]]  # the early EOS (-0.1) beats -1.5 over 2 tokens
    assert beams[0].finished and not beams[1].finished
    long = BeamSearchSequence([1, 2, 5, 9], cum_logprob=-1.5)
    short = BeamSearchSequence([1, 0], cum_logprob=-1.2)  # its EOS does not count in the length
    assert beam_score(short, eos, 1.0) == -1.2 and beam_score(long, eos, 1.0) == pytest.approx(-0.375)
    with pytest.raises(ValueError, match="beam_width must be an integer >= 1"):
        BeamSearchParams(beam_width=0, max_tokens=3)
