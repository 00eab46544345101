"""What the request handlers share once a Job is queued: its events as they read them (a client
that left cancels it), and a stream that ends as every stream ends, cancelling its job however it
ends.

A stream's status line waits for the engine's "started" event (`job_stream`): the job was taken
from the queue, every prompt of it checked and its pictures decoded (or found in the feature
cache), and prefill is about to begin. What fails before that (a picture that does not decode, any
prompt of the job the engine refuses, the server shutting down while the job waited in the queue)
is the HTTP status and error body the same request gets without `stream`; what fails after it is
the stream's last event."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from . import sse
from .connections import CONNECTION
from .engine import Job
from .errors import APIError

POLL_S = 0.5  # how often a waiting handler checks that its client is still there
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientDisconnected(Exception):
    pass


class JobStream(StreamingResponse):
    """An endpoint's server-sent events of a job (`chunks`, an async generator over `job_events`),
    ended as every stream ends (`ended`) and its job cancelled however it ends. When the client is
    dropped (its connection lost, or --write-timeout), Starlette cancels the task that iterates the
    chunks while it waits to write, and a generator's own `finally` would run only when it is
    garbage-collected.

    Its client must not let too much of it wait: each write waits for the client to take the last
    one, while the engine goes on; past serve/connections.py's UNSENT_BYTES waiting (the job's
    events, and what the kernel has not taken) the connection is dropped and the job cancelled, as
    for a client that left."""

    def __init__(self, job: Job, chunks: AsyncIterator[bytes], **kw) -> None:
        super().__init__(ended(job, chunks), **kw)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        connection = scope.get(CONNECTION)  # absent without our protocol (an in-process client): nothing to drop

        def watch(queued: int) -> None:
            if connection.unsent_over(queued):
                self.job.events.watch = None
                self.job.cancel.set()

        if connection is not None:
            self.job.events.watch = watch
        try:
            await super().__call__(scope, receive, send)
        finally:
            if connection is not None:
                self.job.events.watch = None
            self.job.cancel.set()  # a no-op after "done"; frees the engine at once otherwise


async def job_stream(job: Job, request: Request, chunks: Callable[[AsyncIterator], AsyncIterator[bytes]]) -> Response:
    """The job's stream, `chunks(events)` over its events after "started", begun only once the
    engine has started it; until then it waits as a handler without a stream waits for its answer.
    An error before it is raised (the app answers its status), a client that left meanwhile gets
    a 499 that nobody reads (its job cancelled, so a queued one is skipped)."""
    try:
        events = await started(job, request)
    except ClientDisconnected:
        return Response(status_code=499)
    return JobStream(job, chunks(events), media_type="text/event-stream", headers=STREAM_HEADERS)


async def started(job: Job, request: Request) -> AsyncIterator:
    """`job_events` once its "started" event has come, to be read on from there; the job's error
    before it raised (APIError, or ClientDisconnected), its job cancelled however the wait ends
    without it (a task cancelled at shutdown too)."""
    events = job_events(job, request)
    try:
        async for kind, payload in events:
            if kind == "started":
                return events
            if kind == "error":
                raise payload
            # any other event means the engine has begun without saying so: stream from it rather
            # than wait for a "started" that will not come
            return _resumed((kind, payload), events)
    except BaseException:
        job.cancel.set()  # frees the engine, or has the queued job skipped
        await events.aclose()
        raise
    raise AssertionError("job_events ended without an event")  # it waits for ever, or raises


async def _resumed(first: tuple, events: AsyncIterator) -> AsyncIterator:
    """`first`, then the rest of `events` (closed with this one)."""
    try:
        yield first
        async for event in events:
            yield event
    finally:
        await events.aclose()


async def ended(job: Job, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks, then [DONE]. An endpoint raises the job's "error" event as its handler without a
    stream does: here it is the last event, before [DONE] (the status line went out at "started"). A client
    that left (`job_events` raised ClientDisconnected) is sent nothing more."""
    try:
        async for data in chunks:
            yield data
        yield sse.DONE
    except APIError as error:
        yield sse.event(error.body())
        yield sse.DONE
    except ClientDisconnected:
        return
    finally:
        job.cancel.set()  # a no-op after "done"; stops the engine if we leave early


_DELTAS = ("text", "tokens")  # the engine's text events, without and with logprob entries


async def job_events(job: Job, request: Request):
    """The job's events as they come, text deltas that queued up meanwhile joined into one:
    ("text", (text, logprob entries)), the entries [] unless logprobs were asked for. Deltas are
    joined only up to the next other event, which may end one choice before the next one's text."""
    while True:
        batch = await job.events.get_batch(POLL_S)
        # asked after every batch, not only after a quiet POLL_S: a decode sends text every few
        # milliseconds, and a non-streaming handler writes nothing that would fail on a closed socket
        if await request.is_disconnected():
            job.cancel.set()
            raise ClientDisconnected
        deltas: list = []
        for kind, payload in batch:
            if kind in _DELTAS:
                deltas.append(payload if kind == "tokens" else (payload, []))
                continue
            if joined := _joined(deltas):
                yield "text", joined
            deltas = []
            yield kind, payload
        if joined := _joined(deltas):
            yield "text", joined


def _joined(deltas: list) -> tuple[str, list] | None:
    """Text deltas as one (text, logprob entries); None when they hold nothing."""
    text, entries = "".join(text for text, _ in deltas), [entry for _, listed in deltas for entry in listed]
    return (text, entries) if text or entries else None
