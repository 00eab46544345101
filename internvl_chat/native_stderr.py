"""What native libraries write straight to file descriptor 2, kept off the terminal.

decord (its own "ERROR opening: PATH, …" line and notes), libtiff through Pillow ("ZIPDecode:
Decoding error at scanline 0, …") and the Rust side of `tokenizers` (a panic's message and
backtrace) write to fd 2 themselves, past Python: in the REPL that text lands inside the prompt
or the answer, in one-shot and `--script` runs among our one-line errors, and a file name in it
reaches the terminal unescaped. None of them has a switch for it (decord's log level covers
FFmpeg only; Pillow silences libtiff's warnings but not its errors; a Rust panic hook cannot be
set from Python).

`separate_python_stderr` gives Python's sys.stderr its own duplicate of fd 2, once, at the start
of a run of the terminal app; from then on `captured()` sends fd 2 to a private temporary file
while a library call runs, and only native writers are affected: everything the app prints
(another thread's included) goes through sys.stderr. Until then `captured()` changes nothing, so
a process that did not ask (`serve`, whose other threads log through fd 2; a library user) keeps
every line. Windows may nest and overlap across threads: fd 2 is the process's, so the first
window to open redirects it and the last to close puts it back.

A window closes itself on every way out of its block, a KeyboardInterrupt included, except one
that no code in it can catch: a signal handler (Ctrl-C's KeyboardInterrupt, the REPL's SystemExit
for SIGTERM) that raises at the first instruction of `captured.__exit__`, or between the block's
end and that call, leaves the window open and fd 2 on the private file for good (every later
native message lost, the file growing). So each window records the thread that opened it, and
the code that handles such an exception outside any window (the REPL after each input, cli.main
on its way out) calls `close_leftover_windows()`, which closes that thread's windows still open;
another thread's (a video worker's) stay open until they close themselves.
"""

from __future__ import annotations

import atexit
import io
import os
import tempfile
import threading
from typing import TextIO

EXCERPT_BYTES = 4096  # read back from a window at most; a library can write much more

_lock = threading.Lock()
_python_fd: int | None = None  # the terminal (or pipe) fd 2 was at the start, which sys.stderr now writes to
_sink: int | None = None  # where fd 2 points while a window is open
_open = 0  # windows open now, in all threads
_windows: set[captured] = set()  # those windows (and any an interrupt caught half-opened or half-closed)


class captured:  # noqa: N801 - used as a function: `with captured() as capture:`
    """fd 2 sent to a private file while the block runs (where the app asked for it), put back on
    every way out, exceptions and KeyboardInterrupt included; `data` holds what was written.
    (A class, not a generator: one opens for every encode of a message and every picture read.)"""

    __slots__ = ("data", "_start", "_entered", "_owner")

    def __init__(self) -> None:
        self.data = b""  # what reached fd 2 meanwhile (other threads' native writes included)
        self._start = 0  # the sink's size when the window opened
        self._entered = False  # counted in _open
        self._owner: int | None = None  # the thread that opened it, while it is in _windows

    def __enter__(self) -> captured:
        global _open
        if _python_fd is None or _sink is None:
            return self
        try:
            self._owner = threading.get_ident()
            # The counter and the flag change together, with no call between them: Python runs a
            # signal handler (KeyboardInterrupt) only as a call returns, at a function's start or at
            # a jump back, so the window is open and counted, or neither, wherever Ctrl-C comes. It
            # is in _windows before either (close_leftover_windows finds it, whichever came last).
            with _lock:
                self._start = os.fstat(_sink).st_size
                _windows.add(self)
                _open += 1
                self._entered = True
                if _open == 1:
                    os.dup2(_sink, 2)
        except OSError:
            self._close()  # fd 2 as it was: the call runs uncaptured
        except BaseException:
            self._close()  # `with` calls no __exit__ when __enter__ raises
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._close()
        except OSError:
            pass  # the call's own outcome matters more; fd 2 is back unless dup2 itself failed
        except BaseException:
            # a signal handler raised (Ctrl-C's KeyboardInterrupt, the REPL's SystemExit for SIGTERM)
            # before the window was uncounted: at _close's first instruction, or in the lock's
            # acquire that another thread's window made wait. Close it, then let it through. (Not
            # pthread_sigmask: a signal the main thread blocks goes to a thread that does not,
            # torch's or tokenizers' own, and the main thread's handler still runs. One that runs at
            # this method's own first instruction is out of any code's reach here: the code that
            # catches it calls close_leftover_windows.)
            try:
                self._close()
            except OSError:
                pass
            raise

    def _close(self) -> None:
        global _open
        if self._owner is None:  # never opened (no separate stderr), or closed
            return
        with _lock:
            try:
                if not self._entered:
                    return  # half-opened (interrupted or failed), or a second close
                # uncounted and fd 2 back before any other call: a Ctrl-C's handler runs as a call
                # returns, and raised from here it would leave the window counted (fd 2 on the sink
                # for the rest of the run, every later window included) until close_leftover_windows
                _open -= 1
                self._entered = False
                if _open == 0:
                    os.dup2(_python_fd, 2)
                end = os.fstat(_sink).st_size  # nothing more comes in once fd 2 is back (or others' writes)
                if end > self._start:
                    self.data = os.pread(_sink, min(end - self._start, EXCERPT_BYTES), self._start)
                if _open == 0 and end:
                    os.ftruncate(_sink, 0)
            finally:
                _windows.discard(self)  # uncounted by now, whatever raised
                self._owner = None

    def excerpt(self, limit: int = 160) -> str:
        """The first non-empty line, cut to `limit` characters, for a one-line error ('' if none).
        The caller escapes it (`files.visible`) like any text from a file."""
        for line in self.data.decode("utf-8", "replace").splitlines():
            line = " ".join(line.split())
            if line:
                return line if len(line) <= limit else line[: limit - 1] + "…"
        return ""


def close_leftover_windows() -> int:
    """Close the windows the calling thread opened that are still open (how many): those a signal
    handler's exception skipped the close of. Call it only where that thread has no window open by
    design, where such an exception is handled: the windows of other threads are left alone, and
    fd 2 comes back when none is left. Cheap when nothing is open."""
    if not _windows:
        return 0
    me = threading.get_ident()
    with _lock:
        mine = [window for window in _windows if window._owner == me]
    for window in mine:
        try:
            window._close()
        except OSError:
            pass  # fd 2 is back unless dup2 itself failed; nothing better to do here
    return len(mine)


def separate_python_stderr(stream: TextIO) -> TextIO:
    """`stream` (sys.stderr, on fd 2) again, writing to a duplicate of fd 2, which `captured()`
    leaves alone; `stream` itself if fd 2 cannot be duplicated (then windows change nothing).
    Call once, before anything holds on to sys.stderr; the result replaces it."""
    global _python_fd, _sink
    if _python_fd is not None:
        return stream
    try:
        if stream.fileno() != 2:
            return stream
        stream.flush()
        fd = os.dup(2)  # not inherited by child processes (PEP 446): theirs is fd 2 itself
    except (OSError, ValueError, AttributeError):  # no fileno (a test's capture), fd 2 closed
        return stream
    _sink = _temporary_sink()
    if _sink is None:
        os.close(fd)
        return stream
    _python_fd = fd
    # line-buffered text over a buffered writer (Python's own sys.stderr writes each write through:
    # here a piece without a newline waits for one or a flush, as rich and print(flush=True) give).
    # The fd stays open for the process's life (a window still open in a worker puts fd 2 back
    # from it), and what is left in the buffer is written at exit.
    separate = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(fd, "w", closefd=False)),
        encoding=getattr(stream, "encoding", None) or "utf-8",
        errors=getattr(stream, "errors", None) or "backslashreplace",
        line_buffering=True,
    )
    atexit.register(_flush, separate)
    return separate


def _flush(stream: TextIO) -> None:
    try:
        stream.flush()
    except (OSError, ValueError):
        pass  # stderr gone: nothing to tell it with


def _temporary_sink() -> int | None:
    """A private temporary file, unlinked at once (nothing is left behind), opened for appending:
    every write lands at its end, so emptying it between windows is safe. None where that fails."""
    try:
        import fcntl

        fd, name = tempfile.mkstemp(prefix="internvl-chat-stderr-")
    except (ImportError, OSError):  # no fcntl (Windows), no writable temporary folder
        return None
    try:
        os.unlink(name)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    except OSError:
        os.close(fd)
        return None
    return fd
