"""The one conversation interface the UI talks to, whoever computes the answers.

Two implementations: `chat.session.Session` (the local engine: exact token ids, KV cache) and
`chat.remote.RemoteConversation` (an OpenAI-compatible server: the client keeps the messages and
resends them each turn). The UI must never ask which one it has: everything that differs is a
method or a field here. Where a remote server cannot tell us a number before the request (tokens
of a picture, the context already used), the conversation answers with an estimate and says so
in `token_counts_exact`; the UI shows `≈` instead of branching on the backend.

Events from `ask` and `retry` (both implementations):
    {"text": new text since the last event, "usage": {...} | None, "finish_reason": None, "timing": None}
    … then one final event with "finish_reason" ("stop", "length" or "cancelled"; a remote answer
    that broke off after some text: "error"), "usage", "timing" and "token_ids" (the answer's ids;
    None when the server does not send them); a remote answer's may also have a "note": one line
    saying why it was cut ("length", "error").
On an error or an interrupt before the final event, the conversation is as it was before the turn.

Timing keys (all optional; the UI shows what is there): `vision_s`, `prefill_tokens`,
`prefill_s`, `prefill_tokens_per_s`, `ttft_s`, `decode_tokens`, `decode_s`,
`decode_tokens_per_s` (measured where the answer is computed, or by the client for a remote
server), and `server`: a dict of numbers the server itself reported (`prompt_tokens`,
`completion_tokens`, `cached_tokens`, llama.cpp's `prompt_ms`, `predicted_per_second`, …), to be
shown labelled as server-reported.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .sampling import SamplingParams

if TYPE_CHECKING:  # session.py imports this module: no import cycle at run time
    from .session import Media

__all__ = ["BackendInfo", "Conversation", "PromptView", "TurnLike"]


@dataclass(frozen=True)
class BackendInfo:
    """Where answers come from, for the banner, /stats and exports.

    `memory_device` names the device whose peak memory is worth showing after an answer
    (None when the model does not run in this process).
    """

    name: str  # the model: checkpoint folder name or the server's model id
    where: str  # "cpu float32", "cuda:0 bfloat16", "http://host:8000/v1 (vLLM)"
    model: str  # full model path or id (saved with a session, shown by /load)
    context: int | None  # tokens the conversation may hold; None when the server does not say
    load_s: float | None = None  # model load, or the server handshake
    memory_device: str | None = None
    demo: bool = False  # the embedded demo model, which answers only a few kinds of questions
    # what else makes room when the context is full; "" when nothing does (already the model's limit)
    more_room: str = "a larger --max-context"


@dataclass(frozen=True)
class PromptView:
    """The last prompt as /show prints it: `text` with each picture shown as a short marker."""

    turn: int  # 1-based
    text: str
    note: str = ""  # e.g. how many tokens an <image> stands for


class TurnLike(Protocol):
    """What the UI reads from `conversation.turns[i]` (Session's `Turn`, remote's `RemoteTurn`)."""

    user_text: str
    media: list[Media]
    answer_text: str  # as shown: a cancelled answer ends with " [cancelled]"
    finish_reason: str | None
    timing: dict | None

    @property
    def answer_tokens(self) -> int | None:
        """Tokens of the answer (None when unknown)."""
        ...


@runtime_checkable
class Conversation(Protocol):
    params: SamplingParams
    stream_interval: int
    system_message: str | None
    turns: list  # of TurnLike
    token_counts_exact: bool  # False: token numbers below are estimates (a remote server counts the real ones)
    # True where the user can type commands (REPL, --script); one-shot mode sets False, so that what
    # an error says to do names the next run's flags instead (chat/advice.py)
    commands: bool

    # ---- identity ---------------------------------------------------------------------------
    def describe(self) -> BackendInfo: ...

    # ---- budget -----------------------------------------------------------------------------
    @property
    def max_context(self) -> int | None:
        """Tokens the conversation may hold; None when unknown (a remote server then refuses itself)."""
        ...

    @property
    def context_used(self) -> int:
        """Tokens the conversation holds now."""
        ...

    def media_tokens(self, media: Sequence[Media]) -> int:
        """Tokens these media add to a turn, labels such as `Image-1: ` included."""
        ...

    def tiles_sent(self, media: Media) -> int:
        """The tiles the model gets of a picture (a server may tile its own way), a video's frames."""
        ...

    def turn_tokens(self, media: Sequence[Media]) -> int:
        """Tokens the next turn adds with these attachments and an empty message (template included)."""
        ...

    def check_attach(self, media: Sequence[Media]) -> None:
        """Raise ContextOverflowError when the next turn with these attachments, a message of one
        token (none is empty) and an answer of max_new_tokens cannot fit; do nothing when the limit
        is unknown."""
        ...

    def context_items(self, pending: Sequence[Media]) -> list[tuple[str, int]]:
        """The budget item by item for /context: system message, each turn, the attachments, the
        next message's template and the answer reserve. They add up to the most the context holds
        after the next answer (plus the next message's text)."""
        ...

    # ---- media ------------------------------------------------------------------------------
    def describe_image(self, path: str | Path, max_tiles: int | None = None) -> Media:
        """Measure an image without decoding it: the UI shows the cost before any work. `max_tiles`
        None (or 0): the model's own limit (a remote one's is taken to be InternVL3's, 12)."""
        ...

    def describe_video(self, path: str | Path, frames: int = 8, video_range: tuple[float, float] | None = None) -> Media: ...

    # ---- turns ------------------------------------------------------------------------------
    def ask(
        self,
        text: str,
        media: Sequence[Media] = (),
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[dict]: ...

    def retry(self, params: SamplingParams | None = None, cancel: threading.Event | None = None) -> Iterator[dict]:
        """Answer the last question again (events as `ask`); on an error or an interrupt before the
        final event the old answer stays. Session feeds one token of the cached question again; a
        server gets the conversation resent."""
        ...

    def undo(self) -> Any:  # the removed TurnLike
        ...

    def clear(self) -> None: ...

    def set_system(self, text: str | None) -> None: ...

    @property
    def default_system_message(self) -> str | None:
        """The system message the model gets when none is set (`/system --default`): the checkpoint's
        own; None for a server, which then applies its chat template's default."""
        ...

    def last_prompt(self) -> PromptView | None: ...

    # ---- persistence ------------------------------------------------------------------------
    # A session file saved by either conversation loads into either (chat/session_file.py).
    def to_json(self, settings: dict | None = None, path: str | Path | None = None) -> dict:
        """The conversation as `save` writes it to `path`."""
        ...

    def save(self, path: str | Path, settings: dict | None = None) -> Path: ...

    def read_saved(self, path: str | Path, skip_missing: bool = False) -> Any:
        """Read, validate and measure a session file (a `ReadiedSession`), changing nothing:
        a damaged file, media that vanished or changed raise one-line errors. `skip_missing`:
        such media are left out of their turns instead (listed in its `left_out`), and each
        turn's text gets a note in their place, e.g. `[image cat.png was not found]`."""
        ...

    def restore(self, readied: Any) -> None:
        """Replace the conversation with one `read_saved` returned; on an error nothing changed.
        It must fit in the context, not leave room for another answer (the next question says so)."""
        ...

    def load(self, path: str | Path, skip_missing: bool = False) -> dict:
        """Replace the conversation with a saved one; returns the saved JSON."""
        ...
