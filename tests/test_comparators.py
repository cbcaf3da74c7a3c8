"""Comparator layouts, taps, normalization, freezing and weight-file errors."""

import pytest
import torch

from deepsim import Comparator
from deepsim.comparators import ComparatorWeightsError
from deepsim.networks import Discriminator


@pytest.mark.parametrize(
    "spec,size,shapes",
    [
        (
            "alexnet-random:conv1,pool1,conv2,pool2,conv3,conv4,conv5,pool5,fc6,fc7,fc8",
            224,
            [
                (64, 55, 55),
                (64, 27, 27),
                (192, 27, 27),
                (192, 13, 13),
                (384, 13, 13),
                (256, 13, 13),
                (256, 13, 13),
                (256, 6, 6),
                (4096,),
                (4096,),
                (1000,),
            ],
        ),
        (
            "caffenet-random:conv1,pool1,conv2,conv3,conv4,conv5,pool5,fc6,fc8",
            227,
            [
                (96, 55, 55),
                (96, 27, 27),
                (256, 27, 27),
                (384, 13, 13),
                (384, 13, 13),
                (256, 13, 13),
                (256, 6, 6),
                (4096,),
                (1000,),
            ],
        ),
        ("alexnet-random:conv3", 64, [(384, 3, 3)]),
    ],
)
def test_tap_shapes(spec, size, shapes):
    c = Comparator(spec)
    taps = c(torch.rand(2, 3, size, size) * 2 - 1)
    assert [tuple(t.shape[1:]) for t in taps] == shapes


def test_caffenet_uses_groups_and_lrn():
    c = Comparator("caffenet-random:fc8")
    convs = [m for m in c.layers if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [96, 256, 384, 384, 256]
    assert [m.groups for m in convs] == [1, 2, 1, 2, 2]
    assert sum(isinstance(m, torch.nn.LocalResponseNorm) for m in c.layers) == 2


def test_conv_taps_are_post_relu():
    (conv3,) = Comparator("alexnet-random:conv3")(torch.randn(2, 3, 64, 64))
    assert conv3.min() >= 0


def test_exemplar_and_vgg_layouts(tmp_path):
    # Exemplar-CNN: 3 conv + 1 FC; weights come from a file in our key layout.
    from deepsim.comparators import _exemplar_stages

    stages, _ = _exemplar_stages()
    keys = [k for k, _, _ in stages if k]
    assert keys == ["conv1", "conv2", "conv3", "fc4"]
    state = {}
    for k, _, m in stages:
        if k:
            state[k + ".weight"] = torch.randn_like(m.weight)
            state[k + ".bias"] = torch.randn_like(m.bias)
    path = tmp_path / "exemplar.pt"
    torch.save(state, path)
    c = Comparator("exemplar:conv3,fc4", weights=path)
    assert torch.equal(c.layers[0].weight, state["conv1.weight"])
    taps = c(torch.randn(2, 3, 32, 32))
    assert tuple(taps[0].shape) == (2, 256, 8, 8) and tuple(taps[1].shape) == (2, 512)


def test_vgg16_taps_without_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ComparatorWeightsError, match="vgg16-397923af.pth"):
        Comparator("vgg16:conv2_2")


def test_missing_alexnet_weights_say_which_file_where(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ComparatorWeightsError) as info:
        Comparator("alexnet:conv3")
    message = str(info.value)
    assert "alexnet-owt-7be5be79.pth" in message and str(tmp_path) in message and "alexnet-random" in message


def test_alexnet_loads_torchvision_file_from_cache(monkeypatch, tmp_path):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.alexnet(weights=None).eval()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    c = Comparator("alexnet:fc8")
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = reference(((x + 1) / 2 - mean) / std)
    torch.testing.assert_close(c(x)[0], expected, rtol=1e-4, atol=1e-4)


def test_caffenet_needs_a_weights_file():
    with pytest.raises(ComparatorWeightsError, match="--comparator-weights"):
        Comparator("caffenet:conv3")
    with pytest.raises(ComparatorWeightsError, match="does not exist"):
        Comparator("caffenet:conv3", weights="/nonexistent/caffenet.pt")


def test_wrong_tap_lists_valid_ones():
    with pytest.raises(ValueError, match=r"no tap 'conv9'.*valid taps: conv1, pool1, conv2"):
        Comparator("alexnet-random:conv9")
    with pytest.raises(ValueError, match="unknown comparator architecture"):
        Comparator("resnet:conv3")


def test_several_taps_with_weights():
    c = Comparator("alexnet-random:conv3=1,conv5=0.25")
    assert c.tap_names == ["conv3", "conv5"] and c.tap_weights == [1.0, 0.25]


def test_frozen_and_normalization_is_a_buffer():
    c = Comparator("alexnet-random:conv3")
    assert not any(p.requires_grad for p in c.parameters())
    c.train()
    assert not c.training
    assert "scale" in dict(c.named_buffers()) and "shift" in dict(c.named_buffers())


def test_random_comparator_is_reproducible():
    a, b = Comparator("alexnet-random:conv3"), Comparator("alexnet-random:conv3")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_discriminator_comparator_shares_d():
    d = Discriminator()
    c = Comparator("discriminator:conv2,conv4", network=d)
    taps = c(torch.randn(2, 3, 64, 64))
    assert [tuple(t.shape[1:]) for t in taps] == [(64, 25, 25), (256, 10, 10)]  # the code's unpadded convs
    assert c.network is d and not c.frozen
    with pytest.raises(ValueError, match="network="):
        Comparator("discriminator:conv2")
