"""Plugin discovery and backend selection: the typed facade over pluggy's plugin manager.

Discovery (once per process): register the built-in backend plugins, then load the ``pagedllm``
entry-point group, then ``check_pending()``. A failure is raised loudly, naming the distribution;
nothing is silently skipped. Set ``PAGEDLLM_BLOCK_PLUGINS=name1,name2`` to block plugins by name.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

import pluggy

from pagedllm.backends import hookspecs
from pagedllm.backends.interface import INTERFACE_VERSION, Backend, is_compatible_version

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "pagedllm"
BLOCK_ENV = "PAGEDLLM_BLOCK_PLUGINS"
BUILTIN_PLUGINS: tuple[str, ...] = (
    "pagedllm.core.models.plugin",
    "pagedllm.backends.cpu.plugin",
    "pagedllm.backends.cuda.plugin",
)


class PluginError(RuntimeError):
    """A plugin could not be loaded or is inconsistent; the message names its distribution."""


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """One registered backend: its class and where it came from."""

    backend_cls: type[Backend]
    plugin_name: str
    distribution: str
    distribution_version: str


class PluginRegistry:
    """Typed facade over ``pluggy.PluginManager("pagedllm")``; core code never calls ``pm.hook``."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._dist_of: dict[str, tuple[str, str]] = {}
        blocked = {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}
        for module_name in BUILTIN_PLUGINS:
            short = module_name.split(".")[-2]
            if short in blocked:
                self.pm.set_blocked(short)
                continue
            self.register(importlib.import_module(module_name), short, ("pagedllm", _own_version()))
        if load_entry_points:
            self._load_entry_points(blocked)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin = getattr(exc, "plugin", None)
            name = self.pm.get_name(plugin) if plugin is not None else "?"
            raise PluginError(
                f"plugin {name!r} from distribution {self._dist_of.get(name, ('?', ''))[0]!r} "
                f"implements an unknown hook: {exc}"
            ) from exc
        self._backends: dict[str, BackendEntry] | None = None
        self._models: dict[str, type[nn.Module]] | None = None

    def register(self, plugin: object, name: str, dist: tuple[str, str]) -> None:
        """Register one plugin object under ``name``; ``dist`` is ``(distribution, version)``.

        Raises :class:`PluginError` when the name is taken or the plugin's hooks do not match the specs.
        """
        if self.pm.has_plugin(name):
            raise PluginError(f"plugin name {name!r} from {dist[0]!r} is already registered")
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} from distribution {dist[0]!r} is invalid: {exc}") from exc
        self._dist_of[name] = dist

    def _load_entry_points(self, blocked: set[str]) -> None:
        for dist in metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP:
                    continue
                if ep.name in blocked:
                    self.pm.set_blocked(ep.name)
                    logger.info("plugin %r blocked by %s", ep.name, BLOCK_ENV)
                    continue
                dist_name = dist.metadata["Name"] or "?"
                try:
                    plugin = ep.load()
                except Exception as exc:
                    raise PluginError(
                        f"plugin {ep.name!r} from distribution {dist_name!r} failed to import "
                        f"({ep.value}): {type(exc).__name__}: {exc}. Fix or uninstall it, or block it "
                        f"with {BLOCK_ENV}={ep.name}"
                    ) from exc
                self.register(plugin, ep.name, (dist_name, dist.version or "?"))

    # ------------------------------------------------------------------ backends
    def backends(self) -> dict[str, BackendEntry]:
        """Return every registered backend by name, checking names and interface versions.

        Raises :class:`PluginError` on a name claimed twice or an incompatible interface version.
        """
        if self._backends is not None:
            return self._backends
        found: dict[str, BackendEntry] = {}
        for plugin_name, plugin in self.pm.list_name_plugin():
            impl = getattr(plugin, "pagedllm_register_backends", None)
            if impl is None:
                continue
            dist, version = self._dist_of.get(plugin_name, ("?", "?"))
            for cls in impl() or []:
                if not (isinstance(cls, type) and issubclass(cls, Backend)):
                    raise PluginError(f"plugin {plugin_name!r} ({dist}) registered {cls!r}, not a Backend")
                if not is_compatible_version(tuple(cls.interface_version)):
                    raise PluginError(
                        f"backend {cls.name!r} from distribution {dist!r} {version} implements backend "
                        f"interface {_fmt(cls.interface_version)}, but this pagedllm provides "
                        f"{_fmt(INTERFACE_VERSION)}; install a version of the plugin built for "
                        f"{_fmt(INTERFACE_VERSION)}"
                    )
                if cls.name in found:
                    other = found[cls.name].distribution
                    raise PluginError(
                        f"backend name {cls.name!r} is claimed by both {other!r} and {dist!r}; uninstall "
                        f"one or block it with {BLOCK_ENV}"
                    )
                found[cls.name] = BackendEntry(cls, plugin_name, dist, version)
        self._backends = found
        return found

    def models(self) -> dict[str, type[nn.Module]]:
        """Return every registered model class by Hugging Face architecture name."""
        if self._models is not None:
            return self._models
        found: dict[str, type[nn.Module]] = {}
        owner: dict[str, str] = {}
        for plugin_name, plugin in self.pm.list_name_plugin():
            impl = getattr(plugin, "pagedllm_register_models", None)
            if impl is None:
                continue
            for arch, cls in (impl() or {}).items():
                if arch in found:
                    raise PluginError(
                        f"model architecture {arch!r} is registered by both {owner[arch]!r} and "
                        f"{plugin_name!r}"
                    )
                found[arch], owner[arch] = cls, plugin_name
        self._models = found
        return found

    def add_cli_options(self, parser: argparse.ArgumentParser, command: str) -> None:
        """Let every plugin add options to the sub-command ``command``."""
        self.pm.hook.pagedllm_add_cli_options(parser=parser, command=command)

    def resolve_backend(self, device: str) -> type[Backend]:
        """Return the backend class for ``--device``: an explicit name wins; ``auto`` picks one.

        Raises ValueError for an unknown name (listing known ones) and RuntimeError for a known but
        unavailable backend (with its reason) or when ``auto`` finds nothing available.
        """
        entries = self.backends()
        if device != "auto":
            if device not in entries:
                raise ValueError(f"unknown device {device!r}; known backends: {', '.join(sorted(entries))}")
            cls = entries[device].backend_cls
            ok, reason = _probe(cls)
            if not ok:
                raise RuntimeError(f"backend {device!r} is not available: {reason}")
            return cls
        # auto: third-party before built-in, then by priority (rocm before cuda), cpu last.
        ordered = sorted(
            entries.values(),
            key=lambda e: (e.distribution == "pagedllm", -e.backend_cls.priority, e.backend_cls.name),
        )
        reasons = []
        for entry in ordered:
            ok, reason = _probe(entry.backend_cls)
            if ok:
                logger.info("device auto: picked backend %r (%s)", entry.backend_cls.name, entry.distribution)
                return entry.backend_cls
            reasons.append(f"{entry.backend_cls.name}: {reason}")
        raise RuntimeError("no backend is available: " + "; ".join(reasons))


def _probe(cls: type[Backend]) -> tuple[bool, str]:
    try:
        return cls.is_available()
    except Exception as exc:  # is_available must not raise; report it as the reason if it does
        return False, f"is_available() raised {type(exc).__name__}: {exc}"


def _fmt(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def _own_version() -> str:
    from pagedllm.version import __version__

    return __version__


_REGISTRY: PluginRegistry | None = None


def get_registry() -> PluginRegistry:
    """Return the process-wide registry, discovering plugins on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = PluginRegistry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the process-wide registry so the next use rediscovers plugins (tests, after installs)."""
    global _REGISTRY
    _REGISTRY = None
