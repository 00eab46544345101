"""What the request handlers share once a Job is queued: its events as they read them (a client
that left cancels it), and a stream that ends as every stream ends, cancelling its job however it
ends."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from . import sse
from .engine import Job
from .errors import APIError

POLL_S = 0.5  # how often a waiting handler checks that its client is still there


class ClientDisconnected(Exception):
    pass


class JobStream(StreamingResponse):
    """An endpoint's server-sent events of a job (`chunks`, an async generator over `job_events`),
    ended as every stream ends (`ended`) and its job cancelled however it ends. When the client is
    dropped (its connection lost, or --write-timeout), Starlette cancels the task that iterates the
    chunks while it waits to write, and a generator's own `finally` would run only when it is
    garbage-collected."""

    def __init__(self, job: Job, chunks: AsyncIterator[bytes], **kw) -> None:
        super().__init__(ended(job, chunks), **kw)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()  # a no-op after "done"; frees the engine at once otherwise


async def ended(job: Job, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks, then [DONE]. An endpoint raises the job's "error" event as its handler without a
    stream does: here it is the last event, before [DONE] (the status line is long sent). A client
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
