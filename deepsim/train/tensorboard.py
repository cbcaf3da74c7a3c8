"""TensorBoard event files for a training run, written beside metrics.jsonl (``tensorboard --logdir runs``).

What a run writes (rank 0 only; ``--no-tensorboard`` writes nothing):

* scalars every ``log_every`` steps: every loss term under its metrics.jsonl key (``Loss/G/feat``,
  ``Loss/D/real``, ...), the pause rule (``Pause/r``, ``Pause/train_d``, ``Pause/train_g``), throughput
  (``Speed/images_per_s``), bad files skipped (``Data/skipped``) and each optimizer's learning rate
  (``LR/G``, ``LR/D``);
* the sample grids (inputs above reconstructions) as the image ``samples``;
* the config: as hparams (the HParams tab, one session per run folder) and as JSON text (``config``).

Needs the ``tensorboard`` package (``pip install 'deepsim[tensorboard]'``): ``torch.utils.tensorboard``
imports it. A resumed run purges the events past its checkpoint step, so curves do not double back.
"""

from __future__ import annotations

import json
import os

import torch

from deepsim.config import TrainConfig

__all__ = ["TensorBoardWriter", "SCALAR_TAGS"]

# metrics.jsonl key -> TensorBoard tag, where they differ (other keys are used as they are; "step" is the x
# axis) The learning rates are the step's own device values (GatedAdam.current_lr: base lr x the multistep
# factor), read with the other metrics, so a milestone shows where it happened and no extra host sync is made.
SCALAR_TAGS = {"images_per_s": "Speed/images_per_s", "Opt/lr_g": "LR/G", "Opt/lr_d": "LR/D"}
# Metrics listed in the HParams tab beside the config values.
_HPARAM_METRICS = ("Loss/G/total", "Loss/G/feat", "Loss/G/adv", "Loss/G/img", "Loss/D/real", "Loss/D/fake")


def _hparam_value(value):
    """TensorBoard's hparams take int, float, str and bool; anything else (None, lists) as its text."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


class TensorBoardWriter:
    """One run's TensorBoard events, in ``log_dir`` (the run's output folder).

    Args:
        log_dir: folder of the event files (created if needed).
        config: the run's config, written as hparams and as JSON text.
        start_step: the step a resumed run starts from: events past it, left by the run that was
            interrupted after its last checkpoint, are purged (0: a fresh run).
    """

    def __init__(self, log_dir: str | os.PathLike, config: TrainConfig, *, start_step: int = 0):
        # lazy: an optional dependency (torch.utils.tensorboard needs the tensorboard package)
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # A resumed run logs from start_step + 1: events the interrupted
        # run wrote past its checkpoint are hidden.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)
        values = config.to_dict()
        experiment, session_start, _ = hparams(
            {k: _hparam_value(v) for k, v in values.items()}, dict.fromkeys(_HPARAM_METRICS, 0.0)
        )
        file_writer = self.writer._get_file_writer()
        file_writer.add_summary(experiment, start_step)
        file_writer.add_summary(session_start, start_step)
        self.writer.add_text("config", "```\n" + json.dumps(values, indent=2) + "\n```", start_step)

    def log_metrics(self, row: dict, learning_rates: dict[str, float] | None = None) -> None:
        """Every number of one metrics.jsonl row (its ``step`` is the x axis), plus the learning rates."""
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(SCALAR_TAGS.get(key, key), float(value), step)
        for tag, value in (learning_rates or {}).items():
            self.writer.add_scalar(tag, value, step)

    def log_samples(self, grid: torch.Tensor, step: int) -> None:
        """A sample grid (3, H, W), values in [0, 1]."""
        self.writer.add_image("samples", grid, step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
