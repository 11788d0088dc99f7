"""The pytest plugin of the conformance kit: ``--device``, the backend under test, and the final report.

Registered through the ``pytest11`` entry point (named ``pagedllm.conformance.plugin``, the module path, so
``-p pagedllm.conformance.plugin`` or autoloading register it once), hence loaded in every pytest run of an
environment where pagedllm is installed; it only adds the ``--device`` option and ``conformance_*``
fixtures, and only the kit's own tests (``pytest --pyargs pagedllm.conformance``) use them. The backend is
resolved lazily, the first time a kit test is collected, through the same registry ``--device`` uses
everywhere: an unknown or unavailable backend stops the run with the registry's message.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pagedllm.backends.interface import Backend, BackendCapabilities, format_version
from pagedllm.backends.registry import BackendEntry

KIT_DIR = Path(__file__).resolve().parent


@dataclass(slots=True)
class ConformanceTarget:
    """The backend under test: resolved once per session from ``--device``."""

    name: str
    entry: BackendEntry
    backend: Backend
    device: torch.device
    capabilities: BackendCapabilities

    def describe(self) -> str:
        """One line: name, distribution and version, interface version."""
        cls = self.entry.backend_cls
        return (
            f"backend {self.name!r} from {self.entry.distribution} {self.entry.distribution_version} "
            f"(interface {format_version(cls.interface_version)}, device {self.device})"
        )


_TARGET = pytest.StashKey[ConformanceTarget]()
_KIT_NODEIDS = pytest.StashKey[set[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--device`` (only this plugin may define it), ``--conformance-seed`` and ``--conformance-cache-dir``."""
    group = parser.getgroup("pagedllm-conformance", "pagedllm backend conformance kit")
    group.addoption(
        "--device",
        action="store",
        default="auto",
        help="pagedllm backend the conformance kit tests (a name from `pagedllm backends`, or auto)",
    )
    group.addoption("--conformance-seed", action="store", type=int, default=0,
                    help="base seed of the kit's random inputs (default 0)")
    group.addoption("--conformance-cache-dir", action="store", default=None,
                    help="where the kit keeps the tiny checkpoints it builds (default: the pytest cache)")


def pytest_configure(config: pytest.Config) -> None:
    """Resolve ``--device`` up front when the run targets the kit, so a bad device is one usage error."""
    if _targets_kit(config):
        get_target(config)


def _targets_kit(config: pytest.Config) -> bool:
    """True when a command-line argument names the kit (``--pyargs pagedllm.conformance[...]``) or a path
    inside it, or a folder that contains it."""
    for arg in config.args:
        name = str(arg).split("::", 1)[0]
        if config.option.pyargs and (name == "pagedllm.conformance" or name.startswith("pagedllm.conformance.")):
            return True
        path = Path(name).resolve()
        if path == KIT_DIR or KIT_DIR in path.parents or path in KIT_DIR.parents:
            return True
    return False


def get_target(config: pytest.Config) -> ConformanceTarget:
    """Return the backend under test, resolving ``--device`` on first use.

    Raises ``pytest.UsageError`` with the registry's message for an unknown or unavailable backend (or
    a broken plugin), which stops the run before any test.
    """
    target = config.stash.get(_TARGET, None)
    if target is not None:
        return target
    from pagedllm.backends.registry import PluginError, get_registry

    device_name = config.getoption("device")
    try:
        registry = get_registry()
        cls = registry.resolve_backend(device_name)
        entry = registry.backends()[cls.name]
        backend = cls()
        backend.init_device(0, 1)
        capabilities = backend.capabilities()
        device = backend.device(0)
    except (PluginError, ValueError, RuntimeError) as exc:
        raise pytest.UsageError(f"pagedllm conformance: --device {device_name}: {exc}") from exc
    target = ConformanceTarget(cls.name, entry, backend, device, capabilities)
    config.stash[_TARGET] = target
    return target


def case_id(config: pytest.Config, *parts: object) -> str:
    """Return a parametrization id starting with the backend name: ``acme-mixed-gqa-float16``."""
    return "-".join([get_target(config).name, *(_id_part(p) for p in parts)])


def _id_part(part: object) -> str:
    if isinstance(part, torch.dtype):
        return str(part).removeprefix("torch.")
    return str(part)


@pytest.fixture(scope="session")
def conformance_target(request: pytest.FixtureRequest) -> ConformanceTarget:
    """The backend under test (see :func:`get_target`)."""
    return get_target(request.config)


@pytest.fixture
def conformance_generator(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from ``--conformance-seed`` and the test id: reruns see the same inputs."""
    seed = request.config.getoption("conformance_seed") + zlib.crc32(request.node.nodeid.encode())
    return torch.Generator().manual_seed(seed)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Remember which collected tests belong to the kit, for the final report."""
    config.stash[_KIT_NODEIDS] = {item.nodeid for item in items if KIT_DIR in Path(str(item.path)).parents}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """Report the backend tested, its claims, the outcome counts and every skip reason of the kit."""
    nodeids = config.stash.get(_KIT_NODEIDS, set())
    target = config.stash.get(_TARGET, None)
    if not nodeids or target is None:
        return
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "nodeid", None) not in nodeids:
                continue
            if outcome == "passed" and report.when != "call":
                continue
            counts[outcome] += 1
            if outcome == "skipped" and isinstance(report.longrepr, tuple):
                reasons[str(report.longrepr[2]).removeprefix("Skipped: ")] += 1
    terminalreporter.write_sep("=", "pagedllm conformance")
    terminalreporter.write_line(target.describe())
    terminalreporter.write_line(f"claims: {target.capabilities.summary()}")
    terminalreporter.write_line(", ".join(f"{counts[o]} {o}" for o in ("passed", "failed", "error", "skipped")))
    if reasons:
        terminalreporter.write_line("skipped (not claimed or not applicable), with counts:")
        for reason, count in sorted(reasons.items()):
            terminalreporter.write_line(f"  {count:3d} x {reason}")
