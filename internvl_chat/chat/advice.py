"""What the user can do about a turn that does not fit, in the words of the mode they are in.

The REPL and `--script` take commands (/clear, /undo, /drop N, /set max_new_tokens N); one-shot
mode (`internvl-chat -p …`) takes none, so there the fixes are the flags of the next run
(--max-tiles, --frames, --max-new-tokens). Commands that forget earlier turns are named only when
there are earlier turns to forget: on a first turn (every one-shot question) they free nothing.
A conversation's `commands` field says which mode it is in; one-shot mode sets it to False.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Advice:
    commands: bool = True  # the user can type commands (REPL, --script); False in one-shot mode
    earlier: bool = True  # earlier turns hold context that /undo or /clear would free
    media: bool = True  # the request holds pictures or videos (fewer tiles or frames would free some)
    tiles: bool = True  # the server takes a tile limit (llama.cpp tiles its own way, whatever max_tiles says)

    @property
    def fewer_media(self) -> str:
        if not self.tiles:
            return "use fewer or smaller pictures, or fewer frames" + ("" if self.commands else " (--frames)")
        return "use fewer tiles or frames" if self.commands else "use fewer tiles or frames (--max-tiles, --frames)"

    @property
    def smaller_content(self) -> str:
        """Fewer tiles or frames; for a request without pictures or videos, a shorter message."""
        if self.media:
            return self.fewer_media
        return "a shorter message" if self.commands else "a shorter prompt"

    @property
    def smaller_answer(self) -> str:
        return "a smaller max_new_tokens" if self.commands else "a smaller --max-new-tokens"

    @property
    def shorter_system(self) -> str:
        if self.commands:
            return "use a shorter system message (/system TEXT, --system)"
        return "use a shorter system message (--system)"

    @property
    def fewer_attachments(self) -> str:
        return "/drop attachments" if self.commands else "attach fewer files"

    def forget(self, commands: str) -> list[str]:
        """`commands` ("/undo or /clear") as a fix when they free something, else no fix."""
        return [commands] if self.commands and self.earlier else []

    def overflow_fixes(self, first: Callable[[], str], at_edge: bool, answer_fits: bool) -> list[str]:
        """The fixes of a turn over the context, local or remote alike. `at_edge`: the conversation
        itself is the problem (no next turn, however short, fits after it), so forgetting turns and,
        where it alone fits (`answer_fits`), a shorter answer; else `first()` (a smaller turn), /clear
        and a shorter answer."""
        if at_edge:
            return [*self.forget("/undo or /clear"), *([self.smaller_answer] if answer_fits else [])]
        return [first(), *self.forget("/clear"), self.smaller_answer]


def any_of(fixes: list[str]) -> str:
    """`a, b, or c`: fixes the user may pick from."""
    return fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + ", or " + fixes[-1]
