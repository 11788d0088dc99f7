"""``pagedllm bench throughput`` and ``latency`` on the cpu backend with the demo model: both engines in one
invocation, and transformers on a seeded sample of the workload when ``--hf-num-prompts`` asks for one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagedllm.bench.hf_runner import load_hf_model
from pagedllm.bench.throughput import hf_sample
from pagedllm.bench.workloads import BenchRequest
from pagedllm.entrypoints.cli import main


@pytest.mark.timeout(300)
def test_throughput_runs_both_engines_and_samples_the_peer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "result.json"
    rc = main(["bench", "throughput", "--device", "cpu", "--dtype", "float32", "--dataset", "sharegpt",
               "--num-prompts", "6", "--hf-num-prompts", "3", "--max-model-len", "1024", "--async-scheduling",
               "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    engines = {r["engine"]: r for r in result["results"]}
    assert set(engines) == {"pagedllm", "hf"}
    assert engines["hf"]["extra"]["sample"] == "3/6"
    assert engines["pagedllm"]["extra"]["gc"].startswith("0 full")  # the start's heap frozen while timed
    assert all(r["total_tokens_per_s"] > 0 for r in engines.values())
    printed = capsys.readouterr().out
    assert "ratio: pagedllm / hf" in printed
    assert "async_scheduling=on" in printed and "async_scheduling=on" in " ".join(result["lines"])


@pytest.mark.timeout(300)
def test_latency_runs_both_engines_against_the_weight_read_floor(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    rc = main(["bench", "latency", "--device", "cpu", "--dtype", "float32", "--batch-size", "2", "--input-len", "16",
               "--output-len", "8", "--num-iters", "1", "--max-model-len", "1024", "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert {r["engine"] for r in result["results"]} == {"pagedllm", "hf"}
    for r in result["results"]:
        assert float(r["extra"]["per_token_ms"]) > 0 and float(r["extra"]["x_floor"]) > 0
    assert any(line.startswith("pagedllm engine: ") and "async_scheduling=off" in line for line in result["lines"])


@pytest.mark.timeout(300)
def test_latency_with_fp8_layers_reports_the_floor_of_the_stored_weights(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    rc = main(["bench", "latency", "--device", "cpu", "--dtype", "bfloat16", "--quantization", "fp8", "--batch-size",
               "1", "--input-len", "8", "--output-len", "4", "--num-iters", "1", "--backend", "pagedllm",
               "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    extra = result["results"][0]["extra"]
    # fewer bytes to read (the projections at one byte), so the same time is further from its floor
    assert float(extra["x_floor_stored"]) > float(extra["x_floor"]) > 0
    assert any("quantization=fp8" in line and "GB" in line for line in result["lines"])


@pytest.mark.timeout(300)
def test_the_report_names_the_quantization_a_checkpoint_brings(checkpoint_factory, tmp_path: Path) -> None:
    """A config declaring fp8 weights runs them without ``--quantization``: the engine line says what ran."""
    config = json.loads((checkpoint_factory("llama") / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "result.json"
    rc = main(["bench", "throughput", "--model", str(tmp_path), "--load-format", "dummy", "--device", "cpu",
               "--input-len", "8", "--output-len", "2", "--num-prompts", "2", "--backend", "pagedllm",
               "--output-json", str(out)])
    assert rc == 0
    lines = json.loads(out.read_text())["lines"]
    assert any(line.startswith("pagedllm engine: ") and "quantization=fp8," in line for line in lines)


def test_hf_sample_is_seeded_ordered_and_validated() -> None:
    requests = [BenchRequest([i], 1) for i in range(10)]
    assert hf_sample(requests, None, 0) is requests and hf_sample(requests, 10, 0) is requests
    sample = hf_sample(requests, 4, 0)
    assert sample == hf_sample(requests, 4, 0) and len(sample) == 4
    ids = [r.prompt_token_ids[0] for r in sample]
    assert ids == sorted(ids)
    with pytest.raises(ValueError, match="--hf-num-prompts"):
        hf_sample(requests, 0, 0)


def test_hf_dummy_weights_drawn_as_transformers_or_as_pagedllm_draws_them(checkpoint_factory) -> None:
    """``--hf-dummy-init pagedllm`` gives the peer pagedllm's dummy distribution (every parameter uniform in
    [-0.01, 0.01]); the default keeps transformers' initialization (norm weights of one)."""
    model_dir = str(checkpoint_factory("llama"))
    ours = load_hf_model(model_dir, torch.float32, torch.device("cpu"), dummy=True, dummy_init="pagedllm")
    theirs = load_hf_model(model_dir, torch.float32, torch.device("cpu"), dummy=True)
    for name, param in ours.named_parameters():
        assert param.abs().max() <= 1e-2 and param.abs().max() > 5e-3, name
    norms = [p for name, p in theirs.named_parameters() if name.endswith("norm.weight")]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    with pytest.raises(ValueError, match="dummy_init"):
        load_hf_model(model_dir, torch.float32, torch.device("cpu"), dummy=True, dummy_init="zeros")


@pytest.mark.timeout(300)
def test_throughput_reports_the_peers_dummy_init(checkpoint_factory, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    rc = main(["bench", "throughput", "--model", str(checkpoint_factory("llama")), "--load-format", "dummy",
               "--device", "cpu", "--dtype", "float32", "--input-len", "8", "--output-len", "2", "--num-prompts", "2",
               "--backend", "hf", "--hf-dummy-init", "pagedllm", "--output-json", str(out)])
    assert rc == 0
    assert json.loads(out.read_text())["results"][0]["extra"]["init"] == "pagedllm"


@pytest.mark.timeout(300)
def test_throughput_with_a_lora_adapter_in_both_engines(checkpoint_factory, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """``--lora-path``: every request runs with the adapter (two slots in turn) in pagedllm, and through PEFT in
    transformers; the report names the adapter; a path without ``--enable-lora``, or an adapter wider than
    ``--max-lora-rank``, is refused before any engine starts."""
    pytest.importorskip("peft")
    from pagedllm.testing.lora_adapters import write_lora_adapter

    model = checkpoint_factory("llama")
    adapter = write_lora_adapter(model, tmp_path / "adapter", ("q_proj", "down_proj"), r=4)
    out = tmp_path / "lora.json"
    common = ["bench", "throughput", "--model", str(model), "--device", "cpu", "--dtype", "float32",
              "--num-prompts", "4", "--input-len", "16", "--output-len", "4", "--lora-path", str(adapter)]
    assert main([*common, "--enable-lora", "--max-loras", "2", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    engines = {r["engine"]: r for r in result["results"]}
    assert set(engines) == {"pagedllm", "hf"} and engines["hf"]["extra"]["lora"] == "peft"
    assert any(line.startswith("LoRA: ") and "rank 4" in line and "ids 1..2" in line for line in result["lines"])
    assert any("enable_lora (max_loras=2" in line for line in result["lines"])
    capsys.readouterr()
    assert main(common) == 2
    assert "--lora-path needs --enable-lora" in capsys.readouterr().err
    assert main([*common, "--enable-lora", "--max-lora-rank", "2"]) == 2
    assert "rank 4" in capsys.readouterr().err
