"""Fixtures shared by the unit tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedllm.backends import plugin_sources
from pagedllm.backends import registry as registry_module
from pagedllm.backends.plugin_sources import BLOCK_ENV

PLUGINS_DIR = Path(__file__).resolve().parents[1] / "plugins"
sys.path.insert(0, str(PLUGINS_DIR))  # the fixture plugins are plain modules there
from fake_dist import distributions_of  # noqa: E402


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Only the built-in plugins (no real third-party distribution, no block list), a fresh registry."""
    monkeypatch.setattr(plugin_sources.metadata, "distributions", distributions_of())
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    registry_module.reset_registry()
    yield
    registry_module.reset_registry()
