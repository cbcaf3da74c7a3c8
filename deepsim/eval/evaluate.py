"""Evaluate trained checkpoints on a test set (``deepsim eval``).

Reconstruction error: the paper's normalized Euclidean error, mean_i ||G(x_i) - y_i||_2 / N with
N = the mean Euclidean distance over all distinct pairs of the test targets y (images in [-1, 1],
flattened; :func:`deepsim.metrics.normalized_error`, N from :func:`deepsim.metrics.mean_pairwise_distance`).
Test images: centre crops of the run's image size ("autoencoder"/"vae": plain centre crop; "invert": the
ImageNet preprocessing, shorter side 256 then the centre crop). The targets are kept in memory to compute N
(N images x 3 x H x W floats): bound it with ``max_images`` on large sets such as ImageNet val.

LPIPS (alex, :class:`deepsim.metrics.LPIPS`) is reported beside it, the mean over the test images, when its
weights are there (torchvision's AlexNet file and the lpips package's linear layers); otherwise the tables
say why not.

Codes (autoencoder, and the VAE's mean): the STL-10 linear-SVM protocol of :mod:`deepsim.eval.svm`, run
when the data folder is an STL-10 folder with train/test labels and ``fold_indices.txt``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from deepsim.applications.factory import model_from_payload
from deepsim.data import iterate_eval
from deepsim.data.stl10 import is_stl10_folder
from deepsim.metrics import LPIPS, gradient_energy, mean_pairwise_distance, normalized_error
from deepsim.train.checkpoint import load_checkpoint

from .svm import stl10_svm_accuracy
from .tables import Column, markdown_table, write_table

__all__ = [
    "reconstruction_error",
    "evaluate_checkpoint",
    "evaluate_checkpoints",
    "RECONSTRUCTION_COLUMNS",
    "SVM_COLUMNS",
    "LAYER_ORDER",
]

LAYER_ORDER = ("conv5", "fc6", "fc7", "fc8")

RECONSTRUCTION_COLUMNS: list[Column] = [
    ("task", "task", ""),
    ("layer", "layer", ""),
    ("loss", "loss", ""),
    ("comparator", "comparator", ""),
    ("step", "steps", "d"),
    ("images", "test images", "d"),
    ("mean_distance", "mean distance", ".4f"),
    ("reference_distance", "N (mean pair distance)", ".4f"),
    ("normalized_error", "normalized error", ".4f"),
    ("lpips", "LPIPS (alex)", ".4f"),
    ("sharpness", "sharpness", ".3f"),
    ("checkpoint", "checkpoint", ""),
]
SVM_COLUMNS: list[Column] = [
    ("task", "task", ""),
    ("loss", "loss", ""),
    ("comparator", "comparator", ""),
    ("feature_dim", "code size", "d"),
    ("accuracy_mean", "SVM accuracy (mean)", ".4f"),
    ("accuracy_std", "std", ".4f"),
    ("folds", "folds", "d"),
    ("checkpoint", "checkpoint", ""),
]


@torch.no_grad()
def reconstruction_error(
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    *,
    max_images: int | None = None,
    lpips_metric: torch.nn.Module | None = None,
) -> dict:
    """The normalized Euclidean error of ``reconstruct`` over a test set.

    Args:
        reconstruct: targets (B, 3, H, W) in [-1, 1] -> reconstructions of the same shape.
        batches: the test targets, in batches (e.g. :func:`deepsim.data.iterate_eval`).
        max_images: stop after this many images (None: all).
        lpips_metric: an :class:`~deepsim.metrics.LPIPS` (inputs in [-1, 1]) to report its mean as "lpips".

    Returns:
        {"images", "mean_distance" (mean_i ||a_i - y_i||), "reference_distance" (N), "normalized_error",
        "sharpness" (gradient energy of the reconstructions / that of the targets)}, and "lpips" (mean over
        the images) with ``lpips_metric``.
    """
    targets, distance_sum, count, lpips_sum = [], 0.0, 0, 0.0
    energy_fake = energy_target = 0.0
    for batch in batches:
        if max_images is not None:
            batch = batch[: max_images - count]
        if len(batch) == 0:
            break
        fake = reconstruct(batch).float()
        if fake.shape != batch.shape:
            raise ValueError(
                f"reconstruction of shape {tuple(fake.shape)} for targets of shape {tuple(batch.shape)}"
            )
        if lpips_metric is not None:
            lpips_sum += float(lpips_metric(fake, batch.to(fake.device).float()).double().sum())
        # normalized_error with N = 1 is the batch's mean distance; N is applied once, over the whole set.
        distance_sum += float(normalized_error(fake.cpu(), batch.float().cpu(), 1.0)) * len(batch)
        energy_fake += float(gradient_energy(fake.cpu()))
        energy_target += float(gradient_energy(batch.float().cpu()))
        targets.append(batch.float().cpu())
        count += len(batch)
        if max_images is not None and count >= max_images:
            break
    if count < 2:
        raise ValueError(f"the test set has {count} image(s); the normalized error needs at least 2")
    reference = float(mean_pairwise_distance(torch.cat(targets).flatten(1)))
    mean_distance = distance_sum / count
    extra = {"lpips": lpips_sum / count} if lpips_metric is not None else {}
    return {
        **extra,
        "images": count,
        "mean_distance": mean_distance,
        "reference_distance": reference,
        "normalized_error": mean_distance / reference if reference > 0 else float("nan"),
        # energy of the image gradient of the reconstructions over that of the targets (1: as sharp)
        "sharpness": energy_fake / energy_target if energy_target > 0 else float("nan"),
    }


def _default_split(data: str | Path, split: str | None) -> str | None:
    if split is not None or str(data) == "photos":
        return split
    return "test" if is_stl10_folder(data) else None


def _has_svm_data(data: str | Path) -> bool:
    folder = Path(data)
    needed = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "fold_indices.txt")
    return folder.is_dir() and all((folder / name).is_file() for name in needed)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str | None = None,
    batch_size: int = 32,
    max_images: int | None = None,
    crop_size: int | None = None,
    svm: bool = True,
    svm_C: float = 1.0,
    svm_crop_size: int | None = None,
    device: str | torch.device = "cpu",
    lpips: bool = True,
    lpips_backbone_weights: str | Path | None = None,
) -> dict:
    """Evaluate one checkpoint on ``data`` (an image folder, "photos", or an STL-10 folder).

    Args:
        split: STL-10 split for the reconstruction error (default "test" for STL-10 folders).
        crop_size: centre-crop side for the autoencoder (default: the run's image size; the autoencoder is
            convolutional, any multiple of 8 works). The VAE and inversion always use the run's image size.
        svm: run the STL-10 SVM on the codes (autoencoder, VAE) when ``data`` has train/test/folds.
        svm_crop_size: the images fed to the encoder for the SVM (autoencoder default: 96, the whole STL-10
            image, code 8x12x12; VAE: its image size).
        lpips: report LPIPS (alex) when its weights are there; the row's "lpips_note" says why not otherwise.
        lpips_backbone_weights: LPIPS' backbone (None: torchvision's cached AlexNet; a path; "random").

    Returns:
        {"reconstruction": row dict (see RECONSTRUCTION_COLUMNS), "svm": row dict or None}.
    """

    payload = load_checkpoint(checkpoint)
    model, config = model_from_payload(payload, device, f"checkpoint {checkpoint}")
    step = int(payload["step"])
    del payload
    size, mode, reconstruct, encode = _task_functions(model, config, crop_size)
    split = _default_split(data, split)
    batches = iterate_eval(data, batch_size=batch_size, crop_size=size, device=device, mode=mode, split=split)
    metric, lpips_note = (
        _usable_lpips(device, lpips_backbone_weights, size) if lpips else (None, "not asked for")
    )
    errors = reconstruction_error(reconstruct, batches, max_images=max_images, lpips_metric=metric)
    row = {**_run_fields(config, layer=True), "step": step, **errors, "checkpoint": str(checkpoint)}
    if metric is None:
        row["lpips_note"] = lpips_note
    svm_row = None
    if svm and encode is not None and _has_svm_data(data):
        crop = svm_crop_size or (96 if config.task == "autoencoder" else config.image_size)
        result = stl10_svm_accuracy(
            encode, data, crop_size=crop, batch_size=batch_size, device=device, C=svm_C
        )
        svm_row = _svm_row(config, result, checkpoint)
    return {"reconstruction": row, "svm": svm_row}


def _run_fields(config, *, layer: bool) -> dict:
    """A table row's first columns: the run's task (and inverted layer), loss and comparator."""
    fields = {"task": config.task}
    if layer:
        fields["layer"] = config.invert_layer if config.task == "invert" else None
    fields["loss"] = config.loss
    fields["comparator"] = config.comparator if config.loss == "deepsim" else None
    return fields


def _task_functions(model, config, crop_size: int | None):
    """(test image side, crop mode, x -> reconstruction, x -> code or None) of the run's task."""
    if config.task == "invert":
        return config.image_size, "resize-center", model.reconstruct, None
    if config.task == "vae":
        mode = "resize-center" if config.image_size == 227 else "center"  # as trained

        def reconstruct(x):
            return model(x)[0]  # eval mode: z = mu

        def encode(x):
            return model.encode(x)[0]

        return config.image_size, mode, reconstruct, encode
    return crop_size or config.image_size, "center", model, model.encode


def _usable_lpips(device, backbone_weights, size: int) -> tuple[torch.nn.Module | None, str | None]:
    """:func:`_lpips_metric`, or (None, why not) when ``size`` is below its comparator's minimum side."""
    metric, note = _lpips_metric(device, backbone_weights)
    if metric is not None and size < metric.comparator.min_side:
        return None, f"{size}x{size} test images are below its minimum side {metric.comparator.min_side}"
    return metric, note


def _svm_row(config, result, checkpoint) -> dict:
    """The SVM table's row of one checkpoint's :func:`stl10_svm_accuracy` result."""
    return {
        **_run_fields(config, layer=False),
        "feature_dim": result.feature_dim,
        "accuracy_mean": result.mean,
        "accuracy_std": result.std,
        "folds": len(result.fold_accuracies),
        "fold_accuracies": result.fold_accuracies,
        "C": result.C,
        "checkpoint": str(checkpoint),
    }


def _lpips_metric(device, backbone_weights) -> tuple[torch.nn.Module | None, str | None]:
    """LPIPS (alex) on ``device``, or (None, why not) when its weights are missing."""

    try:
        return LPIPS("alex", backbone_weights=backbone_weights, check_range=False).to(
            device
        ), None  # G may overshoot
    except FileNotFoundError as error:  # ComparatorWeightsError too: a missing backbone or lin-weights file
        return None, str(error)


def evaluate_checkpoints(
    checkpoints: Sequence[str | Path], data: str | Path, *, out: str | Path | None = None, **kwargs
) -> dict:
    """Evaluate several checkpoints (e.g. one inversion run per layer) and write the tables.

    Rows of inversion runs are sorted by layer (conv5, fc6, fc7, fc8): the per-layer table of the paper.
    With ``out``: ``reconstruction.md/.json`` and, when the SVM ran, ``svm.md/.json`` in that folder.

    Returns: {"reconstruction": [rows], "svm": [rows], "markdown": text of the tables, "files": [paths]}.
    """
    results = [evaluate_checkpoint(c, data, **kwargs) for c in checkpoints]
    rows = [r["reconstruction"] for r in results]
    rows.sort(
        key=lambda r: (
            r["task"] != "invert",
            LAYER_ORDER.index(r["layer"]) if r["layer"] in LAYER_ORDER else 0,
        )
    )
    svm_rows = [r["svm"] for r in results if r["svm"] is not None]
    title = (
        "Inversion: normalized reconstruction error per layer"
        if all(r["task"] == "invert" for r in rows)
        else ("Normalized reconstruction error")
    )
    columns = [c for c in RECONSTRUCTION_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    text = markdown_table(rows, columns, title)
    notes = sorted(
        {r["lpips_note"] for r in rows if r.get("lpips_note") and r["lpips_note"] != "not asked for"}
    )
    text += "".join(f"\nLPIPS (alex) not reported: {note}\n" for note in notes)
    files = []
    if out is not None:
        files += write_table(rows, columns, out, "reconstruction", title)
    if svm_rows:
        svm_title = "Linear SVM on the codes (STL-10, 10 training folds, test set)"
        text += "\n" + markdown_table(svm_rows, SVM_COLUMNS, svm_title)
        if out is not None:
            files += write_table(svm_rows, SVM_COLUMNS, out, "svm", svm_title)
    return {"reconstruction": rows, "svm": svm_rows, "markdown": text, "files": [str(f) for f in files]}
