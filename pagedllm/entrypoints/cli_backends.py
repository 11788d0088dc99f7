"""``pagedllm backends [--device NAME] [--json]``: every backend plugin found, and which one ``--device`` picks.

One row per backend, in the order ``--device auto`` tries them: name, distribution and version, the
backend interface version it implements, whether it is available here (or why not) and a summary of its
capabilities. The row marked ``*`` is the one ``--device`` (default ``auto``) selects. Exit status 0 when
``--device`` resolves, 1 when it does not (the reason is printed), so scripts can ask
``pagedllm backends --device cuda`` before starting a server.
"""

from __future__ import annotations

import argparse
import json
import sys

from pagedllm.entrypoints.engine_args import add_device_arg

HEADERS: tuple[str, ...] = ("", "NAME", "DISTRIBUTION", "INTERFACE", "AVAILABLE", "CAPABILITIES")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``backends`` sub-command."""
    parser = subparsers.add_parser("backends", help="list the backend plugins found and whether they can run here")
    add_device_arg(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON) of backends; returns 0 when ``--device`` resolves, else 1."""
    from pagedllm.backends.interface import INTERFACE_VERSION, format_version
    from pagedllm.backends.registry import get_registry
    from pagedllm.version import __version__

    registry = get_registry()
    infos = registry.describe_backends()
    selected: str | None = None
    error: str | None = None
    try:
        selected = registry.resolve_backend(args.device).name
    except (ValueError, RuntimeError) as exc:
        error = str(exc)
    if args.json:
        document = {
            "pagedllm_version": __version__,
            "interface_version": format_version(INTERFACE_VERSION),
            "device": args.device,
            "selected": selected,
            "error": error,
            "backends": [
                {
                    "name": info.name,
                    "distribution": info.distribution,
                    "version": info.distribution_version,
                    "interface_version": info.interface_version,
                    "available": info.is_available,
                    "reason": info.reason,
                    "capabilities": info.capabilities.as_dict() if info.capabilities else None,
                }
                for info in infos
            ],
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        rows = [
            (
                "*" if info.name == selected else "",
                info.name,
                f"{info.distribution} {info.distribution_version}",
                info.interface_version,
                "yes" if info.is_available else f"no: {info.reason}",
                info.capabilities.summary() if info.capabilities else "-",
            )
            for info in infos
        ]
        sys.stdout.write(format_table(HEADERS, rows))
        sys.stdout.write(
            f"pagedllm {__version__}, backend interface {format_version(INTERFACE_VERSION)}; "
            f"rows in the order --device auto tries them\n"
        )
        if selected is not None:
            sys.stdout.write(f"--device {args.device} selects: {selected}\n")
    if error is not None:
        sys.stderr.write(f"pagedllm backends: --device {args.device}: {error}\n")
        return 1
    return 0


def format_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Return ``rows`` as left-aligned columns under ``headers``, two spaces apart, one line each."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in (headers, *rows)]
    return "\n".join(lines) + "\n"
