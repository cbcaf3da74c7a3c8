"""The batch convention every loader delivers, and the one conversion into it.

A batch is a ``torch.Tensor`` of shape (B, 3, H, W), RGB, contiguous (or channels_last if asked), float32 (or
the requested dtype, e.g. bfloat16), values in [-1, 1] computed as ``pixel / 127.5 - 1`` in float32, on the
requested device.
"""

from __future__ import annotations

import torch

__all__ = ["to_model_batch"]


def to_model_batch(
    u8: torch.Tensor,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    pad_channels: int = 3,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the library's batch convention: ``pixel / 127.5 - 1`` in [-1, 1].

    The uint8 tensor is moved first (4x fewer bytes over PCIe), then converted on the device. A float32
    input is taken as already normalised and only moved / cast. ``pad_channels`` > 3 appends zero channels
    (B, pad_channels, H, W), for a first conv that streams 8- or 16-byte pixels.
    """
    device = torch.device(device)
    if u8.dtype == torch.uint8:
        if device.type == "cuda" and u8.device.type == "cpu" and not u8.is_pinned():
            u8 = u8.pin_memory()
        x = u8.to(device, non_blocking=True).to(torch.float32).div_(127.5).sub_(1.0)
    else:  # already normalised float32 (converted in a DataLoader worker)
        x = u8.to(device, non_blocking=True)
    if dtype != torch.float32:
        x = x.to(dtype)
    if pad_channels > x.shape[1]:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        shape = (x.shape[0], pad_channels, *x.shape[2:])
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        out[:, x.shape[1] :] = 0
        out[:, : x.shape[1]] = x
        return out
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
