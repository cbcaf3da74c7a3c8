"""bench/kernels.py on the CPU: the real layer table, the saved-bytes rows with their in-place baseline,
and the order and content of the CUDA timing rows (driven here with a fake timer on tiny shapes)."""

import pytest
import torch

import bench.kernels as bk
from bench.kernels import K


def test_layer_table_comes_from_the_four_networks():
    names = [entry[0] for entry in bk.LAYERS]
    assert len(names) == len(set(names)) == 26
    for prefix, count in (("G ", 8), ("D64 ", 5), ("D227 ", 5), ("fc6-G ", 8)):
        assert sum(n.startswith(prefix) for n in names) == count, prefix
    assert ("D227 3->32 k7s4 227", 3, 32, 227, 7, 4, 0, False) in bk.LAYERS  # disc_padding "code": unpadded
    assert ("fc6-G up 64->32 k4s2 64", 64, 32, 64, 4, 2, 1, True) in bk.LAYERS
    assert len(bk.CONV_LAYERS) + len(bk.UPCONV_LAYERS) == 26


def test_saved_bytes_rows_on_cpu_with_the_inplace_baseline():
    rows = bk.run("cpu", quick=True)
    assert len(rows) == 4 * 26 and all(r["name"].startswith("saved_bytes/") for r in rows)
    by_layer = {}
    for r in rows:
        by_layer.setdefault(r["name"], {})[r["variant"]] = r
    for name, variants in by_layer.items():
        eager = variants["eager"]["value"]
        for v in ("eager inplace", "fused", "cudnn+epilogue"):
            assert variants[v]["value"] * 2 == eager, (name, v)  # exactly half: the output, not pre + output
            assert variants[v]["ratio_vs_baseline"] == 0.5
    assert "in-place" in by_layer[rows[0]["name"]]["eager inplace"]["note"]


@pytest.mark.skipif(not bk.K.HAS_TRITON, reason="needs triton")
def test_timing_rows_order_and_notes(monkeypatch, tmp_path):
    """The CUDA rows' logic with a fake timer on CPU tensors: per layer eager, triton, cudnn+epilogue,
    dispatched (with its choice and the ratio to the better baseline), torch.compile; then one row per
    dispatcher decision; feature_distance's bandwidth as a fraction of the measured copy."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1")
    ms = {"reference": 4.0, "triton": 1.0, "cudnn": 2.0, "auto": 1.0}

    def fake_time(fn, warmup, iters):
        fn()  # really runs the variant once (interpreter, tiny shape)
        return ms[K.requested_backend()]

    monkeypatch.setattr(bk, "time_cuda", fake_time)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # inductor is not what is tested here
    monkeypatch.setattr(
        bk,
        "LAYERS",
        [("tiny 3->4 k3s2 8", 3, 4, 8, 3, 2, 1, False), ("tiny up 4->2 k4s2 4", 4, 2, 4, 4, 2, 1, True)],
    )
    monkeypatch.setattr(K.dispatch, "DISPATCH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(K.dispatch, "_timer", lambda step: {"triton": 1.0, "cudnn": 3.0}[step.path])
    monkeypatch.setattr(K.dispatch, "_backward_timer", lambda step: {"triton": 1.0, "cudnn": 3.0}[step.path])
    # the interpreter computes no real bf16 (the first-call check against cuDNN would exclude every Triton
    # candidate, as it should): the check passes here, the rows' order and notes are what is tested
    monkeypatch.setattr(K.dispatch, "_relative_error", lambda got, want: 0.0)
    monkeypatch.setenv(K.dispatch.CACHE_ENV, str(tmp_path / "dispatch.json"))
    K.dispatch.reset()
    try:
        rows = bk.bench_conv_timing("cpu", batch=2, quick=True) + bk.dispatch_rows()
    finally:
        K.dispatch.reset()
    variants = [r["variant"] for r in rows]
    assert variants[:5] == ["eager", "triton", "cudnn+epilogue", "dispatched", "torch.compile"]
    assert (
        variants[5:10] == variants[:5] and variants[10:] == ["chose triton"] * 6
    )  # forward, dgrad, wgrad of each layer
    assert rows[0]["name"] == "conv_lrelu/tiny 3->4 k3s2 8/b2/bfloat16/fwd+bwd"
    dispatched = rows[3]
    assert dispatched["note"] == "chose triton; 4x the better of eager and torch.compile"
    assert dispatched["ratio_vs_baseline"] == 0.25
    assert (
        rows[10]["name"].startswith("dispatch/forward/conv_lrelu|")
        and "triton 1 ms, cudnn 3 ms" in rows[10]["note"]
    )
    monkeypatch.setattr(bk, "FEATURE_TAPS", [(2, 3, 4, 4), (2, 5)])
    monkeypatch.setattr(bk, "measure_copy_bandwidth", lambda device, quick: 1e9)
    fd = bk.bench_feature_distance("cpu", quick=True, dtype=torch.float32)
    moved = 5 * 4 * (2 * 3 * 4 * 4 + 2 * 5)
    (triton_bw,) = [r for r in fd if r["name"].endswith("/bandwidth") and r["variant"] == "triton"]
    assert triton_bw["ratio_vs_baseline"] == pytest.approx(moved / 1e-3 / 1e9)
