"""An ESTIMATE of the compiled step's time on an H100, from what bench.cuda_compile counted (never a
measurement; it runs on any machine).

    python -m bench.time_model ROWS.json     # rows written by python -m bench.cuda_compile --json

Per step, each kernel at its roofline, summed, plus a fixed cost per launch inside a CUDA graph:

* inductor's Triton kernels: max(FLOPs / bf16 peak, bytes / HBM bandwidth), from inductor's own estimates
  of each kernel's bytes and FLOPs (``kernel_num_gb``, ``kernel_flop``), times its launches per step;
* the convolutions and matmuls (cuDNN or our Triton conv, custom ops and extern calls): the step's matmul and
  conv FLOPs (forward and backward, counted by bench.cuda_compile) at the bf16 peak times the issued-MMA
  efficiency of the networks' layers (bench.static's per-layer figure: useful / issued FLOPs of the best
  eligible tile config, FLOP-weighted). Their memory traffic is not modelled (a lower bound there);
* ``LAUNCH_S`` per launch (every kernel of ``launches_per_step``).

Beside each estimate: the targets (>= 40,000 images/s for the autoencoder at batch 64). gpu.sh's step
phase records measured against estimated time per step when a GPU is lent, so the model can be corrected.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from deepsim.kernels._conv_configs import GPU_CONFIGS, eligible_configs, issued_mma_efficiency

from bench.static import network_layers

__all__ = ["H100", "Device", "estimate", "estimate_rows", "TARGET_IMAGES_PER_S"]

TARGET_IMAGES_PER_S = {"autoencoder": 40_000.0}
# The networks (bench.static labels) whose conv layers each workload's step runs.
NETWORKS = {
    "autoencoder": ("G autoencoder 64px", "D 64px unpadded"),
    "invert-fc6": ("G fc6 227px", "D 227px unpadded"),
}


@dataclass(frozen=True)
class Device:
    """The roofline's ceilings (datasheet figures, dense) and the cost of one launch in a CUDA graph."""

    name: str
    bf16_flops: float  # FLOP/s
    hbm_bytes: float  # bytes/s
    launch_s: float  # seconds per kernel launched from a CUDA graph (the gap between dependent kernels)


H100 = Device("H100 SXM (datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3)", 989.4e12, 3.35e12, 2.0e-6)


def mma_efficiency(workload: str, batch: int) -> float:
    """FLOP-weighted issued-MMA efficiency of the workload's conv layers (best eligible config per layer)."""

    useful = issued = 0.0
    for layer in network_layers(batch):
        if layer.network not in NETWORKS[workload]:
            continue
        g = layer.geom
        best = max(
            issued_mma_efficiency(g, c) for c in eligible_configs(g, torch.bfloat16.itemsize, GPU_CONFIGS)
        )
        useful += g.useful_flops()
        issued += g.useful_flops() / best
    return useful / issued if issued else 1.0


def estimate(row: dict, device: Device = H100, efficiency: float | None = None) -> dict:
    """The estimate for one bench.cuda_compile row: seconds per step and its parts, images/s."""
    if efficiency is None:
        efficiency = mma_efficiency(row["workload"], row["batch"])
    triton_s = 0.0
    for k in row["kernel_list"]:
        if k["kind"] == "triton":
            flop_s = (k.get("flop") or 0) / device.bf16_flops
            mem_s = (k.get("gb") or 0) * 1e9 / device.hbm_bytes
            triton_s += k["launches"] * max(flop_s, mem_s)
    mma_s = (row.get("flops_per_step") or 0) / (device.bf16_flops * efficiency)
    launch_s = row["launches_per_step"] * device.launch_s
    step_s = triton_s + mma_s + launch_s
    target = TARGET_IMAGES_PER_S.get(row["workload"])
    return dict(
        workload=row["workload"],
        kernels=row["kernels"],
        batch=row["batch"],
        device=device.name,
        launches_per_step=row["launches_per_step"],
        mma_efficiency=efficiency,
        estimated_step_s=step_s,
        estimated_triton_s=triton_s,
        estimated_mma_s=mma_s,
        estimated_launch_s=launch_s,
        estimated_images_per_s=row["batch"] / step_s,
        target_images_per_s=target,
        note="estimate (roofline + per-launch cost), not a measurement",
    )


def estimate_rows(rows: list[dict], device: Device = H100) -> list[dict]:
    """Estimates for the rows that compiled (others are left out)."""
    return [estimate(r, device) for r in rows if r.get("status") == "ok" and r.get("kernel_list")]


def format_table(estimates: list[dict]) -> str:
    lines = [
        "ESTIMATE on an H100 (roofline per kernel + 2 us per launch), not a measurement",
        f"{'workload':<12} {'kernels':<8} {'launches':>8} {'MMA eff':>7} {'triton':>8} {'MMA':>8} "
        f"{'launch':>8} {'step':>8} {'img/s':>9} {'target':>8}",
    ]
    for e in estimates:
        target = "-" if e["target_images_per_s"] is None else f"{e['target_images_per_s']:.0f}"
        lines.append(
            f"{e['workload']:<12} {e['kernels']:<8} {e['launches_per_step']:>8} {e['mma_efficiency']:>7.2f} "
            f"{e['estimated_triton_s'] * 1e6:>6.0f}us {e['estimated_mma_s'] * 1e6:>6.0f}us "
            f"{e['estimated_launch_s'] * 1e6:>6.0f}us {e['estimated_step_s'] * 1e6:>6.0f}us "
            f"{e['estimated_images_per_s']:>9.0f} {target:>8}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.time_model", description=__doc__.splitlines()[0])
    p.add_argument("rows", help="a JSON file of bench.cuda_compile rows (--json)")
    p.add_argument("--json", metavar="FILE", help="write the estimates to FILE")
    args = p.parse_args(argv)
    try:
        rows = json.loads(Path(args.rows).read_text())
    except (OSError, ValueError) as e:
        p.error(f"{args.rows}: not a readable JSON list of bench.cuda_compile rows ({e})")
    if not isinstance(rows, list):
        p.error(f"{args.rows}: expected a JSON list of bench.cuda_compile rows")
    estimates = estimate_rows(rows)
    print(format_table(estimates))
    if args.json:
        Path(args.json).write_text(json.dumps(estimates, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
