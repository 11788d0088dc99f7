"""``--device`` on every command and in ``LLM(...)``, and the ``pagedllm backends`` table."""

from __future__ import annotations

import argparse
import json

import pytest
from fake_dist import FakeDistribution, distributions_of  # conftest puts tests/plugins on sys.path

from pagedllm.backends import plugin_sources
from pagedllm.backends import registry as registry_module
from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.interface import INTERFACE_VERSION, format_version
from pagedllm.entrypoints import cli
from pagedllm.entrypoints.cli_backends import format_table

BROKEN = FakeDistribution("broken-backends", "0.3", {"broken": "broken_backends"})


pytestmark = pytest.mark.usefixtures("isolated_registry")


def leaf_parsers(parser: argparse.ArgumentParser, path: str = "pagedllm") -> list[tuple[str, argparse.ArgumentParser]]:
    """Every runnable command's parser (sub-commands of sub-commands included)."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return [(path, parser)]
    leaves = []
    for action in subparsers:
        for name, child in action.choices.items():
            leaves += leaf_parsers(child, f"{path} {name}")
    return leaves


# Commands that run no engine, so a --device there would do nothing (vLLM's mistake: a flag that did nothing).
NO_ENGINE_COMMANDS: dict[str, str] = {
    "pagedllm bench serve": "a load generator against a running server; the server's --device decides",
}


def test_every_command_takes_device() -> None:
    parser, modules = cli.build_parser()
    assert {"generate", "backends"} <= set(modules)
    leaves = leaf_parsers(parser)
    assert leaves
    for path, leaf in leaves:
        if path in NO_ENGINE_COMMANDS:
            continue
        options = {s for action in leaf._actions for s in action.option_strings}
        assert "--device" in options, f"`{path}` has no --device (use engine_args.add_device_arg)"
        device = next(a for a in leaf._actions if "--device" in a.option_strings)
        assert device.default == "auto", path


def test_generate_with_unknown_device_fails_listing_backends(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "/nonexistent", "--device", "tpu", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'tpu'; known backends: cpu, cuda, rocm (or auto)" in err
    assert "Traceback" not in err


def test_llm_device_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm.entrypoints.llm import LLM

    with pytest.raises(ValueError, match=r"unknown device 'tpu'; known backends: cpu, cuda, rocm \(or auto\)"):
        LLM("/nonexistent", device="tpu")
    monkeypatch.setattr(plugin_sources.metadata, "distributions", distributions_of(BROKEN))
    registry_module.reset_registry()
    from broken_backends import OffByOneSlotBackend

    monkeypatch.setattr(OffByOneSlotBackend, "is_available", classmethod(lambda cls: (False, "slot card unplugged")))
    with pytest.raises(RuntimeError, match="backend 'broken_slot' is not available: slot card unplugged"):
        LLM("/nonexistent", device="broken_slot")


def test_backends_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "DISTRIBUTION", "INTERFACE", "AVAILABLE", "CAPABILITIES"]
    cpu_row = next(line for line in lines if line.split()[:2] == ["*", "cpu"])
    assert "pagedllm 0.1.0" in cpu_row and " yes " in cpu_row
    assert f" {format_version(CpuBackend.interface_version)} " in cpu_row
    assert ("float32,bfloat16,float16; kv float32,bfloat16,float16,float8_e4m3fn,float8_e5m2; "
            "quantization fp8,fp8_block,w4a16; blocks 1,2,4") in cpu_row
    assert "--device auto selects: cpu" in out or "--device auto selects: cuda" in out


def test_backends_json_with_a_third_party_plugin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(plugin_sources.metadata, "distributions", distributions_of(BROKEN))
    assert cli.main(["backends", "--json", "--device", "cpu"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["interface_version"] == format_version(INTERFACE_VERSION)
    assert document["selected"] == "cpu" and document["error"] is None
    rows = {row["name"]: row for row in document["backends"]}
    assert list(rows)[:11] == ["broken_fp8_block", "broken_fp8_groups", "broken_fp8_inputs", "broken_fp8_linear",
                               "broken_fp8_static", "broken_gqa", "broken_kv_scales", "broken_qk_norm",
                               "broken_rms_norm", "broken_slot", "broken_unwritten"]  # auto order
    assert rows["broken_slot"]["distribution"] == "broken-backends" and rows["broken_slot"]["version"] == "0.3"
    assert rows["cpu"]["available"] is True and rows["cpu"]["capabilities"]["dtypes"][0] == "float32"
    assert set(rows["cuda"]) == {"name", "distribution", "version", "interface_version", "available", "reason",
                                 "capabilities"}


def test_backends_with_unavailable_device_exits_1_with_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(plugin_sources.metadata, "distributions", distributions_of(BROKEN))
    from broken_backends import WrongGqaBackend

    monkeypatch.setattr(WrongGqaBackend, "is_available", classmethod(lambda cls: (False, "gqa card unplugged")))
    assert cli.main(["backends", "--device", "broken_gqa"]) == 1
    captured = capsys.readouterr()
    assert "no: gqa card unplugged" in captured.out
    assert "--device broken_gqa: backend 'broken_gqa' is not available: gqa card unplugged" in captured.err


def test_backends_reports_a_broken_plugin_loudly(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    broken = FakeDistribution("acme-sdk-plugin", "2.0", {"acme_sdk": "import_error_plugin"})
    monkeypatch.setattr(plugin_sources.metadata, "distributions", distributions_of(broken))
    assert cli.main(["backends"]) == 2  # one line naming the distribution, no traceback
    err = capsys.readouterr().err
    assert "'acme_sdk' from distribution 'acme-sdk-plugin' 2.0 failed to import" in err
    assert "Traceback" not in err


def test_format_table_aligns_columns() -> None:
    assert format_table(("A", "BB"), [("xxx", "y"), ("", "zz")]) == "A    BB\nxxx  y\n     zz\n"
