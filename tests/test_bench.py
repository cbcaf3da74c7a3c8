"""The benchmark harness (bench/rows, roofline, runner, results, tables, cli, machine, timelimit;
python -m bench): fake groups, constructed numbers, no timing."""

import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from bench import cli as bench_main
from bench.machine import commit_label, git_state, tree_fingerprint, write_commit_stamp
from bench.outputs import write_outputs
from bench.results import KILLED, BenchRun, load_run
from bench.roofline import add_roofline, attach_work, conv_work
from bench.rows import fill_ratios, time_seconds
from bench.runner import run_group, run_groups
from bench.tables import REPORT_SECTIONS, format_compact, format_markdown, report_section
from bench.timelimit import GroupTimeout, seconds_left, time_limit

ROOT = Path(__file__).resolve().parents[1]
META = {
    "date": "2026-01-01 00:00 UTC",
    "cpu": "test CPU",
    "cpu_cores": 2,
    "card": "none (CPU run)",
    "torch": "x",
    "triton": "y",
    "dali": "z",
    "commit": "abc1234",
    "dirty": False,
}
PEAKS = {
    "device": "cpu",
    "dtype": "float32",
    "flops_per_s": 1e12,
    "bytes_per_s": 1e11,
    "matmul_n": 8,
    "copy_bytes": 8,
    "method": "constructed",
}


def row(name, variant, value, unit, baseline="eager", ratio=None, **extra):
    return dict(
        group="fake",
        name=name,
        variant=variant,
        baseline=baseline,
        value=value,
        unit=unit,
        ratio_vs_baseline=ratio,
        **extra,
    )


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
    module = types.SimpleNamespace(
        CONV_LAYERS=[("l1", 1, 1, 4, 3, 1, 1)], UPCONV_LAYERS=[], FEATURE_TAPS=[(2, 3, 4, 4)]
    )
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


def test_group_timeout_is_not_swallowed_and_keeps_the_rows():
    """torch.compile catches Exception in many places; the timeout is a BaseException, so a group that
    swallows every Exception (as inductor does) still stops, and keeps the rows it had measured."""
    assert issubclass(GroupTimeout, BaseException) and not issubclass(GroupTimeout, Exception)
    seen = []

    def swallowing(device, quick, rows):
        rows.append(row("conv", "eager", 4.0, "ms"))
        seen.append(seconds_left())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                time.sleep(0.02)
            except Exception:  # noqa: BLE001 - what inductor's compile workers and probes do
                pass
        rows.append(row("conv", "never", 1.0, "ms"))

    t0 = time.perf_counter()
    rows, info = run_group("step", "cpu", True, module=types.SimpleNamespace(run=swallowing), timeout_s=0.3)
    assert time.perf_counter() - t0 < 3
    assert info["status"].startswith("partial: group step ran past its 0.3 s limit") and info["rows"] == 1
    assert [r["variant"] for r in rows] == ["eager", ""] and rows[1]["status"] == info["status"]
    assert 0 < seen[0] <= 0.3 and seconds_left() is None  # the limit is gone once the group ended


def test_time_limit_repeats_until_the_block_ends():
    """A block that swallows even the first BaseException gets another one a few seconds later."""
    import bench.timelimit as timelimit

    fired = 0
    t0 = time.perf_counter()
    old_repeat, timelimit.REPEAT_S = timelimit.REPEAT_S, 0.1
    try:
        with pytest.raises(GroupTimeout):
            with time_limit(0.1, "block"):
                while time.perf_counter() - t0 < 5:
                    try:
                        time.sleep(0.02)
                    except GroupTimeout:
                        fired += 1
                        if fired == 1:
                            continue  # swallowed once; the next alarm must still come
                        raise
    finally:
        timelimit.REPEAT_S = old_repeat
    assert fired == 2 and time.perf_counter() - t0 < 3


def test_rows_are_saved_as_they_are_measured(tmp_path):
    """results.json holds each row as soon as the group appends it, before the group ends."""
    on_disk = []

    def measuring(device, quick, rows):
        for i, variant in enumerate(["eager", "fused"]):
            rows.append(row("conv", variant, 4.0 - i, "ms"))
            on_disk.append(json.loads((tmp_path / "results.json").read_text()))
        raise RuntimeError("crashed after two rows")

    run = run_groups(
        ["step"],
        "cpu",
        True,
        modules={"step": types.SimpleNamespace(run=measuring)},
        peaks=PEAKS,
        meta=META,
        out=tmp_path,
    )
    assert [len(d["rows"]) for d in on_disk] == [1, 2]
    assert on_disk[0]["groups"]["step"]["status"] == "running"
    assert run.groups["step"]["status"] == "failed: RuntimeError: crashed after two rows"
    assert [r["variant"] for r in run.rows] == ["eager", "fused", ""]  # the rows before the crash are kept
    assert run.rows[1]["gain"] == pytest.approx(4 / 3)


def test_a_killed_group_reads_back_as_partial(tmp_path):
    """A process killed inside a group leaves it "running" in results.json; read back, it is partial."""
    run = BenchRun(META, PEAKS, quick=False)
    run.add(
        "kernels",
        [dict(row("conv", "eager", 4.0, "ms"), group="kernels", status="ok")],
        {"status": "ok", "rows": 1},
    )
    run.begin_group("step")
    run.set_rows("step", [dict(row("step", "eager", 100.0, "img/s"), group="step", status="ok")])
    write_outputs(run, tmp_path)  # what the file holds when the kill comes
    again = load_run(tmp_path)
    assert again.groups["kernels"]["status"] == "ok" and again.groups["step"]["status"] == KILLED
    assert [r["status"] for r in again.rows] == ["ok", "ok", KILLED]
    assert KILLED in format_markdown(again)


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


def test_merge_adds_groups_to_an_existing_run(tmp_path, monkeypatch):
    """bench/gpu.sh runs each group in its own process into one results.json (--merge)."""
    monkeypatch.setitem(sys.modules, "bench.kernels", fake_module(FAKE_ROWS[:2]))
    monkeypatch.setitem(sys.modules, "bench.loader", fake_module(FAKE_ROWS[2:4]))
    monkeypatch.setattr(bench_main, "machine_info", lambda device: dict(META))
    args = ["--no-peaks", "--device", "cpu", "--out", str(tmp_path), "--merge"]
    assert bench_main.main(["--groups", "kernels"] + args) == 0
    assert bench_main.main(["--groups", "loader"] + args) == 0
    assert bench_main.main(["--groups", "kernels"] + args) == 0  # run again: replaces its rows
    run = load_run(tmp_path)
    assert list(run.groups) == ["loader", "kernels"] and len(run.rows) == 4  # in the order they last ran
    assert all(info["status"] == "ok" for info in run.groups.values())


def test_report_sections_follow_the_main_table(tmp_path):
    @report_section
    def dispatcher(run):
        chosen = [r for r in run.rows if r.get("dispatch")]
        return (
            "### Dispatcher\n\n" + "\n".join(f"- {r['name']}: {r['dispatch']}" for r in chosen)
            if chosen
            else None
        )

    try:
        run = BenchRun(META, None, quick=True)
        run.add(
            "kernels",
            [dict(row("conv", "eager", 4.0, "ms", dispatch="cudnn"), status="ok")],
            {"status": "ok"},
        )
        md = format_markdown(run)
        assert md.index("| group |") < md.index("### Dispatcher") and "- conv: cudnn" in md
        assert "- conv: cudnn" in format_compact(run)
        assert "Dispatcher" not in format_markdown(BenchRun(META, None, quick=True))  # None: no section
    finally:
        REPORT_SECTIONS.remove(dispatcher)


def test_commit_from_git_env_or_stamp(tmp_path, monkeypatch):
    """A copy without .git names the commit from $DEEPSIM_COMMIT, else from bench/COMMIT, and says so when
    its files are not the stamped ones."""
    root = Path(__file__).resolve().parents[1]
    state = git_state(root)
    if state["commit_source"] != "git":
        pytest.skip("this checkout has no git metadata")
    copy = tmp_path / "copy"
    for top in ("deepsim", "kernels", "bench", "tests"):
        shutil.copytree(root / top, copy / top, ignore=shutil.ignore_patterns("__pycache__", "out"))
    stamp = write_commit_stamp(copy / "bench" / "COMMIT", root)
    assert stamp["commit"] == state["commit"] and stamp["fingerprint"] == tree_fingerprint(copy)
    monkeypatch.delenv("DEEPSIM_COMMIT", raising=False)
    from_stamp = git_state(copy)
    assert from_stamp["commit"] == state["commit"] and from_stamp["stamp_matches_tree"]
    assert "NOT the code that ran" not in commit_label(from_stamp)
    (copy / "bench" / "rows.py").write_text("# edited after stamping\n")
    assert "NOT the code that ran" in commit_label(git_state(copy))
    monkeypatch.setenv("DEEPSIM_COMMIT", "abc1234")
    assert git_state(copy)["commit"] == "abc1234"  # still honoured, and first
    monkeypatch.delenv("DEEPSIM_COMMIT")
    (copy / "bench" / "COMMIT").unlink()
    assert git_state(copy)["commit"] == "unknown"


def test_main_with_fake_groups_and_append(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bench.kernels", fake_module(FAKE_ROWS))
    monkeypatch.setitem(sys.modules, "bench.loader", types.SimpleNamespace(run=failing_module))
    results = tmp_path / "RESULTS.md"
    results.write_text("# curated\n")
    out = tmp_path / "out"
    code = bench_main.main(
        [
            "--groups",
            "kernels,loader",
            "--no-peaks",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--append-results",
            "--results-file",
            str(results),
        ]
    )
    assert code == 0 and (out / "results.json").exists() and (out / "results.md").exists()
    text = results.read_text()
    assert text.startswith("# curated\n") and "failed: RuntimeError: boom on purpose" in text
    assert "commit" in text and "card: none (CPU run)" in text
    assert bench_main.main(["--from-json", str(out), "--compact"]) == 0
    assert bench_main.main(["--groups", "nope", "--no-peaks"]) == 2


def test_measured_peaks_are_positive():
    from bench.peaks import measure_peaks

    peaks = measure_peaks("cpu", quick=True)
    assert peaks["flops_per_s"] > 1e8 and peaks["bytes_per_s"] > 1e8 and peaks["dtype"] == "float32"


GPU_PHASES = [
    "env",
    "install",
    "tests-contact",
    "tests-kernels",
    "tests-step",
    "bench-kernels",
    "bench-step",
    "bench-loader",
    "bench-lpips",
    "finish",
]
OUT_FILES = {"commit.txt", "logs.tar.gz", "phases.tsv", "results.json", "results.md", "summary.txt"}


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout"
)
def test_gpu_script_dry_run_brings_back_at_most_8_files(tmp_path):
    """bench/gpu.sh --dry-run: every phase of the GPU run with CPU stand-ins (about a minute on 2 cores);
    what the device tool would bring back is at most 8 plain files, results.json among them."""
    import tarfile

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "DEEPSIM_COMMIT"}
    env["PYTHON"] = sys.executable
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    entries = list(out.iterdir())
    assert len(entries) <= 8 and all(p.is_file() for p in entries)
    assert {p.name for p in entries} == OUT_FILES
    phases = [line.split("\t") for line in (out / "phases.tsv").read_text().splitlines()]
    assert phases[0][:5] == ["phase", "rc", "seconds", "estimate_s", "limit_s"]
    assert [p[0] for p in phases[1:]] == GPU_PHASES and all(p[1] == "0" for p in phases[1:]), phases
    data = json.loads((out / "results.json").read_text())
    assert data["mode"] == "dry-run" and list(data["groups"]) == ["kernels", "step", "loader", "lpips"]
    assert all(info["status"] == "ok" for info in data["groups"].values()), data["groups"]
    failed = [(r["group"], r["name"], r["status"]) for r in data["rows"] if r["status"].startswith("failed")]
    assert not failed, failed  # a row that failed is a figure the GPU run would not bring back
    workloads = {
        r["name"].split(" ")[0] for r in data["rows"] if r["group"] == "step" and r["status"] == "ok"
    }
    assert {"autoencoder", "invert-fc6"} <= workloads, workloads
    step = {r["variant"] for r in data["rows"] if r["group"] == "step" and r["status"] == "ok"}
    assert {
        "eager",
        "eager-fused",
        "compiled-step",
        "compiled-step-fused",
        "compiled-step-cudagraphs",
        "cudagraphs OR_ERROR check",
        "graph breaks in the compiled step",
    } <= step
    loader = {r["variant"] for r in data["rows"] if r["group"] == "loader" and r["status"] == "ok"}
    assert {"torchvision+PIL", "torchvision decode_jpeg (cpu)"} <= loader
    lpips_rows = {r["variant"] for r in data["rows"] if r["group"] == "lpips" and r["status"] == "ok"}
    assert {"deepsim LPIPS"} <= lpips_rows  # the lpips package's rows where it is installed
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(name).name for name in tar.getnames()}
    assert {f"{name}.log" for name in GPU_PHASES[:-1]} <= logs
    commit = git_state(ROOT)
    assert (out / "commit.txt").read_text().strip() == commit_label(commit)
    summary = (out / "summary.txt").read_text()
    assert "dry-run" in summary and "bench-step" in summary and "compiled-step-cudagraphs" in summary
