"""The CUDA-only logic of the step and loader groups, on the CPU: faked workloads and counters, tiny JPEGs."""

import types

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
from PIL import Image
from torch._dynamo.utils import counters

from bench import loader, step
from bench.timelimit import time_limit


class FakeWorkload:
    """Stands in for bench.step.Workload: ``measure`` sees the inductor setting it runs under, and a
    "falling back" workload bumps inductor's skip counter (and raises under cudagraph_or_error) as inductor
    does when it cannot capture a graph."""

    name = "fake workload"

    def __init__(self, falls_back: bool, device: str = "cuda"):
        self.falls_back, self.or_error_seen = falls_back, []
        self.device = torch.device(device)
        self.config = types.SimpleNamespace(task="autoencoder", batch_size=64)

    def row(self, variant, **values):
        return {"group": "step", "name": self.name, "variant": variant, "baseline": "eager", **values}

    def measure(self, variant):
        or_error = inductor_config.triton.cudagraph_or_error
        self.or_error_seen.append(or_error)
        if self.falls_back:
            counters["inductor"]["cudagraph_skips"] += 1
            if or_error:
                raise RuntimeError("skipping cudagraphs due to mutated inputs (1 instances)")
        return self.row(variant.name, value=100.0, unit="img/s")


CUDAGRAPHS = step.Variant("compiled-step-cudagraphs", "auto", lambda t: t.step)


def test_cudagraphs_that_are_captured_pass_the_check():
    rows, workload = [], FakeWorkload(falls_back=False)
    step._measure_cudagraphs(workload, CUDAGRAPHS, rows)
    assert workload.or_error_seen == [True]  # compiled once, with the fallback made an error
    check, timing = rows
    assert check["variant"] == "cudagraphs OR_ERROR check" and check["value"] == 0 and "status" not in check
    assert timing["variant"] == "compiled-step-cudagraphs" and timing["cudagraph_skips"] == 0


def test_a_silent_cudagraph_fallback_fails_the_check_and_is_still_timed():
    rows, workload = [], FakeWorkload(falls_back=True)
    step._measure_cudagraphs(workload, CUDAGRAPHS, rows)
    assert workload.or_error_seen == [True, False]  # the check, then the variant as inductor falls back
    check, timing = rows
    assert check["status"].startswith("failed: RuntimeError: skipping cudagraphs due to mutated inputs")
    assert timing["value"] == 100.0 and timing["cudagraph_skips"] == 2 and "fell back" in timing["note"]
    assert inductor_config.triton.cudagraph_or_error is False  # the setting did not leak


def test_max_autotune_runs_only_with_time_left():
    rows, workload = [], FakeWorkload(falls_back=False)
    with time_limit(30, "group step"):  # 30 s left, max-autotune on CUDA needs about 180
        step._max_autotune(workload, rows)
    assert rows[0]["status"].startswith("skipped: needs about 180 s") and workload.or_error_seen == []
    rows = [workload.row("compiled-step-cudagraphs", value=300.0, unit="img/s")]
    step._max_autotune(workload, rows)  # no limit: it runs, and the compiled steps get their ratio to it
    assert rows[1]["variant"] == "compile-modules-max-autotune" and rows[1]["value"] == 100.0
    assert rows[0]["ratio_vs_compile_modules_max_autotune"] == pytest.approx(3.0)


def _jpeg_bytes(tmp_path, n=3, size=(40, 30)):
    loader.write_jpegs(str(tmp_path), n, size)
    return [
        torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in sorted(tmp_path.iterdir())
    ]


def test_decode_on_device_crops_mirrors_and_scales(tmp_path):
    """The GPU-decode baseline's batch, on the CPU: (B, 3, crop, crop) float in [-1, 1], each image a crop
    of the decoded JPEG (as PIL decodes it), mirrored or not."""
    files = _jpeg_bytes(tmp_path)
    gen = torch.Generator().manual_seed(0)
    batch = loader.decode_on_device(files, torch.device("cpu"), 16, gen)
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == torch.float32
    assert -1 <= batch.min() and batch.max() <= 1
    for image, path in zip(batch, sorted(tmp_path.iterdir())):
        decoded = (
            torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
        )
        windows = decoded.unfold(1, 16, 1).unfold(2, 16, 1)  # (3, H-15, W-15, 16, 16): every crop
        found = False
        for candidate in (image, image.flip(-1)):
            diff = (windows - candidate[:, None, None]).abs().amax(dim=(0, 3, 4))
            found |= bool(diff.min() <= 2 / 127.5)  # libjpeg vs torchvision's decoder: rounding apart
        assert found
