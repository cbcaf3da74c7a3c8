"""bench.time_model: the per-step roofline estimate from bench.cuda_compile's rows, and bench.step's measured
vs estimated fields."""

import json
import types

import pytest

from bench import time_model
from bench.time_model import H100, estimate


def _row(launches=100, triton=((0.001, 0.0, 10),)):
    kernel_list = [
        dict(kind="triton", name=f"triton_{i}", gb=gb, flop=flop, launches=n)
        for i, (gb, flop, n) in enumerate(triton)
    ]
    kernel_list.append(
        dict(kind="extern", name="convolution", launches=launches - sum(n for *_, n in triton))
    )
    return dict(
        workload="autoencoder",
        kernels="auto",
        batch=64,
        status="ok",
        launches_per_step=launches,
        flops_per_step=1e11,
        kernel_list=kernel_list,
    )


def test_estimate_is_the_sum_of_rooflines_and_launch_costs():
    e = estimate(_row(), efficiency=0.5)
    assert e["estimated_triton_s"] == pytest.approx(10 * 0.001e9 / H100.hbm_bytes)  # memory-bound kernel
    assert e["estimated_mma_s"] == pytest.approx(1e11 / (H100.bf16_flops * 0.5))
    assert e["estimated_launch_s"] == pytest.approx(100 * H100.launch_s)
    assert e["estimated_step_s"] == pytest.approx(
        e["estimated_triton_s"] + e["estimated_mma_s"] + e["estimated_launch_s"]
    )
    assert e["estimated_images_per_s"] == pytest.approx(64 / e["estimated_step_s"])
    assert e["target_images_per_s"] == 40_000 and "not a measurement" in e["note"]
    fewer = estimate(_row(launches=60), efficiency=0.5)
    assert fewer["estimated_step_s"] < e["estimated_step_s"]  # each launch costs


def test_compute_bound_kernel_counts_its_flops():
    e = estimate(_row(triton=((1e-9, 1e12, 1),)), efficiency=1.0)
    assert e["estimated_triton_s"] == pytest.approx(1e12 / H100.bf16_flops)


def test_mma_efficiency_comes_from_the_layers():
    """The FLOP-weighted mean of the layers' best issued-MMA efficiencies (nominal / issued FLOPs: above 1
    where the border classes issue fewer MMA FLOPs than the nominal conv), between the worst and best."""
    from deepsim.kernels._conv_configs import GPU_CONFIGS, eligible_configs, issued_mma_efficiency

    eff = time_model.mma_efficiency("autoencoder", 64)
    bests = [
        max(issued_mma_efficiency(x.geom, c) for c in eligible_configs(x.geom, 2, GPU_CONFIGS))
        for x in time_model.network_layers(64)
        if x.network in time_model.NETWORKS["autoencoder"]
    ]
    assert len(bests) > 4 and min(bests) < max(bests)
    assert 0.5 < min(bests) < eff < max(bests) < 2.0
    assert eff != pytest.approx(sum(bests) / len(bests))  # weighted by FLOPs, not a plain mean


def test_failed_rows_are_left_out_and_the_table_says_estimate():
    rows = [_row(), dict(workload="invert-fc6", kernels="auto", status="failed: x")]
    estimates = time_model.estimate_rows(rows)
    assert len(estimates) == 1
    assert time_model.format_table(estimates).startswith("ESTIMATE")


def test_step_row_gets_measured_against_estimated(tmp_path, monkeypatch):
    import bench.step as step

    path = tmp_path / "estimates.json"
    path.write_text(
        json.dumps([dict(workload="autoencoder", kernels="auto", batch=64, estimated_step_s=0.002)])
    )
    monkeypatch.setattr(step, "ESTIMATES", path)
    workload = types.SimpleNamespace(config=types.SimpleNamespace(task="autoencoder", batch_size=64))
    row = step._with_estimate(workload, dict(value=16_000.0))
    assert row["measured_step_s"] == pytest.approx(0.004) and row["measured_over_estimate"] == pytest.approx(
        2.0
    )
    other = types.SimpleNamespace(config=types.SimpleNamespace(task="autoencoder", batch_size=2))
    assert "estimated_step_s" not in step._with_estimate(other, dict(value=1.0))
