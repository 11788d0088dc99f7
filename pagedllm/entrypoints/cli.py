"""The ``pagedllm`` command: ``serve``, ``generate``, ``bench`` and ``backends`` sub-commands.

Each sub-command lives in its own module exposing ``add_parser(subparsers)`` and ``run(args) -> int``;
plugins add options through the ``pagedllm_add_cli_options`` hook. Errors a user can fix (an unknown
device, a missing file, an impossible request) are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS: tuple[str, ...] = (
    "pagedllm.entrypoints.cli_generate",
    "pagedllm.entrypoints.cli_serve",
    "pagedllm.entrypoints.cli_bench",
    "pagedllm.entrypoints.cli_backends",
)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """Build the parser of every available sub-command; returns it and the modules by command name."""
    from pagedllm.backends.registry import get_registry

    parser = argparse.ArgumentParser(prog="pagedllm", description="paged-KV-cache LLM inference on any backend")
    parser.add_argument("--log-level", default="INFO")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules: dict[str, object] = {}
    for module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # that sub-command is not part of this build
            raise
        sub = module.add_parser(subparsers)
        command = sub.prog.split()[-1]
        get_registry().add_cli_options(sub, command)
        modules[command] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pagedllm`` console script."""
    try:
        parser, modules = build_parser()
    except RuntimeError as exc:  # PluginError: a broken plugin, named with its distribution
        sys.stderr.write(f"pagedllm: error: {exc}\n")
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        sys.stderr.write(f"pagedllm {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
