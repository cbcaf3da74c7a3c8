"""The wgrad rows of the static report (bench/static.py, compiled for sm_90 without a GPU) on every network
layer: every config the tuner may pick has wgmma, cp.async, 0 spills, <= 240 registers, efficiency >= 0.85
and a split grid of >= 2 waves of its resident CTAs; the layers with no such config are reported as cuDNN.
"""

import pytest

from bench import static


@pytest.fixture(scope="module")
def wgrad_rows():
    return static.static_report(batch=64, dtype="bf16", kernels=("wgrad",))


@pytest.mark.slow
def test_every_wgrad_config_meets_the_bars(wgrad_rows):
    assert len(wgrad_rows) >= 30
    for row in wgrad_rows:
        for c in row["configs"]:
            what = f"{row['network']} {row['layer']} {c['config']}"
            assert c["wgmma"] > 0, f"{what}: no wgmma"
            assert c["cp_async"] > 0 and c["spill_bytes"] == 0, what
            assert c["registers"] <= 240, f"{what}: {c['registers']} registers"
            assert c["efficiency"] >= 0.85, f"{what}: efficiency {c['efficiency']:.3f}"
            assert c["waves"] >= 2, f"{what}: {c['waves']:.2f} waves of {c['ctas_per_sm']} CTAs/SM"


@pytest.mark.slow
def test_only_the_3_channel_first_layers_go_to_cudnn(wgrad_rows):
    on_cudnn = [r for r in wgrad_rows if not r["configs"]]
    assert {r["shape"].split(" k")[0] for r in on_cudnn} == {"conv 3->32"}
    assert len(on_cudnn) == 5 and all(r["backend"] == static.CUDNN_ROW for r in on_cudnn)
    table = static.format_table(wgrad_rows)
    assert table.count(static.CUDNN_ROW) == 5 and " NO " not in table
