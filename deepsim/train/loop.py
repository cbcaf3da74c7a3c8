"""The training loop: data -> step -> metrics (JSON lines), progress bar, sample grids, checkpoints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from deepsim.config import TrainConfig
from deepsim.train.auto import describe_runtime, resolve_runtime
from deepsim.train.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from deepsim.train.factory import build_trainer

__all__ = ["train", "TrainResult", "NonFiniteLossError", "RUNTIME_FIELDS"]

# Fields a resumed run takes from the command line; all others come from the checkpoint's config.
RUNTIME_FIELDS = {
    "steps", "out", "device", "log_every", "sample_every", "checkpoint_every", "num_workers", "compile", "loader", "on_bad",
    "channels_last", "tensorboard",
}


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stopped and no checkpoint was written after it."""


@dataclass
class TrainResult:
    step: int  # the last completed step
    out: Path
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)  # the metrics rows written to metrics.jsonl


def _task_mode(config: TrainConfig) -> str:
    # ImageNet preprocessing (code) for the inversion and for 227x227 crops (vae-imagenet): shorter side to 256.
    return "resize-crop" if config.task == "invert" or config.image_size == 227 else "crop"


def _save_grid(trainer, sample_batch: torch.Tensor, path: Path) -> torch.Tensor:
    """Inputs (top rows) beside reconstructions (bottom rows), as one PNG; returns the grid (3, H, W) in [0, 1]."""
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


def train(
    config: TrainConfig,
    *,
    resume: bool | str | Path = False,
    progress: bool = True,
    announce: Callable[[TrainConfig, str], None] | None = None,
) -> TrainResult:
    """Train as ``config`` says; ``resume`` = True (the checkpoint in config.out) or a checkpoint path.

    ``"auto"`` runtime fields are resolved for the device first (:func:`deepsim.train.auto.resolve_runtime`);
    ``announce(config, line)`` (rank 0) then gets the resolved config and one line naming the path and why.

    Raises NonFiniteLossError when a loss becomes NaN/inf (the last good checkpoint stays as it was).
    """
    from deepsim.data import build_loader  # imported here: the data layer is heavy (PIL, DALI)

    payload = None
    if resume:
        payload = load_checkpoint(Path(config.out) / CHECKPOINT_NAME if resume is True else resume)
        saved = TrainConfig.from_dict(payload["config"])
        config = saved.replace(**{k: getattr(config, k) for k in RUNTIME_FIELDS})
    out = Path(config.out)
    from deepsim.train import distributed

    context = distributed.init_from_env(config.device)  # torchrun's variables, if any; else rank 0 of 1
    try:
        config, reasons = resolve_runtime(config, context.device)
        if announce is not None and context.rank == 0:
            announce(config, describe_runtime(config, context.device, reasons))
        return _train(config, payload, out, context, progress, build_loader)
    finally:
        distributed.cleanup(context)


class _PendingMetrics:
    """Metrics of one step on their way to the host: a non-blocking copy into pinned memory, started at the
    log step and read one step later (after the next step was queued), so the device never idles on it."""

    def __init__(self, step: int, metrics: dict[str, torch.Tensor], world: int):
        self.step, self.names = step, list(metrics)
        values = torch.stack([metrics[n].float() for n in self.names])  # a new tensor: safe from CUDA-graph reuse
        if world > 1:  # every rank logs (and checks) the same averages, so all stop together on a NaN
            from deepsim.train.distributed import all_reduce_mean

            values = all_reduce_mean(values)
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


def _train(config: TrainConfig, payload, out: Path, context, progress: bool, build_loader) -> TrainResult:
    from deepsim.train import distributed

    rank, world, device = context.rank, context.world, context.device
    if config.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(config.seed)
    trainer = build_trainer(config, device)
    start = 0
    if payload is not None:
        trainer.load_training_state(payload["trainer"])
        start = int(payload["step"])
        set_rng_state(payload["rng"])
    if world > 1:
        distributed.wrap_ddp(trainer, device, ddp=config.compile == "off")
        # Dropout masks differ per rank; the initial weights above were drawn before, identically.
        torch.manual_seed(config.seed + 1_000_003 * rank + start)
    channels_last = getattr(config, "channels_last", False)
    if channels_last:
        trainer.to_channels_last()
    step_fn = trainer.step
    if config.compile != "off":
        from deepsim.train.compiled import compile_step

        step_fn = compile_step(trainer, config.compile)

    stream = build_loader(
        config.data, batch_size=config.batch_size, crop_size=config.image_size, mode=_task_mode(config),
        loader=config.loader, device=device, seed=config.seed, start_step=start, shard_id=rank, num_shards=world,
        num_workers=config.num_workers, channels_last=channels_last, on_bad=config.on_bad,
    )
    sample_stream = build_loader(
        config.data, batch_size=8, crop_size=config.image_size, mode=_task_mode(config), loader="torch",
        device=device, seed=config.seed + 7919, on_bad=config.on_bad,
    )
    sample_batch = next(sample_stream)
    sample_stream.close()

    is_main = rank == 0
    checkpoint_path = out / CHECKPOINT_NAME
    last_good = checkpoint_path if checkpoint_path.is_file() else None
    history: list[dict] = []
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    board = None
    if is_main and config.tensorboard:
        from deepsim.train.tensorboard import TensorBoardWriter

        board = TensorBoardWriter(out, config, start_step=start)
    if is_main and start == 0:
        grid = _save_grid(trainer, sample_batch, out / "samples" / f"step_{0:07d}.png")
        if board is not None:
            board.log_samples(grid, 0)
    metrics_file = (out / "metrics.jsonl").open("a") if is_main else None
    bar = None
    if progress and is_main:
        from deepsim.train.progress import TrainingProgress

        bar = TrainingProgress(config.steps, start, images_per_step=config.batch_size * world)

    trainer.train()
    window_start, window_steps, step = time.perf_counter(), 0, start
    pending: _PendingMetrics | None = None

    def log(entry: _PendingMetrics) -> None:
        nonlocal window_start, window_steps
        values = entry.read()
        row = {"step": entry.step, **values}
        bad = [n for n, v in values.items() if not math.isfinite(v)]
        if bad:
            where = f"the last good checkpoint {last_good} is untouched" if last_good else "no checkpoint was written"
            raise NonFiniteLossError(
                f"non-finite loss at step {entry.step} ({', '.join(f'{n} = {row[n]}' for n in bad)}); training stopped, "
                f"{where}. Lower the learning rate or the loss weights, or check the data."
            )
        elapsed = time.perf_counter() - window_start
        row["images_per_s"] = window_steps * config.batch_size * world / max(elapsed, 1e-9)
        row["Data/skipped"] = stream.skipped  # bad files skipped so far (on_bad="skip"), on this rank
        window_start, window_steps = time.perf_counter(), 0
        history.append(row)
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        if board is not None:
            board.log_metrics(row)
        if bar is not None:
            names = entry.names
            bar.set_postfix_str(
                " ".join(f"{n.split('/')[-1]}={row[n]:.3g}" for n in names if n.startswith("Loss/G"))
                + f" D={row.get('Loss/D/real', 0) + row.get('Loss/D/fake', 0):.3g}"
            )

    try:
        for step in range(start + 1, config.steps + 1):
            metrics = step_fn(next(stream))
            window_steps += 1
            if pending is not None:  # the previous log step's copy, read after this step was queued
                log(pending)
                pending = None
            last = step == config.steps
            ckpt_due = step % config.checkpoint_every == 0 or last
            if step % config.log_every == 0 or ckpt_due:
                pending = _PendingMetrics(step, metrics, world)
                if ckpt_due:  # a checkpoint is only written after its step's losses were checked
                    log(pending)
                    pending = None
            if bar is not None:
                bar.update(1)
            if is_main and (step % config.sample_every == 0 or last):
                grid = _save_grid(trainer, sample_batch, out / "samples" / f"step_{step:07d}.png")
                if board is not None:
                    board.log_samples(grid, step)
            if is_main and ckpt_due:
                payload = {
                    "step": step,
                    "config": config.to_dict(),
                    "trainer": trainer.training_state(),
                    "rng": rng_state(),
                }
                last_good = save_checkpoint(checkpoint_path, payload)
        if pending is not None:
            log(pending)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()
        if board is not None:
            board.close()
        stream.close()
    return TrainResult(step=step, out=out, checkpoint=last_good, history=history)
