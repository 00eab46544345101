"""Worker threads leave the process's signals to the main thread (threads.py)."""

from __future__ import annotations

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

