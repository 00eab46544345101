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


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file through /proc")
def test_a_staging_folder_whose_own_sync_fails_is_a_failed_write(tmp_path, monkeypatch):
    """The files' fsync failing (EIO) failed the run, the folder's was passed over (files.py's
    best-effort folder sync): the output appeared though the disk said its names might be lost."""
    import errno

    from internvl_chat.quantize import output_folder

    staging = tmp_path / ".out.x.partial"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    fsync = os.fsync

    def failing_for_folders(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_for_folders)
    with pytest.raises(OSError) as raised:
        output_folder.sync_staged(staging)
    assert raised.value.errno == errno.EIO


def test_a_staging_folder_on_a_file_system_that_cannot_sync_folders_is_fine(tmp_path, monkeypatch):
    import errno

    from internvl_chat.quantize import output_folder

    staging = tmp_path / ".out.x.partial"
    staging.mkdir()
    (staging / "config.json").write_text("{}")

    def unsupported(fd):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(os, "fsync", unsupported)
    output_folder.sync_staged(staging)


def test_an_empty_output_folder_made_during_the_run_is_back_after_a_ctrl_c_at_the_publish(tmp_path, monkeypatch):
    """The output did not exist when the run began, and an empty folder was made there meanwhile (a
    file manager, a script preparing it): the rename replaced it, and a Ctrl-C while the rename was
    synced took the output back and left no folder where the user had made one."""
    from internvl_chat.quantize import output_folder

    dst = tmp_path / "out"
    staging = output_folder.staging_folder(dst)
    (staging / "config.json").write_text("{}")
    dst.mkdir()
    os.chmod(dst, 0o750)

    def interrupted(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(output_folder, "_sync_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        output_folder.publish(staging, dst)
    assert dst.is_dir() and list(dst.iterdir()) == [] and (dst.stat().st_mode & 0o777) == 0o750
    assert [p.name for p in staging.iterdir()] == ["config.json"]  # for staged_output to remove


@pytest.mark.parametrize("data", [b"\xff\xfe" + bytes(200), b"\xff\xfeA\x00\x00\x00B\x00", b"\x00\x00\xfe\xff" + bytes(64)])
def test_binary_data_behind_a_byte_order_mark_is_refused(tmp_path, data):
    """Bytes that look like a UTF-16 or UTF-32 byte order mark skipped the binary-data check: FF FE
    and zeros were read as 2,000 NUL characters of calibration text."""
    from internvl_chat.errors import UsageError
    from internvl_chat.quantize.calibration import calibration_text

    (tmp_path / "notes.txt").write_bytes(data)
    with pytest.raises(UsageError, match=r"holds binary data, not text; .*UTF-8, or UTF-16 or UTF-32 with a byte order mark"):
        calibration_text(tmp_path / "notes.txt")


def test_a_second_ctrl_c_while_the_moved_files_are_taken_back_leaves_none(tmp_path, monkeypatch):
    """Staged inside an existing empty output, the files are moved up and, on an interrupt, taken
    back out: a second Ctrl-C during that (people press it twice) left the ones not yet removed in
    the user's folder."""
    import signal

    from internvl_chat.quantize import output_folder

    dst = tmp_path / "out"
    dst.mkdir()
    staging = output_folder.staging_folder(dst)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"):
        (staging / name).write_text(name)

    def interrupted(folder):
        raise KeyboardInterrupt

    unlink = Path.unlink

    def pressed_again(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, as a real second Ctrl-C
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(output_folder, "_sync_folder", interrupted)
    monkeypatch.setattr(Path, "unlink", pressed_again)
    with pytest.raises(KeyboardInterrupt):
        output_folder.publish(staging, dst)
    monkeypatch.undo()
    assert list(dst.iterdir()) == []


def test_a_second_ctrl_c_while_the_rename_is_taken_back_leaves_no_output(tmp_path, monkeypatch):
    """A Ctrl-C while the renamed output's folder is synced takes the rename back: a second one
    just before that (people press it twice) left the whole output, though the run said it stopped."""
    import signal

    from internvl_chat.quantize import output_folder

    dst = tmp_path / "out"
    staging = output_folder.staging_folder(dst)
    (staging / "config.json").write_text("{}")
    rename = os.rename

    def pressed_again(source, target):
        if Path(target) == staging:
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, as a real second Ctrl-C
        return rename(source, target)

    def interrupted(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(output_folder, "_sync_folder", interrupted)
    monkeypatch.setattr(output_folder.os, "rename", pressed_again)
    with pytest.raises(KeyboardInterrupt):
        output_folder.publish(staging, dst)
    monkeypatch.undo()
    assert not dst.exists() and staging.is_dir()


def test_a_ctrl_c_handled_as_the_rename_returns_leaves_no_output(tmp_path, monkeypatch):
    """Python handles a signal that came during a call as the call returns: a Ctrl-C during the
    publish's rename was raised after it, outside the part that takes it back, and the run said it
    stopped with the whole output in place."""
    from internvl_chat.quantize import output_folder

    dst = tmp_path / "out"
    staging = output_folder.staging_folder(dst)
    (staging / "config.json").write_text("{}")
    rename = os.rename

    def interrupted_as_it_returns(source, target):
        rename(source, target)
        if Path(target) == dst:
            raise KeyboardInterrupt

    monkeypatch.setattr(output_folder.os, "rename", interrupted_as_it_returns)
    with pytest.raises(KeyboardInterrupt):
        output_folder.publish(staging, dst)
    monkeypatch.undo()
    assert not dst.exists() and staging.is_dir()


def test_a_rename_that_fails_takes_nothing_back(tmp_path):
    """A folder that is no longer empty at the output (another run) makes the rename fail: one
    line, and that folder is left as it is."""
    from internvl_chat.errors import UsageError
    from internvl_chat.quantize import output_folder

    dst = tmp_path / "out"
    staging = output_folder.staging_folder(dst)
    (staging / "config.json").write_text("{}")
    dst.mkdir()
    (dst / "theirs.txt").write_text("theirs")
    with pytest.raises(UsageError, match="cannot create the output"):
        output_folder.publish(staging, dst)
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"] and staging.is_dir()


def test_a_failed_move_whose_files_cannot_be_taken_back_names_both(tmp_path, monkeypatch):
    """A move into an existing empty output failed (an I/O error), and the file moved before it could
    not be taken back out: the unlink's error replaced the move's, and no word said a file stayed."""
    from internvl_chat.errors import UsageError, user_notes
    from internvl_chat.quantize import output_folder

    dst = tmp_path / "out"
    dst.mkdir()
    staging = output_folder.staging_folder(dst)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        (staging / name).write_text(name)
    rename, unlink, calls = os.rename, Path.unlink, []

    def failing_second(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return rename(source, target)

    def stuck(self, *args, **kwargs):
        if self.exists():
            raise PermissionError(13, "Permission denied", str(self))
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(output_folder.os, "rename", failing_second)
    monkeypatch.setattr(Path, "unlink", stuck)
    with pytest.raises(UsageError, match=r"cannot create the output .* \(Input/output error\)") as failed:
        output_folder.publish(staging, dst)
    assert user_notes(failed.value) == [f"error: 1 file moved into the output {dst} could not be taken back out "
                                        "(Permission denied); delete the files in it yourself"]
