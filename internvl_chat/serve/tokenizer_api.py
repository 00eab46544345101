"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize and GET /tokenizer_info.

lm-evaluation-harness's remote tokenizer (`tokenizer_backend=remote`, or `auto`, which probes
/tokenizer_info and /tokenize) uses them instead of a local copy of the checkpoint's tokenizer: it
reads `eos_token` (and `bos_token`, `pad_token`) from /tokenizer_info, encodes `{"prompt": text,
"add_special_tokens": false}` and reads `tokens`, decodes `{"tokens": ids}` and reads `prompt`.

A `prompt` is tokenized exactly as /v1/completions tokenizes a text prompt (a special token's text is
that token: text_completions.encode_prompt_text); `messages` exactly as /v1/chat/completions builds
its prompt (PromptMaker: the system message, each message's block, images' and videos' tokens, the
assistant cue), so `count` is the `usage.prompt_tokens` each would report (a conversation past the
context is counted too, as vLLM counts it: `max_model_len` says it does not fit). Qwen2's tokenizer adds no
BOS or EOS, so `add_special_tokens` changes nothing. Token ids to decode are checked against the
vocabulary. These take no place in the queue (the engine is not used) but are admitted as the
other POST routes are (origin, API key, body limits).
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from ..chat.sampling import is_int
from ..chat.session import HOPELESS_TEXT_MIN_CHARS
from ..engine.tokenizer import named_tokens
from ..errors import InternVLChatError
from .conversation import PromptMaker
from .errors import APIError, bad_request, from_app_error
from .protocol import ChatCompletionRequest, Message, _Model, check_model, parse_body, refuse_other_templates
from .text_completions import check_token_ids, encode_prompt_text

# A text or an id list is tokenized or decoded whole, holding the tokenizer's lock: bounded here, far
# past the context (lm-eval encodes a whole document before it cuts it into context windows) but
# within seconds of work. A text is measured before it is tokenized (the chat's hopeless-length check).
MAX_TOKENIZE_TOKENS = 1 << 20


class TokenizeRequest(ChatCompletionRequest):
    """A text (`prompt`) or a conversation (`messages` and the chat fields that shape its prompt:
    mm_processor_kwargs, media_io_kwargs, cache_salt)."""

    BODY: ClassVar[str] = "a JSON object with prompt (a text) or messages (a conversation)"

    model: str | None = None  # vLLM's is optional: the served model
    messages: list[Message] | None = None
    prompt: Any = None
    add_special_tokens: bool | None = None  # Qwen2's tokenizer adds none either way
    return_token_strs: bool | None = None  # vLLM's tokens as vocabulary strings: refused (ids only)


class DetokenizeRequest(_Model):
    BODY: ClassVar[str] = "a JSON object with tokens (a list of token ids)"
    model: str | None = None
    tokens: Any = None


def tokenize(body: bytes, maker: PromptMaker, model_id: str, context: int, gone: threading.Event) -> dict:
    """POST /tokenize's answer: {count, max_model_len, tokens}."""
    req = parse_body(body, TokenizeRequest)
    _check_model(req, model_id)
    if req.return_token_strs:
        raise bad_request("return_token_strs is not supported: this server lists token ids only; send them to "
                          "/detokenize for their text", param="return_token_strs")  # fmt: skip
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("send either prompt (a text) or messages (a conversation) to tokenize, not both or neither",
                          param="prompt")  # fmt: skip
    if req.messages is not None:
        refuse_other_templates(req)
        if not req.messages:
            raise bad_request("messages is empty; send at least one message", param="messages")
        # as chat builds it, media read and counted; past the context too (count and max_model_len say so)
        ids = maker.make(req, gone, limit=MAX_TOKENIZE_TOKENS).ids
    else:
        ids = _text_ids(req.prompt, maker)
    return {"count": len(ids), "max_model_len": context, "tokens": ids}


def _text_ids(prompt: Any, maker: PromptMaker) -> list[int]:
    if not isinstance(prompt, str):
        raise bad_request("prompt must be a string (one text); to read token ids as text, send them to /detokenize",
                          param="prompt")  # fmt: skip
    fewest = maker.tokenizer.fewest_tokens(prompt) if len(prompt) >= HOPELESS_TEXT_MIN_CHARS else 0
    if fewest > MAX_TOKENIZE_TOKENS:
        raise _too_many(fewest, "prompt")
    try:
        with maker.lock:
            return encode_prompt_text(maker.tokenizer, prompt)
    except InternVLChatError as e:  # the tokenizer's (a panic on some text): one line, as /v1/completions'
        raise from_app_error(e, param="prompt") from None


def detokenize(body: bytes, maker: PromptMaker, model_id: str) -> dict:
    """POST /detokenize's answer: {prompt}, the ids' text, special tokens included (as /v1/completions
    reads a text prompt, that text tokenizes back to those ids where the tokenizer would split it so)."""
    req = parse_body(body, DetokenizeRequest)
    _check_model(req, model_id)
    ids = req.tokens
    if not isinstance(ids, list) or not all(is_int(x) for x in ids):
        raise bad_request("tokens must be a list of token ids (integers)", param="tokens")
    # (their number is bounded by the body's JSON items: protocol.MAX_JSON_ITEMS)
    check_token_ids(ids, maker, "tokens")
    with maker.lock:
        return {"prompt": maker.tokenizer.decode(ids)}


def tokenizer_info(maker: PromptMaker, context: int) -> dict:
    """GET /tokenizer_info's answer: the special tokens tokenizer_config.json names (null where none:
    Qwen2 has no BOS), as transformers reports them, and the served context as model_max_length."""
    return {**named_tokens(maker.loaded.path), "model_max_length": context}


def _check_model(req: Any, model_id: str) -> None:
    if req.model is not None:  # vLLM's field is optional
        check_model(req, model_id)


def _too_many(tokens: int, where: str) -> APIError:
    return bad_request(f"{where} is at least {tokens:,} tokens; this server tokenizes at most {MAX_TOKENIZE_TOKENS:,} "
                       "in one request: send it in parts", param=where)  # fmt: skip
