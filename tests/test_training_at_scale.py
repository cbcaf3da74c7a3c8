"""The "Training at scale" commands (docs/scale.md), run on the CPU with gloo: two torchrun "nodes" on
localhost (c10d rendezvous) survive a SIGKILLed worker through --max-restarts and --resume auto; the
single-node command resumes a 2-rank run on 1 rank; the SLURM script turns SIGUSR1 before the time limit into
a checkpoint and a requeue. Each runs real processes (slow, but part of the default run)."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deepsim.train.checkpoint import load_checkpoint
from tests.training_runs import (
    ROOT,
    TINY_TRAIN_FLAGS,
    checkpoint_step,
    free_port,
    metrics_steps,
    readme_command,
    replace_flag,
    run,
    subprocess_env,
    torchrun,
    train_args_after,
    wait_for,
)

BATCH = int(TINY_TRAIN_FLAGS[TINY_TRAIN_FLAGS.index("--batch-size") + 1])


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _kill_leftovers(pids) -> None:
    """Kill processes this test started that are still alive (workers orphaned by a failed run)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _logs(paths) -> str:
    return "".join(p.read_text(errors="replace") for p in paths if p.exists())


def _assert_replicas_equal(payload: dict, world: int) -> None:
    replicas = payload["replicas"]
    assert len(replicas) == world and len(set(replicas)) == 1, f"ranks' parameters differ: {replicas}"


@pytest.mark.slow
def test_two_nodes_lose_a_worker_to_sigkill_and_max_restarts_1_resumes_from_the_last_checkpoint(tmp_path):
    """docs/scale.md multi-node command, 2 nodes x 1 process: SIGKILL one worker once the step-4 checkpoint
    exists; torchrun restarts the job, which resumes from the newest checkpoint (no step lost beyond it) and
    finishes 16 steps with equal parameters on both ranks and the data cursor at 16 x 2 x B."""
    port = free_port()
    env, argv = readme_command("torchrun --nnodes")
    argv = replace_flag(argv, "--nproc-per-node", "1")
    argv = replace_flag(argv, "--rdzv-endpoint", f"127.0.0.1:{port}")
    argv = replace_flag(argv, "--rdzv-id", f"deepsim-test-{port}")
    argv = replace_flag(argv, "--max-restarts", "1")
    out = tmp_path / "run"
    tiny = [
        *TINY_TRAIN_FLAGS,
        "--steps",
        "16",
        "--log-every",
        "2",
        "--checkpoint-every",
        "4",
        "--out",
        str(out),
    ]
    cmd = torchrun(train_args_after(argv, tiny))
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    agents = [
        subprocess.Popen(cmd, env=subprocess_env(**env), stdout=log.open("w"), stderr=subprocess.STDOUT)
        for log in logs
    ]
    started = set()
    try:
        wait_for(lambda: checkpoint_step(out) >= 4, 420, "the step-4 checkpoint", agents)
        started.update(p for agent in agents for p in _descendants(agent.pid))
        victim = wait_for(lambda: _children(agents[1].pid), 60, "node 1's worker", agents)[0]
        os.kill(victim, signal.SIGKILL)
        killed_after = checkpoint_step(out)
        wait_for(lambda: "resuming from" in _logs(logs), 420, "the restarted job", agents)
        newest_before_restart = checkpoint_step(out)
        started.update(p for agent in agents for p in _descendants(agent.pid))
        for agent in agents:
            agent.wait(timeout=600)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
        _kill_leftovers(started)
    text = _logs(logs)
    assert [a.returncode for a in agents] == [0, 0], text[-4000:]
    resumed = [int(k) for k in re.findall(r"resuming from \S+ \(step (\d+)", text)]
    assert resumed == [newest_before_restart] and newest_before_restart >= killed_after >= 4, (
        resumed,
        text[-3000:],
    )
    final = load_checkpoint(out)
    assert final["step"] == 16 and final["world_size"] == 2 and final["data"]["cursor"] == 16 * 2 * BATCH
    _assert_replicas_equal(final, 2)


@pytest.mark.slow
def test_single_node_command_resumes_a_2_rank_run_on_1_rank(tmp_path):
    """docs/scale.md single-node command with 2 processes for 6 steps, then the same command on 1 process to
    step 9: it resumes at step 6 and data cursor 6 x 2 x B, says so, and ends at cursor 6 x 2 x B + 3 x B."""
    out = tmp_path / "run"
    env, argv = readme_command("torchrun --standalone")
    base = [*TINY_TRAIN_FLAGS, "--log-every", "3", "--checkpoint-every", "3", "--out", str(out)]
    two = torchrun(train_args_after(replace_flag(argv, "--nproc-per-node", "2"), [*base, "--steps", "6"]))
    first = run(two, 600, env=subprocess_env(**env))
    assert first.returncode == 0, first.stderr[-4000:]
    payload = load_checkpoint(out)
    assert payload["step"] == 6 and payload["world_size"] == 2 and payload["data"]["cursor"] == 6 * 2 * BATCH
    _assert_replicas_equal(payload, 2)
    one = torchrun(train_args_after(replace_flag(argv, "--nproc-per-node", "1"), [*base, "--steps", "9"]))
    second = run(one, 600, env=subprocess_env(**env))
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"(step 6, data cursor {6 * 2 * BATCH}" in second.stderr
    assert "resuming a 2-rank run on 1 rank(s)" in second.stderr
    final = load_checkpoint(out)
    assert final["step"] == 9 and final["data"]["cursor"] == 6 * 2 * BATCH + 3 * BATCH


def _shim(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow
def test_slurm_script_turns_usr1_before_the_time_limit_into_a_checkpoint_and_a_requeue(tmp_path):
    """examples/slurm/train.sbatch with srun/scontrol shims (one node): SIGUSR1 to the batch script (what
    `#SBATCH --signal=B:USR1@180` does) reaches the worker through srun and torchrun; the worker writes a
    checkpoint at the step it was in and exits; the script requeues the job and exits 0."""
    shims = tmp_path / "bin"
    shims.mkdir()
    _shim(shims, "srun", 'exec "$@"')  # one node: the task is the command itself
    _shim(
        shims,
        "scontrol",
        'if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; else echo "$@" >> "$SCONTROL_LOG"; fi',
    )
    _shim(shims, "torchrun", f'exec "{sys.executable}" -m torch.distributed.run "$@"')
    out, scontrol_log, log = tmp_path / "run", tmp_path / "scontrol.log", tmp_path / "job.log"
    env = subprocess_env(
        PATH=f"{shims}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node001",
        SLURM_NNODES="1",
        SLURM_JOB_ID="4242",
        GPUS_PER_NODE="1",
        PRESET="autoencoder-photos",
        DATA="photos",
        OUT=str(out),
        RDZV_PORT=str(free_port()),
        SCONTROL_LOG=str(scontrol_log),
    )
    flags = [
        f
        for i, f in enumerate(TINY_TRAIN_FLAGS)
        if f not in ("--preset", "--data") and TINY_TRAIN_FLAGS[i - 1] not in ("--preset", "--data")
    ]
    job = subprocess.Popen(
        [
            "bash",
            str(ROOT / "examples" / "slurm" / "train.sbatch"),
            *flags,
            "--steps",
            "400",
            "--log-every",
            "2",
        ],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    started = []
    try:
        wait_for(lambda: max(metrics_steps(out), default=0) >= 4, 420, "step 4 in metrics.jsonl", [job])
        started = _descendants(job.pid)
        job.send_signal(signal.SIGUSR1)
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
        _kill_leftovers(started)
    text = log.read_text(errors="replace")
    assert job.returncode == 0, text[-4000:]
    assert scontrol_log.read_text().split() == ["requeue", "4242"]
    step = load_checkpoint(out)["step"]
    assert 4 <= step < 400 and f"stopped by SIGUSR1 at step {step}" in text, text[-3000:]
    assert "requeueing job 4242" in text
