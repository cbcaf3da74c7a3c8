"""The time limit of a benchmark group: a ``BaseException`` raised by SIGALRM, and the seconds left.

Why a ``BaseException``: torch.compile catches ``Exception`` in many places (inductor's compile workers,
its CPU feature probes, Dynamo's fallbacks), so a timeout raised as an ``Exception`` inside a compile is
swallowed. Measured with a ``GroupTimeout(Exception)``: a group given 25 s ran 77 to 118 s and
reported "ok", and one swallowed alarm made inductor conclude that the CPU had no vector extensions (its
probe failed), which slowed the compiled step measured after it. ``except Exception`` does not catch a
``BaseException``, so the timeout reaches the harness. The alarm also repeats every few seconds until the
limited block ends, in case some code catches ``BaseException`` and goes on.

Where SIGALRM cannot be used (not the main thread, not Unix) the limit only sets :func:`seconds_left`;
bench/gpu.sh also runs every phase under ``timeout --kill-after``, a hard kill for code that never
returns to the interpreter (a hung CUDA call). What a group measured before either stop is kept: the
harness writes results.json after every row.
"""

from __future__ import annotations

import signal
import time

__all__ = ["GroupTimeout", "seconds_left", "time_limit"]

REPEAT_S = 5.0  # the alarm fires again this often until the limited block has ended

_deadline: float | None = None  # time.monotonic() at which the innermost active limit ends


class GroupTimeout(BaseException):
    """A benchmark group ran past its time limit (``--group-timeout``); see the module docstring for why
    this is a ``BaseException``."""


def seconds_left() -> float | None:
    """Seconds until the active group's limit (negative once past it), or None without a limit: a group
    asks before starting a variant that it knows to be long (e.g. an autotuning compile)."""
    return None if _deadline is None else _deadline - time.monotonic()


class time_limit:
    """``with time_limit(seconds, "group step"):`` raises :class:`GroupTimeout` in the block once
    ``seconds`` have passed (again every :data:`REPEAT_S` s while it goes on). ``seconds`` None or 0: no
    limit; negative: the limit is already spent. Not re-entrant across threads; an inner limit replaces the
    outer one until it ends."""

    def __init__(self, seconds: float | None, what: str = "block"):
        self.seconds, self.what = seconds, what
        self.armed = False
        self.done = False

    def _fire(self, signum, frame):
        if self.done:  # the block is ending: let it end
            return
        raise GroupTimeout(f"{self.what} ran past its {self.seconds:g} s limit")

    def __enter__(self):
        global _deadline
        if not self.seconds:
            return self
        seconds = max(float(self.seconds), 1e-3)  # a limit already spent fires at once
        self.outer_deadline, self.started = _deadline, time.monotonic()
        _deadline = self.started + seconds
        if hasattr(signal, "SIGALRM"):
            try:
                self.previous = signal.signal(signal.SIGALRM, self._fire)
                self.previous_timer = signal.setitimer(signal.ITIMER_REAL, seconds, REPEAT_S)
                self.armed = True
            except ValueError:  # not the main thread: the deadline is still readable
                pass
        return self

    def __exit__(self, *exc):
        global _deadline
        self.done = True  # first: an alarm arriving from here on does nothing
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
            remaining, interval = self.previous_timer
            if remaining > 0:  # an outer alarm was pending: give it back what it has left
                left = max(remaining - (time.monotonic() - self.started), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, left, interval)
        if self.seconds:
            _deadline = self.outer_deadline
        return False
