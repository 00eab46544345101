"""An App over a local Session or a server, printing into a string, as the app tests drive it."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from internvl_chat.chat.sampling import params_from_settings as sampling_params
from internvl_chat.chat.session import Session
from internvl_chat.settings import load_settings
from internvl_chat.ui.app import App


def make_app(loaded, cwd: Path, *, max_new_tokens: int | None = 8, width: int = 200, terminal: bool = False,
             interactive: bool = False, file=None, **overrides) -> tuple[App, io.StringIO]:  # fmt: skip
    """`max_new_tokens` None: the settings' default (short answers keep the tests fast); `overrides`
    are dotted settings keys, e.g. **{"media.max_tiles": 2}."""
    if max_new_tokens is not None:
        overrides = {"generation.max_new_tokens": max_new_tokens, **overrides}
    settings = load_settings(os.devnull, env={}, overrides=overrides)
    session = Session(loaded, params=sampling_params(settings))
    out = file or io.StringIO()
    console = Console(file=out, width=width, force_terminal=terminal, color_system=None)
    return App(session, settings, console, interactive=interactive, cwd=cwd), out


def make_remote_app(url: str, cwd: Path, *, width: int = 200) -> tuple[App, io.StringIO]:
    """An App over the server at `url` (--server): answers of 8 tokens at most, as make_app's."""
    from internvl_chat.chat.remote import RemoteConversation  # httpx is imported only for a server, as the app does

    settings = load_settings(os.devnull, env={}, overrides={"generation.max_new_tokens": 8, "remote.server": url})
    conversation = RemoteConversation.connect(url, params=sampling_params(settings))
    out = io.StringIO()
    return App(conversation, settings, Console(file=out, width=width, color_system=None), cwd=cwd), out


def output(out: io.StringIO) -> str:
    """What was printed since the last call."""
    text = out.getvalue()
    out.truncate(0), out.seek(0)
    return text


class ChunkedAnswers:
    """A conversation without a model: each message is answered with the next list of text deltas,
    streamed as given (where the tokenizer splits an answer is what the display must cope with)."""

    system_message = None
    stream_interval = 1
    token_counts_exact = True
    commands = True
    max_context = None
    context_used = 0

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.turns: list = []
        self.params = None

    def describe(self):
        return SimpleNamespace(model="chunked", memory_device=None, load_s=0.0, more_room="")

    def check_attach(self, media) -> None:
        pass

    def ask(self, text, media=(), params=None, cancel=None):
        chunks = self.answers.pop(0)
        for chunk in chunks:
            yield {"text": chunk, "finish_reason": None}
        self.turns.append(_Turn(user_text=text, answer_text="".join(chunks), media=list(media), timing={},
                                answer_tokens=None, finish_reason="stop"))  # fmt: skip
        yield {"text": "", "finish_reason": "stop", "timing": {}, "usage": {}}


class _Turn(SimpleNamespace):
    """A turn of `ChunkedAnswers`; weakly referable as the app's turns are (App._file_mark)."""
