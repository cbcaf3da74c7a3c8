"""The training loop: data -> step -> metrics (JSON lines), progress bar, sample grids, checkpoints.

Long runs (see README "Training at scale"): ``resume="auto"`` continues from the newest valid checkpoint in
``out`` or starts fresh, so one command line serves the first start and every restart (torchrun
``--max-restarts``, job arrays, requeued jobs); a stop signal finishes the step, writes a checkpoint and
returns with ``TrainResult.stopped_by`` set (:mod:`deepsim.train.preemption`); checkpoints carry a checksum
and the last ``keep_checkpoints`` are kept (:mod:`deepsim.train.checkpoint`); the data stream resumes at the
checkpoint's global sample cursor, at any world size (:mod:`deepsim.data.sampling`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from deepsim.config import TrainConfig
from deepsim.train.auto import (
    AUTO,
    RUNTIME_CHOICES,
    CompileFallback,
    describe_runtime,
    resolve_runtime,
    try_runtime,
)
from deepsim.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    fallback_message,
    find_checkpoints,
    load_checkpoint,
    load_latest,
    quarantine,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from deepsim.train.factory import build_trainer
from deepsim.train.preemption import StopSignals

__all__ = ["train", "TrainResult", "NonFiniteLossError", "RUNTIME_FIELDS", "RESUME_OVERRIDABLE"]

# Fields a resumed run takes from the command line; all others come from the checkpoint's config.
RUNTIME_FIELDS = {
    "steps", "out", "device", "log_every", "sample_every", "checkpoint_every", "num_workers", "compile", "loader", "on_bad",
    "max_image_pixels",
    "channels_last", "tensorboard", "keep_checkpoints", "stop_signals",
}
# Fields a resumed run takes from the command line only when they were given there (``resume_overrides``):
# the per-rank batch size, to keep the global batch when resuming on another number of GPUs.
RESUME_OVERRIDABLE = {"batch_size"}
_STOP_METRIC = "Run/stop"  # carried through the metrics all-reduce, never logged


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stopped and no checkpoint was written after it."""


@dataclass
class TrainResult:
    step: int  # the last completed step
    out: Path
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)  # the metrics rows written to metrics.jsonl
    stopped_by: str | None = None  # "SIGTERM" etc. when a stop signal ended the run early (checkpoint written)


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
    tasks=None,
    resume_overrides=(),
    announce: Callable[[TrainConfig, str], None] | None = None,
    provenance: dict | None = None,
) -> TrainResult:
    """Train as ``config`` says.

    Args:
        config: the run (a preset with fields replaced).
        resume: False: start fresh. ``"auto"``: from the newest valid checkpoint in ``config.out`` if there is
            one, else fresh (one command line for the first start and every restart). True: from the newest
            valid checkpoint in ``config.out`` (an error if there is none). A path: that checkpoint file, or
            the newest valid one in that folder. A corrupt newest checkpoint falls back to the previous one
            with a warning naming both (and is renamed ``*.corrupt``). The run's config is the checkpoint's,
            except :data:`RUNTIME_FIELDS` (and ``resume_overrides``), taken from ``config``.
        progress: show a progress bar (rank 0).
        tasks: the task table (task -> trainer builder), e.g. :data:`deepsim.tasks.TASKS`; None: the
            autoencoder only.
        resume_overrides: the fields ``config`` sets on purpose (the CLI passes the flags given on its command
            line): those in :data:`RESUME_OVERRIDABLE` replace the checkpoint's value; any other one that
            differs from the checkpoint's (not a :data:`RUNTIME_FIELDS` one) is an error naming both values.
        provenance: recorded in every checkpoint (``{"preset": ...}``; the code's commit is added); a resumed
            run keeps the checkpoint's preset.
        announce: called on rank 0 as ``announce(config, line)`` once the ``"auto"`` runtime fields are resolved
            for the device (:func:`deepsim.train.auto.resolve_runtime`), with the resolved config and one line
            naming the path taken and why.

    Returns:
        :class:`TrainResult`; ``stopped_by`` is set when a stop signal ended the run early (after a checkpoint).

    Raises:
        NonFiniteLossError: a loss became NaN/inf (the last good checkpoint stays as it was).
        CheckpointError: the checkpoint to resume from is missing, damaged or does not fit the run, a flag
            conflicts with it, ``config.out`` already holds another run (without ``resume``), or a checkpoint
            write failed (the previous checkpoint is intact; the message says so).
    """
    from deepsim.data import build_loader  # imported here: the data layer is heavy (PIL, DALI)
    from deepsim.train import distributed

    context = distributed.init_from_env(config.device)  # torchrun's variables, if any; else rank 0 of 1
    try:
        payload = None
        if resume:
            payload = _resume_payload(config, resume, context)
        else:
            _refuse_existing_run(Path(config.out), context)
        if payload is not None:
            saved = _resumable(payload, resume if not isinstance(resume, bool) else config.out)
            _check_conflicts(config, saved, resume_overrides, payload.get("_source", "the checkpoint"))
            _warn_preset(resume_overrides, provenance, payload, context)
            keep = RUNTIME_FIELDS | (RESUME_OVERRIDABLE & set(resume_overrides))
            config = saved.replace(**{k: getattr(config, k) for k in keep})
            _check_fits(config, payload, tasks)
            if context.is_main:
                _say_resuming(payload)
        _check_weight_files(config)
        auto_fields = {name for name in RUNTIME_CHOICES if getattr(config, name) == AUTO}
        config, reasons = resolve_runtime(config, context.device, world=context.world)
        config, reasons = try_runtime(config, context.device, reasons, auto_fields)
        if announce is not None and context.rank == 0:
            announce(config, describe_runtime(config, context.device, reasons))
        run_provenance = {**(provenance or {}), **((payload or {}).get("provenance") or {})}
        run_provenance["commit"] = source_commit()
        _RUN_PROVENANCE.clear()
        _RUN_PROVENANCE.update(run_provenance)
        # an auto-chosen compile that fails falls back to eager; not with world > 1 (the eager step's
        # gradients are averaged by DDP, which the compiled path does not wrap)
        fallback = "compile" in auto_fields and context.world == 1
        return _train(config, payload, Path(config.out), context, progress, build_loader, tasks, fallback)
    finally:
        distributed.cleanup(context)


_RUN_PROVENANCE: dict = {}  # what write_checkpoint records under "provenance" for the run in progress
_RUN_FILES = ("config.json", "metrics.jsonl")


def _refuse_existing_run(out: Path, context) -> None:
    """A fresh run never writes into a folder that holds a run: that run's checkpoints, metrics and config
    would be rotated, appended to and overwritten. Checked on rank 0, its answer broadcast."""
    from deepsim.train import distributed

    found = None
    if context.is_main and out.is_dir():
        held = [p.name for p in find_checkpoints(out)] + [n for n in _RUN_FILES if (out / n).exists()]
        found = ", ".join(held[:3]) if held else None
    found = distributed.broadcast_object(found)
    if found:
        raise CheckpointError(
            f"--out {out} already holds a run ({found}): continue it with --resume auto, or choose a fresh "
            "--out folder; nothing in it was changed"
        )


def _refuse_mixing(out: Path, chosen: Path) -> None:
    """Resuming a checkpoint of another folder into an ``out`` that holds a run of its own would rotate and
    append to that run's files; resuming an older checkpoint of ``out`` itself would rotate away the newer
    ones."""
    if not out.is_dir():
        return
    if chosen.resolve().parent == out.resolve():
        newest = next(iter(find_checkpoints(out)), None)
        if newest is not None and newest.resolve() != chosen.resolve():
            raise CheckpointError(
                f"--resume {chosen}: {out} holds a newer checkpoint, {newest.name}, which continuing there would "
                "rotate away; resume it into a fresh --out (or --resume auto to continue the newest); nothing in "
                "it was changed"
            )
        return
    held = [p.name for p in find_checkpoints(out)] + [n for n in _RUN_FILES if (out / n).exists()]
    if held:
        raise CheckpointError(
            f"--resume {chosen}: --out {out} holds another run ({', '.join(held[:3])}); resume into a fresh "
            "--out folder (or that run's own folder); nothing in it was changed"
        )


def _resumable(payload: dict, source) -> TrainConfig:
    """The saved config of a payload that holds what resuming needs (one line naming the file otherwise)."""
    source = payload.get("_source", source)
    missing = [k for k in ("trainer", "rng") if not isinstance(payload.get(k), dict)]
    if not missing:
        missing = [f"trainer.{k}" for k in ("generator", "opt_g") if k not in payload["trainer"]]
    if missing:
        raise CheckpointError(
            f"checkpoint {source} cannot be resumed: it has no {', '.join(repr(m) for m in missing)} (training "
            "state); an imported or exported generator trains no further (deepsim export --training-state keeps it)"
        )
    try:
        return TrainConfig.from_dict(payload["config"])
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {source}: its config cannot be read ({error})") from None


def _check_conflicts(config: TrainConfig, saved: TrainConfig, given, source) -> None:
    """A flag given on the command line that the resumed run would ignore is an error naming both values."""
    ignored = sorted(set(given) - RUNTIME_FIELDS - RESUME_OVERRIDABLE - {"preset"})
    clashes = [(n, getattr(config, n), getattr(saved, n)) for n in ignored if getattr(config, n) != getattr(saved, n)]
    if clashes:
        names = {"task": "task", "invert_layer": "--layer"}
        flags = "; ".join(
            f"{names.get(n, '--' + n.replace('_', '-'))} {mine} (the checkpoint's: {theirs})" for n, mine, theirs in clashes
        )
        raise CheckpointError(
            f"{flags}: resuming {source} continues its run as it was configured; drop the flag to continue it, "
            "or start a new run with a fresh --out"
        )


def _check_weight_files(config: TrainConfig) -> None:
    """The weights files the run names open safely (header only: cheap), so a bad one is one line before
    the run starts."""
    from deepsim.comparators import check_weights_file

    for flag, path in (
        ("--comparator-weights", config.comparator_weights),
        ("--invert-network-weights", config.invert_network_weights),
    ):
        if path:
            check_weights_file(path, flag)


def _warn_preset(given, provenance: dict | None, payload: dict, context) -> None:
    """``--preset`` on a resumed run: the checkpoint's config wins (the preset was only its starting point)."""
    mine = (provenance or {}).get("preset")
    theirs = (payload.get("provenance") or {}).get("preset")
    if "preset" in set(given) and context.is_main and mine and theirs and mine != theirs:
        _say(
            f"warning: --preset {mine}: resuming {payload.get('_source')} continues its own config (it started "
            f"from preset {theirs}); the preset is not applied"
        )


def _check_fits(config: TrainConfig, payload: dict, tasks) -> None:
    """The checkpoint's generator tensors against the generator its config builds (on the meta device: no
    memory, no compute), so a mismatch is one line before anything runs."""
    from deepsim.applications.factory import build_generator

    try:
        with torch.device("meta"):
            expected = build_generator(config).state_dict()
    except Exception:  # noqa: BLE001 - a task this cannot build: the full load below still checks
        return
    saved = payload["trainer"]["generator"]
    source = payload.get("_source", "the checkpoint")
    for name, tensor in expected.items():
        if name not in saved:
            raise CheckpointError(f"checkpoint {source} does not fit its {config.task!r} generator: no tensor {name}")
        got = getattr(saved[name], "shape", None)
        if got != tensor.shape:
            raise CheckpointError(
                f"checkpoint {source} does not fit its {config.task!r} generator: tensor {name} has shape "
                f"{tuple(got) if got is not None else type(saved[name]).__name__}, the config builds {tuple(tensor.shape)}"
            )


def source_commit() -> str | None:
    """The git commit of this code (None outside a checkout or without git)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _say(text: str) -> None:
    print(f"deepsim train: {text}", file=sys.stderr, flush=True)


def _resume_payload(config: TrainConfig, resume, context) -> dict | None:
    """The checkpoint payload to resume from (None: start fresh). Rank 0 picks the file and broadcasts its
    path, so every rank loads the same checkpoint even if another file appears meanwhile."""
    from deepsim.train import distributed

    explicit_file = not isinstance(resume, bool) and resume != "auto" and Path(resume).is_file()
    folder = Path(config.out) if isinstance(resume, bool) or resume == "auto" else Path(resume)
    payload, choice = None, ("fresh", None)
    if context.is_main:
        try:
            if explicit_file:
                payload = load_checkpoint(resume)
                choice = ("path", str(resume))
            else:
                if not isinstance(resume, bool) and resume != "auto" and not folder.exists():
                    raise CheckpointError(f"--resume {resume}: no such checkpoint file or folder")
                found = load_latest(folder) if folder.is_dir() else None
                if found is None:
                    if resume != "auto":
                        raise CheckpointError(
                            f"--resume: no checkpoint in {folder}; use --resume auto to start fresh when there is none"
                        )
                    _say(f"no checkpoint in {folder}: starting fresh (--resume auto)")
                else:
                    path, payload, skipped = found
                    if skipped:
                        _say("warning: " + fallback_message(path, payload, skipped))
                        for bad, _ in skipped:
                            _say(f"renamed the corrupt {bad.name} to {quarantine(bad).name}")
                    choice = ("path", str(path))
            if choice[0] == "path":
                _refuse_mixing(Path(config.out), Path(choice[1]))
        except CheckpointError as error:
            choice = ("error", str(error))
    choice = distributed.broadcast_object(choice)
    if choice[0] == "error":
        raise CheckpointError(choice[1])
    if choice[0] == "fresh":
        return None
    if payload is None:  # another rank: the file rank 0 chose
        payload = load_checkpoint(choice[1])
    payload["_source"] = choice[1]  # names the file in errors; never written back
    return payload


def _say_resuming(payload: dict) -> None:
    data = payload.get("data") or {}
    where = f", data cursor {data['cursor']} (epoch {data['epoch']}, sample {data['offset']})" if data else ""
    _say(f"resuming from {payload['_source']} (step {payload['step']}{where})")


class _PendingMetrics:
    """Metrics of one step on their way to the host: a non-blocking copy into pinned memory, started at the
    log step and read one step later (after the next step was queued), so the device never idles on it."""

    def __init__(self, step: int, metrics: dict[str, torch.Tensor], world: int, stop: torch.Tensor | None = None):
        self.step, self.names = step, list(metrics)
        values = torch.stack([metrics[n].float() for n in self.names])  # a new tensor: safe from CUDA-graph reuse
        if world > 1:  # every rank logs (and checks) the same averages, so all stop together on a NaN
            from deepsim.train.distributed import all_reduce_mean

            if stop is not None:  # this rank's stop request (0/1) rides along: > 0 after the mean = some rank
                values, self.names = torch.cat([values, stop.reshape(1)]), self.names + [_STOP_METRIC]
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


def _train(
    config: TrainConfig, payload, out: Path, context, progress: bool, build_loader, tasks, compile_fallback=False
) -> TrainResult:
    if config.keep_checkpoints < 1:
        raise ValueError(f"--keep-checkpoints {config.keep_checkpoints}: expected at least 1")
    stop_signals = StopSignals(config.stop_signals)  # checks --stop-signals before anything is built
    with stop_signals:  # from here on a stop signal is a request, not a kill
        return _run(config, payload, out, context, progress, build_loader, tasks, stop_signals, compile_fallback)


def _allow_tf32() -> None:
    """Precision "tf32": TF32 for fp32 matmuls and convolutions, through the current API where this torch has
    it (``torch.backends.cuda.matmul.fp32_precision``, ``torch.backends.cudnn.conv.fp32_precision``), else the
    legacy ``allow_tf32`` flags (on recent torch, touching those once the new API is in use raises)."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision = "tf32"
        conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _prepare_trainer(config: TrainConfig, payload, context, tasks, compile_fallback: bool = False):
    """The trainer (restored from ``payload`` if any, channels_last, wrapped for DDP), its step function, the
    step it starts after and the data cursor it starts at. ``compile_fallback``: a compiled step whose first
    call fails gives way to the eager step (:class:`~deepsim.train.auto.CompileFallback`)."""
    from deepsim.train import distributed

    rank, world, device = context.rank, context.world, context.device
    if config.precision == "tf32":
        _allow_tf32()

    torch.manual_seed(config.seed)
    trainer = build_trainer(config, device, tasks)
    start, cursor = 0, 0
    if payload is not None:
        try:
            trainer.load_training_state(payload["trainer"])
        except (RuntimeError, KeyError) as error:
            raise CheckpointError(
                f"checkpoint {payload.get('_source', '')} does not fit this run: {str(error).strip().splitlines()[0]}"
            ) from None
        start = int(payload["step"])
        set_rng_state(payload["rng"])
        # the data stream's global sample cursor; a checkpoint from before cursors existed: this world size's
        cursor = int(payload.get("data", {}).get("cursor", start * config.batch_size * world))
    if getattr(config, "channels_last", False):  # before DDP: its gradient buckets take the parameters' strides
        trainer.to_channels_last()
    if world > 1:
        distributed.wrap_ddp(trainer, device, ddp=config.compile == "off")
        # Dropout masks differ per rank; the initial weights above were drawn before, identically.
        torch.manual_seed(config.seed + 1_000_003 * rank + start)
    step_fn = trainer.step
    if config.compile != "off":
        from deepsim.train.compiled import compile_step

        step_fn = compile_step(trainer, config.compile)
        if compile_fallback:
            step_fn = CompileFallback(step_fn, trainer.step, config.compile, _say)
    return trainer, step_fn, start, cursor


def _pad_channels(trainer, loader: str) -> int:
    """The channels the generator asks its batches to carry (zero-padded), where the loader can pad them."""
    asked = getattr(trainer.generator, "input_channels", 3)
    return asked if loader in ("torch", "resident") or (loader == "dali" and asked == 4) else 3


def _run(
    config, payload, out, context, progress, build_loader, tasks, stopper: StopSignals, compile_fallback=False
) -> TrainResult:
    from deepsim.train import distributed

    rank, world, device = context.rank, context.world, context.device
    trainer, step_fn, start, cursor = _prepare_trainer(config, payload, context, tasks, compile_fallback)
    channels_last = getattr(config, "channels_last", False)
    stream = build_loader(
        config.data, batch_size=config.batch_size, crop_size=config.image_size, mode=_task_mode(config),
        mirror=config.mirror, loader=config.loader, device=device, seed=config.seed, start_sample=cursor,
        shard_id=rank, num_shards=world, num_workers=config.num_workers, channels_last=channels_last,
        on_bad=config.on_bad, pad_channels=_pad_channels(trainer, config.loader),
        max_image_pixels=config.max_image_pixels,
    )
    sample_stream = build_loader(
        config.data, batch_size=8, crop_size=config.image_size, mode=_task_mode(config), mirror=config.mirror,
        loader="torch", device=device, seed=config.seed + 7919, on_bad=config.on_bad,
        max_image_pixels=config.max_image_pixels,
    )
    sample_batch = next(sample_stream)
    sample_stream.close()

    is_main = rank == 0
    checkpoint_path = out / CHECKPOINT_NAME
    last_good = next(iter(find_checkpoints(out)), None)  # the newest one already there (what a NaN leaves)
    stopper.checkpoint = last_good
    history: list[dict] = []
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        saved_data = (payload or {}).get("data")
        if saved_data and saved_data.get("num_samples") != stream.num_samples:
            _say(
                f"warning: the checkpoint's dataset had {saved_data.get('num_samples')} samples, {config.data} has "
                f"{stream.num_samples} now: the data continues at sample cursor {cursor} of a different order"
            )
        if payload is not None and payload.get("world_size", world) != world:
            _say(
                f"resuming a {payload['world_size']}-rank run on {world} rank(s): the data continues at sample "
                f"cursor {cursor}; the global batch is now {world} x {config.batch_size}"
            )
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
    stop_flags = (torch.zeros((), device=device), torch.ones((), device=device)) if world > 1 else None
    stop_agreed = False  # world > 1: some rank asked to stop, as read from the last all-reduced metrics

    def log(entry: _PendingMetrics) -> None:
        nonlocal window_start, window_steps, stop_agreed
        values = entry.read()
        stop_agreed = stop_agreed or values.pop(_STOP_METRIC, 0.0) > 0
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

    def write_checkpoint(step: int) -> None:
        nonlocal last_good
        replicas = distributed.replica_fingerprints(trainer) if world > 1 else None  # every rank takes part
        if not is_main:
            stopper.checkpoint = checkpoint_path  # rank 0 writes it
            return
        payload = {
            "step": step,
            "config": config.to_dict(),
            "trainer": trainer.training_state(),
            "rng": rng_state(),
            "data": stream.state_dict(),  # the global sample cursor: resume at any world size
            "world_size": world,
            "provenance": dict(_RUN_PROVENANCE),
        }
        if replicas is not None:
            payload["replicas"] = replicas
            if len(set(replicas)) > 1:
                _say(f"warning: the ranks' parameters differ at step {step} (fingerprints per rank: {replicas})")
        nonlocal resumed_from
        replaced = resumed_from[1] if resumed_from and resumed_from[0] == checkpoint_path.resolve() else None
        last_good = stopper.checkpoint = save_checkpoint(
            checkpoint_path, payload, keep=config.keep_checkpoints, replaced_step=replaced
        )
        resumed_from = None

    # the file resumed from and its step: replacing it needs no second read of it
    resumed_from = (Path(payload["_source"]).resolve(), start) if payload and "_source" in payload else None
    stopped_by = None
    try:
        for step in range(start + 1, config.steps + 1):
            metrics = step_fn(next(stream))
            window_steps += 1
            if pending is not None:  # the previous log step's copy, read after this step was queued
                log(pending)
                pending = None
            # world 1: the signal flag itself; several ranks: what the last metrics all-reduce said, the same
            # answer on every rank at the same step (no extra collective, no per-step sync)
            stop = stopper.requested is not None if world == 1 else stop_agreed
            last = step == config.steps
            ckpt_due = step % config.checkpoint_every == 0 or last or stop
            if step % config.log_every == 0 or ckpt_due:
                flag = None if stop_flags is None else stop_flags[stopper.requested is not None]
                pending = _PendingMetrics(step, metrics, world, flag)
                if ckpt_due:  # a checkpoint is only written after its step's losses were checked
                    log(pending)
                    pending = None
                    stop = stop or stop_agreed
            if bar is not None:
                bar.update(1)
            if is_main and (step % config.sample_every == 0 or last) and not stop:
                grid = _save_grid(trainer, sample_batch, out / "samples" / f"step_{step:07d}.png")
                if board is not None:
                    board.log_samples(grid, step)
            if ckpt_due:
                write_checkpoint(step)
            if stop and not last:
                stopped_by = stopper.requested or "a stop signal on another rank"
                distributed.barrier()  # no rank exits (and gets torchrun to kill the others) before the write
                if is_main:
                    _say(f"stopped by {stopped_by} at step {step}: checkpoint {last_good}")
                break
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
    return TrainResult(step=step, out=out, checkpoint=last_good, history=history, stopped_by=stopped_by)
