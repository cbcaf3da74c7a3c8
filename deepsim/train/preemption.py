"""Stopping cleanly on a signal: what a cluster sends before it takes the machine back.

SLURM and Kubernetes send SIGTERM some seconds before they kill a job; a terminal sends SIGINT on Ctrl-C;
SLURM can send SIGUSR1 minutes ahead (``#SBATCH --signal=B:USR1@180``). While :func:`deepsim.train.loop.train`
runs, :class:`StopSignals` turns the first such signal into a stop request that the loop polls: it finishes
the step in flight, writes a checkpoint (rank 0, atomically) and returns with ``TrainResult.stopped_by``
set; ``deepsim train`` then exits with status :data:`PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL: "try again").
Running the same command with ``--resume auto`` continues from that checkpoint.

Under torchrun every rank stops at the same step: the loop adds each rank's request to the metrics it
all-reduces anyway every ``--log-every`` steps, so the decision costs no extra collective and no per-step
host sync, and all ranks read the same answer at the same step.

A second signal exits at once (status 128 + the signal number, e.g. 143 for SIGTERM) without a checkpoint;
the previous checkpoint stays loadable (checkpoints are replaced by an atomic rename). A repeat that arrives
within :data:`REPEAT_WINDOW_S` seconds of the first counts as the same request: one Ctrl-C reaches a worker
twice under torchrun (from the terminal and forwarded by torchrun), and a scheduler may signal every process
of a job as well as torchrun, which forwards it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

__all__ = ["StopSignals", "parse_signals", "PREEMPTED_EXIT_CODE", "REPEAT_WINDOW_S", "DEFAULT_STOP_SIGNALS"]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped by a signal after writing a checkpoint
REPEAT_WINDOW_S = 2.0
DEFAULT_STOP_SIGNALS = "SIGTERM,SIGINT,SIGUSR1"


def parse_signals(spec: str) -> list[signal.Signals]:
    """``"SIGTERM,SIGINT,USR1"`` -> the signals (names with or without "SIG", or numbers); "" -> none.

    Raises:
        ValueError: an unknown name, or SIGKILL/SIGSTOP (which cannot be caught), naming ``--stop-signals``.
    """
    found = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name = part.upper() if part.upper().startswith("SIG") else "SIG" + part.upper()
        try:
            sig = signal.Signals(int(part)) if part.isdigit() else signal.Signals[name]
        except (KeyError, ValueError):
            raise ValueError(
                f"--stop-signals {spec!r}: {part!r} is not a signal name (e.g. SIGTERM,SIGINT,SIGUSR1)"
            ) from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"--stop-signals {spec!r}: {sig.name} cannot be caught")
        if sig not in found:
            found.append(sig)
    return found


class StopSignals:
    """A context manager that turns stop signals into a request the training loop polls.

    Args:
        spec: the signals, e.g. "SIGTERM,SIGINT,SIGUSR1" (see :func:`parse_signals`); "" installs nothing.

    Attributes:
        requested: the name of the first signal received ("SIGTERM"), or None.
        checkpoint: the newest checkpoint the run has (the loop keeps it current), named by a second signal.

    Handlers are installed only in the main thread (Python's rule) and the previous ones are restored on exit.
    """

    def __init__(self, spec: str = DEFAULT_STOP_SIGNALS):
        self.signals = parse_signals(spec)
        self.requested: str | None = None
        self.checkpoint = None
        self._first_at = 0.0
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _say(self, text: str) -> None:
        os.write(2, f"deepsim train: {text}\n".encode())  # os.write: safe inside a signal handler

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._first_at = name, now
            self._say(
                f"{name} received: finishing this step, writing a checkpoint, then exiting with status "
                f"{PREEMPTED_EXIT_CODE} (a second signal exits at once)"
            )
        elif now - self._first_at >= REPEAT_WINDOW_S:
            left = (
                f"the checkpoint {self.checkpoint} is intact"
                if self.checkpoint
                else "this run wrote no checkpoint"
            )
            self._say(f"second signal ({name}): exiting now without a new checkpoint; {left}")
            os._exit(128 + signum)
        # else: the same request delivered twice (terminal + torchrun, or scheduler + torchrun): ignored
