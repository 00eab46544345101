"""The output folder, complete or not at all: the checkpoint is written to a hidden staging folder
next to a new output folder and renamed to it at the end, or inside an existing empty one and its
files moved up at the end, config.json last; every file is synced to the disk first (a power cut
after the run must not leave a complete-looking output with empty weight files). A failed or interrupted run removes what it made (the
staging folder, and the folders above the output that it created), with Ctrl-C, SIGTERM and SIGHUP ignored meanwhile;
a staging folder left by a run that was killed outright is named when its folder is given again."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError, add_user_note, user_notes
from ..files import _sync_folder, current_umask, visible


@contextmanager
def staged_output(dst: Path) -> Iterator[Path]:
    """The staging folder for `dst` (`staging_folder`), removed with the folders it made above `dst`
    if the work inside fails or is interrupted."""
    new_parents = _missing_parents(dst)
    try:
        staging = staging_folder(dst)
    except BaseException:
        _remove_empty(new_parents)
        raise
    try:
        yield staging
    except BaseException as ending:
        with _no_second_interrupt():
            left = _remove_staging(staging)
            _remove_empty(new_parents)
        if left:
            add_user_note(ending, left)
        raise


def _remove_staging(staging: Path) -> str | None:
    """Remove the staging folder; what to tell the user where it stays. It was removed with errors
    ignored: a checkpoint's size stayed, hidden, and the run said only that it had stopped."""
    try:
        shutil.rmtree(staging)
    except OSError as e:  # also where it is gone: published and not taken back (publish says so)
        shutil.rmtree(staging, ignore_errors=True)  # what can go, goes
        if os.path.lexists(staging):
            return (f"error: could not remove the partial output {visible(str(staging))}, left by this run "
                    f"({e.strerror or e}); delete it yourself")
    return None


def _staging_prefix(dst: Path) -> str:
    """The staging folder's name up to its random part: `dst`'s name, cut to 100 bytes. Whole, a
    valid name of 238 bytes or more made one over the file system's 255, and the output was
    refused as 'File name too long'."""
    name = dst.name
    while len(os.fsencode(name)) > 100:
        name = name[:-1]
    return f".{name}."


def staging_folder(dst: Path) -> Path:
    """Refuse an output folder we cannot use, before any work, and make the hidden folder that the
    checkpoint is written to: next to a new `dst` (renamed to it when complete), inside an empty
    one. Renaming over an existing folder failed at the end of the run where it is a mount point (a
    fresh disk: the checkpoint had been written to the disk above it) or its parent is not ours."""
    shown = visible(str(dst))
    where = dst
    try:
        if dst.is_symlink():
            raise UsageError(f"output {shown} is a symlink; give a new folder")
        if dst.exists():
            if not dst.is_dir():
                raise UsageError(f"output {shown} exists and is not a folder; choose a new output folder")
            entries = sorted(p.name for p in dst.iterdir())
            if entries and all(name.startswith(_staging_prefix(dst)) and name.endswith(".partial") for name in entries):
                # a run killed outright (SIGKILL, out of memory) leaves its hidden staging folder; `ls` shows nothing
                raise UsageError(f"output {shown} holds only {visible(entries[0])}, left by a quantize run that was killed "
                                 "(or is still running); delete it, or choose a new output folder")  # fmt: skip
            if entries:
                raise UsageError(f"output {shown} exists and is not empty; choose a new output folder")
        else:
            where = dst.parent
            where.mkdir(parents=True, exist_ok=True)
            left = _left_staging_folders(where, dst)
            if left:  # a checkpoint's size, hidden from `ls`, and nothing else said so; a second run would end at the rename
                raise UsageError(f"{visible(str(where / left[0]))} was left by a quantize run for {shown} that was killed "
                                 "(or is still running); delete it, or choose a new output folder")  # fmt: skip
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(dst), suffix=".partial", dir=where))
        _share_like_the_umask(staging)
    except UsageError:
        raise
    except OSError as e:  # named by the user's paths, never the staging folder's
        blocking = _file_above(dst)
        if blocking is not None:  # mkdir's own words were "File exists" or "Not a directory"
            raise UsageError(f"cannot write the output {shown}: {visible(str(blocking))} is not a folder; "
                             "choose another output folder") from None  # fmt: skip
        inside = "" if where == dst else f" in {visible(str(where))}"
        raise UsageError(f"cannot write the output {shown}{inside} ({e.strerror or e}); "
                         "choose a folder you can write to") from None  # fmt: skip
    return staging


def _share_like_the_umask(staging: Path) -> None:
    """The umask's permissions on the staging folder (mkdtemp makes it private; the checkpoint should
    not be); where the file system refuses them (a FAT stick whose mount fixes the modes), the folder
    is removed again: it was left behind, with a traceback."""
    try:
        os.chmod(staging, 0o777 & ~current_umask())
    except OSError:
        os.rmdir(staging)
        raise


def _left_staging_folders(where: Path, dst: Path) -> list[str]:
    """The staging folders for `dst` in `where` (mkdtemp's random part holds no dot: one for `out.v2`
    is not taken for one of `out`), by name."""
    prefix = _staging_prefix(dst)
    try:
        names = os.listdir(where)
    except OSError:  # a folder one may write in but not list (mode 0333): the staging folder can still be made
        return []
    return sorted(name for name in names
                  if name.startswith(prefix) and name.endswith(".partial") and "." not in name[len(prefix):-len(".partial")])  # fmt: skip


def sync_staged(staging: Path) -> None:
    """Every file of the finished staging folder, and the folder itself, on the disk before it is
    published: renamed unsynced, a power cut or a crash of the machine soon after the run said "wrote
    DST" could leave a complete-looking output (config.json and all) whose weight files were empty or
    cut short, which then failed to load. OSError (EIO, a full network disk) propagates: the run failed,
    the folder's own sync's too (files.py's best-effort folder sync passed an EIO over, and the
    output appeared though the disk had said its file names might be lost)."""
    for path in sorted(staging.iterdir()):
        _fsync(path, os.O_RDONLY)
    _fsync(staging, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system that cannot sync: written is all it does
            raise
    finally:
        os.close(fd)


def publish(staging: Path, dst: Path) -> None:
    """Rename the finished (and synced, `sync_staged`) staging folder to `dst`, or, staged inside
    `dst`, move its files there with config.json last (a folder without it is no checkpoint),
    taking them back out if a move fails or is interrupted; then sync the folder that changed, so the
    rename itself is on the disk."""
    moved: list[Path] = []
    try:
        if staging.parent != dst:
            # an empty folder made at `dst` during the run is replaced by the rename: taken back, it is made again
            replaced = _empty_folder_mode(dst)
            try:
                os.rename(staging, dst)  # an interrupt handled as it returns comes after the rename: taken back too
                _sync_folder(dst.parent)  # may take a while on a busy disk: Ctrl-C then must leave nothing, as before the rename
            except BaseException as ending:
                if os.path.lexists(staging):  # the rename itself failed: nothing to take back
                    raise
                with _no_second_interrupt():  # a second Ctrl-C before the rename back left the whole output
                    stays = _take_back_rename(staging, dst, replaced)
                if stays:  # its error replaced the interrupt ("cannot create the output"), though the output was whole
                    add_user_note(ending, stays)
                raise
            return
        if [p.name for p in dst.iterdir()] != [staging.name]:  # a move would replace (and mix with) what is there now
            raise UsageError(f"output {visible(str(dst))} is no longer empty (another run writing to it?); choose a new output folder")
        try:
            for entry in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
                moved.append(dst / entry.name)  # before the move: an interrupt right after it must not leave it
                os.rename(entry, dst / entry.name)
            os.rmdir(staging)
            _sync_folder(dst)
        except BaseException as ending:
            with _no_second_interrupt():  # a second Ctrl-C here left the weight files moved so far in the user's folder
                stays = _take_back_out(moved, dst)
            if stays:  # the unlink's error replaced the interrupt, and did not say what stayed
                add_user_note(ending, stays)
            raise
    except OSError as e:
        failed = UsageError(f"cannot create the output {visible(str(dst))} ({e.strerror or e}); choose a new output folder")
        for note in user_notes(e):  # what its clean-up left, said too
            add_user_note(failed, note)
        raise failed from None


def _take_back_rename(staging: Path, dst: Path, replaced: int | None) -> str | None:
    """Rename the published output back to the staging folder, for staged_output to remove, and make
    again the empty folder (mode `replaced`) that the rename replaced; what to tell the user where
    the output stays."""
    try:
        os.rename(dst, staging)
    except OSError as e:
        return (f"error: the output {visible(str(dst))} was already written whole and stays: it could not be taken back "
                f"({e.strerror or e}); delete it if you do not want it")
    if replaced is not None:
        try:
            os.mkdir(dst)
            os.chmod(dst, replaced)
        except OSError:  # best effort: the interrupt is what the run reports
            pass
    return None


def _take_back_out(moved: list[Path], dst: Path) -> str | None:
    """Remove the files moved up into `dst`, every one that can be; what to tell the user where some stay."""
    failures: list[OSError] = []
    for path in moved:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            failures.append(e)
    if not failures:
        return None
    count = f"{len(failures)} file{'s' if len(failures) > 1 else ''}"
    return (f"error: {count} moved into the output {visible(str(dst))} could not be taken back out "
            f"({failures[0].strerror or failures[0]}); delete the files in it yourself")


def _empty_folder_mode(path: Path) -> int | None:
    """The permissions of a folder (not a link to one) at `path`, None where there is none."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return stat.S_IMODE(info.st_mode) if stat.S_ISDIR(info.st_mode) else None


@contextmanager
def _no_second_interrupt() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP ignored while a failed or interrupted run cleans up: pressed again
    (people do), or a `kill` after a Ctrl-C, it cut the removal of the staging folder short and
    left part of it, a checkpoint's size, behind. (command.py's `_end_on_signal` ignores a second
    SIGTERM or SIGHUP after the first too.)"""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    stop_signals = [signal.SIGINT] + [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in stop_signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: not set from Python


def _file_above(dst: Path) -> Path | None:
    """The nearest path above `dst` that exists and is no folder (a file, a device), if that is what stops it."""
    for parent in dst.parents:
        if os.path.lexists(parent):
            return None if parent.is_dir() else parent
    return None


def _missing_parents(dst: Path) -> list[Path]:
    """The folders above `dst` that do not exist yet, deepest first: the staging folder's creation
    makes them, and a failed run removes them again (it left `a/b/` behind for `a/b/out`)."""
    missing = []
    for parent in dst.parents:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; one that is no longer empty is someone else's now
        try:
            os.rmdir(folder)
        except OSError:
            return
