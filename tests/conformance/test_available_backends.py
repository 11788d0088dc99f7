"""Every available built-in backend passes the conformance kit, run as a vendor runs it:
``pytest --pyargs pagedllm.conformance --device NAME`` in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pagedllm.backends.registry import PluginRegistry


def available_builtins() -> list[str]:
    """Names of the built-in backends that can run on this machine."""
    registry = PluginRegistry(load_entry_points=False)
    return [info.name for info in registry.describe_backends() if info.is_available]


@pytest.mark.parametrize("device", available_builtins())
def test_conformance_kit_passes(device: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("pagedllm-conformance")) if cache is not None else tmp_path / "checkpoints"
    # Engine level compares a backend's generations with cpu's: for cpu itself that is vacuous (and slow here);
    # it runs against cpu in test_acme_plugin.py.
    select = ["-k", "not test_greedy_generation_matches_cpu"] if device == "cpu" else []
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "pagedllm.conformance", "--device", device, "-q",
         "-p", "no:cacheprovider", "--conformance-cache-dir", str(root), *select],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    tail = result.stdout[-3000:]
    assert result.returncode == 0, tail + result.stderr[-2000:]
    assert f"backend '{device}' from pagedllm" in tail and " 0 failed, 0 error" in tail
    print(tail)
