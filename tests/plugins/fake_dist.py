"""Fake installed distributions, pluggy's way: tests patch ``importlib.metadata.distributions`` with these
so the registry discovers fixture plugins through the real entry-point path, with nothing installed."""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

_REAL_DISTRIBUTIONS = metadata.distributions


class FakeDistribution(metadata.Distribution):
    """An installed distribution that exists only in memory: its ``METADATA`` and ``entry_points.txt``."""

    def __init__(self, name: str, version: str, entry_points: dict[str, str], group: str = "pagedllm") -> None:
        lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
        self._files = {
            "METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
            "entry_points.txt": f"[{group}]\n{lines}",
        }

    def read_text(self, filename: str) -> str | None:
        """The text of one metadata file, or None."""
        return self._files.get(filename)

    def locate_file(self, path: object) -> object:
        """No files on disk."""
        raise FileNotFoundError(path)


def distributions_of(*dists: FakeDistribution) -> Callable[[], list[object]]:
    """A stand-in for ``importlib.metadata.distributions``: the real distributions minus every pagedllm
    plugin actually installed (so tests do not depend on what else is installed), plus ``dists``.

    Other entry points stay, so an in-process ``pytest.main`` still loads its ``pytest11`` plugins.
    """

    def distributions() -> list[object]:
        real = [d for d in _REAL_DISTRIBUTIONS() if not any(ep.group == "pagedllm" for ep in d.entry_points)]
        return [*real, *dists]

    return distributions
