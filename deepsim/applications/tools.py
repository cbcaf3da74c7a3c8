"""What the ``invert``, ``sample-preimages`` and ``sample-vae`` commands do, as library functions."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from deepsim.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels, read_image
from deepsim.metrics import mean_pairwise_distance
from deepsim.train.factory import resolve_device

from .factory import load_model
from .generators import VariationalAutoencoder

__all__ = ["load_image", "invert_files", "sample_preimages", "sample_vae_prior", "PreimageReport"]

RESIZE_SHORTER = 256  # ImageNet preprocessing (code): shorter side 256, then the centre 227 crop


def load_image(
    path: str | Path,
    size: int,
    resize_shorter: int = RESIZE_SHORTER,
    *,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """An image file -> (1, 3, size, size) in [-1, 1]: shorter side resized to ``resize_shorter``, centre
    crop; an image of more than ``max_pixels`` pixels is refused before decoding (:func:`read_image`)."""

    if size > resize_shorter:
        resize_shorter = size
    pixels = read_image(path, resize_shorter=resize_shorter, max_pixels=max_pixels)  # (H, W, 3) uint8
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    crop = np.ascontiguousarray(pixels[top : top + size, left : left + size])
    return torch.from_numpy(crop).permute(2, 0, 1)[None].float().div(127.5).sub(1)


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float().clamp(-1, 1).add(1).div(2).cpu()


def _inverter(checkpoint, device):
    device = resolve_device(device) if isinstance(device, str) else device
    model, config = load_model(checkpoint, device)
    if config.task != "invert":
        raise ValueError(
            f"checkpoint {checkpoint} is a {config.task!r} run; this command takes an 'invert' run"
        )
    return model, config, device


def invert_files(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    device: str | torch.device = "auto",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Iterator[tuple[Path, float]]:
    """Reconstruct images from their AlexNet features with a trained inversion checkpoint.

    Each image is preprocessed like the evaluation set (shorter side 256, centre crop of the run's image
    size), then ``<out>/<stem>_inversion.png`` holds the input (left) and the reconstruction (right); noise,
    if the generator takes any, is 0. Yields (output path, mean squared error per pixel on the [-1, 1] scale).
    An image over ``max_image_pixels`` (``--max-image-pixels``) raises ``ImageTooLargeError`` naming it.
    """
    check_max_pixels(max_image_pixels)
    model, config, device = _inverter(checkpoint, device)
    out = Path(out)
    for path in images:
        x = load_image(path, config.image_size, max_pixels=max_image_pixels).to(device)
        out.mkdir(parents=True, exist_ok=True)  # after the first image is read: a bad one writes nothing
        y = model.reconstruct(x).clamp(-1, 1)
        target = out / f"{Path(path).stem}_inversion.png"
        save_image(_to_unit(torch.cat([x, y], dim=3)), target)
        yield target, float((y - x).pow(2).mean())


class PreimageReport(dict):
    """{"checkpoint", "layer", "noise_dim", "samples", "images": {name: diversity}, "mean_diversity"}."""


def sample_preimages(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    samples: int = 8,
    seed: int = 0,
    device: str | torch.device = "auto",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> PreimageReport:
    """Draw ``samples`` pre-images per image (same features, different noise) and measure their diversity.

    Writes ``<out>/<stem>_preimages.png`` (the input, then the samples, in one row) and
    ``<out>/diversity.json``. Diversity = the mean Euclidean distance over all distinct pairs of one image's
    samples (:func:`deepsim.metrics.mean_pairwise_distance`, images in [-1, 1] flattened); 0 when the
    generator takes no noise (``noise_dim`` 0). The paper notes it stays small: nothing in the loss asks for
    it. An image over ``max_image_pixels`` (``--max-image-pixels``) raises ``ImageTooLargeError`` naming it.
    """
    if samples < 2:
        raise ValueError(f"--samples {samples}: the diversity needs at least 2 samples per image")
    check_max_pixels(max_image_pixels)
    model, config, device = _inverter(checkpoint, device)
    out = Path(out)
    rng = torch.Generator().manual_seed(seed)
    per_image: dict[str, float] = {}
    for path in images:
        x = load_image(path, config.image_size, max_pixels=max_image_pixels).to(device)
        out.mkdir(parents=True, exist_ok=True)  # after the first image is read: a bad one writes nothing
        draws = model.sample(x, samples, generator=rng)[0]  # (S, 3, H, W)
        per_image[Path(path).name] = float(mean_pairwise_distance(draws.flatten(1).float()))
        grid = make_grid(_to_unit(torch.cat([x, draws])), nrow=samples + 1, padding=2)
        save_image(grid, out / f"{Path(path).stem}_preimages.png")
    report = PreimageReport(
        checkpoint=str(checkpoint),
        layer=config.invert_layer,
        noise_dim=config.noise_dim,
        samples=samples,
        images=per_image,
        mean_diversity=float(np.mean(list(per_image.values()))) if per_image else float("nan"),
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "diversity.json").write_text(json.dumps(report, indent=2))
    return report


def sample_vae_prior(
    checkpoint_or_model,
    out: str | Path,
    *,
    samples: int = 64,
    nrow: int = 8,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> Path:
    """Decode ``samples`` latents z ~ N(0, I) with a trained VAE and write them as one PNG grid (``out``).

    ``checkpoint_or_model``: a "vae" checkpoint (or its folder), or a :class:`VariationalAutoencoder`.
    """

    if isinstance(checkpoint_or_model, VariationalAutoencoder):
        vae = checkpoint_or_model
    else:
        device = resolve_device(device) if isinstance(device, str) else device
        vae, config = load_model(checkpoint_or_model, device)
        if config.task != "vae":
            raise ValueError(
                f"checkpoint {checkpoint_or_model} is a {config.task!r} run; sample-vae takes a 'vae' run"
            )
    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        images = vae.sample(samples, generator=torch.Generator().manual_seed(seed))
    vae.train(was_training)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(_to_unit(images), nrow=nrow, padding=2), out)
    return out
