"""A deterministic mutation fuzz of the REPL's input lines, as a `--script` file gives them (an
untrusted file): each mutated command or message runs through App.handle_line on the tiny model,
which must answer OK, ERROR (its one-line error printed) or EXIT, and never raise.

Lines are mutated as words (a word replaced by a hostile one, dropped, doubled) and as bytes
(tests/fuzz_helpers.py); they run one after another, so a command meets the state earlier ones
left (attachments, turns, settings, a saved file).
"""

from __future__ import annotations

import json
import os
import random

import pytest
from app_helpers import make_app, output
from fuzz_helpers import LONG, SCALE, Findings, byte_mutants, json_text, spread, tree_mutants
from media_helpers import textured_rgb, write_numbered_video
from PIL import Image

from internvl_chat.ui.app import ERROR, EXIT, OK

SCRIPT_LINES = (
    "/image cat.png", "/image cat.png cat.png", "/video clip.mp4 --frames 2 --range 0-0.1", "/media", "/drop 1",
    "/set temperature 0.7", "/set max_tiles 2", "/set seed 5", "/set max_new_tokens 3", "/set", "/system Be brief.",
    "/system --default", "/system", "What is this?", '"""\na block\nof lines\n"""', "/retry", "/undo", "/context",
    "/show", "/stats", "/save chat.json --force", "/load chat.json", "/load", "/export chat.md --force", "/clear",
    "/help video", "/image c*.png", "/load old.json", "/load old --skip-missing", "/save old.json", "/export old.json",
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


def _session_mutants(good: bytes, seed: int, count: int) -> list[bytes]:
    """Damaged copies of a session this app saved, for /load, /save and the /load listing to meet."""
    as_tree = [json_text(tree).encode("utf-8", "surrogatepass") for _, tree in tree_mutants(json.loads(good), seed, count)]
    return as_tree + [data for _, data in byte_mutants(good, seed, count)]


@pytest.mark.parametrize("seed", [31])
def test_mutated_script_lines(loaded, tmp_path, capfd, monkeypatch, seed):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the sessions folder /load lists
    Image.fromarray(textured_rgb(96, 40, seed=3)).save(tmp_path / "cat.png")
    write_numbered_video(tmp_path / "clip.mp4", num_frames=6)
    app, out = make_app(loaded, tmp_path, max_new_tokens=3, **{"media.max_tiles": 1})  # a picture fits the context
    for line in ("/image cat.png", "What is it?", "/save chat.json"):
        assert app.handle_line(line) == OK, output(out)
    saved = (tmp_path / "chat.json").read_text(encoding="utf-8")
    for folder, fixed in ((loaded.path, "/fuzz/model"), (tmp_path, "/fuzz")):  # vary from run to run: the mutants must not
        saved = saved.replace(json.dumps(str(folder))[1:-1], fixed)
    damaged = _session_mutants(saved.encode(), seed, 60 * SCALE)
    listed = tmp_path / "state" / "internvl-chat" / "sessions"
    listed.mkdir(parents=True)
    findings = Findings("script lines", capfd)

    def run(line: str, session: bytes) -> None:
        for path in (tmp_path / "old.json", listed / "old.json"):
            path.write_bytes(session)
        result = app.handle_line(line)
        assert result in (OK, ERROR, EXIT), result
        out.truncate(0), out.seek(0)

    for index, (label, line) in enumerate(_mutated_lines(seed, 300 * SCALE)):
        session = damaged[index % len(damaged)]
        findings.check(f"{label} -> {line[:80]!r} (session mutant {index % len(damaged)})", lambda: run(line, session), refusals=())
    findings.assert_none()


ANSWER = """# A heading

Some *emphasis*, **strong**, `code`, a [link](http://example.com "title") and ![a cat](cat.png).

| a | b |
|---|:-:|
| 1 | two **x** |

1. one
   - nested
     > quoted `deep`
2. two

```python
print("hi")  # a comment
```

<b>html</b> &amp; an entity, a footnote[^1], ~~struck~~, $x^2$, a line\\
break and a tab\there.

[^1]: the note
"""


def test_mutated_answers_render_and_export(tmp_path, capfd):
    """A server's answer is untrusted text: shown live as Markdown on a terminal, then exported."""
    from io import StringIO

    from rich.console import Console

    from app_helpers import ChunkedAnswers
    from internvl_chat.settings import load_settings
    from internvl_chat.ui.app import App

    rng = random.Random(33)
    findings = Findings("answers", capfd)
    for label, data in byte_mutants(ANSWER.encode(), 33, 60, spread([i for i, c in enumerate(ANSWER.encode()) if c == 10], 10)):
        text = data.decode("utf-8", "replace")
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 12))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        out = StringIO()
        console = Console(file=out, width=rng.choice([20, 80]), color_system="truecolor", force_terminal=True, force_interactive=False)
        app = App(ChunkedAnswers(chunks), load_settings(os.devnull, env={}), console, cwd=tmp_path)

        def answer() -> None:
            assert app.handle_line("Go.") == OK
            assert app.handle_line("/export talk.md --force") == OK

        findings.check(label, answer, refusals=())
    findings.assert_none()
