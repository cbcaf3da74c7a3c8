"""Two processes with gloo on 127.0.0.1 run the real train(): after some steps both ranks hold the same
parameters (while reading different data shards), only rank 0 writes (with both ranks' parameter
fingerprints and the global data cursor), and the checkpoint resumes with world size 1."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from deepsim.config import get_preset
from deepsim.train.checkpoint import load_checkpoint
from tests.training_runs import free_port

STEPS = 4
TIMEOUT_S = 150


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _config(out):
    return get_preset("autoencoder-photos").replace(
        comparator="alexnet-random:conv2",
        batch_size=2,
        image_size=32,
        disc_padding="padded",
        steps=STEPS,
        log_every=2,
        sample_every=1000,
        checkpoint_every=1000,
        device="cpu",
        out=str(out),
        lr=1e-3,
    )


def _as_torchrun_rank(rank: int, world: int, port: int) -> None:
    """What torchrun sets (deepsim.train.distributed.init_from_env reads it inside train()); one thread."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _worker(rank: int, world: int, port: int, out: str, compiled: bool) -> None:
    _as_torchrun_rank(rank, world, port)
    import deepsim.train.loop as loop
    from deepsim.train import compiled as compiled_module

    if (
        compiled
    ):  # the in-graph all-reduce path; aot_eager traces the same graph without inductor's compile time
        loop_compile = compiled_module.compile_step

        def compile_step(trainer, mode):
            step = loop_compile(trainer, mode)
            step._fn = torch.compile(step.iteration, backend="aot_eager", fullgraph=True)
            return step

        compiled_module.compile_step = compile_step
    captured = {}
    build = loop.build_trainer
    loop.build_trainer = lambda config, device, tasks=None: captured.setdefault(
        "trainer", build(config, device, tasks)
    )
    batches = []
    real_build_loader = __import__("deepsim.data", fromlist=["build_loader"]).build_loader

    def recording_loader(*args, **kwargs):
        stream = real_build_loader(*args, **kwargs)
        if kwargs.get("batch_size") != 8:  # the training stream, not the sample-grid one
            first = next(stream)
            batches.append(first.clone())
            return _Prepend(first, stream)
        return stream

    import deepsim.data

    deepsim.data.build_loader = recording_loader
    config = _config(out).replace(compile="default" if compiled else "off")
    result = loop.train(config, progress=False)
    trainer = captured["trainer"]
    torch.save(
        {
            "generator": trainer.generator.state_dict(),
            "discriminator": trainer.discriminator.state_dict(),
            "first_batch": batches[0],
            "history": result.history,
            "parallel": sorted(trainer._parallel),
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


class _Prepend:
    def __init__(self, first, stream):
        self.first, self.stream = first, stream

    def __next__(self):
        if self.first is not None:
            first, self.first = self.first, None
            return first
        return next(self.stream)

    @property
    def skipped(self):  # the loop logs the stream's bad-file count (Data/skipped)
        return self.stream.skipped

    @property
    def num_samples(self):
        return self.stream.num_samples

    def state_dict(self):  # the checkpoint's data cursor (the first batch was drawn ahead, once: same count)
        return self.stream.state_dict()

    def close(self):
        self.stream.close()


def _spawn(out, compiled: bool, worker=None):
    port = free_port()
    worker = worker or _worker
    context = mp.start_processes(
        worker, args=(2, port, str(out), compiled), nprocs=2, join=False, start_method="spawn"
    )
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"2-process gloo run did not finish within {TIMEOUT_S} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _stop_worker(rank: int, world: int, port: int, out: str, _compiled: bool) -> None:
    """Rank 1 alone gets SIGUSR1, while it draws step 3's batch."""
    _as_torchrun_rank(rank, world, port)
    import signal

    import deepsim.data
    import deepsim.train.loop as loop

    real_build_loader = deepsim.data.build_loader

    def build_loader(*args, **kwargs):
        stream = real_build_loader(*args, **kwargs)
        if rank == 1 and kwargs.get("batch_size") != 8:
            real_next = type(stream).__next__

            class Signalling(type(stream)):
                def __next__(self):
                    if self.cursor == 2 * world * self.batch_size:  # drawing step 3's batch
                        os.kill(os.getpid(), signal.SIGUSR1)
                    return real_next(self)

            stream.__class__ = Signalling
        return stream

    deepsim.data.build_loader = build_loader
    result = loop.train(_config(out).replace(steps=40, log_every=2), progress=False)
    torch.save({"step": result.step, "stopped_by": result.stopped_by}, os.path.join(out, f"rank{rank}.pt"))


def test_sigusr1_on_rank_1_at_step_3_stops_both_ranks_at_step_5_with_one_checkpoint(tmp_path):
    """The stop request rides on the metrics all-reduce of log step 4 (log_every 2), read one step later: both
    ranks stop after step 5, rank 0 writes the checkpoint of step 5, and no rank runs a step more."""
    ranks = _spawn(tmp_path, False, _stop_worker)
    assert [r["step"] for r in ranks] == [5, 5]
    assert [r["stopped_by"] for r in ranks] == ["a stop signal on another rank", "SIGUSR1"]
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["step"] == 5 and checkpoint["data"]["cursor"] == 5 * 2 * 2
    assert len(set(checkpoint["replicas"])) == 1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-ddp", "compiled-allreduce"])
def test_two_ranks_stay_identical_and_rank0_alone_writes(tmp_path, compiled):
    ranks = _spawn(tmp_path, compiled)
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])  # different shards
    for net in ("generator", "discriminator"):
        for name, tensor in ranks[0][net].items():
            assert torch.equal(tensor, ranks[1][net][name]), f"{net}.{name} differs between ranks"
    expected = ["average"] if compiled else ["average", "discriminator", "generate"]
    assert ranks[0]["parallel"] == ranks[1]["parallel"] == expected
    # rank 0 alone wrote the checkpoint and the metrics; both ranks logged the same (averaged) losses
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["step"] == STEPS
    # every rank's parameter fingerprint, equal; the data cursor counts
    # both ranks' samples (2 ranks x B x steps)
    assert len(checkpoint["replicas"]) == 2 and checkpoint["replicas"][0] == checkpoint["replicas"][1]
    assert checkpoint["data"]["cursor"] == STEPS * 2 * 2 and checkpoint["world_size"] == 2
    for name, tensor in checkpoint["trainer"]["generator"].items():  # unwrapped keys (no "module.")
        assert torch.equal(tensor, ranks[0]["generator"][name])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # one writer: no duplicated lines
    for row0, row1 in zip(ranks[0]["history"], ranks[1]["history"]):
        assert {k: v for k, v in row0.items() if "/" in k} == {k: v for k, v in row1.items() if "/" in k}
    if not compiled:  # the 2-rank checkpoint resumes in one process (another world size)
        from deepsim.train.loop import train

        result = train(_config(tmp_path).replace(steps=STEPS + 2), resume=True, progress=False)
        assert result.step == STEPS + 2 and load_checkpoint(tmp_path)["step"] == STEPS + 2


def _channels_last_worker(rank: int, world: int, port: int, out: str, _compiled: bool) -> None:
    """Two eager DDP steps with channels_last; every warning (Python's and the reducer's) is written down."""
    import warnings

    _as_torchrun_rank(rank, world, port)
    import deepsim.train.loop as loop

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = loop.train(_config(out).replace(steps=2, channels_last=True, compile="off"), progress=False)
    torch.save(
        {"step": result.step, "warnings": [str(w.message) for w in caught]},
        os.path.join(out, f"rank{rank}.pt"),
    )


@pytest.mark.slow
def test_channels_last_ddp_has_no_grad_stride_warning(tmp_path, capfd):
    """channels_last before the DDP wrap: DDP's gradient buckets take the NHWC strides, so the reducer never
    warns "Grad strides do not match bucket view strides" (and copies no gradient)."""
    ranks = _spawn(tmp_path, False, _channels_last_worker)
    assert [r["step"] for r in ranks] == [2, 2]
    said = capfd.readouterr().err + "\n".join(w for r in ranks for w in r["warnings"])
    assert "Grad strides do not match bucket view strides" not in said
