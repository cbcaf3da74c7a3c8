"""Helpers for the tests that run real training processes: tiny-run flags, the subprocess environment, free
ports, the "Training at scale" commands (docs/scale.md), polling an output folder, and comparing two
checkpoints bit for bit.

Import as ``from tests.training_runs import ...`` (tests/conftest.py puts the repository root on sys.path).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from deepsim.config import TrainConfig, get_preset
from deepsim.train.checkpoint import read_footer

ROOT = Path(__file__).resolve().parents[1]
SCALE_DOC = ROOT / "docs" / "scale.md"  # the README's "Training at scale" links here for the commands

# A run small enough for a loaded 2-core machine: 40x40 crops of the bundled photos, batch 4, conv2
# comparator (TINY_RUN_FLAGS), on the CPU without a progress bar (TINY_RUNTIME_FLAGS).
TINY_RUN_FLAGS = (
    "--preset autoencoder-photos --data photos --comparator alexnet-random:conv2 --batch-size 4 "
    "--image-size 40 --sample-every 1000"
).split()
TINY_RUNTIME_FLAGS = ["--device", "cpu", "--no-progress"]
TINY_TRAIN_FLAGS = [*TINY_RUN_FLAGS, *TINY_RUNTIME_FLAGS]


def tiny_config(out, **changes) -> TrainConfig:
    """The in-process counterpart of TINY_TRAIN_FLAGS (metrics every 5 steps), writing to ``out``."""
    tiny = dict(
        data="photos",
        comparator="alexnet-random:conv2",
        batch_size=4,
        image_size=40,
        log_every=5,
        sample_every=1000,
        device="cpu",
        out=str(out),
    )
    return get_preset("autoencoder-photos").replace(**{**tiny, **changes})


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a training subprocess: one intra-op thread (deterministic and fast on a shared
    machine), the repository importable, no TensorBoard/progress noise."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def deepsim_cli(*args: str) -> list[str]:
    """``deepsim ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "deepsim.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_command(prefix: str) -> tuple[dict[str, str], list[str]]:
    """The command of docs/scale.md ("Training at scale") that starts with ``prefix`` (after its leading
    ``NAME=value`` environment assignments; backslash line continuations joined), split like a shell would
    (``$HEAD`` stays a literal word). Returns (the environment assignments, the command)."""
    for block in re.findall(r"```bash\n(.*?)```", SCALE_DOC.read_text(), flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            words = shlex.split(line) if line.strip() and not line.lstrip().startswith("#") else []
            n = 0
            while n < len(words) and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[n]):
                n += 1
            if " ".join(words[n:]).startswith(prefix):
                return dict(w.split("=", 1) for w in words[:n]), words[n:]
    raise AssertionError(f"docs/scale.md has no command starting with {prefix!r}")


def replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with the value after ``flag`` replaced (the flag must be there)."""
    assert flag in argv, f"{flag} not in {argv}"
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def torchrun(argv: list[str]) -> list[str]:
    """A docs/scale.md ``torchrun ...`` command as this interpreter runs it (``python -m
    torch.distributed.run``)."""
    assert argv[0] == "torchrun", argv
    return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]


def train_args_after(argv: list[str], tiny: list[str]) -> list[str]:
    """``argv`` up to ``-m deepsim.cli train``, then ``--resume auto`` (which the docs/scale.md commands use)
    and ``tiny`` in place of the command's preset, data and output flags."""
    cut = argv.index("train") + 1
    assert argv[cut - 3 : cut] == ["-m", "deepsim.cli", "train"], argv
    assert argv[-2:] == ["--resume", "auto"], "the docs/scale.md commands resume with --resume auto"
    return argv[:cut] + tiny + ["--resume", "auto"]


def metrics_steps(out: Path) -> list[int]:
    """The steps logged in ``out/metrics.jsonl`` so far (complete lines only)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def checkpoint_step(out: Path) -> int:
    """The step recorded beside ``out/checkpoint.pt``'s checksum (-1 when there is none yet)."""
    path = out / "checkpoint.pt"
    try:
        footer = read_footer(path)
    except OSError:
        return -1
    return -1 if footer is None else footer.step


def wait_for(condition, timeout_s: float, what: str, processes=(), interval_s: float = 0.05):
    """Poll ``condition()`` until it returns a truthy value; fail naming ``what`` after ``timeout_s`` or when
    one of ``processes`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for process in processes:
            if process.poll() is not None:
                raise AssertionError(
                    f"process {process.args[:6]} exited ({process.returncode}) before {what}"
                )
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def run(cmd: list[str], timeout_s: float, **kwargs) -> subprocess.CompletedProcess:
    """Run to completion, capturing text output; fail with the output's tail on a timeout."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, **kwargs)
    except subprocess.TimeoutExpired as error:
        tail = (error.stderr or b"")[-3000:]
        raise AssertionError(f"{cmd[:6]} did not finish within {timeout_s} s: {tail!r}") from None


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoint payloads hold the same networks, optimizer moments, pause state and data cursor, bit
    for bit (names the first tensor that differs)."""
    assert a["step"] == b["step"], (a["step"], b["step"])
    ta, tb = a["trainer"], b["trainer"]
    assert ta.keys() == tb.keys()
    for net in ("generator", "discriminator", "pause"):
        for name, tensor in ta.get(net, {}).items():
            assert torch.equal(tensor, tb[net][name]), f"{net}.{name} differs"
    for opt in ("opt_g", "opt_d"):
        for index, state in ta.get(opt, {}).get("state", {}).items():
            for key, tensor in state.items():
                assert torch.equal(tensor, tb[opt]["state"][index][key]), f"{opt}[{index}].{key} differs"
    assert a["data"]["cursor"] == b["data"]["cursor"], (a["data"], b["data"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]), "torch RNG state differs"
