from __future__ import annotations

from pathlib import Path

import pytest

from internvl_chat.errors import UsageError
from internvl_chat.settings import SET_ALIASES
from internvl_chat.ui.commands import (
    COMMAND_BY_NAME,
    COMMANDS,
    Command,
    Message,
    format_help,
    parse_line,
    parse_range,
    split_words,
)


pytestmark = pytest.mark.usefixtures("fixed_home")  # ~ expands to /home/tester


P = Path


@pytest.mark.parametrize(
    "line, expected",
    [
        # messages
        ("hello", Message("hello")),
        ("  two words ", Message("  two words ")),
        ("", Message("")),
        ("//etc/passwd is a file", Message("/etc/passwd is a file")),
        ("//help", Message("/help")),
        ("/tmp/cat.png what is this?", Message("/tmp/cat.png what is this?")),  # a dropped path
        ("/cat.png", Message("/cat.png")),
        # commands without arguments
        ("/help", Command("help")),
        ("/help video", Command("help", ("video",))),
        ("/media", Command("media")),
        ("/clear", Command("clear")),
        ("/retry", Command("retry")),
        ("/undo", Command("undo")),
        ("/show", Command("show")),
        ("/context", Command("context")),
        ("/stats", Command("stats")),
        ("/exit", Command("exit")),
        ("/quit", Command("exit")),
        ("/QUIT", Command("exit")),
        ("  /clear  ", Command("clear")),
        # paths
        ("/image cat.png", Command("image", (P("cat.png"),))),
        (
            "/image a.png 'my cat.png' b\\ c.jpg \"d e.webp\"",
            Command("image", (P("a.png"), P("my cat.png"), P("b c.jpg"), P("d e.webp"))),
        ),
        ("/image file:///tmp/my%20cat.png", Command("image", (P("/tmp/my cat.png"),))),
        ("/image ~/cat.png", Command("image", (P("/home/tester/cat.png"),))),
        ("/image '/tmp/it'\\''s.png' ", Command("image", (P("/tmp/it's.png"),))),
        ("/image /tmp/it's.png", Command("image", (P("/tmp/it's.png"),))),
        ("/video clip.mp4", Command("video", (P("clip.mp4"),))),
        (
            "/video clip.mp4 --frames 4 --range 1.5-3",
            Command("video", (P("clip.mp4"),), {"frames": 4, "range": (1.5, 3.0)}),
        ),
        (
            "/video --range=1:00-1:30 --frames=16 'my clip.mp4'",
            Command("video", (P("my clip.mp4"),), {"frames": 16, "range": (60.0, 90.0)}),
        ),
        ("/save", Command("save")),
        ("/save chat.json", Command("save", (P("chat.json"),))),
        ("/save chat.json --force", Command("save", (P("chat.json"),), {"force": True})),
        ("/load", Command("load")),
        ("/load talk", Command("load", (P("talk"),))),
        ("/load ~/chats/a\\ b.json", Command("load", (P("/home/tester/chats/a b.json"),))),
        ("/load --skip-missing talk", Command("load", (P("talk"),), {"skip-missing": True})),
        ("/load talk --skip-missing", Command("load", (P("talk"),), {"skip-missing": True})),
        ("/export notes.md", Command("export", (P("notes.md"),))),
        # numbers, settings and text
        ("/drop 2", Command("drop", (2,))),
        ("/set temperature 0.7", Command("set", ("temperature", "0.7"))),
        ("/set top_p=0.9", Command("set", ("top_p", "0.9"))),
        # the = with spaces around it, or before a value of several words (it was read as part of
        # the key or of the value: unknown setting 'top_p=', "not '= 0.9'")
        ("/set top_p = 0.9", Command("set", ("top_p", "0.9"))),
        ("/set top_p= 0.9", Command("set", ("top_p", "0.9"))),
        ("/set top_p =0.9", Command("set", ("top_p", "0.9"))),
        ("/set seed = 'none'", Command("set", ("seed", "none"))),
        ("/set system.message=Be brief.  Say 'why'.", Command("set", ("system.message", "Be brief.  Say 'why'."))),
        ("/set system.message = Be brief.", Command("set", ("system.message", "Be brief."))),
        ("/set seed 'none'", Command("set", ("seed", "none"))),
        ("/set temperature", Command("set", ("temperature",))),  # shows the value and its source
        ("/set system.message  Be brief.  Say 'why'. ", Command("set", ("system.message", "Be brief.  Say 'why'."))),
        ("/set 'system' Be brief.", Command("set", ("system", "Be brief."))),
        ("/set", Command("set")),  # lists the settings it can change
        ("/bye", Command("exit")),
        ("/system", Command("system")),
        ("/system   You are terse. Use 'quotes' freely. ", Command("system", ("You are terse. Use 'quotes' freely.",))),
        ("/system line one\nline two", Command("system", ("line one\nline two",))),
        # the model's default again; a TEXT of several words that starts with dashes stays a text
        ("/system --default", Command("system", (), {"default": True})),
        ("/system   --default ", Command("system", (), {"default": True})),
        ("/system -- Be brief.", Command("system", ("-- Be brief.",))),
        ("/system --- Be brief. ---", Command("system", ("--- Be brief. ---",))),
        ("/system --quiet answers only", Command("system", ("--quiet answers only",))),
        ('/system """--default"""', Command("system", ('"""--default"""',))),
        # a TEXT in one pair of quotes is what they hold, as /set system.message reads its one-word
        # VALUE: `/system 'Be terse.'` had sent the quotes to the model as part of the message
        ("/system 'Be terse.'", Command("system", ("Be terse.",))),
        ('/system  "You are a pirate." ', Command("system", ("You are a pirate.",))),
        ("/system ''", Command("system", ("",))),  # none, as before
        ("/system 'Be' 'terse.'", Command("system", ("'Be' 'terse.'",))),  # several words: as typed
        ("/system 'Be terse,' she said.", Command("system", ("'Be terse,' she said.",))),
        ("/system 'Don't'", Command("system", ("'Don't'",))),  # unbalanced: as typed
        # copied with an invisible mark before the slash (a web page's zero-width space, a byte-order
        # mark): sent to the model as a message, the command not run
        ("\ufeff/help set", Command("help", ("set",))),
        (" \u200b/drop 2", Command("drop", (2,))),
        ("\u200e\u200b //tmp", Message("\u200e\u200b /tmp")),  # // still sends the text that follows
        ("\u200bhello", Message("\u200bhello")),
    ],
)
def test_parse_line(line, expected):
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ("/imgae cat.png", "unknown command /imgae; did you mean /image?"),
        ("/vidoe x.mp4", "unknown command /vidoe; did you mean /video?"),
        ("/exti", "unknown command /exti; did you mean /exit?"),
        ("/qiut", "unknown command /qiut; did you mean /quit?"),
        ("/sav", "unknown command /sav; did you mean /save?"),
        ("/frobnicate", "unknown command /frobnicate; type /help"),
        # a command with punctuation typed after it was sent to the model as a message
        ("/help?", "unknown command /help?; did you mean /help?"),
        ("/exit.", "unknown command /exit.; did you mean /exit?"),
        ("/Image, cat.png", "unknown command /Image,; did you mean /image?"),
        ("/", "empty command"),
        ("/image", "/image needs PATH; usage: /image PATH…"),
        ("/video", "/video needs PATH; usage: /video PATH [--frames N] [--range A-B]"),
        ("/video a.mp4 b.mp4", "/video takes at most 1 argument; usage: /video PATH"),
        ("/video a.mp4 --fram 3", "/video has no option --fram; did you mean --frames?"),
        ("/video a.mp4 --speed 3", "/video has no option --speed; usage: /video PATH"),
        ("/set system.message --default", "/set has no option --default; the model's own system message comes back with /system --default"),
        ("/video a.mp4 --frames", "/video: --frames needs a value"),
        ("/video a.mp4 --frames 0", "/video: --frames must be a whole number from 1 to 256, not '0'"),
        ("/video a.mp4 --frames two", "/video: --frames must be a whole number from 1 to 256, not 'two'"),
        # above media.frames' limit: measuring 10**23 frames would exhaust memory
        ("/video a.mp4 --frames 257", "/video: --frames must be a whole number from 1 to 256, not '257'"),
        ("/video a.mp4 --frames=99999999999999999999999", "/video: --frames must be a whole number from 1 to 256"),
        ("/video a.mp4 --range 5-2", "invalid time range '5-2': its end is not after its start"),
        ("/video a.mp4 --range 5", "invalid time range '5'"),
        ("/image --frames 3 a.png", "/image has no option --frames"),
        ("/drop", "/drop needs N; usage: /drop N"),
        ("/drop x", "/drop: N must be a whole number ≥ 1, not 'x'; usage: /drop N"),
        ("/drop 0", "/drop: N must be a whole number ≥ 1, not '0'"),
        # int() reads underscores between digits: `/drop 1_0` dropped item 10
        ("/drop 1_0", "/drop: N must be a whole number ≥ 1, not '1_0'; usage: /drop N"),
        ("/video a.mp4 --frames 1_6", "/video: --frames must be a whole number from 1 to 256, not '1_6'"),
        ("/drop 1 2", "/drop takes at most 1 argument"),
        ("/clear now", "/clear takes no arguments; usage: /clear"),
        ("/exit please", "/exit takes no arguments"),
        ("/load a.json b.json", "/load takes at most 1 argument; usage: /load [NAME]"),
        # one path typed with bare spaces: the hint is that path, quoted, ready to type
        ("/save ~/My Chats/talk 1.json", "/save takes at most 1 argument; a path with spaces goes in quotes: "
                                         "/save '~/My Chats/talk 1.json'"),
        ("/export it's my.md", "/export takes at most 1 argument; a path with spaces goes in quotes: "
                               "/export 'it'\\''s my.md'"),
        ("/video My Clips/a b.mp4 --frames 2", "a path with spaces goes in quotes: /video 'My Clips/a b.mp4'"),
        ("/load My talk --skip-missing", "a path with spaces goes in quotes: /load 'My talk'"),
        # a question typed after the path
        ("/video clip.mp4 --frames 2 What happens?", "/video takes one path (and options), so send the question as the "
                                                     "next message (or name the file in it)"),
        ("/video clips/* What happens?", "/video takes one path (and options), so send the question as the next "
                                         "message (or name the file in it)"),
        ("/video clips/[ab]* --frames 2 What happens?", "/video takes one path (and options), so send the question"),
        # without a NAME /load lists the sessions: the flag would be dropped unsaid
        ("/load --skip-missing", "/load --skip-missing needs NAME: /load NAME --skip-missing; /load alone lists the saved ones"),
        ("/save a.json --force=yes", "/save: --force takes no value; usage: /save [FILE] [--force]"),
        ("/export", "/export needs FILE.md"),
        ("/save a.json b.json", "/save takes at most 1 argument"),
        ("/image ''", "empty path"),
        # a pasted word is cut short in the error, which stays one readable line
        ("/drop " + "9" * 5000, "/drop: N must be a whole number ≥ 1, not '" + "9" * 39 + "…'; usage: /drop N"),
        ("/" + "x" * 5000, "unknown command /" + "x" * 39 + "…; type /help"),
        ("/video a.mp4 --" + "f" * 5000, "/video has no option --" + "f" * 37 + "…; usage"),
        # a mistyped flag was the system message; a text of that one word goes in a block
        ("/system --defualt", "/system has no option --defualt; did you mean --default? "
                              '(a one-word TEXT that starts with -- goes in a """ block)'),
        ("/system --verbose", "/system has no option --verbose; usage: /system [TEXT] [--default]"),
        ("/system --default Be brief.", "/system --default takes no TEXT; usage: /system [TEXT] [--default]"),
        ("/system --default\nBe brief.", "/system --default takes no TEXT"),
    ],
)
def test_errors(line, message):
    with pytest.raises(UsageError) as err:
        parse_line(line)
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["exit", "/quit", "bye"])
def test_help_for_exit_names_its_other_names_once(name):
    # it said "/exit  quit (also /quit, /bye or Ctrl-D)" and then "  also: /quit, /bye"
    shown = format_help(name, 100)
    assert shown.count("/quit") == 1 and shown.count("/bye") == 1, shown


@pytest.mark.parametrize("line", ["/frobnicate", "/", "/video a.mp4 --range 5-2", "/video a.mp4 --range x"])
def test_an_error_line_ends_as_the_others_do_without_a_full_stop(line):
    # "unknown command /foo; type /help for the commands (// starts a message with /)." stood out
    # among the error lines the REPL prints, none of which end with one
    with pytest.raises(UsageError) as err:
        parse_line(line)
    assert not str(err.value).endswith("."), str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0-10", (0.0, 10.0)),
        ("2.5-10", (2.5, 10.0)),
        (" 2.5 - 10.25 ", (2.5, 10.25)),
        (".5-1.", (0.5, 1.0)),
        ("1:00-1:30", (60.0, 90.0)),
        ("0:59.5-1:02:03", (59.5, 3723.0)),
    ],
)
def test_parse_range(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["", "5", "5-", "-5", "a-b", "3-3", "10-2", "1-2-3", "-1-2", "1e1-2e1"])
def test_parse_range_errors(text):
    with pytest.raises(UsageError, match="invalid time range"):
        parse_range(text)


@pytest.mark.parametrize("text", ["0-" + "9" * 400, "0-100000000000", "1:00-0:00:" + "9" * 400])
def test_parse_range_refuses_an_end_no_video_has(text):
    # 400 digits were read as inf (round(inf · fps) then crashed the next message with OverflowError),
    # and an end past MAX_RANGE_SECONDS made a session that /load refused
    with pytest.raises(UsageError, match="invalid time range .*: it ends after 10,000,000 s") as error:
        parse_range(text)
    assert len(str(error.value)) < 200  # the line quotes the range cut short


def test_split_words_keeps_raw_text_and_spans():
    text = "a 'b c'  d\\ e \"f\\\"g\""
    words = split_words(text)
    assert [w.raw for w in words] == ["a", "'b c'", "d\\ e", '"f\\"g"']
    assert all(text[w.start : w.end] == w.raw for w in words)


def test_split_words_falls_back_on_unclosed_quote():
    assert [w.raw for w in split_words("/tmp/it's.png b.png")] == ["/tmp/it's.png", "b.png"]


def test_command_table_covers_the_issue():
    names = {spec.name for spec in COMMANDS}
    assert names == {
        "help", "image", "video", "media", "drop", "clear", "retry", "undo", "system",
        "set", "show", "context", "stats", "save", "load", "export", "exit",
    }  # fmt: skip
    assert COMMAND_BY_NAME["quit"] is COMMAND_BY_NAME["exit"]
    kinds = {arg.kind for spec in COMMANDS for arg in spec.args}
    assert kinds <= {"image", "video", "file", "session", "int", "setting", "value", "text", "command"}
    assert [a.kind for a in COMMAND_BY_NAME["image"].args] == ["image"]
    assert [a.kind for a in COMMAND_BY_NAME["video"].args] == ["video"]
    assert [a.kind for a in COMMAND_BY_NAME["set"].args] == ["setting", "value"]
    for spec in COMMANDS:
        assert spec.help and "\n" not in spec.help
        assert spec.usage.startswith(f"/{spec.name}")


def test_set_keys_are_the_documented_ones():
    assert set(SET_ALIASES) == {
        "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens",
        "seed", "stream_interval", "max_tiles", "frames", "auto_attach", "stats", "markdown", "plain",
    }  # fmt: skip


def test_every_setting_set_lists_has_its_bare_name():
    """`/set` lists generation.stream_interval and media.auto_attach as changeable; their bare names
    work as temperature's does (they were refused: "unknown setting 'stream_interval'")."""
    from internvl_chat.settings import resolve_key
    from internvl_chat.ui.set_keys import runtime_keys

    for dotted in runtime_keys():
        if dotted != "system.message":  # "message" alone would be vague; /system sets it
            assert resolve_key(dotted.split(".")[1]) == dotted


def test_help_lists_every_command():
    text = format_help()
    for spec in COMMANDS:
        assert f"{spec.usage} " in text and spec.help in text
    assert "/quit" in text
    assert "--range A-B" in format_help("video") and "--frames N" in format_help("/video")
    assert "--skip-missing" in format_help("load") and "[--skip-missing]" in text
    with pytest.raises(UsageError, match="did you mean /image"):
        format_help("imgae")


def test_a_long_word_for_help_or_set_is_cut_short_in_the_error():
    # a pasted 5,000-character word came back whole: one error of some 60 terminal rows
    from internvl_chat.ui.set_keys import set_key

    with pytest.raises(UsageError) as err:
        format_help("x" * 5000)
    assert str(err.value) == "unknown command /" + "x" * 39 + "…; type /help for the commands"
    with pytest.raises(UsageError) as err:
        set_key("y" * 5000)
    assert str(err.value) == "unknown setting '" + "y" * 38 + "…; /set alone lists the settings it can change"


def test_help_on_the_double_slash_it_lists_explains_it():
    # /help lists "//TEXT", but `/help //` answered "unknown command /"
    assert format_help("//") == format_help("/") == "//TEXT  send a message that starts with /"


def test_a_range_that_is_not_utf8_is_shown_as_its_bytes():
    # argv is decoded with surrogateescape: repr showed the byte as '\udcff', every other line says \xff
    with pytest.raises(UsageError) as error:
        parse_range("1-\udcff\x1b")
    assert "invalid time range '1-\\xff\\e';" in str(error.value)


@pytest.mark.parametrize(
    "line, shown",
    [
        ("/drop ١", "/drop: N must be written with the digits 0-9, not '\\u0661'; usage: /drop N"),
        ("/drop ２", "not '\\uff12'"),  # fullwidth
        ("/drop 𝟏", "not '\\U0001d7cf'"),  # mathematical bold
        ("/video a.mp4 --frames ٣", "/video: --frames must be written with the digits 0-9, not '\\u0663'; usage: /video"),
        ("/video a.mp4 --frames=१", "not '\\u0967'"),  # Devanagari
        ("/video a.mp4 --range ١-٢", "invalid time range: it must be written with the digits 0-9, not '\\u0661-\\u0662'"),
        ("/video a.mp4 --range 1:٣٠-2:00", "not '1:\\u0663\\u0660-2:00'"),
    ],
)  # fmt: skip
def test_numbers_in_other_digits_are_refused_with_the_text_escaped(line, shown):
    # int(), float() and \d read them: `/drop ١` dropped item 1 while the line showed another script
    with pytest.raises(UsageError) as err:
        parse_line(line)
    message = str(err.value)
    assert shown in message and message.isascii()
