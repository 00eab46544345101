"""A conversation over one KV cache: turns, start_pos, budget, undo/retry, save/load.

The cache is positional. `ids` holds every committed token; the cache is valid for
`ids[:start_pos]`, and the tokens after it (at most the closing of the last answer) are
prefilled at the head of the next turn. Each turn prefills only its own new tokens, and the vision
encoder runs only on media attached to that turn. Undo and retry move `start_pos` back to a turn
boundary: nothing is re-prefilled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.loader import LoadedModel
from ..errors import ContextOverflowError, GenerationError, MediaError, UsageError
from ..media.image import count_tiles, load_image, probe_image
from ..media.video import load_video, probe_video
from .conversation import BackendInfo, PromptView
from .generate import stream_generate
from .sampling import Sampler, SamplingParams
from .template import MediaSpec, PromptBuilder, media_order

SESSION_FORMAT = "internvl-chat-session"
SESSION_VERSION = 1


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    duration: float | None = None  # video seconds
    sha256: str = ""
    bytes: int = 0
    pixel_values: torch.Tensor | None = field(default=None, repr=False)
    timestamps: list[float] | None = None

    @property
    def spec(self) -> MediaSpec:
        return MediaSpec(self.kind, self.tiles)

    def to_json(self) -> dict:
        out = {"kind": self.kind, "path": str(self.path), "bytes": self.bytes, "sha256": self.sha256, "tiles": self.tiles}
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
        self.builder = PromptBuilder(self.tokenizer, system_message, loaded.config.tokens_per_tile)
        self.ids: list[int] = []
        self.start_pos = 0
        self.turns: list[Turn] = []

    # ---- budget ----------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.model.max_seq_len

    def media_tokens(self, media: Sequence[Media]) -> int:
        """Tokens these media add to a turn, labels such as `Image-1: ` included."""
        return len(self._turn_ids("", media)) - len(self._turn_ids("", []))

    def _turn_ids(self, text: str, media: Sequence[Media]) -> list[int]:
        specs = [m.spec for m in media]
        if not self.ids:
            return self.builder.first_turn(text, specs)
        return self.builder.next_turn(text, specs)

    def check_budget(self, new_tokens: int, max_new_tokens: int | None = None) -> None:
        max_new = self.params.max_new_tokens if max_new_tokens is None else max_new_tokens
        need = self.start_pos + new_tokens + max_new
        if need > self.max_context:
            raise ContextOverflowError(
                f"this turn needs {self.start_pos:,} cached + {new_tokens:,} new + {max_new:,} answer tokens = {need:,}, "
                f"over the {self.max_context:,}-token context; use fewer tiles or frames, /clear, "
                "a smaller max_new_tokens, or a larger --max-context"
            )

    # ---- media -----------------------------------------------------------------------------
    def describe_image(self, path: str | Path, max_tiles: int = 12) -> Media:
        """Measure an image without decoding it fully: the UI shows the cost before any work."""
        path = Path(path).expanduser()
        width, height = probe_image(path)
        tiles = count_tiles(width, height, max_tiles, self.loaded.config.use_thumbnail)
        st = path.stat()
        return Media("image", path, tiles, max_tiles=max_tiles, size=(width, height), bytes=st.st_size)

    def describe_video(self, path: str | Path, frames: int = 8, video_range: tuple[float, float] | None = None) -> Media:
        path = Path(path).expanduser()
        if frames < 1:
            raise MediaError(f"--frames must be at least 1 (got {frames})")
        _, _, duration = probe_video(path)
        st = path.stat()
        return Media("video", path, frames, frames=frames, video_range=video_range, duration=duration, bytes=st.st_size)

    def _decode(self, media: Media) -> torch.Tensor:
        if media.pixel_values is None:
            size = self.loaded.config.image_size
            if media.kind == "image":
                image = load_image(media.path, media.max_tiles, self.loaded.config.use_thumbnail, size)
                media.pixel_values, media.size = image.pixel_values, image.size
            else:
                start, end = media.video_range or (None, None)
                video = load_video(media.path, media.frames, start, end, size)
                media.pixel_values, media.timestamps = video.pixel_values, list(video.timestamps)
            if media.pixel_values.shape[0] != media.tiles:
                raise MediaError(f"{media.path.name} gave {media.pixel_values.shape[0]} tiles, expected {media.tiles}")
        if not media.sha256:
            media.sha256 = sha256_of(media.path)
        return media.pixel_values

    def _encode(self, media: Sequence[Media], cancel: threading.Event | None) -> tuple[torch.Tensor | None, float]:
        if not media:
            return None, 0.0
        pixels = torch.cat([self._decode(m) for m in media])
        if cancel is not None and cancel.is_set():
            raise KeyboardInterrupt
        t0 = time.perf_counter()
        features = self.model.encode_images(pixels)
        if features.device.type == "cuda":
            torch.cuda.synchronize(features.device)
        return features, time.perf_counter() - t0

    # ---- turns -------------------------------------------------------------------------------
    def _make_sampler(self, params: SamplingParams) -> Sampler:
        sampler = Sampler(params, self.loaded.config.text.vocab_size, self.model.device)
        if self.ids:
            sampler.observe(torch.tensor(self.ids, device=self.model.device))
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
        new_ids = self._turn_ids(text, media)
        pending = self.ids[self.start_pos :]  # e.g. the token that hit the length limit
        prompt = pending + new_ids
        self.check_budget(len(prompt), params.max_new_tokens)
        turn = Turn(text, media, ids_before=len(self.ids), pos_before=self.start_pos, prompt_ids=new_ids)
        features, vision_s = self._encode(media, cancel)
        turn.features = features
        yield from self._run_turn(turn, prompt, features, vision_s, params, cancel)

    def _run_turn(self, turn, prompt, features, vision_s, params, cancel) -> Iterator[dict]:
        sampler = self._make_sampler(params)
        sampler.observe(torch.tensor(prompt, device=self.model.device))
        events = stream_generate(
            self.model, self.tokenizer, prompt, self.start_pos, params, sampler,
            image_features=features, stop_ids=self.builder.stop_ids,
            stream_interval=self.stream_interval, cancel=cancel, vision_s=vision_s,
        )  # fmt: skip
        text_parts = []
        try:
            for event in events:
                text_parts.append(event["text"])
                if event["finish_reason"] is not None:
                    self._commit(turn, prompt, event, "".join(text_parts))
                yield event
        except (GenerationError, KeyboardInterrupt):
            self._rewind(turn.ids_before, turn.pos_before)
            raise

    def _commit(self, turn: Turn, prompt: list[int], event: dict, text: str) -> None:
        self.ids = self.ids[: self.start_pos] + prompt + event["token_ids"]
        self.start_pos = event["cache_end"]
        if event["finish_reason"] == "cancelled":
            text += " [cancelled]" if text else "[cancelled]"
        turn.answer_ids = list(event["token_ids"])
        turn.answer_text = text
        turn.finish_reason = event["finish_reason"]
        turn.timing = event["timing"]
        self.turns.append(turn)

    def _rewind(self, ids_len: int, pos: int) -> None:
        self.ids = self.ids[:ids_len]
        self.start_pos = pos

    def undo(self) -> Turn:
        if not self.turns:
            raise UsageError("nothing to undo; the conversation is empty")
        turn = self.turns.pop()
        self._rewind(turn.ids_before, turn.pos_before)
        return turn

    def retry(self, params: SamplingParams | None = None, cancel: threading.Event | None = None) -> Iterator[dict]:
        """Drop the last answer and generate a new one for the same question (no re-prefill before it).

        The turn's image features are kept with it, so the vision encoder does not run again. If
        the new answer fails or is interrupted before it is committed, the old one is restored.
        """
        if not self.turns:
            raise UsageError("nothing to retry; ask something first")
        last = self.turns[-1]
        params = params or self.params
        params.validate()
        features = last.features
        if features is None and last.media:
            features, _ = self._encode(last.media, cancel)
            last.features = features
        saved = (list(self.ids), self.start_pos)
        self.undo()
        new_ids = self._turn_ids(last.user_text, last.media)
        prompt = self.ids[self.start_pos :] + new_ids
        turn = Turn(last.user_text, last.media, ids_before=len(self.ids), pos_before=self.start_pos, prompt_ids=new_ids)
        turn.features = features
        committed = False
        try:
            self.check_budget(len(prompt), params.max_new_tokens)
            for event in self._run_turn(turn, prompt, features, 0.0, params, cancel):
                committed = event["finish_reason"] is not None
                yield event
        finally:
            if not committed:
                self._restore_turn(last, saved)

    def _restore_turn(self, turn: Turn, saved: tuple[list[int], int]) -> None:
        """Put back a turn that a failed /retry removed, re-prefilling its cached tokens."""
        self.ids, end = saved
        start = turn.pos_before
        self.model.forward(self.ids[start:end], start, turn.features)
        self.start_pos = end
        self.turns.append(turn)

    def clear(self) -> None:
        self.ids, self.start_pos, self.turns = [], 0, []

    def set_system(self, text: str | None) -> None:
        """Change the system message; an ongoing conversation is re-prefilled under the new one."""
        builder = PromptBuilder(self.tokenizer, text, self.loaded.config.tokens_per_tile)
        if self.turns:
            self._replay(list(self.turns), builder)
        self.builder, self.system_message = builder, text

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

    def _replay(self, turns: list[Turn], builder: PromptBuilder) -> None:
        """Prefill a whole conversation at once under `builder` (used by load and /system).

        Nothing changes if the conversation does not fit or a media file cannot be read; if the
        prefill itself fails, the cache no longer matches anything, so the session is cleared.
        """
        ids = self.conversation_ids(turns, builder)
        if len(ids) + self.params.max_new_tokens > self.max_context:
            raise ContextOverflowError(
                f"the conversation needs {len(ids):,} tokens + {self.params.max_new_tokens:,} for an answer, over the "
                f"{self.max_context:,}-token context; use a larger --max-context"
            )
        features, _ = self._encode([m for t in turns for m in t.media], None)
        try:
            self.model.forward(ids, 0, features)
        except BaseException:
            self.clear()
            raise
        # rebuild turn boundaries (and each turn's features) so undo and retry work after a replay
        self.ids, self.turns = [], []
        offset = 0
        for i, turn in enumerate(turns):
            turn.prompt_ids = self._turn_prompt(builder, i, turn)
            turn.ids_before = turn.pos_before = len(self.ids)
            tiles = sum(m.tiles for m in turn.media)
            turn.features = features[offset : offset + tiles] if tiles else None
            offset += tiles
            self.ids += turn.prompt_ids + turn.answer_ids
            self.turns.append(turn)
        self.start_pos = len(self.ids)

    def to_json(self, settings: dict | None = None) -> dict:
        return {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "model": str(self.loaded.path),
            "system_message": self.system_message,
            "settings": settings or {},
            "messages": [
                msg
                for t in self.turns
                for msg in (
                    {"role": "user", "text": t.user_text, "media": [m.to_json() for m in t.media]},
                    {"role": "assistant", "text": t.answer_text, "token_ids": t.answer_ids, "finish_reason": t.finish_reason},
                )
            ],
        }

    def save(self, path: str | Path, settings: dict | None = None) -> Path:
        """Write the session as JSON atomically (temp file in the same folder, then rename)."""
        path = Path(path).expanduser()
        data = json.dumps(self.to_json(settings), ensure_ascii=False, indent=1)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load(self, path: str | Path) -> dict:
        """Replace the conversation with a saved one, re-prefilling it. Returns the saved JSON."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"session file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read session file {path}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
            raise UsageError(f"{path} is not an internvl-chat session file")
        if data.get("version") != SESSION_VERSION:
            raise UsageError(f"{path} has session format version {data.get('version')}; this build reads {SESSION_VERSION}")
        turns = self._turns_from_json(data.get("messages", []), path)
        saved_system = data.get("system_message")
        builder = PromptBuilder(self.tokenizer, saved_system, self.loaded.config.tokens_per_tile)
        self._replay(turns, builder)
        self.builder, self.system_message = builder, saved_system
        return data

    def _turns_from_json(self, messages: list, path: Path) -> list[Turn]:
        turns: list[Turn] = []
        problems: list[str] = []
        for i in range(0, len(messages) - 1, 2):
            user, assistant = messages[i], messages[i + 1]
            if user.get("role") != "user" or assistant.get("role") != "assistant":
                raise UsageError(f"{path}: message {i + 1} is out of order; the session file is damaged")
            media = []
            for m in user.get("media", []):
                item, problem = self._media_from_json(m)
                if problem:
                    problems.append(problem)
                media.append(item)
            turn = Turn(user.get("text", ""), media, 0, 0)
            turn.answer_ids = [int(t) for t in assistant.get("token_ids", [])]
            turn.answer_text = assistant.get("text", "")
            turn.finish_reason = assistant.get("finish_reason")
            turns.append(turn)
        if problems:
            raise MediaError(f"cannot restore the session: {'; '.join(problems)}; put the files back or start anew")
        return turns

    def _media_from_json(self, m: dict) -> tuple[Media | None, str | None]:
        path = Path(m.get("path", ""))
        if not path.is_file():
            return None, f"{path} has vanished"
        if m.get("sha256") and sha256_of(path) != m["sha256"]:
            return None, f"{path} has changed since the session was saved"
        kind = m.get("kind")
        if kind == "image":
            media = self.describe_image(path, int(m.get("max_tiles", 12)))
        elif kind == "video":
            rng = m.get("range")
            media = self.describe_video(path, int(m.get("frames", 8)), tuple(rng) if rng else None)
        else:
            return None, f"unknown media kind {kind!r} for {path}"
        if media.tiles != int(m.get("tiles", media.tiles)):
            return None, f"{path} now gives {media.tiles} tiles instead of {m.get('tiles')}"
        media.sha256 = m.get("sha256", "")
        return media, None

    # ---- the Conversation interface (chat/conversation.py) -----------------------------------
    # What the UI asks of any conversation, so it never needs to know this one is local.

    token_counts_exact = True

    def describe(self) -> BackendInfo:
        dtype = str(getattr(self.model, "dtype", "")).replace("torch.", "")
        return BackendInfo(
            name=self.loaded.path.name,
            where=f"{self.loaded.device} {dtype}".strip(),
            model=str(self.loaded.path),
            context=self.max_context,
            load_s=self.loaded.load_s,
            memory_device=str(self.loaded.device),
        )

    def turn_tokens(self, media: Sequence[Media]) -> int:
        """Tokens of the next turn with these attachments and an empty message (labels exact)."""
        return len(self._turn_ids("", media))

    def check_attach(self, media: Sequence[Media]) -> None:
        """The next turn with these attachments must fit, with the uncached tail of a cut answer."""
        self.check_budget(len(self.ids) - self.start_pos + self.turn_tokens(media))

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
            media = self.media_tokens(turn.media)
            answer = len(turn.answer_ids)
            names = "".join(f"{m.kind} {m.path.name}, " for m in turn.media)
            text = " ".join(turn.user_text.split())
            text = text if len(text) <= 32 else text[:31] + "…"
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
        note = ""
        if specs:
            note = (f"each <image> stands for {self.builder.tokens_per_tile} tokens per tile, "
                    f"{self.builder.image_token_count(specs):,} in all")  # fmt: skip
        return PromptView(index + 1, text, note)
