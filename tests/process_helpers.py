"""Freezing a child process to act on it "while it works" without racing it.

The tiny model answers in about a second, so a test that sees an answer start and then acts can
find it already over on a busy machine. Stopped (SIGSTOP), the program writes nothing more and
ends nothing: the test reads what it wrote so far, sees whether the answer is still running, and
only then acts (a signal sent now waits for SIGCONT) or drops the run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def stop(pid: int) -> None:
    """SIGSTOP `pid` and return once the kernel has stopped it (the stop is asynchronous), or
    once it has ended (a zombie, which no signal stops, until its parent waits for it)."""
    os.kill(pid, signal.SIGSTOP)
    stat = Path(f"/proc/{pid}/stat")
    while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t", "Z", "X"):
        pass


def resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def read_waiting(fd: int) -> bytes:
    """Everything that can be read from `fd` now, without waiting (from a stopped writer: all it wrote)."""
    blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, blocking)
    return data
