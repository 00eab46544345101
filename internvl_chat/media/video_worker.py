"""The Ctrl-C-safe decoding worker: decoding runs on a worker thread that checks a stop flag before
each frame, while the caller waits in a way Ctrl-C (or a cancel event) interrupts at once, even
while FFmpeg is busy in C code."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from ..errors import Cancelled
from ..threads import start_worker

T = TypeVar("T")


class DecodeStopped(Exception):
    """The caller was interrupted: stop decoding at the next frame."""


class DecodeStop:
    """What the decoding worker checks before each frame: set by the thread waiting for it
    (Ctrl-C), or the caller's cancel event (a `serve` client gone), seen at once by the worker."""

    def __init__(self, cancel: threading.Event | None = None) -> None:
        self._own, self._cancel = threading.Event(), cancel

    def set(self) -> None:
        self._own.set()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._cancel is not None and self._cancel.is_set())


def interruptible(work: Callable[[DecodeStop], T], cancel: threading.Event | None = None) -> T:
    """Run `work(stop)` on a worker thread and wait for it in a way Ctrl-C (or `cancel`) interrupts.

    FFmpeg and decord spend long stretches in C, where Python cannot raise KeyboardInterrupt. The
    waiting thread can: it sets `stop` (the worker quits before its next frame) and re-raises
    at once, leaving the worker to finish the frame it is on by itself. `cancel` set (a `serve`
    client gone, the server stopping) ends the wait the same way, with Cancelled.
    """
    stop = DecodeStop(cancel)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work(stop)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = e

    cancelled = Cancelled("cancelled while the video was decoded")
    try:
        # inside the try: a Ctrl-C sent while the worker starts is raised as start_worker unblocks
        # signals, and the worker, already running, must be told to stop then too
        worker = start_worker(run, "video-decode")
        while worker.is_alive():
            worker.join(0.2)  # short waits: a signal that comes anyway is seen soon
            if stop.is_set():
                raise cancelled
    except BaseException:
        stop.set()
        raise
    if stop.is_set():  # the worker stopped for `cancel` before the first wait
        raise cancelled
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
