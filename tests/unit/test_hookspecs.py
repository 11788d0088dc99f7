"""Every hookspec is prefixed, typed, documented, implemented by the fixture plugin, described in the plugin
guide, and exercised by a ``test_hook_<name>`` test (the datasette rule); the ``test_hook_*`` tests are here."""

from __future__ import annotations

import argparse
import ast
import inspect
import pathlib
import typing
from pathlib import Path

import pytest

import pagedllm
from pagedllm.backends import hookspecs
from pagedllm.backends import registry as registry_module
from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.hookspecs import hookimpl
from pagedllm.backends.plugin_sources import PluginSource
from pagedllm.backends.registry import PluginRegistry, hook_names

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
ACME_PLUGIN = TESTS / "plugins" / "acme_pagedllm" / "acme_pagedllm" / "plugin.py"
PLUGIN_GUIDE = REPO / "README.md"  # its "Writing a backend plugin" section
HOOKS = hook_names()


def spec(name: str) -> typing.Callable[..., object]:
    """The hookspec function ``name``."""
    return getattr(hookspecs, name)


def inline_registry(name: str, plugin: object) -> PluginRegistry:
    """The built-ins plus ``plugin`` as a third-party plugin."""
    source = PluginSource(name, "hooks-test-dist", "1.0", f"<inline {name}>", lambda: plugin)
    return PluginRegistry(load_entry_points=False, extra_sources=(source,))


@pytest.fixture
def process_registry(monkeypatch: pytest.MonkeyPatch) -> typing.Callable[[PluginRegistry], None]:
    """Install a registry as the process-wide one for the test."""
    def install(registry: PluginRegistry) -> None:
        monkeypatch.setattr(registry_module, "_REGISTRY", registry)

    return install


def test_the_hookspecs_are_the_three_the_design_names() -> None:
    assert HOOKS == ["pagedllm_add_cli_options", "pagedllm_register_backends", "pagedllm_register_models"]
    assert set(HOOKS) <= set(hookspecs.__all__)


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_typed_and_documented(name: str) -> None:
    function = spec(name)
    assert name.startswith("pagedllm_")
    assert hasattr(function, "pagedllm_spec"), f"{name} is not marked @hookspec"
    hints = typing.get_type_hints(function, vars(hookspecs) | _type_checking_names())
    parameters = inspect.signature(function).parameters
    assert "return" in hints, f"{name} needs a return annotation"
    doc = inspect.getdoc(function) or ""
    assert "Called " in doc, f"{name}: say when it is called"
    assert ":return:" in doc, f"{name}: say what the return value means"
    assert "Added in interface version" in doc, f"{name}: say which version added it"
    for parameter in parameters:
        assert parameter in hints, f"{name}: parameter {parameter} needs a type"
        assert f":param {parameter}:" in doc, f"{name}: document parameter {parameter}"
    if not parameters:
        assert "Takes no parameters" in doc
    body = ast.parse(inspect.getsource(function)).body[0].body  # type: ignore[attr-defined]
    assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{name}: a hookspec's body is its docstring only"


def _type_checking_names() -> dict[str, object]:
    from torch import nn

    from pagedllm.backends.interface import Backend

    return {"nn": nn, "Backend": Backend}


def _test_function_names() -> set[str]:
    names = set()
    for path in TESTS.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names.add(node.name)
    return names


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_exercised_implemented_and_in_the_guide(name: str) -> None:
    assert f"test_hook_{name}" in _test_function_names(), f"add a test named test_hook_{name}"
    acme_functions = {n.name for n in ast.walk(ast.parse(ACME_PLUGIN.read_text())) if isinstance(n, ast.FunctionDef)}
    assert name in acme_functions, f"the fixture plugin acme_pagedllm should implement {name}"
    assert f"`{name}`" in PLUGIN_GUIDE.read_text(), f"document {name} in README.md (Writing a backend plugin)"


def test_no_hook_is_called_outside_the_typed_facade() -> None:
    """Core code calls hooks only through PluginRegistry's typed methods, never ``pm.hook``."""
    root = Path(pagedllm.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "registry.py":
            continue
        assert ".hook.pagedllm_" not in path.read_text(), f"{path} calls a hook untyped"


# ------------------------------------------------------------------------------------------- the hooks
def test_hook_pagedllm_register_backends() -> None:
    class TinyBackend(CpuBackend):
        name = "tiny"
        interface_version = (1, 0)

    class Plugin:
        @hookimpl
        def pagedllm_register_backends(self) -> list[type]:
            return [TinyBackend]

    registry = inline_registry("tiny", Plugin())
    entry = registry.backends()["tiny"]
    assert entry.backend_cls is TinyBackend and entry.distribution == "hooks-test-dist"
    assert registry.resolve_backend("tiny") is TinyBackend


def test_hook_pagedllm_register_models(process_registry: typing.Callable[[PluginRegistry], None]) -> None:
    from pagedllm.core.loader import model_class_for
    from pagedllm.core.models.llama import LlamaForCausalLM

    class TinyForCausalLM(LlamaForCausalLM):
        """A user's model, added without touching the core."""

    class Plugin:
        @hookimpl
        def pagedllm_register_models(self) -> dict[str, type]:
            return {"TinyForCausalLM": TinyForCausalLM}

    process_registry(inline_registry("tiny_models", Plugin()))
    assert model_class_for("TinyForCausalLM") is TinyForCausalLM
    assert model_class_for("LlamaForCausalLM") is LlamaForCausalLM  # built-ins still there
    with pytest.raises(ValueError, match="TinyForCausalLM"):  # the error lists the plugin's architecture too
        model_class_for("GPT2LMHeadModel")


def test_hook_pagedllm_add_cli_options(process_registry: typing.Callable[[PluginRegistry], None]) -> None:
    from pagedllm.entrypoints.cli import build_parser

    commands: list[str] = []

    class Plugin:
        @hookimpl
        def pagedllm_add_cli_options(self, parser: argparse.ArgumentParser, command: str) -> None:
            commands.append(command)
            parser.add_argument_group("tiny").add_argument("--tiny-turbo", action="store_true")

    process_registry(inline_registry("tiny_options", Plugin()))
    parser, modules = build_parser()
    assert sorted(commands) == sorted(modules) and {"generate", "backends"} <= set(commands)
    args = parser.parse_args(["generate", "--prompt", "hi", "--tiny-turbo"])
    assert args.tiny_turbo is True and args.device == "auto"
    # the plugin's options, and only those, reach the backend through EngineConfig.extra
    from pagedllm.entrypoints.engine_args import engine_config_from_args

    assert engine_config_from_args(args).extra == {"tiny_turbo": True}


def test_backend_configure_receives_the_engine_extras(llama_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    from pagedllm import LLM
    from pagedllm.backends.cpu.backend import CpuBackend

    seen: list[dict[str, object]] = []
    monkeypatch.setattr(CpuBackend, "configure", lambda self, options: seen.append(dict(options)))
    LLM(str(llama_dir), device="cpu", kv_cache_memory_bytes=1 << 20, extra={"tiny_turbo": True})
    assert seen == [{"tiny_turbo": True}]
