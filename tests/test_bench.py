"""The benchmark harness (bench/common.py, python -m bench): fake groups, constructed numbers, no timing."""

import json
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench.common import (
    BenchRun,
    add_roofline,
    fill_ratios,
    format_compact,
    format_markdown,
    run_group,
    run_groups,
    time_seconds,
)
from bench.roofline import attach_work, conv_work

ROOT = Path(__file__).resolve().parents[1]
META = {"date": "2026-01-01 00:00 UTC", "cpu": "test CPU", "cpu_cores": 2, "card": "none (CPU run)",
        "torch": "x", "triton": "y", "dali": "z", "commit": "abc1234", "dirty": False}  # fmt: skip
PEAKS = {"device": "cpu", "dtype": "float32", "flops_per_s": 1e12, "bytes_per_s": 1e11, "matmul_n": 8,
         "copy_bytes": 8, "method": "constructed"}  # fmt: skip


def row(name, variant, value, unit, baseline="eager", ratio=None, **extra):
    return dict(group="fake", name=name, variant=variant, baseline=baseline, value=value, unit=unit,
                ratio_vs_baseline=ratio, **extra)  # fmt: skip


def fake_module(rows):
    return types.SimpleNamespace(run=lambda device, quick: [dict(r) for r in rows])


def failing_module(device, quick):
    raise RuntimeError("boom on purpose")


FAKE_ROWS = [
    row("conv", "eager", 4.0, "ms", flops=2e9, bytes=1e8),
    row("conv", "fused", 2.0, "ms", flops=2e9, bytes=1e8),
    row("loader", "baseline", 100.0, "images/s", baseline="baseline"),
    row("loader", "dali", 300.0, "images/s", baseline="baseline"),
    row("saved", "eager", 1000.0, "bytes"),
    row("saved", "fused", 250.0, "bytes", ratio=0.25),
]


def test_time_units():
    assert time_seconds(2.0, "ms") == pytest.approx(2e-3)
    assert time_seconds(3.0, "ms/step") == pytest.approx(3e-3)
    assert time_seconds(5.0, "us") == pytest.approx(5e-6)
    assert time_seconds(1.0, "s") == 1.0
    assert time_seconds(100.0, "images/s") is None
    assert time_seconds(1.0, "bytes") is None


def test_ratios_and_gain_on_constructed_numbers():
    rows = fill_ratios([dict(r, status="ok") for r in FAKE_ROWS])
    by = {(r["name"], r["variant"]): r for r in rows}
    assert by["conv", "fused"]["ratio_vs_baseline"] == pytest.approx(0.5)  # filled: 2 ms / 4 ms
    assert by["conv", "fused"]["gain"] == pytest.approx(2.0)  # time: lower is better
    assert by["conv", "fused"]["baseline_value"] == 4.0
    assert by["conv", "eager"]["ratio_vs_baseline"] == pytest.approx(1.0)
    assert by["loader", "dali"]["ratio_vs_baseline"] == pytest.approx(3.0)
    assert by["loader", "dali"]["gain"] == pytest.approx(3.0)  # rate: higher is better
    assert by["saved", "fused"]["ratio_vs_baseline"] == 0.25  # given by the group: kept
    assert by["saved", "fused"]["gain"] == pytest.approx(4.0)


def test_roofline_on_constructed_numbers():
    # 2e9 flops at 1e12 FLOP/s = 2 ms; 1e8 bytes at 1e11 B/s = 1 ms; measured 4 ms -> 50 % of the roofline.
    r = add_roofline(dict(FAKE_ROWS[0], status="ok"), PEAKS)
    assert r["flop_floor_s"] == pytest.approx(2e-3)
    assert r["byte_floor_s"] == pytest.approx(1e-3)
    assert r["roofline_fraction"] == pytest.approx(0.5)
    only_bytes = add_roofline(dict(row("fd", "fused", 0.5, "ms", bytes=1e8), status="ok"), PEAKS)
    assert only_bytes["flop_floor_s"] is None and only_bytes["roofline_fraction"] == pytest.approx(2.0)
    # a rate with the time given another way: 1e10 flops per step at 1e12 FLOP/s = 10 ms; the step took
    # 0.1 s (time_s), or achieved 0.1 TFLOP/s (bench/step.py's tflops): 10 % of the roofline either way.
    for extra in (dict(time_s=0.1), dict(tflops=0.1)):
        rate = add_roofline(dict(row("step", "x", 640.0, "img/s", flops=1e10, **extra), status="ok"), PEAKS)
        assert rate["flop_floor_s"] == pytest.approx(1e-2) and rate["roofline_fraction"] == pytest.approx(0.1)
    no_time = add_roofline(dict(row("step", "x", 640.0, "img/s", flops=1e10), status="ok"), PEAKS)
    assert no_time["flop_floor_s"] == pytest.approx(1e-2) and no_time["roofline_fraction"] is None
    bandwidth = add_roofline(dict(row("fd", "x", 900.0, "GB/s", bytes=1e9), status="ok"), PEAKS)
    assert bandwidth["byte_floor_s"] == pytest.approx(1e-2) and bandwidth["roofline_fraction"] is None
    assert add_roofline(dict(FAKE_ROWS[0], status="ok"), None)["roofline_fraction"] is None


def test_conv_work_by_hand():
    # 1x1x4x4 input, one 3x3 filter, stride 1, pad 1: y is 4x4; fwd = 2*16*9 = 288 flops, x3 for fwd+bwd.
    flops, nbytes = conv_work(1, 1, 1, 4, 3, 1, 1, False, 4)
    assert flops == 864 and nbytes == 4 * (3 * 16 + 3 * 9 + 3 * 16 + 2)
    # transposed: 2x2 input, 4x4 kernel, stride 2, pad 1 -> 4x4 output; fwd = 2*4*16 = 128 flops.
    flops, _ = conv_work(1, 1, 1, 2, 4, 2, 1, True, 2)
    assert flops == 3 * 128


def test_attach_work_from_group_tables():
    module = types.SimpleNamespace(CONV_LAYERS=[("l1", 1, 1, 4, 3, 1, 1)], UPCONV_LAYERS=[],
                                   FEATURE_TAPS=[(2, 3, 4, 4)])  # fmt: skip
    rows = [
        row("conv_lrelu/l1/b1/float32/fwd+bwd", "triton", 1.0, "ms"),
        row("feature_distance/1 taps/b2/bfloat16/fwd+bwd", "triton", 1.0, "ms"),
        row("saved_bytes/conv_lrelu/l1/b1", "fused", 1.0, "bytes"),
        row("conv_lrelu/l1/b1/float32/fwd+bwd", "given", 1.0, "ms", flops=7.0),
    ]
    attach_work(rows, module)
    assert rows[0]["flops"] == 864
    assert rows[1]["flops"] == 5 * 96 and rows[1]["bytes"] == 5 * 96 * 2
    assert "flops" not in rows[2]
    assert rows[3]["flops"] == 7.0 and "bytes" not in rows[3]


def test_failing_and_missing_groups_become_rows(tmp_path):
    modules = {"kernels": fake_module(FAKE_ROWS), "loader": types.SimpleNamespace(run=failing_module)}
    run = run_groups(
        ["kernels", "loader"], "cpu", True, modules=modules, peaks=PEAKS, meta=META, out=tmp_path
    )
    assert run.groups["kernels"]["status"] == "ok"
    assert run.groups["loader"]["status"] == "failed: RuntimeError: boom on purpose"
    failed = [r for r in run.rows if r["status"] != "ok"]
    assert len(failed) == 1 and failed[0]["group"] == "loader"
    rows, info = run_group("no_such_group", "cpu", True)  # bench/no_such_group.py does not exist
    assert (
        info["status"] == "skipped: bench/no_such_group.py does not exist"
        and rows[0]["status"] == info["status"]
    )
    bad = run_group("kernels", "cpu", True, module=types.SimpleNamespace(run=lambda d, q: "not a list"))
    assert bad[1]["status"].startswith("failed: TypeError")


def test_group_timeout():
    def slow(device, quick):
        time.sleep(5)
        return []

    t0 = time.perf_counter()
    rows, info = run_group("step", "cpu", True, module=types.SimpleNamespace(run=slow), timeout_s=0.2)
    assert info["status"].startswith("failed: GroupTimeout") and time.perf_counter() - t0 < 3


def test_writes_json_and_markdown(tmp_path):
    modules = {"kernels": fake_module(FAKE_ROWS), "step": types.SimpleNamespace(run=failing_module)}
    run_groups(["kernels", "step"], "cpu", False, modules=modules, peaks=PEAKS, meta=META, out=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["commit"] == "abc1234" and data["peaks"]["flops_per_s"] == 1e12
    assert len(data["rows"]) == len(FAKE_ROWS) + 1
    conv = next(r for r in data["rows"] if r["variant"] == "fused" and r["name"] == "conv")
    assert conv["roofline_fraction"] == pytest.approx(1.0) and conv["gain"] == pytest.approx(2.0)
    md = (tmp_path / "results.md").read_text()
    assert (
        "| group | benchmark | variant | baseline | value | baseline value |" in md
        and "failed: RuntimeError" in md
        and "abc1234" in md
    )
    assert "2x" in md and "100%" in md
    again = BenchRun.from_dict(data)  # a saved run renders the same
    assert format_markdown(again) == md
    assert "gain 2x" in format_compact(again)


def test_main_with_fake_groups_and_append(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bench.kernels", fake_module(FAKE_ROWS))
    monkeypatch.setitem(sys.modules, "bench.loader", types.SimpleNamespace(run=failing_module))
    results = tmp_path / "RESULTS.md"
    results.write_text("# curated\n")
    out = tmp_path / "out"
    code = bench_main.main(["--groups", "kernels,loader", "--no-peaks", "--device", "cpu", "--out", str(out),
                            "--append-results", "--results-file", str(results)])  # fmt: skip
    assert code == 0 and (out / "results.json").exists() and (out / "results.md").exists()
    text = results.read_text()
    assert text.startswith("# curated\n") and "failed: RuntimeError: boom on purpose" in text
    assert "commit" in text and "card: none (CPU run)" in text
    assert bench_main.main(["--from-json", str(out), "--compact"]) == 0
    assert bench_main.main(["--groups", "nope", "--no-peaks"]) == 2


def test_measured_peaks_are_positive():
    from bench.common import measure_peaks

    peaks = measure_peaks("cpu", quick=True)
    assert peaks["flops_per_s"] > 1e8 and peaks["bytes_per_s"] > 1e8 and peaks["dtype"] == "float32"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_parses():
    script = ROOT / "bench" / "gpu.sh"
    assert script.exists()
    subprocess.run(["bash", "-n", str(script)], check=True)
