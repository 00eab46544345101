"""`internvl-chat serve` under clients that leave early, queue churn and concurrent requests.

Engine hooks (called in the engine thread) hold a job or watch its events, and the tests
synchronise on them and on the server's own markers (a job's `cancel` event, uvicorn's set of open
connections), never on timing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import types

import httpx
import pytest

from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.engine.loader import load_model
from internvl_chat.serve import app as serve_app
from internvl_chat.serve import connections
from internvl_chat.serve import replies
from internvl_chat.serve.conversation import Prompt
from internvl_chat.serve.engine import EngineWorker, Job
from internvl_chat.serve.options import ServeOptions
from media_helpers import textured_rgb, write_numbered_video
from serve_support import RunningServer, chat_body, crowd, png_bytes, wait_until

WAIT_S = 60


def _post_raw(port: int, body: dict, headers: str = "") -> socket.socket:
    """A complete request on a socket of our own, so the test decides when the client goes away."""
    payload = json.dumps(body).encode()
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"{headers}Content-Length: {len(payload)}\r\n\r\n")  # fmt: skip
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


def _answer_until_cancelled(worker) -> tuple[threading.Event, threading.Event, dict]:
    """Hook the engine: its first job (seen["job"]) sets `first`, waits for the test to set `closed`,
    then keeps its events coming, as a long answer does, until it is cancelled (seen["cancelled"])."""
    first, closed, seen = threading.Event(), threading.Event(), {}

    def watch(job, event):
        if first.is_set():
            return
        seen["job"] = job
        first.set()
        assert closed.wait(WAIT_S)
        for _ in range(WAIT_S * 100):
            if job.cancel.wait(0.01):
                break
            job.emit("text", "")
        seen["cancelled"] = job.cancel.is_set()

    worker.on_event = watch
    return first, closed, seen


def test_a_non_streaming_client_that_leaves_mid_answer_stops_the_engine(server, monkeypatch):
    # A decode sends text every few milliseconds, so the handler is never idle for POLL_S; it must
    # still notice that its client left (a non-streaming handler writes nothing that could fail).
    monkeypatch.setattr(replies, "POLL_S", 3600.0)  # only the per-batch check can see the disconnect
    worker = server.worker
    first, closed, seen = _answer_until_cancelled(worker)
    try:
        sock = _post_raw(server.port, chat_body("Write a long story.", max_tokens=400))
        assert first.wait(WAIT_S)
        sock.close()  # the client goes away while the answer is being generated
        closed.set()
        assert worker.wait_idle(WAIT_S)
    finally:
        worker.on_event = None
    assert seen["cancelled"]
    record = next(r for r in worker.finished if r["job"] == seen["job"].number)
    assert record["finish_reason"] == "cancelled" and record["completion_tokens"] < 400


def test_a_stream_whose_client_is_dropped_cancels_its_job_when_it_ends():
    """Starlette cancels the task that writes a stream when its client is gone (its connection
    lost, or dropped after --write-timeout) and leaves the event generator suspended; the
    generator's own `finally` runs only when it is collected, which a reference to it delays.
    The response itself cancels the job."""
    job = types.SimpleNamespace(cancel=threading.Event())
    disconnect = asyncio.Event()

    async def events():  # the first event, then a long wait for the engine's next text
        yield b"data: {}\n\n"
        await asyncio.Event().wait()

    async def receive():
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message.get("body"):
            disconnect.set()  # the client goes away once the stream has begun

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST", "headers": []}
    held = events()  # held here, as a reference cycle could hold it
    asyncio.run(replies.JobStream(job, held, media_type="text/event-stream")(scope, receive, send))
    assert job.cancel.is_set()


def test_a_queued_job_whose_client_left_does_not_hold_its_place(server):
    worker = server.worker
    hold, started, release = _hold_first_job()
    worker.on_start, server.options.queue_depth = hold, 1
    outcomes: dict[str, int] = {}

    def ask(name: str) -> None:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(name, max_tokens=2), timeout=WAIT_S)
        outcomes[name] = r.status_code

    first = threading.Thread(target=ask, args=("first",))
    try:
        first.start()
        assert started.wait(WAIT_S)  # running (held): the one place in the queue is free
        # a stream waits for its headers while its job is queued, as a plain request waits for its answer
        sock = _post_raw(server.port, chat_body("second", max_tokens=2, stream=True))
        wait_until(lambda: worker.waiting == 1, "the stream's job was queued")
        gone = worker._queue[0]
        sock.close()
        assert gone.cancel.wait(WAIT_S)  # the client left while its job waited (no headers yet)
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


def _image_body(text: str, png: bytes, **kw) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def _leave_once_begun(server, body: dict, jobs: list, began, what: str) -> None:
    """Post `body`, close the connection once `began()` holds, and wait for the engine to go idle:
    the job is counted as cancelled once (`jobs` collects the jobs the engine starts)."""
    worker = server.worker
    worker.on_start = jobs.append
    cancelled = worker.counts["cancelled"]
    try:
        sock = _post_raw(server.port, body)
        wait_until(began, what)
        sock.close()
        assert worker.wait_idle(WAIT_S)
    finally:
        worker.on_start = None
    assert worker.counts["cancelled"] == cancelled + 1


@pytest.mark.parametrize("leaving", ["close", "half-close"])
def test_a_client_that_leaves_while_its_request_is_read_is_never_queued(server, monkeypatch, leaving):
    """A half-close (shutdown(SHUT_WR) after a complete request) is leaving too: TCP tells the
    server the same end of input for it as for a close, and uvicorn closes the connection at that
    end, so the engine never runs for it and it gets no answer (README: "Slow and abusive clients")."""
    worker = server.worker
    make = worker.prompts.make
    reading, left, started = threading.Event(), threading.Event(), []

    def slow_make(req, cancel=None):  # reading and measuring the request's images, in a worker thread
        reading.set()
        assert left.wait(WAIT_S)
        return make(req, cancel)

    monkeypatch.setattr(worker.prompts, "make", slow_make)
    worker.on_start = started.append
    state = server.server.server_state
    try:
        with _post_raw(server.port, chat_body("Describe a harbour.", max_tokens=50)) as sock:
            assert reading.wait(WAIT_S)
            port = sock.getsockname()[1]
            if leaving == "half-close":  # the request is complete; only the client's sending ends
                sock.shutdown(socket.SHUT_WR)
            else:
                sock.close()
            wait_until(lambda: all(c.client[1] != port for c in list(state.connections)), "the server saw the client leave")
            left.set()
            wait_until(lambda: not state.tasks, "the handler returned")
            assert worker.wait_idle(WAIT_S)
            if leaving == "half-close":
                assert sock.recv(65536) == b""  # closed without an answer
    finally:
        left.set()
        worker.on_start = None
    assert started == []  # the engine never ran (nor prefilled) a request nobody waits for


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])  # a stream waits for its headers meanwhile
def test_a_client_that_leaves_while_its_picture_is_encoded_gets_no_prefill(server, monkeypatch, stream):
    model = server.worker.model
    encode, forward = model.encode_images, model.forward
    encoding, jobs, forwards = threading.Event(), [], []

    def slow_encode(pixels, cancel=None):
        encoding.set()
        assert jobs[-1].cancel.wait(WAIT_S)  # until the handler has seen its client leave
        return encode(pixels, cancel)

    def counting_forward(*args, **kw):
        forwards.append(1)
        return forward(*args, **kw)

    monkeypatch.setattr(model, "encode_images", slow_encode)
    monkeypatch.setattr(model, "forward", counting_forward)
    seed = 131 if stream else 31  # a picture of its own: not in the feature cache yet
    body = _image_body("What is this?", png_bytes(textured_rgb(448, 448, seed=seed)), max_tokens=50, stream=stream)
    _leave_once_begun(server, body, jobs, encoding.is_set, "the encoding began")
    assert forwards == []  # no prefill, no token


def test_a_client_that_leaves_while_its_video_is_decoded_stops_the_decoding_at_the_next_frame(server, monkeypatch, tmp_path):
    from internvl_chat.media import video as media_video

    model = server.worker.model
    real_frame_to_tile, decoded, jobs, encodes = media_video.frame_to_tile, [], [], []

    def first_frame_waits(rgb, orientation, size):
        decoded.append(1)
        if len(decoded) == 1:
            assert jobs[-1].cancel.wait(WAIT_S)  # until the handler has seen its client leave
        return real_frame_to_tile(rgb, orientation, size)

    monkeypatch.setattr(media_video, "frame_to_tile", first_frame_waits)
    monkeypatch.setattr(model, "encode_images", lambda *a, **kw: encodes.append(1))
    clip = write_numbered_video(tmp_path / "clip.avi", 40)
    url = "data:video/x-msvideo;base64," + base64.b64encode(clip.read_bytes()).decode()
    body = {"model": "tiny", "temperature": 0, "max_tokens": 4, "media_io_kwargs": {"video": {"num_frames": 8}},
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}]}  # fmt: skip
    _leave_once_begun(server, body, jobs, lambda: decoded, "the decoding began")
    assert encodes == []
    wait_until(lambda: not any(t.name == "video-decode" and t.is_alive() for t in threading.enumerate()), "the decoder stopped")
    assert decoded == [1]  # the other seven frames were never decoded


def test_a_client_that_leaves_during_a_long_prefill_stops_it_at_the_next_chunk(server, monkeypatch):
    model = server.worker.model
    lm = model.language_model
    forward_embeds, chunks, jobs = lm.forward_embeds, [], []
    picture = png_bytes(textured_rgb(448, 448, seed=35))
    client = server.client()
    want = client.chat.completions.create(**_image_body("What is this?", picture, max_tokens=6))

    def first_chunk_waits(h, start_pos, *args, **kwargs):
        if h.shape[1] > 1:  # a prefill chunk (a decode step feeds one token)
            chunks.append(h.shape[1])
            if len(chunks) == 1:
                assert jobs[-1].cancel.wait(WAIT_S)  # until the handler has seen its client leave
        return forward_embeds(h, start_pos, *args, **kwargs)

    monkeypatch.setattr(model, "prefill_chunk", 32)  # the picture's 256 tokens: 9 chunks
    monkeypatch.setattr(lm, "forward_embeds", first_chunk_waits)
    # a new picture, so that nothing of it is cached and all of it is prefilled
    body = _image_body("What is this?", png_bytes(textured_rgb(448, 448, seed=36)), max_tokens=6)
    _leave_once_begun(server, body, jobs, lambda: chunks, "the prefill began")
    assert chunks == [32]  # the other eight chunks never ran
    monkeypatch.setattr(lm, "forward_embeds", forward_embeds)
    again = client.chat.completions.create(**_image_body("What is this?", picture, max_tokens=6))
    assert again.choices[0].message.content == want.choices[0].message.content


def test_a_request_that_fails_before_its_prefill_leaves_the_slot_s_pictures_reusable(tiny_original):
    good = png_bytes(textured_rgb(448, 448, seed=33))
    broken = png_bytes(textured_rgb(448, 448, seed=34))[:4000]  # its header reads; its pixels do not
    with RunningServer(tiny_original, slots=1) as one:
        client = one.client()
        conversation = _image_body("What is this?", good, max_tokens=4)
        first = client.chat.completions.create(**conversation)
        r = httpx.post(f"{one.url}/v1/chat/completions", json=_image_body("What is this?", broken, max_tokens=4), timeout=WAIT_S)
        assert r.status_code == 400  # failed in the engine, decoding the picture: the slot was never rewound
        again = client.chat.completions.create(**conversation)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1  # the picture too
    assert again.choices[0].message.content == first.choices[0].message.content


def test_a_request_that_fails_before_its_prefill_does_not_change_which_slot_is_replaced_next(tiny_original):
    x = "Tell me about the harbour: the boats, the cranes, the gulls and the fishermen mending nets. " * 3
    y = "Explain how a mountain glacier moves, melts and carves the valley below it over the centuries. " * 3
    broken = png_bytes(textured_rgb(448, 448, seed=35))[:4000]  # its header reads; its pixels do not
    with RunningServer(tiny_original, slots=2) as two:
        client = two.client()
        client.chat.completions.create(**chat_body(x, max_tokens=4))  # both slots empty: x in one, y in the other
        client.chat.completions.create(**chat_body(y, max_tokens=4))
        again = client.chat.completions.create(**chat_body(x, max_tokens=4))  # y's slot is now the least recently used
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        r = httpx.post(f"{two.url}/v1/chat/completions", json=_image_body("What is this?", broken, max_tokens=4), timeout=WAIT_S)
        assert r.status_code == 400  # it chose y's slot, then failed decoding the picture: y's slot was not used
        client.chat.completions.create(**chat_body("Something else entirely.", max_tokens=4))  # replaces y, not x
        kept = client.chat.completions.create(**chat_body(x, max_tokens=4))
    assert kept.usage.prompt_tokens_details.cached_tokens == kept.usage.prompt_tokens - 1

def test_a_failure_after_the_answer_is_committed_leaves_the_slot_knowing_its_picture(tiny_original):
    """A bug in the engine after the Session committed the answer (a 500) must not leave the slot
    holding the picture's KV while it records no picture there: a /v1/completions prompt of the
    same token ids would then continue from another request's picture."""
    picture = png_bytes(textured_rgb(448, 448, seed=37))

    def fail_at_the_end(job, event):
        if event["finish_reason"] is not None:  # the Session has committed the prompt and answer by now
            raise RuntimeError("a bug while the last event was handled")

    with RunningServer(tiny_original, slots=1) as one:
        worker = one.worker
        worker.on_event = fail_at_the_end
        try:
            r = httpx.post(f"{one.url}/v1/chat/completions", json=_image_body("What is this?", picture, max_tokens=3),
                           timeout=WAIT_S)  # fmt: skip
        finally:
            worker.on_event = None
        assert r.status_code == 500
        slot = worker.slots.slots[0]
        held = slot.session.ids[: slot.cached]
        img_start = held.index(one.prompt_builder().img_start_id)
        plain = httpx.post(f"{one.url}/v1/completions", json={"model": "tiny", "prompt": held, "max_tokens": 1},
                           timeout=WAIT_S)  # fmt: skip
    assert plain.status_code == 200
    assert plain.json()["usage"]["prompt_tokens_details"]["cached_tokens"] <= img_start


def _greedy_ids(client, messages, **kw) -> tuple[str, list[int]]:
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=kw.pop("max_tokens", 10), temperature=0,
                                         extra_body={"return_token_ids": True}, **kw)  # fmt: skip
    return out.choices[0].message.content, out.choices[0].model_extra["token_ids"]


def test_after_cancelled_stopped_and_abandoned_requests_greedy_answers_are_a_fresh_server_s(server, tiny_original):
    opening = "Tell me about the harbour: the boats, the cranes and the gulls. " * 3
    first = [{"role": "user", "content": opening}]
    with RunningServer(tiny_original, slots=2) as fresh:
        fresh_client = fresh.client()
        answer, first_ids = _greedy_ids(fresh_client, first)
        longer = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the fishermen?"}]
        wanted = {"first": first_ids, "longer": _greedy_ids(fresh_client, longer)[1]}
        other = [{"role": "user", "content": opening + "Be brief."}]  # shares a long prefix with `first`
        other_answer, wanted["other"] = _greedy_ids(fresh_client, other)

    worker, client = server.worker, server.client()
    # 1. a stream that its client leaves mid-answer (the engine waits at the first event until it sees that)
    mid_answer = threading.Event()

    def wait_for_cancel(job, event):
        if not mid_answer.is_set():
            mid_answer.set()
            assert job.cancel.wait(WAIT_S)

    worker.on_event = wait_for_cancel
    try:
        stream = client.chat.completions.create(model="tiny", messages=longer, max_tokens=200, temperature=0, stream=True)
        next(iter(stream))
        assert mid_answer.wait(WAIT_S)
        stream.close()
        assert worker.wait_idle(WAIT_S)
    finally:
        worker.on_event = None
    # 2. a stop string in the first token's text
    stopped = client.chat.completions.create(model="tiny", messages=other, max_tokens=20, temperature=0, stop=[other_answer[:1]])
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("", "stop")
    # 3. a job abandoned while it waited in the queue behind a held one
    hold, started, release = _hold_first_job()
    worker.on_start = hold
    try:
        held = threading.Thread(target=_greedy_ids, args=(client, other), kwargs={"max_tokens": 50})
        held.start()
        assert started.wait(WAIT_S)
        sock = _post_raw(server.port, chat_body("Something else entirely.", max_tokens=50))
        wait_until(lambda: worker.waiting == 1, "the request was queued")
        queued = worker._queue[0]
        sock.close()
        assert queued.cancel.wait(WAIT_S)
        release.set()
        held.join(WAIT_S)
    finally:
        release.set()
        worker.on_start = None
    assert worker.wait_idle(WAIT_S)
    # the shorter conversation is a prefix of the longer one the slot holds
    for name, messages in (("first", first), ("longer", longer), ("other", other), ("first", first)):
        assert _greedy_ids(client, messages)[1] == wanted[name], name


def test_a_crowd_of_streaming_plain_and_departing_clients_is_answered_or_refused_and_the_server_recovers(server):
    client = server.client()
    question = [{"role": "user", "content": "Name three colours."}]
    before = _greedy_ids(client, question)
    outcomes: list[str] = []
    lock = threading.Lock()

    def visitor(n: int) -> None:
        body = chat_body(f"visitor {n}: say something", max_tokens=6)
        if n % 3 == 0:  # streams to the end
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True,
                              "stream_options": {"include_usage": True}}, timeout=WAIT_S) as r:  # fmt: skip
                raw = r.read().decode()
            if r.status_code == 200:
                events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
                assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] >= 1, raw
                outcome = "streamed"
            else:
                outcome = json.loads(raw)["error"]["code"]
        elif n % 3 == 1:  # leaves after the first event, or when refused
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                              timeout=WAIT_S) as r:  # fmt: skip
                outcome = "left" if r.status_code == 200 and next(r.iter_raw()) else json.loads(r.read())["error"]["code"]
        else:
            r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=WAIT_S)
            answered = r.status_code == 200 and r.json()["choices"][0]["finish_reason"]
            outcome = "answered" if answered else r.json()["error"]["code"]
        with lock:
            outcomes.append(outcome)

    crowd(server, visitor, count=18, queue_depth=2, join_s=WAIT_S * 4)  # well under the crowd: most are refused
    assert len(outcomes) == 18 and set(outcomes) <= {"streamed", "left", "answered", "queue_full"}
    assert worker_is_idle(server.worker)
    assert httpx.get(f"{server.url}/health", timeout=WAIT_S).json() == {"status": "ok"}
    assert _greedy_ids(client, question) == before


def worker_is_idle(worker) -> bool:
    return worker.wait_idle(WAIT_S) and worker.waiting == 0 and worker.running is None


def test_large_bodies_are_parsed_one_at_a_time_and_small_ones_alongside(server, monkeypatch):
    # parsing holds ~45× a body's size and every request in flight parsed at once: 40 bodies of
    # 64 MiB at the same time were ~100 GB of parse trees before the queue could refuse any
    real_parse, real_read, lock = serve_app.parse_request, serve_app._read_body, threading.Lock()
    inside, peak, bodies_read = [], {"large": 0, "any": 0}, []
    first_in, second_large_in, both_read, small_done, release = (threading.Event() for _ in range(5))

    def parse(body: bytes):
        large = len(body) > serve_app.LARGE_BODY_BYTES
        with lock:
            inside.append(large)
            peak["large"], peak["any"] = max(peak["large"], inside.count(True)), max(peak["any"], len(inside))
            (second_large_in if inside.count(True) == 2 else first_in).set()
        try:
            if large and not release.is_set():
                release.wait(WAIT_S)  # the first large body stays in its parse until the test lets it go
            return real_parse(body)
        finally:
            with lock:
                inside.remove(large)

    async def read(request, limit, timeout):
        body = await real_read(request, limit, timeout)
        bodies_read.append(len(body))
        if len(bodies_read) == 2:
            both_read.set()
        return body

    monkeypatch.setattr(serve_app, "parse_request", parse)
    monkeypatch.setattr(serve_app, "_read_body", read)
    small_body = json.dumps(chat_body("Hi.", max_tokens=1)).encode()
    large_body = small_body + b" " * (serve_app.LARGE_BODY_BYTES + 1)  # still valid JSON
    codes = {}

    def post(name: str, body: bytes) -> None:
        with httpx.Client(timeout=WAIT_S * 3) as http:
            codes[name] = http.post(f"{server.url}/v1/chat/completions", content=body,
                                    headers={"Content-Type": "application/json"}).status_code  # fmt: skip
        if name == "small":
            small_done.set()

    threads = [threading.Thread(target=post, args=("large0", large_body))]
    threads[0].start()
    assert first_in.wait(WAIT_S)
    threads.append(threading.Thread(target=post, args=("large1", large_body)))
    threads[1].start()
    try:
        assert both_read.wait(WAIT_S)  # the second large body is in: let in, it would reach its parse at once
        assert not second_large_in.wait(5)
        threads.append(threading.Thread(target=post, args=("small", small_body)))
        threads[2].start()
        assert small_done.wait(WAIT_S)  # a small body is parsed (and answered) while the large one is held
    finally:
        release.set()
        for t in threads:
            t.join(WAIT_S * 3)
    assert codes == {"large0": 200, "large1": 200, "small": 200}
    assert peak == {"large": 1, "any": 2}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/health"])
def test_a_request_read_when_the_grace_period_ends_is_told_the_server_is_shutting_down(tiny_original, path):
    """A request whose body was in but not yet parsed when the shutdown's grace period ended (its
    pictures still being read) reached the queue after the engine had stopped taking jobs, and got
    503 `engine_unavailable`, "the engine is not running", as if the engine had failed; /health
    said the same while the server stopped. It is the 503 `shutting_down` the others get."""
    with RunningServer(tiny_original) as server:
        worker = server.worker
        make = worker.prompts.make
        reading, ended = threading.Event(), threading.Event()

        def slow_make(req, cancel=None):  # reading the request's pictures, in a worker thread
            reading.set()
            assert ended.wait(WAIT_S)
            return make(req, cancel)

        worker.prompts.make = slow_make
        answers: list[httpx.Response] = []
        post = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{server.url}/v1/chat/completions", json=chat_body("Hi", max_tokens=4), timeout=WAIT_S)))
        post.start()
        try:
            assert reading.wait(WAIT_S)
            worker.end_jobs()  # what the end of the grace period does (serve/main.py's end_requests)
        finally:
            ended.set()
            post.join(WAIT_S)
        if path == "/health":
            answers = [httpx.get(f"{server.url}/health", timeout=WAIT_S)]
    assert answers[0].status_code == 503, answers[0].text
    assert answers[0].json()["error"]["code"] == "shutting_down", answers[0].text


@pytest.mark.parametrize("headers", ["", "Connection: Upgrade\r\nUpgrade: h2c\r\n"])
def test_bytes_sent_ahead_of_a_running_answer_are_held_by_tcp_not_read_into_memory(server, monkeypatch, headers):
    """While a request was answered, every look for its client's disconnect (after each batch of
    its job's events, or POLL_S without one) resumed reading the connection: a client that kept
    sending (junk, or pipelined requests) had up to 256 KiB more read into h11's buffer at each,
    hundreds of MB behind one long answer. Past PIPELINED_BYTES the rest waits in TCP. A request
    that asks to upgrade (h2c) is also held: until its answer starts, h11 keeps it in
    MIGHT_SWITCH_PROTOCOL, not DONE, and the bound did not count it (13 MB read)."""
    import contextlib

    from starlette.requests import Request

    from internvl_chat.serve import connections

    monkeypatch.setattr(replies, "POLL_S", 0.01)  # look often while the job is held
    looks = []
    is_disconnected = Request.is_disconnected

    async def counted(self):
        looks.append(1)
        return await is_disconnected(self)

    monkeypatch.setattr(Request, "is_disconnected", counted)
    worker = server.worker
    hold, started, release = _hold_first_job()
    worker.on_start = hold
    sock = _post_raw(server.port, chat_body("Hi", max_tokens=4), headers)
    pusher = None
    try:
        assert started.wait(WAIT_S)
        port = sock.getsockname()[1]
        protocol = next(c for c in list(server.server.server_state.connections) if c.client[1] == port)

        def push() -> None:
            with contextlib.suppress(OSError):
                while not release.is_set():
                    sock.sendall(b"x" * (1 << 20))  # blocks while the kernel's buffers are full

        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        wait_until(lambda: protocol.conn.trailing_data[0], "the server read bytes sent ahead")
        seen = len(looks)
        wait_until(lambda: len(looks) >= seen + 50, "the handler looked for its client 50 times more")
        held = len(protocol.conn.trailing_data[0])
    finally:
        release.set()
        worker.on_start = None
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # ends a sendall the full buffers block
        sock.close()
        if pusher is not None:
            pusher.join(WAIT_S)
    assert worker.wait_idle(WAIT_S)
    assert held < connections.PIPELINED_BYTES + (256 << 10), held  # at most one read past the bound


def test_a_client_that_sent_bytes_ahead_and_left_stops_the_engine(server, monkeypatch):
    """Past PIPELINED_BYTES sent ahead the connection was not read until the answer was complete,
    so its end (the FIN behind those bytes) was not either: a non-streamed answer whose client had
    pipelined a request and closed the connection ran to its last token. A connection whose
    client has closed is read again (what is left is in the kernel's buffer: bounded)."""
    # the handler looks for its client often (each look resumed reading, up to the bound); the job's
    # events do not come while it is held
    monkeypatch.setattr(replies, "POLL_S", 0.01)
    worker = server.worker
    first, closed, seen = _answer_until_cancelled(worker)
    try:
        sock = _post_raw(server.port, chat_body("Write a long story.", max_tokens=400))
        assert first.wait(WAIT_S)
        port = sock.getsockname()[1]
        protocol = next(c for c in list(server.server.server_state.connections) if c.client[1] == port)
        sock.sendall(b"x" * (100 << 10))  # a pipelined request's first bytes, past the bound (and in the buffers)
        wait_until(lambda: len(protocol.conn.trailing_data[0]) >= connections.PIPELINED_BYTES, "bytes read ahead")
        sock.close()  # and the client goes away
        closed.set()
        assert worker.wait_idle(WAIT_S)
    finally:
        worker.on_event = None
    assert seen["cancelled"]
    record = next(r for r in worker.finished if r["job"] == seen["job"].number)
    assert record["finish_reason"] == "cancelled" and record["completion_tokens"] < 400
