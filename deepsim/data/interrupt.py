"""Stop signals during scans and downloads: :func:`interruptible` turns SIGINT, SIGTERM and SIGHUP into an
:class:`Interrupted` exception raised in the main thread, so that ``finally`` blocks clean up (a partial
download, a thread pool) and the command exits with ``128 + signal`` instead of scanning on or dying with
files left behind."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "interruptible", "uninterrupted", "STOP_SIGNALS"]

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
_depth = 0  # nesting of interruptible() blocks in the main thread
_held: list[int] | None = None  # inside uninterrupted(): the signals that arrived, raised at its end


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived during a scan or a download. ``signum``: the signal; ``exit_status``:
    128 + it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_status = 128 + signum
        super().__init__(f"stopped by {self.signal_name}")


@contextlib.contextmanager
def interruptible(signals: tuple[str, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, the first of ``signals`` raises :class:`Interrupted`; later ones are ignored until
    the block ends (so that its clean-up runs to the end). Signals the process ignores (``nohup``) stay
    ignored; the previous handlers are restored on exit. Only the outermost block of the main thread
    installs handlers (Python's rule); elsewhere it does nothing."""
    global _depth
    if threading.current_thread() is not threading.main_thread() or _depth:
        yield
        return
    raised = []

    def handle(signum, _frame):
        if _held is not None:
            _held.append(signum)
        elif not raised:
            raised.append(signum)
            raise Interrupted(signum)

    previous = {}
    for name in signals:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handle)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Within an :func:`interruptible` block: a stop signal that arrives inside this block (a few renames that
    must all happen) is raised when it ends, not in the middle."""
    global _held
    if threading.current_thread() is not threading.main_thread() or _held is not None:
        yield
        return
    _held = []
    try:
        yield
    finally:
        held, _held = _held, None
    if held:
        raise Interrupted(held[0])
