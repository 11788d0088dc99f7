"""The pagedllm hook specifications (pluggy), grouped by lifecycle.

A plugin is a module (or object) with functions marked ``@hookimpl``; built-in backends are registered
exactly like third-party ones found through the ``pagedllm`` entry-point group. No hook is called on the
per-token path: hooks run at start-up only.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from pagedllm.backends.interface import Backend

PROJECT_NAME = "pagedllm"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------- registration
@hookspec
def pagedllm_register_backends() -> list[type[Backend]]:
    """Return the backend classes this plugin provides.

    Called once, when the registry is first used (``--device`` resolution, ``pagedllm backends``,
    ``LLM(...)``), after every plugin is loaded. Each class must subclass
    :class:`pagedllm.backends.interface.Backend`, set a unique ``name`` and declare the
    ``interface_version`` it implements; classes are not instantiated here and must not probe hardware
    at import time.

    :return: a list of backend classes (empty if the plugin only adds models or options). Results of all
        plugins are gathered; a name claimed twice is an error naming both distributions.

    Added in interface version 1.0.
    """


@hookspec
def pagedllm_register_models() -> dict[str, type[nn.Module]]:
    """Return model classes keyed by Hugging Face architecture name (``config.json``'s ``architectures``).

    Called once, when the model registry is first consulted to load a checkpoint. The class is built as
    ``cls(hf_config, backend)`` and must follow the model contract of ``pagedllm.core.models``
    (``forward(input_ids, positions, metadata)``, ``compute_logits(hidden)``, ``load_weights(iterable)``).

    :return: mapping of architecture name to class; an empty dict adds nothing. A name registered by two
        plugins is an error naming both.

    Added in interface version 1.0.
    """


# --------------------------------------------------------------------------- command line
@hookspec
def pagedllm_add_cli_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Add options to one ``pagedllm`` sub-command.

    Called while the CLI builds its parser, once per sub-command.

    :param parser: the sub-command's parser; add options under a group named after the plugin, with a
        ``--PLUGIN-`` prefix so two plugins cannot collide.
    :param command: the sub-command name: ``serve``, ``generate``, ``bench`` or ``backends``.
    :return: None; the parser is changed in place.

    Added in interface version 1.0.
    """
