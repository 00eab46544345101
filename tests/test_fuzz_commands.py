"""A deterministic mutation fuzz of the REPL's input lines, as a `--script` file gives them (an
untrusted file): each mutated command or message runs through App.handle_line on the tiny model,
which must answer OK, ERROR (its one-line error printed) or EXIT, and never raise.

Lines are mutated as words (a word replaced by a hostile one, dropped, doubled) and as bytes
(tests/fuzz_helpers.py); they run one after another, so a command meets the state earlier ones
left (attachments, turns, settings, a saved file).
"""

from __future__ import annotations

import random

import pytest
from app_helpers import make_app
from fuzz_helpers import LONG, SCALE, Findings, byte_mutants
from media_helpers import textured_rgb, write_numbered_video
from PIL import Image

from internvl_chat.ui.app import ERROR, EXIT, OK

SCRIPT_LINES = (
    "/image cat.png", "/image cat.png cat.png", "/video clip.mp4 --frames 2 --range 0-0.1", "/media", "/drop 1",
    "/set temperature 0.7", "/set max_tiles 2", "/set seed 5", "/set max_new_tokens 3", "/set", "/system Be brief.",
    "/system --default", "/system", "What is this?", '"""\na block\nof lines\n"""', "/retry", "/undo", "/context",
    "/show", "/stats", "/save chat.json --force", "/load chat.json", "/load", "/export chat.md --force", "/clear",
    "/help video", "/image c*.png",
)  # fmt: skip
HOSTILE_WORDS = (
    "", "0", "-1", "1e400", "nan", "inf", "-0", "99999999999999999999", "1.5", "0x10", "--frames", "--range", "5-1",
    "0-1e9", "1:99:99", "--force", "--skip-missing", "--default", '"', "'", '"unclosed', "\\", "*", "[", "?", "~",
    "~nobody/x.png", "..", "/", "/dev/zero", "/proc/self/mem", "x" * LONG, "\x1b[2J", "\u202e", "\ud800", "NUL\x00",
    "cat.png", "clip.mp4", "chat.json", "/image", "/set", "temperature", "top_k", "frames", "system.message",
)  # fmt: skip


def _word_mutant(rng: random.Random, line: str) -> str:
    words = line.split(" ")
    for _ in range(rng.randint(1, 2)):
        # the command word is kept most of the time: its arguments are what is parsed
        at = rng.randrange(1, len(words)) if len(words) > 1 and rng.random() < 0.8 else rng.randrange(len(words))
        kind = rng.choice(["replace", "replace", "insert", "drop", "double"])
        if kind == "replace":
            words[at] = rng.choice(HOSTILE_WORDS)
        elif kind == "insert":
            words.insert(at, rng.choice(HOSTILE_WORDS))
        elif kind == "drop" and len(words) > 1:
            del words[at]
        else:
            words.insert(at, words[at])
    return " ".join(words)


def _mutated_lines(seed: int, count: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for index in range(count):
        if index % 12 == 11:  # the tiny model's 2,048-token context fills up: start again now and then
            out.append((f"seed {seed} line {index}", "/clear"))
            continue
        line = rng.choice(SCRIPT_LINES)
        if rng.random() < 0.85:
            out.append((f"seed {seed} line {index}: {line!r} as words", _word_mutant(rng, line)))
        else:
            label, data = next(iter(byte_mutants(line.encode(), seed * 1000 + index, 1)))
            out.append((f"seed {seed} line {index}: {line!r} {label}", data.decode("utf-8", "surrogateescape")))
    return out


@pytest.mark.parametrize("seed", [31])
def test_mutated_script_lines(loaded, tmp_path, capfd, seed):
    Image.fromarray(textured_rgb(96, 40, seed=3)).save(tmp_path / "cat.png")
    write_numbered_video(tmp_path / "clip.mp4", num_frames=6)
    app, out = make_app(loaded, tmp_path, max_new_tokens=3, **{"media.max_tiles": 1})  # a picture fits the context
    assert app.handle_line("/save chat.json") == OK
    findings = Findings("script lines", capfd)

    def run(line: str) -> None:
        result = app.handle_line(line)
        assert result in (OK, ERROR, EXIT), result
        out.truncate(0), out.seek(0)

    for label, line in _mutated_lines(seed, 300 * SCALE):
        findings.check(f"{label} -> {line[:80]!r}", lambda: run(line), refusals=())
    findings.assert_none()
