"""The training loop: data -> step -> metrics (JSON lines), progress bar, sample grids, checkpoints.

Long runs (see README "Training at scale"): ``resume="auto"`` continues from the newest valid checkpoint in
``out`` or starts fresh, so one command line serves the first start and every restart (torchrun
``--max-restarts``, job arrays, requeued jobs); a stop signal finishes the step, writes a checkpoint and
returns with ``TrainResult.stopped_by`` set (:mod:`deepsim.train.preemption`); checkpoints carry a checksum
and the last ``keep_checkpoints`` are kept (:mod:`deepsim.train.checkpoint`); the data stream resumes at the
checkpoint's global sample cursor, at any world size (:mod:`deepsim.data.sampling`).

The loop (:func:`_run`) works over two parts: :class:`~deepsim.train.runlog.RunLog` (metrics.jsonl,
TensorBoard, progress bar, sample grids, NaN check) and :class:`~deepsim.train.checkpoint.Checkpointer`
(write, keep-K, last good); :func:`~deepsim.train.checkpoint.select_resume` picks the checkpoint to resume.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import deepsim.data
from deepsim.comparators import check_weights_file
from deepsim.config import TrainConfig
from deepsim.tasks import data_mode
from deepsim.train import compiled, distributed
from deepsim.train.auto import (
    AUTO,
    RUNTIME_CHOICES,
    CompileFallback,
    allow_tf32,
    describe_runtime,
    resolve_runtime,
    try_runtime,
)
from deepsim.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    refuse_existing_run,
    resumable_config,
    select_resume,
    set_rng_state,
)
from deepsim.train.factory import build_trainer
from deepsim.train.preemption import StopSignals
from deepsim.train.runlog import NonFiniteLossError, RunLog

__all__ = ["train", "TrainResult", "NonFiniteLossError", "RUNTIME_FIELDS", "RESUME_OVERRIDABLE"]

# Fields a resumed run takes from the command line; all others come from the checkpoint's config.
RUNTIME_FIELDS = {
    "steps",
    "out",
    "device",
    "log_every",
    "sample_every",
    "checkpoint_every",
    "num_workers",
    "compile",
    "loader",
    "on_bad",
    "max_image_pixels",
    "channels_last",
    "tensorboard",
    "keep_checkpoints",
    "stop_signals",
}
# Fields a resumed run takes from the command line only when they were given there (``resume_overrides``):
# the per-rank batch size, to keep the global batch when resuming on another number of GPUs.
RESUME_OVERRIDABLE = {"batch_size"}


@dataclass
class TrainResult:
    step: int  # the last completed step
    out: Path
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)  # the metrics rows written to metrics.jsonl
    stopped_by: str | None = (
        None  # "SIGTERM" etc. when a stop signal ended the run early (checkpoint written)
    )


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
    """Train as ``config`` says (restarts, stop signals, data cursor: docs/scale.md).

    Args:
        config: the run (a preset with fields replaced).
        resume: False: start fresh; ``"auto"``: from the newest valid checkpoint in ``config.out``, else
            fresh; True: from that checkpoint (an error if there is none); a path: that file, or the newest
            valid one in that folder (:func:`~deepsim.train.checkpoint.select_resume`). A resumed run's
            config is the checkpoint's, but for :data:`RUNTIME_FIELDS` (and ``resume_overrides``).
        progress: show a progress bar (rank 0).
        tasks: the task table (task -> trainer builder), e.g. :data:`deepsim.tasks.TASKS`; None: the
            autoencoder only.
        resume_overrides: the fields set on purpose (the CLI's flags): those in :data:`RESUME_OVERRIDABLE`
            replace the checkpoint's value; any other one that differs from it is an error naming both.
        announce: ``announce(config, line)`` on rank 0 once the ``"auto"`` runtime fields are resolved
            (:func:`deepsim.train.auto.resolve_runtime`): the resolved config, a line naming the path and why.
        provenance: recorded in every checkpoint (``{"preset": ...}``; the code's commit is added); a resumed
            run keeps the checkpoint's preset.

    Returns:
        :class:`TrainResult`; ``stopped_by`` is set when a stop signal ended the run (checkpoint written).

    Raises:
        NonFiniteLossError: a loss became NaN/inf (the last good checkpoint stays as it was).
        CheckpointError: the checkpoint to resume from is missing, damaged or does not fit the run, a flag
            conflicts with it, ``config.out`` already holds another run (without ``resume``), or a checkpoint
            write failed (the previous checkpoint is intact; the message says so).
    """
    context = distributed.init_from_env(config.device)  # torchrun's variables, if any; else rank 0 of 1
    try:
        payload = select_resume(resume, Path(config.out), context, say=_say) if resume else None
        if not resume:
            refuse_existing_run(Path(config.out), context)
        if payload is not None:
            config = _resumed_config(config, payload, resume, resume_overrides, provenance, context, tasks)
        _check_weight_files(config)
        config, auto_fields = _resolve_runtime(config, context, announce)
        if config.keep_checkpoints < 1:
            raise ValueError(f"--keep-checkpoints {config.keep_checkpoints}: expected at least 1")
        run_provenance = _run_provenance(provenance, payload)
        # an auto-chosen compile that fails falls back to eager; not with world > 1 (the eager step's
        # gradients are averaged by DDP, which the compiled path does not wrap)
        fallback = "compile" in auto_fields and context.world == 1
        # from here on a stop signal is a request, not a kill
        with StopSignals(config.stop_signals) as stopper:
            return _run(config, payload, context, tasks, stopper, run_provenance, progress, fallback)
    finally:
        distributed.cleanup(context)


def _run_provenance(provenance: dict | None, payload: dict | None) -> dict:
    """What every checkpoint records: the caller's provenance, a resumed checkpoint's (its preset wins) and
    this code's commit."""
    return {**(provenance or {}), **((payload or {}).get("provenance") or {}), "commit": source_commit()}


def _resolve_runtime(config: TrainConfig, context, announce) -> tuple[TrainConfig, set[str]]:
    """The config with its ``"auto"`` runtime fields resolved and tried for the device (announced on rank 0),
    and the names of the fields that were ``"auto"``."""
    auto_fields = {name for name in RUNTIME_CHOICES if getattr(config, name) == AUTO}
    config, reasons = resolve_runtime(config, context.device, world=context.world)
    config, reasons = try_runtime(config, context.device, reasons, auto_fields)
    if announce is not None and context.rank == 0:
        announce(config, describe_runtime(config, context.device, reasons))
    return config, auto_fields


def _resumed_config(
    config: TrainConfig, payload: dict, resume, given, provenance, context, tasks
) -> TrainConfig:
    """The checkpoint's config with :data:`RUNTIME_FIELDS` (and the overridable fields ``given``) from
    ``config``; conflicting flags and a checkpoint that does not fit its generator are one-line errors."""
    saved = resumable_config(payload, resume if not isinstance(resume, bool) else config.out)
    _check_conflicts(config, saved, given, payload.get("_source", "the checkpoint"))
    _warn_preset(given, provenance, payload, context)
    keep = RUNTIME_FIELDS | (RESUME_OVERRIDABLE & set(given))
    config = saved.replace(**{k: getattr(config, k) for k in keep})
    _check_fits(config, payload, tasks)
    if context.is_main:
        _say_resuming(payload)
    return config


def _check_conflicts(config: TrainConfig, saved: TrainConfig, given, source) -> None:
    """A flag given on the command line that the resumed run would ignore is an error naming both values."""
    ignored = sorted(set(given) - RUNTIME_FIELDS - RESUME_OVERRIDABLE - {"preset"})
    clashes = [
        (n, getattr(config, n), getattr(saved, n)) for n in ignored if getattr(config, n) != getattr(saved, n)
    ]
    if clashes:
        names = {"task": "task", "invert_layer": "--layer"}
        flags = "; ".join(
            f"{names.get(n, '--' + n.replace('_', '-'))} {mine} (the checkpoint's: {theirs})"
            for n, mine, theirs in clashes
        )
        raise CheckpointError(
            f"{flags}: resuming {source} continues its run as it was configured; drop the flag to continue "
            "it, or start a new run with a fresh --out"
        )


def _check_weight_files(config: TrainConfig) -> None:
    """The weights files the run names open safely (header only: cheap), so a bad one is one line before
    the run starts."""
    for flag, path in (
        ("--comparator-weights", config.comparator_weights),
        ("--invert-network-weights", config.invert_network_weights),
    ):
        if path:
            check_weights_file(path, flag)


def _warn_preset(given, provenance: dict | None, payload: dict, context) -> None:
    """``--preset`` on a resumed run: the checkpoint's config wins (the preset was only its starting
    point)."""
    mine = (provenance or {}).get("preset")
    theirs = (payload.get("provenance") or {}).get("preset")
    if "preset" in set(given) and context.is_main and mine and theirs and mine != theirs:
        _say(
            f"warning: --preset {mine}: resuming {payload.get('_source')} continues its own config (it "
            f"started from preset {theirs}); the preset is not applied"
        )


def _check_fits(config: TrainConfig, payload: dict, tasks) -> None:
    """The checkpoint's generator tensors against the generator its config builds (on the meta device: no
    memory, no compute), so a mismatch is one line before anything runs."""
    # lazy: deepsim.applications sits above this layer and imports deepsim.train (a package cycle)
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
            raise CheckpointError(
                f"checkpoint {source} does not fit its {config.task!r} generator: no tensor {name}"
            )
        got = getattr(saved[name], "shape", None)
        if got != tensor.shape:
            raise CheckpointError(
                f"checkpoint {source} does not fit its {config.task!r} generator: tensor {name} has shape "
                f"{tuple(got) if got is not None else type(saved[name]).__name__}, the config builds "
                f"{tuple(tensor.shape)}"
            )


def source_commit() -> str | None:
    """The git commit of this code (None outside a checkout or without git)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _say(text: str) -> None:
    print(f"deepsim train: {text}", file=sys.stderr, flush=True)


def _say_resuming(payload: dict) -> None:
    data = payload.get("data") or {}
    where = f", data cursor {data['cursor']} (epoch {data['epoch']}, sample {data['offset']})" if data else ""
    _say(f"resuming from {payload['_source']} (step {payload['step']}{where})")


def _prepare_trainer(config: TrainConfig, payload, context, tasks, compile_fallback: bool = False):
    """The trainer (restored from ``payload`` if any, channels_last, wrapped for DDP), its step function, the
    step it starts after and the data cursor it starts at. ``compile_fallback``: a compiled step whose first
    call fails gives way to the eager step (:class:`~deepsim.train.auto.CompileFallback`)."""
    rank, world, device = context.rank, context.world, context.device
    if config.precision == "tf32":
        allow_tf32()

    torch.manual_seed(config.seed)
    trainer = build_trainer(config, device, tasks)
    start, cursor = 0, 0
    if payload is not None:
        try:
            trainer.load_training_state(payload["trainer"])
        except (RuntimeError, KeyError) as error:
            raise CheckpointError(
                f"checkpoint {payload.get('_source', '')} does not fit this run: "
                f"{str(error).strip().splitlines()[0]}"
            ) from None
        start = int(payload["step"])
        set_rng_state(payload["rng"])
        # the data stream's global sample cursor; a checkpoint from before cursors existed: this world size's
        cursor = int(payload.get("data", {}).get("cursor", start * config.batch_size * world))
    if config.channels_last:  # before DDP: its gradient buckets take the parameters' strides
        trainer.to_channels_last()
    if world > 1:
        distributed.wrap_ddp(trainer, device, ddp=config.compile == "off")
        # Dropout masks differ per rank; the initial weights above were drawn before, identically.
        torch.manual_seed(config.seed + 1_000_003 * rank + start)
    step_fn = trainer.step
    if config.compile != "off":
        step_fn = compiled.compile_step(trainer, config.compile)
        if compile_fallback:
            step_fn = CompileFallback(step_fn, trainer.step, config.compile, _say)
    return trainer, step_fn, start, cursor


def _pad_channels(trainer, loader: str) -> int:
    """The channels the generator asks its batches to carry (zero-padded), where the loader can pad them."""
    asked = getattr(trainer.generator, "input_channels", 3)
    return asked if loader in ("torch", "resident") or (loader == "dali" and asked == 4) else 3


def _training_stream(config: TrainConfig, trainer, context, cursor: int):
    """This rank's shard of the training data, from the global sample ``cursor`` on."""
    return deepsim.data.build_loader(
        config.data,
        batch_size=config.batch_size,
        crop_size=config.image_size,
        mode=data_mode(config),
        mirror=config.mirror,
        loader=config.loader,
        device=context.device,
        seed=config.seed,
        start_sample=cursor,
        shard_id=context.rank,
        num_shards=context.world,
        num_workers=config.num_workers,
        channels_last=config.channels_last,
        on_bad=config.on_bad,
        pad_channels=_pad_channels(trainer, config.loader),
        max_image_pixels=config.max_image_pixels,
    )


def _sample_batch(config: TrainConfig, device: torch.device) -> torch.Tensor:
    """The 8 fixed images the sample grids show (their own seed: the same on every resume)."""
    stream = deepsim.data.build_loader(
        config.data,
        batch_size=8,
        crop_size=config.image_size,
        mode=data_mode(config),
        mirror=config.mirror,
        loader="torch",
        device=device,
        seed=config.seed + 7919,
        on_bad=config.on_bad,
        max_image_pixels=config.max_image_pixels,
    )
    batch = next(stream)
    stream.close()
    return batch


def _start_folder(config: TrainConfig, *, payload, stream, cursor: int, world: int) -> None:
    """Rank 0: the run folder and its config.json; says where a resumed data stream continues."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    saved_data = (payload or {}).get("data")
    if saved_data and saved_data.get("num_samples") != stream.num_samples:
        _say(
            f"warning: the checkpoint's dataset had {saved_data.get('num_samples')} samples, {config.data} "
            f"has {stream.num_samples} now: the data continues at sample cursor {cursor} of a different order"
        )
    if payload is not None and payload.get("world_size", world) != world:
        _say(
            f"resuming a {payload['world_size']}-rank run on {world} rank(s): the data continues at sample "
            f"cursor {cursor}; the global batch is now {world} x {config.batch_size}"
        )


def _run(
    config: TrainConfig,
    payload: dict | None,
    context: distributed.DistributedContext,
    tasks,
    stopper: StopSignals,
    provenance: dict,
    progress: bool,
    compile_fallback: bool,
) -> TrainResult:
    """Build, then loop: step, log (one step late), samples, checkpoint, stop on a signal."""
    out, world, is_main = Path(config.out), context.world, context.is_main
    trainer, step_fn, start, cursor = _prepare_trainer(config, payload, context, tasks, compile_fallback)
    stream = _training_stream(config, trainer, context, cursor)
    sample_batch = _sample_batch(config, context.device)
    checkpoints = Checkpointer(
        out, keep=config.keep_checkpoints, context=context, provenance=provenance, resumed=payload, say=_say
    )
    stopper.checkpoint = checkpoints.last_good
    if is_main:
        _start_folder(config, payload=payload, stream=stream, cursor=cursor, world=world)
    log = RunLog(out, config, start=start, world=world, is_main=is_main, progress=progress, stream=stream)
    stop_flags = _stop_flags(context)
    step, stopped_by = start, None
    try:
        if start == 0:
            log.samples(trainer, sample_batch, 0)
        trainer.train()
        for step in range(start + 1, config.steps + 1):
            metrics = step_fn(next(stream))
            log.count_step()
            log.flush(last_good=checkpoints.last_good)  # the previous log step's copy
            # world 1: the signal flag itself; several ranks: what the last metrics all-reduce said, the same
            # answer on every rank at the same step (no extra collective, no per-step sync)
            stop = stopper.requested is not None if world == 1 else log.stop_agreed
            last = step == config.steps
            checkpoint_due = step % config.checkpoint_every == 0 or last or stop
            if step % config.log_every == 0 or checkpoint_due:
                stop_flag = None if stop_flags is None else stop_flags[stopper.requested is not None]
                log.queue(step, metrics, stop_flag)
                if checkpoint_due:  # a checkpoint is only written after its step's losses were checked
                    log.flush(last_good=checkpoints.last_good)
                    stop = stop or log.stop_agreed
            log.advance_bar()
            if (step % config.sample_every == 0 or last) and not stop:
                log.samples(trainer, sample_batch, step)
            if checkpoint_due:
                stopper.checkpoint = checkpoints.write(step, config=config, trainer=trainer, stream=stream)
            if stop and not last:
                stopped_by = _stopped(stopper, step, checkpoints.last_good, is_main)
                break
        log.flush(last_good=checkpoints.last_good)
    finally:
        log.close()
        stream.close()
    return TrainResult(
        step=step, out=out, checkpoint=checkpoints.last_good, history=log.history, stopped_by=stopped_by
    )


def _stop_flags(context: distributed.DistributedContext) -> tuple[torch.Tensor, torch.Tensor] | None:
    """world > 1: the tensors (0, 1) by which this rank's stop request rides on the metrics all-reduce."""
    if context.world > 1:
        return torch.zeros((), device=context.device), torch.ones((), device=context.device)
    return None


def _stopped(stopper: StopSignals, step: int, checkpoint: Path | None, is_main: bool) -> str:
    """What stopped the run, once every rank has written its checkpoint (said on rank 0)."""
    stopped_by = stopper.requested or "a stop signal on another rank"
    distributed.barrier()  # no rank exits (and gets torchrun to kill the others) before the write
    if is_main:
        _say(f"stopped by {stopped_by} at step {step}: checkpoint {checkpoint}")
    return stopped_by
