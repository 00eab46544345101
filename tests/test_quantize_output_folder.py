"""quantize's output folder and the permissions of what it writes, unit by unit (review fixes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from internvl_chat import files


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the umask through /proc")
def test_the_umask_is_read_without_setting_it(monkeypatch):
    """Reading the umask set it to 0 for a moment: a file another thread created then was
    world-writable (0666). Where /proc says it, it is read without touching it."""
    old = os.umask(0o027)
    try:
        def no_umask_change(mask):
            raise AssertionError(f"os.umask({mask:#o}) called: another thread's files get mode 0666 meanwhile")

        monkeypatch.setattr(files.os, "umask", no_umask_change)
        assert files.current_umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)
