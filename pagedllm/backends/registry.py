"""Plugin discovery and backend selection: the typed facade over pluggy's plugin manager.

Discovery (once per process): register the built-in plugins, then the ``pagedllm`` entry-point group, both
through the same loader (:meth:`PluginRegistry.load`), then ``check_pending()``. A failure is raised
loudly as :class:`PluginError`, naming the plugin and its distribution and saying what to do; nothing is
silently skipped. Set ``PAGEDLLM_BLOCK_PLUGINS=name1,name2`` to block plugins by name (the entry-point
name; built-ins are ``models``, ``cpu``, ``cuda``).

Core code never calls ``pm.hook``: it calls the typed methods here (:meth:`PluginRegistry.backends`,
:meth:`PluginRegistry.models`, :meth:`PluginRegistry.add_cli_options`, :meth:`PluginRegistry.resolve_backend`).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

from pagedllm.backends import hookspecs
from pagedllm.backends.interface import (
    INTERFACE_VERSION,
    Backend,
    BackendCapabilities,
    InterfaceVersionError,
    check_interface_version,
    format_version,
)
from pagedllm.backends.plugin_sources import (
    BLOCK_ENV,
    BUILTIN_DISTRIBUTION,
    PluginSource,
    blocked_plugin_names,
    builtin_sources,
    entry_point_sources,
)

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

_BACKEND_NAME = re.compile(r"[a-z][a-z0-9_]*")


PLUGIN_OPTIONS_DEST = "pagedllm_plugin_options"
"""argparse attribute listing the ``dest`` of every option plugins added to a sub-command."""


class PluginError(RuntimeError):
    """A plugin could not be loaded or is inconsistent; the message names it and its distribution."""


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """One registered backend: its class and where it came from."""

    backend_cls: type[Backend]
    plugin_name: str
    distribution: str
    distribution_version: str

    @property
    def is_builtin(self) -> bool:
        """True for the backends shipped inside pagedllm."""
        return self.distribution == BUILTIN_DISTRIBUTION


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What ``pagedllm backends`` shows for one backend."""

    name: str
    distribution: str
    distribution_version: str
    interface_version: str
    is_available: bool
    reason: str
    """Empty when available; else why not (from ``Backend.is_available``)."""
    capabilities: BackendCapabilities | None
    """None when the backend failed to describe itself (the reason says why)."""


class PluginRegistry:
    """Typed facade over ``pluggy.PluginManager("pagedllm")``; core code never calls ``pm.hook``.

    ``load_entry_points=False`` registers the built-ins only (tests); ``extra_sources`` are loaded after the
    entry points through the same path (tests fake third-party plugins with them); ``blocked`` overrides
    the ``PAGEDLLM_BLOCK_PLUGINS`` environment variable. Raises :class:`PluginError` on any broken plugin.
    """

    def __init__(
        self,
        load_entry_points: bool = True,
        extra_sources: tuple[PluginSource, ...] = (),
        blocked: set[str] | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.sources: dict[str, PluginSource] = {}
        self.blocked: set[str] = set(blocked) if blocked is not None else blocked_plugin_names()
        self._blocked_seen: set[str] = set()
        for source in builtin_sources():
            self.load(source)
        if load_entry_points:
            for source in entry_point_sources():
                self.load(source)
        for source in extra_sources:
            self.load(source)
        for name in sorted(self.blocked - self._blocked_seen):
            logger.warning("%s names %r, but no plugin of that name is installed", BLOCK_ENV, name)
        self._check_pending()
        self._backends: dict[str, BackendEntry] | None = None
        self._models: dict[str, type[nn.Module]] | None = None

    # ------------------------------------------------------------------ loading
    def load(self, source: PluginSource) -> None:
        """Import one plugin and register it, unless blocked; the one path for built-ins and third party.

        Raises :class:`PluginError` naming the plugin and its distribution when the import fails, the
        name is taken by another plugin, or a hook implementation does not match its spec.
        """
        if source.name in self.blocked:
            self._blocked_seen.add(source.name)
            self.pm.set_blocked(source.name)
            logger.info("plugin %r (%s) blocked by %s", source.name, source.origin, BLOCK_ENV)
            return
        try:
            plugin = source.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {source.name!r} from {source.origin} failed to import ({source.target}): "
                f"{type(exc).__name__}: {exc}. Fix or uninstall {source.distribution!r}, or block the plugin "
                f"with {BLOCK_ENV}={source.name}"
            ) from exc
        self.register(plugin, source)

    def register(self, plugin: object, source: PluginSource) -> None:
        """Register an already imported plugin object under ``source.name``.

        Raises :class:`PluginError` when the name is taken (naming both distributions) or a hook
        implementation's arguments do not match its spec.
        """
        if source.name in self.sources or self.pm.has_plugin(source.name):
            other = self.sources.get(source.name)
            raise PluginError(
                f"plugin name {source.name!r} from {source.origin} is already taken by "
                f"{other.origin if other else 'another plugin'}; uninstall one of them or block it with "
                f"{BLOCK_ENV}={source.name}"
            )
        try:
            self.pm.register(plugin, name=source.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"plugin {source.name!r} from {source.origin} is invalid: {exc}") from exc
        self.sources[source.name] = source

    def _check_pending(self) -> None:
        """Fail on hook implementations no hookspec declares (usually a misspelled hook name)."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin = getattr(exc, "plugin", None)
            name = (self.pm.get_name(plugin) if plugin is not None else None) or "?"
            source = self.sources.get(name)
            origin = source.origin if source else "an unknown distribution"
            known = hook_names()
            unknown = [h for h in dir(plugin) if h.startswith(f"{hookspecs.PROJECT_NAME}_") and h not in known]
            hint = ""
            for hook in unknown:
                close = difflib.get_close_matches(hook, known, n=1)
                if close:
                    hint += f" {hook!r} may be a misspelling of {close[0]!r}."
            raise PluginError(
                f"plugin {name!r} from {origin} implements unknown hook(s) {', '.join(map(repr, unknown)) or '?'} "
                f"({exc}).{hint} Known hooks: {', '.join(known)}. Upgrade pagedllm if the plugin needs a newer "
                f"one, or block it with {BLOCK_ENV}={name}"
            ) from exc

    def origin_of(self, plugin_name: str) -> str:
        """Return how messages name where plugin ``plugin_name`` comes from."""
        source = self.sources.get(plugin_name)
        return source.origin if source else "an unknown distribution"

    def _call_each(self, hook_name: str, **kwargs: object) -> Iterator[tuple[str, object]]:
        """Call every implementation of ``hook_name``, yielding ``(plugin_name, result)`` in registration
        order; an exception inside a plugin is re-raised as :class:`PluginError` naming it."""
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order: built-ins, entry points, extras
            try:
                # like pluggy: an implementation may take any subset of the spec's arguments
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} from {self.origin_of(impl.plugin_name)} raised in {hook_name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            yield impl.plugin_name, result

    # ------------------------------------------------------------------ backends
    def backends(self) -> dict[str, BackendEntry]:
        """Return every registered backend by name (built-ins first), checking each class once.

        Raises :class:`PluginError` naming the plugin's distribution when a plugin returns something
        that is not a concrete :class:`Backend` subclass, a backend name is malformed or claimed twice,
        or a backend's interface version is missing (third party) or incompatible.
        """
        if self._backends is not None:
            return self._backends
        found: dict[str, BackendEntry] = {}
        for plugin_name, result in self._call_each("pagedllm_register_backends"):
            source = self.sources[plugin_name]
            if not isinstance(result, (list, tuple)):
                raise PluginError(
                    f"plugin {plugin_name!r} from {source.origin}: pagedllm_register_backends must return a list "
                    f"of Backend classes, got {type(result).__name__}"
                )
            for cls in result:
                self._check_backend_class(cls, source)
                if cls.name in found:
                    other = found[cls.name]
                    raise PluginError(
                        f"backend name {cls.name!r} is claimed by both plugin {other.plugin_name!r} "
                        f"({self.origin_of(other.plugin_name)}) and plugin {plugin_name!r} ({source.origin}); "
                        f"uninstall one or block it with {BLOCK_ENV}={plugin_name}"
                    )
                found[cls.name] = BackendEntry(cls, plugin_name, source.distribution, source.version)
        self._backends = found
        return found

    def _check_backend_class(self, cls: object, source: PluginSource) -> None:
        where = f"plugin {source.name!r} from {source.origin}"
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise PluginError(f"{where} registered {cls!r}, which is not a subclass of pagedllm Backend")
        if not isinstance(cls.name, str) or not _BACKEND_NAME.fullmatch(cls.name) or cls.name == "auto":
            raise PluginError(
                f"{where} registered {cls.__qualname__} with name {cls.name!r}; a backend name is one lower-case "
                f"word ([a-z][a-z0-9_]*, not 'auto'), used for --device, the entry point and test ids"
            )
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            raise PluginError(f"{where}: backend {cls.name!r} does not implement the abstract methods {missing}")
        if source.distribution != BUILTIN_DISTRIBUTION and not _declares_interface_version(cls):
            raise PluginError(
                f"{where}: backend {cls.name!r} does not declare the interface version it implements; set "
                f"interface_version = (MAJOR, MINOR) in its class (this pagedllm provides "
                f"{format_version(INTERFACE_VERSION)})"
            )
        try:
            check_interface_version(cls, f"plugin {source.name!r} ({source.origin})")
        except InterfaceVersionError as exc:
            raise PluginError(str(exc)) from exc

    def describe_backends(self) -> list[BackendInfo]:
        """Return one :class:`BackendInfo` per backend, in ``auto`` order, probing availability (for
        ``pagedllm backends``).

        Never raises for one backend's failure: a backend whose ``capabilities()`` raises gets None and the
        error as its reason. Discovery errors (:class:`PluginError`) still propagate.
        """
        infos = []
        for entry in self.auto_order():
            name = entry.backend_cls.name
            ok, reason = _probe(entry.backend_cls)
            capabilities: BackendCapabilities | None = None
            try:
                capabilities = entry.backend_cls().capabilities()
            except Exception as exc:
                ok, reason = False, f"capabilities() raised {type(exc).__name__}: {exc}"
            infos.append(
                BackendInfo(
                    name=name,
                    distribution=entry.distribution,
                    distribution_version=entry.distribution_version,
                    interface_version=format_version(entry.backend_cls.interface_version),
                    is_available=ok,
                    reason=reason,
                    capabilities=capabilities,
                )
            )
        return infos

    def auto_order(self) -> list[BackendEntry]:
        """Return every backend in the order ``--device auto`` tries them: third party before built-in,
        then higher ``Backend.priority`` first (rocm before cuda, since torch.cuda also answers on ROCm;
        cpu last), then by name."""
        return sorted(
            self.backends().values(), key=lambda e: (e.is_builtin, -e.backend_cls.priority, e.backend_cls.name)
        )

    def resolve_backend(self, device: str) -> type[Backend]:
        """Return the backend class for ``--device``: an explicit name wins; ``auto`` picks one.

        ``auto`` tries third-party backends before built-in ones, then higher ``priority`` first (rocm
        before cuda, cpu last), and logs its choice. Raises ValueError for an unknown name (listing the
        known ones and any blocked plugins) and RuntimeError for a known but unavailable backend (with
        its reason) or when ``auto`` finds nothing available (with every reason).
        """
        entries = self.backends()
        if device != "auto":
            if device not in entries:
                blocked = f"; blocked by {BLOCK_ENV}: {', '.join(sorted(self.blocked))}" if self.blocked else ""
                raise ValueError(
                    f"unknown device {device!r}; known backends: {', '.join(sorted(entries))} (or auto){blocked}. "
                    f"`pagedllm backends` lists them; a third-party backend is found once its package is installed"
                )
            cls = entries[device].backend_cls
            ok, reason = _probe(cls)
            if not ok:
                raise RuntimeError(f"backend {device!r} is not available: {reason}")
            logger.info("device %s: backend %r (%s)", device, device, self.origin_of(entries[device].plugin_name))
            return cls
        reasons = []
        for entry in self.auto_order():
            ok, reason = _probe(entry.backend_cls)
            if ok:
                skipped = f" (not available: {'; '.join(reasons)})" if reasons else ""
                logger.info(
                    "device auto: picked backend %r from %s%s",
                    entry.backend_cls.name, self.origin_of(entry.plugin_name), skipped,
                )
                return entry.backend_cls
            reasons.append(f"{entry.backend_cls.name}: {reason}")
        raise RuntimeError("device auto: no backend is available: " + "; ".join(reasons))

    # ------------------------------------------------------------------ models and CLI options
    def models(self) -> dict[str, type[nn.Module]]:
        """Return every registered model class by Hugging Face architecture name.

        Raises :class:`PluginError` when a plugin returns something other than a ``{str: class}`` dict or
        two plugins register the same architecture (naming both distributions).
        """
        if self._models is not None:
            return self._models
        found: dict[str, type[nn.Module]] = {}
        owner: dict[str, str] = {}
        for plugin_name, result in self._call_each("pagedllm_register_models"):
            origin = self.origin_of(plugin_name)
            if not isinstance(result, dict):
                raise PluginError(
                    f"plugin {plugin_name!r} from {origin}: pagedllm_register_models must return a dict "
                    f"{{architecture: model class}}, got {type(result).__name__}"
                )
            for arch, cls in result.items():
                if not isinstance(arch, str) or not isinstance(cls, type):
                    raise PluginError(f"plugin {plugin_name!r} from {origin} registered {arch!r}: {cls!r}; "
                                      f"expected an architecture name and a model class")
                if arch in found:
                    raise PluginError(
                        f"model architecture {arch!r} is registered by both plugin {owner[arch]!r} "
                        f"({self.origin_of(owner[arch])}) and plugin {plugin_name!r} ({origin}); block one "
                        f"with {BLOCK_ENV}"
                    )
                found[arch], owner[arch] = cls, plugin_name
        self._models = found
        return found

    def add_cli_options(self, parser: argparse.ArgumentParser, command: str) -> None:
        """Let every plugin add options to the sub-command ``command`` (its parser is changed in place).

        Raises :class:`PluginError` naming the plugin when it adds an option that clashes with another.
        """
        known = {action.dest for action in parser._actions}
        try:
            for _ in self._call_each("pagedllm_add_cli_options", parser=parser, command=command):
                pass
        except PluginError as exc:
            raise PluginError(f"{exc} (while building the options of `pagedllm {command}`)") from exc
        # remember which options plugins added: they travel to the backend in EngineConfig.extra
        added = tuple(action.dest for action in parser._actions if action.dest not in known)
        parser.set_defaults(**{PLUGIN_OPTIONS_DEST: added})


def hook_names() -> list[str]:
    """Return the names of every hookspec, sorted."""
    return sorted(name for name in dir(hookspecs) if name.startswith(f"{hookspecs.PROJECT_NAME}_"))


def _declares_interface_version(cls: type[Backend]) -> bool:
    """True when ``cls`` itself sets ``interface_version``: a plugin subclassing another backend (e.g. the
    cpu one) must still say which interface it was written for, not inherit that backend's claim."""
    return "interface_version" in vars(cls)


def _probe(cls: type[Backend]) -> tuple[bool, str]:
    try:
        ok, reason = cls.is_available()
    except Exception as exc:  # is_available must not raise; report it as the reason if it does
        return False, f"is_available() raised {type(exc).__name__}: {exc}"
    return bool(ok), "" if ok else (str(reason) or "no reason given")


_REGISTRY: PluginRegistry | None = None


def get_registry() -> PluginRegistry:
    """Return the process-wide registry, discovering plugins on first use.

    Raises :class:`PluginError` when discovery fails; the next call tries again.
    """
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = PluginRegistry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the process-wide registry so the next use rediscovers plugins (tests, after installs)."""
    global _REGISTRY
    _REGISTRY = None
