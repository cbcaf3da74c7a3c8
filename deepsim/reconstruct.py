"""Reconstruct images with a trained autoencoder checkpoint (``deepsim reconstruct``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from deepsim.applications.factory import model_from_payload
from deepsim.config import TrainConfig
from deepsim.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels, read_image
from deepsim.train.checkpoint import load_checkpoint
from deepsim.train.factory import resolve_device

__all__ = ["load_generator", "reconstruct_files", "image_to_tensor"]


def load_generator(
    checkpoint: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, TrainConfig]:
    """The trained generator of a checkpoint, in eval mode, and the run's config."""

    payload = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(payload["config"])
    if config.task != "autoencoder":
        raise ValueError(
            f"checkpoint {checkpoint} is a {config.task!r} run; 'reconstruct' takes an autoencoder"
        )
    return model_from_payload(payload, device, f"checkpoint {checkpoint}")


def image_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1)[None].float().div(127.5).sub(1)


def reconstruct_files(
    checkpoint,
    images,
    out,
    *,
    size: int | None = None,
    device="auto",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Iterator[tuple[Path, float]]:
    """Write ``<name>_reconstruction.png`` (input left, reconstruction right) for each image; yields
    (output path, mean squared error per pixel on the [-1, 1] scale). Images are centre-cropped to a
    multiple of 8 (the code is 8x smaller than the image); one over ``max_image_pixels``
    (``--max-image-pixels``) raises ``ImageTooLargeError`` naming it, before it is decoded."""

    check_max_pixels(max_image_pixels)
    device = resolve_device(device)
    generator, _ = load_generator(checkpoint, device)
    out = Path(out)
    for path in images:
        pixels = read_image(path, resize_shorter=size, max_pixels=max_image_pixels)
        h, w = (pixels.shape[0] // 8) * 8, (pixels.shape[1] // 8) * 8
        if h == 0 or w == 0:
            raise ValueError(
                f"{path}: image of {pixels.shape[1]}x{pixels.shape[0]} pixels is smaller than 8x8"
            )
        top, left = (pixels.shape[0] - h) // 2, (pixels.shape[1] - w) // 2
        out.mkdir(parents=True, exist_ok=True)  # after the first image is read: a bad one writes nothing
        x = image_to_tensor(pixels[top : top + h, left : left + w]).to(device)
        with torch.no_grad():
            y = generator(x).clamp(-1, 1)
        target = out / f"{Path(path).stem}_reconstruction.png"
        save_image(torch.cat([x, y], dim=3).add(1).div(2), target)
        yield target, float((y - x).pow(2).mean())
