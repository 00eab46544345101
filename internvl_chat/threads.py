"""Worker threads that leave the process's signals to the main thread.

The kernel hands a signal sent to the process (Ctrl-C, Ctrl-Z, `fg`, a resize, kill) to any of
its threads that does not block it, and Python runs the handler only in the main thread, at its
next bytecode. When a worker takes the signal while the main thread waits in a read (a remote
server between two pieces of the answer), the handler waits for that read: a Ctrl-C is not seen
until more of the answer comes. Our workers block these signals, so the main thread gets them
and its read is interrupted.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# what a terminal, a shell or a service manager sends (faults like SIGSEGV stay with their thread)
PROCESS_SIGNALS = frozenset(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGTSTP", "SIGCONT", "SIGWINCH", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)


@contextmanager
def process_signals_blocked() -> Iterator[None]:
    """PROCESS_SIGNALS blocked in this thread for the block, so that a thread a library starts
    inside it (rich's refresh thread of a spinner) inherits the mask; one sent meanwhile is
    handled as the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    # read first: pthread_sigmask runs the handlers of signals caught before it, and a Ctrl-C's
    # raise out of the blocking call itself left them blocked in this thread for good
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # one sent meanwhile is handled now


def start_worker(target: Callable[[], object], name: str) -> threading.Thread:
    """Start a daemon thread running `target` with PROCESS_SIGNALS blocked from its first
    instruction (a thread inherits the mask of the thread that starts it)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    with process_signals_blocked():
        thread.start()
    return thread
