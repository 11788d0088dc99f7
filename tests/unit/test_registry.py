"""Plugin discovery and backend selection, with fixture plugins behind faked distributions (nothing installed)."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest
from fake_dist import FakeDistribution, distributions_of  # conftest puts tests/plugins on sys.path

import pagedllm.core
from pagedllm.backends import plugin_sources
from pagedllm.backends import registry as registry_module
from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.hookspecs import hookimpl
from pagedllm.backends.interface import INTERFACE_VERSION, Backend, format_version
from pagedllm.backends.plugin_sources import BLOCK_ENV, PluginSource
from pagedllm.backends.registry import PluginError, PluginRegistry

pytestmark = pytest.mark.usefixtures("isolated_registry")


def install_fake(monkeypatch: pytest.MonkeyPatch, *dists: FakeDistribution) -> None:
    """Make ``dists`` the only installed distributions."""
    monkeypatch.setattr(plugin_sources.metadata, "distributions", distributions_of(*dists))


def inline(name: str, plugin: object, distribution: str = "inline-dist", version: str = "9.9") -> PluginSource:
    """A third-party source whose plugin object is already built."""
    return PluginSource(name, distribution, version, f"<inline {name}>", lambda: plugin)


def backend_plugin(*classes: type) -> object:
    """A plugin object registering ``classes``."""

    class Plugin:
        @hookimpl
        def pagedllm_register_backends(self) -> list[type]:
            return list(classes)

    return Plugin()


class FastBackend(CpuBackend):
    """An available third-party backend of high priority."""

    name = "fast"
    interface_version = (1, 0)
    priority = 20


class SlowBackend(CpuBackend):
    """An available third-party backend of lower priority."""

    name = "slow"
    interface_version = (1, 0)
    priority = 10


class MissingBackend(CpuBackend):
    """A third-party backend whose device is absent."""

    name = "missing"
    interface_version = (1, 0)
    priority = 100

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return False, "no Missing card in this machine"


# ---------------------------------------------------------------------------------------------- discovery
def test_builtins_go_through_the_same_loader_as_entry_points() -> None:
    registry = PluginRegistry()
    assert [s.name for s in registry.sources.values()] == ["models", "cpu", "rocm", "cuda"]
    assert {s.distribution for s in registry.sources.values()} == {"pagedllm"}
    assert {"cpu", "rocm", "cuda"} <= set(registry.backends())
    assert registry.backends()["cpu"].backend_cls is CpuBackend and registry.backends()["cpu"].is_builtin
    assert "LlamaForCausalLM" in registry.models()


def test_entry_point_plugin_is_discovered_with_its_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake(monkeypatch, FakeDistribution("broken-backends", "0.3", {"broken": "broken_backends"}))
    registry = PluginRegistry()
    entry = registry.backends()["broken_gqa"]
    assert (entry.plugin_name, entry.distribution, entry.distribution_version) == ("broken", "broken-backends", "0.3")
    assert not entry.is_builtin
    assert registry.sources["broken"].target == "broken_backends"


def test_duplicate_distribution_on_path_is_taken_once(monkeypatch: pytest.MonkeyPatch) -> None:
    dist = FakeDistribution("broken-backends", "0.3", {"broken": "broken_backends"})
    install_fake(monkeypatch, dist, FakeDistribution("Broken_Backends", "0.2", {"broken": "broken_backends"}))
    assert PluginRegistry().sources["broken"].version == "0.3"


def test_import_error_names_plugin_distribution_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake(monkeypatch, FakeDistribution("acme-sdk-plugin", "2.0", {"acme_sdk": "import_error_plugin"}))
    with pytest.raises(PluginError) as excinfo:
        PluginRegistry()
    message = str(excinfo.value)
    for part in ("'acme_sdk'", "'acme-sdk-plugin' 2.0", "failed to import", "import_error_plugin",
                 "ModuleNotFoundError", "acme_vendor_sdk_that_is_not_installed", f"{BLOCK_ENV}=acme_sdk"):
        assert part in message, part


def test_import_error_is_also_raised_by_get_registry_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake(monkeypatch, FakeDistribution("acme-sdk-plugin", "2.0", {"acme_sdk": "import_error_plugin"}))
    for _ in range(2):  # not cached as a half-built registry, never silently skipped
        with pytest.raises(PluginError, match="failed to import"):
            registry_module.get_registry()


def test_unknown_hook_is_caught_by_check_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake(monkeypatch, FakeDistribution("typo-plugin", "1.1", {"typo": "unknown_hook_plugin"}))
    with pytest.raises(PluginError) as excinfo:
        PluginRegistry()
    message = str(excinfo.value)
    assert "'typo' from distribution 'typo-plugin' 1.1" in message
    assert "unknown hook(s) 'pagedllm_register_backend'" in message
    assert "misspelling of 'pagedllm_register_backends'" in message


def test_wrong_interface_version_is_refused_naming_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake(monkeypatch, FakeDistribution("future-pagedllm", "3.0", {"future": "wrong_version_plugin"}))
    registry = PluginRegistry()
    with pytest.raises(PluginError) as excinfo:
        registry.backends()
    message = str(excinfo.value)
    ours = f"provides interface {format_version(INTERFACE_VERSION)}"
    for part in ("'future'", "'future-pagedllm' 3.0", "interface 2.0", ours):
        assert part in message, part
    with pytest.raises(PluginError):  # loud everywhere, --device cpu included: nothing silently skipped
        registry.resolve_backend("cpu")


def test_third_party_backend_must_declare_its_interface_version(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake(monkeypatch, FakeDistribution("lazy-pagedllm", "0.1", {"lazy": "undeclared_version_plugin"}))
    with pytest.raises(PluginError, match=r"'undeclared' does not declare the interface version .*'lazy-pagedllm'|"
                                          r"'lazy-pagedllm'.*'undeclared' does not declare the interface version"):
        PluginRegistry().backends()


def test_backend_name_claimed_twice_names_both_distributions(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake(monkeypatch, FakeDistribution("impostor-pagedllm", "0.5", {"impostor": "taken_name_plugin"}))
    with pytest.raises(PluginError) as excinfo:
        PluginRegistry().backends()
    message = str(excinfo.value)
    assert "backend name 'cpu' is claimed by both" in message
    assert "'pagedllm'" in message and "'impostor-pagedllm' 0.5" in message and f"{BLOCK_ENV}=impostor" in message


def test_plugin_name_taken_twice_names_both_distributions(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake(monkeypatch, FakeDistribution("one-dist", "1", {"same": "broken_backends"}),
                 FakeDistribution("two-dist", "2", {"same": "wrong_version_plugin"}))
    with pytest.raises(PluginError, match=r"'same' from distribution 'two-dist' 2 is already taken by distribution "
                                          r"'one-dist' 1"):
        PluginRegistry()
    install_fake(monkeypatch, FakeDistribution("shadow-dist", "1", {"cpu": "broken_backends"}))
    with pytest.raises(PluginError, match="already taken by distribution 'pagedllm'"):
        PluginRegistry()


def test_block_list_skips_named_plugins_and_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install_fake(monkeypatch, FakeDistribution("acme-sdk-plugin", "2.0", {"acme_sdk": "import_error_plugin"}),
                 FakeDistribution("broken-backends", "0.3", {"broken": "broken_backends"}))
    monkeypatch.setenv(BLOCK_ENV, "acme_sdk, cuda,nonexistent")
    with caplog.at_level(logging.INFO, logger="pagedllm.backends.registry"):
        registry = PluginRegistry()
    assert "acme_sdk" not in registry.sources and "cuda" not in registry.backends()
    assert "broken_gqa" in registry.backends()
    assert "'nonexistent', but no plugin of that name is installed" in caplog.text
    assert "plugin 'acme_sdk'" in caplog.text and "blocked by" in caplog.text
    with pytest.raises(ValueError, match=f"blocked by {BLOCK_ENV}: acme_sdk, cuda, nonexistent"):
        registry.resolve_backend("cuda")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (int, "not a subclass of pagedllm Backend"),
        (type("Nameless", (CpuBackend,), {"name": "", "interface_version": (1, 0)}), "one lower-case word"),
        (type("Auto", (CpuBackend,), {"name": "auto", "interface_version": (1, 0)}), "one lower-case word"),
        (type("Caps", (CpuBackend,), {"name": "My-Backend", "interface_version": (1, 0)}), "one lower-case word"),
        (type("Abstract", (Backend,), {"name": "abstract", "interface_version": (1, 0)}),
         "does not implement the abstract methods attention, capabilities"),
    ],
)
def test_bad_backend_classes_are_refused(bad: type, message: str) -> None:
    registry = PluginRegistry(load_entry_points=False, extra_sources=(inline("bad", backend_plugin(bad)),))
    with pytest.raises(PluginError, match=message) as excinfo:
        registry.backends()
    assert "'inline-dist' 9.9" in str(excinfo.value)


def test_hook_returning_the_wrong_type_or_raising_names_the_plugin() -> None:
    class NotAList:
        @hookimpl
        def pagedllm_register_backends(self) -> object:
            return FastBackend

    class Raises:
        @hookimpl
        def pagedllm_register_models(self) -> dict[str, type]:
            raise KeyError("config")

    registry = PluginRegistry(load_entry_points=False, extra_sources=(inline("odd", NotAList()),))
    with pytest.raises(PluginError, match=r"'odd' from distribution 'inline-dist' 9.9: pagedllm_register_backends "
                                          r"must return a list"):
        registry.backends()
    registry = PluginRegistry(load_entry_points=False, extra_sources=(inline("raises", Raises()),))
    with pytest.raises(PluginError, match=r"'raises' .* raised in pagedllm_register_models: KeyError"):
        registry.models()


def test_hook_with_wrong_arguments_is_invalid() -> None:
    class WrongArgs:
        @hookimpl
        def pagedllm_add_cli_options(self, parser: argparse.ArgumentParser, subcommand: str) -> None:
            pass

    with pytest.raises(PluginError, match=r"(?s)'wrong' from distribution 'inline-dist' 9.9 is invalid: .*subcommand"):
        PluginRegistry(load_entry_points=False, extra_sources=(inline("wrong", WrongArgs()),))


def test_model_architecture_registered_twice_names_both() -> None:
    class Models:
        @hookimpl
        def pagedllm_register_models(self) -> dict[str, type]:
            return {"LlamaForCausalLM": CpuBackend}

    registry = PluginRegistry(load_entry_points=False, extra_sources=(inline("llamas", Models()),))
    with pytest.raises(PluginError, match=r"'LlamaForCausalLM' is registered by both plugin 'models' .*'pagedllm'.* "
                                          r"and plugin 'llamas' .*'inline-dist'"):
        registry.models()


def test_cli_option_clash_names_the_plugin() -> None:
    class Clash:
        @hookimpl
        def pagedllm_add_cli_options(self, parser: argparse.ArgumentParser) -> None:
            parser.add_argument("--device")

    registry = PluginRegistry(load_entry_points=False, extra_sources=(inline("clash", Clash()),))
    parser = argparse.ArgumentParser()
    parser.add_argument("--device")
    with pytest.raises(PluginError, match=r"'clash' from distribution 'inline-dist' 9.9 raised in "
                                          r"pagedllm_add_cli_options.*--device.*`pagedllm generate`"):
        registry.add_cli_options(parser, "generate")


# ---------------------------------------------------------------------------------------------- --device
def test_unknown_device_lists_known_backends() -> None:
    with pytest.raises(ValueError, match=r"unknown device 'tpu'; known backends: cpu, cuda, rocm \(or auto\)"):
        PluginRegistry().resolve_backend("tpu")


def test_known_but_unavailable_device_gives_the_reason() -> None:
    registry = PluginRegistry(load_entry_points=False, extra_sources=(inline("m", backend_plugin(MissingBackend)),))
    with pytest.raises(RuntimeError, match="backend 'missing' is not available: no Missing card in this machine"):
        registry.resolve_backend("missing")


def test_is_available_that_raises_is_reported_not_raised() -> None:
    class Raising(CpuBackend):
        name = "raising"
        interface_version = (1, 0)

        @classmethod
        def is_available(cls) -> tuple[bool, str]:
            raise OSError("driver exploded")

    registry = PluginRegistry(load_entry_points=False, extra_sources=(inline("r", backend_plugin(Raising)),))
    with pytest.raises(RuntimeError, match=r"is_available\(\) raised OSError: driver exploded"):
        registry.resolve_backend("raising")
    assert registry.resolve_backend("auto") is CpuBackend


def test_explicit_name_wins_over_auto_preferences() -> None:
    registry = PluginRegistry(load_entry_points=False, extra_sources=(inline("f", backend_plugin(FastBackend)),))
    assert registry.resolve_backend("cpu") is CpuBackend
    assert registry.resolve_backend("fast") is FastBackend


def test_auto_prefers_third_party_then_priority_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    sources = (inline("s", backend_plugin(SlowBackend, MissingBackend)), inline("f", backend_plugin(FastBackend)))
    registry = PluginRegistry(load_entry_points=False, extra_sources=sources)
    assert [e.backend_cls.name for e in registry.auto_order()] == ["missing", "fast", "slow", "rocm", "cuda", "cpu"]
    with caplog.at_level(logging.INFO, logger="pagedllm.backends.registry"):
        assert registry.resolve_backend("auto") is FastBackend
    assert "device auto: picked backend 'fast'" in caplog.text
    assert "missing: no Missing card" in caplog.text


def test_auto_on_builtins_picks_cpu_last_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    registry = PluginRegistry()
    assert registry.auto_order()[-1].backend_cls is CpuBackend
    with caplog.at_level(logging.INFO, logger="pagedllm.backends.registry"):
        chosen = registry.resolve_backend("auto")
    gpus = [name for name in ("rocm", "cuda") if registry.backends()[name].backend_cls.is_available()[0]]
    assert chosen.name == (gpus[0] if gpus else "cpu")
    assert f"device auto: picked backend {chosen.name!r}" in caplog.text


def test_auto_with_nothing_available_lists_every_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BLOCK_ENV, "cpu,cuda")
    registry = PluginRegistry(load_entry_points=False, extra_sources=(inline("m", backend_plugin(MissingBackend)),))
    with pytest.raises(RuntimeError, match="device auto: no backend is available: missing: no Missing card"):
        registry.resolve_backend("auto")


def test_describe_backends_probes_each_and_survives_broken_capabilities() -> None:
    class NoCaps(CpuBackend):
        name = "nocaps"
        interface_version = (1, 0)

        def capabilities(self) -> object:
            raise RuntimeError("firmware too old")

    registry = PluginRegistry(load_entry_points=False,
                              extra_sources=(inline("x", backend_plugin(NoCaps, MissingBackend)),))
    infos = {info.name: info for info in registry.describe_backends()}
    assert infos["cpu"].is_available and infos["cpu"].capabilities is not None and infos["cpu"].reason == ""
    assert infos["missing"].reason == "no Missing card in this machine" and not infos["missing"].is_available
    assert infos["nocaps"].capabilities is None and "firmware too old" in infos["nocaps"].reason
    assert infos["nocaps"].distribution == "inline-dist" and infos["nocaps"].interface_version == "1.0"


def test_get_registry_is_cached_until_reset() -> None:
    first = registry_module.get_registry()
    assert registry_module.get_registry() is first
    registry_module.reset_registry()
    assert registry_module.get_registry() is not first


def test_core_never_names_a_backend() -> None:
    """The core adapts to capabilities; it neither imports a backend nor asks which one it runs on."""
    core = Path(pagedllm.core.__file__).parent
    pattern = re.compile(r"pagedllm\.backends\.(cpu|cuda|rocm)|\b(backend_cls|backend)\.name\s*(==|!=|in)\s")
    offenders = [f"{path.relative_to(core)}:{number}" for path in sorted(core.rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
