"""Parsing REPL lines into messages and slash commands (pure: no model, no file system).

`parse_line` returns a `Message` or a validated `Command`: paths are normalised (`paths.py`),
numbers and ranges parsed, and every mistake is a `UsageError` that shows the usage or suggests
the command that was meant. `COMMANDS` describes each command (help text, argument kinds) for
`/help` and for completion. `unwrap_block` and `block_is_open` read the triple-quote blocks an
input of several lines may be.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..files import shortened, visible_shortened
from ..numbers import OtherDigits, counted, other_digits, parse_int
from ..settings import MAX_FRAMES, MAX_RANGE_SECONDS
from .paths import media_kind, normalize_path, shell_unquote
from .text_wrap import wrap_text

# Argument kinds (what a completer offers): "image", "video" and "file" are paths, "session" a
# path or a name in the sessions folder; "int" a number; "setting" a key of `/set`; "value",
# "text" and "command" free text.
PATH_KINDS = ("image", "video", "file", "session")


@dataclass(frozen=True)
class ArgSpec:
    name: str  # as shown in the usage line: PATH, N, KEY …
    kind: str
    required: bool = True
    repeat: bool = False  # one or more (or zero or more when not required)


@dataclass(frozen=True)
class OptionSpec:
    name: str  # "--frames"
    kind: str  # "int" (≥ 1), "range" (START-END seconds) or "flag" (no value)
    metavar: str
    help: str
    maximum: int | None = None  # for "int": the largest value (what the setting allows)
    # set: the option applies only with the command's first argument, and this says what the command
    # does without it; refused there, never silently ignored (`/load --skip-missing` alone listed
    # the sessions and dropped the flag)
    alone: str = ""


@dataclass(frozen=True)
class CommandSpec:
    name: str  # without the slash
    help: str
    args: tuple[ArgSpec, ...] = ()
    options: tuple[OptionSpec, ...] = ()
    aliases: tuple[str, ...] = ()
    rest_is_text: bool = False  # the rest of the line is one verbatim text argument

    @property
    def usage(self) -> str:
        parts = [f"/{self.name}"]
        for arg in self.args:
            text = arg.name + ("…" if arg.repeat else "")
            parts.append(text if arg.required else f"[{text}]")
        parts += [f"[{opt.name} {opt.metavar}]" if opt.metavar else f"[{opt.name}]" for opt in self.options]
        return " ".join(parts)


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("help", "show the commands, or the usage of one", (ArgSpec("COMMAND", "command", required=False),)),
    CommandSpec("image", "attach images to the next message (* ? [ ] match names, as in a shell)",
                (ArgSpec("PATH", "image", repeat=True),)),
    CommandSpec(
        "video",
        "attach a video to the next message (* ? [ ] match names, as in a shell)",
        (ArgSpec("PATH", "video"),),
        (
            OptionSpec("--frames", "int", "N", "frames to sample (default: the media.frames setting)", MAX_FRAMES),
            OptionSpec("--range", "range", "A-B", "only the part from A to B seconds (or m:ss, h:mm:ss)"),
        ),
    ),
    CommandSpec("media", "list the attached images and videos and their token cost"),
    CommandSpec("drop", "detach attached item N (numbers as in /media)", (ArgSpec("N", "int"),)),
    CommandSpec("clear", "start a new conversation"),
    CommandSpec("retry", "answer the last message again (at temperature 0 or under a fixed seed: the same answer)"),
    CommandSpec("undo", "remove the last message and its answer"),
    CommandSpec(
        "system",
        "show the system message, set it to TEXT ('' for none), or --default: the model's own again",
        (ArgSpec("TEXT", "text", required=False),),
        (OptionSpec("--default", "flag", "", "instead of TEXT: back to the model's default system message "
                    "(with --server none is sent, so the server's chat template decides)"),),
        rest_is_text=True,
    ),
    CommandSpec(
        "set",
        "change or show a setting (temperature, top_p, max_tiles …); no KEY: list them",
        (ArgSpec("KEY", "setting", required=False), ArgSpec("VALUE", "value", required=False)),
    ),
    CommandSpec("show", "show the last turn's prompt (what it added; images as <image>) and the settings this chat uses"),
    CommandSpec("context", "show how the context is used, item by item"),
    CommandSpec("stats", "show the statistics of the last answer"),
    CommandSpec(
        "save",
        "save the conversation as a JSON session file (no FILE: to the sessions folder)",
        (ArgSpec("FILE", "file", required=False),),
        (OptionSpec("--force", "flag", "", "replace a FILE that holds another conversation"),),
    ),
    CommandSpec(
        "load",
        "load a saved conversation and its settings (no NAME: list the saved ones)",
        (ArgSpec("NAME", "session", required=False),),
        (OptionSpec("--skip-missing", "flag", "", "load it without the images and videos that vanished or changed",
                    alone="lists the saved ones"),),
    ),
    CommandSpec(
        "export",
        "write the conversation as Markdown",
        (ArgSpec("FILE.md", "file"),),
        (OptionSpec("--force", "flag", "", "replace a FILE.md that this conversation did not write"),),
    ),
    CommandSpec("exit", "quit (also /quit, /bye or Ctrl-D)", aliases=("quit", "bye")),
)

COMMAND_BY_NAME: dict[str, CommandSpec] = {
    name: spec for spec in COMMANDS for name in (spec.name, *spec.aliases)
}


@dataclass(frozen=True)
class Message:
    text: str


@dataclass(frozen=True)
class Command:
    name: str  # canonical name, without the slash ("exit" for /quit)
    args: tuple[Any, ...] = ()  # Path for path kinds, int for "int", str otherwise
    options: dict[str, Any] = field(default_factory=dict)  # "frames": int, "range": (a, b)


# --- tokenising --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Word:
    raw: str  # as typed, quotes and escapes included
    start: int
    end: int


def split_words(text: str) -> list[Word]:
    """Split at unquoted, unescaped whitespace, keeping each word's raw text and span.

    Quotes and backslash-escapes follow the shell, so dragged-and-dropped paths stay whole.
    An unclosed quote (an apostrophe in a plain name) falls back to splitting at whitespace.
    """
    words: list[Word] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        start = i
        while i < n and not text[i].isspace():
            c = text[i]
            if c == "\\":
                i += 2
            elif c in "'\"":
                close = _closing_quote(text, i)
                if close < 0:
                    return [Word(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
                i = close + 1
            else:
                i += 1
        i = min(i, n)
        words.append(Word(text[start:i], start, i))
    return words


def _closing_quote(text: str, i: int) -> int:
    quote = text[i]
    j = i + 1
    while j < len(text):
        if quote == '"' and text[j] == "\\":
            j += 2
            continue
        if text[j] == quote:
            return j
        j += 1
    return -1


def _unquote(raw: str) -> str:
    try:
        return shell_unquote(raw)
    except ValueError:
        return raw


# --- values ------------------------------------------------------------------------------------

_TIME = r"(?:[0-9]+:){0,2}(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"  # not \d: it matches ١ and ２ as well


def _seconds(text: str) -> float:
    """'12.5', '1:30' or '1:02:03' -> seconds."""
    total = 0.0
    for part in text.split(":"):
        total = total * 60 + float(part)
    return total


def _shown(text: str) -> str:
    # visible, not repr: a byte of argv that is not UTF-8 reads \xff, as everywhere else (repr said \udcff)
    return f"'{visible_shortened(text)}'"


def parse_range(text: str) -> tuple[float, float]:
    """'A-B' (seconds, or m:ss / h:mm:ss) -> (A, B) with 0 ≤ A < B; UsageError otherwise."""
    m = re.fullmatch(rf"\s*({_TIME})\s*-\s*({_TIME})\s*", text)
    hint = "give START-END in seconds with START before END, e.g. 2.5-10 or 1:00-1:30"
    shown = _shown(text)
    if refused := other_digits(text):
        raise UsageError(f"invalid time range: it {refused}; {hint}")
    if not m:
        raise UsageError(f"invalid time range {shown}; {hint}")
    start, end = _seconds(m.group(1)), _seconds(m.group(2))
    if end > MAX_RANGE_SECONDS:  # 400 digits are read as inf; a session file could not hold it either
        raise UsageError(f"invalid time range {shown}: it ends after {MAX_RANGE_SECONDS:,.0f} s; {hint}")
    if not start < end:
        raise UsageError(f"invalid time range {shown}: its end is not after its start; {hint}")
    return start, end


def _parse_int(text: str, what: str, spec: CommandSpec, maximum: int | None = None) -> int:
    try:
        value = parse_int(text)
    except OtherDigits as refused:
        raise UsageError(f"/{spec.name}: {what} {refused}; usage: {spec.usage}") from None
    except ValueError:
        value = 0
    if value < 1 or maximum is not None and value > maximum:
        bounds = "≥ 1" if maximum is None else f"from 1 to {maximum}"
        raise UsageError(f"/{spec.name}: {what} must be a whole number {bounds}, not {_shown(text)}; usage: {spec.usage}")
    return value


def close_names(word: str, names: list[str], most: int = 1) -> list[str]:
    """Up to `most` of `names` that `word` looks like a typo of, closest first (else the one name
    it alone begins): the "did you mean …?" of commands, options and saved sessions."""
    close = difflib.get_close_matches(word, names, n=most, cutoff=0.6)
    if close:
        return close
    starts = [n for n in names if n.startswith(word)] if word else []
    return starts if len(starts) == 1 else []


def _suggest(word: str, names: list[str], prefix: str) -> str | None:
    close = close_names(word, names)
    return prefix + close[0] if close else None


# --- lines -------------------------------------------------------------------------------------

BLOCK_QUOTES = '"""'


def unwrap_block(text: str) -> str | None:
    '''The inside of a `"""` block (`"""\\nline 1\\nline 2\\n"""`), or None when `text` is not one.'''
    body = text.strip()
    if not body.startswith(BLOCK_QUOTES):
        return None
    if len(body) < 2 * len(BLOCK_QUOTES) or not body.endswith(BLOCK_QUOTES):
        raise UsageError('unclosed """ block; end it with a line holding """')
    inner = body[len(BLOCK_QUOTES) : -len(BLOCK_QUOTES)]
    return inner.strip("\n")


def typed_message(text: str) -> str:
    '''What, typed at the prompt, sends `text` as it is: a slash it starts with doubled (`//etc`,
    not the command /etc), a text that starts with a `"""` put in a block of its own.'''
    if text.lstrip().startswith(BLOCK_QUOTES):
        return f"{BLOCK_QUOTES}\n{text}\n{BLOCK_QUOTES}"
    body = command_start(text)  # "<feff>/etc" given back as it was ran as the command /etc
    if body.startswith("/"):
        cut = len(text) - len(body)
        return f"{text[:cut]}/{body}"
    return text


# `/system """` starts a block too: a system message of several lines, in a script as in the REPL
# (it was set to the three quotes, and the lines after it were sent as messages); and so does
# `/set system.message """`, which sets the same text
_SYSTEM_BLOCK = re.compile(r'/(?:system|set\s+system\.message)\s+(?=""")', re.IGNORECASE)


def block_is_open(text: str) -> bool:
    '''True while `text` (or `/system TEXT`) starts a `"""` block that is not closed yet (Enter then adds a line).'''
    body = text.strip()
    command = command_start(body)  # "\u200b/system \"\"\"" is the command /system, as parse_line reads it
    opener = _SYSTEM_BLOCK.match(command)
    body = command[opener.end() :] if opener else body
    if not body.startswith(BLOCK_QUOTES):
        return False
    return len(body) < 2 * len(BLOCK_QUOTES) or not body.endswith(BLOCK_QUOTES)


WILDCARD = re.compile(r"[*?\[]")  # what makes an /image or /video path a pattern (media_paths.py)
_COMMAND_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_PUNCTUATED = re.compile(r"([A-Za-z][A-Za-z0-9_-]*)[.,;:!?]+")


# Invisible marks a copied command can start with (a web page's zero-width space, a byte-order mark,
# a direction mark): "<feff>/help" was sent to the model as a message, the command not run
_LEADING_MARKS = "\ufeff\u200b\u200e\u200f\u2060"


def command_start(line: str) -> str:
    """`line` from where a command would start: past the spaces and invisible marks before it."""
    return line.lstrip().lstrip(_LEADING_MARKS).lstrip()


def attach_command_with_options(line: str) -> bool:
    """Whether a line below a message's first is `/image` or `/video` with an option of its own
    (`/video clip.mp4 --frames 4`): the REPL runs it as that command, its options applied (a one-shot
    prompt, which runs none, refuses it). Without one, such a line is text whose paths are attached
    as in any message (media_paths.py leaves out the word)."""
    body = command_start(line)
    if not body.startswith("/"):  # most lines of a long paste: not split into words
        return False
    words = body.split()
    spec = COMMAND_BY_NAME.get(words[0][1:].lower())
    if spec is None or spec.name not in ("image", "video"):
        return False
    names = {option.name for option in spec.options}
    return any(word.partition("=")[0] in names for word in words[1:])


_FENCE = re.compile(r"[ ]{0,3}(`{3,}|~{3,})")


def _indented_code(line: str) -> bool:
    """Whether `line` is indented as a Markdown code block's line is: by 4 columns or more (a tab
    takes the column to the next multiple of 4)."""
    column = 0
    for char in line:
        if char == " ":
            column += 1
        elif char == "\t":
            column += 4 - column % 4
        else:
            break
        if column >= 4:
            return True
    return False


def escaped_breaks_kept(lines: list[str]) -> list[str]:
    """`lines` with a line break escaped by a backslash kept inside its line: Tab completes a file
    name holding a line break so (`/image a\\⏎b.png`), and its command ran cut at the break. The
    REPL's lines of an input, and -p's (cli.py): a prompt's lines are those the REPL would run."""
    out: list[str] = []
    for line in lines:
        if out and (len(out[-1]) - len(out[-1].rstrip("\\"))) % 2:
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


def attach_command_lines(lines: list[str]) -> list[int]:
    """Which of a message's lines (`lines[0]` is its first, always text) are `/image` or `/video`
    commands with options (`attach_command_with_options`), outside a Markdown code block: a pasted
    snippet (```` ``` ```` or `~~~` fenced, or indented by 4 spaces or a tab) is text as written,
    its lines run nothing."""
    found, fence = [], ""
    for k, line in enumerate(lines):
        opener = _FENCE.match(line)
        if fence:
            if opener and opener.group(1)[0] == fence[0] and len(opener.group(1)) >= len(fence) and not line.strip().strip(fence[0]):
                fence = ""  # its closing fence: as long as the opening one at least, nothing after it
            continue
        if opener and not (opener.group(1)[0] == "`" and "`" in line[opener.end() :]):
            fence = opener.group(1)
            continue
        if k and not _indented_code(line) and attach_command_with_options(line):
            found.append(k)
    return found


def parse_line(line: str) -> Message | Command:
    """One REPL line -> Message or Command.

    A message's text is returned as typed. `//text` is the message `/text`; a line that starts
    with a path (`/home/me/cat.png what is this?`) is a message too (auto-attach handles it).
    Leading whitespace and invisible marks (`command_start`: a copied zero-width space, a byte-order
    mark) before a command are ignored.
    """
    body = command_start(line)
    if body.startswith("//"):
        cut = len(line) - len(body)
        return Message(line[:cut] + line[cut + 1 :])
    if not body.startswith("/"):
        return Message(line)
    head, rest = (body[1:].split(None, 1) + [""])[:2] if body[1:].strip() else ("", "")
    if not head:
        raise UsageError("empty command; type /help for the commands")
    if not _COMMAND_NAME.fullmatch(head):
        typo = _PUNCTUATED.fullmatch(head)  # `/help?`, `/exit.`, `/image,`: a command, not a path to send
        if typo and typo.group(1).lower() in COMMAND_BY_NAME:
            raise UsageError(f"unknown command /{shortened(head)}; did you mean /{typo.group(1).lower()}?")
        return Message(line)  # a dropped path such as /tmp/cat.png
    spec = COMMAND_BY_NAME.get(head.lower())
    if spec is None:
        hint = _suggest(head.lower(), list(COMMAND_BY_NAME), "/")
        if hint:
            raise UsageError(f"unknown command /{shortened(head)}; did you mean {hint}?")
        raise UsageError(f"unknown command /{shortened(head)}; type /help for the commands (// starts a message with /)")
    return _parse_args(spec, rest.strip())


def _parse_args(spec: CommandSpec, rest: str) -> Command:
    if spec.rest_is_text:
        return _text_command(spec, rest)

    words = split_words(rest)
    options: dict[str, Any] = {}
    positional: list[Word] = []
    i = 0
    while i < len(words):
        raw = words[i].raw
        if raw.startswith("--") and len(raw) > 2:
            name, eq, value = raw.partition("=")
            opt = next((o for o in spec.options if o.name == name), None)
            if opt is None:
                if spec.name == "set" and name == "--default":  # as /system takes it
                    raise _no_option(spec, name, f"the model's own system message comes back with /system --default; "
                                                 f"usage: {spec.usage}")  # fmt: skip
                raise _no_option(spec, name)
            if opt.kind == "flag":
                if eq:
                    raise UsageError(f"/{spec.name}: {name} takes no value; usage: {spec.usage}")
                options[name[2:]] = True
                i += 1
                continue
            if not eq:
                i += 1
                if i >= len(words):
                    raise UsageError(f"/{spec.name}: {name} needs a value; usage: {spec.usage}")
                value = words[i].raw
            value = _unquote(value)
            key = name[2:]
            if opt.kind == "int":
                options[key] = _parse_int(value, name, spec, opt.maximum)
            else:
                options[key] = parse_range(value)
        else:
            positional.append(words[i])
        i += 1

    if spec.name == "set" and len(positional) == 1 and "=" in positional[0].raw:
        key, _, value = _unquote(positional[0].raw).partition("=")
        return Command("set", (key.strip(), value.strip()), options)
    if spec.name == "set" and len(positional) > 1:
        # `KEY= VALUE`, `KEY = VALUE`, `KEY=VALUE WORDS`: the = read as part of the key or of the value
        # (unknown setting 'temperature=', "not '= 0.5'")
        first, second = positional[0], positional[1]
        if "=" in first.raw:
            cut = first.start + first.raw.index("=")
            return Command("set", (_unquote(rest[first.start : cut]).strip(), _set_value(rest[cut + 1 :])), options)
        if second.raw.startswith("="):
            return Command("set", (_unquote(first.raw), _set_value(rest[second.start + 1 :])), options)
    if spec.name == "set" and len(positional) > 1 and _SYSTEM_BLOCK.match(f"/set {rest}"):
        # a `"""` block is the system message as written, unwrapped as /system unwraps it (read as
        # one quoted word, it kept the newlines after and before the quotes)
        return Command("set", (_unquote(positional[0].raw), rest[positional[1].start :].strip()), options)
    if spec.name == "set" and len(positional) > 2:
        # a VALUE of several words is the rest of the line, as /system takes its TEXT (`/set
        # system.message Be brief.` was refused as too many arguments)
        return Command("set", (_unquote(positional[0].raw), rest[positional[1].start :].strip()), options)

    for opt in spec.options:
        if opt.alone and opt.name[2:] in options and not positional:
            arg = spec.args[0].name
            raise UsageError(f"/{spec.name} {opt.name} needs {arg}: /{spec.name} {arg} {opt.name}; /{spec.name} alone {opt.alone}")
    return Command(spec.name, _bind(spec, positional), options)


def _text_command(spec: CommandSpec, rest: str) -> Command:
    """A command whose TEXT is the rest of the line (/system), or one of its flags alone.

    A single word that starts with -- is read as a flag (a mistyped --default would otherwise
    become the system message); a TEXT that is such a word goes in a triple-quote block."""
    words = rest.split(None, 1)
    if not words or not re.fullmatch(r"--[A-Za-z][\w-]*", words[0]):
        return Command(spec.name, (_inside_quotes(rest),) if rest else ())
    opt = next((o for o in spec.options if o.name == words[0]), None)
    if opt is not None and len(words) > 1:
        raise UsageError(f"/{spec.name} {opt.name} takes no TEXT; usage: {spec.usage}")
    if opt is None and len(words) > 1:
        return Command(spec.name, (rest,))  # words that start with a dash: a text
    if opt is None:
        raise _no_option(spec, words[0], after=' (a one-word TEXT that starts with -- goes in a """ block)')
    return Command(spec.name, (), {opt.name[2:]: True})


def _inside_quotes(text: str) -> str:
    """A TEXT in one pair of quotes (`'Be terse.'`, `''`): what they hold, as /set reads its one-word
    VALUE (the quotes had reached the model as part of the system message); else `text` as typed,
    a `\"\"\"` block included (unwrapped where it is used)."""
    body = text.strip()
    if len(body) < 2 or body[0] not in "'\"" or body[-1] != body[0] or body.startswith(BLOCK_QUOTES):
        return text
    words = split_words(body)
    return _unquote(words[0].raw) if len(words) == 1 else text


def _no_option(spec: CommandSpec, name: str, tip: str = "", after: str = "") -> UsageError:
    """`/CMD has no option --NAME`, with the option it may have meant, else `tip` or the usage."""
    if not tip:
        hint = _suggest(name, [o.name for o in spec.options], "")
        tip = f"did you mean {hint}?" if hint else f"usage: {spec.usage}"
    return UsageError(f"/{spec.name} has no option {shortened(name)}; {tip}{after}")


def _set_value(text: str) -> str:
    """The VALUE of `/set`: one word unquoted, several the text as typed (as /system takes its TEXT)."""
    words = split_words(text)
    return _unquote(words[0].raw) if len(words) == 1 else text.strip()


def _bind(spec: CommandSpec, words: list[Word]) -> tuple[Any, ...]:
    required = [a for a in spec.args if a.required]
    repeat = any(a.repeat for a in spec.args)
    if len(words) < len(required):
        missing = required[len(words)]
        raise UsageError(f"/{spec.name} needs {missing.name}; usage: {spec.usage}")
    if not repeat and len(words) > len(spec.args):
        what = "no arguments" if not spec.args else f"at most {counted(len(spec.args), 'argument')}"
        spare = words[len(spec.args) - 1 : -1]
        kinds = [media_kind(_unquote(w.raw)) for w in words]
        # `/video clip.mp4 What happens?`, and `/video clips/* What happens?` (a pattern has no suffix)
        video = kinds[0] or WILDCARD.search(_unquote(words[0].raw))
        if spec.name == "video" and video and not any(kinds[1:]):
            raise UsageError("/video takes one path (and options), so send the question as the next message "
                             "(or name the file in it)")
        # `/save ~/My Chats/a.json`: one path typed with bare spaces (words but the last without a
        # suffix; `/load a.json b.json` is two names)
        if spec.args and spec.args[-1].kind in PATH_KINDS and not any(Path(_unquote(w.raw)).suffix for w in spare):
            typed = " ".join(w.raw for w in words[: len(spec.args) - 1])
            spaced = quote_spaced(" ".join(_unquote(w.raw) for w in words[len(spec.args) - 1 :]))
            raise UsageError(f"/{spec.name} takes {what}; a path with spaces goes in quotes: "
                             f"/{spec.name} {typed + ' ' if typed else ''}{shortened(spaced, 80)}")  # fmt: skip
        raise UsageError(f"/{spec.name} takes {what}; usage: {spec.usage}")

    values: list[Any] = []
    for n, word in enumerate(words):
        arg = spec.args[min(n, len(spec.args) - 1)]
        if arg.kind in PATH_KINDS:
            values.append(normalize_path(word.raw))
        elif arg.kind == "int":
            values.append(_parse_int(_unquote(word.raw), arg.name, spec))
        else:
            values.append(_unquote(word.raw))
    return tuple(values)


def quote_spaced(text: str) -> str:
    """`text` (a path as typed, `~` kept) in single quotes, as a hint to type it back as one word."""
    return "'" + text.replace("'", "'\\''") + "'"


SLASH_MESSAGE = ("//TEXT", "send a message that starts with /")  # listed by /help after the commands


def format_help(name: str | None = None, width: int | None = None) -> str:
    """All commands with their one-line help, or one command's usage and options.

    With `width` (the terminal's), every line fits it: the help texts wrap in their column, and a
    usage too long for the column gets a line of its own with its help below.
    """
    if name is not None:
        word = name.lstrip("/")
        if not word:  # `/help //`: the one entry of the list that is not a command
            return wrap_text(f"{SLASH_MESSAGE[0]}  {SLASH_MESSAGE[1]}", width)
        spec = COMMAND_BY_NAME.get(word.lower())
        if spec is None:
            hint = _suggest(word.lower(), list(COMMAND_BY_NAME), "/")
            tip = f"did you mean {hint}?" if hint else "type /help for the commands"
            raise UsageError(f"unknown command /{shortened(word)}; {tip}")
        lines = [f"{spec.usage}  {spec.help}"]
        lines += [f"  {o.name} {o.metavar}  {o.help}" if o.metavar else f"  {o.name}  {o.help}" for o in spec.options]
        if any(f"/{alias}" not in spec.help for alias in spec.aliases):  # /exit's help names them already
            lines.append("  also: " + ", ".join("/" + a for a in spec.aliases))
        return wrap_text("\n".join(lines), width)
    rows = [(spec.usage, spec.help) for spec in COMMANDS] + [SLASH_MESSAGE]
    if width is None:
        column = max(len(usage) for usage, _ in rows)
        return "\n".join(f"{usage.ljust(column)}  {text}" for usage, text in rows)
    column = max(len(usage) for usage, _ in rows if len(usage) <= max(16, width // 3))
    if width - column - 2 < 16:  # too narrow for two columns: each help under its usage
        return "\n".join(wrap_text(usage, width) + "\n" + wrap_text("    " + text, width) for usage, text in rows)
    lines = []
    margin = " " * (column + 2)
    for usage, text in rows:
        helps = wrap_text(text, width - column - 2, indent="").split("\n")
        if len(usage) > column:
            lines.append(wrap_text(usage, width))
            lines += [margin + h for h in helps]
        else:
            lines.append(f"{usage.ljust(column)}  {helps[0]}")
            lines += [margin + h for h in helps[1:]]
    return "\n".join(lines)
