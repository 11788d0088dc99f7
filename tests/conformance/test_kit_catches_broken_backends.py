"""The conformance kit can fail: run in-process against deliberately broken backends (``tests/plugins/
broken_backends.py``, found through a faked distribution), it must fail exactly the cases each bug breaks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pagedllm.backends import plugin_sources
from pagedllm.backends import registry as registry_module
from pagedllm.backends.plugin_sources import BLOCK_ENV

PLUGINS_DIR = Path(__file__).resolve().parents[1] / "plugins"
sys.path.insert(0, str(PLUGINS_DIR))  # the fixture plugins are plain modules there
from fake_dist import FakeDistribution, distributions_of  # noqa: E402

BROKEN = FakeDistribution("broken-backends", "0.3", {"broken": "broken_backends"})


class Outcomes:
    """A pytest plugin recording the outcome of each test of an in-process run, by test id."""

    def __init__(self) -> None:
        self.by_id: dict[str, str] = {}
        self.longrepr: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Keep the call phase (or a failed/skipped setup)."""
        if report.when == "call" or report.outcome != "passed":
            test_id = report.nodeid.split("[", 1)[-1].rstrip("]") if "[" in report.nodeid else report.nodeid
            self.by_id[test_id] = report.outcome
            if report.failed:
                self.longrepr[test_id] = str(report.longrepr)

    def ids(self, outcome: str) -> set[str]:
        """Test ids with ``outcome``."""
        return {test_id for test_id, o in self.by_id.items() if o == outcome}


def run_kit(device: str, select: str) -> tuple[int, Outcomes]:
    """Run ``pytest --pyargs pagedllm.conformance --device DEVICE -k SELECT`` in this process."""
    outcomes = Outcomes()
    exit_code = pytest.main(["--pyargs", "pagedllm.conformance", "--device", device, "-k", select, "-q",
                             "-p", "no:cacheprovider"], plugins=[outcomes])
    return int(exit_code), outcomes


@pytest.fixture(autouse=True)
def broken_backends_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broken backends are the only third-party plugin; a fresh registry before and after."""
    monkeypatch.setattr(plugin_sources.metadata, "distributions", distributions_of(BROKEN))
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    registry_module.reset_registry()
    yield
    registry_module.reset_registry()


def test_off_by_one_slot_mapping_is_caught() -> None:
    code, outcomes = run_kit("broken_slot", "test_write_then_read_back or (test_attention and float32 and h64-b16 "
                                            "and (decode-gqa or prefill-mha or prefix_prefill-mqa or mixed-gqa))")
    assert code == pytest.ExitCode.TESTS_FAILED
    failed = outcomes.ids("failed")
    assert outcomes.ids("passed") == set(), "every write/read-back and attention case reads the shifted slots"
    assert {"broken_slot-decode-gqa-h64-b16-float32", "broken_slot-prefill-mha-h64-b16-float32",
            "broken_slot-prefix_prefill-mqa-h64-b16-float32", "broken_slot-mixed-gqa-h64-b16-float32"} <= failed
    assert "broken_slot-b16-float32" in failed
    assert "slot(s) differ" in outcomes.longrepr["broken_slot-b16-float32"]
    assert "attention differs from the float32 reference" in outcomes.longrepr["broken_slot-decode-gqa-h64-b16-float32"]


def test_wrong_gqa_head_mapping_is_caught_and_only_on_gqa() -> None:
    code, outcomes = run_kit("broken_gqa", "test_attention and h64-b16-float32")
    assert code == pytest.ExitCode.TESTS_FAILED
    failed, passed = outcomes.ids("failed"), outcomes.ids("passed")
    assert failed and all("-gqa-" in test_id for test_id in failed)
    for scenario in ("decode", "prefill", "prefix_prefill", "mixed"):
        assert f"broken_gqa-{scenario}-gqa-h64-b16-float32" in failed
        assert {f"broken_gqa-{scenario}-mha-h64-b16-float32", f"broken_gqa-{scenario}-mqa-h64-b16-float32"} <= passed


def test_unwritten_output_row_is_caught_by_poisoning() -> None:
    code, outcomes = run_kit("broken_unwritten", "test_attention and decode and float32")
    assert code == pytest.ExitCode.TESTS_FAILED
    assert outcomes.ids("passed") == set() and outcomes.ids("failed")
    assert "NaN present (unwritten output?)" in next(iter(outcomes.longrepr.values()))


def test_wrong_fused_op_is_caught_against_the_default() -> None:
    code, outcomes = run_kit("broken_rms_norm", "test_fused_op_matches")
    assert code == pytest.ExitCode.TESTS_FAILED
    failed = outcomes.ids("failed")
    assert {f"broken_rms_norm-{op}-{dtype}" for op in ("rms_norm", "add_rms_norm", "qk_norm_rotary_embedding")
            for dtype in ("float32", "float16", "bfloat16")} == failed  # the q/k norms' default composes rms_norm
    assert "broken_rms_norm-silu_and_mul-float32" in outcomes.ids("passed")


def test_a_wrong_norm_is_caught_in_the_fp8_input_ops_that_compose_it() -> None:
    code, outcomes = run_kit("broken_rms_norm", "test_fp8_input_op_matches")
    assert code == pytest.ExitCode.TESTS_FAILED
    assert {f"broken_rms_norm-{op}{groups}-{dtype}" for op in ("rms_norm_fp8", "add_rms_norm_fp8")
            for groups in ("", "_groups") for dtype in ("float32", "float16", "bfloat16")} == outcomes.ids("failed")
    assert {"broken_rms_norm-silu_and_mul_fp8-float32", "broken_rms_norm-silu_and_mul_fp8_groups-float32"
            } <= outcomes.ids("passed")


@pytest.mark.parametrize(("backend", "op", "passing"), [
    ("broken_fp8_linear", "linear_fp8", "linear"),  # the input never quantized
    ("broken_fp8_static", "linear_fp8_static", "linear_fp8"),  # the static input scale ignored
    ("broken_fp8_block", "linear_fp8_block", "linear_fp8"),  # tile-scaled weights, inputs per token
])  # fmt: skip
def test_a_wrong_fp8_linear_layer_is_caught(backend: str, op: str, passing: str) -> None:
    """Caught in exactly its op's cases, many tokens and one token, every dtype; a neighbouring op passes."""
    code, outcomes = run_kit(backend, "test_fused_op and linear")
    assert code == pytest.ExitCode.TESTS_FAILED
    assert {f"{backend}-{case}-{dtype}" for case in (op, f"{op}_one_token")
            for dtype in ("float32", "float16", "bfloat16")} == outcomes.ids("failed")
    assert f"{backend}-{passing}-float32" in outcomes.ids("passed")


@pytest.mark.parametrize(("backend", "suffix"), [("broken_fp8_inputs", ""), ("broken_fp8_groups", "_groups")])
def test_fp8_inputs_quantized_wrongly_are_caught(backend: str, suffix: str) -> None:
    """Scales for e4m3fnuz's range (per token), or per token where per group is due: caught in exactly the ops
    of that scheme; the other scheme's ops pass."""
    code, outcomes = run_kit(backend, "test_fp8_input_op_matches")
    assert code == pytest.ExitCode.TESTS_FAILED
    assert {f"{backend}-{op}{suffix}-{dtype}" for op in ("rms_norm_fp8", "add_rms_norm_fp8", "silu_and_mul_fp8")
            for dtype in ("float32", "float16", "bfloat16")} == outcomes.ids("failed")
    other = "_groups" if not suffix else ""
    assert f"{backend}-rms_norm_fp8{other}-float32" in outcomes.ids("passed")


def test_qk_norm_over_the_wrong_span_is_caught() -> None:
    code, outcomes = run_kit("broken_qk_norm", "test_fused_op_matches")
    assert code == pytest.ExitCode.TESTS_FAILED
    assert {f"broken_qk_norm-qk_norm_rotary_embedding-{dtype}" for dtype in ("float32", "float16", "bfloat16")
            } == outcomes.ids("failed")
    assert "broken_qk_norm-rotary_embedding-float32" in outcomes.ids("passed")


def test_key_scale_left_out_of_the_scores_is_caught() -> None:
    code, outcomes = run_kit("broken_kv_scales", "test_attention and kv_ or test_scaled_write")
    assert code == pytest.ExitCode.TESTS_FAILED
    dtypes = ("float32", "bfloat16", "float16")
    assert {f"broken_kv_scales-kv_scaled-gqa-h64-b16-{dtype}-kv_{kv}" for dtype in dtypes
            for kv in ("float8_e4m3fn", "float8_e5m2")} == outcomes.ids("failed")
    assert "attention differs from the float32 reference" in outcomes.longrepr[
        "broken_kv_scales-kv_scaled-gqa-h64-b16-float32-kv_float8_e4m3fn"]
    passed = outcomes.ids("passed")  # the scaled store and the unscaled fp8 cache are right
    assert {"broken_kv_scales-scaled-float32-kv_float8_e4m3fn",
            "broken_kv_scales-kv_only-gqa-h64-b16-float32-kv_float8_e4m3fn"} <= passed
    code, outcomes = run_kit("broken_kv_scales", "test_greedy_generation_with_kv_cache_scales")  # the whole engine
    assert code == pytest.ExitCode.TESTS_FAILED
    (failure,) = outcomes.longrepr.values()
    assert "not in each other's top 5" in failure


def test_unknown_or_unavailable_device_stops_the_kit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from broken_backends import OffByOneSlotBackend

    code, _ = run_kit("tpu", "attention")
    assert code == pytest.ExitCode.USAGE_ERROR
    assert "pagedllm conformance: --device tpu: unknown device 'tpu'; known backends:" in capsys.readouterr().err
    monkeypatch.setattr(OffByOneSlotBackend, "is_available", classmethod(lambda cls: (False, "card unplugged")))
    registry_module.reset_registry()
    code, _ = run_kit("broken_slot", "attention")
    assert code == pytest.ExitCode.USAGE_ERROR
    assert "backend 'broken_slot' is not available: card unplugged" in capsys.readouterr().err
