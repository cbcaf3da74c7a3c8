"""The run log of a training run: metrics.jsonl, TensorBoard, the progress bar, sample grids, the NaN check.

Metrics reach the host one step late (:class:`PendingMetrics`): the device never waits on a log step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from deepsim.config import TrainConfig
from deepsim.train import distributed
from deepsim.train.progress import TrainingProgress
from deepsim.train.tensorboard import TensorBoardWriter

__all__ = ["RunLog", "PendingMetrics", "NonFiniteLossError", "save_grid"]

STOP_METRIC = "Run/stop"  # carried through the metrics all-reduce, never logged


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stopped and no checkpoint was written after it."""


class PendingMetrics:
    """Metrics of one step on their way to the host: a non-blocking copy into pinned memory, started at the
    log step and read one step later (after the next step was queued), so the device never idles on it.

    With ``world > 1`` the values are averaged over the ranks (every rank logs and checks the same numbers),
    and ``stop`` (this rank's 0/1 stop request) rides along under :data:`STOP_METRIC`.
    """

    def __init__(
        self, step: int, metrics: dict[str, torch.Tensor], world: int, stop: torch.Tensor | None = None
    ):
        self.step, self.names = step, list(metrics)
        values = torch.stack(
            [metrics[n].float() for n in self.names]
        )  # a new tensor: safe from CUDA-graph reuse
        if world > 1:  # every rank logs (and checks) the same averages, so all stop together on a NaN
            if stop is not None:  # this rank's stop request (0/1) rides along: > 0 after the mean = some rank
                values, self.names = torch.cat([values, stop.reshape(1)]), self.names + [STOP_METRIC]
            values = distributed.all_reduce_mean(values)
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = values.clone(), None

    def read(self) -> dict[str, float]:
        if self.ready is not None:
            self.ready.synchronize()  # the only host wait, every log_every steps, one step behind the device
        return dict(zip(self.names, self.host.tolist()))


def save_grid(trainer, sample_batch: torch.Tensor, path: Path) -> torch.Tensor:
    """Inputs (top rows) beside reconstructions (bottom rows), as one PNG; returns the grid (3, H, W) in
    [0, 1]."""
    was_training = trainer.training
    trainer.eval()
    with torch.no_grad():
        g_input, target, _ = trainer.prepare(sample_batch)
        fake, _ = trainer.generate(g_input)
    trainer.train(was_training)
    pictures = torch.cat([target, fake.float()]).clamp(-1, 1).add(1).div(2).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(pictures, nrow=len(target), padding=2)
    save_image(grid, path)
    return grid


class RunLog:
    """Where a run's numbers and pictures go. Every rank checks the losses; rank 0 writes the files.

    Args:
        out: the run folder (``metrics.jsonl``, ``samples/``, TensorBoard events).
        config: the run's config (``steps``, ``batch_size``, ``tensorboard``).
        start: the step the run starts after (0: fresh).
        world, is_main: the number of ranks and whether this is rank 0.
        progress: show the progress bar (rank 0).
        stream: the training data stream; its ``skipped`` (bad files so far) goes in every row.

    Use: :meth:`count_step` after each step, :meth:`queue` on a log step (the copy starts), :meth:`flush`
    one step later or at once (reads, checks for NaN/inf, writes a row), :meth:`close` at the end.
    """

    def __init__(
        self, out: Path, config: TrainConfig, *, start: int, world: int, is_main: bool, progress: bool, stream
    ):
        self.out, self.is_main, self.world, self.stream = out, is_main, world, stream
        self.images_per_step = config.batch_size * world
        self.history: list[dict] = []  # the rows written to metrics.jsonl
        self.stop_agreed = False  # world > 1: some rank asked to stop, as the last all-reduced metrics said
        self.pending: PendingMetrics | None = None
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.board = (
            TensorBoardWriter(out, config, start_step=start) if is_main and config.tensorboard else None
        )
        self.file = (out / "metrics.jsonl").open("a") if is_main else None
        self.bar = (
            TrainingProgress(config.steps, start, images_per_step=self.images_per_step)
            if progress and is_main
            else None
        )

    def count_step(self) -> None:
        """One more step in the images/s window."""
        self.window_steps += 1

    def advance_bar(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def queue(self, step: int, metrics: dict[str, torch.Tensor], stop: torch.Tensor | None = None) -> None:
        """Start the copy of ``step``'s metrics to the host (read by the next :meth:`flush`)."""
        self.pending = PendingMetrics(step, metrics, self.world, stop)

    def flush(self, *, last_good: Path | None) -> None:
        """Read the queued metrics (if any) and write their row.

        Args:
            last_good: the newest checkpoint, named when a loss is not finite.

        Raises:
            NonFiniteLossError: a metric is NaN or infinite (nothing is written for that step).
        """
        entry, self.pending = self.pending, None
        if entry is None:
            return
        values = entry.read()
        self.stop_agreed = self.stop_agreed or values.pop(STOP_METRIC, 0.0) > 0
        row = {"step": entry.step, **values}
        bad = [n for n, v in values.items() if not math.isfinite(v)]
        if bad:
            where = (
                f"the last good checkpoint {last_good} is untouched"
                if last_good
                else "no checkpoint was written"
            )
            raise NonFiniteLossError(
                f"non-finite loss at step {entry.step} ({', '.join(f'{n} = {row[n]}' for n in bad)}); "
                f"training stopped, {where}. Lower the learning rate or the loss weights, or check the data."
            )
        elapsed = time.perf_counter() - self.window_start
        row["images_per_s"] = self.window_steps * self.images_per_step / max(elapsed, 1e-9)
        row["Data/skipped"] = self.stream.skipped  # bad files skipped so far (on_bad="skip"), on this rank
        self.window_start, self.window_steps = time.perf_counter(), 0
        self._write(row, entry.names)

    def _write(self, row: dict, names: list[str]) -> None:
        self.history.append(row)
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.board is not None:
            self.board.log_metrics(row)
        if self.bar is not None:
            self.bar.set_postfix_str(
                " ".join(f"{n.split('/')[-1]}={row[n]:.3g}" for n in names if n.startswith("Loss/G"))
                + f" D={row.get('Loss/D/real', 0) + row.get('Loss/D/fake', 0):.3g}"
            )

    def samples(self, trainer, batch: torch.Tensor, step: int) -> None:
        """The sample grid of ``step`` (rank 0): ``samples/step_NNNNNNN.png`` and TensorBoard's
        ``samples``."""
        if not self.is_main:
            return
        grid = save_grid(trainer, batch, self.out / "samples" / f"step_{step:07d}.png")
        if self.board is not None:
            self.board.log_samples(grid, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file:
            self.file.close()
        if self.board is not None:
            self.board.close()
