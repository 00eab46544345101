"""`internvl-chat`: flags → Settings → a mode (REPL, one-shot, script, quantize, serve).

Exit codes: 0 success, 1 an error (also: stdout could not be written: a full disk, `>&-`), 2 bad
usage or input, 130 interrupted, 128 + N ended by signal N (SIGTERM 143, SIGHUP 129: a one-shot or
--script run says so in one line; the REPL puts the terminal back first, and ends on SIGQUIT too,
131). A reader that goes away (`| head`) ends the program quietly. A stdout that cannot hold every
character (PYTHONIOENCODING=ascii, a Latin-1 locale) gets escapes (`\ufffd`). Standard streams
left non-blocking by whatever started the app are made blocking (a slow writer or reader is waited for).

Text from stdin, `-p` and the prompt words must be UTF-8 (the prompt's words and --system's text are
read as UTF-8 even under an ASCII locale, LC_ALL=C); anything else is refused in one line (exit 2), and binary
data on stdin (an image, say) is named, with the flag to use instead. Piped text's Windows line
ends (CRLF) reach the model as \n; a lone \r is left as it is. Stdin that is a folder (`< dir`)
never reaches this code: Python's start-up stops on it (init_sys_streams, status 1).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from contextlib import suppress
from typing import TextIO

from .errors import (EndedBySignal, InternVLChatError, UsageError, put_back_signal_handlers, replace_signal_handlers,
                     user_notes)
from .files import (GLYPHS_OR_ESCAPES, GuardedStream, OutputFailed, decode_utf8, escape_glyphs_in_visible, read_stream, refuse_wide_text, silence_stdout, sniff_binary,
                    typed_as_utf8, undecodable_byte, unread_bytes, visible)
from .native_stderr import close_leftover_windows, separate_python_stderr
from .ui.chat_flags import build_parser, chat_setting_flags, server_flag


def _check_remote_flags(args: argparse.Namespace, server: str) -> None:
    """With a server, flags that only mean something for a local model are a mistake, said at once;
    without one, so are the server's (they were ignored: the local model answered)."""
    flags = chat_setting_flags()
    for_server = [flag for flag in flags.given(args, "remote.") if flag != "--server"]
    if not server and for_server:
        them = "it" if len(for_server) == 1 else "them"
        raise UsageError(f"{', '.join(for_server)} {'is' if len(for_server) == 1 else 'are'} for a server, but no server is set; "
                         f"add --server URL, or drop {them} to run the model here")  # fmt: skip
    from .settings import without_credentials  # a password in the URL is never printed

    given = flags.given(args, "model.")
    if server and given:
        them = "it" if len(given) == 1 else "them"
        raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for a local model, but the answers come "
                         f"from the server {visible(without_credentials(server))}; drop {them}, or leave the server out (--server, [remote] server) "
                         "to run the model here")  # fmt: skip


def _overrides(args: argparse.Namespace) -> dict:
    """setting → the value its flag gave (None: not given); `--server` alone reads $OPENAI_BASE_URL."""
    overrides = chat_setting_flags().overrides(args)
    overrides["remote.server"] = server_flag(args.server)
    return overrides


def _argv_as_utf8(args: argparse.Namespace) -> None:
    """The prompt's words (and --system's text) as UTF-8 where the locale could not decode them (LC_ALL=C without UTF-8
    mode: Python decodes argv as ASCII, each byte of "é" left as a surrogate, and the prompt was
    refused as not UTF-8). Their bytes come back as they were typed and are read as UTF-8; bytes
    that are not UTF-8 stay as surrogates (refused in one line). Paths are left as Python decoded
    them: that is how the file system gets the same bytes back."""
    if args.prompt_flag is not None:
        args.prompt_flag = typed_as_utf8(args.prompt_flag)
    if getattr(args, "system", None) is not None:  # typed at the same terminal: "not UTF-8 text (byte 0xc3)"
        args.system = typed_as_utf8(args.system)
    if args.prompt:
        args.prompt = [typed_as_utf8(word) for word in args.prompt]


def _read_prompt(args: argparse.Namespace) -> str | None:
    parts = [args.prompt_flag] if args.prompt_flag else []
    parts += [" ".join(args.prompt)] if args.prompt else []
    prompt = " ".join(parts) if parts else None
    if prompt is not None:
        bad = undecodable_byte(prompt)  # argv is decoded with surrogateescape: the byte comes back
        if bad is not None:
            raise UsageError(f"the prompt is not UTF-8 text (byte 0x{bad:02x}); check the terminal's encoding, "
                             "or put the text in a UTF-8 file and pipe it in")  # fmt: skip
        if not prompt.strip():  # only spaces are no prompt (with piped text they were sent after it as "\n\n   ")
            prompt = None
    if args.script != "-" and not sys.stdin.isatty() and not _media_on_stdin(args):
        piped = read_piped_text()
        if piped.strip():
            prompt = f"{piped.rstrip()}\n\n{prompt}" if prompt else piped.rstrip()
    return prompt


def _refuse_repl_command(args: argparse.Namespace) -> None:
    """A typed prompt that starts with a REPL command (`-p "/save chat.json"`, `/image cat.png`) is
    refused before the model loads: sent to the model as text, it ran nothing (no file saved), and
    the status was 0. A path (`/media/usb/cat.png what is it?`) is no command word: it goes on."""
    from .ui.commands import COMMAND_BY_NAME, attach_command_lines, command_start, escaped_breaks_kept

    typed = args.prompt_flag or " ".join(args.prompt or [])
    lines = escaped_breaks_kept(typed.split("\n"))  # as the REPL splits them: a break after a backslash is inside its line
    commands = attach_command_lines(lines)  # `/video clip.mp4 --frames 4` below the question (not in a code block): the REPL runs it
    if commands:
        line = lines[commands[0]]
        kind = command_start(line).split()[0][1:].lower()
        raise UsageError(f"the prompt's line '{visible(line.strip())}' is a REPL command with options, which a prompt "
                         f"given with -p does not run (its path would go with the default frames, the options as text); "
                         f"attach with --{kind} PATH and its flags (--frames N, --video-range A-B), or type it in the REPL")  # fmt: skip
    word = (command_start(typed).split(None, 1) or [""])[0]  # a copied "<feff>/save" is /save in the REPL too
    spec = COMMAND_BY_NAME.get(word[1:].lower()) if word.startswith("/") else None
    if spec is None:
        return
    flag = f"attach with --{spec.name} PATH, or " if spec.name in ("image", "video") else ""
    raise UsageError(f"{visible(word)} is a REPL command, but a prompt given with -p (or after the flags) is sent to the "
                     f"model as text; {flag}type it in the REPL, or put it in a script (--script FILE; --script - reads "
                     "the script from stdin); meant as text, begin it with // (sent as one /)")  # fmt: skip


def _prompt_is_stdin(args: argparse.Namespace) -> bool:
    """`-p -` (or the lone word `-`) names stdin as the prompt, as `--script -` reads stdin
    (`--image -` is refused: a picture is read from a file, `--image /dev/stdin` a redirected one):
    the typed "-" is dropped (the piped text was sent with "\n\n-" after it, and with nothing piped
    the question was "-"). Refused where stdin cannot be the prompt."""
    if not ((args.prompt_flag == "-" and not args.prompt) or (args.prompt_flag is None and args.prompt == ["-"])):
        return False
    args.prompt_flag, args.prompt = None, []
    if sys.stdin.isatty():
        raise UsageError("-p - reads the prompt from stdin, but stdin is a terminal; pipe the question in "
                         "(… | internvl-chat -p -), or pass -p TEXT")  # fmt: skip
    if _media_on_stdin(args):
        raise UsageError("-p - reads the prompt from stdin, but --image/--video name stdin too; pass the question with -p TEXT")
    return True


def _take_slash_escape(args: argparse.Namespace) -> None:
    """A typed prompt that starts with `//` is sent with one `/`, as the REPL sends `//TEXT`: the
    way to send a text that starts with a command word (`-p "//save is a verb"`). Before the
    prompt is read, so one-shot and -I see the same text (and its paths are auto-attached as typed)."""
    from .ui.commands import command_start

    if args.prompt_flag:  # the text _refuse_repl_command read: `-p "" //save …` is the words'
        args.prompt_flag = _one_slash_less(args.prompt_flag, command_start)
    elif args.prompt:
        args.prompt = [_one_slash_less(args.prompt[0], command_start), *args.prompt[1:]]


def _one_slash_less(text: str, command_start) -> str:
    body = command_start(text)
    if not body.startswith("//"):
        return text
    cut = len(text) - len(body)
    return text[:cut] + text[cut + 1 :]


def _media_on_stdin(args: argparse.Namespace) -> bool:
    """Whether --image/--video names stdin (`-`, /dev/stdin): then stdin is that file, not prompt text
    (read as text first, the picture was refused with "pass it with --image FILE", which it was)."""
    return _names_stdin([*args.image, *args.video])


def _names_stdin(paths: list[str]) -> bool:
    """Whether one of `paths` is stdin: `-`, or a name of the same file (/dev/stdin, `< file`'s file)."""
    try:
        stdin = os.fstat(0)
    except OSError:
        return False
    for path in paths:
        try:
            if path == "-" or os.path.samestat(os.stat(path), stdin):
                return True
        except (OSError, ValueError):
            pass  # the flag's own check says what is wrong with it
    return False


def read_piped_text() -> str:
    """stdin as UTF-8 text (size-limited, Ctrl-C-safe), CRLF as \n; binary data is refused with what to do instead."""
    data = read_stream(sys.stdin.fileno(), "stdin")
    refuse_wide_text(data, "stdin")  # its NUL bytes read as binary data
    kind = sniff_binary(data)
    if kind is not None:
        flag = "--image FILE" if kind.endswith("image") else "--video FILE" if "video" in kind else "a text file"
        raise UsageError(f"stdin holds {kind}, not text; pass it with {flag} (the question goes in -p TEXT)")
    try:
        text = decode_utf8(data, "stdin")
    except UsageError as e:
        raise UsageError(f"{e} (e.g. iconv -f latin1 -t utf-8)") from None
    # a Windows file's line ends reached the model as "\r\n" (scripts drop the \r too); a lone \r is
    # kept: no text file ends lines with it today, and in captured output it is a progress bar's redraw
    return text.replace("\r\n", "\n")


def run(argv: list[str]) -> int:
    if argv[:1] == ["quantize"]:
        # before torch loads OpenMP: idle threads sleep instead of spinning, which on a busy CPU
        # made quantizing ~10× slower in CPU time (benchmarks/RESULTS.md, quantize)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from .quantize import main as quantize_main

        return quantize_main(argv[1:])
    if argv[:1] == ["serve"]:
        from .serve.main import main as serve_main

        return serve_main(argv[1:], exiting=True)  # the program ends when it returns
    from .settings import format_settings, format_settings_json, load_settings, toml_escaped

    args = build_parser().parse_args(argv)
    _argv_as_utf8(args)
    for flag, value in (("--config", args.config), ("--script", args.script)):
        # '' named the working folder ("config file . is a folder"), or no script at all ("no prompt given")
        if value is not None and not value.strip():
            raise UsageError(f"{flag} was given an empty path; pass the path of a file")
    if args.model is not None and not args.model.strip():  # `--model "$MODEL"`, MODEL unset: not the demo model
        raise UsageError("--model was given an empty path; pass a checkpoint folder, or leave --model out for the embedded demo model")
    if isinstance(args.server, str) and not args.server.strip():  # `--server "$URL"`, URL unset: the local model answered
        raise UsageError("--server was given an empty URL; pass --server http://HOST:PORT/v1 (--server alone reads "
                         "$OPENAI_BASE_URL); to run the model here, leave --server out (over a [remote] server of the "
                         "config file: INTERNVL_CHAT_REMOTE_SERVER=)")  # fmt: skip
    # a bad value's message names the flag as typed ("--dtype: must be …", not the setting "model.dtype")
    settings = load_settings(args.config, os.environ, _overrides(args), chat_setting_flags().names())
    if args.print_config:
        # JSON: ASCII already; TOML: what stdout cannot hold as TOML escapes, read back as the same values
        sys.stdout.write(format_settings_json(settings) if args.json else toml_escaped(format_settings(settings), sys.stdout.encoding))
        return 0
    _check_remote_flags(args, settings.remote.server)
    if args.script:
        if args.prompt_flag or args.prompt or args.interactive or args.json:
            raise UsageError("--script takes its messages from the script; drop -p/the prompt words, -I and --json")
        if args.script == "-" and sys.stdin.isatty():  # it waited, without a word, for a script typed until Ctrl-D
            raise UsageError("--script - reads the script from stdin, but stdin is a terminal; pipe the script in "
                             "(… | internvl-chat --script -), give --script FILE, or leave --script out for the REPL")  # fmt: skip
        from .ui.script import run_script

        # stdin is left alone unless the script or a media flag names it; text piped to it is said
        unread = not _names_stdin([args.script, *args.image, *args.video]) and unread_bytes(0) > 0
        return run_script(args, settings, stdin_unread=unread)
    if args.json and args.interactive:  # the REPL prints text: --json was silently dropped
        raise UsageError("--json prints one answer as JSON, but -I goes on in the REPL, which prints text; drop one of them")
    from_stdin = _prompt_is_stdin(args)
    _refuse_repl_command(args)
    _take_slash_escape(args)
    prompt = _read_prompt(args)  # None for a prompt of only spaces
    if from_stdin and prompt is None:
        raise UsageError("-p - reads the prompt from stdin, but stdin is empty (or only spaces); pipe the question in, or pass -p TEXT")
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not args.json  # --json is one-shot
    if prompt is None and interactive or args.interactive:
        from .ui.repl import run_repl

        return run_repl(args, settings, prompt)
    if prompt is None:
        if sys.stdin.isatty() and not sys.stdout.isatty() and not args.json:  # `internvl-chat > chat.log`
            raise UsageError("no prompt given, and with stdout not a terminal no REPL opens; pass -p TEXT (or words "
                             "after the flags), or -I for the REPL, its prompt on stderr and the answers to stdout")  # fmt: skip
        raise UsageError("no prompt given; pass -p TEXT (or words after the flags), or pipe text on stdin")
    from .ui.oneshot import run_oneshot

    return run_oneshot(args, settings, prompt)


def _ensure_std_fds() -> list[tuple[int, tuple[int, int]]]:
    """Put /dev/null on any of fds 0-2 that was closed (`2>&-`), and make them blocking.

    Otherwise the next file the app opens (a model shard, a session being saved) would get that
    number, and whatever writes to "stderr" (a C library's warning) would land inside it.
    Returns the fds made blocking, each with the file it was then (device, inode), for
    `_restore_nonblocking` at exit: the flag belongs to the pipe or terminal, shared with the parent.
    """
    made_blocking = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for fd in (0, 1, 2):
        # left non-blocking by whatever started us (a shared pipe or terminal): a read of stdin before its
        # writer wrote failed ("cannot read stdin (Resource temporarily unavailable)"), and a write to a
        # full stdout pipe dropped the rest of the output, status 0 (Python's buffered writer swallows EAGAIN)
        with suppress(OSError):
            if not os.get_blocking(fd):
                info = os.fstat(fd)
                os.set_blocking(fd, True)
                made_blocking.append((fd, (info.st_dev, info.st_ino)))
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:  # Python saw the fd closed at startup
            stream = open(os.devnull, mode, encoding="utf-8")
            # the answer must not vanish with status 0 (`>&-`): writing it fails, as `echo hi >&-` does
            setattr(sys, name, _ClosedOutput(stream) if name == "stdout" else stream)
    return made_blocking


def _restore_nonblocking(made_blocking: list[tuple[int, tuple[int, int]]]) -> None:
    """Make the std fds `_ensure_std_fds` made blocking non-blocking again, as the parent left them:
    the flag is the shared pipe's or terminal's, and a parent (or a sibling) that relied on it then
    blocked where it never had. What Python still buffers is written first, while the fd blocks (a
    write to a full pipe would fail with EAGAIN after). An fd that holds another file by now is left alone."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):  # a closed or failed stream: the run already said so
            stream.flush()
    for fd, identity in made_blocking:
        with suppress(OSError):
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) == identity:
                os.set_blocking(fd, False)


class _ClosedOutput:
    """stdout when fd 1 was closed at start: every write fails with EBADF (fd 1 holds /dev/null,
    so no file the app opens gets that number)."""

    def __init__(self, null: TextIO):
        self._null = null

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "stdout is closed")

    def flush(self) -> None:
        pass  # nothing was written

    def __getattr__(self, name: str):
        return getattr(self._null, name)


def _print_error(text: str) -> None:
    try:
        print(f"internvl-chat: {visible(text)}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr is gone too: the exit code still tells


def _print_ending(text: str, ending: BaseException) -> None:
    """The line for how the run ended, then one line for each failure noted on it (errors.add_user_note)."""
    _print_error(text)
    for note in user_notes(ending):
        _print_error(note)


def _end_on_stop_signals(replaced: dict) -> None:
    """SIGTERM and SIGHUP end the terminal app where it is, with one line and status 128 + the signal,
    as Ctrl-C does with 130; their defaults killed it without a word, leaving a session's temp file
    behind and an answer's line unended. The REPL and a streaming answer put handlers of their own
    over these; an ignored one (`nohup`) stays ignored. The handlers replaced go into `replaced` as
    each is (one that lands between the two is raised here)."""

    def end(signum: int, frame) -> None:
        for stop_signal in (signal.SIGTERM, signal.SIGHUP):  # a second one must not cut the clean-up short
            signal.signal(stop_signal, signal.SIG_IGN)
        raise EndedBySignal(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):  # one at a time: `replaced` holds each as it is put in
        replaced.update(replace_signal_handlers([signum], end))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    made_blocking = _ensure_std_fds()
    # the tokenizer's "sequence length is longer than…" and other transformers log lines are not
    # for users: the app checks lengths itself. Set before transformers is first imported.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    saved_streams = sys.stdout, sys.stderr
    for stream in (sys.stdout, sys.stderr):
        with suppress(AttributeError, ValueError):  # a stdout that is not UTF-8 (PYTHONIOENCODING=ascii, a
            # Latin-1 locale) raised on what it cannot hold, a traceback; the app's glyphs ("…", "→") are
            # written as ASCII ones ("...", "->"), anything else as \u escapes, as stderr did
            stream.reconfigure(errors=GLYPHS_OR_ESCAPES)
    escape_glyphs_in_visible(getattr(stream, "encoding", None) for stream in (sys.stdout, sys.stderr))
    if argv[:1] not in (["serve"], ["quantize"]):
        # the terminal app: what native libraries print to fd 2 is kept off the terminal (native_stderr.py)
        sys.stderr = separate_python_stderr(sys.stderr)
    sys.stdout = GuardedStream(sys.stdout, fatal=True)  # type: ignore[assignment]
    sys.stderr = GuardedStream(sys.stderr, fatal=False)  # type: ignore[assignment]
    replaced: dict = {}
    try:
        if argv[:1] not in (["serve"], ["quantize"]):  # they handle these signals themselves, each its own way
            _end_on_stop_signals(replaced)
        code = _run_reporting_errors(argv)
    except EndedBySignal as e:  # outside: also one that lands while another ending is reported
        _print_ending(f"stopped by {signal.Signals(e.signum).name}", e)
        code = 128 + e.signum
    finally:
        # first: one more signal now must not raise from here (held meanwhile, it meets the handler
        # put back; one taken by another thread ran `end` mid-loop: the run is ending anyway)
        with suppress(EndedBySignal):
            put_back_signal_handlers(replaced)
        # a Ctrl-C or SIGTERM whose handler raised just as a window was to close left fd 2 on the
        # private file: the original sys.stderr put back below writes there (native_stderr.py)
        close_leftover_windows()
        sys.stdout, sys.stderr = saved_streams
        # last: the whole run, its clean-up and error lines included, wrote to blocking fds
        _restore_nonblocking(made_blocking)
    return code


def _run_reporting_errors(argv: list[str]) -> int:
    """run(argv), its errors as one line each and their exit codes."""
    try:
        code = run(argv)
        sys.stdout.flush()
    except InternVLChatError as e:
        _print_ending(f"error: {e}", e)
        code = e.exit_code
    except KeyboardInterrupt as e:
        _print_ending("interrupted", e)
        code = 130
    except (OutputFailed, BrokenPipeError) as e:
        silence_stdout()
        if e.errno != errno.EPIPE:  # a reader that went away (`| head`) needs no message
            _print_error(f"error: cannot write to stdout ({e}); the output is incomplete")
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
