"""Speculative decoding by n-gram prompt lookup (``speculative_config``): greedy generation equals generation
without it token for token (the tiny random model falls into loops that prompt lookup predicts, so most steps run
drafts and many are accepted), under chunked prefill, a small KV pool that preempts, stop strings, ``n > 1`` and
requests that take no drafts; structured outputs take the drafts their grammar allows; random sampling runs drafts
too, and seeded requests with drafts give what they give without; every KV block comes back; bad settings are
refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.config import EngineConfig
from pagedllm.core.spec_decode import accepted_drafts, propose_ngram
from tests.conftest import assert_pool_free

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
PROMPTS = ["def f(x):\n    return x + 1\n\ndef f(x):\n    return", "the cat sat on the mat. the cat sat on the",
           "a b c d a b c d a b c d a b", "x", "import os\nimport sys\nimport os\n"]


def engines(model_dir: Path, **settings: object) -> tuple[LLM, LLM]:
    common = {"device": "cpu", "dtype": "float32", "kv_cache_memory_bytes": 8 << 20, "seed": 0, "block_size": 8,
              **settings}
    return LLM(str(model_dir), **common), LLM(str(model_dir), speculative_config=NGRAM, **common)


def token_ids(llm: LLM, prompts: list[str], params: SamplingParams | list[SamplingParams]) -> list[list[list[int]]]:
    return [[c.token_ids for c in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)]


def drafts_and_accepted(llm: LLM) -> tuple[int, int]:
    stats = llm.llm_engine.stats()
    return stats.spec_decode_num_draft_tokens, stats.spec_decode_num_accepted_tokens


def test_each_row_knows_the_drafts_before_it() -> None:
    from pagedllm.core.engine import LLMEngine

    drafts = {"a": [5, 6], "c": [9]}
    assert LLMEngine._drafts_before(["a", "a", "a", "b", "c", "c"], drafts) == [[], [5], [5, 6], [], [], [9]]


def test_propose_and_accept() -> None:
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3], 2, 1, 3) == [9, 1]  # "1 2 3" occurred before: what followed it
    assert propose_ngram([5, 1, 2, 7, 1, 2], 4, 1, 2) == [7, 1, 2]  # as many as there are
    assert propose_ngram([4, 5, 6, 7], 3, 1, 4) == []  # no repeat
    assert propose_ngram([1, 2, 1, 3, 1], 1, 1, 2) == [3]  # the most recent earlier occurrence of "1"
    assert accepted_drafts([3, 4, 5], [3, 4, 9, 1]) == 2 and accepted_drafts([3], [2, 3]) == 0
    assert accepted_drafts([3, 4], [3, 4, 8]) == 2


def test_the_context_array_follows_the_tokens() -> None:
    """The array prompt lookup searches is the request's tokens, extended in place step by step."""
    from pagedllm.core.request import Request
    from pagedllm.core.spec_decode import context_tokens

    request = Request("r", list(range(300)), SamplingParams(max_tokens=500), 0.0)
    assert context_tokens(request).tolist() == list(range(300))
    buffer = request.spec_context[0]
    for token in (7, 8, 9):
        request.append_output_token(token)
    assert context_tokens(request).tolist() == [*range(300), 7, 8, 9] and request.spec_context[0] is buffer
    request.output_token_ids.extend([1] * 400)
    request.all_token_ids.extend([1] * 400)  # past the buffer's room: a larger one, the same tokens
    assert context_tokens(request).tolist() == request.all_token_ids
    assert propose_ngram(context_tokens(request), 3, 1, 4) == [1, 1, 1]


def test_greedy_equals_decoding_without_drafts(llama_dir: Path) -> None:
    base, spec = engines(llama_dir)
    params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    assert token_ids(spec, PROMPTS, params) == token_ids(base, PROMPTS, params)
    drafts, accepted = drafts_and_accepted(spec)
    assert drafts > 200 and accepted > drafts // 3  # the loops are predicted: most tokens came as drafts
    assert_pool_free(spec)


def test_chunked_prefill_preemption_and_the_token_budget(llama_dir: Path) -> None:
    """A 16-token budget cuts prompts and drafts; a pool of 20 blocks of 8 preempts; the results do not move."""
    base, spec = engines(llama_dir, max_num_batched_tokens=16, num_kv_blocks=21, kv_cache_memory_bytes=None)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    assert token_ids(spec, PROMPTS, params) == token_ids(base, PROMPTS, params)
    assert spec.llm_engine.stats().num_preemptions > 0 and drafts_and_accepted(spec)[1] > 0
    assert_pool_free(spec)


def test_stops_max_tokens_n_and_requests_without_drafts(llama_dir: Path) -> None:
    """Stop strings and max_tokens cut accepted drafts where they fall; ``n > 1`` completions each draft; a request
    with logprobs drafts and gets each position's logprobs; penalties, bad words and ``min_tokens`` count a
    position's earlier drafts; all with the same tokens as without drafts."""
    base, spec = engines(llama_dir)
    greedy = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    text = base.generate(PROMPTS[1], greedy, use_tqdm=False)[0].outputs[0].text
    stop = text[40:44]
    params = [SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True, stop=[stop]),
              SamplingParams(temperature=0.0, max_tokens=37, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, n=2),
              SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, presence_penalty=0.4,
                             frequency_penalty=0.2),
              SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, bad_words=[text[20:23], " the"]),
              SamplingParams(temperature=0.0, max_tokens=60, min_tokens=40)]
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[4], PROMPTS[1], PROMPTS[1], PROMPTS[0]]
    ours = spec.generate(prompts, params, use_tqdm=False)
    theirs = base.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in ours] == [[c.token_ids for c in o.outputs] for o in theirs]
    assert ours[0].outputs[0].text == text[: text.index(stop)] and ours[0].outputs[0].finish_reason == "stop"
    assert len(ours[1].outputs[0].token_ids) == 37
    for mine, reference in zip(ours[3].outputs[0].logprobs, theirs[3].outputs[0].logprobs, strict=True):
        assert mine.keys() == reference.keys()  # (the batches differ: float32 sums in another order)
        assert all(mine[t].logprob == pytest.approx(reference[t].logprob, abs=1e-5) for t in mine)
    assert drafts_and_accepted(spec)[1] > 0
    assert_pool_free(spec)


def test_structured_outputs_take_the_drafts_their_grammar_allows(llama_dir: Path) -> None:
    """A regex, a JSON schema and a choice: the same tokens as without drafts, and drafts run and accepted under
    each. Drafts are cut before the first token the grammar refuses, and before one that would complete it."""
    from pagedllm.core.sampling_params import StructuredOutputsParams

    base, spec = engines(llama_dir)
    cases = [StructuredOutputsParams(regex="[a-z .]{0,120}"),
             StructuredOutputsParams(json={"type": "array", "maxItems": 30,
                                           "items": {"type": "string", "enum": ["cat", "mat", "the"]}}),
             StructuredOutputsParams(choice=["the cat sat on the mat. the cat sat on the mat.", "no"])]
    for structured in cases:
        params = SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=structured)
        drafts, accepted = drafts_and_accepted(spec)
        assert token_ids(spec, PROMPTS[:3], params) == token_ids(base, PROMPTS[:3], params), structured
        assert drafts_and_accepted(spec)[1] > accepted and drafts_and_accepted(spec)[0] > drafts
    assert_pool_free(spec)
    engine = spec.llm_engine
    matcher = engine.structured_outputs().compile(StructuredOutputsParams(choice=["ab", "cd"]))()
    ab, cd = engine.tokenizer.encode("ab"), engine.tokenizer.encode("cd")
    eos = sorted(engine.eos_token_ids)[0]
    assert matcher.valid_drafts([*ab, eos]) == ab  # not the end, which completes the grammar
    assert matcher.valid_drafts([*ab, *cd]) == ab  # "abcd" is no choice
    assert matcher.valid_drafts([*cd, *ab]) == cd  # the matcher is where it was after each call
    assert matcher.valid_drafts([eos]) == [] and matcher.accept(ab[0])


def test_random_sampling_runs_drafts_and_seeded_requests_are_unchanged(llama_dir: Path) -> None:
    """Random samples accept drafts too; seeded requests run drafts and still give, token for token, what they
    give without them (their generator is set back past the draws of rejected positions), alone, beside
    unseeded requests, and with ``n > 1``."""
    base, spec = engines(llama_dir)
    sampled = spec.generate(PROMPTS * 8, SamplingParams(temperature=0.3, max_tokens=48, ignore_eos=True),
                            use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 48 for o in sampled)
    assert drafts_and_accepted(spec)[1] > 0  # random samples accept drafts too
    for temperature in (0.3, 0.6):
        drafts, accepted = drafts_and_accepted(spec)
        seeded = [SamplingParams(temperature=temperature, max_tokens=40, ignore_eos=True, seed=11 + i)
                  for i in range(len(PROMPTS))]
        assert token_ids(spec, PROMPTS, seeded) == token_ids(base, PROMPTS, seeded)
        new_drafts, new_accepted = drafts_and_accepted(spec)
        assert 0 < new_accepted - accepted < new_drafts - drafts  # drafts accepted, and some rejected (rewound)
    # beside unseeded requests (compared: the seeded ones), and n > 1 (each sample its own generator)
    mixed = [SamplingParams(temperature=0.5, max_tokens=32, ignore_eos=True, seed=5, n=2),
             SamplingParams(temperature=0.5, max_tokens=32, ignore_eos=True)] * 3
    got, want = token_ids(spec, PROMPTS[:2] * 3, mixed), token_ids(base, PROMPTS[:2] * 3, mixed)
    assert got[0::2] == want[0::2]
    assert_pool_free(spec)


@pytest.mark.parametrize("settings,message", [
    ({"speculative_config": {"method": "eagle", "num_speculative_tokens": 2}}, "must be 'ngram'"),
    ({"speculative_config": {"method": "ngram"}}, "needs num_speculative_tokens"),
    ({"speculative_config": {"num_speculative_tokens": 2, "draft_model": "x"}}, "unknown keys"),
    ({"speculative_config": {"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}},
     "prompt_lookup_min <= prompt_lookup_max"),
    ({"speculative_config": NGRAM, "async_scheduling": True}, "synchronous scheduling"),
])
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings)


@pytest.mark.timeout(180)
def test_tensor_parallel_drafts_equal_one_device(llama_dir: Path) -> None:
    """With ``tp=2`` (mp executor, gloo) both ranks run the drafts; tokens and logprobs equal tp=1 without."""
    base, _ = engines(llama_dir)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, logprobs=2)
    theirs = base.generate(PROMPTS, params, use_tqdm=False)
    tp = LLM(str(llama_dir), device="cpu", dtype="float32", kv_cache_memory_bytes=8 << 20, seed=0, block_size=8,
             tensor_parallel_size=2, speculative_config=NGRAM)
    try:
        ours = tp.generate(PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in theirs]
        for mine, reference in zip(ours, theirs, strict=True):
            for got, want in zip(mine.outputs[0].logprobs, reference.outputs[0].logprobs, strict=True):
                assert got.keys() == want.keys()
                assert all(got[t].logprob == pytest.approx(want[t].logprob, abs=1e-4) for t in got)
        assert drafts_and_accepted(tp)[1] > 0
        assert_pool_free(tp)
    finally:
        tp.llm_engine.shutdown()


def test_the_server_drafts_and_counts_them(llama_dir: Path) -> None:
    """``pagedllm serve --speculative-config``: completions equal the offline engine's without drafts, and
    ``/metrics`` counts the drafts run and accepted."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from tests.e2e.openai_server import in_process_client

    base, _ = engines(llama_dir)
    expected = base.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].text
    with in_process_client(llama_dir, {"speculative_config": NGRAM}) as (client, engine):
        reply = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=64, temperature=0.0,
                                          extra_body={"ignore_eos": True})
        assert reply.choices[0].text == expected
        metrics = client._client.get("http://testserver/metrics").text
        counted = {line.split()[0].split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("pagedllm:spec_decode_num_")}
        assert counted["pagedllm:spec_decode_num_accepted_tokens_total"] > 0
        assert counted["pagedllm:spec_decode_num_draft_tokens_total"] >= counted[
            "pagedllm:spec_decode_num_accepted_tokens_total"]
        assert engine.kv_cache_usage() == 0.0


def test_steps_with_drafts_replay_decode_graphs(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With graphs (the ``cpu`` backend with emulated graphs: a replay re-runs the step over the static buffers),
    a step with drafts replays a decode graph, each of its tokens a row that attends to its request's cache up to
    its position; greedy tokens equal eager decoding without drafts."""
    from pagedllm.backends.registry import get_registry
    from tests.e2e.graph_cpu_backend import GraphCpuBackend

    base, _ = engines(llama_dir)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    expected = token_ids(base, PROMPTS, params)
    monkeypatch.setattr(get_registry(), "resolve_backend", lambda device: GraphCpuBackend)
    spec = LLM(str(llama_dir), device="cpu", dtype="float32", kv_cache_memory_bytes=8 << 20, seed=0, block_size=8,
               max_num_seqs=32, speculative_config=NGRAM)
    graphs = spec.llm_engine.executor.worker.runner.graph_runner
    assert graphs is not None
    rows_per_replay: list[int] = []
    run = graphs.run

    def counting_run(input_ids, *args: object, **kwargs: object) -> object:
        rows_per_replay.append(len(input_ids))
        return run(input_ids, *args, **kwargs)

    monkeypatch.setattr(graphs, "run", counting_run)
    assert token_ids(spec, PROMPTS, params) == expected
    assert max(rows_per_replay) > len(PROMPTS)  # replays with draft rows
    assert drafts_and_accepted(spec)[1] > 0
    assert_pool_free(spec)
