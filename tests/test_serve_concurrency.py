"""`internvl-chat serve` under clients that leave early, queue churn and concurrent requests.

Engine hooks (called in the engine thread) hold a job or watch its events, and the tests
synchronise on them and on the server's own markers (a job's `cancel` event, uvicorn's set of open
connections), never on timing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest

from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.engine.loader import load_model
from internvl_chat.serve import app as serve_app
from internvl_chat.serve.conversation import Prompt
from internvl_chat.serve.engine import EngineWorker, Job
from internvl_chat.serve.options import ServeOptions
from serve_support import RunningServer

WAIT_S = 60


@pytest.fixture(scope="module")
def server(tiny_original):
    with RunningServer(tiny_original, queue_depth=8, slots=2) as running:
        yield running


def _body(text: str, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "temperature": 0, **kw}


def _post_raw(port: int, body: dict) -> socket.socket:
    """A complete request on a socket of our own, so the test decides when the client goes away."""
    payload = json.dumps(body).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.sendall(head.encode() + payload)
    return sock


def _hold_first_job():
    """An on_start hook that keeps the first job it sees in the engine until `release` is set."""
    started, release = threading.Event(), threading.Event()

    def hold(job):
        if not started.is_set():
            started.set()
            assert release.wait(WAIT_S)

    return hold, started, release


def test_a_non_streaming_client_that_leaves_mid_answer_stops_the_engine(server, monkeypatch):
    # A decode sends text every few milliseconds, so the handler is never idle for POLL_S; it must
    # still notice that its client left (a non-streaming handler writes nothing that could fail).
    monkeypatch.setattr(serve_app, "POLL_S", 3600.0)  # only the per-batch check can see the disconnect
    worker = server.worker
    first, closed, seen = threading.Event(), threading.Event(), {}

    def watch(job, event):
        if first.is_set():
            return
        seen["job"] = job
        first.set()
        assert closed.wait(WAIT_S)
        # keep events coming, as a long answer would, until the handler cancels the job
        for _ in range(WAIT_S * 100):
            if job.cancel.wait(0.01):
                break
            job.emit("text", "")
        seen["cancelled"] = job.cancel.is_set()

    worker.on_event = watch
    try:
        sock = _post_raw(server.port, _body("Write a long story.", max_tokens=400))
        assert first.wait(WAIT_S)
        sock.close()  # the client goes away while the answer is being generated
        closed.set()
        assert worker.wait_idle(WAIT_S)
    finally:
        worker.on_event = None
    assert seen["cancelled"]
    record = next(r for r in worker.finished if r["job"] == seen["job"].number)
    assert record["finish_reason"] == "cancelled" and record["completion_tokens"] < 400


def test_a_queued_job_whose_client_left_does_not_hold_its_place(server):
    worker = server.worker
    hold, started, release = _hold_first_job()
    worker.on_start, server.options.queue_depth = hold, 1
    outcomes: dict[str, int] = {}

    def ask(name: str) -> None:
        outcomes[name] = httpx.post(f"{server.url}/v1/chat/completions", json=_body(name, max_tokens=2), timeout=WAIT_S).status_code

    first = threading.Thread(target=ask, args=("first",))
    try:
        first.start()
        assert started.wait(WAIT_S)  # running (held): the one place in the queue is free
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=_body("second", max_tokens=2, stream=True),
                          timeout=WAIT_S) as r:  # fmt: skip
            assert r.status_code == 200  # queued; the stream has begun
            assert worker.waiting == 1
            gone = worker._queue[0]
        assert gone.cancel.wait(WAIT_S)  # the client left while its job waited
        third = threading.Thread(target=ask, args=("third",))
        third.start()  # the dead job must not make this a 429
        while "third" not in outcomes and not any(not job.cancel.is_set() for job in list(worker._queue)):
            third.join(0.01)  # until the third request waits in the queue (or was refused)
        release.set()
        first.join(WAIT_S)
        third.join(WAIT_S)
    finally:
        release.set()
        worker.on_start, server.options.queue_depth = None, 8
    assert outcomes == {"first": 200, "third": 200}
    assert worker.wait_idle(WAIT_S) and worker.waiting == 0


def test_a_skipped_job_wakes_those_waiting_for_an_idle_engine(tiny_original):
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=256)
    worker = EngineWorker(loaded, ServeOptions(slots=1))
    loop = asyncio.new_event_loop()
    job = Job(Prompt(ids=[1, 2, 3]), SamplingParams(max_new_tokens=1), [], loop)
    job.cancel.set()  # its client left while it waited
    worker._queue.append(job)
    idle = []

    def wait_for_idle() -> None:
        # The engine thread needs the lock that wait_idle holds until it waits, so it takes (and
        # skips) the job only once wait_idle is waiting: the skip itself must wake it.
        with worker._cond:
            worker.start()
            idle.append(worker.wait_idle())  # no timeout: only a notification ends this wait

    waiter = threading.Thread(target=wait_for_idle, daemon=True)
    try:
        waiter.start()
        waiter.join(WAIT_S)
        assert idle == [True]
        assert worker.counts["skipped"] == 1
    finally:
        worker.stop()  # also wakes the waiter if the skip did not
        waiter.join(WAIT_S)
        loop.close()
