"""bench.cuda_compile: the compiled training step compiled for CUDA sm_90 with no GPU (fake CUDA tensors, a
CUDA-runtime shim), its launch counting, and its negative controls. The compiling tests take minutes each
(marker ``cuda_compile``); the parsers run in the default selection."""

import pytest

from bench import cuda_compile

BASE_AUTOENCODER_LAUNCHES = 270  # autoencoder, auto kernels, batch 64, at commit e421916

# A fragment shaped like inductor's output module: kernels defined in string literals, host code in
# partition_0 and call, comments naming aten ops that must not count.
MODULE = '''
triton_poi_fused_0 = async_compile.triton('triton_poi_fused_0', """
@triton.jit
def triton_poi_fused_0(in_ptr0, xnumel):
    pass  # aten.add, extern_kernels.mm(x)
""")
def partition_0(args):
    arg0_1, arg1_1 = args
    # Topologically Sorted Source Nodes: [aten.convolution, aten.mm]
    buf0 = empty_strided_cuda((4, 4), (4, 1), torch.bfloat16)
    triton_poi_fused_0.run(arg0_1, buf0, 16, stream=stream0)
    extern_kernels.convolution(buf0, arg1_1, stride=(1, 1))
    extern_kernels.mm(buf0, buf0, out=buf1)
    buf2 = torch.ops.deepsim.bias_lrelu.default(buf0, arg1_1, 0.2)
    buf3 = aten.convolution_backward.default(buf0, buf0, arg1_1, [0], [1, 1], [0, 0], [1, 1], False, [0, 0], \
1, [False, True, True])
    triton_poi_fused_0.run(buf2, buf0, 16, stream=stream0)
    return (buf0, reinterpret_tensor(buf1, (4,), (1,), 0))
def call(self, args):
    (buf0,) = self.partitions[0](args)
    buf4 = buf0.cpu()
    return (buf4,)
'''


def test_launch_sites_count_host_calls_only():
    sites = cuda_compile.launch_sites(MODULE)
    kinds = [(s["kind"], s["name"], s["launches"]) for s in sites]
    assert ("triton", "triton_poi_fused_0", 1) in kinds and sum(k == "triton" for k, _, _ in kinds) == 2
    assert ("extern", "convolution", 1) in kinds and ("extern", "mm", 1) in kinds
    assert ("custom", "bias_lrelu", 1) in kinds
    assert ("aten", "convolution_backward", 2) in kinds  # weight and bias gradients, no input gradient
    assert sum(s["launches"] for s in sites) == 7


def test_partitions_name_their_devices():
    parts = {p["name"]: p for p in cuda_compile.partition_devices(MODULE)}
    assert parts["partition_0"]["devices"] == ["cuda"] and parts["partition_0"]["cuda_graph"]
    no_call = MODULE.replace("    buf4 = buf0.cpu()\n    return (buf4,)", "    return (buf0,)")
    assert [p["name"] for p in cuda_compile.partition_devices(no_call)] == ["partition_0"]


def test_unsupported_names_the_missing_piece(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    reason = cuda_compile.unsupported()
    assert reason is not None and "torch >= 2.14" in reason and "2.11.0" in reason
    rows = cuda_compile.run(["autoencoder"], ["auto"])
    assert rows[0]["status"].startswith("skipped: ") and "2.11.0" in rows[0]["status"]


def _compile(**kwargs):
    reason = cuda_compile.unsupported()
    if reason is not None:
        pytest.skip(reason)
    return cuda_compile.run(**kwargs)


@pytest.mark.cuda_compile
@pytest.mark.parametrize("workload", cuda_compile.WORKLOADS)
def test_step_compiles_for_sm90_in_one_cuda_graph(workload):
    rows = _compile(workloads=[workload], kernels=list(cuda_compile.KERNELS))
    for row in rows:
        assert row["status"] == "ok", row
        assert (row["graphs"], row["graph_breaks"]) == (1, 0), row
        assert row["cudagraph_skip_reasons"] == [] and row["cudagraph_skips"] == 0, row
        assert row["partitions"] and all(p["devices"] == ["cuda"] for p in row["partitions"]), row[
            "partitions"
        ]
        assert row["all_sm90"] and row["inductor_triton_kernels"] > 0 and row["custom_op_triton_kernels"] > 0
        assert row["launches"]["triton"] > 0 and row["launches"]["custom"] > 0
        assert row["launches_per_step"] == sum(k["launches"] for k in row["kernel_list"])
        assert row["flops_per_step"] > 1e9
        if (workload, row["kernels"]) == ("autoencoder", "auto"):
            # 270 launches with D's three passes of B and no horizontal fusion (bench/RESULTS.md):
            # >= 25% fewer
            assert row["launches_per_step"] <= 0.75 * BASE_AUTOENCODER_LAUNCHES, row["launches"]


@pytest.mark.cuda_compile
def test_a_host_copy_in_the_graph_shows_up_as_a_cpu_partition():
    (row,) = _compile(workloads=["autoencoder"], kernels=["auto"], control="cpu-op")
    assert row["status"] == "ok", row
    assert any("cpu" in p["devices"] for p in row["partitions"]), row["partitions"]


@pytest.mark.cuda_compile
def test_a_missing_static_address_shows_up_as_a_cudagraph_skip():
    (row,) = _compile(workloads=["autoencoder"], kernels=["auto"], control="no-static-address")
    assert row["status"] == "ok", row
    assert any("mutated inputs" in r for r in row["cudagraph_skip_reasons"]), row["cudagraph_skip_reasons"]
