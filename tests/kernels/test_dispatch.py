"""The conv-block dispatcher (kernels/dispatch.py), its logic on the CPU with a fake timer: the choice, the
cache file (written, read back, corrupt, unwritable), the DEEPSIM_KERNELS override, no timing inside
CUDA-graph capture or a torch.compile trace, prepare(), the decisions table. Plus the real thing on CUDA.

On the CPU the dispatcher is switched on for CPU tensors (``DISPATCH_DEVICES``) and its timer replaced by
one that runs each candidate step once (so both paths really run forward + backward, in the Triton
interpreter) and returns a fixed time per path.
"""

import json
import warnings

import pytest
import torch
from torch import nn

from ._common import INTERPRET, K, assert_close

dispatch = K.dispatch


class FakeTimer:
    """Records each step's path, runs the step once if ``run`` (the interpreter is slow: only where a test
    checks that both candidates really run), returns ``ms[path]`` (or raises ``fail[path]``)."""

    def __init__(self, ms=None, fail=None, run=False):
        self.ms = ms or {"triton": 1.0, "cudnn": 2.0}
        self.fail = fail or {}
        self.run = run
        self.calls: list[str] = []

    def __call__(self, step):
        self.calls.append(step.path)
        if step.path in self.fail:
            raise self.fail[step.path]
        if self.run:
            step()
        return self.ms[step.path]


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    """Dispatch on CPU tensors, a fresh table, the cache file in tmp_path, auto backend."""
    if not INTERPRET:
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1")
    path = tmp_path / "dispatch.json"
    monkeypatch.setattr(dispatch, "DISPATCH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    monkeypatch.delenv("DEEPSIM_KERNELS", raising=False)
    dispatch.reset()
    yield path
    dispatch.reset()


@pytest.fixture
def timer(monkeypatch):
    fake = FakeTimer()
    monkeypatch.setattr(dispatch, "_timer", fake)
    monkeypatch.setattr(dispatch, "_backward_timer", FakeTimer())
    return fake


@pytest.fixture
def backward_timer(monkeypatch, timer):
    """The dgrad / wgrad timer: per (part, impl) ms, records "part:impl"."""

    class PartTimer:
        def __init__(self):
            self.ms = {
                ("dgrad", "triton"): 1.0,
                ("dgrad", "cudnn"): 2.0,
                ("wgrad", "triton"): 3.0,
                ("wgrad", "cudnn"): 2.0,
            }
            self.calls = []

        def __call__(self, step):
            self.calls.append(f"{step.part}:{step.path}")
            return self.ms[(step.part, step.path)]

    fake = PartTimer()
    monkeypatch.setattr(dispatch, "_backward_timer", fake)
    return fake


def _conv(batch=2, channels_last=False):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, 6, 6, generator=g)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    w = (torch.randn(4, 3, 3, 3, generator=g) / 3).requires_grad_()
    return x, w, torch.randn(4, generator=g).requires_grad_()


def _path_of(y):
    name = y.grad_fn.name()
    return (
        "triton"
        if "conv_lrelu" in name or "conv_transpose" in name
        else "cudnn"
        if "bias_lrelu" in name
        else name
    )


def test_first_call_times_both_paths_takes_the_faster_and_caches_it(cache_file, timer):
    timer.run = True  # each candidate runs forward + backward once
    x, w, b = _conv()
    y = K.conv_lrelu(x, w, b, 1, 1)
    assert timer.calls == ["triton", "cudnn"] and _path_of(y) == "triton"
    assert_close(y, K.reference_conv_lrelu(x, w, b, 1, 1), 1e-5, 1e-5, "output")
    y = K.conv_lrelu(x, w, b, 1, 1)  # decided: no more timing
    assert timer.calls == ["triton", "cudnn"] and _path_of(y) == "triton"
    (row,) = dispatch.decisions()
    assert row["choice"] == "triton" and row["source"] == "measured"
    assert (row["triton_ms"], row["cudnn_ms"]) == (1.0, 2.0)
    data = json.loads(cache_file.read_text())
    (context,) = data["contexts"]
    assert context.startswith("cpu | torch ") and "triton" in context
    assert data["contexts"][context][row["key"]]["choice"] == "triton"


def test_slower_triton_loses_and_up_convs_dispatch_too(cache_file, timer):
    timer.ms, timer.run = {"triton": 3.0, "cudnn": 2.0}, True
    x = torch.randn(2, 4, 3, 3)
    wt, b = (torch.randn(4, 5, 4, 4) / 8).requires_grad_(), torch.randn(5)
    y = K.conv_transpose_lrelu(x, wt, b, 2, 1)
    assert timer.calls == ["triton", "cudnn"] and _path_of(y) == "cudnn"
    assert_close(y, K.reference_conv_transpose_lrelu(x, wt, b, 2, 1), 1e-5, 1e-5, "output")
    g = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, wt, g)
    (gw_ref,) = torch.autograd.grad(K.reference_conv_transpose_lrelu(x, wt, b, 2, 1), wt, g)
    assert_close(gw, gw_ref, 1e-4, 1e-4, "grad_weight")
    timer.ms = {"triton": 2.0, "cudnn": 2.0}  # a tie goes to the default path
    K.conv_lrelu(*_conv(), 1, 1)
    assert [r["choice"] for r in dispatch.decisions()] == ["cudnn", dispatch.DEFAULT_PATH]


def test_key_buckets_m_and_separates_layouts(cache_file, timer):
    K.conv_lrelu(*_conv(batch=4), 1, 1)  # M = 4 * 36 = 144 -> bucket 256
    K.conv_lrelu(*_conv(batch=5), 1, 1)  # a partial batch in the same bucket (180): reused
    assert len(timer.calls) == 2
    K.conv_lrelu(*_conv(batch=1), 1, 1)  # M = 36 -> bucket 64: timed on its own
    K.conv_lrelu(*_conv(batch=4, channels_last=True), 1, 1)  # another layout: timed
    assert len(timer.calls) == 6
    keys = [r["key"] for r in dispatch.decisions()]
    assert keys[0].startswith("conv_lrelu|M<=256|") and keys[1].startswith("conv_lrelu|M<=64|")
    assert keys[2].endswith("|fp32|channels_last|bias")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the dtype the conv computes in
        key = dispatch.decision_key("conv_lrelu", *_conv()[:2], True, 1, 1)
    assert key[-3:] == ("bf16", "contiguous", True)


def test_cache_file_is_read_back_by_a_new_process(cache_file, timer, monkeypatch):
    x, w, b = _conv()
    K.conv_lrelu(x, w, b, 1, 1)
    dispatch.reset()  # a new process: empty table, the file is still there
    y = K.conv_lrelu(x, w, b, 1, 1)
    assert timer.calls == ["triton", "cudnn"] and _path_of(y) == "triton"
    assert dispatch.decisions()[0]["source"] == "cache file"
    dispatch.reset()
    monkeypatch.setattr(dispatch, "_context", lambda device: "cpu | torch 9.9 | triton 9.9")  # new versions
    K.conv_lrelu(x, w, b, 1, 1)
    assert len(timer.calls) == 4, "another card / torch / triton times again"
    assert len(json.loads(cache_file.read_text())["contexts"]) == 2


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "contexts": {}}', '["a list"]'])
def test_corrupt_cache_file_warns_and_is_rewritten(cache_file, timer, content):
    cache_file.write_text(content)
    with pytest.warns(RuntimeWarning, match=f"{cache_file}.*unreadable"):
        y = K.conv_lrelu(*_conv(), 1, 1)
    assert timer.calls == ["triton", "cudnn"] and _path_of(y) == "triton"
    data = json.loads(cache_file.read_text())
    assert data["format"] == 1 and len(next(iter(data["contexts"].values()))) == 1


def test_unwritable_cache_file_warns_and_keeps_decisions_in_memory(cache_file, timer, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(dispatch.CACHE_ENV, str(blocker / "dispatch.json"))  # its folder is a file
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        K.conv_lrelu(*_conv(), 1, 1)
    K.conv_lrelu(*_conv(), 1, 1)
    assert len(timer.calls) == 2 and dispatch.decisions()[0]["choice"] == "triton"


def test_cache_off_and_default_location(cache_file, timer, monkeypatch, tmp_path):
    monkeypatch.setenv(dispatch.CACHE_ENV, "off")
    assert dispatch.cache_path() is None
    K.conv_lrelu(*_conv(), 1, 1)
    assert not cache_file.exists() and len(timer.calls) == 2
    monkeypatch.delenv(dispatch.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dispatch.cache_path() == tmp_path / "xdg" / "deepsim" / "dispatch.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dispatch.cache_path() == tmp_path / "home" / ".cache" / "deepsim" / "dispatch.json"


@pytest.mark.parametrize(
    "forced, path", [("triton", "triton"), ("cudnn", "cudnn"), ("reference", "LeakyReluBackward0")]
)
def test_env_var_forces_a_path_and_nothing_is_timed(cache_file, timer, monkeypatch, forced, path):
    monkeypatch.setenv("DEEPSIM_KERNELS", forced)
    x, w, b = _conv()
    y = K.conv_lrelu(x, w, b, 1, 1)
    assert _path_of(y) == path and timer.calls == [] and dispatch.decisions() == []
    assert_close(y, K.reference_conv_lrelu(x, w, b, 1, 1), 1e-5, 1e-5, "output")
    with K.use_backend("auto"):  # use_backend still overrides the variable
        K.conv_lrelu(x, w, b, 1, 1)
    assert len(timer.calls) == 2


def test_nothing_is_timed_inside_cuda_graph_capture(cache_file, timer, monkeypatch):
    monkeypatch.setattr(dispatch, "_capturing", lambda device: True)
    y = K.conv_lrelu(*_conv(), 1, 1)
    assert timer.calls == [] and _path_of(y) == dispatch.DEFAULT_PATH
    (row,) = dispatch.decisions()
    assert row["source"].startswith("default: inside CUDA-graph capture") and row["choice"] == "cudnn"
    assert not cache_file.exists(), "an untimed default is not cached"
    monkeypatch.setattr(dispatch, "_capturing", lambda device: False)
    y = K.conv_lrelu(*_conv(), 1, 1)  # after the capture: timed
    assert timer.calls == ["triton", "cudnn"] and _path_of(y) == "triton"
    assert [r["source"] for r in dispatch.decisions()] == ["measured"]


def test_torch_compile_reads_decisions_at_trace_time_and_never_times(cache_file, timer):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def block(x, w, b):
        return K.conv_lrelu(x, w, b, 1, 1)

    x, w, b = _conv()
    torch._dynamo.reset()
    torch.compile(block, backend=backend, fullgraph=True)(x, w, b)  # undecided: the default, untimed
    assert timer.calls == [] and "bias_lrelu" in graphs[-1] and "conv_lrelu" not in graphs[-1]
    K.conv_lrelu(x, w, b, 1, 1)  # decided eagerly (as prepare() does): triton
    torch._dynamo.reset()
    y = torch.compile(block, backend=backend, fullgraph=True)(x, w, b)
    assert len(timer.calls) == 2 and "deepsim.conv_lrelu" in graphs[-1]
    assert_close(y, K.reference_conv_lrelu(x, w, b, 1, 1), 1e-5, 1e-5, "compiled output")


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3, 3, 3) / 5)
        self.b1 = nn.Parameter(torch.zeros(4))
        self.w2 = nn.Parameter(torch.randn(4, 2, 4, 4) / 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = K.conv_lrelu(self.drop(x), self.w1, self.b1, 2, 1)  # (B, 4, H/2, W/2)
        return K.conv_transpose_lrelu(h, self.w2, None, 2, 1)  # (B, 2, H, W)


def test_prepare_decides_every_block_of_a_model(cache_file, timer):
    model, x = TwoBlocks(), torch.randn(2, 3, 8, 8)
    rng = torch.get_rng_state()
    rows = dispatch.prepare(model, x)
    assert [r["op"] for r in rows] == ["conv_lrelu", "conv_transpose_lrelu"]
    assert timer.calls == ["triton", "cudnn"] * 2
    assert model.training, "train mode restored"
    assert torch.equal(torch.get_rng_state(), rng), "the caller's RNG stream is untouched"
    assert [r["key"] for r in dispatch.prepare(model, x)] == [r["key"] for r in rows]
    assert len(timer.calls) == 4, "decided once"
    model(x).sum().backward()  # the training step then runs the decided paths, untimed
    assert len(timer.calls) == 4


def test_prepare_does_nothing_where_nothing_is_dispatched(cache_file, timer, monkeypatch):
    def must_not_run(x):
        raise AssertionError("prepare ran the model although nothing would be dispatched")

    monkeypatch.setenv("DEEPSIM_KERNELS", "triton")
    assert dispatch.prepare(must_not_run, torch.zeros(1)) == []
    monkeypatch.setenv("DEEPSIM_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "DISPATCH_DEVICES", ("cuda",))
    assert dispatch.prepare(must_not_run, torch.zeros(1)) == []
    with pytest.raises(ValueError, match="example input"):
        dispatch.prepare(must_not_run)


def test_a_failing_path_loses_with_a_warning(cache_file, timer):
    timer.fail = {"triton": RuntimeError("no kernel for this shape")}
    with pytest.warns(RuntimeWarning, match="triton failed: RuntimeError: no kernel"):
        y = K.conv_lrelu(*_conv(), 1, 1)
    assert _path_of(y) == "cudnn" and "no kernel" in dispatch.decisions()[0]["note"]
    dispatch.reset()
    timer.fail = {"triton": RuntimeError("a"), "cudnn": ValueError("both broken")}
    with pytest.raises(ValueError, match="both broken"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K.conv_lrelu(*_conv(batch=1), 1, 1)  # another key


def test_decisions_table_lists_this_process_and_the_cache_file(cache_file, timer, monkeypatch):
    K.conv_lrelu(*_conv(), 1, 1)
    other = {"format": 1, "contexts": json.loads(cache_file.read_text())["contexts"]}
    other["contexts"]["NVIDIA H100 80GB HBM3 | torch 2.14.1 | triton 3.8.0"] = {
        "conv_lrelu|M<=65536|Cin 3 H 64 W 64|Cout 32 k5x5 s2 p2|bf16|channels_last|bias": {
            "choice": "cudnn",
            "ms": {"triton": 0.5, "cudnn": 0.4},
            "shape": "x 64x3x64x64 w 32x3x5x5 s2 p2",
        }
    }
    cache_file.write_text(json.dumps(other))
    rows = dispatch.decisions(cache_file=True)
    assert [r["source"] for r in rows] == ["measured", "cache file (not used by this process)"]
    assert set(rows[0]) >= {"op", "key", "choice", "source", "triton_ms", "cudnn_ms", "context", "shape"}
    text = dispatch.format_decisions()
    assert str(cache_file) in text and "NVIDIA H100 80GB HBM3" in text and "Cout 32 k5x5 s2 p2" in text
    dispatch.reset()
    monkeypatch.setenv(dispatch.CACHE_ENV, "off")
    assert "none" in dispatch.format_decisions()


def test_forward_dgrad_and_wgrad_are_decided_separately(cache_file, backward_timer):
    """dgrad and wgrad are timed on their own (both implementations each) and the faster taken per part:
    here Triton dgrad, cuDNN wgrad; the table, the cache file and a new process agree, and the fused
    path's backward gets that pair."""
    x, w, b = _conv()
    y = K.conv_lrelu(x, w, b, 1, 1)
    assert _path_of(y) == "triton"
    assert backward_timer.calls == ["dgrad:triton", "dgrad:cudnn", "wgrad:triton", "wgrad:cudnn"]
    row = dispatch.decisions()[0]
    assert (row["dgrad"], row["wgrad"]) == ("triton", "cudnn") and row["dgrad_triton_ms"] == 1.0
    assert dispatch.backward_impls("conv_lrelu", x, w, b, 1, 1) == ("triton", "cudnn")
    entry = json.loads(cache_file.read_text())["contexts"][row["context"]][row["key"]]
    assert (entry["dgrad"], entry["wgrad"], entry["excluded"]) == ("triton", "cudnn", {})
    dispatch.reset()
    K.conv_lrelu(x, w, b, 1, 1)  # a new process: read back, nothing timed
    assert len(backward_timer.calls) == 4
    assert dispatch.backward_impls("conv_lrelu", x, w, b, 1, 1) == ("triton", "cudnn")
    grads = torch.autograd.grad(K.conv_lrelu(x, w, b, 1, 1).sum(), (w, b))
    want = torch.autograd.grad(K.reference_conv_lrelu(x, w, b, 1, 1).sum(), (w, b))
    for g, e in zip(grads, want):
        assert_close(g, e, 1e-4, 1e-4, "gradient with the dispatched backward")


@pytest.mark.parametrize("part", ["forward", "dgrad", "wgrad"])
def test_a_triton_candidate_that_mismatches_cudnn_is_excluded(cache_file, backward_timer, monkeypatch, part):
    """On its first call a Triton candidate is compared with cuDNN; a (faked) mismatch excludes it with a
    warning naming the op, the shape and the error, although it would time faster, and the cache records
    the exclusion."""
    calls = []
    real = dispatch._relative_error

    def fake_error(got, want):  # the comparisons run forward, dgrad, wgrad in that order
        calls.append(len(calls))
        part_of_call = ["forward", "dgrad", "wgrad", "wgrad"][min(len(calls) - 1, 3)]
        return 0.5 if part_of_call == part else real(got, want)

    monkeypatch.setattr(dispatch, "_relative_error", fake_error)
    backward_timer.ms[("wgrad", "triton")] = 1.0  # Triton would win every part on time
    x, w, b = _conv()
    with pytest.warns(
        RuntimeWarning,
        match=rf"conv_lrelu Triton {part} excluded for x 2x3x6x6 w 4x3x3x3 s1 p1"
        r".*relative error 0.5 > 0.001",
    ):
        y = K.conv_lrelu(x, w, b, 1, 1)
    row = dispatch.decisions()[0]
    assert list(row["excluded"]) == [part]
    chosen = {"forward": row["choice"], "dgrad": row["dgrad"], "wgrad": row["wgrad"]}
    assert chosen == {p: ("cudnn" if p == part else "triton") for p in chosen}
    assert _path_of(y) == chosen["forward"]
    assert f"{part}:triton" not in backward_timer.calls
    entry = json.loads(cache_file.read_text())["contexts"][row["context"]][row["key"]]
    assert part in entry["excluded"] and "relative error 0.5" in entry["excluded"][part]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_times_for_real_and_captures_with_the_decision(tmp_path, monkeypatch):
    """On a GPU: the first call times both paths with CUDA events; a CUDA graph captured afterwards uses
    the decision, and an undecided shape inside the capture takes the default without timing."""
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "dispatch.json"))
    monkeypatch.delenv("DEEPSIM_KERNELS", raising=False)
    dispatch.reset()
    x = torch.randn(8, 16, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    w, b = torch.randn(32, 16, 3, 3, device="cuda") / 12, torch.randn(32, device="cuda")
    y = K.conv_lrelu(x, w, b, 1, 1)
    (row,) = dispatch.decisions()
    assert row["source"] == "measured" and row["triton_ms"] > 0 and row["cudnn_ms"] > 0
    assert_close(y, K.reference_conv_lrelu(x, w, b, 1, 1), 1e-3, 1e-3, "output")
    x2 = torch.randn(8, 16, 8, 8, device="cuda")  # undecided
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the usual warm-up before a capture (compiles the kernels both need)
        K.conv_lrelu(x, w, b, 1, 1)
        with K.use_backend(dispatch.DEFAULT_PATH):  # forced: runs the default path, decides nothing
            K.conv_lrelu(x2, w, b, 1, 1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.conv_lrelu(x, w, b, 1, 1)
        K.conv_lrelu(x2, w, b, 1, 1)
    graph.replay()
    assert [r["source"].split(":")[0] for r in dispatch.decisions()] == ["measured", "default"]
    dispatch.reset()
