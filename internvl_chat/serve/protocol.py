"""The OpenAI chat-completions shapes: request models (pydantic) and response/chunk builders.

Unknown request fields are ignored, as OpenAI-compatible servers do; fields we cannot honour
with a non-default value (best_of other than n, tools, functions and a tool_choice that asks for a
call, tool calls and tool messages in the history, penalties other
than repetition_penalty, logit_bias, min_p, min_tokens, beam search, vLLM's stop_token_ids,
ignore_eos, guided decoding (SGLang's and llama.cpp's fields for it too) and its other answer controls, a chat_template or a rendering without the
assistant's cue, output modalities or audio, web search, reasoning_effort, verbosity) are refused
with 400 rather than silently dropped. Numbers are numbers: `true` is not read as 1.

`logprobs: true` lists each answer token's log-probability, with `top_logprobs` (0 to 20, only
with logprobs true) alternatives: `choices[i].logprobs.content` in an answer, and in a stream on
each chunk that carries text, for the tokens whose text it completes (serve/logprobs.py).

`n` (1 to MAX_CHOICES) asks for that many answers to one prompt: `choices` has n entries, index
0..n-1, each with its own message, finish_reason, stop-string cut and logprobs. They are generated
one after another on one KV slot (serve/engine.py): the prompt is prefilled once, and each later
choice keeps its cache and prefills only the prompt's last token again (whose logits the answer
before it did not keep). `usage.prompt_tokens` counts the prompt once, `completion_tokens` all the
choices' tokens. A stream sends choice 0 whole, then choice 1, ...: each chunk's `choices[0].index`
names its choice, and each choice has its own role delta and finish chunk. With `seed`, choice i
samples with `choice_seed(seed, i)` (serve/engine.py; choice 0 with the seed itself, so n=1
answers as before), so every choice is reproducible and each has its own random stream; greedy
gives n equal answers.
`best_of` is accepted when absent or equal to n (nothing is ranked: every answer is returned).
`cache_salt` (vLLM's) puts the request's cached state in a namespace of its own (serve/namespaces.py).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..chat.sampling import LOGPROBS_MAX
from ..settings import REPETITION_PENALTY_MAX, REPETITION_PENALTY_MIN, TEMPERATURE_MAX
from .errors import APIError, bad_request, shown, shown_int
from .logprobs import logprobs_object
from .namespaces import check_cache_salt

OWNED_BY = "internvl-chat"
_M = TypeVar("_M", bound="SamplingRequest")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")
    BODY: ClassVar[str] = "a JSON object"  # what a request body of this shape is, said when none came


def _not_a_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1: "max_tokens": true would be a one-token answer
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


Int = Annotated[int, BeforeValidator(_not_a_bool)]
# a switch sent as null is off, as OpenAI reads it (clients that pass every argument send stream=None)
Switch = Annotated[bool, BeforeValidator(lambda value: False if value is None else value)]
Float = Annotated[float, BeforeValidator(_not_a_bool), Field(allow_inf_nan=False)]  # NaN: "finite", not "≥ 0"


class MediaURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # "low": one tile for an image (as max_dynamic_patch 1)
    max_dynamic_patch: Int | None = Field(default=None, ge=1, le=64)  # lmdeploy's per-image tile limit


class TextPart(_Model):
    type: Literal["text"]
    text: str


class RefusalPart(_Model):
    """An assistant's refusal as OpenAI returned it: what the assistant said, read as its text."""

    type: Literal["refusal"]
    refusal: str


def _url_object(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value  # some clients send the URL as a bare string


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: Annotated[MediaURL, BeforeValidator(_url_object)]
    max_dynamic_patch: Int | None = Field(default=None, ge=1, le=64)


class VideoPart(_Model):
    type: Literal["video_url"]
    video_url: Annotated[MediaURL, BeforeValidator(_url_object)]


ContentPart = Annotated[Union[TextPart, RefusalPart, ImagePart, VideoPart], Field(discriminator="type")]


# Lists a request may hold by the million (a 64 MiB body of tiny items) are refused at their first
# bad item: every error was collected, 12 MiB of bad parts took 10 s and 2.4 GB to refuse
Parts = Annotated[list[ContentPart], Field(fail_fast=True)]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Parts, None] = None
    refusal: str | None = None  # an assistant's refusal (OpenAI sends it instead of content)
    # an assistant's calls in the history: refused (see _refuse_unsupported), never silently dropped
    tool_calls: list[Any] | None = None
    function_call: Any = None


class StreamOptions(_Model):
    # None: left out, or sent as null (clients that pass every argument), which asks for nothing
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's usage on every chunk: refused (it was ignored)

    def set_fields(self) -> list[str]:
        """The options sent with a value, true or false (null ones ask for nothing)."""
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


class SamplingRequest(_Model):
    """The fields /v1/chat/completions and /v1/completions share: the model, streaming and sampling."""

    PROMPT_PARAM: ClassVar[str] = "messages"  # the field that holds the prompt, named in a context error
    PROMPT_NOUN: ClassVar[str] = "conversation"  # what a context error calls it
    # the answer's length when the request sets none, at most the room left (None: the server's [generation] one)
    DEFAULT_ANSWER: ClassVar[int | None] = None

    model: str
    stream: Switch = False
    stream_options: StreamOptions | None = None
    temperature: Float | None = Field(default=None, ge=0, le=TEMPERATURE_MAX)  # below 1e-5: greedy
    top_p: Float | None = Field(default=None, ge=0, le=1)  # 0 (OpenAI accepts it): the most likely token alone
    top_k: Int | None = Field(default=None, ge=-1)  # -1 (vLLM) and 0 both turn it off
    max_tokens: Int | None = Field(default=None, ge=1)
    # OpenAI's int64 range (lt=2**63 printed the bound as a float); a negative seed is read modulo
    # 2**63 (conversation.sampling_params): -1 is a seed like any other, not llama.cpp's "random"
    seed: Int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: Union[str, Annotated[list[str], Field(fail_fast=True)], None] = None
    repetition_penalty: Float | None = Field(default=None, ge=REPETITION_PENALTY_MIN, le=REPETITION_PENALTY_MAX)
    n: Int | None = None  # answers to return (1 to MAX_CHOICES); null is 1
    # vLLM's: cached state is reused only by requests with the same salt (serve/namespaces.py); checked there
    cache_salt: Any = None
    # accepted only at their neutral values
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Any] | None = None
    min_p: Float | None = None  # vLLM, SGLang, llama.cpp
    min_tokens: Int | None = None  # vLLM
    best_of: Int | None = None
    use_beam_search: bool | None = None  # vLLM
    stop_token_ids: list[Any] | None = None  # vLLM
    response_format: dict[str, Any] | None = None  # (vLLM's /v1/completions takes it too)
    ignore_eos: bool | None = None  # vLLM
    # vLLM's other controls of the answer (extra_body), each silently ignored before: a guided
    # answer came back free-form, a banned word in it, an answer with its special tokens left out
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    # the same constraints as SGLang (regex, ebnf, json_schema) and llama.cpp's server (grammar,
    # json_schema) take them: unknown fields, they were ignored and the answer came back free-form
    regex: Any = None
    ebnf: Any = None
    json_schema: Any = None
    grammar: Any = None
    include_stop_str_in_output: bool | None = None
    prompt_logprobs: Any = None
    allowed_token_ids: list[Any] | None = None
    bad_words: list[Any] | None = None
    logits_processors: list[Any] | None = None
    truncate_prompt_tokens: Any = None
    skip_special_tokens: bool | None = None
    return_tokens_as_token_ids: bool | None = None


class ChatCompletionRequest(SamplingRequest):
    BODY: ClassVar[str] = "the chat request as a JSON object (model, messages)"

    messages: list[Message] = Field(min_length=1, fail_fast=True)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None  # vLLM: {"video": {"num_frames": N}}
    return_token_ids: Switch = False  # vLLM's extension: the ids of the answer
    logprobs: bool | None = None  # OpenAI's: each answer token's log-probability
    top_logprobs: Int | None = None  # 0-20 alternatives per token, with logprobs true
    # accepted only at their neutral values
    tools: list[Any] | None = None
    functions: list[Any] | None = None  # OpenAI's older function calling
    tool_choice: Any = None
    function_call: Any = None
    modalities: list[Any] | None = None  # OpenAI's output kinds: ["text"] alone is what we answer
    audio: Any = None  # OpenAI's audio output settings
    web_search_options: Any = None
    reasoning_effort: Any = None  # "none" and "minimal" are neutral: the model has no reasoning phase
    verbosity: Any = None  # "medium" is OpenAI's default
    # vLLM's, rendering the conversation otherwise: refused (the prompt is always the checkpoint template's)
    chat_template: Any = None
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None  # true only: the prompt ends with the assistant's cue
    # vLLM's extra variables for the template, which may set the three above: those are checked as
    # the fields are; the template reads no other (vLLM leaves out the ones it does not read)
    chat_template_kwargs: dict[str, Any] | None = None

    def answer_limit(self) -> tuple[int | None, str]:
        """The answer length asked for (None: the server's default) and the field the client sent it in."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def logprob_count(self) -> int | None:
        """Alternatives to list per answer token; None: no logprobs asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


MAX_STOP_STRINGS = 16
# answers to one request: they run one after another, holding the engine n times as long as one
MAX_CHOICES = 16
# far past any real stop marker ("\nUser:", "###", a closing tag). The matcher's steps do not grow with
# a stop string's length (serve/stops.py), but the text held back unsent while the answer spells it does
MAX_STOP_STRING_CHARS = 1000


# Parsing builds the whole JSON tree before any field is checked, ~300 bytes for each item of an
# object or array: 64 MiB of `{"role":"user"},…` (4 million messages) took 2.6 GB, of `0,0,…` in a
# list 1.5 GB. Every item opens with '{', '[' or ',' (an object's entries too: after '{' or ','), so
# these bytes, counted in C before parsing, bound the tree (to ~300 MB). Text counts as well, but a
# real request holds a few thousand: 1 MB of code has 15-50 thousand, base64 media none.
MAX_JSON_ITEMS = 1_000_000


def _check_items(body: bytes) -> None:
    if len(body) <= MAX_JSON_ITEMS:  # each counted byte is a byte of the body
        return
    items = body.count(b"{") + body.count(b"[") + body.count(b",")
    if items > MAX_JSON_ITEMS:
        raise APIError(413, f"the request body holds {items:,} JSON items (counted by its '{{', '[' and ',' bytes, "
                       f"text included); this server reads at most {MAX_JSON_ITEMS:,}: send fewer messages, parts "
                       "or list items", code="request_too_large")  # fmt: skip


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The JSON body as a chat request; 400 naming the first bad field otherwise (413 for one that
    would take gigabytes to parse)."""
    req = parse_body(body, ChatCompletionRequest)
    _refuse_unsupported(req)
    return req


def parse_body(body: bytes, shape: type[_M]) -> _M:
    """The JSON body as a `shape` request, its field values checked (not yet what the server can
    honour); 400 naming the first bad field otherwise (413 for one that would take gigabytes to parse)."""
    _check_items(body)
    try:
        return shape.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors()
        first = max(errors, key=lambda err: len(err.get("loc", ())))  # the deepest: the most specific
        param = _param(first.get("loc", ()))
        if param and _neither_string_nor_list(errors, first):  # pydantic names its first member only: "a valid string"
            shape = _UNION_SHAPES.get(param.rsplit(".", 1)[-1], "a string or a list")
            raise bad_request(f"{param} must be {shape}", param=param) from None
        if param in _REQUIRED and (first.get("type") == "missing" or first.get("input") is None):
            raise bad_request(f"{param} is required: send {_REQUIRED[param]}", param=param) from None
        if first.get("type") == "json_invalid" and "recursion limit" in str(first.get("msg")):
            raise bad_request("the request body's JSON nests deeper than this server reads (about 200 levels); "
                              "send a flatter request") from None  # fmt: skip
        if first.get("type") == "json_invalid":
            raise _invalid_json(body, str(first.get("msg")), shape.BODY) from None
        if first.get("type") == "model_type" and not first.get("loc"):  # valid JSON, but no fields at all
            kind = _JSON_KINDS.get(type(first.get("input")), "value")
            raise bad_request(f"the request body is a JSON {kind}, not an object; send the request's fields as one "
                              'JSON object, such as {"model": …}') from None  # fmt: skip
        if first.get("type") == "union_tag_invalid":  # pydantic's message quotes the whole tag as sent
            tag = shown(str(first.get("ctx", {}).get("tag", "")), 40)
            raise bad_request(f"{param}: the content part type '{tag}' is not one this server reads; send "
                              "'text', 'image_url' or 'video_url' parts", param=param) from None  # fmt: skip
        role = first.get("input") if param and param.endswith(".role") else None
        if first.get("type") == "literal_error" and role in ("tool", "function"):
            raise bad_request(f"{param}: '{role}' messages are not supported: this server has no function calling; "
                              "send a tool's result as text in a user message", param=param) from None  # fmt: skip
        if first.get("type") == "union_tag_not_found":  # "Unable to extract tag using discriminator 'type'"
            raise bad_request(f"{param}: a content part needs a \"type\": 'text', 'image_url' or 'video_url'",
                              param=param) from None  # fmt: skip
        said = str(first.get("msg")).removeprefix("Value error, ")  # pydantic's prefix to our validators' words
        raise bad_request(f"{param or 'request'}: {shown(said)}", param=param) from None


# what a body that is no JSON object is called ("request: Input should be an object" named no fix)
_JSON_KINDS = {type(None): "null", list: "array", str: "string", bool: "true or false", int: "number", float: "number"}


# what a request's required fields hold, said when one is missing or null (pydantic's "Field required"
# and "Input should be a valid string" said what was wrong, not what to send)
_REQUIRED = {
    "model": "the served model's id (GET /v1/models lists it)",
    "messages": 'the conversation as a list of messages, such as [{"role": "user", "content": "Hi"}]',
}


# what a field that takes a string or a list takes, said when it got neither (a part object not in a list)
_UNION_SHAPES = {
    "content": 'a string or a list of content parts, such as [{"type": "text", "text": "Hi"}]',
    "stop": "a string or a list of strings",
}


def _neither_string_nor_list(errors: list, first: dict) -> bool:
    """Whether `first` is the string member of a string-or-list field whose list member failed
    there too: the value was neither (had the list member failed deeper, that error would be first)."""
    loc = tuple(first.get("loc", ()))
    if first.get("type") != "string_type" or not loc or loc[-1] != "str":
        return False
    return any(err.get("type") == "list_type" and tuple(err.get("loc", ()))[:-1] == loc[:-1] for err in errors)


def _invalid_json(body: bytes, said: str, fields: str) -> APIError:
    """A body the parser refused, said in words that tell what to fix where the parser's do not
    (it calls a byte-order mark "expected value", a Latin-1 byte "invalid unicode code point");
    `fields`: what the endpoint's body is (each endpoint's own: /v1/completions was told "messages")."""
    if not body.strip():  # "EOF while parsing a value": a client that sent no body (curl without -d)
        return bad_request(f"the request body is empty; send {fields}")
    if body.startswith(b"\xef\xbb\xbf"):
        return bad_request("the request body starts with a byte-order mark (bytes EF BB BF); send the JSON without it")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad_request(f"the request body is not UTF-8 (byte 0x{body[e.start]:02X} at offset {e.start:,}); send the "
                           "JSON encoded as UTF-8")  # fmt: skip
    # a \uD800-\uDFFF escape without its pair: half of a character (text cut inside an emoji, say)
    if "surrogate" in said or "end of hex escape" in said:
        return bad_request(f"the request body's JSON holds half of a character, a \\uD800-\\uDFFF escape without its "
                           f"pair ({said}); send whole characters")  # fmt: skip
    if "number out of range" in said:  # valid JSON (numbers have no bound there), past what the parser reads
        return bad_request(f"the request body holds an integer of thousands of digits ({said}); send each number "
                           "within its field's range")  # fmt: skip
    return bad_request(f"the request body is not valid JSON ({said})")


def _param(loc: tuple) -> str | None:
    """A pydantic error location as a dotted param, without the union members it names."""
    # pydantic puts the union member it tried ("str", "list[...]") and a part's type tag in the location
    parts = [p for p in loc if not (isinstance(p, str) and (p == "str" or "[" in p))]
    out = []
    for i, p in enumerate(parts):
        is_tag = i >= 2 and parts[i - 2] == "content" and isinstance(parts[i - 1], int) and p in _PART_TYPES
        if not is_tag:
            out.append(str(p))
    return ".".join(out) or None


_PART_TYPES = ("text", "refusal", "image_url", "video_url")


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    refuse_unsupported_sampling(req)
    _check_logprobs(req)
    refuse_other_templates(req)
    if req.tools:
        raise bad_request("tools (function calling) are not supported by this server; leave them out", param="tools")
    if req.functions:
        raise bad_request("functions (function calling) are not supported by this server; leave them out", param="functions")
    for name in ("tool_choice", "function_call"):
        if getattr(req, name) not in (None, "none", "auto"):  # anything else asks for a call the answer cannot make
            raise bad_request(f"{name}: function calling is not supported by this server; leave it out", param=name)
    for i, msg in enumerate(req.messages):
        if msg.role != "assistant":
            parts = msg.content if isinstance(msg.content, list) else []
            where = [f"messages.{i}.content.{k}" for k, p in enumerate(parts) if isinstance(p, RefusalPart)]
            where += [f"messages.{i}.refusal"] if msg.refusal else []
            if where:
                raise bad_request(f"{where[0]}: only an assistant message holds a refusal", param=where[0])
        for name in ("tool_calls", "function_call"):
            if getattr(msg, name):
                raise bad_request(f"messages.{i}.{name}: this server has no function calling, so the conversation cannot hold "
                                  "calls; send them and their results as text", param=f"messages.{i}.{name}")  # fmt: skip
    if req.modalities is not None and any(kind != "text" for kind in req.modalities):
        raise bad_request('modalities: this server answers in text only; send ["text"] or leave it out', param="modalities")
    if req.audio is not None:
        raise bad_request("audio: this server answers in text only, without audio; leave it out", param="audio")
    if req.web_search_options is not None:
        raise bad_request("web_search_options: this server cannot search the web; leave it out", param="web_search_options")
    if req.reasoning_effort not in (None, "none", "minimal"):
        raise bad_request("reasoning_effort: this model answers without a reasoning phase; leave it out (or send 'none')",
                          param="reasoning_effort")  # fmt: skip
    if req.verbosity not in (None, "medium"):
        raise bad_request("verbosity is not supported by this server; leave it out", param="verbosity")


def refuse_unsupported_sampling(req: SamplingRequest) -> None:
    """400 for a shared field this server cannot honour with the value sent (both endpoints)."""
    _check_choices(req)
    check_cache_salt(req.cache_salt)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported; use repetition_penalty (e.g. 1.1) instead", param=name)
    # sampling controls this server does not have: refused, so an answer never silently ignores one
    # a bias of 0 changes nothing (clients that zero a map rather than drop it send one)
    if req.logit_bias and any(isinstance(v, bool) or v not in (0, 0.0) for v in req.logit_bias.values()):
        raise bad_request("logit_bias is not supported by this server; leave it out", param="logit_bias")
    if req.min_p not in (None, 0, 0.0):
        raise bad_request("min_p is not supported; use top_p (e.g. 0.9) or top_k instead", param="min_p")
    if req.min_tokens not in (None, 0):
        raise bad_request("min_tokens is not supported by this server; leave it out", param="min_tokens")
    if req.best_of not in (None, choices(req)):
        raise bad_request(f"best_of: this server returns every answer it samples, without ranking them; send best_of "
                          f"equal to n ({choices(req)}) or leave it out", param="best_of")  # fmt: skip
    if req.use_beam_search:
        raise bad_request("use_beam_search: this server samples its answers, without beam search; leave it out",
                          param="use_beam_search")  # fmt: skip
    if req.stop_token_ids:
        raise bad_request("stop_token_ids are not supported by this server; use stop strings instead", param="stop_token_ids")
    if req.ignore_eos:
        raise bad_request("ignore_eos is not supported by this server; leave it out", param="ignore_eos")
    _refuse_vllm_controls(req)
    _refuse_stream_options_unstreamed(req)
    if req.response_format and req.response_format.get("type", "text") != "text":
        where = "message" if req.PROMPT_PARAM == "messages" else "prompt"
        raise bad_request(f"response_format: only 'text' is supported (this server cannot constrain the answer to JSON); "
                          f"leave it out and ask for JSON in the {where}", param="response_format")  # fmt: skip
    stops = stop_strings(req)
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
    if any(not s for s in stops):
        raise bad_request("stop strings must not be empty", param="stop")
    longest = max(stops, key=len, default="")
    if len(longest) > MAX_STOP_STRING_CHARS:
        raise bad_request(f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters long; one has "
                          f"{len(longest)}", param="stop")  # fmt: skip


def _refuse_stream_options_unstreamed(req: SamplingRequest) -> None:
    """400 for stream_options set without `stream: true`, as OpenAI and vLLM answer it: they shape a
    stream, and an answer sent whole has none (include_usage was accepted and meant nothing). Null
    options and an empty object ask for nothing and stay accepted (clients that send every argument)."""
    named = [f"stream_options.{name}" for name in req.stream_options.set_fields()] if req.stream_options else []
    if named and not req.stream:
        raise bad_request(f"{' and '.join(named)} {'is' if len(named) == 1 else 'are'} set but stream is not true: "
                          "stream options apply to a streamed answer only; send stream: true, or leave stream_options "
                          "out", param="stream_options")  # fmt: skip


# vLLM's constraints on an answer's form, and SGLang's and llama.cpp's; none is an option of this server's sampler
_GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "regex", "ebnf",
                  "json_schema", "grammar")


def _refuse_vllm_controls(req: SamplingRequest) -> None:
    """400 for vLLM's other answer controls at a value that would change the answer (both endpoints)."""
    for name in _GUIDED_FIELDS:
        if getattr(req, name):  # an empty one constrains nothing (clients that clear a field rather than drop it)
            raise bad_request(f"{name}: this server cannot constrain an answer's form (no guided decoding); leave it out "
                              "and ask for the form in the prompt", param=name)  # fmt: skip
    if req.include_stop_str_in_output:
        raise bad_request("include_stop_str_in_output is not supported: an answer ends before its stop string; leave "
                          "it out", param="include_stop_str_in_output")  # fmt: skip
    if req.prompt_logprobs is not None:
        raise bad_request("prompt_logprobs is not supported; for the prompt's log-probabilities send it to "
                          "/v1/completions with echo: true and logprobs (0 to 5)", param="prompt_logprobs")  # fmt: skip
    for name in ("allowed_token_ids", "bad_words", "logits_processors"):
        if getattr(req, name):  # an empty list changes nothing
            raise bad_request(f"{name} is not supported by this server; leave it out", param=name)
    if req.truncate_prompt_tokens is not None:
        raise bad_request(f"truncate_prompt_tokens is not supported: this server does not cut a {req.PROMPT_NOUN}; "
                          "send a shorter one, or leave the field out", param="truncate_prompt_tokens")  # fmt: skip
    if req.skip_special_tokens is False:
        raise bad_request("skip_special_tokens: false is not supported: an answer's text leaves special tokens out; "
                          "leave it out", param="skip_special_tokens")  # fmt: skip
    if req.stream_options is not None and req.stream_options.continuous_usage_stats:
        raise bad_request("stream_options.continuous_usage_stats is not supported: a stream's usage comes in its last "
                          "chunk (include_usage); leave it out", param="stream_options.continuous_usage_stats")  # fmt: skip
    if req.return_tokens_as_token_ids:
        raise bad_request("return_tokens_as_token_ids is not supported by this server; leave it out",
                          param="return_tokens_as_token_ids")  # fmt: skip


def refuse_other_templates(req: ChatCompletionRequest) -> None:
    """400 for vLLM's fields that render a conversation other than the checkpoint's template does
    (chat and /tokenize's messages: their prompt is always that template's, ending with the assistant's cue),
    also where `chat_template_kwargs` sets them: vLLM passes those to the template over the fields."""
    given = req.chat_template_kwargs or {}
    for values, where in ((vars(req), ""), (given, "chat_template_kwargs.")):
        if values.get("chat_template") is not None:
            raise bad_request(f"{where}chat_template: this server renders every conversation with the checkpoint's "
                              "own chat template; leave it out", param=f"{where}chat_template")  # fmt: skip
        if values.get("continue_final_message"):
            raise bad_request(f"{where}continue_final_message: this server writes the next reply, it does not "
                              "continue the last message; leave it out", param=f"{where}continue_final_message")  # fmt: skip
        # the template reads it as a condition (0, "" too; null as well where chat_template_kwargs
        # sets it: it replaces the field's true there; a null field is one not sent)
        sent = "add_generation_prompt" in values if where else values.get("add_generation_prompt") is not None
        if sent and not values["add_generation_prompt"]:
            raise bad_request(f"{where}add_generation_prompt must be true: this server's chat prompt always ends "
                              "with the assistant's cue; send true or leave it out",
                              param=f"{where}add_generation_prompt")  # fmt: skip


def choices(req: SamplingRequest) -> int:
    """How many answers the request asks for (n; null or absent is 1)."""
    return 1 if req.n is None else req.n


def _check_choices(req: SamplingRequest) -> None:
    n = choices(req)
    if n < 1:
        raise bad_request(f"n must be at least 1 (the number of answers to return), not {shown_int(n)}; send 1 or leave it out",
                          param="n")  # fmt: skip
    if n > MAX_CHOICES:
        raise bad_request(f"n is {shown_int(n)}, over this server's {MAX_CHOICES} answers per request; send n of at most "
                          f"{MAX_CHOICES}, and more requests for more answers", param="n")  # fmt: skip


def _check_logprobs(req: ChatCompletionRequest) -> None:
    """top_logprobs as OpenAI takes it: 0 to 20 alternatives per token, and more than 0 only with logprobs true."""
    k = req.top_logprobs
    if k is None:
        return
    if not 0 <= k <= LOGPROBS_MAX:
        raise bad_request(f"top_logprobs must be an integer from 0 to {LOGPROBS_MAX} (the alternatives listed for each "
                          f"token), not {shown_int(k)}", param="top_logprobs")  # fmt: skip
    if k and not req.logprobs:  # 0 asks for nothing: accepted as neutral, as before logprobs were served
        raise bad_request("top_logprobs needs logprobs: true (it says how many alternatives to list for each token); "
                          "send both, or neither", param="top_logprobs")  # fmt: skip


def stop_strings(req: SamplingRequest) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


# ---- responses ------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def timings(prompt_n: int, prompt_s: float, predicted_n: int, predicted_s: float, cache_n: int) -> dict:
    """llama.cpp's `timings` object: prompt = the prefilled (uncached) tokens, vision included;
    predicted = decode steps after the first token (which belongs to the prompt phase)."""
    prompt_ms, predicted_ms = prompt_s * 1000, predicted_s * 1000
    return {
        "cache_n": cache_n,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / prompt_s if prompt_s > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": predicted_n / predicted_s if predicted_s > 0 else 0.0,
    }


def request_totals(results: list[dict]) -> dict:
    """The request's `usage` and `timings` from its choices' results (the engine's, in order): each
    prompt counted once (its cached tokens those its first choice found; /v1/completions may send
    several, results' "prompt" says whose), answer tokens and the time to prefill and decode summed
    over the choices."""
    firsts = list({r.get("prompt", 0): r for r in reversed(results)}.values())  # each prompt's first choice
    spent = [r["timings"] for r in results]
    answered = sum(r["usage"]["completion_tokens"] for r in results)

    def total(key: str) -> float:
        return sum(t[key] for t in spent)

    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in firsts)
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in firsts)
    return {
        "usage": usage(prompt_tokens, answered, cached),
        "timings": timings(int(total("prompt_n")), total("prompt_ms") / 1000, int(total("predicted_n")),
                           total("predicted_ms") / 1000, cached),  # fmt: skip
    }


def choice(index: int, result: dict, with_token_ids: bool) -> dict:
    """One answer of a completion: the engine's result for choice `index`."""
    out: dict[str, Any] = {
        "index": index,
        "message": {"role": "assistant", "content": result["text"]},
        "logprobs": logprobs_object(result["logprobs"]) if result["logprobs"] is not None else None,
        "finish_reason": result["finish_reason"],
    }
    if with_token_ids:
        out["token_ids"] = result["token_ids"]
    return out


def completion(cid: str, model: str, choices: list[dict], totals: dict) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": totals["usage"],
        "timings": totals["timings"],
    }


def chunk(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          include_usage: bool = False, extra: dict | None = None, logprobs: dict | None = None,
          index: int = 0) -> dict:  # fmt: skip
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if extra:
        out["choices"][0].update(extra)
    if include_usage:
        out["usage"] = None  # OpenAI: null on every chunk but the last when usage is asked for
    return out


def usage_chunk(cid: str, model: str, created: int, totals: dict) -> dict:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": totals["usage"],
        "timings": totals["timings"],
    }


def models_list(model_id: str, context_length: int, created: int) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": OWNED_BY,
                "max_model_len": context_length,  # vLLM's name
                "context_length": context_length,
            }
        ],
    }


def check_model(req: SamplingRequest, model_id: str) -> None:
    if req.model != model_id:
        raise APIError(404, f"the model '{shown(req.model, 80)}' does not exist; this server serves {model_id!r}",
                       code="model_not_found", param="model")  # fmt: skip
