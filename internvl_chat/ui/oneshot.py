"""One-shot mode: one question, the answer streamed as raw text to stdout, stats to stderr.

Ctrl-C, SIGTERM or SIGHUP once the answer has begun stop it between tokens: the text so far is
kept (its line ended; with --json the object is printed, finish_reason "cancelled"), one line on
stderr says why it stopped, and the status is 128 + the signal (130, 143, 129; `timeout` sends
SIGTERM). Before that they act as anywhere else (nothing to keep yet). Ignored ones stay ignored.
One that lands while a write to stdout waits on its reader (a reader that stopped reading, its
pipe full; a terminal paused with Ctrl-S), or a second one, ends the run at once with the same line
and status: stopping between tokens waited there for the reader, for good. So does one whose
stop's last writes (the line end, the --json object) would wait so. One that lands in a write
that does not wait lets it finish and stops at the next token as above."""

from __future__ import annotations

import argparse
import codecs
import json
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from ..errors import InternVLChatError, UsageError, put_back_signal_handlers, replace_signal_handlers
from ..files import OutputFailed, real_path, silence_stdout, visible
from ..settings import Settings
from .answer_text import AnswerCleaner
from .media_paths import not_attached_lines, not_sent, only_missing_paths, take_media_paths
from .paths import media_kind
from .peak_memory import peak_memory
from .setup import media_from_flags, open_conversation
from .summary_lines import format_stats


# json.dumps escapes C0 controls (ESC included); on a terminal the answer's DEL, C1 controls and
# bidi overrides are written as \u escapes too: the same JSON, nothing that drives or reorders the screen.
_JSON_FOR_TERMINAL = {c: f"\\u{c:04x}" for c in [0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def run_oneshot(args: argparse.Namespace, settings: Settings, prompt: str) -> int:
    session = open_conversation(settings)
    session.commands = False  # no REPL here: a refusal names flags (--max-new-tokens), not /clear or /set
    media = media_from_flags(session, args, settings)
    typed = " ".join(([args.prompt_flag] if args.prompt_flag else []) + ([" ".join(args.prompt)] if args.prompt else []))
    if settings.media.auto_attach and typed and prompt.endswith(typed):
        # a media path typed in the prompt is attached and left out of the text, as in the REPL
        # (text piped on stdin, which comes first, is data: it is left alone)
        text, paths, missing = take_media_paths(typed)
        if only_missing_paths(text, missing) and prompt == typed:  # piped text is a question of its own
            raise UsageError(not_sent(missing))
        prompt = prompt[: len(prompt) - len(typed)] + text
        for line in not_attached_lines(missing):
            print(f"internvl-chat: warning: {line}", file=sys.stderr)
        known = {real_path(m.path) for m in media}
        for path in paths:
            if real_path(path) not in known:
                kind = media_kind(path)
                media.append(session.describe_video(path, settings.media.frames) if kind == "video"
                             else session.describe_image(path, settings.media.max_tiles))  # fmt: skip
    try:
        return _answer(args, settings, session, prompt, media)
    except _StoppedWhileWriting as e:
        # what stdout still holds in its buffer would wait on that reader again as the program exits
        silence_stdout()
        print(f"internvl-chat: {_stopped_note(e.signum)}", file=sys.stderr)
        return 128 + e.signum


def _answer(args: argparse.Namespace, settings: Settings, session, prompt: str, media: list) -> int:
    """The answer streamed (or its --json object printed), then the lines for stderr; the status."""
    final = None
    # raw text for pipes; a terminal must not receive the model's control characters (its \r are line breaks)
    clean = AnswerCleaner() if sys.stdout.isatty() else None
    wrote = False
    cancel, stopped_by, parts = threading.Event(), [], []  # stopped_by: the signals that stopped the answer
    writing = threading.Event()  # set while stdout is written: a stop signal then ends the run at once
    handlers = None
    try:
        for event in session.ask(prompt, media, cancel=cancel):
            parts.append(event["text"])
            if handlers is None:  # the answer has begun: a signal now keeps what came
                handlers = _stop_on_signals(cancel, stopped_by, writing)
            if not args.json and event["text"]:
                wrote = True
                _write_out(clean.feed(event["text"]) if clean else event["text"], writing, stopped_by)
            if event["finish_reason"] is not None:
                final = event
    except (InternVLChatError, KeyboardInterrupt):
        if wrote:  # the partial answer's line is ended: the error line (stderr) must not continue it
            with suppress(OutputFailed):
                _write_out("\n", writing, stopped_by)
        raise
    else:
        info, timing = _end_the_answer(args, session, final, parts, clean, writing, stopped_by)
    finally:
        # only now, the answer's line ended (or the --json object out): main's handlers, put back at
        # the last token, ended the run there with "stopped by SIGTERM" continuing the answer's line
        put_back_signal_handlers(handlers or {})  # all of them, even when a second signal comes meanwhile
    if final.get("notice"):  # e.g. a video cut short, sampled from the frames it holds
        print(f"internvl-chat: note: {visible(final['notice'])}", file=sys.stderr)
    if stopped_by:  # the text so far is out, its line ended; no stats for an answer cut short
        print(f"internvl-chat: {_stopped_note(stopped_by[0])}", file=sys.stderr)
        return 128 + stopped_by[0]
    broken = final["finish_reason"] == "error"  # a server's answer broke off: what came is out, but it failed
    if final.get("note"):  # the client stopped the answer (chat/answer_bounds.py): the text is cut
        print(f"internvl-chat: {'error' if broken else 'warning: stopped'}: {final['note']}", file=sys.stderr)
    elif final["finish_reason"] == "length" and not args.json:  # --json says so in finish_reason
        # the text alone on stdout cannot tell a cut answer from a whole one (the REPL says it too)
        print(f"internvl-chat: warning: {_why_cut(session, info.more_room)}", file=sys.stderr)
    if settings.ui.stats and not args.json:
        device = info.memory_device  # None: the model runs elsewhere, its memory is not ours to show
        width = os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else None
        peak = peak_memory(device) if device is not None else None
        stats = format_stats(timing, final["usage"], session.context_used, session.max_context, peak, device,
                             width=width, approximate=not session.token_counts_exact)  # fmt: skip
        print(stats, file=sys.stderr)
    return 1 if broken else 0


def _end_the_answer(args: argparse.Namespace, session, final: dict, parts: list[str], clean: AnswerCleaner | None,
                    writing: threading.Event, stopped_by: list[int]):
    """The answer's line ended, or its --json object printed; returns the backend's info and the timing."""
    rest = clean.finish() if clean is not None and not args.json else ""
    info = session.describe()
    timing = dict(final["timing"], load_s=info.load_s)  # load_s: the model's load, or the server handshake
    if args.json:
        cancelled = final["finish_reason"] == "cancelled"
        out = {
            "text": "".join(parts) if cancelled else session.turns[-1].answer_text,  # without the " [cancelled]" mark
            "token_ids": final.get("token_ids"),  # null from a server (it does not send them)
            "finish_reason": final["finish_reason"],
            "usage": final["usage"],
            "timing": timing,
            # why the client cut the answer (chat/answer_bounds.py: a server past the length asked
            # for, or [remote] answer_timeout), else null; a local model's answer is never cut so
            "note": final.get("note"),
        }
        # a stdout that cannot hold all of Unicode (PYTHONIOENCODING=ascii) gets \u escapes: the same JSON
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        line = json.dumps(out, ensure_ascii=codecs.lookup(encoding).name != "utf-8")
        rest = (line.translate(_JSON_FOR_TERMINAL) if sys.stdout.isatty() else line) + "\n"
    else:
        rest += "\n"
    _write_out(rest, writing, stopped_by)
    return info, timing


def _stopped_note(signum: int) -> str:
    """The line saying why the answer stopped: Ctrl-C's is the app's usual one (cli.main)."""
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


class _StoppedWhileWriting(BaseException):
    """A stop signal that landed while stdout was written, or a second one: the run ends at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# a write to a pipe of at most PIPE_BUF (4,096) bytes, made when select() says it can take a byte,
# does not wait; 1,024 characters are at most 4,096 bytes in UTF-8
_PIECE = 1024


def _write_out(text: str, writing: threading.Event, stopped_by: list[int]) -> None:
    """`text` to stdout, flushed, with `writing` set. Once a stop was asked for (`stopped_by`), a
    write that would wait on the reader ends the run at once (_StoppedWhileWriting): the signal that
    asked is spent, and none may come to end a wait for a reader that stopped reading. So the text
    goes in pieces a pipe takes whole (one that lands mid-write finds the next piece waiting)."""
    with _flagged(writing):
        for start in range(0, len(text), _PIECE):
            if stopped_by and _stdout_waits():
                raise _StoppedWhileWriting(stopped_by[0])
            sys.stdout.write(text[start : start + _PIECE])
            sys.stdout.flush()


@contextmanager
def _flagged(event: threading.Event) -> Iterator[None]:
    event.set()
    try:
        yield
    finally:
        event.clear()


def _stop_on_signals(cancel: threading.Event, stopped_by: list[int], writing: threading.Event | None = None) -> dict:
    """Ctrl-C, SIGTERM and SIGHUP stop the answer between tokens, so what came is kept (the text's
    line ended, or the --json object printed) instead of lost, or the process killed mid-line
    without a word (SIGTERM's default, `timeout`); returns the handlers replaced.
    A signal the caller ignores (nohup, a background job) stays ignored. One that lands while
    `writing` is set (stdout being written) and stdout cannot take a byte (its write waits on the
    reader), or a second one, raises _StoppedWhileWriting. A write that does not wait is left to
    finish: the answer then stops at the next token, its line ended (or its --json object out)."""

    def stop(signum: int, frame) -> None:
        stopped_by.append(signum)
        cancel.set()
        # (where it cannot be told whether the write waits, it ends the run: a signal is never lost)
        if (writing is not None and writing.is_set() and _stdout_waits() is not False) or len(stopped_by) > 1:
            # a write to a reader that does not read (a full pipe) never returns to the next token,
            # and the signal was lost there: `timeout` never ended the run; a second signal is for now
            raise _StoppedWhileWriting(stopped_by[0])

    if threading.current_thread() is not threading.main_thread():
        return {}
    return replace_signal_handlers((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), stop)


def _stdout_waits() -> bool | None:
    """Whether a write to stdout waits now on its reader (a pipe it stopped reading is full, a
    terminal paused with Ctrl-S); None where that cannot be told (no file descriptor)."""
    try:
        _, ready, _ = select.select([], [sys.stdout.fileno()], [], 0)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        return None
    return not ready


def _why_cut(session, more_room: str) -> str:
    """Where an answer that ended with finish_reason "length" stopped, and the flag for more."""
    limit = session.max_context
    if limit is not None and session.context_used >= limit - 1:
        full = f"the answer stopped where the {limit:,}-token context is full"
        return f"{full}; {more_room} makes room" if more_room else full
    return (f"the answer stopped at --max-new-tokens ({session.params.max_new_tokens:,}); "
            "a larger --max-new-tokens allows a longer one")  # fmt: skip
