"""A chat request → the prompt ids the terminal app's Session would hold for that conversation.

Each message is its own `<|im_start|>{role}\\n…<|im_end|>\\n` block, in the order sent, as the
chat template renders it (so two user messages in a row, two assistant messages, or a system
reminder mid-conversation are what a template-based server would give the model), then the cue
`<|im_start|>assistant\\n`. The blocks come from the Session's PromptBuilder (images before videos,
`Image-k:`/`FrameK:` labels per message, one `<img>…</img>` run per image or frame); every block
boundary is a special token, so an alternating conversation gets exactly the ids of the Session's
turns (an answer's `<|im_end|>\\n` opening the next turn). Each assistant message contributes our
exact ids when it is a reply we sent to this very conversation, pictures included (see
answers.py), else its re-tokenized text. The leading system (and developer) messages, joined by
newlines, are the system message, else the server's default: `[system] message` when set, else the
checkpoint's; a later one is rendered as a system block where it stands.

Every `<img>…</img>` run is recorded as a Span with the content key of its media, so prefix
reuse can tell two different pictures of the same size apart and never splits an image. A prompt
holds its request's cache namespace (its cache_salt, serve/namespaces.py), and so do its media keys
and the answer memory's digests: nothing cached for another namespace is reused for it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..chat.sampling import SamplingParams, is_int
from ..chat.session import HOPELESS_TEXT_MIN_CHARS
from ..chat.template import PromptBuilder, media_order
from ..engine.loader import LoadedModel
from ..errors import InternVLChatError, UsageError
from ..settings import MAX_TILES, SEED_MAX
from .answers import AnswerMemory, PromptDigest
from .errors import APIError, bad_request, from_app_error, shown, shown_int
from .media import MediaItem, MediaReader, RemoteBudget, UrlMemo
from .namespaces import SHARED, cache_namespace
from .options import ServeOptions
from .protocol import ChatCompletionRequest, ImagePart, RefusalPart, SamplingRequest, TextPart, VideoPart

SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system role: rendered as "system"


@dataclass(frozen=True)
class Span:
    """Prompt positions [start, end) of one `<img>…</img>` run: an image, or one frame of a video."""

    start: int
    end: int
    key: str  # content key of the media (+ "#frame" for a video frame)
    media: int  # index into Prompt.media
    tile: int  # first tile of this run within its media's features
    tiles: int


@dataclass
class Prompt:
    ids: list[int]
    spans: list[Span] = field(default_factory=list)
    media: list[MediaItem] = field(default_factory=list)
    system: str | None = None
    namespace: str = SHARED  # whose cached state it may reuse (serve/namespaces.py); its media keys hold it too
    # /v1/completions' echo with logprobs: every token scored, this many alternatives each; a slot's
    # cache counts only as far as the scores it kept (slots.py's Slot.scored_reuse)
    scored_k: int | None = None


class PromptMaker:
    def __init__(self, loaded: LoadedModel, options: ServeOptions, answers: AnswerMemory, reader: MediaReader):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.options = options
        self.answers = answers
        self.reader = reader
        self.default_system = options.system_message if options.system_message is not None else loaded.config.system_message
        # One builder for every request: the system message is a block like any other message. A
        # builder per system message, kept in a cache, kept each request's system text after it
        # (65 of them, a refused one of tens of megabytes too).
        self.builder = PromptBuilder(self.tokenizer, None, loaded.config.tokens_per_tile)
        # Requests are prepared on several threads and the engine thread decodes meanwhile. A
        # tokenizer call may flip a flag of the shared tokenizer, so tokenizer calls take turns
        # (media fetching and hashing do not hold this lock).
        self.lock = threading.Lock()
        self.builder.first_turn("warm-up")  # sets that flag once, before any decode runs
        self.tokenizer.fewest_tokens("")  # its one pass over the vocabulary, here rather than on a request thread

    def make(self, req: ChatCompletionRequest, cancel: threading.Event | None = None, limit: int | None = None) -> Prompt:
        """The request's prompt; `cancel` set (its client gone) stops a video's measuring (Cancelled).
        One of more than `limit` tokens is refused as soon as it is seen (None: one that fills the
        context; /tokenize counts conversations past it, as vLLM's does)."""
        try:
            return self._make(req, cancel, limit)
        except InternVLChatError as e:
            raise from_app_error(e) from None

    def namespace(self, req: SamplingRequest) -> str:
        """The cache namespace of a request (its cache_salt checked already)."""
        return cache_namespace(req.cache_salt, self.options.shared_cache)

    def _make(self, req: ChatCompletionRequest, cancel: threading.Event | None, limit: int | None) -> Prompt:
        messages = req.messages
        first = 0
        while first < len(messages) and messages[first].role in SYSTEM_ROLES:
            first += 1
        # joined once: adding each to the text so far took minutes for a body of a million empty ones
        texts = [_text_only(messages[k].content, f"messages.{k}.content", "a system message") for k in range(first)]
        system = "\n".join(texts) if first else self.default_system
        _check_order(messages)  # before any media is read
        builder = self.builder
        max_tiles, num_frames = self._media_kwargs(req)
        with self.lock:
            cue, close = builder.answer_cue(), builder.answer_close()

        prompt = Prompt(ids=[], system=system, namespace=self.namespace(req))
        if system:  # ("" is none, as in the app)
            self._check_bound(0, first, limit, system)  # counted with the first message after it (there is one: a user's)
            with self.lock:
                prompt.ids += builder.message("system", system)
        media_count = 0
        # one deadline for all the request's http(s) fetches, not one per URL; `cancel` stops them
        remote = RemoteBudget(cancel)
        memo: UrlMemo = {}  # the request's data: URL measurements, gone with it (for --no-shared-cache)
        answering = False  # the ids end inside an assistant message: its <|im_end|>\n comes with the next message
        # of what comes before each assistant message: our ids for its text answered that
        history = PromptDigest(prompt.namespace)
        for i in range(first, len(messages)):
            msg = messages[i]
            if answering:
                prompt.ids += close
                answering = False
            if msg.role == "assistant":
                said = _text_only(msg.content, f"messages.{i}.content", "an assistant message")
                text = "\n".join(t for t in (said, msg.refusal) if t)  # its refusal is one more part
                prompt.ids += cue
                prompt.ids += self._answer_ids(text, len(prompt.ids), i, history.of(prompt.ids, prompt.spans), limit)
                answering = True
                self._check_room(prompt, i, limit)
                continue
            if msg.role in SYSTEM_ROLES:  # one past the first position: its own block, as the template renders it
                role, media = "system", []
                text = _text_only(msg.content, f"messages.{i}.content", "a system message")
            else:
                role = "user"
                # counted before any is read: each is fetched and probed, and a body of 64 MiB holds
                # hundreds of thousands of tiny pictures
                parts = msg.content if isinstance(msg.content, list) else []
                media_count += sum(isinstance(p, (ImagePart, VideoPart)) for p in parts)
                if media_count > self.options.max_images:
                    raise bad_request(f"the request has more than {self.options.max_images} images and videos; "
                                      "send fewer (the whole history counts)", param=f"messages.{i}.content")  # fmt: skip
                text, media = self._user_content(msg.content, i, max_tiles, num_frames, remote, prompt.namespace, cancel, memo)
            self._check_bound(len(prompt.ids), i, limit, text)
            specs = [m.spec for m in media]
            with self.lock:
                block = builder.message(role, text, specs)
            self._add_spans(prompt, block, [media[k] for k in media_order(specs)], builder)
            prompt.ids += block
            self._check_room(prompt, i, limit)
        prompt.ids += cue
        return prompt

    def _check_bound(self, held: int, i: int, limit: int | None, *texts: str | None) -> None:
        """Refuse texts that cannot fit after `held` tokens before tokenizing them: a message of tens
        of megabytes took a minute and gigabytes to tokenize, holding the tokenizer's lock, only to
        be refused (the bound is the Session's: a pass over the bytes)."""
        if sum(len(t) for t in texts if t) < HOPELESS_TEXT_MIN_CHARS:
            return
        self._check_count(held + sum(self.tokenizer.fewest_tokens(t) for t in texts if t), i, limit)

    def _check_room(self, prompt: Prompt, i: int, limit: int | None) -> None:
        # stop at the first message past the context: a body of many megabytes of short turns
        # would otherwise keep a CPU busy for a minute before its refusal
        self._check_count(len(prompt.ids), i, limit)

    def _check_count(self, tokens: int, i: int, limit: int | None) -> None:
        if limit is not None:
            if tokens > limit:
                raise bad_request(f"the conversation is at least {tokens:,} tokens (counted up to messages.{i}); this "
                                  f"server counts at most {limit:,} in one request: send it in parts",
                                  param="messages")  # fmt: skip
            return
        context = self.loaded.model.max_seq_len
        if tokens >= context:
            raise APIError(400, f"the conversation is at least {tokens:,} tokens (counted up to messages.{i}); this "
                           f"model's context holds {context:,}. Send a shorter conversation or fewer images",
                           code="context_length_exceeded", param="messages")  # fmt: skip

    # ---- parts -------------------------------------------------------------------------------
    def _media_kwargs(self, req: ChatCompletionRequest) -> tuple[int | None, int]:
        mm = req.mm_processor_kwargs or {}
        _only_keys(mm, "mm_processor_kwargs", ("max_dynamic_patch", "num_frames"))
        _only_keys(req.media_io_kwargs or {}, "media_io_kwargs", ("video",))
        video_io = (req.media_io_kwargs or {}).get("video")
        video_io = {} if video_io is None else video_io  # only null is none: a list or 0 is a mistake
        if not isinstance(video_io, dict):  # a free-form field: its shape is checked here, not by pydantic
            raise bad_request('media_io_kwargs.video must be an object such as {"num_frames": 8}',
                              param="media_io_kwargs.video")  # fmt: skip
        _only_keys(video_io, "media_io_kwargs.video", ("num_frames",))
        # a value sent as null is the server's default, as one left out; a bad one is named where it was sent
        max_tiles = mm.get("max_dynamic_patch")
        if max_tiles is None:
            max_tiles = self.options.max_tiles  # None: the checkpoint's
        elif not is_int(max_tiles) or not 1 <= max_tiles <= MAX_TILES:
            raise bad_request(f"max_dynamic_patch must be an integer from 1 to {MAX_TILES}", param="mm_processor_kwargs.max_dynamic_patch")
        num_frames, where = video_io.get("num_frames"), "media_io_kwargs.video.num_frames"
        if num_frames is None:
            num_frames, where = mm.get("num_frames"), "mm_processor_kwargs.num_frames"
        if num_frames is None:
            num_frames = min(self.options.frames, self.options.max_frames)
        elif not is_int(num_frames) or not 1 <= num_frames <= self.options.max_frames:
            raise bad_request(f"num_frames must be an integer from 1 to {self.options.max_frames}", param=where)
        return max_tiles, num_frames

    def _user_content(
        self, content, i: int, max_tiles: int | None, num_frames: int, remote: RemoteBudget, namespace: str,
        cancel: threading.Event | None = None, memo: UrlMemo | None = None,
    ) -> tuple[str, list[MediaItem]]:  # fmt: skip
        if content is None:
            return "", []
        if isinstance(content, str):
            return content, []
        texts: list[str] = []
        media: list[MediaItem] = []
        for k, part in enumerate(content):
            param = f"messages.{i}.content.{k}"
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, ImagePart):
                # OpenAI's "low" detail is one low-resolution view: here one tile, the whole image
                low = 1 if part.image_url.detail == "low" else None
                tiles = part.image_url.max_dynamic_patch or part.max_dynamic_patch or low or max_tiles
                media.append(self.reader.image(part.image_url.url, param, tiles, remote, namespace, memo))
            elif isinstance(part, VideoPart):
                media.append(self.reader.video(part.video_url.url, param, num_frames, remote, cancel, namespace, memo))
        # the template puts the media first, then the text; text parts are joined by newlines
        return "\n".join(texts), media

    def _answer_ids(self, text: str, held: int, i: int, after: bytes, limit: int | None) -> list[int]:
        ids = self.answers.lookup(text, after)
        if ids is not None:
            return ids
        if not text:
            return []
        self._check_bound(held, i, limit, text)
        with self.lock:
            return list(self.tokenizer.encode(text))  # typed special-token text stays text

    def _add_spans(self, prompt: Prompt, turn: list[int], ordered: list[MediaItem], builder: PromptBuilder) -> None:
        runs = []
        start = None
        for pos, token in enumerate(turn):
            if token == builder.img_start_id:
                start = pos
            elif token == builder.img_end_id and start is not None:
                runs.append((start, pos + 1))
                start = None
        expected = [(m, t) for m in ordered for t in (range(m.tiles) if m.kind == "video" else (0,))]
        if len(runs) != len(expected):
            raise APIError(500, "internal error: the prompt's image runs do not match its media", code="internal_error")
        offset = len(prompt.ids)
        index = {id(m): len(prompt.media) + k for k, m in enumerate(ordered)}
        for (s, e), (item, frame) in zip(runs, expected):
            whole = item.kind == "image"
            key = item.key if whole else f"{item.key}#{frame}"
            tiles = item.tiles if whole else 1
            prompt.spans.append(Span(offset + s, offset + e, key, index[id(item)], 0 if whole else frame, tiles))
        prompt.media += ordered


def _check_order(messages) -> None:
    """Refuse what the template renders but this server cannot answer: a conversation that ends with
    an assistant message (a continuation of it is not offered) or holds no user message. Any other order
    is rendered message by message, as the chat template does (consecutive user or assistant messages,
    a system reminder mid-conversation)."""
    last = len(messages) - 1
    if messages[last].role == "assistant":
        raise bad_request(f"message {last}, the last, is the assistant's: this server writes the reply to a conversation "
                          "that ends with a user (or system) message; end it with the message to answer",
                          param=f"messages.{last}.role")  # fmt: skip
    if not any(m.role == "user" for m in messages):
        raise bad_request("the conversation has no user message; send the question or instruction as a user message",
                          param="messages")  # fmt: skip


def _only_keys(kwargs: dict, where: str, known: tuple[str, ...]) -> None:
    """A free-form options object may hold only what this server reads: vLLM's `fps` or another
    processor's option, silently dropped, would sample or tile otherwise than the client asked."""
    for key in kwargs:
        if key not in known:
            names = " and ".join(known)
            raise bad_request(f"{where}.{shown(str(key), 40)} is not supported by this server; it reads {names} there",
                              param=f"{where}.{shown(str(key), 40)}")  # fmt: skip


def _text_only(content, param: str, what: str) -> str:
    """A system or assistant message's text: its parts joined by newlines, as a user message's are
    (and as vLLM joins them): "a" and "b" read as "ab" were one word the client never sent."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if any(not isinstance(p, (TextPart, RefusalPart)) for p in content):  # a refusal: only an assistant's (protocol.py)
        raise bad_request(f"{what} may only hold text; send its pictures and videos in a user message", param=param)
    return "\n".join(p.text if isinstance(p, TextPart) else p.refusal for p in content)


def sampling_params(req: SamplingRequest, defaults: SamplingParams, prompt_len: int, context: int) -> SamplingParams:
    """The request's sampling settings over the server defaults; max_tokens checked against the context."""
    room = context - prompt_len
    noun = req.PROMPT_NOUN
    if room < 1:
        fewer = " or fewer images" if noun == "conversation" else ""
        raise APIError(400, f"the {noun} is {prompt_len:,} tokens; this model's context holds {context:,}. "
                       f"Send a shorter {noun}{fewer}", code="context_length_exceeded", param=req.PROMPT_PARAM)  # fmt: skip
    asked, name = req.answer_limit()
    if asked is not None and asked > room:
        raise APIError(400, f"the {noun} is {prompt_len:,} tokens and {name} is {shown_int(asked, grouped=True)}: together over "
                       f"this model's {context:,}-token context; ask for at most {room:,}",
                       code="context_length_exceeded", param=name)  # fmt: skip
    top_k = req.top_k if req.top_k is not None else defaults.top_k
    top_p = req.top_p if req.top_p is not None else defaults.top_p
    temperature = req.temperature if req.temperature is not None else defaults.temperature
    if top_p == 0:
        # the nucleus as p shrinks to 0: the most likely token alone, the greedy pick (top_k 1 keeps
        # every token tied at the top, and bfloat16 logits tie often: a sampled answer, not one)
        top_p, top_k, temperature = 1.0, 0, 0.0
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else defaults.repetition_penalty,
        max_new_tokens=asked if asked is not None else min(req.DEFAULT_ANSWER or defaults.max_new_tokens, room),
        seed=req.seed % (SEED_MAX + 1) if req.seed is not None else defaults.seed,  # OpenAI's negative ones too
        logprobs=req.logprob_count(),
    )
    try:
        return params.validate()
    except UsageError as e:
        raise bad_request(str(e)) from None
