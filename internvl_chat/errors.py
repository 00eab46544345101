"""The error types every layer raises; each message is one sentence that says what to do.

The CLI maps `exit_code` to the process status: 2 for bad usage or input, 1 for everything else.
"""

import argparse
import signal

from .numbers import parse_float, parse_int


class InternVLChatError(Exception):
    """Base class: a failure the user can act on. `str(err)` is the one-line message."""

    exit_code = 1


class UsageError(InternVLChatError):
    """Bad flags, commands or settings."""

    exit_code = 2


class CheckpointError(InternVLChatError):
    """A model folder that is missing, incomplete, or of a layout we do not support."""

    exit_code = 2


class MediaError(InternVLChatError):
    """An image or video that cannot be read or used."""

    exit_code = 2


class ContextOverflowError(InternVLChatError):
    """A turn that would not fit in the KV cache; the session is left unchanged."""

    exit_code = 2


class GenerationError(InternVLChatError):
    """Generation failed (non-finite logits, out of memory); the session is left consistent."""

    exit_code = 1


class RemoteError(InternVLChatError):
    """A remote server refused, failed or could not be reached; the conversation is left as it was."""

    exit_code = 1


class Cancelled(Exception):
    """Work stopped before an answer began because its caller set the cancel event (a client that
    went away, a server that is stopping); the session is left as it was. Not an
    InternVLChatError: nothing failed."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are a UsageError: one line through the CLI's error handling (exit 2),
    shown inert. Its own error printed the whole usage block, and an unknown flag as typed, escape
    sequences and all. A flag of type int or float takes what numbers.py does: no `--frames ٨` (8) nor `1_0` (10)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the action's type stays int or float (argparse's "invalid int value: 'x'"): only its conversion is looked up
        self.register("type", int, parse_int)
        self.register("type", float, parse_float)

    def error(self, message: str):
        raise UsageError(f"{message}; see {self.prog} --help")


class EndedBySignal(BaseException):
    """SIGTERM (`kill`, `timeout`) or SIGHUP (a closed terminal) ending a one-shot or --script run
    where it is, as Ctrl-C's KeyboardInterrupt does: a BaseException, so no `except Exception` on
    the way swallows it, and every `finally` and clean-up runs (a temp file removed, a line ended)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def add_user_note(error: BaseException, line: str) -> None:
    """A line to tell after `error`'s own, as it is (cli.main): cleaning up after a Ctrl-C or a failed
    write can fail too, and its error replaced the first one (the user read "cannot create the
    output", not that they had stopped the run) or went unsaid."""
    error.user_notes = [*user_notes(error), line]  # type: ignore[attr-defined]


def user_notes(error: BaseException) -> list[str]:
    return list(getattr(error, "user_notes", ()))


def replace_signal_handlers(signums, handler) -> dict:
    """`handler` for each of `signums` but one ignored (nohup, a background job: it stays ignored) or
    set outside Python (getsignal's None, which signal.signal could not put back); the handlers
    replaced, to put back."""
    replaced = {}
    for signum in signums:
        previous = signal.getsignal(signum)
        if previous is not signal.SIG_IGN and previous is not None:
            replaced[signum] = signal.signal(signum, handler)
    return replaced


def put_back_signal_handlers(handlers: dict) -> None:
    """Put `handlers` (signum -> handler, as `replace_signal_handlers` returns them) back, all of
    them, even when a signal lands meanwhile: delivered in the loop, it ran the handler being
    replaced, whose raise ended the loop and left the others in place (a stop handler of an answer
    long over then raised later, outside every handler of the program: a traceback). The signals
    are held (blocked) in this thread meanwhile, so one that lands reaches the handler put back;
    one that another thread takes (its Python handler still runs here) is raised once all are back."""
    raised: BaseException | None = None
    held = None
    if handlers and hasattr(signal, "pthread_sigmask"):
        # pthread_sigmask runs the Python handlers of signals caught before it (PyErr_CheckSignals):
        # a stop handler's raise comes out of the call itself. The mask is read first (nothing
        # changed when that raises) and put back in the `finally`, whichever call raised
        while held is None:
            try:
                held = signal.pthread_sigmask(signal.SIG_BLOCK, [])
            except BaseException as e:  # noqa: BLE001 - raised again below, once every handler is back
                raised = raised or e
    try:
        if held is not None:
            try:
                signal.pthread_sigmask(signal.SIG_BLOCK, list(handlers))
            except BaseException as e:  # noqa: BLE001 - blocked all the same; raised once every handler is back
                raised = raised or e
        todo = list(handlers.items())
        while todo:
            try:
                while todo:
                    signal.signal(*todo[0])
                    del todo[0]
            except BaseException as e:  # noqa: BLE001 - raised again below, once every handler is back
                raised = raised or e
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal held meanwhile is delivered now
    if raised is not None:
        raise raised
