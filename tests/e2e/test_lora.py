"""LoRA adapters (``enable_lora``, ``LoRARequest``): token for token what transformers + PEFT generate with the same
adapter, for two adapters (one training every projection at rank 8, one training three at rank 4 with rsLoRA
scaling) and the base model in one batch, under chunked prefill, prefix caching and preemption, with fewer
adapter slots than adapters, in recorded decode steps, and under tensor parallelism 2; the prefix cache never
shares blocks between adapters; bad adapters and requests are refused naming the problem; the server serves
adapters by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from pagedllm import LLM, LoRARequest, SamplingParams  # noqa: E402
from pagedllm.testing.lora_adapters import build_lora_adapter  # noqa: E402
from tests.conftest import assert_pool_free  # noqa: E402

MAX_TOKENS = 10
PARAMS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)  # EOS held off as HF's


@pytest.fixture(scope="module")
def adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    """Two adapters of the tiny Llama and the transformers + PEFT models that apply them."""
    root = tmp_path_factory.mktemp("lora")
    wide = build_lora_adapter(llama_dir, root / "wide", r=8, alpha=16.0, seed=1)
    narrow = build_lora_adapter(llama_dir, root / "narrow", ("q_proj", "v_proj", "down_proj"), r=4, alpha=4.0,
                                seed=2, use_rslora=True)
    return {"wide": (root / "wide", wide), "narrow": (root / "narrow", narrow)}


def prompts() -> list[list[int]]:
    return [list(range(5, 40)), list(range(100, 130)), list(range(200, 290)), list(range(300, 307))]


def reference(model: object, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def expected(adapters, llama_dir: Path) -> dict[str | None, list[list[int]]]:
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    want: dict[str | None, list[list[int]]] = {None: [reference(base, p) for p in prompts()]}
    for name, (_, model) in adapters.items():
        want[name] = [reference(model, p) for p in prompts()]
    assert want["wide"] != want[None] and want["narrow"] != want[None]  # the adapters change the tokens
    return want


def requests(adapters) -> dict[str | None, LoRARequest | None]:
    return {None: None, "wide": LoRARequest("wide", 1, str(adapters["wide"][0])),
            "narrow": LoRARequest("narrow", 2, str(adapters["narrow"][0]))}


@pytest.mark.parametrize("max_loras", [2, 1])
def test_adapters_and_base_share_batches_and_equal_peft(llama_dir: Path, adapters, expected, max_loras: int) -> None:
    """Every prompt with each adapter and without, interleaved, under a 16-token step budget (chunked prefill)
    and a pool small enough to preempt; with one slot the adapters take turns."""
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16,
              num_kv_blocks=34, enable_lora=True, max_loras=max_loras, max_lora_rank=8)
    loras = requests(adapters)
    names = [None, "wide", "narrow"] * len(prompts())
    batch = [prompts()[i // 3] for i in range(len(names))]
    outputs = llm.generate(batch, PARAMS, use_tqdm=False, lora_request=[loras[n] for n in names])
    for i, (name, output) in enumerate(zip(names, outputs, strict=True)):
        assert output.outputs[0].token_ids == expected[name][i // 3], f"prompt {i // 3} with adapter {name}"
    assert llm.llm_engine.stats().num_preemptions > 0
    assert_pool_free(llm)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_decode_graphs_read_each_rows_adapter(llama_dir: Path, adapters, expected, monkeypatch: pytest.MonkeyPatch,
                                              async_scheduling: bool) -> None:
    """Recorded decode steps (the ``cpu`` backend with emulated graphs: a replay re-runs the step over the static
    buffers) take each row's adapter slot from a static buffer: rows of both adapters and of the base model in
    one replay, padded buckets, equal to transformers + PEFT."""
    from pagedllm.backends.registry import get_registry
    from tests.e2e.graph_cpu_backend import GraphCpuBackend

    monkeypatch.setattr(get_registry(), "resolve_backend", lambda device: GraphCpuBackend)
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8,
              max_num_seqs=8, async_scheduling=async_scheduling)
    runner = llm.llm_engine.executor.worker.runner
    assert runner.graph_runner is not None
    replays: list[int] = []
    run = runner.graph_runner.run

    def counting_run(*args: object, **kwargs: object) -> object:
        replays.append(int(kwargs.get("lora_rows") is not None))  # a replay with adapter rows
        return run(*args, **kwargs)

    monkeypatch.setattr(runner.graph_runner, "run", counting_run)
    loras = requests(adapters)
    names = ["wide", None, "narrow"] * 2 + ["narrow"]
    batch = [prompts()[i % 4] for i in range(len(names))]
    outputs = llm.generate(batch, PARAMS, use_tqdm=False, lora_request=[loras[n] for n in names])
    for i, (name, output) in enumerate(zip(names, outputs, strict=True)):
        assert output.outputs[0].token_ids == expected[name][i % 4], f"prompt {i % 4} with adapter {name}"
    assert sum(replays) >= MAX_TOKENS - 2  # the decode steps replayed, with adapter rows
    assert_pool_free(llm)


def test_prefix_cache_keeps_adapters_apart(llama_dir: Path, adapters, expected) -> None:
    """The same prompt with an adapter, then without, then with the other: none reuses another's blocks."""
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", block_size=4, enable_lora=True, max_lora_rank=8)
    loras = requests(adapters)
    for name in ("wide", None, "narrow", "wide"):
        (output,) = llm.generate([prompts()[2]], PARAMS, use_tqdm=False, lora_request=loras[name])
        assert output.outputs[0].token_ids == expected[name][2], name
    assert llm.llm_engine.stats().prefix_cache_hit_tokens > 0  # the second "wide" hit its own blocks


def test_tensor_parallel_adapters_equal_peft(llama_dir: Path, adapters, expected) -> None:
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8,
              tensor_parallel_size=2)
    loras = requests(adapters)
    names = ["wide", "narrow", None]
    outputs = llm.generate([prompts()[0]] * 3, PARAMS, use_tqdm=False, lora_request=[loras[n] for n in names])
    assert [o.outputs[0].token_ids for o in outputs] == [expected[n][0] for n in names]


ARCH_TARGETS = {arch: None for arch in ("mistral", "ministral", "qwen2", "qwen3", "granite", "gemma2", "gemma3",
                                         "phi3", "olmo2", "mixtral", "qwen2_moe")}
# PEFT 0.21 on transformers 5 takes an MoE model's MLP targets for its experts and leaves the dense layers' MLPs
# unadapted, so Qwen3-MoE (whose tiny config has a dense layer) is compared on its attention only
ARCH_TARGETS["qwen3_moe"] = ("q_proj", "k_proj", "v_proj", "o_proj")
ARCH_TARGETS["phi3"] = ("qkv_proj", "gate_up_proj")  # only the fused ones: their update alone changes the tokens


# tensor parallelism for the fused projections, a shared expert and Gemma 3's norms
ARCH_CASES = [(arch, 1) for arch in sorted(ARCH_TARGETS)] + [("phi3", 2), ("qwen2_moe", 2), ("gemma3", 2)]


@pytest.mark.parametrize(("arch", "tp"), ARCH_CASES)
def test_adapters_of_other_architectures_equal_peft(checkpoint_factory, arch: str, tp: int, tmp_path: Path) -> None:
    """An adapter of every projection the architecture's checkpoint names (Phi-3's fused ``qkv_proj`` and
    ``gate_up_proj`` whole; Mixtral's and Qwen2-MoE's attention and shared expert; the experts are not adapted)
    gives transformers + PEFT's tokens, and not the base model's, on one rank and split over two."""
    model_dir = checkpoint_factory(arch)
    targets = ARCH_TARGETS[arch]
    peft_model = build_lora_adapter(model_dir, tmp_path / "adapter", *([targets] if targets else []), r=8, seed=1)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8,
              tensor_parallel_size=tp)
    prompt = prompts()[0]
    got = llm.generate([prompt] * 2, PARAMS, use_tqdm=False,
                       lora_request=[LoRARequest("a", 1, str(tmp_path / "adapter")), None])
    assert got[0].outputs[0].token_ids == reference(peft_model, prompt)
    assert got[0].outputs[0].token_ids != got[1].outputs[0].token_ids


def test_bad_adapters_and_requests_are_refused(llama_dir: Path, adapters, tmp_path: Path) -> None:
    wide = LoRARequest("wide", 1, str(adapters["wide"][0]))
    plain = LLM(str(llama_dir), device="cpu", num_kv_blocks=16)
    with pytest.raises(ValueError, match="LoRA adapter 'wide' was asked for, but LoRA is off"):
        plain.generate([[1, 2, 3]], PARAMS, use_tqdm=False, lora_request=wide)
    llm = LLM(str(llama_dir), device="cpu", num_kv_blocks=16, enable_lora=True, max_lora_rank=4)
    with pytest.raises(ValueError, match="LoRA adapter 'wide' has rank 8, above max_lora_rank 4"):
        llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False, lora_request=wide)
    with pytest.raises(ValueError, match=r"no adapter_config\.json there"):
        llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False, lora_request=LoRARequest("x", 3, str(tmp_path)))
    narrow = str(adapters["narrow"][0])
    llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False, lora_request=LoRARequest("n", 2, narrow))
    copy = shutil.copytree(narrow, tmp_path / "copy")
    with pytest.raises(ValueError, match=r"lora_int_id 2 names adapter .* already"):
        llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False, lora_request=LoRARequest("m", 2, str(copy)))
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((adapters["narrow"][0] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA adapters are not supported"):
        llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False, lora_request=LoRARequest("d", 4, str(dora)))
    with pytest.raises(ValueError, match="lora_int_id must be a positive integer"):
        LoRARequest("z", 0, narrow)
    with pytest.raises(ValueError, match="got 1 LoRA requests for 2 prompts"):
        llm.generate([[1, 2], [3, 4]], PARAMS, use_tqdm=False, lora_request=[None])
    assert_pool_free(llm)
    with pytest.raises(ValueError, match="enable_lora cannot be combined with quantization 'fp8'"):
        LLM(str(llama_dir), device="cpu", enable_lora=True, quantization="fp8")


def test_server_serves_adapters_by_name(llama_dir: Path, adapters, expected, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from pagedllm.testing.server import ServerProcess

    args = ["--device", "cpu", "--dtype", "float32", "--enable-lora", "--max-lora-rank", "8", "--lora-modules",
            f"wide={adapters['wide'][0]}", json.dumps({"name": "narrow", "path": str(adapters["narrow"][0])})]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    with ServerProcess(llama_dir, args) as server:
        client = server.client()
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {str(llama_dir), "wide", "narrow"}
        assert cards["wide"].model_extra["parent"] == str(llama_dir)
        for name in ("wide", "narrow", None):
            model = name or str(llama_dir)
            reply = client.completions.create(model=model, prompt=prompts()[1], max_tokens=MAX_TOKENS,
                                              temperature=0.0, extra_body={"min_tokens": MAX_TOKENS})
            assert reply.model == model and reply.choices[0].text == tokenizer.decode(expected[name][1])
        # bench serve spreads its requests over the adapters (a name the server does not serve is refused)
        from pagedllm.entrypoints.cli import main

        out = tmp_path / "serve.json"
        bench = ["bench", "serve", "--base-url", server.url, "--num-prompts", "6", "--input-len", "16",
                 "--output-len", "4", "--result-json", str(out), "--lora-modules", "wide", "narrow"]
        assert main(bench) == 0
        result = json.loads(out.read_text())
        assert result["num_successful"] == 6 and set(result["request_models"]) == {"wide", "narrow"}
        assert main([*bench, "nope"]) == 2


def test_server_loads_and_unloads_adapters_at_run_time(llama_dir: Path, adapters, expected, tmp_path: Path) -> None:
    """``--allow-runtime-lora-updating``: ``POST /v1/load_lora_adapter`` serves an adapter under a new name (its
    completions equal PEFT's), a second load of the name, a bad directory and an adapter wider than the engine
    takes are refused in the OpenAI error format; ``/v1/unload_lora_adapter`` stops serving it (requests naming it
    then get a 404, as does a second unload), and a reload from another directory under the same name runs the
    new adapter, not the slot the old one left. Without the setting the routes do not exist."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    import httpx
    from transformers import AutoTokenizer

    from tests.e2e.openai_server import MODEL, in_process_client

    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    wide, narrow = (str(adapters[name][0]) for name in ("wide", "narrow"))
    engine_args = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1}

    def complete(client, model: str) -> str:
        return client.completions.create(model=model, prompt=prompts()[1], max_tokens=MAX_TOKENS, temperature=0.0,
                                         extra_body={"min_tokens": MAX_TOKENS}).choices[0].text

    def post(client, route: str, **body: object) -> str:
        return client.post(route, body=body, cast_to=httpx.Response).text

    with in_process_client(llama_dir, engine_args, allow_runtime_lora_updating=True) as (client, _):
        assert post(client, "/load_lora_adapter", lora_name="sql", lora_path=wide) == \
            "Success: LoRA adapter 'sql' added successfully."
        assert "sql" in {m.id for m in client.models.list().data}
        assert complete(client, "sql") == tokenizer.decode(expected["wide"][1])
        with pytest.raises(openai.BadRequestError, match="already been loaded"):
            post(client, "/load_lora_adapter", lora_name="sql", lora_path=narrow)
        with pytest.raises(openai.BadRequestError, match=r"adapter_config\.json"):
            post(client, "/load_lora_adapter", lora_name="none", lora_path=str(tmp_path))
        with pytest.raises(openai.BadRequestError, match="lora_path: Field required"):
            post(client, "/load_lora_adapter", lora_name="half")
        assert post(client, "/unload_lora_adapter", lora_name="sql") == \
            "Success: LoRA adapter 'sql' removed successfully."
        with pytest.raises(openai.NotFoundError):
            complete(client, "sql")
        with pytest.raises(openai.NotFoundError, match="no LoRA adapter 'sql'"):
            post(client, "/unload_lora_adapter", lora_name="sql")
        post(client, "/load_lora_adapter", lora_name="sql", lora_path=narrow)  # the one slot still holds "wide"
        assert complete(client, "sql") == tokenizer.decode(expected["narrow"][1])
        assert complete(client, MODEL) == tokenizer.decode(expected[None][1])  # the base model untouched
    narrow_engine = {"enable_lora": True, "max_lora_rank": 2}
    with in_process_client(llama_dir, narrow_engine, allow_runtime_lora_updating=True) as (client, _), \
            pytest.raises(openai.BadRequestError, match="rank"):
        post(client, "/load_lora_adapter", lora_name="sql", lora_path=wide)
    with in_process_client(llama_dir, engine_args) as (client, _), pytest.raises(openai.NotFoundError):
        post(client, "/load_lora_adapter", lora_name="sql", lora_path=wide)


def test_runtime_lora_updating_needs_lora(llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("uvicorn")
    from pagedllm.entrypoints.cli import main

    assert main(["serve", str(llama_dir), "--device", "cpu", "--allow-runtime-lora-updating"]) == 2
    assert "--allow-runtime-lora-updating needs --enable-lora" in capsys.readouterr().err


def test_stats_and_metrics_name_the_adapters_in_use(llama_dir: Path, adapters) -> None:
    """``EngineStats`` lists the adapters of waiting and running requests, and the server's
    ``pagedllm:lora_requests_info`` carries them as vLLM's ``lora_requests_info`` does (one series: the latest)."""
    pytest.importorskip("prometheus_client")
    from pagedllm.core.config import EngineConfig
    from pagedllm.core.engine import LLMEngine
    from pagedllm.entrypoints.openai.metrics import ServerMetrics

    engine = LLMEngine(EngineConfig(model=str(llama_dir), device="cpu", dtype="float32", enable_lora=True,
                                    max_loras=1, max_lora_rank=8, kv_cache_memory_bytes=4 << 20))
    loras = requests(adapters)
    for name in ("wide", "narrow", None):
        engine.add_request(None, prompts()[0], SamplingParams(max_tokens=4), lora_request=loras[name])
    before = engine.stats()
    assert (before.max_loras, before.running_lora_adapters, before.waiting_lora_adapters) == (1, (), ("narrow",
                                                                                                    "wide"))
    engine.step()
    after = engine.stats()  # one slot: "wide" runs (with the base request), "narrow" waits for it
    assert after.running_lora_adapters == ("wide",) and after.waiting_lora_adapters == ("narrow",)
    metrics = ServerMetrics("tiny")
    metrics.observe([], [], before)
    metrics.observe([], [], after)
    text = metrics.render()[0].decode()
    series = [line for line in text.splitlines() if line.startswith("pagedllm:lora_requests_info{")]
    assert len(series) == 1
    assert 'max_lora="1"' in series[0] and 'running_lora_adapters="wide"' in series[0]
    assert 'waiting_lora_adapters="narrow"' in series[0]
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().running_lora_adapters == ()
