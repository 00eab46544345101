"""Freezing a child process to act on it "while it works" without racing it.

The tiny model answers in about a second, so a test that sees an answer start and then acts can
find it already over on a busy machine. Stopped (SIGSTOP), the program writes nothing more and
ends nothing: the test reads what it wrote so far, sees whether the answer is still running, and
only then acts (a signal sent now waits for SIGCONT) or drops the run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PENDING_WAIT_S = 120  # generous: a pass never waits for it


def stop(pid: int) -> None:
    """SIGSTOP `pid` and return once the kernel has stopped it (the stop is asynchronous), or
    once it has ended (a zombie, which no signal stops, until its parent waits for it)."""
    os.kill(pid, signal.SIGSTOP)
    stat = Path(f"/proc/{pid}/stat")
    while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t", "Z", "X"):
        pass


def resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def signal_pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits to be delivered to `pid` (a stopped process keeps it until SIGCONT)."""
    bit = 1 << (signum - 1)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & bit:
            return True
    return False


def interrupt_stopped(child) -> bool:
    """Press Ctrl-C (through the terminal driver) for a stopped pexpect `child` and return once the
    driver has turned it into a pending SIGINT; False if it did not (the key went to a program
    reading keys raw). The driver acts on the key later, on a kernel worker, and when it does it
    also discards what the program wrote that was not read yet: resumed before then, the program
    could write the rest of its answer and its stats line, all thrown away, and only then get the
    SIGINT, at the next prompt."""
    child.sendintr()
    deadline = time.monotonic() + PENDING_WAIT_S
    while not signal_pending(child.pid, signal.SIGINT):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


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
