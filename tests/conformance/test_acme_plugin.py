"""A real third-party plugin: ``tests/plugins/acme_pagedllm`` is pip-installed into this environment for the
module, used through every public path (``pagedllm backends``, ``--device acme``, ``LLM(device="acme")``, its
model architecture and CLI option, the conformance kit), then uninstalled."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedllm.backends import registry as registry_module
from pagedllm.backends.plugin_sources import BLOCK_ENV
from pagedllm.conformance.checkpoints import cached_checkpoint

ACME_SRC = Path(__file__).resolve().parents[1] / "plugins" / "acme_pagedllm"
DEVICE_ENV = "ACME_PAGEDLLM_DEVICE"
KV_BYTES = str(8 << 20)


def pip(*args: str) -> None:
    """Run pip of this interpreter, failing the test with its output."""
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` with this interpreter."""
    full_env = {k: v for k, v in os.environ.items() if k not in (DEVICE_ENV, BLOCK_ENV)} | (env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)


def forget_acme() -> None:
    """Drop imported acme modules and the process-wide registry, so the next use rediscovers plugins."""
    for name in [m for m in sys.modules if m == "acme_pagedllm" or m.startswith("acme_pagedllm.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    registry_module.reset_registry()


@pytest.fixture(scope="module")
def acme_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``pip install --no-deps --no-build-isolation`` a copy of the plugin (the build leaves the source tree
    clean), then uninstall it after the module."""
    source = tmp_path_factory.mktemp("acme-src") / "acme_pagedllm"
    shutil.copytree(ACME_SRC, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip("install", "--no-deps", "--no-build-isolation", "--quiet", str(source))
    forget_acme()
    try:
        yield
    finally:
        pip("uninstall", "--yes", "--quiet", "acme-pagedllm")
        forget_acme()


@pytest.fixture(scope="module")
def checkpoint_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tiny checkpoints are cached (shared with the conformance kit's default)."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("pagedllm-conformance")) if cache is not None else tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def llama(checkpoint_root: Path) -> Path:
    """A tiny Llama checkpoint with heads of 64 (a size acme claims)."""
    return cached_checkpoint(checkpoint_root, "llama", 64)


@pytest.fixture
def acme_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulate the presence of an Acme accelerator in this process."""
    monkeypatch.setenv(DEVICE_ENV, "1")
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    registry_module.reset_registry()


def test_listed_by_pagedllm_backends(acme_installed: None) -> None:
    absent = run("-m", "pagedllm", "backends", "--json")
    assert absent.returncode == 0, absent.stderr
    rows = {row["name"]: row for row in json.loads(absent.stdout)["backends"]}
    acme = rows["acme"]
    assert (acme["distribution"], acme["version"], acme["interface_version"]) == ("acme-pagedllm", "0.1.0", "1.0")
    assert acme["available"] is False and "no Acme accelerator found" in acme["reason"]
    assert acme["capabilities"]["dtypes"] == ["float32", "bfloat16"] and acme["capabilities"]["block_sizes"] == [16, 32]
    assert json.loads(absent.stdout)["selected"] == "cpu"



def test_listed_as_selected_when_its_device_is_present(
    acme_installed: None, acme_device: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from pagedllm.entrypoints.cli import main

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    acme_row = next(line for line in out.splitlines() if " acme " in line)
    assert acme_row.split()[:4] == ["*", "acme", "acme-pagedllm", "0.1.0"] and " yes " in acme_row
    assert "--device auto selects: acme" in out  # a third-party backend before the built-ins


def test_device_acme_is_authoritative_on_the_command_line(
    acme_installed: None, llama: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pagedllm.entrypoints.cli import main

    args = ("generate", str(llama), "--device", "acme", "--prompt", "def main(", "--max-tokens", "4",
            "--kv-cache-memory-bytes", KV_BYTES, "--max-model-len", "128")
    present = run("-m", "pagedllm", *args, env={DEVICE_ENV: "1"})  # a fresh process, as an operator runs it
    assert present.returncode == 0, present.stderr
    assert "device acme: backend 'acme' (distribution 'acme-pagedllm' 0.1.0)" in present.stderr
    assert "backend acme, model" in present.stderr and present.stdout.startswith("def main(")
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    registry_module.reset_registry()
    assert main(list(args)) == 2
    assert "backend 'acme' is not available: no Acme accelerator found" in capsys.readouterr().err
    monkeypatch.setenv(DEVICE_ENV, "1")
    monkeypatch.setenv(BLOCK_ENV, "acme")
    registry_module.reset_registry()
    assert main(list(args)) == 2
    assert f"blocked by {BLOCK_ENV}: acme" in capsys.readouterr().err
    registry_module.reset_registry()


def test_generation_runs_through_acme_and_equals_cpu(acme_installed: None, acme_device: None, llama: Path) -> None:
    from acme_pagedllm.backend import CALLS

    from pagedllm.core.sampling_params import SamplingParams
    from pagedllm.entrypoints.llm import LLM

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = ["def add(a, b):", "import os\n", "x"]
    outputs = {}
    for device in ("cpu", "acme"):
        before = dict(CALLS)
        llm = LLM(str(llama), device=device, kv_cache_memory_bytes=int(KV_BYTES), max_model_len=128)
        assert llm.llm_engine.backend_cls.name == device
        outputs[device] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.llm_engine.shutdown()
        calls = CALLS["attention"] - before.get("attention", 0)
        if device == "cpu":
            assert calls == 0
        else:  # one call per layer per step: 2 layers, at least max_tokens steps
            assert calls >= 2 * params.max_tokens and CALLS["write_kv_cache"] >= calls
    assert outputs["acme"] == outputs["cpu"]
    llm = LLM(str(llama), kv_cache_memory_bytes=int(KV_BYTES), max_model_len=128)  # device="auto"
    assert llm.llm_engine.backend_cls.name == "acme"
    llm.llm_engine.shutdown()


def test_acme_model_architecture_and_cli_option(
    acme_installed: None, acme_device: None, llama: Path, tmp_path: Path
) -> None:
    from pagedllm.core.sampling_params import SamplingParams
    from pagedllm.entrypoints.cli import build_parser
    from pagedllm.entrypoints.llm import LLM

    model = shutil.copytree(llama, tmp_path / "acme-llama")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["AcmeLlamaForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    llm = LLM(str(model), device="acme", kv_cache_memory_bytes=int(KV_BYTES), max_model_len=128)
    assert type(llm.llm_engine.executor.worker.runner.model).__name__ == "AcmeLlamaForCausalLM"
    assert llm.generate("x", SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    llm.llm_engine.shutdown()
    parser, _ = build_parser()
    assert parser.parse_args(["generate", "--prompt", "x", "--acme-profile"]).acme_profile is True
    assert parser.parse_args(["backends", "--acme-profile"]).acme_profile is True


def test_conformance_kit_passes_on_acme(acme_installed: None, checkpoint_root: Path, tmp_path: Path) -> None:
    result = run("-m", "pytest", "--pyargs", "pagedllm.conformance", "--device", "acme", "-q", "-p", "no:cacheprovider",
                 "--conformance-cache-dir", str(checkpoint_root), env={DEVICE_ENV: "1"}, cwd=tmp_path)
    tail = result.stdout[-3000:]
    assert result.returncode == 0, tail
    assert "backend 'acme' from acme-pagedllm 0.1.0 (interface 1.0, device cpu)" in tail
    assert "claims: float32,bfloat16; blocks 16,32; heads 64,128" in tail
    assert " 0 failed, 0 error" in tail
    assert "x dtype float16 not claimed (claims float32, bfloat16)" in tail
    assert "x head size 80 not claimed (claims 64, 128)" in tail
    print(tail)
