"""The VAE and AlexNet-inversion networks and trainers (deepsim.applications), on CPU with small sizes.

Full-size shapes (227x227 outputs from 256x256, conv5 input (B, 256, 6, 6)) are checked once per layer;
training steps use small images, narrow FC layers and random-weight AlexNets.
"""

import pytest
import torch

from deepsim.applications import (
    LAYER_FEATURE_SHAPES,
    FeatureExtractor,
    InversionGenerator,
    InversionTrainer,
    UpConvDecoder,
    VAEEncoder,
    VAETrainer,
    VariationalAutoencoder,
    build_trainer,
    decoder_side,
    kl_divergence,
    load_model,
)
from deepsim.config import PRESETS, TrainConfig, get_preset
from deepsim.networks import ConvLReLU, UpConvLReLU
from deepsim.train.checkpoint import save_checkpoint

CPU = torch.device("cpu")


def small_invert_config(layer="fc8", **changes) -> TrainConfig:
    # 64x64: the smallest size at which AlexNet's pool5 (the loss comparator's tap) is still defined
    base = get_preset(f"invert-{layer}").replace(
        invert_network="alexnet-random",
        comparator="alexnet-random:pool5",
        image_size=64,
        fc_width=64,
        batch_size=2,
    )
    return base.replace(**changes)


def small_vae_config(**changes) -> TrainConfig:
    return (
        get_preset("vae-photos")
        .replace(
            image_size=32, latent_dim=16, fc_width=64, batch_size=2, disc_padding="padded"
        )  # code's D: >= 35
        .replace(**changes)
    )


# ------------------------------------------------------------------------------------------ generators
@pytest.mark.parametrize("layer", ["conv5", "fc6", "fc7", "fc8"])
def test_inversion_generator_full_size_shapes(layer):
    torch.manual_seed(0)
    g = InversionGenerator(layer, image_size=227)
    assert g.decoder.out_side == 256
    shape = {"conv5": (256, 6, 6), "fc6": (4096,), "fc7": (4096,), "fc8": (1000,)}[layer]
    assert LAYER_FEATURE_SHAPES[layer] == shape
    features = torch.randn(1, *shape)
    with torch.no_grad():
        full = g.decoder(g.head(features))
        out = g(features)
    assert full.shape == (1, 3, 256, 256)
    assert out.shape == (1, 3, 227, 227)
    assert torch.equal(out, full[..., 14:241, 14:241])  # the centre crop, offset (256 - 227) // 2
    if layer == "conv5":
        convs = list(g.head)
        assert [c.out_channels for c in convs] == [512, 512, 512]
        assert [c.padding[0] for c in convs] == [1, 1, 0]  # the last one unpadded: 6x6 -> 4x4
        assert g.decoder.in_channels == 512
    else:
        fcs = [m for m in g.head if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in fcs] == [
            (shape[0], 4096),
            (4096, 4096),
            (4096, 4096),
        ]
        assert g.decoder.in_channels == 256


def test_up_conv_stack_is_the_codes_at_256_and_shorter_for_64():
    full = UpConvDecoder(256, 256)
    layers = list(full.layers)
    kinds = [
        "up" if isinstance(m, UpConvLReLU) else "conv" if isinstance(m, ConvLReLU) else "out" for m in layers
    ]
    assert kinds == ["up", "conv", "up", "conv", "up", "conv", "up", "up", "out"]
    assert [m.out_channels for m in layers] == [256, 512, 256, 256, 128, 128, 64, 32, 3]
    assert type(layers[-1]) is torch.nn.ConvTranspose2d  # linear output
    assert all(m.alpha == 0.3 for m in layers[:-1])
    small = UpConvDecoder(256, 64)
    assert sum(isinstance(m, (UpConvLReLU, torch.nn.ConvTranspose2d)) for m in small.layers) == 4  # 4 -> 64
    assert small(torch.randn(2, 256, 4, 4)).shape == (2, 3, 64, 64)
    assert decoder_side(227) == 256 and decoder_side(64) == 64 and decoder_side(33) == 64
    with pytest.raises(ValueError, match="out_side"):
        UpConvDecoder(256, 96)
    with pytest.raises(ValueError, match="8..256"):
        decoder_side(300)


def test_inversion_generator_noise_inputs():
    g = InversionGenerator("fc8", image_size=32, noise_dim=5, fc_width=32)
    assert g.head[0].in_features == 1000 + 5
    f = torch.randn(3, 1000)
    assert g(f).shape == (3, 3, 32, 32)
    zero = torch.zeros(3, 5)
    assert torch.equal(g(f, zero), g(f, zero))
    assert not torch.allclose(g(f), g(f))  # fresh noise each call
    c = InversionGenerator("conv5", image_size=32, noise_dim=2)
    assert c.head[0].in_channels == 256 + 2
    assert c.sample_noise(4).shape == (4, 2, 6, 6)
    assert c(torch.randn(4, 256, 6, 6)).shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match=r"expected \(B, 256, 6, 6\)"):
        c(torch.randn(4, 256, 5, 5))


def test_vae_encoder_decoder_shapes_and_eval_mode_uses_the_mean():
    torch.manual_seed(0)
    vae = VariationalAutoencoder(image_size=64, latent_dim=16, fc_width=64)
    assert [m.stride[0] for m in vae.encoder.convs] == [2, 2, 2, 2]  # 64 -> 4
    x = torch.randn(3, 3, 64, 64)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 16)
    assert vae.decode(mu).shape == (3, 3, 64, 64)
    assert vae.decoder.head[0].in_features == 16  # the fc6 generator, fed the latent
    vae.eval()
    with torch.no_grad():
        a, b = vae(x)[0], vae(x)[0]
        assert torch.equal(a, b) and torch.allclose(a, vae.decode(mu))
    vae.train()
    with torch.no_grad():
        assert not torch.allclose(vae(x)[0], vae(x)[0])  # z sampled
    assert vae.sample(5).shape == (5, 3, 64, 64)
    with pytest.raises(ValueError, match="expected 8..256"):
        VAEEncoder(image_size=300)
    with pytest.raises(ValueError, match="expected \\(B, 3, 64, 64\\)"):
        vae.encode(torch.randn(1, 3, 32, 32))


def test_kl_divergence_known_values():
    assert float(kl_divergence(torch.zeros(4, 7), torch.zeros(4, 7))) == 0.0
    # mu = 1, logvar = 0: 0.5 per latent unit, summed over 7, averaged over the batch
    assert float(kl_divergence(torch.ones(4, 7), torch.zeros(4, 7))) == pytest.approx(3.5)
    # mu = 0, logvar = log 2: 0.5 * (2 - 1 - log 2) per unit
    lv = torch.full((2, 3), torch.log(torch.tensor(2.0)).item())
    assert float(kl_divergence(torch.zeros(2, 3), lv)) == pytest.approx(
        1.5 * (1 - torch.log(torch.tensor(2.0)).item())
    )


# ------------------------------------------------------------------------------------------ Phi
@pytest.mark.parametrize(
    "network,layers",
    [("alexnet-random", ("conv5", "fc6", "fc7", "fc8")), ("caffenet-random", ("conv5", "fc8"))],
)
def test_feature_extractor_shapes_are_the_227_ones_at_any_input_size(network, layers):
    for layer in layers:
        shape = LAYER_FEATURE_SHAPES[layer]
        phi = FeatureExtractor(network, layer)
        assert phi.flat_dim == torch.Size(shape).numel()
        for size in (227, 64):
            assert phi(torch.rand(2, 3, size, size) * 2 - 1).shape == (2, *shape)
        assert not any(p.requires_grad for p in phi.parameters())
    with pytest.raises(ValueError, match="inverted network"):
        FeatureExtractor("vgg16", "fc6")


# ------------------------------------------------------------------------------------------ trainers
def test_presets_per_experiment():
    for layer in ("conv5", "fc6", "fc7", "fc8"):
        p = PRESETS[f"invert-{layer}"]
        assert (p.task, p.invert_layer, p.image_size, p.disc_first_stride) == ("invert", layer, 227, 4)
        assert p.comparator == "alexnet:pool5" and p.batch_size == 64
        assert p.lambda_feat == pytest.approx(0.005) and p.lambda_adv == 100
        assert p.lambda_img == pytest.approx(2e-6 * 127.5**2 / 2)
    assert PRESETS["vae-stl10"].task == "vae" and PRESETS["vae-stl10"].image_size == 64
    for name in (
        "autoencoder-stl10-se",
        "autoencoder-stl10-l1",
        "autoencoder-stl10-alexnet",
        "autoencoder-stl10-exemplar",
    ):
        assert PRESETS[name].task == "autoencoder"


def test_invert_trainer_step_trains_g_and_d_not_phi():
    torch.manual_seed(0)
    trainer = build_trainer(small_invert_config("fc8", noise_dim=3), CPU)
    assert isinstance(trainer, InversionTrainer)
    assert trainer.discriminator.feature_dim == 1000 and trainer.discriminator.conv1.stride[0] == 4
    batch = torch.rand(2, 3, 64, 64) * 2 - 1
    features, target, condition = trainer.prepare(batch)
    assert features.shape == (2, 1000) and target is batch and condition.shape == (2, 1000)
    g_before = [p.clone() for p in trainer.generator.parameters()]
    d_before = [p.clone() for p in trainer.discriminator.parameters()]
    phi_before = [p.clone() for p in trainer.extractor.parameters()]
    metrics = trainer.step(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert {"Loss/G/feat", "Loss/G/adv", "Loss/G/img", "Loss/D/real"} <= set(metrics)
    assert float(metrics["Loss/G/feat"]) > 0 and float(metrics["Loss/G/img"]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(g_before, trainer.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, trainer.discriminator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(phi_before, trainer.extractor.parameters()))


def test_conv5_trainer_feature_branch_takes_the_flattened_map():
    torch.manual_seed(0)
    trainer = build_trainer(small_invert_config("conv5", noise_dim=2), CPU)
    assert trainer.discriminator.feature_dim == 256 * 6 * 6
    features, _, condition = trainer.prepare(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert features.shape == (2, 256, 6, 6) and condition.shape == (2, 9216)
    assert torch.isfinite(trainer.step(torch.rand(2, 3, 64, 64) * 2 - 1)["Loss/G/total"])


def test_ablations_switch_terms_off():
    no_adv = build_trainer(small_invert_config(lambda_adv=0.0), CPU)
    assert no_adv.discriminator is None and no_adv.opt_d is None and not no_adv.uses_discriminator
    _, _, condition = no_adv.prepare(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert condition is None
    metrics = no_adv.step(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert "Loss/D/real" not in metrics and float(metrics["Loss/G/adv"]) == 0
    fake, real = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    no_feat = build_trainer(small_invert_config(lambda_feat=0.0), CPU)
    assert no_feat.loss.comparator is None and no_feat.discriminator is not None
    terms = no_feat.loss(fake, real, torch.zeros(2, 2))
    assert float(terms.feat) == 0 and float(terms.total) == pytest.approx(
        100 * float(terms.adv) + no_feat.loss.lambda_img * float(terms.img)
    )
    no_img = build_trainer(small_invert_config(lambda_img=0.0), CPU)
    terms = no_img.loss(fake, real, torch.zeros(2, 2))
    assert float(terms.img) == 0 and float(terms.feat) > 0
    with pytest.raises(ValueError, match="all 0"):
        build_trainer(small_invert_config(lambda_feat=0.0, lambda_adv=0.0, lambda_img=0.0), CPU)


def test_vae_trainer_reports_the_weighted_kl():
    torch.manual_seed(0)
    trainer = build_trainer(small_vae_config(lambda_kl=0.25), CPU)
    assert isinstance(trainer, VAETrainer) and trainer.discriminator.feature_dim is None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    trainer.eval()  # z = mu: the KL is then a function of x alone
    with torch.no_grad():
        mu, logvar = trainer.generator.encode(x)
        expected = 0.25 * kl_divergence(mu, logvar)
        _, extra = trainer.generate(x)
    assert set(extra) == {"kl"} and torch.allclose(extra["kl"], expected)
    trainer.train()
    metrics = trainer.step(x)
    assert "Loss/G/kl" in metrics and float(metrics["Loss/G/kl"]) >= 0
    parts = sum(float(metrics[k]) * w for k, w in [("Loss/G/feat", 0.005), ("Loss/G/adv", 100.0)])
    parts += float(metrics["Loss/G/img"]) * trainer.loss.lambda_img + float(metrics["Loss/G/kl"])
    assert float(metrics["Loss/G/total"]) == pytest.approx(parts, rel=1e-4)


@pytest.mark.parametrize("task", ["invert", "vae"])
def test_load_model_from_training_state(tmp_path, task):
    torch.manual_seed(0)
    config = small_invert_config("conv5", noise_dim=2) if task == "invert" else small_vae_config()
    trainer = build_trainer(config, CPU)
    path = save_checkpoint(
        tmp_path / "checkpoint.pt",
        {"step": 3, "config": config.to_dict(), "trainer": trainer.training_state()},
    )
    model, loaded = load_model(path)
    assert loaded == config and not model.training
    x = torch.rand(2, 3, config.image_size, config.image_size) * 2 - 1
    with torch.no_grad():
        if task == "invert":
            features = trainer.extractor(x)
            expected = trainer.generator.eval()(features, torch.zeros(2, 2, 6, 6))
            assert torch.allclose(model.reconstruct(x), expected, atol=1e-6)
            samples = model.sample(x, 4)
            assert samples.shape == (2, 4, 3, 64, 64)
        else:
            trainer.generator.eval()
            assert torch.allclose(model(x)[0], trainer.generator(x)[0], atol=1e-6)


@pytest.mark.slow
def test_vae_imagenet_preset_builds_and_steps_at_227(one_intra_op_thread):
    """The 227 px VAE: stride-4 unpadded D (227 -> 56 -> 52 -> 25 -> 23 -> 11), decoder = the fc6 generator
    with the full up-conv stack (256, cropped to 227), ImageNet preprocessing; one step at batch 2."""
    from deepsim.tasks import data_mode

    config = get_preset("vae-imagenet").replace(comparator="alexnet-random:pool5", batch_size=2, device="cpu")
    assert (config.task, config.image_size, config.disc_first_stride, config.latent_dim) == (
        "vae",
        227,
        4,
        4096,
    )
    assert data_mode(config) == "resize-crop"
    torch.manual_seed(0)
    trainer = build_trainer(config, torch.device("cpu"))
    vae = trainer.generator
    assert vae.decoder.decoder.out_side == 256 and vae.decoder.head[0].in_features == 4096
    assert [t.shape[-1] for t in trainer.discriminator.conv_features(torch.zeros(1, 3, 227, 227))] == [
        56,
        52,
        25,
        23,
        11,
    ]
    assert all(
        not layer.bias.requires_grad for layer in vae.decoder.decoder.layers
    )  # fixed zero biases (code)
    batch = torch.rand(2, 3, 227, 227) * 2 - 1
    before = [p.detach().clone() for p in vae.parameters()]
    metrics = trainer.step(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert "Loss/G/kl" in metrics
    moved = [not torch.equal(a, b) for a, b in zip(before, vae.parameters())]
    frozen = [not p.requires_grad for p in vae.parameters()]
    assert all(m != f for m, f in zip(moved, frozen))  # every trained parameter moved, no fixed bias did
    with torch.no_grad():
        vae.eval()
        assert vae(batch)[0].shape == (2, 3, 227, 227)


@pytest.mark.parametrize("bias", ["zero", "learned"])
def test_upconv_bias_fixed_at_zero_or_learned_with_the_same_keys(bias):
    """The authors' up-conv stack has Deconvolution biases fixed at 0 (lr_mult 0): "zero" keeps them as
    frozen zero parameters under the same state-dict keys as "learned", so weights load into either."""
    torch.manual_seed(0)
    g = InversionGenerator("fc8", image_size=32, fc_width=16, upconv_bias=bias)
    other = InversionGenerator(
        "fc8", image_size=32, fc_width=16, upconv_bias="learned" if bias == "zero" else "zero"
    )
    assert g.state_dict().keys() == other.state_dict().keys()
    stack = [layer for layer in g.decoder.layers]
    assert all(layer.bias is not None for layer in stack)
    if bias == "zero":
        assert all(not layer.bias.requires_grad and torch.count_nonzero(layer.bias) == 0 for layer in stack)
    else:
        assert all(layer.bias.requires_grad for layer in stack)
    assert all(p.requires_grad for p in g.head.parameters())  # the FC biases train (lr_mult 1) either way
    other.load_state_dict(g.state_dict())
    with pytest.raises(ValueError, match="up-conv bias 'none'"):
        InversionGenerator("fc8", upconv_bias="none")


def test_generator_code_init_uses_the_prototxt_fillers():
    """msra with msra_coeff 1 (FC), 1.8 (4x4 deconvs, Caffe fan-in out * 16), 0.9 (3x3 stride-1
    Deconvolutions, fan-in out * 9 although ours are convs), zero biases."""
    import math

    torch.manual_seed(0)
    g = InversionGenerator("fc6", image_size=64, fc_width=256, init="code")
    checks = []
    for layer in g.head:
        if isinstance(layer, torch.nn.Linear):
            checks.append((layer, math.sqrt(2 / layer.in_features)))
    for layer in g.decoder.layers:
        if isinstance(layer, torch.nn.ConvTranspose2d):
            checks.append((layer, 1.8 * math.sqrt(2 / (layer.out_channels * 16))))
        else:
            checks.append((layer, 0.9 * math.sqrt(2 / (layer.out_channels * 9))))
    assert (
        len(checks) == 3 + 7
    )  # defc7..5; deconv5, conv5_1, deconv4, conv4_1, deconv3, conv3_1, deconv0 at 64
    for layer, expected in checks:
        assert abs(layer.weight.std().item() / expected - 1) < 0.1, (layer, expected)
        assert torch.count_nonzero(layer.bias) == 0
    conv5_1 = g.decoder.layers[1]
    assert (conv5_1.in_channels, conv5_1.out_channels) == (256, 512)  # where the fan-in conventions differ
    with pytest.raises(ValueError, match="generator init 'xavier'"):
        InversionGenerator("fc6", image_size=64, fc_width=8, init="xavier")
