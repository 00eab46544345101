"""The HTTP API: /health, /v1/models, /v1/chat/completions and the legacy /v1/completions
(text_completions.py), streaming and not, vLLM's /tokenize, /detokenize and /tokenizer_info
(tokenizer_api.py), OpenAI-shaped errors, CORS for the web origins --allow-origin names. The POST
endpoints are admitted alike (`admitted`: origin, API key, body limits, the queue (the tokenizer's
take no place in it), a client that leaves)."""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from . import sse
from ..chat.sampling import SamplingParams
from ..errors import Cancelled
from .conversation import Prompt, sampling_params
from .cors import EXPOSED, allowed_origin_headers, listed
from .engine import EngineWorker, Job
from .errors import APIError, shown
from .logprobs import logprobs_object
from .protocol import ChatCompletionRequest, check_model, choice, choices, chunk, completion, models_list
from .protocol import parse_request, stop_strings, usage_chunk
from .replies import POLL_S, ClientDisconnected, job_events, job_stream
from .text_completions import CompletionRequest, TextPrompts, parse_completion_request, text_complete, text_job
from .text_completions import text_prompts, text_stream
from .tokenizer_api import detokenize, tokenize, tokenizer_info

# Parsing holds ~45× a body's size (pydantic's tree of a 30 MiB body: +1.3 GB), and every request
# in flight parses before the queue can refuse it: bodies over this size are parsed one at a time.
LARGE_BODY_BYTES = 1 << 20


class BrowserOrigins(CORSMiddleware):
    """Starlette's CORS for the origins --allow-origin names: their pages may send GET, HEAD and POST with
    any headers (openai's JS client adds its x-stainless-* ones), the API key in Authorization, never
    cookies. A preflight (OPTIONS) is answered here, before the routes: it needs no API key (browsers
    send none) and takes no place in the queue. One from another origin gets a JSON 403 with no
    Access-Control header (Starlette's answer was text/plain and listed the allowed methods).
    Answers to an allowed origin expose Retry-After and retry-after-ms (a 429's); Starlette's expose_headers would
    send those headers to every origin."""

    def __init__(self, app, origins: tuple[str, ...]) -> None:
        # private network: Chrome asks it before a public page may call a server on this machine
        # HEAD as the routes take it: a page's HEAD with the key in a header is preflighted too
        super().__init__(app, allow_origins=origins, allow_methods=("GET", "HEAD", "POST", "OPTIONS"),
                         allow_headers=("*",), allow_private_network=True)  # fmt: skip

    def preflight_response(self, request_headers) -> Response:
        origin = request_headers["origin"]
        if not self.is_allowed_origin(origin):
            body = origin_not_allowed(origin).body()
            return JSONResponse(body, status_code=403, headers={"Vary": "Origin"})
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        # a method it does not allow ("Disallowed CORS method"): the same refusal, in OpenAI's shape
        kept = {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
        message = "a browser may send only GET, HEAD and POST to this server"
        return JSONResponse(APIError(400, message).body(), status_code=400, headers=kept)

    async def send(self, message, send, request_headers) -> None:
        origin = request_headers.get("origin")
        if message["type"] == "http.response.start" and origin is not None and self.is_allowed_origin(origin):
            message.setdefault("headers", [])
            MutableHeaders(scope=message)["Access-Control-Expose-Headers"] = EXPOSED
        await super().send(message, send, request_headers)


def origin_not_allowed(origin: str) -> APIError:
    message = f"web pages from {shown(origin, 80)} may not call this server; its operator can allow them with --allow-origin"
    return APIError(403, message, code="origin_not_allowed")


# the bodies a page may POST to another origin without a preflight (a CORS "simple request"), and none
_UNASKED_BODIES = {"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}


def check_page_origin(request: Request, origins: tuple[str, ...]) -> None:
    """403 for a POST that a web page of an origin not allowed sent without a preflight (its body
    as text/plain, a form or untyped, which needs none): its answer is never shown to the page,
    but without an API key it would run, so any page the user opens could keep the model busy."""
    origin = request.headers.get("origin")
    if origin is None or listed(origin, origins):
        return
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type in _UNASKED_BODIES:
        raise origin_not_allowed(origin)


def check_content_encoding(request: Request) -> None:
    """415 for a compressed body (Content-Encoding: gzip, say): it was read as JSON and refused as
    "not UTF-8", which told the client to change its text's encoding rather than not compress it."""
    codings = [c.strip().lower() for c in request.headers.get("content-encoding", "").split(",") if c.strip()]
    if any(c != "identity" for c in codings):
        said = shown(request.headers["content-encoding"], 40)
        raise APIError(415, f"the request body is compressed (Content-Encoding: {said}); this server reads plain JSON "
                       "bodies: send it uncompressed, without Content-Encoding", code="unsupported_content_encoding",
                       headers={"Accept-Encoding": "identity"})  # fmt: skip


def create_app(worker: EngineWorker, model_id: str) -> FastAPI:
    options = worker.options
    context = worker.model.max_seq_len
    created = int(time.time())
    # no redirect_slashes: its 307 for a trailing slash had no JSON body and took its Location from
    # the client's Host header
    app = FastAPI(title="internvl-chat", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.worker = worker
    large_bodies = asyncio.Semaphore(1)
    app.state.ending = ending = asyncio.Event()  # set when the server's shutdown grace period is over
    if options.allow_origins:  # around the routes' error handlers: a 401 or 429 gets the headers too
        app.add_middleware(BrowserOrigins, origins=options.allow_origins)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        # a 405 must say which methods the endpoint takes (Starlette's Allow header, a set's order)
        allowed = ", ".join(sorted(m.strip() for m in (err.headers or {}).get("Allow", "").split(",") if m.strip()))
        messages = {404: "no such endpoint; this server has /health, /v1/models, /v1/chat/completions, /v1/completions, "
                         "/tokenize, /detokenize and /tokenizer_info",
                    405: f"method not allowed on this endpoint; it takes {allowed or 'other methods'}"}  # fmt: skip
        message = messages.get(err.status_code, str(err.detail))
        headers = {"Allow": allowed} if err.status_code == 405 and allowed else None
        return JSONResponse(APIError(err.status_code, message).body(), status_code=err.status_code, headers=headers)

    # Starlette runs this handler outside every middleware, CORS's too: its headers are added here
    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        body = APIError(500, f"internal error ({type(err).__name__})", code="internal_error").body()
        cors = allowed_origin_headers(request.headers.get("origin"), options.allow_origins)
        return JSONResponse(body, status_code=500, headers=cors)

    def authorize(request: Request) -> None:
        if not options.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise APIError(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'", code="invalid_api_key")

    # one route, so a 405's Allow names both (uptime monitors often check with HEAD)
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        if (error := worker.unavailable(retry="")) is not None:
            raise error
        return JSONResponse({"status": "ok"})

    # HEAD as GET, without the body (uvicorn leaves it out)
    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(models_list(model_id, context, created))

    @app.api_route("/v1/models/{name:path}", methods=["GET", "HEAD"])
    async def one_model(name: str, request: Request) -> JSONResponse:
        authorize(request)
        if name != model_id:
            raise APIError(404, f"the model '{shown(name, 80)}' does not exist; this server serves {model_id!r}",
                           code="model_not_found")  # fmt: skip
        return JSONResponse(models_list(model_id, context, created)["data"][0])

    def prepare_chat(body: bytes, gone: threading.Event) -> tuple[ChatCompletionRequest, Prompt, SamplingParams]:
        req = parse_request(body)
        check_model(req, model_id)
        prompt = worker.prompts.make(req, gone)
        return req, prompt, sampling_params(req, options.defaults, len(prompt.ids), context)

    def prepare_text(body: bytes, _gone: threading.Event) -> tuple[CompletionRequest, TextPrompts, SamplingParams]:
        req = parse_completion_request(body)
        check_model(req, model_id)
        prompts = text_prompts(req, worker.prompts, context)
        return req, prompts, sampling_params(req, options.defaults, prompts.longest, context)

    async def prepared(request: Request, body: bytes, prepare):
        """prepare(body, gone) off the event loop (JSON, base64, hashing, a video's measuring), stopped
        (Cancelled) where measuring a video when its client leaves: counting the frames of one
        whose header has no count reads the whole file."""
        gone = threading.Event()
        watching = asyncio.ensure_future(_set_when_gone(request, gone))
        stopping = asyncio.ensure_future(_set_when_set(ending, gone))  # the grace period over: stop too
        try:
            return await run_in_threadpool(prepare, body, gone)
        finally:
            watching.cancel()
            stopping.cancel()

    async def admitted(request: Request, prepare, queued: bool = True):
        """The request checked (origin, API key, body limits, queue room unless not `queued`) and
        prepare(body, gone)'s result; a 499 Response where its client left before it could be queued."""
        check_page_origin(request, options.allow_origins)
        authorize(request)
        check_content_encoding(request)  # before the body is read: it would not be read right
        if queued:  # before the body too: a client that waits for "100 Continue" uploads nothing for a 429
            worker.check_capacity()
        try:
            body = await _unless_ending(_read_body(request, options.max_body_bytes, options.body_timeout), ending)
        except ClientDisconnect:  # the client closed the connection before its body was in
            return Response(status_code=499)
        if queued:
            worker.check_capacity()  # again (it may have filled meanwhile), before parsing megabytes of images
        try:
            if len(body) > LARGE_BODY_BYTES:
                async with large_bodies:
                    if await request.is_disconnected():  # it left while others were parsed
                        return Response(status_code=499)
                    if queued:
                        worker.check_capacity()  # the queue may have filled meanwhile
                    ready = await prepared(request, body, prepare)
            else:
                ready = await prepared(request, body, prepare)
        except Cancelled:  # it left, or the server stopped, while a video was measured
            if ending.is_set():
                raise shutting_down() from None
            return Response(status_code=499)
        if await request.is_disconnected():  # it left while its images were read: nothing to answer
            return Response(status_code=499)
        return ready

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        ready = await admitted(request, prepare_chat)
        if isinstance(ready, Response):
            return ready
        req, prompt, params = ready
        job = Job(prompt, params, stop_strings(req), asyncio.get_running_loop(), choices=choices(req),
                  keep_entries=not req.stream)  # fmt: skip
        worker.submit(job)
        if req.stream:
            return await job_stream(job, request, lambda events: _stream(job, events, req, model_id))
        return await _complete(job, request, req, model_id)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        ready = await admitted(request, prepare_text)
        if isinstance(ready, Response):
            return ready
        req, prompts, params = ready
        job = text_job(req, prompts, params, context, asyncio.get_running_loop())
        worker.submit(job)
        if req.stream:
            return await job_stream(job, request, lambda events: text_stream(job, events, req, prompts, model_id))
        return await text_complete(job, request, req, prompts, model_id)

    # vLLM's tokenizer endpoints (lm-eval's remote tokenizer): no engine work, so no place in the queue
    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        ready = await admitted(request, lambda body, gone: tokenize(body, worker.prompts, model_id, context, gone), False)
        return ready if isinstance(ready, Response) else JSONResponse(ready)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        ready = await admitted(request, lambda body, _gone: detokenize(body, worker.prompts, model_id), False)
        return ready if isinstance(ready, Response) else JSONResponse(ready)

    info = tokenizer_info(worker.prompts, context)

    @app.api_route("/tokenizer_info", methods=["GET", "HEAD"])
    async def tokenizer_info_route(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(info)

    return app


async def _unless_ending(reading, ending: asyncio.Event):
    """`reading`'s result, or a 503 once the shutdown's grace period is over: a body still coming
    then (a slow upload) was cancelled by uvicorn, a text/plain 500 and a traceback in the log."""
    task = asyncio.ensure_future(reading)
    ended = asyncio.ensure_future(ending.wait())
    try:
        await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        ended.cancel()
    if not task.done():
        task.cancel()
        raise shutting_down()
    return task.result()


def shutting_down() -> APIError:
    """The 503 of a request the end of the shutdown's grace period stopped before it was queued."""
    return APIError(503, "the server is shutting down; retry later", code="shutting_down",
                    headers={"Connection": "close"})  # fmt: skip


async def _set_when_gone(request: Request, gone: threading.Event) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(POLL_S)
    gone.set()


async def _set_when_set(event: asyncio.Event, gone: threading.Event) -> None:
    await event.wait()
    gone.set()


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body, within `limit` bytes and `timeout` seconds in all (a client that trickles
    it, or stops half-way, must not hold a connection and a place under the limit for ever)."""
    too_large = APIError(413, f"the request body is over this server's {limit >> 20} MiB limit; send smaller or fewer "
                         "images", code="request_too_large")  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, total = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for block in request.stream():
                total += len(block)
                if total > limit:
                    raise too_large
                parts.append(block)
    except TimeoutError:
        # and the connection closed: a client that stalled half-way is not worth keeping
        raise APIError(408, f"the request body was not complete after {timeout:g} s (this server's body timeout); "
                       "send the whole request at once", code="request_timeout",
                       headers={"Connection": "close"}) from None  # fmt: skip
    return b"".join(parts)


async def _complete(job: Job, request: Request, req: ChatCompletionRequest, model_id: str) -> Response:
    answers = []
    try:
        async for kind, payload in job_events(job, request):
            if kind == "error":
                raise payload
            if kind == "choice":
                answers.append(choice(payload["index"], payload, req.return_token_ids))
            elif kind == "done":
                return JSONResponse(completion(job.cid, model_id, answers, payload))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    finally:
        job.cancel.set()  # a no-op after "done"; stops the engine if we leave early


async def _stream(job: Job, events: AsyncIterator, req: ChatCompletionRequest, model_id: str):
    """Choice 0's chunks, then choice 1's, ...: each begins with its role delta and ends with its
    finish chunk; the usage chunk (when asked) and [DONE] come after the last. `events`: the job's
    after "started" (serve/replies.py's job_stream)."""
    cid, created = job.cid, int(time.time())
    with_usage = bool(req.stream_options and req.stream_options.include_usage)

    def opening(index: int) -> bytes:
        return sse.event(chunk(cid, model_id, created, {"role": "assistant", "content": ""}, include_usage=with_usage,
                               index=index))  # fmt: skip

    def text_events(index: int) -> sse.TextEvents:
        return sse.TextEvents(chunk(cid, model_id, created, {"content": ""}, include_usage=with_usage, index=index),
                              ("choices", 0, "delta", "content"))  # fmt: skip

    index = 0
    text_event = text_events(index)
    yield opening(index)
    async for kind, payload in events:
        if kind == "text" and req.logprobs:  # a chunk of its own: its logprobs vary in shape
            text, entries = payload
            yield sse.event(chunk(cid, model_id, created, {"content": text}, include_usage=with_usage,
                                  logprobs=logprobs_object(entries), index=index))  # fmt: skip
        elif kind == "text":
            yield text_event(payload[0])
        elif kind == "choice":
            extra = {"token_ids": payload["token_ids"]} if req.return_token_ids else None
            last = chunk(cid, model_id, created, {}, payload["finish_reason"], with_usage, extra, index=index)
            last["timings"] = payload["timings"]  # llama.cpp puts them on the last chunk
            yield sse.event(last)
            index += 1
            if index < job.choices:
                text_event = text_events(index)
                yield opening(index)
        elif kind == "done":
            if with_usage:
                yield sse.event(usage_chunk(cid, model_id, created, payload))
            return
        elif kind == "error":
            raise payload  # JobStream (serve/replies.py) sends it as the last event, then [DONE]
