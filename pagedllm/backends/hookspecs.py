"""The pagedllm hook specifications (pluggy), grouped by lifecycle.

A plugin is a module (or object) with functions marked ``@hookimpl`` and named after a hookspec below;
built-in plugins (the ``cpu`` and ``cuda`` backends, the built-in models) are registered exactly like
third-party ones found through the ``pagedllm`` entry-point group::

    # pyproject.toml of the plugin's distribution
    [project.entry-points.pagedllm]
    acme = "acme_pagedllm.plugin"

No hook is called on the per-token path: every hook runs at start-up only. None is ``firstresult``: the
results of all plugins are gathered. Core code calls them only through the typed methods of
:class:`pagedllm.backends.registry.PluginRegistry`, never ``pm.hook`` directly. A plugin implementing a
name not declared here is refused at discovery (``check_pending``), so a misspelled hook cannot go
unnoticed. Versions below are those of the backend interface (``INTERFACE_VERSION``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from pagedllm.backends.interface import Backend

__all__ = [
    "PROJECT_NAME",
    "hookimpl",
    "hookspec",
    "pagedllm_add_cli_options",
    "pagedllm_register_backends",
    "pagedllm_register_models",
]

PROJECT_NAME = "pagedllm"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Mark a plugin's function as the implementation of the pagedllm hook of the same name."""


# --------------------------------------------------------------------------- registration
@hookspec
def pagedllm_register_backends() -> list[type[Backend]]:
    """Return the backend classes this plugin provides.

    Called once per process, the first time the registry is asked for backends (``--device``
    resolution, ``pagedllm backends``, ``LLM(...)``, the conformance kit), after every plugin is loaded.
    Each class must subclass :class:`pagedllm.backends.interface.Backend`, implement its abstract methods,
    set a unique one-word ``name`` and declare the ``interface_version`` it implements (a literal such as
    ``(1, 0)``). Classes are not instantiated here; the implementation should import its backend module
    lazily inside the function so loading the plugin never touches a vendor SDK or the hardware.

    Takes no parameters.

    :return: a list of backend classes; an empty list if the plugin only adds models or options. The
        lists of all plugins are gathered. A name claimed twice, a class that is not a concrete Backend,
        or an incompatible interface version raises ``PluginError`` naming the plugin's distribution.

    Added in interface version 1.0.
    """


@hookspec
def pagedllm_register_models() -> dict[str, type[nn.Module]]:
    """Return model classes keyed by Hugging Face architecture name (``config.json``'s ``architectures``).

    Called once per process, the first time a checkpoint is loaded (the model registry is consulted
    lazily), so a vendor or user can add a model without touching the core. The class is built as
    ``cls(hf_config, backend)`` and must follow the model contract of ``pagedllm.core.models``
    (``forward(input_ids, positions, metadata)``, ``compute_logits(hidden)``, ``load_weights(iterable)``,
    ``attention_layers()``) and compute through the backend it is given. A class that sets
    ``supports_sampled_rows = True`` is also called as ``forward(..., sampled=SampledRows)`` on steps where some
    rows are not sampled, and then returns the hidden states of the sampled rows only (its last layer may skip
    the others after storing their keys and values; ``pagedllm.core.sampled_rows``).

    Takes no parameters.

    :return: a dict mapping architecture name to model class; an empty dict adds nothing. The dicts of
        all plugins are merged; an architecture registered by two plugins raises ``PluginError`` naming
        both distributions.

    Added in interface version 1.0.
    """


# --------------------------------------------------------------------------- command line
@hookspec
def pagedllm_add_cli_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Add options to one ``pagedllm`` sub-command.

    Called while the CLI builds its parser, once per sub-command and plugin, before arguments are
    parsed. The parsed values reach the command as attributes of its ``argparse.Namespace``.

    :param parser: the sub-command's parser; add options under a group named after the plugin and with a
        ``--PLUGIN-`` prefix (e.g. ``--acme-fast-math``) so two plugins cannot collide. A clash raises
        ``PluginError`` naming the plugin.
    :param command: the sub-command name: ``generate``, ``serve``, ``bench`` or ``backends``.
    :return: None; the parser is changed in place.

    Added in interface version 1.0.
    """
