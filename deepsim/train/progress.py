"""The training progress bar: steps done, images/s and the ETA, with the latest losses after them.

    42%|████▏     | 252/600 steps [01:41, 80 img/s, ETA 02:19, feat=3.1e+03 adv=0.69 img=1.2e+03 D=1.39]

images/s = tqdm's smoothed step rate x images per step (batch x ranks); ETA = remaining steps / that rate.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["TrainingProgress", "BAR_FORMAT"]

BAR_FORMAT = (
    "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}, {images_per_s} img/s, ETA "
    "{remaining}{postfix}]"
)


class TrainingProgress(tqdm):
    """A tqdm bar over training steps whose line shows images/s and the ETA.

    Args:
        total: the last step of the run; initial: the step it starts from (a resumed run).
        images_per_step: images one step consumes over all ranks (batch size x world size).
        kwargs: passed on to tqdm (``file``, ``mininterval``, ``disable``...).
    """

    def __init__(self, total: int, initial: int = 0, *, images_per_step: int, **kwargs):
        self.images_per_step = images_per_step
        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("dynamic_ncols", True)
        super().__init__(total=total, initial=initial, unit="step", bar_format=BAR_FORMAT, **kwargs)

    @property
    def format_dict(self):
        values = super().format_dict
        rate = values.get("rate")
        done, elapsed = values["n"] - values.get("initial", 0), values.get("elapsed") or 0
        if rate is None and done > 0 and elapsed > 0:  # tqdm's own fallback before its smoothed rate exists
            rate = done / elapsed
        values["images_per_s"] = f"{rate * self.images_per_step:,.0f}" if rate else "?"
        return values
