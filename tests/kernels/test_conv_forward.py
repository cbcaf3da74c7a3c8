"""The conv forward kernel (kernels/_conv_igemm.py) on the networks' real layer shapes, with every tile
config forced, plus the tuner's logic (fake timer), the efficiency bar, weight freshness after in-place
updates (eager, torch.compile, CUDA graphs) and the TF32 setting.

tests/kernels/test_conv_lrelu.py keeps the odd shapes and every gradient on small problems.
"""

import contextlib
import dataclasses
import importlib
import types

import pytest
import torch

from bench.static import network_layers

from ._common import CUDA, INTERPRET, K, assert_close

C = importlib.import_module(K.__name__ + "._conv_configs")  # the instance K's launchers use
IGEMM = importlib.import_module(K.__name__ + "._conv_igemm")

DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton needs a GPU or TRITON_INTERPRET=1")
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}

LAYERS = network_layers(batch=64)  # derived from the modules (forward hooks on the meta device)
BY_NAME = {(layer.network, layer.name): layer.geom for layer in LAYERS}


def _inputs(geom, dtype, device, channels_last=True, bias=True, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(geom.N, geom.C_in, geom.H, geom.W, device=device).to(dtype)
    shape = (
        (geom.C_in, geom.C_out, geom.KH, geom.KW)
        if geom.transposed
        else (geom.C_out, geom.C_in, geom.KH, geom.KW)
    )
    w = (torch.randn(shape, device=device) / (geom.C_in * geom.KH * geom.KW) ** 0.5).to(dtype)
    b = torch.randn(geom.C_out, device=device).to(dtype) if bias else None
    if channels_last:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    return x, w, b


def _ops(geom):
    if geom.transposed:
        return K.conv_transpose_lrelu, K.reference_conv_transpose_lrelu
    return K.conv_lrelu, K.reference_conv_lrelu


def _check_forward(geom, dtype, device, config=None, channels_last=True, grads=False):
    """Triton (optionally with a forced config) against the fp32 reference on the same rounded inputs."""
    x, w, b = _inputs(geom, dtype, device, channels_last)
    op, ref = _ops(geom)
    inputs = [t.requires_grad_() for t in (x, w, b)] if grads else [x, w, b]
    forced = C.force_config(config) if config is not None else contextlib.nullcontext()
    with K.use_backend("triton"), forced:
        y = op(x, w, b, geom.stride, geom.padding, 0.3)
    ref_inputs = [t.detach().float().requires_grad_(grads) for t in inputs]
    y_ref = ref(*ref_inputs, geom.stride, geom.padding, 0.3)
    atol, rtol = TOL[dtype]
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(y, y_ref, atol, rtol, f"output {geom} {config}")
    if grads:
        grad_out = torch.randn_like(y_ref)
        got = torch.autograd.grad(y, inputs, grad_out.to(dtype))
        want = torch.autograd.grad(y_ref, ref_inputs, grad_out)
        for name, g, g_ref in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
            assert_close(g, g_ref, atol, rtol, name)


# ----------------------------------------------------------------------------------------------------------
# Real layer shapes

# One full-size layer per kernel and per K path (a K tile across taps for 3 / 8 channels, inside one tap
# for 128 / 512), at batch 1-2 and with the config the GPU's static pick would run at that size (large
# tiles: few programs, so the interpreter stays within seconds).
FULL_SIZE = [
    pytest.param(("D 227px unpadded", "conv1"), 1, id="D227-conv1-3ch-k7s4"),
    pytest.param(("G autoencoder 64px", "decoder.0"), 2, id="G-dec0-8ch"),
    pytest.param(("D 64px", "conv4"), 2, id="D64-conv4-128to256"),
    pytest.param(("G fc6 227px", "decoder.layers.2"), 1, id="fc6-up-512to256"),
    pytest.param(("G autoencoder 64px", "decoder.1"), 2, id="G-up-128to64"),
]


@pytest.mark.skipif(not INTERPRET, reason="the interpreter run of the full-size layers")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layer, batch", FULL_SIZE)
def test_full_size_layer_in_interpreter(layer, batch, dtype):
    geom = dataclasses.replace(BY_NAME[layer], N=batch)
    config = C.eligible_configs(geom, 2, C.GPU_CONFIGS)[0]
    _check_forward(geom, dtype, "cpu", config=config, grads=dtype == torch.float32)


@pytest.mark.parametrize("layer", sorted({layer.geom for layer in LAYERS}, key=str), ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_every_network_layer_on_cuda(layer, dtype):
    _check_forward(layer, dtype, "cuda")


# Small odd shapes that take each K path and both kernels; every config of the GPU list is forced on them
# (in the interpreter too: a config is only tile sizes, and its masks must hold at any size).
ODD = [
    C.ConvGeometry(False, 2, 3, 11, 9, 33, 5, 5, 2, 2),  # K = 75: across taps, padded weight rows
    C.ConvGeometry(False, 1, 64, 7, 6, 40, 3, 3, 1, 1),  # within a tap for BLOCK_K <= 64
    C.ConvGeometry(True, 1, 64, 3, 5, 24, 4, 4, 2, 1),  # up-conv, 4 parity classes
    C.ConvGeometry(True, 2, 5, 3, 3, 7, 3, 3, 2, 0),  # up-conv with uneven taps (3 = 2 + 1 per class)
]


@pytest.mark.skipif(not INTERPRET, reason="interpreter run")
@pytest.mark.parametrize("config", C.GPU_CONFIGS, ids=lambda c: c.name)
def test_every_gpu_config_in_interpreter(config):
    for geom in ODD:
        _check_forward(geom, torch.float32, "cpu", config=config)


@pytest.mark.parametrize("config", C.GPU_CONFIGS, ids=lambda c: c.name)
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_every_config_forced_on_cuda(config):
    """Not only the tuner's pick: each config against the reference on real layers of each kind."""
    for key in [("D 227px unpadded", "conv1"), ("D 64px", "conv4"), ("G autoencoder 64px", "decoder.1")]:
        _check_forward(BY_NAME[key], torch.bfloat16, "cuda", config=config)
    for geom in ODD:
        _check_forward(geom, torch.float16, "cuda", config=config, channels_last=False)


@needs_triton
def test_nchw_caller_gets_nchw_output_and_grads():
    """NCHW x and weight: converted for the kernel, the output converted back (same values)."""
    geom = C.ConvGeometry(False, 2, 16, 6, 5, 8, 3, 3, 1, 1)
    _check_forward(geom, torch.float32, DEVICE, channels_last=False, grads=True)
    _check_forward(
        dataclasses.replace(geom, transposed=True, stride=2),
        torch.float32,
        DEVICE,
        channels_last=False,
        grads=True,
    )


@needs_triton
def test_int64_indexing_path(monkeypatch):
    """Tensors of 2**31+ elements index in int64; the same kernel path, forced on a small problem."""
    monkeypatch.setattr(IGEMM, "INDEX_64_NUMEL", 0)
    _check_forward(ODD[0], torch.float32, DEVICE)
    _check_forward(ODD[2], torch.float32, DEVICE)


# ----------------------------------------------------------------------------------------------------------
# Weights are read from the parameter's storage: always current


def _conv_block(channels_last: bool):
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).to(DEVICE)
    x = torch.randn(2, 8, 6, 6, device=DEVICE)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return conv, x


def _expected(conv, x):
    with torch.no_grad():
        return K.reference_conv_lrelu(x, conv.weight, conv.bias, 1, 1, 0.3)


@needs_triton
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_kernel_sees_weights_after_in_place_optimizer_step(channels_last):
    conv, x = _conv_block(channels_last)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    with K.use_backend("triton"):
        for _ in range(3):
            expected = _expected(conv, x)
            y = K.conv_lrelu(x, conv.weight, conv.bias, 1, 1, 0.3)
            assert_close(y, expected, 1e-4, 1e-4, "output with the current weights")
            y.square().mean().backward()
            opt.step()  # in place
            opt.zero_grad()
        # a write that does not bump the version counter (as inductor's in-place updates may not)
        version = conv.weight._version
        conv.weight.data.mul_(-0.5)
        assert conv.weight._version == version
        assert_close(
            K.conv_lrelu(x, conv.weight, conv.bias, 1, 1, 0.3),
            _expected(conv, x),
            1e-4,
            1e-4,
            "output after a write that kept _version",
        )


@needs_triton
@pytest.mark.slow
def test_kernel_sees_weights_after_compiled_optimizer_step():
    """A torch.compile'd (inductor) training step, optimizer step inside: each call's output is the conv of
    the weights as they were when it started."""
    conv, x = _conv_block(channels_last=True)
    opt = torch.optim.SGD(conv.parameters(), lr=0.05)

    def step():
        y = K.conv_lrelu(x, conv.weight, conv.bias, 1, 1, 0.3)
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        return y.detach()

    compiled = torch.compile(step)
    with K.use_backend("triton"):
        for i in range(3):
            expected = _expected(conv, x)
            assert_close(compiled(), expected, 1e-4, 1e-4, f"compiled step {i}")
    assert not torch.equal(_expected(conv, x), expected), "the optimizer changed the weights"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay_reads_current_weights():
    """Warm (tune) outside, capture, update the weights in place, replay: the replay uses the new ones."""
    conv, x = _conv_block(channels_last=True)
    conv, x = conv.to(torch.bfloat16), x.to(torch.bfloat16)
    with K.use_backend("triton"):
        K.conv_lrelu(x, conv.weight, conv.bias, 1, 1, 0.3)  # tunes the shape before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = K.conv_lrelu(x, conv.weight, conv.bias, 1, 1, 0.3)
    with torch.no_grad():
        conv.weight.mul_(-1.5)
    graph.replay()
    assert_close(y, _expected(conv, x), 1e-1, 5e-2, "replay after an in-place weight update")


# ----------------------------------------------------------------------------------------------------------
# Issued-MMA efficiency and eligibility (arithmetic on shapes and tiles: true on any machine)


def test_efficiency_of_known_cases():
    cfg = C.ConvConfig(128, 64, 64, 4, 4)
    up = C.ConvGeometry(True, 64, 128, 8, 8, 64, 4, 4, 2, 1)  # k4 s2 p1: 4 parity classes of 2x2 taps
    assert up.taps == (2, 2) and up.k == 512 and up.m == 64 * 8 * 8
    # ... each split into an interior run of 7 rows with 2 taps and a border row with 1 (its other tap reads
    # padding): 4 x 2 x 2 classes; per dimension 2 phases x (7 x 2 + 1) = 30 row-taps, not 8 x 4 = 32
    assert up.classes == 16 and sorted(set(up.class_k())) == [128, 256, 512]
    assert C.issued_mma_efficiency(up, C.ConvConfig(64, 64, 64, 4, 4)) == pytest.approx((32 / 30) ** 2)
    assert C.issued_mma_efficiency(up, cfg) < (32 / 30) ** 2  # 128-row tiles pad the 64-row corner classes
    first = C.ConvGeometry(False, 64, 3, 227, 227, 32, 7, 7, 4, 0)  # K = 147
    assert C.issued_mma_efficiency(first, C.ConvConfig(128, 32, 16, 4, 5)) == pytest.approx(
        147 / 160 * 200704 / 200704
    )
    assert C.issued_mma_efficiency(first, C.ConvConfig(128, 32, 64, 4, 4)) == pytest.approx(147 / 192)
    tail = C.ConvGeometry(False, 1, 64, 3, 3, 40, 3, 3, 1, 1)  # M = 9, C_out = 40
    assert C.issued_mma_efficiency(tail, cfg) == pytest.approx((9 * 40 * 576) / (128 * 64 * 576))


def test_every_eligible_config_meets_the_bar_on_every_layer():
    """The tuner only times eligible configs, so any pick meets 0.85: the up-convs and 3-channel layers
    too."""
    kinds = set()
    for layer in LAYERS:
        configs = C.eligible_configs(layer.geom, 2, C.GPU_CONFIGS)
        assert 1 <= len(configs) <= C.MAX_CANDIDATES
        for config in configs:
            eff = C.issued_mma_efficiency(layer.geom, config)
            assert eff >= C.MIN_EFFICIENCY, f"{layer} {config.name}: {eff:.3f}"
        kinds.add("up" if layer.geom.transposed else f"c{layer.geom.C_in}")
    assert {"up", "c3", "c8"} <= kinds


def test_network_layer_shapes_are_derived_from_the_modules():
    d227 = [BY_NAME[("D 227px unpadded", f"conv{i}")].out_size[0] for i in range(1, 6)]
    assert d227 == [56, 52, 25, 23, 11]
    assert BY_NAME[("G autoencoder 64px", "decoder.1")].transposed
    assert all(layer.geom.N == 64 for layer in LAYERS)


def test_eligible_configs_keep_the_best_when_none_qualifies():
    narrow = C.ConvGeometry(False, 64, 64, 16, 16, 3, 3, 3, 1, 1)  # C_out = 3: every BLOCK_N >= 32 wastes
    configs = C.eligible_configs(narrow, 2, C.GPU_CONFIGS)
    assert len(configs) == 1
    best = max(C.issued_mma_efficiency(narrow, c) for c in C.GPU_CONFIGS)
    assert C.issued_mma_efficiency(narrow, configs[0]) == best < C.MIN_EFFICIENCY


def _l2_bytes_per_flop(config, element=2):
    return element * (config.block_m + config.block_n) / (2 * config.block_m * config.block_n)


# The layers whose static pick is a 256 x 128 (or 128 x 256) tile: many tiles, C_out >= 128, C_in a
# multiple of 64 (the K tile inside one tap).
LARGE_TILE_LAYERS = (
    [("G fc6 227px", f"decoder.layers.{i}") for i in (2, 3, 4, 5)]
    + [("D 227px", f"conv{i}") for i in (3, 4, 5)]
    + [("D 64px", "conv4")]
)


def test_large_tiles_cut_the_forward_l2_bytes_where_they_fill_the_sms():
    """With the 256-row / 256-column tiles the static pick's L2 bytes per MMA FLOP never rises on a network
    layer, and drops where a large tile fills the SMs as well (a 128 x 128 tile: 1/64 B/FLOP in bf16)."""
    small = [c for c in C.GPU_CONFIGS if not c.large]
    dropped = set()
    for layer in LAYERS:
        before = C.eligible_configs(layer.geom, 2, small)[0]
        after = C.eligible_configs(layer.geom, 2, C.GPU_CONFIGS)[0]
        assert _l2_bytes_per_flop(after) <= _l2_bytes_per_flop(before), f"{layer} {after.name}"
        if _l2_bytes_per_flop(after) < _l2_bytes_per_flop(before):
            dropped.add((layer.network, layer.name))
    for key in LARGE_TILE_LAYERS:
        pick = C.eligible_configs(BY_NAME[key], 2, C.GPU_CONFIGS)[0]
        assert pick.large and _l2_bytes_per_flop(pick) < 1 / 64, f"{key}: {pick.name}"
    assert set(LARGE_TILE_LAYERS) <= dropped
    few = C.ConvGeometry(False, 64, 128, 8, 8, 128, 3, 3, 1, 1)  # 32 tiles of 128 x 128: half the SMs idle
    assert not C.eligible_configs(few, 2, C.GPU_CONFIGS)[0].large


def test_large_tiles_only_with_the_k_tile_inside_a_tap():
    """Across taps (C_in % BLOCK_K != 0) a 256-row tile spills at 16 warps: ``fits`` keeps it out; the dgrad
    list has no large tile at all (its two A tiles)."""
    big = C.ConvConfig(256, 128, 64, 16, 4)
    assert C.fits(C.ConvGeometry(False, 64, 128, 16, 16, 128, 3, 3, 1, 1), big)
    assert not C.fits(C.ConvGeometry(False, 64, 32, 32, 32, 128, 5, 5, 1, 2), big)  # 32 % 64 != 0
    assert not C.fits(C.ConvGeometry(False, 64, 128, 16, 16, 128, 3, 3, 1, 1), big, element_size=4)
    for config in C.GPU_CONFIGS:  # 64 fp32 accumulators per thread at most
        assert config.block_m * config.block_n <= 64 * 32 * config.num_warps, config.name
    B = importlib.import_module(K.__name__ + "._conv_backward")
    dgrad = B.dgrad_config_list(torch.bfloat16, "ieee")
    assert dgrad and not any(c.large for c in dgrad)


def test_shared_memory_limit_prunes_fp32_tiles():
    geom = C.ConvGeometry(False, 64, 256, 16, 16, 256, 3, 3, 1, 1)
    big = C.ConvConfig(128, 256, 64, 8, 3)  # 288 KB of fp32 pipeline buffers
    fp32 = C.eligible_configs(geom, 4, [*C.GPU_CONFIGS, big])
    assert all(c.shared_memory_bytes(4) <= C.SHARED_MEMORY_LIMIT for c in fp32)
    assert big not in fp32


# ----------------------------------------------------------------------------------------------------------
# The tuner, with a fake timer


class FakeTimer:
    """A launcher and a timer: ``launch(config)`` records the launch; timing a no-argument launch runs it
    and answers the table's time for the config it launched (99 ms if absent)."""

    def __init__(self, times):
        self.times, self.launched, self.timed = times, [], []

    def launch(self, config):
        self.launched.append(config)

    def __call__(self, launch_once):
        launch_once()
        config = self.launched[-1]
        self.timed.append(config)
        return self.times.get(config, 99.0)


@pytest.fixture
def clean_tuner():
    C.clear_tuned_configs()
    yield
    C.clear_tuned_configs()


def _choose(geom, timer, autotune=True):
    x = torch.empty(0, dtype=torch.bfloat16)
    return C.choose_config("conv", geom, x, "ieee", timer.launch, timer=timer, autotune=autotune)


@pytest.mark.usefixtures("clean_tuner")
def test_tuner_times_candidates_once_per_bucket():
    geom = BY_NAME[("D 64px", "conv4")]  # M = 64 * 16 * 16 = 16384
    candidates = C.eligible_configs(geom, 2)
    assert len(candidates) >= 2
    timer = FakeTimer({candidates[-1]: 0.5})  # the last candidate is the fastest
    assert _choose(geom, timer) == candidates[-1]
    assert timer.timed == candidates
    # the full batch again and partial batches in its bucket (M rounded up to a power of two): no re-timing
    for n in (64, 40, 33):
        assert _choose(dataclasses.replace(geom, N=n), timer) == candidates[-1]
    assert timer.timed == candidates
    # batch 1 is another bucket: timed once, then cached
    _choose(dataclasses.replace(geom, N=1), timer)
    timed = len(timer.timed)
    _choose(dataclasses.replace(geom, N=1), timer)
    assert len(timer.timed) == timed > len(candidates)
    assert {key[1] for key in C.tuned_configs()} == {
        geom.tuning_key(),
        dataclasses.replace(geom, N=1).tuning_key(),
    }


@pytest.mark.usefixtures("clean_tuner")
def test_tuner_never_times_during_graph_capture(monkeypatch):
    geom = BY_NAME[("D 64px", "conv4")]
    timer = FakeTimer({})
    monkeypatch.setattr(C, "_capturing", lambda device: True)
    assert _choose(geom, timer) == C.eligible_configs(geom, 2)[0], "the static pick"
    assert timer.launched == [] and C.tuned_configs() == {}, "nothing launched for timing, nothing cached"


@pytest.mark.usefixtures("clean_tuner")
def test_forced_config_and_autotune_off():
    geom = BY_NAME[("D 64px", "conv4")]
    timer = FakeTimer({})
    odd = C.ConvConfig(64, 32, 16, 4, 1)
    with C.force_config(odd):
        assert _choose(geom, timer) == odd
    assert _choose(geom, timer, autotune=False) == C.eligible_configs(geom, 2)[0]
    assert timer.launched == []


@pytest.mark.usefixtures("clean_tuner")
def test_cached_winner_not_eligible_for_a_tiny_batch_gives_way():
    geom = BY_NAME[("G fc6 227px", "decoder.layers.1")]  # 8x8 maps: batch 1 has M = 64
    tiny = dataclasses.replace(geom, N=1)
    big = C.ConvConfig(256, 128, 64, 8, 3)
    C._tuned[("conv", tiny.tuning_key(), torch.bfloat16, "cpu", "ieee")] = big
    assert C.issued_mma_efficiency(tiny, big) < C.MIN_EFFICIENCY
    timer = FakeTimer({})
    assert _choose(tiny, timer) == C.eligible_configs(tiny, 2)[0]
    assert timer.launched == []


# ----------------------------------------------------------------------------------------------------------
# TF32


def test_fp32_follows_the_current_tf32_api():
    conv_tf32 = types.SimpleNamespace(conv=types.SimpleNamespace(fp32_precision="tf32"), allow_tf32=False)
    conv_ieee = types.SimpleNamespace(conv=types.SimpleNamespace(fp32_precision="ieee"), allow_tf32=True)
    conv_none = types.SimpleNamespace(conv=types.SimpleNamespace(fp32_precision="none"), allow_tf32=True)
    legacy = types.SimpleNamespace(allow_tf32=True)  # a torch without the new API
    assert IGEMM.fp32_uses_tf32(conv_tf32) and not IGEMM.fp32_uses_tf32(conv_ieee)
    assert not IGEMM.fp32_uses_tf32(conv_none)
    assert IGEMM.fp32_uses_tf32(legacy) and not IGEMM.fp32_uses_tf32(types.SimpleNamespace(allow_tf32=False))


def test_fp32_precision_read_from_torch_without_touching_the_legacy_flag():
    """Once the new API sets conv apart from rnn, reading allow_tf32 raises; we never read it then."""
    if getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None) is None:
        pytest.skip("this torch has no torch.backends.cudnn.conv.fp32_precision")
    saved = torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        assert not IGEMM.fp32_uses_tf32()
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        assert IGEMM.fp32_uses_tf32()
        assert IGEMM.input_precision(torch.float16) == "ieee"
        assert IGEMM.input_precision(torch.float32) == ("ieee" if INTERPRET else "tf32")
    finally:
        torch.backends.cudnn.conv.fp32_precision = saved


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_tf32_on_cuda_when_pytorch_allows_it(monkeypatch):
    geom = BY_NAME[("D 64px", "conv4")]
    monkeypatch.setattr(torch.backends.cudnn.conv, "fp32_precision", "tf32")
    x, w, b = _inputs(dataclasses.replace(geom, N=8), torch.float32, "cuda")
    with K.use_backend("triton"):
        y = K.conv_lrelu(x, w, b, 1, 1, 0.3)
    y_ref = K.reference_conv_lrelu(x.double(), w.double(), b.double(), 1, 1, 0.3)
    assert_close(y, y_ref, 2e-2, 2e-2, "tf32 output")
    assert (y.double() - y_ref).abs().max() > 1e-5, "TF32 rounding shows: the setting was followed"
