"""A zero-padded 4- or 8-channel batch through the first conv gives the 3-channel path's output and weight
gradients; the padded weight is made once per parameter version."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deepsim.networks as networks
from deepsim.networks import AutoencoderGenerator, ConvLReLU


def _pad(x: torch.Tensor, channels: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1])).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels", [4, 8])
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (3, 3, 13, 11)], ids=["even", "odd"])
def test_padded_input_conv_equals_the_3_channel_conv_with_gradients(channels, shape):
    torch.manual_seed(0)
    conv = ConvLReLU(3, 8, 5, stride=2, padding=2)
    x = torch.randn(shape)
    grad_out = None
    results = []
    for inp in (x, _pad(x, channels)):
        conv.zero_grad()
        y = conv(inp)
        grad_out = torch.randn_like(y) if grad_out is None else grad_out  # not all ones
        y.backward(grad_out)
        results.append((y.detach(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    (y3, gw3, gb3), (yp, gwp, gbp) = results
    assert gwp.shape == conv.weight.shape
    torch.testing.assert_close(yp, y3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gwp, gw3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gbp, gb3, rtol=1e-5, atol=1e-5)


def test_the_padded_weight_is_made_once_per_parameter_version(monkeypatch):
    torch.manual_seed(1)
    conv = ConvLReLU(3, 4, 3, padding=1)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 8)
    x4 = _pad(x, 4)
    pads = []
    real_pad = F.pad
    monkeypatch.setattr(networks.F, "pad", lambda *a, **k: pads.append(1) or real_pad(*a, **k))
    for step in range(3):
        for _ in range(2):  # two forwards (and backwards) on one parameter version
            loss = conv(x4).square().mean()
            loss.backward()
        assert len(pads) == step + 1
        torch.testing.assert_close(
            conv(x4), conv(x), rtol=1e-5, atol=1e-5
        )  # the new version, not a stale pad
        opt.step()
        opt.zero_grad()


def test_autoencoder_on_a_padded_bf16_channels_last_batch_equals_the_3_channel_batch():
    torch.manual_seed(2)
    g = AutoencoderGenerator(width=8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y3 = g(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
        y4 = g(_pad(x.to(torch.bfloat16), 4))
    assert y4.shape == (2, 3, 32, 32)
    torch.testing.assert_close(y4.float(), y3.float(), rtol=0.02, atol=0.02)
