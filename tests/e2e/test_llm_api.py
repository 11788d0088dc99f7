"""The offline API as a user meets it: sampling features, errors, and checkpoint loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.core.config import EngineConfig
from pagedllm.core.sampling_params import bad_words_token_ids
from tests.conftest import assert_pool_free


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), device="cpu", dtype="float32", block_size=8, kv_cache_memory_bytes=8 << 20, seed=0)


def test_n_samples_share_prompt_and_seed_reproduces(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    first = llm.generate("def main():", params, use_tqdm=False)[0]
    second = llm.generate(["def main():", "other prompt in the batch"], params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1  # the samples differ from each other
    assert_pool_free(llm)


def test_greedy_is_deterministic_and_top_k_one_matches(llm: LLM) -> None:
    greedy = llm.generate("import os", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    top1 = llm.generate("import os", SamplingParams(temperature=0.8, top_k=1, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    assert greedy[0].outputs[0].token_ids == top1[0].outputs[0].token_ids


def test_stop_string_excluded_unless_asked(llm: LLM) -> None:
    base = llm.generate("class A:", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    text = base[0].outputs[0].text
    stop = text[5:8]
    assert len(stop) == 3
    cut = llm.generate("class A:", SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    kept = llm.generate("class A:", SamplingParams(temperature=0, max_tokens=20, stop=stop, ignore_eos=True,
                                                   include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + 3]


def test_stop_token_ids_and_max_tokens(llm: LLM) -> None:
    base = llm.generate("x = ", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    tokens = base.outputs[0].token_ids
    assert base.outputs[0].finish_reason == "length" and len(tokens) == 6
    stopped = llm.generate("x = ", SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[tokens[2]],
                                                  ignore_eos=True), use_tqdm=False)[0].outputs[0]
    first = tokens.index(tokens[2])
    assert stopped.token_ids == tokens[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == tokens[2]
    decode = llm.get_tokenizer().decode  # the stop token's text is left out unless asked for, as vLLM does
    assert stopped.text == decode(tokens[:first]) != decode(tokens[: first + 1])
    kept = llm.generate("x = ", SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[tokens[2]],
                                               ignore_eos=True, include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == decode(tokens[: first + 1])


def test_logprobs_returned_per_token(llm: LLM) -> None:
    out = llm.generate("for i in", SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token_id in entry and entry[token_id].rank == 1  # greedy picks the most likely
        assert 3 <= len(entry) <= 4
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs,
                                                                                     strict=True)))


def test_prompt_too_long_rejected_clearly_and_nothing_leaks(llm: LLM) -> None:
    with pytest.raises(ValueError, match="exceeds the maximum model length 1024"):
        llm.generate(["ok", [5] * 1020], SamplingParams(max_tokens=10), use_tqdm=False)
    assert_pool_free(llm)
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.generate([[1, 2, 100000]], SamplingParams(max_tokens=2), use_tqdm=False)


def test_vllm_prompt_dictionaries_and_arrays_generate_what_plain_prompts_do(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = llm.get_tokenizer()("def f(x):").input_ids
    plain = llm.generate(["def f(x):", ids], greedy, use_tqdm=False)
    forms = llm.generate([{"prompt": "def f(x):"}, {"prompt_token_ids": ids, "prompt": "shown as"},
                          torch.tensor(ids)], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in forms] == [plain[0].outputs[0].token_ids] * 3
    assert [o.prompt for o in forms] == ["def f(x):", "shown as", None]
    single = llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == plain[1].outputs[0].token_ids


def test_truncate_prompt_tokens_keeps_the_prompts_end(llm: LLM) -> None:
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    long = [3 + i % 500 for i in range(1200)]  # beyond max_model_len (1024)
    cut = llm.generate([long], SamplingParams(**greedy, truncate_prompt_tokens=50), use_tqdm=False)[0]
    tail = llm.generate([long[-50:]], SamplingParams(**greedy), use_tqdm=False)[0]
    assert cut.prompt_token_ids == long[-50:] and cut.outputs[0].token_ids == tail.outputs[0].token_ids
    whole = llm.generate([long[:40]], SamplingParams(**greedy, truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert whole.prompt_token_ids == long[:40]
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=r"SamplingParams\.truncate_prompt_tokens must be -1"):
            SamplingParams(truncate_prompt_tokens=bad)  # type: ignore[arg-type]


def test_bad_words_are_never_generated(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = llm.generate("def f(x):", greedy, use_tqdm=False)[0].outputs[0].token_ids
    word = next(w for t in plain if (w := tokenizer.decode([t]).strip()))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[word])
    banned = llm.generate("def f(x):", params, use_tqdm=False)[0].outputs[0].token_ids
    sequences = bad_words_token_ids([word], lambda text: tokenizer(text, add_special_tokens=False).input_ids)
    assert sequences and banned != plain
    for seq in sequences:
        assert all(banned[i : i + len(seq)] != seq for i in range(len(banned))), (word, seq, banned)


def test_malformed_prompts_rejected_clearly_and_nothing_leaks(llm: LLM) -> None:
    for prompts, message in [(["ok", [1, 2.5]], r"must be integers, got 2\.5"),
                             (["ok", {"text": "x"}], r"unsupported keys \['text'\]"),
                             ([{"prompt_token_ids": [1]}, None], "got NoneType")]:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, SamplingParams(max_tokens=4), use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests()
        assert_pool_free(llm)
    with pytest.raises(ValueError, match="got NoneType"):
        llm.generate(None, SamplingParams(max_tokens=2), use_tqdm=False)  # type: ignore[arg-type]
    assert llm.generate("ok", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_chat_uses_template(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4),
                   use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode(out.prompt_token_ids) == "user: hi\nassistant:"


def test_sharded_checkpoint_loads_same_as_single(tmp_path: Path, checkpoint_factory) -> None:
    from pagedllm.testing.checkpoints import build_checkpoint

    sharded = build_checkpoint(tmp_path / "sharded", "llama", max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    single = checkpoint_factory("llama")
    prompt = [[3, 4, 5, 6]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = LLM(str(sharded), device="cpu", kv_cache_memory_bytes=1 << 20).generate(prompt, params, use_tqdm=False)
    b = LLM(str(single), device="cpu", kv_cache_memory_bytes=1 << 20).generate(prompt, params, use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_loader_errors_name_the_problem(tmp_path: Path, llama_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        LLM(str(empty), device="cpu")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(llama_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        LLM(str(no_weights), device="cpu", kv_cache_memory_bytes=1 << 20)
    unknown = tmp_path / "unknown_arch"
    shutil.copytree(llama_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown model architecture 'FancyForCausalLM'.*LlamaForCausalLM"):
        LLM(str(unknown), device="cpu", kv_cache_memory_bytes=1 << 20)
    wrong = tmp_path / "wrong_shape"
    shutil.copytree(llama_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"checkpoint tensor .model\.layers\.0\.mlp\..*shape"):
        LLM(str(wrong), device="cpu", kv_cache_memory_bytes=1 << 20)
    with pytest.raises(ValueError, match=r"unknown device 'tpu9'; known backends: .*cpu"):
        LLM(str(llama_dir), device="tpu9")


def test_dummy_weights_from_config_only_directory(tmp_path: Path, llama_dir: Path) -> None:
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(llama_dir / "config.json", config_only / "config.json")
    llm = LLM(str(config_only), device="cpu", load_format="dummy", dtype="bfloat16", kv_cache_memory_bytes=1 << 20)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert out[0].outputs[0].text == ""  # no tokenizer: token ids only
    assert next(llm.llm_engine.executor.worker.runner.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bad_words needs the model's tokenizer"):
        llm.generate([[1, 2, 3]], SamplingParams(bad_words=["x"]), use_tqdm=False)


def test_engine_runs_the_backends_scheduler_limits(llm: LLM) -> None:
    """Unset ``max_num_seqs``/``max_num_batched_tokens`` come from the backend's capabilities (the ``cpu``
    backend names 256 and no budget: ``max(2048, max_num_seqs)``; the resolution itself:
    ``tests/unit/test_interface.py``)."""
    engine = llm.llm_engine
    assert engine.config.max_num_seqs == engine.scheduler.max_num_seqs == 256
    assert engine.max_num_batched_tokens == engine.scheduler.max_num_batched_tokens == 2048
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        EngineConfig(max_num_seqs=0)


def test_generation_config_defaults_apply(llm: LLM) -> None:
    params = llm.get_default_sampling_params()
    assert params.temperature == 0.0  # the tiny checkpoints' generation config does not sample


def test_kv_accounting_reports_waste_while_running(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), device="cpu", block_size=16, kv_cache_memory_bytes=1 << 20)
    engine = llm.llm_engine
    engine.add_request("r", list(range(1, 21)), SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 1 and stats.kv_cache_usage > 0
    assert stats.num_wasted_slots == 2 * 16 - 20
    engine.abort_request("r")
    assert engine.kv_cache_usage() == 0.0 and not engine.has_unfinished_requests()


def test_sampling_values_the_model_cannot_honour_are_rejected_up_front(llm: LLM) -> None:
    vocab = llm.llm_engine.model_config.vocab_size
    for ids in ([1, -1, 2], [vocab], [0, vocab - 1, vocab + 7]):
        with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, "):
            llm.generate([ids], SamplingParams(max_tokens=2), use_tqdm=False)
    for stop in ([vocab + 5], [-3]):
        with pytest.raises(ValueError, match=r"SamplingParams\.stop_token_ids must name token ids in"):
            llm.generate("x", SamplingParams(stop_token_ids=stop), use_tqdm=False)
    for name, params in [("logit_bias", SamplingParams(logit_bias={vocab: 1.0})),
                         ("allowed_token_ids", SamplingParams(allowed_token_ids=[3, vocab + 1]))]:
        with pytest.raises(ValueError, match=rf"SamplingParams\.{name} must name token ids in \[0, {vocab}\)"):
            llm.generate("x", params, use_tqdm=False)
    with pytest.raises(ValueError, match=r"SamplingParams\.logprobs must be <= 20"):
        llm.generate("x", SamplingParams(logprobs=10**6), use_tqdm=False)
    with pytest.raises(ValueError, match=r"SamplingParams\.prompt_logprobs must be <= 20"):
        llm.generate("x", SamplingParams(prompt_logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match=r"SamplingParams\.seed "):
        SamplingParams(seed=2**70)
    huge_k = llm.generate("x", SamplingParams(top_k=10**6, max_tokens=3, seed=1), use_tqdm=False)
    assert len(huge_k[0].outputs[0].token_ids) == 3  # top_k beyond the vocabulary means no filter
    assert_pool_free(llm)


def test_abort_reports_what_it_aborted(llm: LLM) -> None:
    engine = llm.llm_engine
    engine.add_request("keep-going", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    assert engine.abort_request(["keep-going", "never-existed"]) == ["keep-going"]
    assert engine.abort_request("keep-going") == []
    assert_pool_free(llm)


def test_final_only_requests_report_once_cumulative_every_step(llm: LLM) -> None:
    from pagedllm.core.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    kinds = {"cumulative": RequestOutputKind.CUMULATIVE, "final": RequestOutputKind.FINAL_ONLY}
    for name, kind in kinds.items():
        engine.add_request(name, [1, 2, 3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                            output_kind=kind))
    reports: dict[str, list[int]] = {name: [] for name in kinds}
    while engine.has_unfinished_requests():
        for output in engine.step():
            reports[output.request_id].append(len(output.outputs[0].token_ids))
    assert reports == {"cumulative": [1, 2, 3, 4, 5], "final": [5]}
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    assert len(llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids) == 3
    assert params.output_kind is RequestOutputKind.CUMULATIVE  # generate asks for final outputs on a copy
    assert_pool_free(llm)


def test_default_max_tokens_fits_the_pool(llama_dir: Path) -> None:
    small = LLM(str(llama_dir), device="cpu", block_size=4, num_kv_blocks=9)  # 32 slots, max_model_len 1024
    out = small.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                         use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 28 and out[0].outputs[0].finish_reason == "length"


def test_parallel_samples_share_the_prompt_blocks(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), device="cpu", block_size=8, kv_cache_memory_bytes=4 << 20)
    engine = llm.llm_engine
    engine.add_request("fan-out", list(range(1, 65)), SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=4,
                                                                     ignore_eos=True))
    engine.step()
    tables = [engine.block_manager.get_block_table(f"{i}_fan-out") for i in range(4)]
    shared = tables[0][:7]  # 64 prompt tokens = 8 blocks; the last holds the token each child must compute
    assert all(t[:7] == shared for t in tables)
    assert all(engine.block_manager.pool.ref_counts[b] == 4 for b in shared)
    assert len({t[7] for t in tables}) == 4  # each sample owns its tail block
    while engine.has_unfinished_requests():
        engine.step()
    assert_pool_free(llm)


def test_failing_step_aborts_the_call_and_the_engine_goes_on(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    executor = llm.llm_engine.executor

    def broken(*_args: object) -> None:
        raise RuntimeError("device fell over")

    monkeypatch.setattr(executor, "execute", broken)
    with pytest.raises(RuntimeError, match="device fell over"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=4), use_tqdm=False)
    assert_pool_free(llm)
    monkeypatch.undo()
    out = llm.generate("a", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
