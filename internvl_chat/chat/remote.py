"""A conversation with an OpenAI-compatible server (lmdeploy, vLLM, SGLang, llama.cpp, serve, …).

The history lives here, in the client, and the whole of it is resent every turn: the server's
prefix cache then plays the part our chunk prefilling plays locally. For that cache to hit, every
resend must be byte-identical: each picture is read (or a video decoded) once, its data URL made
once and kept; assistant replies are kept exactly as the server returned them.

Images go as the file's own bytes when every server reads them as we do (JPEG and PNG without
EXIF rotation or transparency); otherwise as a PNG made once from the picture our own pipeline
sees (rotated upright, transparency on white). Videos are sampled locally with our frame sampler
(media/video.py) and sent as 448×448 JPEG frames, one tile each, in the form the dialect wants
(chat/dialects.py). What is sent is made by remote_media.py; the numbers a server reports are
checked by remote_numbers.py.

Token numbers are the server's when it reports them (`usage`); before a request they are
estimates (256 tokens a tile, about 4 bytes of text a token), so `token_counts_exact` is False.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ContextOverflowError, MediaError, RemoteError, UsageError
from ..files import expand_home, read_bytes_file, replace_lone_surrogates, visible, write_atomic
from ..media.image import IMAGE_SIZE
from ..media.video import load_video
from ..settings import without_credentials
from .advice import Advice, any_of
from .answer_bounds import FINISHED_GRACE_S, AnswerBounds, watched
from .conversation import BackendInfo, PromptView
from .dialects import (
    LABELS,
    Clip,
    Picture,
    check_dialect,
    data_url,
    detect_dialect,
    llamacpp_tiles,
    render_content,
    request_body,
    tiles_are_per_request,
    user_content,
)
from .remote_errors import ContextRefused, context_refusal, shorten
from .remote_http import ApiClient
from .remote_media import RemoteMedia, frames_as_jpeg, image_payload
from .remote_numbers import FINISH_REASONS, answer_timing, clean_usage, context_of
from .sampling import SamplingParams
from .saved_media import ReadiedSession, saved_media, sha256_of, with_notes
from .session import MESSAGE_TOKENS_AT_LEAST, Media, media_notes
from .session_file import CANCELLED_MARK, SESSION_FILE_MODE, SESSION_FORMAT, SESSION_VERSION, read_session_file, session_json
from .sse import StreamFailed
from .template import media_order

DEFAULT_MAX_TILES = 12  # max_dynamic_patch of every InternVL3 checkpoint
TOKENS_PER_TILE = 256  # InternVL3: 16×16 tokens per 448×448 tile
PICTURE_EXTRA_TOKENS = 3  # <img>, </img> and the line break after it
LABEL_TOKENS = 4  # "Image-1: " / "Frame1: "
TURN_TEMPLATE_TOKENS = 10  # <|im_end|>\n<|im_start|>user\n … <|im_end|>\n<|im_start|>assistant\n
SYSTEM_TEMPLATE_TOKENS = 5
BYTES_PER_TOKEN = 4  # Qwen's tokenizer: ~4 bytes of English or of Chinese text per token
MAX_IMAGE_BYTES = 64 << 20
MODELS_NAMED = 8  # of the served models, in a refused --remote-model's line
FINISH_REASON_MAX_CHARS = 64  # of a finish_reason the server names; real ones are one word


def estimate_text_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)


def estimate_system_tokens(text: str | None) -> int:
    return estimate_text_tokens(text) + SYSTEM_TEMPLATE_TOKENS if text else 0


@dataclass
class RemoteTurn:
    user_text: str
    media: list[RemoteMedia]
    content: str | list[dict]  # the user message as sent; resent as is
    reply: str = ""  # the assistant message exactly as the server returned it
    finish_reason: str | None = None
    timing: dict | None = None
    usage: dict | None = None  # the server's usage, when it sent one
    # the system message that usage counted: after a /system change the count holds another one
    counted_with: str | None = None

    @property
    def answer_text(self) -> str:
        if self.finish_reason == "cancelled":
            return self.reply + (f" {CANCELLED_MARK}" if self.reply else CANCELLED_MARK)
        return self.reply

    @property
    def answer_tokens(self) -> int | None:
        n = (self.usage or {}).get("completion_tokens")
        return n if isinstance(n, int) and n >= 0 else None


# ---- the conversation --------------------------------------------------------------------------


class RemoteConversation:
    """A conversation whose answers come from an OpenAI-compatible server (see module docstring)."""

    token_counts_exact = False

    def __init__(
        self,
        client: ApiClient,
        model: str,
        dialect: str,
        max_context: int | None = None,
        params: SamplingParams | None = None,
        system_message: str | None = None,
        stream_interval: int = 1,
        handshake_s: float | None = None,
        answer_timeout: float | None = None,
    ):
        self.client = client
        self.model = model
        self.dialect = check_dialect(dialect)
        self._max_context = max_context
        self.params = params or SamplingParams()
        self.system_message = system_message or None
        self.stream_interval = stream_interval
        self.handshake_s = handshake_s
        self.answer_timeout = answer_timeout or None  # seconds one answer may take in all; None: no bound
        self.commands = True  # the user can type commands; one-shot mode sets False (chat/advice.py)
        self.turns: list[RemoteTurn] = []
        self._context_news: str | None = None  # a new limit read outside a turn (check_budget), not yet said

    @classmethod
    def connect(
        cls,
        server: str,
        api_key: str = "",
        model: str = "",
        dialect: str = "auto",
        timeout: float = 300.0,
        **kwargs,
    ) -> RemoteConversation:
        """Ask the server for its models (GET /models): the model id defaults to the first one, the
        dialect to what its `owned_by` names, the context to its `max_model_len` (vLLM, SGLang,
        serve) or `meta.n_ctx` (llama.cpp)."""
        client = ApiClient(server, api_key, timeout)
        try:
            t0 = time.perf_counter()
            cards = client.models()
            handshake_s = time.perf_counter() - t0
            if not cards:
                raise RemoteError(f"{client.shown_url} serves no model (its model list is empty); start it with one")
            if model:
                card = next((c for c in cards if c["id"] == model), None)
                if card is None:
                    served = ", ".join(shorten(c["id"], 200) for c in cards[:MODELS_NAMED])
                    if len(cards) > MODELS_NAMED:  # a list of thousands: the line says the rest exist
                        served += f", … and {len(cards) - MODELS_NAMED:,} more"
                    raise UsageError(f"the server does not serve '{visible(model)}'; --remote-model must be one of: {served}")
            else:
                card = cards[0]
            chosen = detect_dialect(card.get("owned_by")) if dialect.strip().lower() in ("", "auto") else dialect
            return cls(client, card["id"], chosen, context_of(card), handshake_s=handshake_s, **kwargs)
        except BaseException:
            client.close()
            raise

    def close(self) -> None:
        self.client.close()

    # ---- identity ---------------------------------------------------------------------------

    def describe(self) -> BackendInfo:
        return BackendInfo(
            name=self.model,
            where=f"{self.client.shown_url} ({LABELS[self.dialect]})",
            model=self.model,
            context=self._max_context,
            load_s=self.handshake_s,
            memory_device=None,
            more_room="a server started with a larger context",  # --max-context is the local model's
        )

    # ---- budget (estimates; the server counts the real tokens) ---------------------------

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def _system_tokens(self) -> int:
        return estimate_system_tokens(self.system_message)

    def tiles_sent(self, media: Media) -> int:
        """The tiles the server makes of a picture: InternVL's own count (`media.tiles`), except on
        llama.cpp, which slices pictures its own way (dialects.llamacpp_tiles) and takes no tile limit.
        A saved picture (session_file.SavedMedia) has the size its file recorded, or none."""
        size = getattr(media, "size", None)
        if self.dialect == "llamacpp" and media.kind == "image" and size:
            return llamacpp_tiles(*size)
        return media.tiles

    def media_tokens(self, media: Sequence[Media]) -> int:
        images = [m for m in media if m.kind == "image"]
        labels = LABEL_TOKENS if len(images) > 1 else 0
        total = sum(self.tiles_sent(m) * TOKENS_PER_TILE + PICTURE_EXTRA_TOKENS + labels for m in images)
        total += sum(m.tiles * (TOKENS_PER_TILE + PICTURE_EXTRA_TOKENS + LABEL_TOKENS) for m in media if m.kind == "video")
        return total

    def turn_tokens(self, media: Sequence[Media]) -> int:
        first = self._system_tokens() if not self.turns else 0
        return first + TURN_TEMPLATE_TOKENS + self.media_tokens(media)

    def _turn_total(self, turn: RemoteTurn) -> int:
        answer = turn.answer_tokens
        if answer is None:
            answer = estimate_text_tokens(turn.reply)
        return TURN_TEMPLATE_TOKENS + self.media_tokens(turn.media) + estimate_text_tokens(turn.user_text) + answer

    def _server_count(self) -> tuple[int, int]:
        """(turns counted, tokens): the server's count after the latest answer it reported usage for
        (a cancelled answer has none), or (0, 0). Counted under another system message (/system since),
        only the system message in it changed: the count keeps what the estimates cannot see (the
        server's template, its tokenizer) and swaps the old system message's estimate for the new one's."""
        for n in range(len(self.turns), 0, -1):
            turn = self.turns[n - 1]
            usage = turn.usage or {}
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                moved = self._system_tokens() - estimate_system_tokens(turn.counted_with)
                return n, max(0, prompt + completion + moved)
        return 0, 0

    @property
    def context_used(self) -> int:
        """The server's count after the latest answer it counted, plus estimates of the turns since.
        Before the first turn nothing is held: the system message goes with the first message, and
        `turn_tokens` counts it there (as a local model does)."""
        if not self.turns:
            return 0
        counted, tokens = self._server_count()
        if not counted:
            return self._system_tokens() + sum(self._turn_total(t) for t in self.turns)
        return tokens + sum(self._turn_total(t) for t in self.turns[counted:])

    def _advice(self, history: Sequence[RemoteTurn], turn: RemoteTurn | None = None) -> Advice:
        """`turn`: the turn being asked; with it, whether the request holds any picture or video is
        known (without pictures, fewer tiles or frames free nothing)."""
        media = turn is None or bool(turn.media) or any(t.media for t in history)
        return Advice(self.commands, earlier=bool(history), media=media, tiles=self.dialect != "llamacpp")

    def check_budget(self, new_tokens: int, max_new_tokens: int | None = None) -> None:
        """Refuse what would not fit the server's context; before a refusal the limit is read again
        (one GET /models, only then): a server restarted with a larger context refuses nothing, so
        nothing else would ever tell this client."""
        if self._max_context is None:
            return
        max_new = self.params.max_new_tokens if max_new_tokens is None else max_new_tokens
        need = self.context_used + new_tokens + max_new
        if need > self._max_context:
            try:
                self._context_news = self.refresh_context() or self._context_news  # said with the next answer
            except RemoteError:
                pass  # the server cannot be reached now: refused with the limit known
        if need > self._max_context:
            advice = self._advice(self.turns)
            used = self.context_used
            smallest = self.turn_tokens([]) + MESSAGE_TOKENS_AT_LEAST  # the next turn's template and one token
            at_edge = bool(self.commands and self.turns) and used + smallest + max_new > self._max_context
            answer_fits = used + new_tokens + 1 <= self._max_context  # max_new_tokens is at least 1
            fixes = advice.overflow_fixes(lambda: advice.fewer_media, at_edge, answer_fits)
            raise ContextOverflowError(
                f"this turn needs about {used:,} used + {new_tokens:,} new + {max_new:,} answer tokens "
                f"= {need:,}, over the server's {self._max_context:,}-token context; {any_of(fixes)}"
            )

    def check_attach(self, media: Sequence[Media]) -> None:
        self.check_budget(self.turn_tokens(media) + MESSAGE_TOKENS_AT_LEAST)  # a message's text: a token at least

    def context_items(self, pending: Sequence[Media]) -> list[tuple[str, int]]:
        items: list[tuple[str, int]] = []
        system = self._system_tokens()
        if system:
            items.append(("system message" if self.turns else "system message (sent with the first message)", system))
        for n, turn in enumerate(self.turns, start=1):
            names = "".join(f"{m.kind} {m.path.name}, " for m in turn.media)
            media = self.media_tokens(turn.media)
            answer = turn.answer_tokens if turn.answer_tokens is not None else estimate_text_tokens(turn.reply)
            detail = f" (media {media:,} · answer {answer:,})" if media else f" (answer {answer:,})"
            items.append((f"turn {n}: {names}“{shorten(turn.user_text, 32)}”{detail}", self._turn_total(turn)))
        # the server counts what the estimates cannot see (its own default system message, its
        # template): the difference keeps the items adding up to the context used
        rest = self.context_used - sum(tokens for _, tokens in items) if self.turns else 0
        if rest > 0:
            items.append(("the server's count beyond these estimates (e.g. its default system message)", rest))
        elif rest < 0:
            items.append(("the server counted fewer tokens than these estimates", rest))
        for media in pending:
            items.append((f"attached: {media.kind} {media.path.name}", self.media_tokens([media])))
        items.append(("next message: template, plus your text", TURN_TEMPLATE_TOKENS))
        items.append(("reserved for the answer (max_new_tokens)", self.params.max_new_tokens))
        return items

    def refresh_context(self) -> str | None:
        """Read the server's context again (one GET /models): a server restarted with another
        `--max-context` (or `max_model_len`) keeps its address. Returns a line when the limit
        changed, else None. A server that no longer serves the model, or whose list cannot be
        read, changes nothing here (the chat request says what is wrong); a connection that
        fails is raised (the chat request would fail alike)."""
        self.client.broke = False
        try:
            cards = self.client.models()
        except RemoteError:
            if self.client.broke:
                raise
            return None
        except BaseException:  # Ctrl-C: read it again before the next turn
            self.client.broke = True
            raise
        card = next((c for c in cards if c["id"] == self.model), None)
        limit = context_of(card) if card is not None else None
        if limit is None or limit == self._max_context:
            return None
        self._max_context = limit
        return f"the server's context is now {limit:,} tokens"

    # ---- media ------------------------------------------------------------------------------

    def describe_image(self, path: str | Path, max_tiles: int | None = None) -> RemoteMedia:
        """`max_tiles` None (or 0): InternVL3's own limit, 12 (the server's checkpoint is not known here)."""
        path = expand_home(path)
        max_tiles = max_tiles or DEFAULT_MAX_TILES
        if tiles_are_per_request(self.dialect):
            used = {m.max_tiles for t in self.turns for m in t.media if m.kind == "image"}
            if used and max_tiles not in used:
                limit = used.pop()
                raise UsageError(
                    f"{LABELS[self.dialect]} takes one tile limit per request and this conversation's images use "
                    f"max_tiles {limit}; /set max_tiles {limit} to attach more, or /clear first"
                )
        return RemoteMedia.from_image_file(path, max_tiles)  # InternVL3 checkpoints all use a thumbnail

    def describe_video(self, path: str | Path, frames: int = 8, video_range: tuple[float, float] | None = None) -> RemoteMedia:
        return RemoteMedia.from_video_file(expand_home(path), frames, video_range)

    def _prepare(self, media: RemoteMedia) -> None:
        """Read the picture or decode the video once; later turns resend the same bytes."""
        if media.prepared:
            return
        if media.kind == "image":
            data = read_bytes_file(media.path, "image", MAX_IMAGE_BYTES, MediaError)
            digest = hashlib.sha256(data).hexdigest()
            if media.sha256 and media.sha256 != digest:
                raise MediaError(f"{visible(str(media.path))} has changed since it was attached; attach it again")
            payload, mime = image_payload(data, str(media.path))
            media.sha256, media.bytes = digest, len(data)
            media.picture = Picture(data_url(payload, mime), media.max_tiles)
        else:
            start, end = media.video_range or (None, None)
            video = load_video(media.path, media.frames, start, end, IMAGE_SIZE)
            media.timestamps, media.decode_note = list(video.timestamps), video.shortfall_note
            if not media.sha256:
                media.sha256 = sha256_of(media.path)
                media.bytes = media.path.stat().st_size  # the size hashed, saved with the hash
            media.clip = Clip(tuple(Picture(data_url(jpeg, "image/jpeg"), 1) for jpeg in frames_as_jpeg(video.pixel_values)))

    def _as_remote(self, media: Media) -> RemoteMedia:
        if isinstance(media, RemoteMedia):
            return media
        # media described by another conversation (e.g. a local Session): measure it here
        if media.kind == "image":
            return self.describe_image(media.path, media.max_tiles)
        return self.describe_video(media.path, media.frames, media.video_range)

    # ---- turns ------------------------------------------------------------------------------

    def _content(self, text: str, media: list[RemoteMedia]) -> str | list[dict]:
        images = [m.picture for m in media if m.kind == "image"]
        videos = [m.clip for m in media if m.kind == "video"]
        return user_content(self.dialect, text, images, videos)  # type: ignore[arg-type]

    def _messages(self, history: Sequence[RemoteTurn], turn: RemoteTurn) -> list[dict]:
        messages: list[dict] = []
        if self.system_message:
            messages.append({"role": "system", "content": self.system_message})
        for past in history:
            messages.append({"role": "user", "content": past.content})
            messages.append({"role": "assistant", "content": past.reply})
        messages.append({"role": "user", "content": turn.content})
        return messages

    def _pictures(self, turns: Sequence[RemoteTurn]) -> list[Picture]:
        return [m.picture for t in turns for m in t.media if m.picture is not None]

    def ask(
        self,
        text: str,
        media: Sequence[Media] = (),
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[dict]:
        """Send one turn and stream the answer. On any error the conversation is as before."""
        params = (params or self.params).validate()
        ordered = [self._as_remote(media[i]) for i in media_order([m.spec for m in media])]
        for item in ordered:
            self._prepare(item)
        turn = RemoteTurn(text, ordered, self._content(text, ordered))
        yield from self._run(turn, list(self.turns), params, cancel, replace_last=False)

    def retry(self, params: SamplingParams | None = None, cancel: threading.Event | None = None) -> Iterator[dict]:
        """Ask the last question again; the old answer stays until the new one's final event (an
        answer cancelled, cut or broken off after some text replaces it too: it is what was shown)."""
        if not self.turns:
            raise UsageError("nothing to retry; ask something first")
        params = (params or self.params).validate()
        last = self.turns[-1]
        turn = RemoteTurn(last.user_text, last.media, last.content)
        yield from self._run(turn, self.turns[:-1], params, cancel, replace_last=True)

    def _run(
        self,
        turn: RemoteTurn,
        history: list[RemoteTurn],
        params: SamplingParams,
        cancel: threading.Event | None,
        replace_last: bool,
    ) -> Iterator[dict]:
        pictures = self._pictures([*history, turn])
        if tiles_are_per_request(self.dialect) and len({p.max_tiles for p in pictures}) > 1:
            raise UsageError(
                f"{LABELS[self.dialect]} takes one tile limit per request, but this conversation's images use "
                f"{sorted({p.max_tiles for p in pictures})}; "
                f"{any_of([*self._advice(history).forget('/clear'), 'attach them with one max_tiles'])}"
            )
        body = request_body(self.dialect, self.model, self._messages(history, turn), params, pictures, self._max_context)
        was = self._max_context
        # a request that failed below HTTP (or a proxy's 502-504) may mean a restart: only then is the
        # limit read again
        fresh = self.refresh_context() if self.client.broke else None
        notice, self._context_news = media_notes(turn.media, fresh or self._context_news), None
        try:
            yield from self._answer(turn, history, params, cancel, replace_last, body, notice)
        except ContextRefused as refused:
            if fresh is None:
                try:
                    self.refresh_context()  # a server restarted with a smaller context refuses so
                except RemoteError:
                    pass  # the refusal is what to tell
            advice = self._advice(history, turn)
            retry = replace(advice, media=bool(turn.media)) if replace_last else None  # a retry: its own fixes
            line = context_refusal(advice, self._max_context, was, refused.said, retry)
            raise ContextRefused(line, refused.said) from None

    def _answer(
        self,
        turn: RemoteTurn,
        history: list[RemoteTurn],
        params: SamplingParams,
        cancel: threading.Event | None,
        replace_last: bool,
        body: dict,
        notice: str | None,
    ) -> Iterator[dict]:
        t0 = time.perf_counter()
        bounds = AnswerBounds(params.max_new_tokens, self.answer_timeout)
        stream = self.client.stream_chat(body, self._advice(history), bounds.time_left())
        parts: list[str] = []
        pending = ""
        since_emit = 0
        chunks = 0
        t_first = t_last = None
        finish = raw_finish = None
        unfinished = False  # text came after a finish_reason: no grace after one (answer_bounds.FINISHED_GRACE_S)
        text_finish = False  # a finish_reason came with or after text (one before any, a proxy's on the role's chunk, is none)
        usage: dict | None = None
        server_timings: dict | None = None
        failed: str | None = None  # what broke the stream after some text came (the kept answer's note)
        with closing(stream), watched(stream, cancel, bounds):  # the watcher stops before the stream closes
            try:
                for chunk in stream:
                    if not bounds.event():
                        break
                    had_text = bool(parts)  # text came before this chunk
                    took = len(parts)
                    finished_here = False  # this chunk has a finish_reason
                    if isinstance(chunk.get("usage"), dict):
                        usage = chunk["usage"]
                    if isinstance(chunk.get("timings"), dict):
                        server_timings = chunk["timings"]
                    choices = chunk.get("choices")
                    if choices is not None and not isinstance(choices, list):
                        raise StreamFailed(
                            f"the server sent a stream chunk whose choices is not a list ({shorten(repr(choices), 40)})",
                            "try --dialect generic, or check --server",
                        )
                    for choice in choices or []:
                        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                            continue
                        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
                        content = delta.get("content")
                        if isinstance(content, str) and content:
                            # a JSON "\ud800" escape cannot be resent or saved
                            content = bounds.take(replace_lone_surrogates(content))
                            if not content:
                                break
                            now = time.perf_counter()
                            t_first = t_first or now
                            t_last = now
                            chunks += 1
                            since_emit += 1
                            parts.append(content)
                            pending += content
                            if text_finish:  # text after a finish_reason: it finished nothing
                                unfinished = True
                                bounds.unfinished()
                            elif raw_finish is not None:  # one before any text: no finish (a break after is one)
                                raw_finish = None
                        if choice.get("finish_reason") and bounds.over is None:
                            raw_finish = replace_lone_surrogates(str(choice["finish_reason"])[:FINISH_REASON_MAX_CHARS])
                            text_finish = text_finish or bool(parts)
                            finished_here = True
                    if (raw_finish is not None and parts and not unfinished and bounds.grace_end is None  # not started over
                            and (len(parts) == took or (had_text and finished_here))):
                        # finished: what follows (usage, [DONE]) comes at once, or the answer ends as it is.
                        # Not before any text, nor on the chunk that brings the first text (the next chunk
                        # tells: a chunk without text, the usage, says the finish was one; text after it says
                        # it was none), nor once text came after one: some proxies put a finish_reason on
                        # the role's first chunk, or on every chunk from the first, with pieces seconds
                        # apart (Gemini behind LiteLLM or gcli2api)
                        bounds.finishing(min(FINISHED_GRACE_S, self.client.timeout))
                    if bounds.over is not None:
                        break
                    if pending and since_emit >= self.stream_interval:
                        bounds.holding = True  # the consumer's time (a slow screen) is not the server's silence
                        try:
                            yield {"text": pending, "usage": None, "finish_reason": None, "timing": None}
                        finally:
                            bounds.holding = False
                        pending, since_emit = "", 0
                    if cancel is not None and cancel.is_set():
                        finish = "cancelled" if raw_finish is None else None  # a finished answer is not cut
                        break
            except StreamFailed as e:
                if not parts:  # nothing to keep: one error line, the turn is not taken
                    raise
                if raw_finish is None:  # else the server had finished: only what follows (usage, [DONE]) is lost
                    failed = e.what  # what came was shown as it came: it is kept, as an answer the client cuts is
        note = None
        if stream.out_of_time:  # the connect ended at the deadline, maybe before the watcher saw it
            bounds.over = bounds.over or "time"
        # the watcher sets `over` before it aborts the stream: the loop may have seen either first
        timed_out = bounds.over == "time" and raw_finish is None and not stream.done
        if finish is None and (bounds.over == "length" or timed_out):
            if not parts:  # nothing to keep: the turn is not taken
                raise RemoteError(bounds.failure())
            finish, note, usage = "length", bounds.note(), None  # a usage before the cut is not the answer's
        elif finish is None and stream.aborted and not stream.done and bounds.over is None and raw_finish is None:
            finish = "cancelled"  # a cancel (after the server's finish_reason it cut nothing)
        if finish is None and failed is None:
            if raw_finish is None and not stream.done:
                failed = "the server closed the stream before the answer finished"
            elif raw_finish in ("error", "abort"):
                failed = f"the server ended the answer with finish_reason {raw_finish!r}"
        if finish is None and failed is not None:
            if not parts:
                raise RemoteError(f"{failed}; ask again")
            # what arrived was shown as it came: kept, marked as broken off ("error"), like a cut answer
            finish, note = "error", f"{failed}; the answer is cut there" + ("" if self.commands else "; ask again")
        if finish is None:
            finish = FINISH_REASONS.get(raw_finish or "stop", "stop")
        end = time.perf_counter()
        turn.reply = "".join(parts)
        turn.finish_reason = finish
        turn.usage = clean_usage(usage, params.max_new_tokens, self._max_context)
        turn.counted_with = self.system_message
        turn.timing = answer_timing(t0, t_first, t_last, end, chunks, turn.usage, server_timings, raw_finish)
        if replace_last:
            self.turns[-1] = turn
        else:
            self.turns.append(turn)
        yield {
            "text": pending,
            "usage": turn.usage,
            "finish_reason": finish,
            "timing": turn.timing,
            "token_ids": None,
            "note": note,  # why the client stopped the answer, or None
            "notice": notice,  # news of the server's (its context changed), or of the media sent, or None
        }

    def undo(self) -> RemoteTurn:
        if not self.turns:
            raise UsageError("nothing to undo; the conversation is empty")
        return self.turns.pop()

    def clear(self) -> None:
        self.turns = []

    def set_system(self, text: str | None) -> None:
        """Takes effect with the next request (the whole history is resent under it)."""
        self.system_message = text or None

    @property
    def default_system_message(self) -> None:
        return None  # none is sent: the server's chat template has the model's default

    def last_prompt(self) -> PromptView | None:
        if not self.turns:
            return None
        turn = self.turns[-1]
        return PromptView(
            len(self.turns),
            render_content(turn.content),
            f"the user message as sent to {LABELS[self.dialect]}; pictures go as data: URLs",
        )

    # ---- save, load -------------------------------------------------------------------------
    # The session file of chat/session_file.py, `backend` "remote": answers as the server returned
    # them, no token ids. Local sessions load here too (their texts are all a server needs).

    def to_json(self, settings: dict | None = None, path: str | Path | None = None) -> dict:
        """The conversation as JSON; with `path` (where it is saved) media also get a path relative to it."""
        where = Path(path) if path is not None else Path("session.json")
        backend = {"kind": "remote", "server": without_credentials(self.client.base_url), "model": self.model,
                   "dialect": self.dialect}  # fmt: skip
        return {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "backend": backend,
            "model": self.model,
            "system_message": self.system_message,
            "settings": settings or {},
            "messages": [
                msg
                for t in self.turns
                for msg in (
                    {"role": "user", "text": t.user_text, "media": [m.to_json(where) for m in t.media]},
                    {"role": "assistant", "text": t.reply, "finish_reason": t.finish_reason,
                     **({"usage": t.usage} if t.usage else {})},
                )
            ],
        }  # fmt: skip

    def save(self, path: str | Path, settings: dict | None = None) -> Path:
        """Write the session as JSON atomically (a symlink at `path` is replaced, never followed)."""
        path = expand_home(path)
        return write_atomic(path, session_json(self.to_json(settings, path)), SESSION_FILE_MODE)

    def read_saved(self, path: str | Path, skip_missing: bool = False) -> ReadiedSession:
        """Read and validate a session file (every field, as the local app does) and find and measure
        its media; changes nothing. Token ids in a local session are checked, then not needed.
        `skip_missing`: media that vanished or changed are left out, as the local Session does."""
        path = expand_home(path)
        saved = read_session_file(path, None, ())
        if not skip_missing:  # media that may be left out count for nothing (as the local Session counts)
            self._refuse_saved_media_over_context(path, sum(self.media_tokens(t.media) for t in saved.turns))  # type: ignore[arg-type]
        media, left_out = saved_media(saved, RemoteMedia.from_image_file, self.describe_video, skip_missing)
        turns = [
            RemoteTurn(with_notes(t.user_text, [m for m in left_out if m.turn == number]), turn_media, "", t.reply,
                       t.finish_reason, None, t.usage)  # type: ignore[arg-type]
            for number, (t, turn_media) in enumerate(zip(saved.turns, media), start=1)
        ]  # fmt: skip
        return ReadiedSession(saved, turns, left_out)

    def _refuse_saved_media_over_context(self, path: Path, media_tokens: int) -> None:
        """A cheap bound before any media file is read: a saved conversation whose pictures alone
        pass the server's known context is refused (each picture was read and held: a session file
        naming one picture in thousands of turns took gigabytes before any message could fail)."""
        if self._max_context is None or media_tokens <= self._max_context:
            return
        try:
            self._context_news = self.refresh_context() or self._context_news  # a server restarted with more
        except RemoteError:
            pass
        if self._max_context is not None and media_tokens > self._max_context:
            raise ContextOverflowError(
                f"the conversation in {visible(str(path))} needs more than {media_tokens:,} tokens for its media, "
                f"over the server's {self._max_context:,}-token context; use a server with a larger context, or start anew"
            )

    def restore(self, readied: ReadiedSession) -> None:
        """Take a conversation `read_saved` returned: each picture read (a video sampled) once, now,
        so every resend is byte-identical; on an error nothing changed. A file that several turns
        show is read once and held once."""
        turns: list[RemoteTurn] = readied.turns
        # a local session saved after `/system ''` holds "": to a server that is none, as set_system has it
        system = readied.saved.system_message or None
        prepared: dict[tuple, RemoteMedia] = {}
        for turn in turns:
            for item in turn.media:
                key = (item.kind, item.path, item.sha256, item.max_tiles, item.frames, item.video_range)
                if key in prepared:
                    _share_prepared(item, prepared[key])
                else:
                    self._prepare(item)
                    prepared[key] = item
            turn.content = self._content(turn.user_text, turn.media)
            turn.counted_with = system
        self.turns, self.system_message = list(turns), system

    def load(self, path: str | Path, skip_missing: bool = False) -> dict:
        """Replace the conversation with a saved one (local or remote); files are checked by sha256."""
        readied = self.read_saved(path, skip_missing)
        self.restore(readied)
        return readied.saved.data


def _share_prepared(item: RemoteMedia, done: RemoteMedia) -> None:
    """`item` sends what `done` (the same file, measured alike) was prepared to send: the same picture
    or frames (immutable), not a copy of each."""
    item.picture, item.clip, item.sha256, item.bytes = done.picture, done.clip, done.sha256, done.bytes
    item.timestamps = None if done.timestamps is None else list(done.timestamps)
