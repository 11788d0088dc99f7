"""``LLM.embed``: last-token embeddings equal transformers' final hidden states (normalized) on the same
checkpoint, under chunked prefill, preemption, prefix caching and asynchronous scheduling, beside generation in
the same batch; Matryoshka ``dimensions``; tensor parallelism; bad parameters refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, EmbeddingRequestOutput, PoolingParams, SamplingParams
from tests.conftest import assert_pool_free
from tests.e2e.test_hf_parity import mixed_prompts


def hf_last_hidden(model_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """transformers' final hidden state (after the last norm) of each prompt's last token, float32."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return [model(torch.tensor([p])).last_hidden_state[0, -1] for p in prompts]


def as_tensors(outputs: list[EmbeddingRequestOutput]) -> list[torch.Tensor]:
    assert all(isinstance(o, EmbeddingRequestOutput) and o.finished for o in outputs)
    return [torch.tensor(o.outputs.embedding) for o in outputs]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe"])
def test_embeddings_equal_transformers_last_hidden_state(checkpoint_factory, arch: str, asynchronous: bool) -> None:
    model_dir = checkpoint_factory(arch)
    # 64-token steps and a pool of ~100 4-token blocks: long prompts are chunked and requests preempted;
    # two prompts share a 200-token prefix (prefix-cache hits)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=64,
              num_kv_blocks=100, enable_prefix_caching=True, async_scheduling=asynchronous)
    prompts = mixed_prompts(llm.get_tokenizer())
    outputs = llm.embed(prompts, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    for got, hidden in zip(as_tensors(outputs), hf_last_hidden(model_dir, prompts), strict=True):
        torch.testing.assert_close(got, torch.nn.functional.normalize(hidden, dim=0), atol=2e-5, rtol=1e-4)
    assert llm.llm_engine.stats().prefix_cache_hit_tokens > 0
    assert_pool_free(llm)


def test_embeddings_share_the_batch_with_generation_and_leave_it_unchanged(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", max_num_batched_tokens=64)
    prompts = mixed_prompts(llm.get_tokenizer())
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts):  # generation and embeddings interleaved, stepped together
        engine.add_request(f"gen-{i}", prompt, params)
        engine.add_request(f"emb-{i}", prompt, PoolingParams(dimensions=16, normalize=False))
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert [done[f"gen-{i}"].outputs[0].token_ids for i in range(len(prompts))] == alone
    full = as_tensors(llm.embed(prompts, PoolingParams(normalize=False), use_tqdm=False))
    for i, whole in enumerate(full):
        cut = torch.tensor(done[f"emb-{i}"].outputs.embedding)
        assert cut.shape == (16,)
        torch.testing.assert_close(cut, whole[:16])  # Matryoshka: the first features, not renormalized
    normalized = as_tensors(llm.embed(prompts[:2], PoolingParams(dimensions=16), use_tqdm=False))
    for v in normalized:
        assert v.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert_pool_free(llm)


def test_bad_pooling_params_are_refused(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="dimensions must be between 1 and the model's hidden size 64"):
        llm.embed("hello", PoolingParams(dimensions=65), use_tqdm=False)
    with pytest.raises(ValueError, match="got 1 pooling params for 2 prompts"):
        llm.embed(["a", "b"], [PoolingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match=r"LLM\.embed takes PoolingParams"):
        llm.embed("a", SamplingParams(), use_tqdm=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"use LLM\.embed"):
        llm.generate("a", PoolingParams(), use_tqdm=False)  # type: ignore[arg-type]
    assert_pool_free(llm)
    long = "word " * 2000
    with pytest.raises(ValueError, match=r"longer than an embedding takes: at most 1023 tokens"):
        llm.embed(long, use_tqdm=False)
    out = llm.embed(long, PoolingParams(truncate_prompt_tokens=-1), use_tqdm=False)  # as many as the model takes
    assert len(out[0].prompt_token_ids) == llm.llm_engine.model_config.max_model_len - 1


@pytest.mark.timeout(180)
def test_tp2_embeddings_equal_tp1(checkpoint_factory) -> None:
    model_dir = checkpoint_factory("qwen3")
    prompts = [[1, 2, 3, 4, 5], [100, 200, 300], list(range(10, 40))]
    kwargs = dict(device="cpu", dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 22)
    want = as_tensors(LLM(str(model_dir), **kwargs).embed(prompts, use_tqdm=False))
    llm = LLM(str(model_dir), tensor_parallel_size=2, **kwargs)
    try:
        got = as_tensors(llm.embed(prompts, use_tqdm=False))
    finally:
        llm.llm_engine.shutdown()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_an_aborted_embedding_frees_its_blocks(llama_dir: Path, asynchronous: bool) -> None:
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", max_num_batched_tokens=16, async_scheduling=asynchronous)
    engine = llm.llm_engine
    engine.add_request("emb", list(range(5, 105)), PoolingParams())  # 100 tokens: 7 steps of 16
    engine.add_request("gen", [7, 8, 9], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()
    assert engine.kv_cache_usage() > 0
    assert engine.abort_request("emb") == ["emb"]
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert "emb" not in finished and len(finished["gen"].outputs[0].token_ids) == 4
    assert_pool_free(llm)


def test_a_sentence_transformers_checkpoint_must_pool_its_last_token(llama_dir: Path, tmp_path: Path) -> None:
    """Qwen3-Embedding's layout (``modules.json`` naming ``1_Pooling`` with last-token pooling) embeds; a
    checkpoint declaring mean pooling is refused with the mode named, not embedded the wrong way."""
    import json
    import shutil

    model_dir = tmp_path / "st"
    shutil.copytree(llama_dir, model_dir)
    (model_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (model_dir / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
               "pooling_mode_lasttoken": True}
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    embedded = LLM(str(model_dir), device="cpu", dtype="float32").embed("hi", use_tqdm=False)
    assert len(embedded[0].outputs.embedding) == 64
    pooling.update(pooling_mode_lasttoken=False, pooling_mode_mean_tokens=True)
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    llm = LLM(str(model_dir), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="pools by 'mean'; pagedllm computes last-token embeddings only"):
        llm.embed("hi", use_tqdm=False)
    assert_pool_free(llm)
