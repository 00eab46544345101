"""Worker threads leave the process's signals to the main thread (threads.py)."""

from __future__ import annotations

import os
import signal

import pytest

from internvl_chat.threads import PROCESS_SIGNALS, start_worker

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs POSIX signal masks")


def test_a_worker_blocks_the_process_signals_and_the_starter_keeps_its_mask():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    seen = {}
    worker = start_worker(lambda: seen.update(mask=signal.pthread_sigmask(signal.SIG_BLOCK, [])), "probe")
    worker.join(60)
    assert worker.daemon and worker.name == "probe"
    assert PROCESS_SIGNALS <= seen["mask"]
    assert {signal.SIGSEGV, signal.SIGPIPE}.isdisjoint(seen["mask"] - before)  # faults stay with their thread
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def _blocked_in(thread) -> set[int]:
    """The signals `thread` blocks, from its /proc status (another thread's mask has no call)."""
    with open(f"/proc/self/task/{thread.native_id}/status") as status:
        mask = int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)
    return {signum for signum in range(1, 65) if mask >> (signum - 1) & 1}


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc")
def test_a_spinners_refresh_thread_leaves_the_process_signals_to_the_main_thread():
    """rich's status starts a thread of its own to spin: it did not block the process's signals, so
    a Ctrl-C or Ctrl-Z the kernel gave it while the app waited for a server's first piece was
    handled only once that piece came."""
    import io

    from rich.console import Console

    from internvl_chat.ui.spinner import spin

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    console = Console(file=io.StringIO(), force_terminal=True, width=40)
    with spin(console, "thinking …") as status:
        refresh = status._live._refresh_thread
        assert refresh is not None and refresh.is_alive()
        assert {int(s) for s in PROCESS_SIGNALS} <= _blocked_in(refresh)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_a_ctrl_c_handled_as_the_mask_is_set_leaves_the_starters_mask_as_it_was(monkeypatch):
    # pthread_sigmask runs the Python handlers of signals already caught (PyErr_CheckSignals) right
    # after it blocks them: a Ctrl-C's KeyboardInterrupt came out of the SIG_BLOCK call, before the
    # `try` that puts the mask back, and the main thread kept Ctrl-C, Ctrl-Z, SIGTERM and resizes
    # blocked for the rest of the run (an editor it started inherited them blocked)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    real = signal.pthread_sigmask
    started = []

    def sigmask(how, mask):
        previous = real(how, mask)
        if how == signal.SIG_BLOCK and set(mask) == set(PROCESS_SIGNALS):
            raise KeyboardInterrupt  # the handler of a Ctrl-C caught just before
        return previous

    monkeypatch.setattr(signal, "pthread_sigmask", sigmask)
    try:
        with pytest.raises(KeyboardInterrupt):
            start_worker(lambda: started.append(True), "probe")
    finally:
        monkeypatch.undo()
        left = real(signal.SIG_SETMASK, before)
    assert left == before and not started
