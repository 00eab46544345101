"""OpenAI's legacy text endpoint, POST /v1/completions: a prompt continued as it is, no chat template.

lm-evaluation-harness's `local-completions` model is its main user: its loglikelihood tasks send
token-id prompts with `echo: true`, `logprobs: 1` and `max_tokens` 0 or 1 and read the prompt's
log-probabilities (`choices[i].logprobs.token_logprobs`, `top_logprobs`, `tokens`, `text_offset`, the
first token's null); its generate_until tasks send text prompts with `stop` and read `choices[i].text`.

`prompt` is a string, a list of strings, a list of token ids or a list of such lists (at most
MAX_PROMPTS); a text is tokenized as it is (Qwen2's tokenizer adds no BOS; a special token's text is
that token, as vLLM reads it), ids are checked against the vocabulary. Each prompt gets `n` choices,
`index` p × n + i, answered one after another on the engine (engine.py: a Job's `more_prompts`), as
chat choices are. `logprobs` is the legacy integer 0 to 5, listed in the legacy shape
(`LegacyLogprobs`) from the same entries chat's logprobs list (serve/logprobs.py); each `top_logprobs`
dict holds the token itself besides its k alternatives, as vLLM's do. `echo` puts the prompt's text
before the answer; with `logprobs` the prompt's tokens are scored as they are prefilled
(engine/model.py's PromptScores; a slot's cached prefix is kept only as far as it kept that prefix's
scores, slots.py's ScoredPrefix), and `max_tokens` 0 asks for that alone. Sampling fields, stop
strings, `seed`, `stream` (`text_completion` chunks, `stream_options.include_usage`, `data: [DONE]`),
refusals, the queue, the API key and CORS are chat's.
"""

from __future__ import annotations

import asyncio
import codecs
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from . import sse
from ..chat.sampling import SamplingParams, is_int
from ..chat.session import HOPELESS_TEXT_MIN_CHARS
from ..engine.tokenizer import Tokenizer
from ..errors import InternVLChatError
from .conversation import Prompt, PromptMaker
from .engine import Job, prompt_param
from .errors import APIError, bad_request, from_app_error, shown_int
from .protocol import Int, SamplingRequest, Switch, choices, parse_body, refuse_unsupported_sampling, stop_strings
from .replies import ClientDisconnected, job_events

MAX_PROMPTS = 64  # prompts in one request, and prompts × n: each holds the engine for its answers
LEGACY_LOGPROBS_MAX = 5  # OpenAI's range for the legacy endpoint's `logprobs`
DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) for this endpoint, not the chat default
PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


class CompletionRequest(SamplingRequest):
    BODY: ClassVar[str] = "the completion request as a JSON object (model, prompt)"
    PROMPT_PARAM: ClassVar[str] = "prompt"
    PROMPT_NOUN: ClassVar[str] = "prompt"
    DEFAULT_ANSWER: ClassVar[int | None] = DEFAULT_MAX_TOKENS

    prompt: Any = None  # its shapes are read by `prompt_items`, with errors that say which item is wrong
    max_tokens: Int | None = Field(default=None, ge=0)  # 0: no answer (the prompt's echo and logprobs alone)
    echo: Switch = False
    logprobs: Int | None = None  # the legacy integer: alternatives per token, 0 to 5
    suffix: str | None = None  # text after the insertion point: refused (no fill-in-the-middle)
    prompt_embeds: Any = None  # vLLM's prompt as embeddings: refused (it was ignored for `prompt`)

    def answer_limit(self) -> tuple[int | None, str]:
        """max_tokens 0 samples one token that is dropped (engine.py, `discard_answer`)."""
        return None if self.max_tokens is None else max(self.max_tokens, 1), "max_tokens"

    def logprob_count(self) -> int | None:
        return self.logprobs


def parse_completion_request(body: bytes) -> CompletionRequest:
    req = parse_body(body, CompletionRequest)
    refuse_unsupported_sampling(req)
    if req.logprobs is not None and not 0 <= req.logprobs <= LEGACY_LOGPROBS_MAX:
        raise bad_request(f"logprobs must be an integer from 0 to {LEGACY_LOGPROBS_MAX} (the alternatives listed for each "
                          f"token), not {shown_int(req.logprobs)}", param="logprobs")  # fmt: skip
    if req.prompt_embeds is not None:
        raise bad_request("prompt_embeds is not supported; send the prompt as text or token ids", param="prompt_embeds")
    if req.suffix:
        raise bad_request("suffix is not supported (this server does not fill in the middle); leave it out", param="suffix")
    return req


def prompt_items(prompt: Any) -> list[str | list[int]]:
    """`prompt` as a list of texts and token-id lists; 400 naming the first item of another shape."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and not prompt:  # (it was told the shapes, a list among them)
        raise bad_request(f"prompt is an empty list; send at least one prompt: {PROMPT_SHAPES}", param="prompt")
    if not isinstance(prompt, list):
        raise bad_request(f"prompt must be {PROMPT_SHAPES}", param="prompt")
    if len(prompt) > MAX_PROMPTS and not all(is_int(x) for x in prompt):
        raise bad_request(f"the request has {len(prompt):,} prompts; this server takes at most {MAX_PROMPTS} in one "
                          "request: send the rest in more requests", param="prompt")  # fmt: skip
    if all(is_int(x) for x in prompt):
        return [prompt]
    for i, item in enumerate(prompt):
        if not (isinstance(item, str) or isinstance(item, list) and all(is_int(x) for x in item)):
            raise bad_request(f"prompt.{i} must be a string or a list of token ids (integers); prompt must be "
                              f"{PROMPT_SHAPES}", param=f"prompt.{i}")  # fmt: skip
    return prompt


@dataclass
class TextPrompts:
    prompts: list[Prompt]
    texts: list[str]  # what `echo` puts before each one's answer

    @property
    def longest(self) -> int:
        return max(len(p.ids) for p in self.prompts)


def text_prompts(req: CompletionRequest, maker: PromptMaker, context: int) -> TextPrompts:
    """The request's prompts as ids (texts tokenized as they are, ids checked) and their texts."""
    try:
        return _text_prompts(req, maker, context)
    except InternVLChatError as e:  # the tokenizer's (a panic on some text): one line, as chat's
        raise from_app_error(e, param="prompt") from None


def _text_prompts(req: CompletionRequest, maker: PromptMaker, context: int) -> TextPrompts:
    items = prompt_items(req.prompt)
    if len(items) * choices(req) > MAX_PROMPTS:
        raise bad_request(f"{len(items)} prompts × n {choices(req)} are {len(items) * choices(req)} answers; this "
                          f"server gives at most {MAX_PROMPTS} per request: send fewer prompts or a smaller n",
                          param="n")  # fmt: skip
    namespace = maker.namespace(req)  # the request's prompts share it (cache_salt, as chat's)
    prompts, texts = [], []
    for i, item in enumerate(items):
        where = prompt_param(req.PROMPT_PARAM, i, len(items))
        if isinstance(item, str):
            # a text that cannot fit is refused before it is tokenized (megabytes take seconds), as chat's are
            fewest = maker.tokenizer.fewest_tokens(item) if len(item) >= HOPELESS_TEXT_MIN_CHARS else 0
            if fewest >= context:
                raise _too_long(fewest, context, where, "at least ")
            with maker.lock:
                ids = encode_prompt_text(maker.tokenizer, item)
            text = item
        else:
            check_token_ids(item, maker, where)
            ids = list(item)
            with maker.lock:
                text = maker.tokenizer.decode(ids) if len(ids) < context else ""
        if not ids:
            raise bad_request(f"{where} is empty; send at least one token of text to continue", param=where)
        if len(ids) >= context:
            raise _too_long(len(ids), context, where)
        prompts.append(Prompt(ids=ids, namespace=namespace, scored_k=prompt_logprobs(req)))
        texts.append(text)
    return TextPrompts(prompts, texts)


def check_token_ids(ids: list[int], maker: PromptMaker, where: str) -> None:
    """400 for an id outside the vocabulary (the model's embedding rows and the tokenizer's both
    hold it): a prompt's ids here, /detokenize's tokens (tokenizer_api.py)."""
    vocab = min(maker.loaded.config.text.vocab_size, len(maker.tokenizer))
    bad = next((x for x in ids if not 0 <= x < vocab), None)
    if bad is not None:
        raise bad_request(f"{where} holds the token id {shown_int(bad)}, outside this model's vocabulary (0 to {vocab - 1})",
                          param=where)  # fmt: skip


def encode_prompt_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` as vLLM and transformers tokenize a raw prompt: a special token's text is that token,
    the text between encoded on its own. lm-eval's `tokenized_requests=False` sends text it decoded
    from ids (a rolling loglikelihood's prefix token, "<|im_end|>", among them) and reads the
    logprobs back by its own token count. Chat keeps such text as text (a user cannot forge a turn);
    here the client writes the whole input and may send the ids themselves anyway. (Qwen2's special
    tokens strip no spaces around them: a plain split is what transformers does.)"""
    specials, pattern = _special_splitter(tokenizer)
    if pattern is None:
        return tokenizer.encode(text)
    ids: list[int] = []
    for i, piece in enumerate(pattern.split(text)):  # the group keeps the specials, at odd places
        ids += [specials[piece]] if i % 2 else tokenizer.encode(piece)
    return ids


def _special_splitter(tokenizer: Tokenizer) -> tuple[dict[str, int], re.Pattern[str] | None]:
    """The special tokens' {text: id} and the regex that splits a text at them (None: no special
    token has text), built once per tokenizer rather than for every text prompt (it decodes each
    special id); kept with the special ids it was built from, and rebuilt should those be replaced."""
    cached = tokenizer.__dict__.get("_special_splitter")
    if cached is not None and cached[0] is tokenizer.special_ids:
        return cached[1], cached[2]
    special_ids = tokenizer.special_ids
    specials = {tokenizer.decode([i]): i for i in special_ids}
    specials.pop("", None)
    pattern = None
    if specials:  # longest first: a special whose text begins another's must not split it
        pattern = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
    tokenizer.__dict__["_special_splitter"] = (special_ids, specials, pattern)
    return specials, pattern


def _too_long(tokens: int, context: int, where: str, at_least: str = "") -> APIError:
    return APIError(400, f"{where} is {at_least}{tokens:,} tokens; this model's context holds {context:,}. Send a shorter "
                    "prompt", code="context_length_exceeded", param=where)  # fmt: skip


def prompt_logprobs(req: CompletionRequest) -> int | None:
    """How many alternatives each prompt token is scored with: echo with logprobs alone asks for it."""
    return req.logprobs if req.echo else None


def text_job(req: CompletionRequest, prompts: TextPrompts, params: SamplingParams, context: int,
             loop: asyncio.AbstractEventLoop) -> Job:  # fmt: skip
    first, *more = prompts.prompts
    return Job(first, params, stop_strings(req), loop, cid=f"cmpl-{uuid.uuid4().hex}", choices=choices(req),
               more_prompts=more, prompt_field=req.PROMPT_PARAM, answer_limits=answer_limits(req, prompts, context),
               echo=req.echo, prompt_logprobs=prompt_logprobs(req), discard_answer=req.max_tokens == 0,
               list_stop_token=True, keep_entries=not req.stream)  # fmt: skip


def answer_limits(req: CompletionRequest, prompts: TextPrompts, context: int) -> list[int] | None:
    """Without max_tokens, each prompt's own: OpenAI's 16, fewer where that prompt leaves less room
    (vLLM's, prompt by prompt). The request's settings hold the longest prompt's, which a short
    prompt of the same list would otherwise be cut to."""
    if req.max_tokens is not None or len(prompts.prompts) == 1:
        return None
    return [min(DEFAULT_MAX_TOKENS, context - len(p.ids)) for p in prompts.prompts]


# ---- the legacy logprobs shape --------------------------------------------------------------


class LegacyLogprobs:
    """One choice's logprob entries (serve/logprobs.py's) in the legacy shape, chunk by chunk:
    `text_offset` counts characters from the start of the choice's text, each token's where its
    bytes begin (a token that begins inside a character: that character's start)."""

    def __init__(self) -> None:
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def restart_at(self, offset: int) -> None:
        """Go on from character `offset` (the answer after an echoed prompt's text)."""
        self.offset = offset
        self._decoder.reset()

    def shape(self, entries: list[dict], prompt: bool = False) -> dict:
        """`prompt`: the entries are an echoed prompt's, whose text holds every token's (a special
        token's too); an answer's text leaves out the tokens its entries mark `left_out`, which take
        no characters there (and leave a character their neighbours spell whole)."""
        out: dict[str, list] = {key: [] for key in LEGACY_KEYS}
        after = 0  # the next entry with answer bytes, once a left-out token needed it (one scan for a run of them)
        for number, entry in enumerate(entries):
            raw = bytes(entry["bytes"])
            if not prompt and getattr(entry, "left_out", False):
                raw = b""
                if after <= number:
                    after = _next_with_bytes(entries, number)
                continued = after < len(entries) and _CONTINUATION[0] <= entries[after]["bytes"][0] <= _CONTINUATION[1]
                if self._decoder.getstate()[0] and (getattr(entry, "ends", False) or not continued):
                    # no later byte of this call continues a character begun before (nothing does after
                    # the stop token; the tokens of an unfinished character are listed with the one after
                    # it, serve/logprobs.py): it is a U+FFFD in the text, before this token
                    self.offset += len(self._decoder.decode(b"", final=True))
            if raw and not _CONTINUATION[0] <= raw[0] <= _CONTINUATION[1]:
                # a character begun before and not continued here is one U+FFFD in the text, before this token
                self.offset += len(self._decoder.decode(b"", final=True))
            out["tokens"].append(entry["token"])
            out["token_logprobs"].append(entry["logprob"])
            out["top_logprobs"].append(_top_dict(entry))
            out["text_offset"].append(self.offset)
            self.offset += len(self._decoder.decode(raw))
        return out


_CONTINUATION = (0x80, 0xBF)  # the bytes that continue a UTF-8 character


def _next_with_bytes(entries: list[dict], number: int) -> int:
    """The first entry after `number` whose bytes are in the answer's text (a left-out token's are
    not), or len(entries)."""
    for later in range(number + 1, len(entries)):
        if entries[later]["bytes"] and not getattr(entries[later], "left_out", False):
            return later
    return len(entries)


def _top_dict(entry: dict) -> dict[str, float] | None:
    """{token: logprob} of the entry's alternatives and the token itself (None for a prompt's first).
    Tokens whose texts are equal (bytes of different characters, each U+FFFD alone) share a key:
    it keeps the most likely one's value, so the dict's largest value stays the position's."""
    if entry["top_logprobs"] is None:
        return None
    top: dict[str, float] = {}
    for alt in entry["top_logprobs"]:  # most likely first
        top.setdefault(alt["token"], alt["logprob"])
    top.setdefault(entry["token"], entry["logprob"])
    return top


LEGACY_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def _joined_logprobs(parts: list[dict]) -> dict:
    return {key: [value for part in parts for value in part[key]] for key in LEGACY_KEYS}


# ---- answers -------------------------------------------------------------------------------


def text_choice(req: CompletionRequest, prompts: TextPrompts, result: dict) -> dict:
    """One choice of a plain answer: the engine's result for it, the prompt's echo before it."""
    echo = prompts.texts[result["prompt"]] if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        legacy, parts = LegacyLogprobs(), []
        if req.echo:
            parts.append(legacy.shape(result["prompt_logprobs"], prompt=True))
            legacy.restart_at(len(echo))
        parts.append(legacy.shape(result["logprobs"]))
        logprobs = _joined_logprobs(parts)
    return {"index": result["index"], "text": echo + result["text"], "logprobs": logprobs,
            "finish_reason": result["finish_reason"]}  # fmt: skip


def _body(cid: str, model: str, created: int, choices_: list[dict]) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices_}


async def text_complete(job: Job, request: Request, req: CompletionRequest, prompts: TextPrompts, model_id: str) -> Response:
    answers = []
    try:
        async for kind, payload in job_events(job, request):
            if kind == "error":
                raise payload
            if kind == "choice":
                answers.append(text_choice(req, prompts, payload))
            elif kind == "done":
                body = _body(job.cid, model_id, int(time.time()), answers)
                body.update(usage=payload["usage"], timings=payload["timings"])
                return JSONResponse(body)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        job.cancel.set()


async def text_stream(job: Job, events: AsyncIterator, req: CompletionRequest, prompts: TextPrompts, model_id: str):
    """Choice 0's chunks (its echo first, when asked), then choice 1's, ...: each ends with its
    finish chunk; the usage chunk (when asked) and [DONE] come after the last. `events`: the job's
    after "started" (serve/replies.py's job_stream)."""
    cid, created = job.cid, int(time.time())
    with_usage = bool(req.stream_options and req.stream_options.include_usage)

    def event(index: int, text: str, logprobs: dict | None = None, finish_reason: str | None = None) -> bytes:
        body = _body(cid, model_id, created, [{"index": index, "text": text, "logprobs": logprobs,
                                               "finish_reason": finish_reason}])  # fmt: skip
        if with_usage:
            body["usage"] = None
        return sse.event(body)

    index, legacy = 0, LegacyLogprobs()
    asked = req.logprobs is not None
    async for kind, payload in events:
        if kind == "prompt":
            echo = prompts.texts[index // job.choices]
            logprobs = legacy.shape(payload, prompt=True) if asked else None
            legacy.restart_at(len(echo))
            yield event(index, echo, logprobs)
        elif kind == "text":
            text, entries = payload
            yield event(index, text, legacy.shape(entries) if asked else None)
        elif kind == "choice":
            yield event(index, "", _joined_logprobs([]) if asked else None, payload["finish_reason"])
            index, legacy = index + 1, LegacyLogprobs()
        elif kind == "done":
            if with_usage:
                body = _body(cid, model_id, created, [])
                body.update(usage=payload["usage"], timings=payload["timings"])
                yield sse.event(body)
            return
        elif kind == "error":
            raise payload  # JobStream (serve/replies.py) sends it as the last event, then [DONE]
