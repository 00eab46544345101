"""The internvl2_5 (ChatML) prompt template, built directly as token ids (SPEC §3).

A turn is a list of pieces: plain text and runs of one special token. Adjacent text pieces are
joined and each text segment is tokenized on its own (`Tokenizer.encode`: nothing added), exactly
as the tokenizer itself splits a full prompt string at its special tokens — so the ids equal
`tokenizer(render_text(...), add_special_tokens=False).input_ids` without ever tokenizing a
100k-character `<IMG_CONTEXT>` run. Text is tokenized as transformers does with
`split_special_tokens=True`: typing "<|im_end|>" or "<IMG_CONTEXT>" cannot inject control tokens
or break the image-token count.

Turn layout (the session keeps earlier turns in the KV cache):
    first:  [<|im_start|>system\\n{SYS}<|im_end|>\\n]<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n
    next:   <|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n
The `<|im_end|>\\n` opening a later turn closes the previous answer (whose stop token was sampled
but never fed to the model). serve lays every conversation out message by message (any order of roles):
    message:  <|im_start|>{role}\\n{content}<|im_end|>\\n   (`answer_cue` and `answer_close`: an assistant's halves)
Every boundary is a special token, so both layouts give the same ids for the same conversation.
Content puts all images (given order) before all videos (given order):
    one image: <image>\\n{Q}     several: Image-1: <image>\\nImage-2: <image>\\n{Q}
    a video:   Frame1: <image>\\nFrame2: <image>\\n…{Q}   (numbering restarts for each video)
and every <image> is <img> + <IMG_CONTEXT> × (tokens_per_tile · tiles) + </img>, one tile per frame.
Image features must be given to the model in `media_order(media)` order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from ..engine.tokenizer import as_tokenizer
from ..errors import CheckpointError, MediaError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class MediaSpec:
    """One image (`tiles` = its tile count, thumbnail included) or one video (`tiles` = frame count)."""

    kind: Literal["image", "video"]
    tiles: int

    def __post_init__(self) -> None:
        if self.kind not in ("image", "video"):
            raise MediaError(f"unknown media kind {self.kind!r}; attach an image or a video")
        if not isinstance(self.tiles, int) or self.tiles < 1:
            what = "frames" if self.kind == "video" else "tiles"
            raise MediaError(f"a {self.kind} with {self.tiles!r} {what} cannot be used; it must have at least one")


@dataclass(frozen=True)
class _Run:
    """`count` copies of one special token."""

    token: str
    count: int = 1


_Piece = Union[str, _Run]


def media_order(media: Sequence[MediaSpec]) -> list[int]:
    """Indices of `media` in prompt order: images first, then videos, each kind in the given order."""
    images = [i for i, m in enumerate(media) if m.kind == "image"]
    return images + [i for i, m in enumerate(media) if m.kind == "video"]


class PromptBuilder:
    """Token ids of chat turns for one tokenizer and system message."""

    def __init__(self, tokenizer: Any, system_message: str | None, tokens_per_tile: int = 256):
        if tokens_per_tile < 1:
            raise CheckpointError(f"tokens_per_tile {tokens_per_tile} is invalid; the checkpoint config is inconsistent")
        self.tokenizer = as_tokenizer(tokenizer)  # a transformers tokenizer is wrapped (tests, tools)
        self.system_message = system_message or None  # "" means no system block, like None
        self.tokens_per_tile = tokens_per_tile
        self.im_start_id = self._special_id(IM_START)
        self.im_end_id = self._special_id(IM_END)
        self.img_start_id = self._special_id(IMG_START)
        self.img_end_id = self._special_id(IMG_END)
        self.img_context_id = self._special_id(IMG_CONTEXT)
        self.end_of_text_id = self._special_id(END_OF_TEXT, required=False)
        self._ids = {
            IM_START: self.im_start_id,
            IM_END: self.im_end_id,
            IMG_START: self.img_start_id,
            IMG_END: self.img_end_id,
            IMG_CONTEXT: self.img_context_id,
        }

    def _special_id(self, token: str, required: bool = True) -> int | None:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is not None:
            return token_id
        if required:
            raise CheckpointError(
                f"the tokenizer has no {token} token; the checkpoint's tokenizer files are not InternVL's "
                "(re-download tokenizer.json / tokenizer_config.json)"
            )
        return None

    # ---- public API -------------------------------------------------------------------------

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end an answer: <|im_end|> and <|endoftext|>."""
        ids = [self.im_end_id]
        if self.end_of_text_id is not None:
            ids.append(self.end_of_text_id)
        return tuple(ids)

    def first_turn(self, text: str, media: Sequence[MediaSpec] = ()) -> list[int]:
        """Ids of the conversation's first turn, system block included when there is one."""
        return self._to_ids(self._first_turn_pieces(text, media))

    def next_turn(self, text: str, media: Sequence[MediaSpec] = ()) -> list[int]:
        """Ids of a later turn: closes the previous answer, then the user message, then the assistant cue."""
        return self._to_ids(self._next_turn_pieces(text, media))

    def user_turn(self, text: str, media: Sequence[MediaSpec] = ()) -> list[int]:
        """`next_turn` without the leading `<|im_end|>\\n` (for a cache whose last answer is already closed)."""
        return self._to_ids(self._user_pieces(text, media))

    def message(self, role: str, text: str, media: Sequence[MediaSpec] = ()) -> list[int]:
        """Ids of one whole message, `<|im_start|>{role}\\n{content}<|im_end|>\\n`, as the chat template
        renders every message (serve, which takes the messages in any order). Every piece boundary
        is a special token, so the turns above are these blocks and `answer_cue` laid end to end."""
        return self._to_ids(self._block_pieces(role, text, media))

    def answer_cue(self) -> list[int]:
        """`<|im_start|>assistant\\n`: an assistant message's opening, or the cue for the answer."""
        return self._to_ids([_Run(IM_START), "assistant\n"])

    def answer_close(self) -> list[int]:
        """`<|im_end|>\\n`: closes an assistant message (the cue's side of `message`)."""
        return self._to_ids([_Run(IM_END), "\n"])

    def render_text(
        self, text: str, media: Sequence[MediaSpec] = (), first: bool = True, expand_images: bool = True
    ) -> str:
        """The prompt string equivalent to `first_turn` / `next_turn`.

        With expand_images=False each image is shown as `<image>` instead of its token run (for /show).
        """
        pieces = self._first_turn_pieces(text, media) if first else self._next_turn_pieces(text, media)
        if not expand_images:
            pieces = _collapse_images(pieces)
        return "".join(p if isinstance(p, str) else p.token * p.count for p in pieces)

    def image_token_count(self, media: Sequence[MediaSpec]) -> int:
        """How many <IMG_CONTEXT> ids (= rows of image features) a turn with `media` carries."""
        return self.tokens_per_tile * sum(m.tiles for m in media)

    media_order = staticmethod(media_order)

    # ---- pieces ----------------------------------------------------------------------------

    def _first_turn_pieces(self, text: str, media: Sequence[MediaSpec]) -> list[_Piece]:
        pieces: list[_Piece] = []
        if self.system_message:
            pieces += self._block_pieces("system", self.system_message, ())
        return pieces + self._user_pieces(text, media)

    def _next_turn_pieces(self, text: str, media: Sequence[MediaSpec]) -> list[_Piece]:
        return [_Run(IM_END), "\n", *self._user_pieces(text, media)]

    def _user_pieces(self, text: str, media: Sequence[MediaSpec]) -> list[_Piece]:
        return [*self._block_pieces("user", text, media), _Run(IM_START), "assistant\n"]

    def _block_pieces(self, role: str, text: str, media: Sequence[MediaSpec]) -> list[_Piece]:
        return [_Run(IM_START), f"{role}\n", *self._content_pieces(text, media), _Run(IM_END), "\n"]

    def _content_pieces(self, text: str, media: Sequence[MediaSpec]) -> list[_Piece]:
        ordered = [media[i] for i in media_order(media)]
        images = [m for m in ordered if m.kind == "image"]
        videos = [m for m in ordered if m.kind == "video"]
        pieces: list[_Piece] = []
        if len(images) == 1:
            pieces += [*self._image_pieces(images[0].tiles), "\n"]
        else:
            for n, image in enumerate(images, start=1):
                pieces += [f"Image-{n}: ", *self._image_pieces(image.tiles), "\n"]
        for video in videos:
            for frame in range(1, video.tiles + 1):
                pieces += [f"Frame{frame}: ", *self._image_pieces(1), "\n"]
        return [*pieces, text]

    def _image_pieces(self, tiles: int) -> list[_Piece]:
        return [_Run(IMG_START), _Run(IMG_CONTEXT, self.tokens_per_tile * tiles), _Run(IMG_END)]

    # ---- ids -------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _to_ids(self, pieces: list[_Piece]) -> list[int]:
        ids: list[int] = []
        pending = ""  # adjacent text pieces are tokenized as one segment, as in the full string
        for piece in pieces:
            if isinstance(piece, str):
                pending += piece
                continue
            ids += self._encode(pending)
            pending = ""
            ids += [self._ids[piece.token]] * piece.count
        ids += self._encode(pending)
        return ids


def _collapse_images(pieces: list[_Piece]) -> list[_Piece]:
    out: list[_Piece] = []
    for piece in pieces:
        if isinstance(piece, _Run) and piece.token in (IMG_START, IMG_END):
            if piece.token == IMG_START:
                out.append(IMAGE_PLACEHOLDER)
            continue
        if isinstance(piece, _Run) and piece.token == IMG_CONTEXT:
            continue
        out.append(piece)
    return out
