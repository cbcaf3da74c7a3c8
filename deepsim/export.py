"""``deepsim export`` and :func:`load_generator`: trained generators as safetensors, files that run no code.

The file layout is in :mod:`deepsim.train.tensorfile` and docs/files.md. Sources: a run folder, a checkpoint
(``checkpoint.pt``, an ``import-caffe`` file, another export), or a state dict of the published PyTorch port
of
the authors' generators (``upconvGAN``, :mod:`deepsim.caffe.upconvgan`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepsim.applications.factory import build_generator
from deepsim.caffe.importer import imported_generator_payload
from deepsim.caffe.upconvgan import generator_from_upconvgan, is_upconvgan_state
from deepsim.config import TrainConfig
from deepsim.train.checkpoint import (
    CheckpointError,
    find_checkpoints,
    load_checkpoint,
    read_footer,
    safe_torch_load,
)
from deepsim.train.loop import source_commit
from deepsim.train.tensorfile import is_safetensors, read_safetensors, write_safetensors

__all__ = ["ExportResult", "export_checkpoint", "load_generator", "read_source"]


@dataclass(frozen=True)
class ExportResult:
    out: Path
    description: str  # what the file holds, in words
    provenance: dict


def _upconvgan_payload(path: Path, state: dict, layer: str | None) -> dict:
    generator = generator_from_upconvgan(state, layer, image_size=227, source=str(path))
    meta = {
        "source": str(path.resolve()),
        "layer": layer or generator.layer,
        "format": "upconvGAN state dict",
    }
    payload = imported_generator_payload(generator, phi_weights=None, out_folder=path.parent, meta=meta)
    payload["provenance"] = {"preset": f"invert-{generator.layer}", "commit": None}
    return payload


def read_source(path: str | os.PathLike, *, layer: str | None = None) -> dict:
    """The payload of a checkpoint, a folder, an export, or an upconvGAN state dict (converted to ours)."""

    path = Path(path)
    if path.is_file():
        raw = read_safetensors(path) if is_safetensors(path) else None
        if raw is not None and "state_dict" in raw and "config" not in raw:
            raw = raw["state_dict"]
        if raw is None and read_footer(path) is None:  # not one of our checkpoints: maybe their state dict
            raw = safe_torch_load(path)
        if isinstance(raw, dict) and is_upconvgan_state(raw):
            return _upconvgan_payload(path, raw, layer)
        if raw is not None and "config" in raw and "step" in raw:
            return raw
    return load_checkpoint(path)


def _state_of(payload: dict, key: str, source) -> dict:
    trainer = payload.get("trainer")
    if not isinstance(trainer, dict) or not isinstance(trainer.get(key), dict):
        raise CheckpointError(f"checkpoint {source} holds no {key} (payload['trainer'][{key!r}])")
    return trainer[key]


def export_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    with_discriminator: bool = False,
    training_state: bool = False,
    layer: str | None = None,
    force: bool = False,
) -> ExportResult:
    """Write the generator of ``source`` to ``out`` as safetensors, config and provenance as JSON metadata.

    Args:
        source: a run folder (its newest valid checkpoint), a checkpoint file, or an upconvGAN state dict.
        out: the file to write.
        with_discriminator: also the discriminator's weights (an error if the run has none).
        training_state: the whole checkpoint (optimizers, RNG, data cursor), which ``train --resume`` takes.
        layer: upconvGAN sources: "pool5" | "fc6" | "fc7" | "fc8" (default: from the keys).
        force: replace ``out`` if it exists (otherwise FileExistsError, and nothing is read or written).
    """

    source, out = Path(source), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"--out {out} exists; pass --force to replace it (library: force=True)")
    payload = read_source(source, layer=layer)
    generator = _state_of(payload, "generator", source)
    if training_state:
        contents, written = (
            "the whole training checkpoint",
            {k: v for k, v in payload.items() if k != "_source"},
        )
    else:
        trainer = {"generator": generator}
        contents = "the generator"
        if with_discriminator:
            trainer["discriminator"] = _state_of(payload, "discriminator", source)
            contents = "the generator and the discriminator"
        written = {"config": payload["config"], "step": payload["step"], "trainer": trainer}
        written.update({key: payload[key] for key in ("provenance", "caffe_import") if key in payload})
    provenance = _export_provenance(payload, source, contents)
    write_safetensors(out, written, provenance=provenance, force=force)
    task = provenance["task"] or "?"
    return ExportResult(
        out, f"{contents} of the {task} run at step {payload['step']} (safetensors)", provenance
    )


def _export_provenance(payload: dict, source: Path, contents: str) -> dict:
    """The export's metadata: the run's preset, step, commit and task, what it holds, where it was read
    from (the source file's SHA-256 from its footer when that is the step exported) and this commit."""
    config = payload["config"] if isinstance(payload.get("config"), dict) else {}
    trained = payload.get("provenance") if isinstance(payload.get("provenance"), dict) else {}
    read_from = source if source.is_file() else next(iter(find_checkpoints(source)), None)
    footer = read_footer(read_from) if read_from is not None else None
    if footer is not None and footer.step != int(payload["step"]):  # a folder whose newest was skipped
        footer = None
    return {
        "preset": trained.get("preset"),
        "step": int(payload["step"]),
        "commit": trained.get("commit"),
        "task": config.get("task"),
        "contents": contents,
        "exported_from": str(source),
        "source_sha256": footer.sha256 if footer is not None else None,
        "export_commit": source_commit(),
    }


def load_generator(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, layer: str | None = None
) -> nn.Module:
    """The trained generator in a file, ready to run (eval mode, on ``device``).

    Args:
        path: a safetensors export, a checkpoint or run folder, or an upconvGAN state dict (.pt or
            .safetensors; converted as :mod:`deepsim.caffe.upconvgan` says, at its whole 256-px output).
        layer: upconvGAN files: "pool5" | "fc6" | "fc7" | "fc8" (default: from the keys).

    Returns:
        an :class:`~deepsim.networks.AutoencoderGenerator` (autoencoder), a
        :class:`~deepsim.applications.VariationalAutoencoder` (vae) or an
        :class:`~deepsim.applications.generators.InversionGenerator` (invert: features -> RGB in [-1, 1]).
    """

    path = Path(path)
    payload = None
    if path.is_file() and read_footer(path) is None:  # an export, their state dict, or an older checkpoint
        raw = read_safetensors(path) if is_safetensors(path) else safe_torch_load(path)
        state = raw.get("state_dict", raw) if isinstance(raw, dict) and "config" not in raw else None
        if isinstance(state, dict) and is_upconvgan_state(state):
            return generator_from_upconvgan(state, layer, image_size=256, source=str(path)).to(device)
        if isinstance(raw, dict) and "config" in raw:
            payload = raw
    if payload is None:
        payload = load_checkpoint(path)
    config = TrainConfig.from_dict(payload["config"])
    state = _state_of(payload, "generator", path)
    generator = build_generator(config)
    try:
        generator.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {path} does not fit its {config.task!r} generator: {' '.join(first[:2])}"
        ) from None
    return generator.to(device).eval()
