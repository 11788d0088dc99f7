"""Where plugins come from: the built-in plugins and the ``pagedllm`` entry points of installed distributions.

Both kinds become a :class:`PluginSource`, which :class:`pagedllm.backends.registry.PluginRegistry` loads
through one path, so a built-in backend is registered exactly as a vendor's is. ``PAGEDLLM_BLOCK_PLUGINS``
(:data:`BLOCK_ENV`) lists plugin names not to load.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "pagedllm"
BLOCK_ENV = "PAGEDLLM_BLOCK_PLUGINS"
BUILTIN_DISTRIBUTION = "pagedllm"
BUILTIN_PLUGINS: tuple[str, ...] = (
    "pagedllm.core.models.plugin",
    "pagedllm.backends.cpu.plugin",
    "pagedllm.backends.rocm.plugin",
    "pagedllm.backends.cuda.plugin",
)


@dataclass(frozen=True, slots=True)
class PluginSource:
    """Where one plugin comes from, built-in or entry point alike.

    ``name`` is the plugin name (the entry-point name, or the folder name of a built-in: ``cpu``);
    ``target`` the module path it is loaded from; ``load`` imports and returns the plugin object.
    """

    name: str
    distribution: str
    version: str
    target: str
    load: Callable[[], object]

    @property
    def origin(self) -> str:
        """``"distribution 'acme-pagedllm' 0.1.0"``: how messages name the plugin's origin."""
        return f"distribution {self.distribution!r} {self.version}"


def builtin_sources() -> list[PluginSource]:
    """Return the built-in plugins as sources (named after their folder: ``models``, ``cpu``, ``cuda``)."""
    version = own_version()
    return [
        PluginSource(
            name=module_name.split(".")[-2],
            distribution=BUILTIN_DISTRIBUTION,
            version=version,
            target=module_name,
            load=lambda m=module_name: importlib.import_module(m),
        )
        for module_name in BUILTIN_PLUGINS
    ]


def entry_point_sources() -> list[PluginSource]:
    """Return one source per entry point of the ``pagedllm`` group of every installed distribution.

    A distribution found twice on ``sys.path`` (same name) is taken once, the first found (the one that
    imports win); a debug line notes the duplicate.
    """
    sources = []
    seen: dict[str, str] = {}
    for dist in metadata.distributions():
        dist_name = dist.metadata["Name"] or "?"
        key = re.sub(r"[-_.]+", "-", dist_name).lower()
        points = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
        if not points:
            continue
        if key in seen:
            logger.debug("distribution %r %s found again on sys.path (using %s)", dist_name, dist.version, seen[key])
            continue
        seen[key] = dist.version or "?"
        for ep in points:
            sources.append(
                PluginSource(name=ep.name, distribution=dist_name, version=dist.version or "?", target=ep.value,
                             load=ep.load)
            )
    return sources


def blocked_plugin_names() -> set[str]:
    """Return the plugin names listed (comma-separated) in ``PAGEDLLM_BLOCK_PLUGINS``."""
    return {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}


def own_version() -> str:
    """The installed pagedllm's version (the built-in plugins' distribution version)."""
    from pagedllm.version import __version__

    return __version__
