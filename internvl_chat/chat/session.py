"""A conversation over one KV cache: turns, start_pos, budget, undo/retry, save/load.

The cache is positional. `ids` holds every committed token; the cache is valid for
`ids[:start_pos]`, and the tokens after it (at most one: the token that hit the length limit) are
prefilled at the head of the next turn. Each turn prefills only its own new tokens, and the vision
encoder runs only on media attached to that turn. Undo moves `start_pos` back to a turn boundary:
nothing before it is re-prefilled. Retry moves it back to the last token of its turn's prompt, which
is still cached: that one token is fed again (see `_cached_prompt_end`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import torch

from ..engine.loader import LoadedModel
from ..engine.model import PromptScores
from ..errors import Cancelled, ContextOverflowError, GenerationError, InternVLChatError, MediaError, UsageError
from ..files import expand_home, shortened, visible, write_atomic
from ..media.image import IMAGE_SIZE, count_tiles, load_image, probe_image, unused_pictures
from ..media.video import VideoLength, load_video, measure_video
from ..media.video_sampling import used_range
from .advice import Advice, any_of
from .conversation import BackendInfo, PromptView
from .generate import MEDIA_ADVICE, is_out_of_memory, out_of_memory_as_error, stream_generate
from .kv_slots import OwnKVCache, common_prefix_length
from .sampling import NON_FINITE_IN_FLOAT32, NON_FINITE_MESSAGE, Sampler, SamplingParams
from .saved_media import LeftOut, ReadiedSession, saved_media, sha256_of, with_notes
from .session_file import (CANCELLED_MARK, SESSION_FILE_MODE, SESSION_FORMAT, SESSION_VERSION, SavedSession, SavedTurn,
                           media_json_paths, read_session_file, session_json)  # fmt: skip
from .template import MediaSpec, PromptBuilder, media_order


# messages shorter than this are simply tokenized (the bound below costs a pass over the vocabulary once)
HOPELESS_TEXT_MIN_CHARS = 1 << 16
# what a message adds to its turn's template at least: the app sends no empty message (turn_tokens
# counts an empty one), so a next turn that fits only with no text cannot be asked at all
MESSAGE_TOKENS_AT_LEAST = 1


@dataclass
class Media:
    """An image or video attached to a turn: where it came from and what it costs."""

    kind: str  # "image" or "video"
    path: Path
    tiles: int  # image tiles, or video frames (one tile each)
    max_tiles: int = 12
    frames: int = 8
    video_range: tuple[float, float] | None = None
    size: tuple[int, int] | None = None  # image (w, h)
    # what an image file holds beyond the one picture used ("animated: only its first frame is used"),
    # read once as it is measured, for the attach line (and /media's list); not saved
    unused_note: str | None = None
    duration: float | None = None  # video seconds (those the file holds)
    cut_short: tuple[int, int] | None = None  # a video cut short: (frames it holds, frames its header lists)
    ends_early: bool = False  # an MKV, WebM or AVI cut short inside its frames (how many it holds: found decoding)
    sha256: str = ""
    bytes: int = 0
    pixel_values: torch.Tensor | None = field(default=None, repr=False)
    timestamps: list[float] | None = None
    decode_note: str | None = None  # what decoding found the user should know (a video cut short); not saved
    # the attach line said the video is cut short (`cut_short`, from its index): decoding's note on
    # it would say so a second time
    cut_short_said: bool = False

    def take_note(self) -> str | None:
        """The decode note, once: it is said with the answer it was sent with, unless the attach
        line said it already."""
        note, self.decode_note = self.decode_note, None
        return None if self.cut_short_said else note

    @classmethod
    def from_image_file(cls, path: Path, max_tiles: int, use_thumbnail: bool = True, image_size: int = IMAGE_SIZE,
                        min_tiles: int = 1) -> Self:  # fmt: skip
        """An image measured from its header, not decoded: its tiles under these limits (those of
        `count_tiles`). Called on RemoteMedia it makes one, so local and remote measure alike."""
        width, height = probe_image(path)
        tiles = count_tiles(width, height, max_tiles, use_thumbnail, image_size, min_tiles)
        return cls("image", path, tiles, max_tiles=max_tiles, size=(width, height), bytes=path.stat().st_size,
                   unused_note=unused_pictures(path))  # fmt: skip

    @classmethod
    def from_video_file(cls, path: Path, frames: int, video_range: tuple[float, float] | None) -> Self:
        """A video measured from its index, not decoded: `frames` sampled from `video_range`
        (clamped to the file's length)."""
        if frames < 1:
            raise MediaError(f"--frames must be at least 1 (got {frames})")
        length = measure_video(path)
        return cls("video", path, frames, frames=frames, video_range=used_range(video_range, length.duration),
                   duration=length.duration, cut_short=cut_short(length), ends_early=length.ends_early,
                   bytes=path.stat().st_size)  # fmt: skip

    @property
    def spec(self) -> MediaSpec:
        return MediaSpec(self.kind, self.tiles)

    @property
    def prepared(self) -> bool:
        """Whether the work before sending it is done (decoded here; read or sampled for a server)."""
        return self.pixel_values is not None

    def to_json(self, session_file: Path = Path("session.json")) -> dict:
        out = {"kind": self.kind, **media_json_paths(self.path, session_file), "bytes": self.bytes, "sha256": self.sha256,
               "tiles": self.tiles}  # fmt: skip
        if self.kind == "image":
            out.update(max_tiles=self.max_tiles, size=list(self.size or ()))
        else:
            out.update(frames=self.frames, range=list(self.video_range) if self.video_range else None)
        return out


@dataclass
class Turn:
    user_text: str
    media: list[Media]
    ids_before: int  # len(ids) when the turn began: undo truncates here
    pos_before: int  # start_pos when the turn began: undo rewinds the cache here
    prompt_ids: list[int] = field(default_factory=list)
    answer_ids: list[int] = field(default_factory=list)
    answer_text: str = ""
    finish_reason: str | None = None
    timing: dict | None = None
    features: torch.Tensor | None = field(default=None, repr=False)  # kept so /undo + /retry skip the ViT

    @property
    def answer_tokens(self) -> int:
        return len(self.answer_ids)


class Session:
    def __init__(
        self,
        loaded: LoadedModel,
        params: SamplingParams | None = None,
        system_message: str | None = None,
        use_checkpoint_system: bool = True,
        stream_interval: int = 1,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.params = params or SamplingParams()
        if system_message is None and use_checkpoint_system:
            system_message = loaded.config.system_message
        self.system_message = system_message
        self.stream_interval = stream_interval
        self.commands = True  # the user can type commands; one-shot mode sets False (chat/advice.py)
        self.builder = PromptBuilder(self.tokenizer, system_message, loaded.config.tokens_per_tile)
        self.ids: list[int] = []
        self.start_pos = 0
        self.turns: list[Turn] = []

    # ---- budget ----------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.model.max_seq_len

    @property
    def more_context(self) -> list[str]:
        """"a larger --max-context" as a fix, unless the context is already the model's own limit
        (the loader refuses any larger one)."""
        at_limit = self.max_context >= self.loaded.config.text.max_position_embeddings
        return [] if at_limit else ["a larger --max-context"]

    def media_tokens(self, media: Sequence[Media]) -> int:
        """Tokens these media add to a turn, labels such as `Image-1: ` included."""
        return len(self._turn_ids("", media)) - len(self._turn_ids("", []))

    def tiles_sent(self, media: Media) -> int:
        return media.tiles

    def _turn_ids(self, text: str, media: Sequence[Media]) -> list[int]:
        specs = [m.spec for m in media]
        if not self.ids:
            return self.builder.first_turn(text, specs)
        return self.builder.next_turn(text, specs)

    @property
    def advice(self) -> Advice:
        # /clear frees only what is cached: nothing before the first answer, so never in one-shot mode
        return Advice(self.commands, earlier=self.start_pos > 0)

    def check_budget(self, new_tokens: int, max_new_tokens: int | None = None,
                     first_fix: Callable[[], str] | None = None, cached: int | None = None) -> None:  # fmt: skip
        """`first_fix`: what to shorten first (the largest part of the new tokens, `_largest_part_fix`),
        worked out only when the turn does not fit; by default the attachments. `cached`: the tokens
        before the turn (by default start_pos)."""
        max_new = self.params.max_new_tokens if max_new_tokens is None else max_new_tokens
        cached = self.start_pos if cached is None else cached
        need = cached + new_tokens + max_new
        if need > self.max_context:
            # /clear frees only what is cached before the turn: nothing before the first answer
            advice = Advice(self.commands, earlier=cached > 0)
            # at the edge (a long conversation): no shorter message and no fewer attachments fit
            at_edge = self.commands and cached > 0 and cached + self._smallest_next_turn() + max_new > self.max_context
            answer_fits = cached + new_tokens + 1 <= self.max_context  # max_new_tokens is at least 1
            fixes = advice.overflow_fixes(first_fix or (lambda: advice.fewer_media), at_edge, answer_fits)
            if max_new > new_tokens and fixes[-1] == advice.smaller_answer:  # the answer's reserve is the larger part
                fixes = [f"use {advice.smaller_answer}", *fixes[:-1]]  # (a short question, a small --max-context)
            raise ContextOverflowError(
                f"this turn needs {cached:,} cached + {new_tokens:,} new + {max_new:,} answer tokens = {need:,}, "
                f"over the {self.max_context:,}-token context; {any_of([*fixes, *self.more_context])}"
            )

    def _smallest_next_turn(self) -> int:
        """The fewest tokens any next turn takes: the uncached tail of a cut answer, the template and
        a message's one token, without attachments."""
        return len(self.ids) - self.start_pos + len(self._turn_ids("", [])) + MESSAGE_TOKENS_AT_LEAST

    def _refuse_hopeless_text(self, text: str, max_new_tokens: int) -> None:
        """Refuse, before tokenizing it, a message whose fewest possible tokens already overflow,
        with the system message on a first turn (it may come from config.json or a config file)."""
        system = self.builder.system_message if not self.ids else None
        if len(text) + len(system or "") < HOPELESS_TEXT_MIN_CHARS:
            return
        fewest, fewest_system = self._fewest_tokens(text), self._fewest_tokens(system)
        if self.start_pos + fewest + fewest_system + max_new_tokens <= self.max_context:
            return
        if fewest_system > fewest:
            raise ContextOverflowError(
                f"the system message is at least {fewest_system:,} tokens ({len(system or ''):,} characters): with this "
                f"message and {max_new_tokens:,} answer tokens that is over the {self.max_context:,}-token context; "
                f"{any_of([self.advice.shorter_system, *self.more_context])}"
            )
        system_part = f", at least {fewest_system:,} of the system message" if fewest_system else ""
        raise ContextOverflowError(
            f"this message is at least {fewest:,} tokens ({len(text):,} characters): with {self.start_pos:,} cached"
            f"{system_part} and {max_new_tokens:,} answer tokens that is over the {self.max_context:,}-token context; "
            f"{any_of(['send a shorter message', *self.advice.forget('/clear'), *self.more_context])}"
        )

    def _fewest_tokens(self, *texts: str | None) -> int:
        """A lower bound on the tokens of these texts, each tokenized on its own, without tokenizing
        any (a 15 MB text takes ~25 s and ~3 GB to tokenize, only to be refused)."""
        return sum(self.tokenizer.fewest_tokens(text) for text in texts if text)

    def _largest_part_fix(self, new_ids: list[int], media: Sequence[Media]) -> str:
        """What shortens a turn (`new_ids`) that does not fit: its largest part, the message text (a
        long paste), the system message (on the first turn) or the attachments."""
        bare, with_media = len(self._turn_ids("", [])), len(self._turn_ids("", media))
        system = bare - len(self.builder.user_turn("", [])) if not self.ids else 0
        parts = {
            self.advice.fewer_media: with_media - bare,
            "send a shorter message": len(new_ids) - with_media,
            self.advice.shorter_system: system,
        }
        return max(parts, key=parts.get)

    # ---- media -----------------------------------------------------------------------------
    def describe_image(self, path: str | Path, max_tiles: int | None = None) -> Media:
        """Measure an image without decoding it fully: the UI shows the cost before any work.

        `max_tiles` None (or 0) means the checkpoint's own limit (max_dynamic_patch); the limit
        actually used is what the Media records, so /context and saved sessions agree.
        """
        cfg = self.loaded.config
        min_tiles, max_tiles = cfg.tile_limits(max_tiles)
        return Media.from_image_file(expand_home(path), max_tiles, cfg.use_thumbnail, cfg.image_size, min_tiles)

    def describe_video(self, path: str | Path, frames: int = 8, video_range: tuple[float, float] | None = None) -> Media:
        return Media.from_video_file(expand_home(path), frames, video_range)

    def _decode(self, media: Media) -> torch.Tensor:
        if media.pixel_values is None:
            size = self.loaded.config.image_size
            if media.kind == "image" and media.sha256:  # decoded again (a loaded session, a retry): still that picture?
                _check_unchanged(media)
            if media.kind == "image":
                min_tiles, max_tiles = self.loaded.config.tile_limits(media.max_tiles)
                image = load_image(media.path, max_tiles, self.loaded.config.use_thumbnail, size, min_tiles)
                pixels = image.pixel_values
            else:
                start, end = media.video_range or (None, None)
                video = load_video(media.path, media.frames, start, end, size)
                pixels = video.pixel_values
            # checked before keeping them: kept pixels are trusted, and a resend must fail the same way
            if pixels.shape[0] != media.tiles:
                raise MediaError(f"{visible(media.path.name)} changed after it was attached: it gave {pixels.shape[0]} tiles, "
                                 f"expected {media.tiles}; attach it again")
            if media.kind == "image":
                media.pixel_values, media.size = pixels, image.size
            else:
                media.pixel_values, media.timestamps = pixels, list(video.timestamps)
                media.decode_note = video.shortfall_note
        if not media.sha256:
            media.sha256 = sha256_of(media.path)
            media.bytes = media.path.stat().st_size  # the size hashed, saved with the hash
        return media.pixel_values

    def _encode(self, media: Sequence[Media], cancel: threading.Event | None) -> tuple[torch.Tensor | None, float]:
        if not media:
            return None, 0.0
        with out_of_memory_as_error("reading the attachments", MEDIA_ADVICE):  # decoding and tiling allocate too
            pixels = torch.cat([self._decode(m) for m in media])
        t0 = time.perf_counter()
        with out_of_memory_as_error("in the vision encoder"):
            features = self.model.encode_images(pixels, cancel)
        if features.device.type == "cuda":
            torch.cuda.synchronize(features.device)
        return features, time.perf_counter() - t0

    # ---- turns -------------------------------------------------------------------------------
    def _make_sampler(self, params: SamplingParams) -> Sampler:
        special = self.loaded.special
        # never in an answer: an image token would take a picture's feature slot at the next prefill,
        # and /load replays no answer ids holding one or a turn's start (<|im_start|> would open a
        # hidden turn), so such an answer would come back as other ids than the conversation held
        banned = (special.img_start, special.img_end, special.img_context, special.im_start)
        sampler = Sampler(params, self.loaded.config.text.vocab_size, self.model.device, banned_ids=banned)
        sampler.observe(self.ids)  # converted only with a repetition penalty: the whole conversation each turn
        return sampler

    def ask(
        self,
        text: str,
        media: Sequence[Media] = (),
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[dict]:
        """Run one turn and stream its events. On any error the session is as before the turn."""
        params = params or self.params
        params.validate()
        # the template puts images before videos; keep features in that same order
        media = [media[i] for i in media_order([m.spec for m in media])]
        self._refuse_hopeless_text(text, params.max_new_tokens)
        new_ids = self._turn_ids(text, media)
        pending = self.ids[self.start_pos :]  # e.g. the token that hit the length limit
        prompt = pending + new_ids
        self.check_budget(len(prompt), params.max_new_tokens, lambda: self._largest_part_fix(new_ids, media))
        turn = Turn(text, media, ids_before=len(self.ids), pos_before=self.start_pos, prompt_ids=new_ids)
        features, vision_s = self._encode(media, cancel)
        turn.features = features
        yield from self._run_turn(turn, prompt, features, vision_s, params, cancel)

    def _run_turn(self, turn, prompt, features, vision_s, params, cancel, scores=None) -> Iterator[dict]:
        """Prefill `prompt` at start_pos and stream the answer; on a failure the session is as before
        (ids and start_pos; the cache from start_pos on is zeroed where it may hold NaN)."""
        ids_len, pos = len(self.ids), self.start_pos
        with out_of_memory_as_error("during generation"):  # its masks are the size of the vocabulary
            sampler = self._make_sampler(params)
            sampler.observe(prompt)
        events = stream_generate(
            self.model, self.tokenizer, prompt, self.start_pos, params, sampler,
            image_features=features, stop_ids=self.builder.stop_ids,
            stream_interval=self.stream_interval, cancel=cancel, vision_s=vision_s, scores=scores,
        )  # fmt: skip
        text_parts = []
        try:
            for event in events:
                text_parts.append(event["text"])
                if event["finish_reason"] is not None:
                    self._commit(turn, prompt, event, "".join(text_parts))
                    notice = media_notes(turn.media)
                    if notice:
                        event["notice"] = notice
                yield event
        except (GenerationError, KeyboardInterrupt, Cancelled) as e:
            if self.turns and self.turns[-1] is turn:  # a Ctrl-C as the commit ended, before its event was given
                self.turns.pop()
            self._rewind(ids_len, pos)
            if isinstance(e, GenerationError):
                self._clear_cache_from(pos)
                if str(e) == NON_FINITE_MESSAGE and self.model.dtype == torch.float32:
                    raise GenerationError(NON_FINITE_IN_FLOAT32) from None
            elif isinstance(e, Cancelled):  # the chunks prefilled so far: as after a failure, no NaN may stay
                self._clear_cache_from(pos, pos + len(prompt))
            raise

    def _commit(self, turn: Turn, prompt: list[int], event: dict, text: str) -> None:
        self.ids = self.ids[: self.start_pos] + prompt + event["token_ids"]
        self.start_pos = event["cache_end"]
        if event["finish_reason"] == "stop" and self.start_pos < self.max_context:
            # the stop token was fed before it was read (generate.py overlaps them): its keys and
            # values at cache_end belong to no conversation, and an overflow there (NaN) would
            # outlive an /undo, read by the masked decode step (see _clear_cache_from)
            self._clear_cache_from(self.start_pos, self.start_pos + 1)
        if event["finish_reason"] == "cancelled":
            text += f" {CANCELLED_MARK}" if text else CANCELLED_MARK
        turn.answer_ids = list(event["token_ids"])
        turn.answer_text = text
        turn.finish_reason = event["finish_reason"]
        turn.timing = event["timing"]
        self.turns.append(turn)
        _release_pixels(turn)

    def _rewind(self, ids_len: int, pos: int) -> None:
        self.ids = self.ids[:ids_len]
        self.start_pos = pos

    def _clear_cache_from(self, pos: int, end: int | None = None) -> None:
        """Zero the active KV cache from `pos` on (to `end`) after a failed turn: a half-precision
        overflow may have left NaN there, and the masked decode step (CUDA graphs) reads past its
        position, where 0 × NaN is NaN, so every later turn would fail too."""
        with torch.inference_mode():  # the cache may be an inference tensor
            for k, v in self.model.language_model.caches():
                k[:, :, pos:end].zero_()
                v[:, :, pos:end].zero_()

    def undo(self) -> Turn:
        if not self.turns:
            raise UsageError("nothing to undo; the conversation is empty")
        turn = self.turns.pop()
        self._rewind(turn.ids_before, turn.pos_before)
        return turn

    def retry(self, params: SamplingParams | None = None, cancel: threading.Event | None = None) -> Iterator[dict]:
        """Drop the last answer and generate a new one for the same question.

        The question's prompt is still cached: only its last token is fed again, which gives the new
        answer's first token; nothing is prefilled before it and the vision encoder does not run.
        Where the cache cannot be shown to hold the prompt, the whole prompt is prefilled again with
        the turn's kept image features. If the new answer fails or is interrupted before it is
        committed, the old one is restored.
        """
        if not self.turns:
            raise UsageError("nothing to retry; ask something first")
        last = self.turns[-1]
        params = params or self.params
        params.validate()
        prompt_end = self._cached_prompt_end(last)
        if prompt_end is None:
            yield from self._retry_prefilling(last, params, cancel)
            return
        # the prompt (its pending tokens, then prompt_ids) as the turn had it: the budget and its
        # message are those of asking it again
        self._check_retry_budget(last, prompt_end - last.pos_before, params.max_new_tokens, last.pos_before)
        saved = (list(self.ids), self.start_pos)
        cut = prompt_end - 1  # the prompt's last token: fed again at its own position
        prompt = self.ids[cut:prompt_end]
        committed, written = False, None
        try:  # from the pop on: a Ctrl-C at any point puts the old answer back
            self.turns.pop()
            self._rewind(cut, cut)
            written = cut
            turn = Turn(last.user_text, last.media, ids_before=last.ids_before, pos_before=last.pos_before,
                        prompt_ids=list(last.prompt_ids))  # fmt: skip
            turn.features = last.features
            for event in self._run_turn(turn, prompt, None, 0.0, params, cancel):
                committed = event["finish_reason"] is not None
                yield event
        finally:
            if not committed:
                self._restore_turn(last, saved, written)

    def _check_retry_budget(self, turn: Turn, new_tokens: int, max_new_tokens: int, cached: int) -> None:
        """The budget of asking `turn` again: as `check_budget`'s, but with the fixes that work for a
        retry. The question and its attachments stay as they were asked, so fewer tiles or frames,
        a shorter message or /clear (which removes the turn) cannot make it fit: a smaller answer can,
        or asking it again otherwise after /undo."""
        need = cached + new_tokens + max_new_tokens
        if need <= self.max_context:
            return
        fixes = []
        answer_fits = cached + new_tokens + 1 <= self.max_context  # max_new_tokens is at least 1
        if answer_fits:
            fixes.append(f"use {self.advice.smaller_answer}")
        if turn.media:
            fixes.append("/undo and ask it with fewer tiles or frames")
        elif not answer_fits or new_tokens > max_new_tokens:  # the question itself is the larger part
            fixes.append("/undo and ask it shorter")
        raise ContextOverflowError(
            f"this turn needs {cached:,} cached + {new_tokens:,} new + {max_new_tokens:,} answer tokens = {need:,}, "
            f"over the {self.max_context:,}-token context; {any_of([*fixes, *self.more_context])}"
        )

    def _cached_prompt_end(self, turn: Turn) -> int | None:
        """Where the last turn's prompt ends in ids, when the KV cache provably holds all of it; else None.

        The invariant /retry relies on: a committed turn's prompt (the pending tokens from pos_before,
        then prompt_ids from ids_before) was prefilled before its answer's first token, and nothing
        moves start_pos back into it while the turn stays: an answer commits with start_pos past it
        (stopped, cut at the length limit or cancelled); undo and a failed turn rewind to a turn's
        pos_before and remove that turn; a failed retry restores start_pos (re-prefilling what it
        overwrote); load and /system prefill the whole conversation. Checked here rather than trusted:
        start_pos covers the prompt, and ids there are the prompt the builder gives now.
        """
        builder = self.builder
        prompt = self._turn_prompt(builder, 0 if turn.ids_before == 0 else 1, turn)  # first or a next turn
        end = turn.ids_before + len(prompt)
        images = (builder.img_start_id, builder.img_end_id, builder.img_context_id)
        if not (prompt and turn.pos_before <= turn.ids_before and end <= self.start_pos):
            return None
        if prompt != turn.prompt_ids or self.ids[turn.ids_before : end] != prompt or prompt[-1] in images:
            return None
        return end

    def _retry_prefilling(self, last: Turn, params: SamplingParams, cancel: threading.Event | None) -> Iterator[dict]:
        """Retry by prefilling the turn's whole prompt again (its cache cannot be shown to hold it)."""
        features = last.features
        if features is None and last.media:
            features, _ = self._encode(last.media, cancel)
            last.features = features
        saved = (list(self.ids), self.start_pos)
        committed, written = False, None
        try:  # from the undo on: a Ctrl-C at any point puts the old answer back
            self.undo()
            new_ids = self._turn_ids(last.user_text, last.media)
            prompt = self.ids[self.start_pos :] + new_ids
            turn = Turn(last.user_text, last.media, ids_before=len(self.ids), pos_before=self.start_pos, prompt_ids=new_ids)
            turn.features = features
            self._check_retry_budget(last, len(prompt), params.max_new_tokens, self.start_pos)
            written = self.start_pos
            for event in self._run_turn(turn, prompt, features, 0.0, params, cancel):
                committed = event["finish_reason"] is not None
                yield event
        finally:
            if not committed:
                self._restore_turn(last, saved, written)

    def _restore_turn(self, turn: Turn, saved: tuple[list[int], int], written: int | None) -> None:
        """Put back a turn that a failed /retry removed, re-prefilling its cached tokens from
        `written` on, where the retry began to write the cache (None: it wrote nothing)."""
        ids, end = saved
        if self.turns and self.turns[-1] is turn:  # interrupted before the retry removed it: nothing changed
            self.ids, self.start_pos = ids, end
            return
        # as undo leaves it, should the prefill fail too: consistent, the turn removed (the prefill
        # needs more memory than the decode step that may have failed, so it may run out as well)
        self.ids, self.start_pos = ids[: turn.ids_before], turn.pos_before
        if written is not None:
            # the prompt's image tokens are in the part written again only when it starts before the prompt
            features = turn.features if written <= turn.ids_before else None
            with out_of_memory_as_error("putting the last answer back"):
                self.model.forward(ids[written:end], written, features)
        self.ids, self.start_pos = ids, end
        self.turns.append(turn)

    def clear(self) -> None:
        self.ids, self.start_pos, self.turns = [], 0, []

    def set_system(self, text: str | None) -> None:
        """Change the system message; an ongoing conversation is re-prefilled under the new one."""
        builder = PromptBuilder(self.tokenizer, text, self.loaded.config.tokens_per_tile)
        if self.turns:
            self._replay(list(self.turns), builder, "a shorter system message, /undo first")
        self.builder, self.system_message = builder, text

    @property
    def default_system_message(self) -> str | None:
        return self.loaded.config.system_message

    @property
    def context_used(self) -> int:
        return len(self.ids)

    # ---- replay, save, load ------------------------------------------------------------------
    def conversation_ids(self, turns: Sequence[Turn], builder: PromptBuilder | None = None) -> list[int]:
        """The token ids of a whole conversation, exactly as turn-by-turn chatting produces them."""
        builder = builder or self.builder
        ids: list[int] = []
        for i, turn in enumerate(turns):
            ids += self._turn_prompt(builder, i, turn) + turn.answer_ids
        return ids

    @staticmethod
    def _turn_prompt(builder: PromptBuilder, index: int, turn: Turn) -> list[int]:
        specs = [m.spec for m in turn.media]
        return builder.first_turn(turn.user_text, specs) if index == 0 else builder.next_turn(turn.user_text, specs)

    def _replay(self, turns: list[Turn], builder: PromptBuilder, advice: str = "", ids: list[int] | None = None) -> None:
        """Prefill a whole conversation at once under `builder` (used by load and /system).

        Nothing changes if the conversation does not fit or a media file cannot be read; if the
        prefill itself fails, the cache no longer matches anything, so the session is cleared.
        The conversation only has to fit in the cache, not leave room for another answer: one that
        filled the context is read back as it was held, and /undo, /retry or /export still work
        (the next question is refused with its own message, as it was before the save).
        `ids`: the conversation's ids under `builder`, where they were counted already (read_saved).
        """
        least = len(ids) if ids is not None else 0
        if ids is None:
            least, ids = self._conversation_size(turns, builder)
        if ids is None or len(ids) > self.max_context:
            fixes = [advice] if advice else []
            fixes += self.more_context
            raise ContextOverflowError(
                f"the conversation needs {f'at least {least:,}' if ids is None else f'{len(ids):,}'} tokens, over the "
                f"{self.max_context:,}-token context{_use(fixes)}"
            )
        features = self._kept_features(turns)
        if features is None:
            features, _ = self._encode([m for t in turns for m in t.media], None)
        try:
            if ids:  # a conversation saved before its first question has nothing to prefill
                self.model.forward(ids, 0, features)
        except BaseException as e:
            self.clear()
            if is_out_of_memory(e):
                raise GenerationError(
                    f"out of memory reading the {len(ids):,}-token conversation again, so it was cleared; "
                    "use a smaller --max-context or a 4-bit model"
                ) from None
            raise
        # rebuild turn boundaries (and each turn's features) so undo and retry work after a replay
        self.ids, self.turns = [], []
        offset = 0
        for i, turn in enumerate(turns):
            turn.prompt_ids = self._turn_prompt(builder, i, turn)
            turn.ids_before = turn.pos_before = len(self.ids)
            tiles = sum(m.tiles for m in turn.media)
            # a copy unless it is all of them: a view would keep every turn's features alive for as
            # long as any one turn stays (an /undo of a picture's turn would free nothing)
            part = features[offset : offset + tiles] if tiles else None
            turn.features = part.clone() if part is not None and tiles < features.shape[0] else part
            offset += tiles
            self.ids += turn.prompt_ids + turn.answer_ids
            self.turns.append(turn)
            _release_pixels(turn)
        self.start_pos = len(self.ids)

    def _conversation_size(self, turns: list[Turn], builder: PromptBuilder) -> tuple[int, list[int] | None]:
        """(a bound below the conversation's tokens, its ids); the ids None where the bound is over
        the context: a huge system message or message is refused without being tokenized."""
        least = self._fewest_tokens(builder.system_message, *(t.user_text for t in turns)) + sum(len(t.answer_ids) for t in turns)
        least += sum(m.tiles for t in turns for m in t.media) * builder.tokens_per_tile  # their image tokens alone
        return least, self.conversation_ids(turns, builder) if least <= self.max_context else None

    @staticmethod
    def _kept_features(turns: Sequence[Turn]) -> torch.Tensor | None:
        """The image features the turns kept (asked or replayed in this session), in prompt order;
        None where a turn with media kept none (a loaded session's turns), so they are encoded."""
        parts = [t.features for t in turns if t.media]
        if not parts or any(p is None for p in parts):
            return None
        return torch.cat(parts)

    def to_json(self, settings: dict | None = None, path: str | Path | None = None) -> dict:
        """The session as JSON; with `path` (where it is saved) media also get a path relative to it."""
        where = Path(path) if path is not None else Path("session.json")
        return {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "backend": {"kind": "local"},
            "model": str(self.loaded.path),
            "system_message": self.system_message,
            "settings": settings or {},
            "messages": [
                msg
                for t in self.turns
                for msg in (
                    {"role": "user", "text": t.user_text, "media": [m.to_json(where) for m in t.media]},
                    {"role": "assistant", "text": t.answer_text, "token_ids": t.answer_ids, "finish_reason": t.finish_reason},
                )
            ],
        }

    def save(self, path: str | Path, settings: dict | None = None) -> Path:
        """Write the session as JSON atomically; a symlink at `path` is replaced, never followed.

        OSError names `path` (never the temporary file).
        """
        path = expand_home(path)
        return write_atomic(path, session_json(self.to_json(settings, path)), SESSION_FILE_MODE)

    def load(self, path: str | Path, skip_missing: bool = False) -> dict:
        """Replace the conversation with a saved one, re-prefilling it. Returns the saved JSON.

        The whole file is validated and its media found and measured first; a file that fails
        any check leaves the conversation exactly as it was.
        """
        readied = self.read_saved(path, skip_missing)
        self.restore(readied)
        return readied.saved.data

    def read_saved(self, path: str | Path, skip_missing: bool = False) -> ReadiedSession:
        """Read, validate and resolve a session file without touching the conversation.

        Raises UsageError for a damaged file, MediaError for media that vanished or changed (with
        `skip_missing`: they are left out of their turns, each turn's text noting its gap), and
        ContextOverflowError for a conversation that cannot fit.
        """
        path = expand_home(path)
        builder = self.builder
        forbidden = (builder.img_start_id, builder.img_end_id, builder.img_context_id)
        # ids past this vocabulary (a session saved with another model) are no damage: the answer's
        # text is tokenized again (`_answer_ids`)
        saved = read_session_file(path, None, forbidden)
        # cheap bound before hashing any media or tokenizing any text: image tokens and the fewest
        # tokens the texts can take must fit (an answer's saved ids, unless its text replaces them)
        # (media that may be left out count for nothing: the replay counts exactly)
        least = 0 if skip_missing else sum(sum(m.tiles for m in t.media) * builder.tokens_per_tile for t in saved.turns)
        least += sum(min(len(t.answer_ids), self._fewest_tokens(t.reply)) if t.answer_ids is not None
                     else self._fewest_tokens(t.reply) for t in saved.turns)  # fmt: skip
        least += self._fewest_tokens(saved.system_message, *(t.user_text for t in saved.turns))
        if least > self.max_context:
            exact = None if skip_missing else self._saved_tokens(saved)  # a left-out file's tokens are not known yet
            need = f"{exact:,}" if exact is not None else f"more than {least:,}"
            raise ContextOverflowError(
                f"the conversation in {visible(str(path))} needs {need} tokens, over the "
                f"{self.max_context:,}-token context{_use(self.more_context)}"
            )
        turns, left_out = self._turns_from_saved(saved, skip_missing)
        # exactly, before anything asks to replace the conversation (the REPL's y/N): the bound above
        # is below what the turns take (their texts' tokens, the template), as the replay would find
        least, ids = self._conversation_size(turns, self._saved_builder(saved))
        if ids is None or len(ids) > self.max_context:
            need = f"at least {least:,}" if ids is None else f"{len(ids):,}"
            raise ContextOverflowError(
                f"the conversation in {visible(str(path))} needs {need} tokens, over the "
                f"{self.max_context:,}-token context{_use(self.more_context)}"
            )
        return ReadiedSession(saved, turns, left_out, ids)

    def _saved_tokens(self, saved: SavedSession) -> int | None:
        """The tokens a saved conversation takes, counted from the file alone (its media's saved
        tiles, not the files), so that a refusal says how large a context it needs, not a bound
        below it; None where that would tokenize a long text (the bound is then all there is)."""
        texts = [saved.system_message or "", *(t.user_text for t in saved.turns), *(t.reply for t in saved.turns)]
        if sum(map(len, texts)) >= HOPELESS_TEXT_MIN_CHARS:
            return None
        # the saved ids are decoded to be checked against their text: as many as such texts take at
        # most (a few a character), not the millions a file may hold behind a short text
        if sum(len(t.answer_ids or ()) for t in saved.turns) >= 4 * HOPELESS_TEXT_MIN_CHARS:
            return None
        builder = self._saved_builder(saved)
        total = 0
        try:
            for number, turn in enumerate(saved.turns, start=1):
                specs = [MediaSpec(m.kind, m.tiles) for m in turn.media]
                specs = [specs[i] for i in media_order(specs)]
                prompt = builder.first_turn(turn.user_text, specs) if number == 1 else builder.next_turn(turn.user_text, specs)
                total += len(prompt) + len(self._answer_ids(turn, number, saved.path))
        except InternVLChatError:  # refused later, with its own message, as without this count
            return None
        return total

    def restore(self, readied: ReadiedSession) -> None:
        """Replay a conversation read by `read_saved` (prefilling it); on error nothing changed.

        Only a failing prefill itself clears the conversation (the cache then matches nothing).
        """
        system = self._saved_system(readied.saved)
        builder = PromptBuilder(self.tokenizer, system, self.loaded.config.tokens_per_tile)
        self._replay(list(readied.turns), builder, ids=readied.ids)  # counted by read_saved under this system
        self.builder, self.system_message = builder, system

    def _saved_system(self, saved: SavedSession) -> str | None:
        system = saved.system_message
        if system is None and saved.kind == "remote":
            system = self.default_system_message  # none was sent: the server used the model's default
        return system

    def _saved_builder(self, saved: SavedSession) -> PromptBuilder:
        """The prompt builder a saved conversation is replayed under (its system message)."""
        return PromptBuilder(self.tokenizer, self._saved_system(saved), self.loaded.config.tokens_per_tile)

    def _turns_from_saved(self, saved: SavedSession, skip_missing: bool = False) -> tuple[list[Turn], list[LeftOut]]:
        media, left_out = saved_media(saved, self.describe_image, self.describe_video, skip_missing)
        turns: list[Turn] = []
        for number, (saved_turn, turn_media) in enumerate(zip(saved.turns, media), start=1):
            # in prompt order (images before videos), as `ask` keeps them: features are encoded in this order
            turn_media = [turn_media[i] for i in media_order([m.spec for m in turn_media])]
            text = with_notes(saved_turn.user_text, [m for m in left_out if m.turn == number])
            turn = Turn(text, turn_media, 0, 0)
            turn.answer_ids = self._answer_ids(saved_turn, len(turns) + 1, saved.path)
            turn.answer_text = saved_turn.reply
            if saved_turn.finish_reason == "cancelled":
                turn.answer_text += f" {CANCELLED_MARK}" if saved_turn.reply else CANCELLED_MARK
            turn.finish_reason = saved_turn.finish_reason
            turns.append(turn)
        return turns, left_out

    def _answer_ids(self, saved: SavedTurn, number: int, path: Path) -> list[int]:
        """The answer's ids: as saved, or (a session saved from a server's answers, which has no ids)
        the answer's text tokenized again, when that is clearly the same text: the ids give it back
        exactly, and it holds no U+FFFD (the mark of bytes that were not UTF-8, whose tokens the text
        cannot give back).

        Saved ids are kept only when they are the saved text (decoded as the answer streamed) and
        hold no end-of-turn token, which ends every answer before it: the model must read the
        answer the user sees. An edited text, ids that spell a hidden turn, or ids of another
        model's vocabulary are tokenized again from the text."""
        if saved.answer_ids is not None:
            ids = list(saved.answer_ids)
            # a turn's start too: `<|im_start|>system …` inside an answer is a hidden turn the text
            # does not show (the answer's own end closes it), as an end of turn would start one
            turn_marks = {*self.builder.stop_ids, self.builder.im_start_id}
            vocab = self.loaded.config.text.vocab_size
            if (all(i < vocab for i in ids) and not turn_marks.intersection(ids)
                    and self.tokenizer.decode(ids, skip_special_tokens=True) == saved.reply):  # fmt: skip
                return ids
            return self.tokenizer.encode(saved.reply)
        ids = self.tokenizer.encode(saved.reply)
        if "\ufffd" in saved.reply or self.tokenizer.decode(ids) != saved.reply:
            raise UsageError(
                f"answer {number} in {visible(str(path))} was saved from a server without its tokens, and its text "
                "cannot give them back exactly (bytes that were not UTF-8); continue it with --server, or start anew"
            )
        return ids

    # ---- the Conversation interface (chat/conversation.py) -----------------------------------
    # What the UI asks of any conversation, so it never needs to know this one is local.

    token_counts_exact = True

    def describe(self) -> BackendInfo:
        dtype = str(getattr(self.model, "dtype", "")).replace("torch.", "")
        quant = getattr(self.loaded.config, "quant", None)
        weights = f"W{quant.bits} {quant.method.upper()} g{quant.group_size} (rest {dtype})" if quant else dtype
        return BackendInfo(
            name=self.loaded.path.name,
            where=f"{self.loaded.device} {weights}".strip(),
            model=str(self.loaded.path),
            context=self.max_context,
            load_s=self.loaded.load_s,
            memory_device=str(self.loaded.device),
            demo=_is_demo_model(self.loaded.path),
            more_room=any_of(self.more_context) if self.more_context else "",
        )


    def turn_tokens(self, media: Sequence[Media]) -> int:
        """Tokens of the next turn with these attachments and an empty message (labels exact)."""
        return len(self._turn_ids("", media))

    def check_attach(self, media: Sequence[Media]) -> None:
        """The next turn with these attachments must fit, with the uncached tail of a cut answer and
        the one token its message takes at least (a message is never empty)."""
        self.check_budget(len(self.ids) - self.start_pos + self.turn_tokens(media) + MESSAGE_TOKENS_AT_LEAST)

    def context_items(self, pending: Sequence[Media]) -> list[tuple[str, int]]:
        """The context budget item by item (see Conversation.context_items)."""
        builder = self.builder
        items: list[tuple[str, int]] = []
        system = len(builder.first_turn("", [])) - len(builder.user_turn("", []))
        if system:
            items.append(("system message" if self.turns else "system message (sent with the first message)", system))
        bounds = [t.ids_before for t in self.turns] + [self.context_used]
        for n, turn in enumerate(self.turns):
            total = bounds[n + 1] - bounds[n] - (system if n == 0 else 0)
            media = self.media_tokens(turn.media) if turn.media else 0  # no tokenizing per text-only turn
            answer = len(turn.answer_ids)
            names = "".join(f"{m.kind} {m.path.name}, " for m in turn.media)
            text = shortened(" ".join(turn.user_text.split()), 32)
            detail = f" (media {media:,} · answer {answer:,})" if media else f" (answer {answer:,})"
            items.append((f"turn {n + 1}: {names}“{text}”{detail}", total))
        for media in pending:
            items.append((f"attached: {media.kind} {media.path.name}", self.media_tokens([media])))
        template = self.turn_tokens(pending) - self.media_tokens(pending) - (0 if self.ids else system)
        items.append(("next message: template, plus your text", template))
        items.append(("reserved for the answer (max_new_tokens)", self.params.max_new_tokens))
        return items

    def last_prompt(self) -> PromptView | None:
        if not self.turns:
            return None
        index = len(self.turns) - 1
        turn = self.turns[index]
        specs = [m.spec for m in turn.media]
        text = self.builder.render_text(turn.user_text, specs, first=index == 0, expand_images=False)
        notes = []
        if index:  # a later turn's prompt is what it added: it starts by closing the answer before it
            notes.append(f"only what it added to the conversation before it; the first <|im_end|> closes turn {index}'s answer")
        if specs:
            notes.append(f"each <image> stands for {self.builder.tokens_per_tile} tokens per tile, "
                         f"{self.builder.image_token_count(specs):,} in all")  # fmt: skip
        return PromptView(index + 1, text, "; ".join(notes))

    # ---- prefix reuse across requests (used by `internvl-chat serve`) --------------------------
    #
    # A server gets the whole conversation with every request. A Session used as a server slot keeps
    # the ids it last held in its KV cache; a new request keeps the longest part of the cache that it
    # shares with the new prompt, rewinds there (the cache is positional) and prefills only the rest,
    # exactly as `ask` prefills only a turn's new tokens. Each slot may own its KV tensors, so several
    # conversations stay cached on one model; activating a slot points the model at its tensors.

    def own_kv_cache(self, share_model_cache: bool = False) -> int:
        """Give this session KV tensors of its own (or adopt the model's current ones); returns their bytes.

        When several sessions share one model, call `activate_kv_cache()` before each one's turn.
        """
        self._kv = OwnKVCache(self.model, share_model_cache)
        return self._kv.bytes

    def activate_kv_cache(self) -> None:
        kv = getattr(self, "_kv", None)
        if kv is not None:
            kv.activate(self.model)

    def cached_prefix(self, ids: Sequence[int]) -> int:
        """How many leading `ids` the KV cache holds already (token ids only; media identity is the caller's)."""
        return common_prefix_length(self.ids[: self.start_pos], ids)

    def check_continuation(self, ids: Sequence[int], reuse: int, params: SamplingParams) -> None:
        """Raise what `continue_with(ids, reuse, …, params)` would refuse before prefilling anything
        (serve asks before it tells a stream's client that its request was taken)."""
        params.validate()
        if not 0 <= reuse < len(ids) or reuse > self.start_pos or list(self.ids[:reuse]) != list(ids[:reuse]):
            raise ValueError(f"cannot reuse {reuse} tokens: the cache does not hold them, or nothing is left to prefill")
        need = len(ids) + params.max_new_tokens
        if need > self.max_context:
            raise ContextOverflowError(
                f"this request needs {len(ids):,} prompt + {params.max_new_tokens:,} answer tokens = {need:,}, over the "
                f"{self.max_context:,}-token context; send a shorter conversation, fewer images or a smaller max_tokens"
            )

    def continue_with(
        self,
        ids: Sequence[int],
        reuse: int,
        features: torch.Tensor | None = None,
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
        vision_s: float = 0.0,
        scores: PromptScores | None = None,
    ) -> Iterator[dict]:
        """Answer the whole prompt `ids` (a conversation ending in the assistant cue), keeping the cache
        for `ids[:reuse]` and prefilling `ids[reuse:]`; `features` are the image features of that rest.
        `scores`: the prefilled tokens after the first are scored into it (engine/model.py).

        Events are those of `ask`; on any error the session holds `ids[:reuse]`. The turn structure of
        the conversation is not tracked (the caller resends it whole): `turns` holds this answer only.
        """
        params = params or self.params
        ids = list(ids)
        self.check_continuation(ids, reuse, params)
        self._rewind(reuse, reuse)
        self.turns = []
        turn = Turn("", [], ids_before=reuse, pos_before=reuse, prompt_ids=ids[reuse:])
        turn.features = features
        yield from self._run_turn(turn, ids[reuse:], features, vision_s, params, cancel, scores)


def cut_short(length: VideoLength) -> tuple[int, int] | None:
    """(frames held, frames listed) for a video file cut short (Media.cut_short), else None."""
    return (length.frames, length.listed_frames) if length.listed_frames else None


def media_notes(media: Sequence[Media], *more: str | None) -> str | None:
    """The notes decoding left on a turn's media (taken: said once) and `more`, as one line, or None.
    A note is said once, even when the file it is about is attached twice (with other frames, say)."""
    notes = [note for note in (*more, *(m.take_note() for m in media)) if note]
    return "; ".join(dict.fromkeys(notes)) or None


def _check_unchanged(media: Media) -> None:
    """A picture read again must be the one its sha256 was taken of (when it was first sent, or when
    /load checked it, which then waits for a y/N): another one would be read as it silently, and
    saved with the old hash. Pictures are small; a video is not read twice for this."""
    try:
        digest = sha256_of(media.path)
    except OSError as e:
        raise MediaError(f"cannot read {visible(str(media.path))} ({visible(e.strerror or str(e))})") from None
    if digest != media.sha256:
        raise MediaError(f"{visible(str(media.path))} has changed since it was attached or loaded; attach it again, "
                         "or /load the session again")


def _release_pixels(turn: Turn) -> None:
    """Free the decoded pixels of a turn's media once the turn keeps their features: nothing reads
    them again (a retry or a replay uses the features), and they were held for the whole session,
    float32 and ~31 MB for a 13-tile picture, ~600 MB for a 256-frame video. Media not yet sent
    (an attachment whose turn failed) keep theirs, so sending it again does not decode it again."""
    if turn.features is not None:
        for media in turn.media:
            media.pixel_values = None


def _is_demo_model(path: Path) -> bool:
    """Whether `path` is the demo model shipped inside the package (it can answer only a few questions)."""
    try:
        return Path(path).resolve() == (Path(__file__).resolve().parent.parent / "demo_model")
    except OSError:
        return False


def _use(fixes: list[str]) -> str:
    """`; use a, or b` ending an overflow message, or nothing when no fix is left to name."""
    return f"; use {any_of(fixes)}" if fixes else ""
