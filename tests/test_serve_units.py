"""Pieces of `serve` without HTTP: stop strings, slot choice and image spans, data: URLs, the answer memory."""

from __future__ import annotations

import base64
import tracemalloc
from urllib.parse import quote

import pytest
import torch

from internvl_chat.chat.template import MediaSpec, PromptBuilder
from internvl_chat.engine.loader import load_model
from internvl_chat.serve.answers import AnswerMemory, PromptDigest, prompt_digest
from internvl_chat.chat.sampling import Sampler, SamplingParams
from internvl_chat.serve.conversation import Prompt, Span, sampling_params
from internvl_chat.serve.protocol import ChatCompletionRequest
from internvl_chat.serve.errors import APIError
from internvl_chat.serve.media import _b64, _data_url, _frame_texts
from internvl_chat.serve.namespaces import SHARED, cache_namespace
from internvl_chat.serve.slots import ScoredPrefix, SlotPool, with_alternatives
from internvl_chat.serve.stops import StopStrings


# ---- sampling settings -------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 5])
def test_top_p_zero_keeps_one_token_even_where_two_tie_at_the_top(top_k):
    """top_p 0 (OpenAI's, sent for determinism) is the most likely token alone. It was mapped to top_k 1,
    which keeps every token tied at the top (as transformers' top-k does): with two tied (bfloat16
    logits tie often) each seed sampled either one."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "top_p": 0, "temperature": 1.5,
            "top_k": top_k}  # fmt: skip
    params = sampling_params(ChatCompletionRequest.model_validate(body), SamplingParams(), prompt_len=4, context=64)
    logits = torch.tensor([0.0, 2.5, 2.5, 1.0])  # ids 1 and 2 tie
    picks = set()
    for seed in range(16):
        sampler = Sampler(SamplingParams(**{**vars(params), "seed": seed}), vocab_size=4, device="cpu")
        picks.add(sampler.read(sampler.next_token(logits)))
    assert picks == {1}  # the greedy pick: the first of the tied


# ---- stop strings ------------------------------------------------------------------------------


def feed(stops, pieces):
    matcher = StopStrings(stops)
    out = "".join(matcher.push(p) for p in pieces)
    return out + matcher.flush(), matcher.hit


def test_stop_string_split_across_deltas_is_cut_and_never_sent():
    assert feed(["END"], ["The answer is 4", "2.E", "N", "D and more"]) == ("The answer is 42.", True)


def test_text_that_only_looks_like_a_stop_string_start_is_released():
    assert feed(["END"], ["It is EN", "OUGH", ""]) == ("It is ENOUGH", False)
    assert feed(["END"], ["last E"]) == ("last E", False)  # flushed at the end of the answer


def test_earliest_of_several_stop_strings_wins():
    assert feed(["world", "lo"], ["hello world"]) == ("hel", True)


def test_no_stop_strings_passes_text_through():
    matcher = StopStrings([])
    assert matcher.push("abc") == "abc" and not matcher.hit


# ---- a text prompt's special tokens (serve/text_completions.py) ---------------------------------


def test_a_text_prompts_special_tokens_are_found_without_decoding_them_again(tiny_tokenizer, monkeypatch):
    # every text prompt decoded each special id to rebuild the same map and regex
    from internvl_chat.engine.tokenizer import load_tokenizer
    from internvl_chat.serve.text_completions import encode_prompt_text

    tokenizer = load_tokenizer(tiny_tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = "red<|im_end|>green"
    first = encode_prompt_text(tokenizer, text)
    assert im_end in tokenizer.special_ids and first == tokenizer.encode("red") + [im_end] + tokenizer.encode("green")
    decoded = []
    monkeypatch.setattr(tokenizer, "decode", lambda ids, *a, **kw: decoded.append(ids))
    assert encode_prompt_text(tokenizer, text) == first and decoded == []
    monkeypatch.undo()
    tokenizer.special_ids = frozenset()  # other special ids: the map is theirs
    assert encode_prompt_text(tokenizer, text) == tokenizer.encode(text)


# ---- the write deadline (serve/connections.py) ----------------------------------------------------


class _Timer:
    def __init__(self, callback):
        self.callback, self.cancelled, self.fired = callback, False, False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        self.fired = True
        self.callback()


class _Clock:
    """The loop's call_later, kept for the test to fire by hand (no time passes)."""

    def __init__(self):
        self.timers: list[_Timer] = []
        self.now = 0.0  # the loop's time, moved by the test

    def time(self) -> float:
        return self.now

    def call_later(self, delay, callback, *args):
        timer = _Timer(lambda: callback(*args))
        timer.write = getattr(callback, "__name__", "") == "_write_expired"
        self.timers.append(timer)
        return timer

    def write_deadlines(self) -> list[_Timer]:
        return [t for t in self.timers if t.write and not (t.cancelled or t.fired)]


class _Transport:
    def __init__(self):
        self.unsent, self.aborted, self.high = 0, False, None

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.high = high

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)


def test_the_write_deadline_drops_a_stalled_reader_not_a_slow_one():
    """Driven by hand: a client that takes some of what waits for it within each write_timeout
    keeps its connection; one that takes nothing for a whole write_timeout is dropped."""
    import uvicorn
    from uvicorn.server import ServerState

    from internvl_chat.serve.connections import ConnectionLimit, bounded_h11

    clock, transport = _Clock(), _Transport()
    protocol_class = bounded_h11(10.0, 10.0, ConnectionLimit(object(), 5), write_timeout=5.0)
    protocol = protocol_class(uvicorn.Config(app=object()), ServerState(), {}, _loop=clock)
    protocol.connection_made(transport)
    assert transport.high == 0  # paused as soon as the kernel refuses a byte
    transport.unsent = 1000
    protocol.pause_writing()
    [deadline] = clock.write_deadlines()
    transport.unsent = 600  # the client read some meanwhile
    deadline.fire()
    assert not transport.aborted
    [deadline] = clock.write_deadlines()  # a new one
    transport.unsent = 0
    protocol.resume_writing()  # all taken: no deadline
    assert deadline.cancelled and not clock.write_deadlines()
    transport.unsent = 500
    protocol.pause_writing()
    [deadline] = clock.write_deadlines()
    deadline.fire()  # nothing taken for a whole write_timeout
    assert transport.aborted


def test_the_write_deadline_drops_a_slow_reader_that_keeps_more_than_the_bound_waiting(monkeypatch):
    """Driven by hand: a client that takes a little of a large write (a non-streamed answer is
    written at once) within each write_timeout kept its connection for ever, and the whole answer
    in memory; past UNSENT_BYTES still waiting when a write_timeout ends, it is dropped. Under the
    bound, taking some is enough, as before."""
    import uvicorn
    from uvicorn.server import ServerState

    from internvl_chat.serve import connections
    from internvl_chat.serve.connections import ConnectionLimit, bounded_h11

    monkeypatch.setattr(connections, "UNSENT_BYTES", 1000)
    clock, transport = _Clock(), _Transport()
    protocol_class = bounded_h11(10.0, 10.0, ConnectionLimit(object(), 5), write_timeout=5.0)
    protocol = protocol_class(uvicorn.Config(app=object()), ServerState(), {}, _loop=clock)
    protocol.connection_made(transport)
    transport.unsent = 5000  # the whole answer, written at once
    protocol.pause_writing()
    [deadline] = clock.write_deadlines()
    transport.unsent = 4990  # it read a few bytes
    deadline.fire()
    assert transport.aborted, "a slow reader kept more than UNSENT_BYTES of its answer waiting"
    transport.unsent, transport.aborted = 900, False  # under the bound, a slow reader stays
    protocol.pause_writing()
    [deadline] = clock.write_deadlines()
    transport.unsent = 800
    deadline.fire()
    assert not transport.aborted


def test_at_the_end_of_the_grace_period_a_client_not_reading_its_answer_is_dropped():
    """Driven by hand: once the shutdown's grace period is over (ConnectionLimit.hurry_readers), a
    client that took nothing since its write deadline began is dropped at once, and one that takes a
    little now and then at its first deadline (SHUTDOWN_WRITE_S) past SHUTDOWN_READ_S: a handler still waiting
    to write was cancelled by uvicorn 5 s later, a CancelledError traceback in the log."""
    import uvicorn
    from uvicorn.server import ServerState

    from internvl_chat.serve.connections import SHUTDOWN_READ_S, SHUTDOWN_WRITE_S, ConnectionLimit, bounded_h11

    limit = ConnectionLimit(object(), 5)
    protocol_class = bounded_h11(10.0, 10.0, limit, write_timeout=60.0)
    stalled, trickling, idle = [(protocol_class(uvicorn.Config(app=object()), ServerState(), {}, _loop=_Clock()),
                                 _Transport()) for _ in range(3)]  # fmt: skip
    for protocol, transport in (stalled, trickling, idle):
        protocol.connection_made(transport)
    for protocol, transport in (stalled, trickling):
        transport.unsent = 1000
        protocol.pause_writing()
    trickling[1].unsent = 900  # it read some since its deadline began
    limit.hurry_readers()
    assert stalled[1].aborted and not trickling[1].aborted and not idle[1].aborted
    assert trickling[0].write_timeout == idle[0].write_timeout == SHUTDOWN_WRITE_S
    [deadline] = trickling[0].loop.write_deadlines()
    trickling[0].loop.now += SHUTDOWN_READ_S  # the time a reader has after the grace period is over
    trickling[1].unsent = 800  # a little more: under the deadline before the shutdown, enough to stay
    deadline.fire()
    assert trickling[1].aborted


def _a_reader_as_the_grace_period_ends(monkeypatch, written: int, unsent: int):
    """Driven by hand: a connection (write_timeout 60 s) paused on an answer of `written` bytes, of which
    its client has read all but `unsent`, as the shutdown's grace period ends (ConnectionLimit.hurry_readers).
    Returns its clock, its transport and the lines the log says from then on."""
    import uvicorn
    from uvicorn.server import ServerState

    from internvl_chat.serve import connections
    from internvl_chat.serve.connections import ConnectionLimit, bounded_h11

    clock, transport, limit = _Clock(), _Transport(), ConnectionLimit(object(), 5)
    protocol = bounded_h11(10.0, 10.0, limit, write_timeout=60.0)(uvicorn.Config(app=object()), ServerState(), {},
                                                                   _loop=clock)  # fmt: skip
    protocol.connection_made(transport)
    transport.unsent = written
    protocol.pause_writing()
    transport.unsent = unsent  # it reads
    said: list[str] = []
    monkeypatch.setattr(connections.log, "info", lambda message, *args: said.append(message % args))
    limit.hurry_readers()
    return clock, transport, said


def test_at_the_end_of_the_grace_period_a_client_reading_its_answer_steadily_has_time_to_finish(monkeypatch):
    """Driven by hand: a client taking its large answer at a steady pace (a non-streamed one is
    written whole) was dropped SHUTDOWN_WRITE_S after the grace period, whatever it took
    meanwhile, its answer's end seconds off and uvicorn's backstop further; and the log said it had
    "read none of its answer for 1 s (--write-timeout)". It keeps reading while it takes some in
    each deadline, for SHUTDOWN_READ_S, and is dropped at the first deadline past them."""
    from internvl_chat.serve.connections import SHUTDOWN_WRITE_S

    # a large answer, written whole, that it reads
    clock, transport, said = _a_reader_as_the_grace_period_ends(monkeypatch, written=20_000_000, unsent=14_000_000)
    clock.now += SHUTDOWN_WRITE_S
    transport.unsent = 11_000_000  # it reads on, 3 MB a second
    [deadline] = clock.write_deadlines()
    deadline.fire()
    assert not transport.aborted, said

    from internvl_chat.serve.connections import SHUTDOWN_READ_S  # (after: the check above is the bug's)

    while not transport.aborted:  # kept while it takes some, until SHUTDOWN_READ_S
        assert clock.now < SHUTDOWN_READ_S, said
        clock.now += SHUTDOWN_WRITE_S
        transport.unsent -= 1_000_000  # slower now: a trickle would keep it for ever
        [deadline] = clock.write_deadlines()
        deadline.fire()
    assert clock.now >= SHUTDOWN_READ_S
    assert len(said) == 1 and "read none" not in said[0] and "shutting down" in said[0], said
    from internvl_chat.serve.main import BACKSTOP_S

    # dropped before uvicorn's backstop cancels a handler still writing to it (a traceback in the log)
    assert SHUTDOWN_READ_S + SHUTDOWN_WRITE_S < BACKSTOP_S


def test_at_the_end_of_the_grace_period_a_fast_reader_of_an_answer_over_the_unsent_bound_has_time_too(monkeypatch):
    """A client taking a 100 MB answer at 20 MB/s had over UNSENT_BYTES (32 MiB) left at its first
    deadline after the grace period, SHUTDOWN_WRITE_S: dropped as a slow reader keeping the answer
    in memory ("over the 32 MiB bound (--write-timeout)"), the rest 2 s off. The process ends within
    seconds then: it has SHUTDOWN_READ_S as any reader."""
    from internvl_chat.serve.connections import SHUTDOWN_WRITE_S, UNSENT_BYTES

    clock, transport, said = _a_reader_as_the_grace_period_ends(monkeypatch, written=100_000_000, unsent=60_000_000)
    clock.now += SHUTDOWN_WRITE_S
    transport.unsent = 40_000_000  # 20 MB a second
    assert transport.unsent > UNSENT_BYTES
    [deadline] = clock.write_deadlines()
    deadline.fire()
    assert not transport.aborted, said


# ---- data: URLs --------------------------------------------------------------------------------


def _busy_worker(durations: list[float], waiting: int):
    """An EngineWorker's admission state alone (no model): a job running since the clock's 0, `waiting`
    queued (the queue's depth), the last jobs' `durations`."""
    import collections
    import threading
    from types import SimpleNamespace

    from internvl_chat.serve.engine import EngineWorker

    worker = object.__new__(EngineWorker)
    worker._cond, worker._stopping = threading.Condition(), False
    worker._thread = SimpleNamespace(is_alive=lambda: True)
    worker._queue = collections.deque(SimpleNamespace(cancel=threading.Event()) for _ in range(waiting))
    worker.options, worker.counts = SimpleNamespace(queue_depth=waiting), collections.Counter()
    worker._durations = collections.deque(durations, maxlen=64)
    worker._told = collections.deque(maxlen=64)
    worker.running, worker._running_since, worker.clock = object(), 0.0, lambda: 0.0
    return worker


def test_a_429_says_the_retry_after_it_sends():
    """The body said the estimate ("retry in about 2700 s") while Retry-After was cut to 600."""
    with pytest.raises(APIError) as refused:
        _busy_worker([300.0] * 10, waiting=8).check_capacity()
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "600"
    assert "retry in about 600 s" in refused.value.message
    with pytest.raises(APIError) as soon:
        _busy_worker([0.2] * 10, waiting=1).check_capacity()  # 0.4 s: said as the 1 s sent
    assert soon.value.headers["Retry-After"] == "1" and "retry in about 1 s" in soon.value.message


def test_clients_refused_together_are_told_moments_a_mean_job_apart():
    """Each refused client was told the same moment (in whole seconds): they came back together
    and were refused together. Each is told its own, a mean job after the last one still to come
    back, in `retry-after-ms` too; once a told moment has passed it no longer counts."""
    worker = _busy_worker([0.25] * 10, waiting=3)  # 0.25 s left of the running job, 3 × 0.25 s queued
    told = []
    for _ in range(3):
        with pytest.raises(APIError) as refused:
            worker.check_capacity()
        told.append((refused.value.headers["retry-after-ms"], refused.value.headers["Retry-After"]))
    assert told == [("1000", "1"), ("1250", "2"), ("1500", "2")]
    worker.clock = lambda: 1.1  # the first has come back (the running job counts as a mean one now)
    with pytest.raises(APIError) as refused:
        worker.check_capacity()
    assert refused.value.headers["retry-after-ms"] == "1500"  # 0.25 + 3 × 0.25 + 2 × 0.25 still to come
    # a client that retries at once, ignoring what it was told, lengthens the others' waits boundedly
    from internvl_chat.serve.engine import TOLD_MAX

    for _ in range(3 * TOLD_MAX):
        with pytest.raises(APIError) as refused:
            worker.check_capacity()
    assert refused.value.headers["retry-after-ms"] == str(1000 + 250 * TOLD_MAX)


def test_data_urls_must_be_base64():
    assert _data_url("data:image/png;base64,aGk=", "p", "image") == (b"hi", "image/png")
    for bad in ("data:image/png,hi", "data:image/png;base64", "data:image/png;base64,@@@"):
        with pytest.raises(APIError) as err:
            _data_url(bad, "p", "image")
        assert err.value.status == 400 and err.value.param == "p"


def test_jpeg_frame_lists_keep_their_frames_apart():
    data, mime = _data_url("data:video/jpeg;base64,aGk=,aG8=", "p", "video")
    assert mime == "video/jpeg" and data.split(b",") == [b"aGk=", b"aG8="]


def test_a_frame_lists_percent_encoded_commas_part_its_frames_as_url_parsers_read_them():
    # a URL parser percent-decodes a data: URL's payload before reading it: "%2C" is a comma, so
    # quote(F1 + "," + F2, safe="") is two frames; it was one, refused as "not valid base64". And
    # it decodes once: "%252B" is "%2B", not "+"
    for comma in ("%2C", "%2c"):
        data, mime = _data_url(f"data:video/jpeg;base64,aGk%3D{comma}aG8=", "p", "video")
        assert mime == "video/jpeg" and _frame_texts(data) == [b"aGk=", b"aG8="]
    data, _ = _data_url("data:video/jpeg;base64,aGk%252B,aG8=", "p", "video")
    assert _frame_texts(data) == [b"aGk%2B", b"aG8="]
    assert _b64(_frame_texts(data)[1], "p", "video frame 2", percent=False) == b"ho"
    with pytest.raises(APIError) as err:
        _b64(_frame_texts(data)[0], "p", "video frame 1", percent=False)
    assert err.value.status == 400 and "video frame 1 data is not valid base64" in str(err.value)


def test_an_image_typed_as_a_video_frame_is_read_as_the_image_it_is():
    # an image's declared type is not trusted (the bytes are probed), but video/jpeg kept the base64
    # text undecoded, as a frame list, and the image was refused as "not an image format"
    assert _data_url("data:video/jpeg;base64,aGk=", "p", "image") == (b"hi", "video/jpeg")


# ---- answer memory -----------------------------------------------------------------------------


AFTER = prompt_digest([1, 2, 3], [])  # the prompt the answers followed


def test_answer_memory_returns_our_ids_and_forgets_the_oldest():
    memory = AnswerMemory(capacity=2)
    memory.remember("one", [1], AFTER)
    memory.remember("two", [2, 2], AFTER)
    assert memory.lookup("one") == [1]  # now the most recent
    memory.remember("three", [3], AFTER)
    assert memory.lookup("two") is None and memory.lookup("one") == [1] and memory.lookup("three") == [3]



def test_answer_memory_is_bounded_in_tokens_too():
    """1,024 answers of 8,192 tokens held 320 MiB that no setting accounted for."""
    memory = AnswerMemory(capacity=100, max_tokens=10)
    memory.remember("a", [1] * 4, AFTER)
    memory.remember("b", [2] * 4, AFTER)
    memory.remember("c", [3] * 4, AFTER)  # 12 tokens: the oldest goes
    assert memory.lookup("a") is None and memory.lookup("b") == [2] * 4 and memory.lookup("c") == [3] * 4
    assert memory.tokens == 8
    memory.remember("b", [7] * 2, AFTER)  # a text said again replaces its ids
    assert memory.lookup("b") == [7] * 2 and memory.tokens == 6
    memory.remember("huge", [5] * 11, AFTER)  # over the whole budget: not kept, and nothing evicted for it
    assert memory.lookup("huge") is None and len(memory) == 2 and memory.tokens == 6
    memory.remember("ids", [0, 151_642, 2**31 - 1], AFTER)
    assert memory.lookup("ids") == [0, 151_642, 2**31 - 1]


def test_answer_memory_gives_ids_back_only_after_the_prompt_they_answered(builder):
    memory = AnswerMemory()
    cat, dog = image_prompt(builder, "What is it?", "cat"), image_prompt(builder, "What is it?", "dog")
    memory.remember("A cat.", [32, 8251, 13], prompt_digest(cat.ids, cat.spans))
    assert memory.lookup("A cat.", prompt_digest(cat.ids, cat.spans)) == [32, 8251, 13]
    assert memory.lookup("A cat.", prompt_digest(cat.ids[:-1], [])) is None  # another conversation with the same text
    assert memory.lookup("A cat.", prompt_digest(dog.ids, dog.spans)) is None  # the same ids, another picture
    grown = PromptDigest()
    assert grown.of(cat.ids[:3], []) == prompt_digest(cat.ids[:3], [])
    assert grown.of(cat.ids, cat.spans) == prompt_digest(cat.ids, cat.spans)


def test_answer_memory_gives_ids_back_only_in_the_cache_namespace_they_were_made_in(builder):
    memory = AnswerMemory()
    ids = builder.first_turn("What is my PIN?")
    alice, bob = cache_namespace("alice"), cache_namespace("bob")
    memory.remember("1234.", [16, 17, 18, 19, 13], prompt_digest(ids, [], alice))
    assert memory.lookup("1234.", prompt_digest(ids, [], alice)) == [16, 17, 18, 19, 13]
    assert memory.lookup("1234.", prompt_digest(ids, [], bob)) is None  # the same conversation, another salt
    assert memory.lookup("1234.", prompt_digest(ids, [])) is None  # nor unsalted
    assert PromptDigest(alice).of(ids, []) == prompt_digest(ids, [], alice)
    private = [cache_namespace("alice", shared_cache=False) for _ in range(2)]
    assert private[0] != private[1] and SHARED not in private  # --no-shared-cache: each request its own


def test_conversations_that_said_the_same_text_each_get_their_own_ids_back(builder):
    # two clients' replies often coincide ("Hello! How can I help?"): the later one must not cost the
    # earlier conversation its exact ids (re-tokenized, its prompt would differ from what was generated)
    memory = AnswerMemory()
    cat, dog = image_prompt(builder, "What is it?", "cat"), image_prompt(builder, "What is it?", "dog")
    memory.remember("An animal.", [1, 2], prompt_digest(cat.ids, cat.spans))
    memory.remember("An animal.", [3], prompt_digest(dog.ids, dog.spans))
    assert memory.lookup("An animal.", prompt_digest(cat.ids, cat.spans)) == [1, 2]
    assert memory.lookup("An animal.", prompt_digest(dog.ids, dog.spans)) == [3]
    assert memory.lookup("An animal.") == [3] and len(memory) == 2 and memory.tokens == 3  # to inspect: the latest


# ---- slots ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builder(loaded):
    return PromptBuilder(loaded.tokenizer, None, loaded.config.tokens_per_tile)


def image_prompt(builder, text: str, key: str) -> Prompt:
    ids = builder.first_turn(text, [MediaSpec("image", 1)])
    start, end = ids.index(builder.img_start_id), ids.index(builder.img_end_id) + 1
    return Prompt(ids, [Span(start, end, key, 0, 0, 1)])


def hold(slot, prompt: Prompt) -> None:
    """Make the slot's cache hold exactly this prompt (what a served request leaves behind)."""
    slot.session.ids, slot.session.start_pos, slot.spans = list(prompt.ids), len(prompt.ids), list(prompt.spans)


def test_the_slot_with_the_longest_prefix_is_chosen_and_images_are_compared_by_content(loaded, builder):
    pool = SlotPool(loaded, 2)
    cat, dog = image_prompt(builder, "What is it?", "cat"), image_prompt(builder, "What is it?", "dog")
    hold(pool.slots[1], cat)
    slot, reuse = pool.choose(cat)
    assert slot is pool.slots[1] and reuse == len(cat.ids) - 1  # one token is always left to prefill
    assert cat.ids == dog.ids  # the same token ids …
    assert pool.slots[1].reusable(dog) == dog.spans[0].start  # … but another picture: stop before its image


def test_a_prompt_without_pictures_never_keeps_a_cached_picture(loaded, builder):
    """/v1/completions takes token ids: the ids of a chat prompt with an image, sent as a plain
    prompt, must not reuse the KV of another request's picture (nor see it)."""
    pool = SlotPool(loaded, 1)
    cat = image_prompt(builder, "What is it?", "cat")
    hold(pool.slots[0], cat)
    plain = Prompt(list(cat.ids))  # the same ids, its <IMG_CONTEXT> tokens plain text
    assert pool.slots[0].reusable(plain) == cat.spans[0].start


def test_a_slot_keeps_nothing_for_a_prompt_of_another_cache_namespace(loaded, builder):
    pool = SlotPool(loaded, 2)
    chat = Prompt(builder.first_turn("My bank PIN is 1234."), namespace=cache_namespace("alice"))
    hold(pool.slots[0], chat)
    pool.slots[0].namespace = chat.namespace
    pool.slots[0].scores = kept_scores(chat.ids, 1)
    assert pool.slots[0].reusable(chat) == len(chat.ids) - 1
    assert pool.slots[0].scored_reuse(chat, 1) == len(chat.ids) - 1
    for other in (cache_namespace("mallory"), SHARED):
        guess = Prompt(list(chat.ids), namespace=other)
        assert pool.slots[0].reusable(guess) == pool.slots[0].scored_reuse(guess, 1) == 0
        assert pool.choose(guess) == (pool.slots[1], 0)  # the empty slot: nothing of alice's is kept
    # once the slot is chosen for another namespace's prompt, alice's cache is forgotten before anything
    # can fail: a prefill that never began leaves nothing of hers that the other namespace could keep
    pool.slots[0].claim(cache_namespace("mallory"))
    assert pool.slots[0].reusable(Prompt(list(chat.ids), namespace=cache_namespace("mallory"))) == 0
    assert pool.slots[0].reusable(chat) == 0 and pool.slots[0].scores is None


def test_a_new_conversation_does_not_evict_a_long_one_for_a_short_shared_prefix(loaded, builder):
    pool = SlotPool(loaded, 2)
    long_chat = Prompt(builder.first_turn("A long conversation about boats. " * 40))
    hold(pool.slots[0], long_chat)
    pool.slots[0].last_used = 5  # recently used; slot 1 is empty
    other = Prompt(builder.first_turn("Something else."))
    assert 0 < pool.slots[0].reusable(other) < 0.5 * pool.slots[0].cached  # shares only the template's opening
    slot, _ = pool.choose(other)
    assert slot is pool.slots[1]


def kept_scores(ids: list[int], k: int) -> ScoredPrefix:
    """Made-up PromptScores rows for `ids` (row j - 1: token j's value, k values, k ids)."""
    rows = torch.tensor([[-j, *[-j - a for a in range(k)], *[j + a for a in range(k)]] for j in range(1, len(ids))],
                        dtype=torch.float64)  # fmt: skip
    return ScoredPrefix(k, list(ids), rows)


def test_a_scored_prompt_keeps_the_cached_tokens_whose_scores_are_kept_and_the_one_after_them(loaded, builder):
    pool = SlotPool(loaded, 1)
    [slot] = pool.slots
    held = Prompt(builder.first_turn("A question about boats and the sea. " * 4))
    hold(slot, held)
    assert slot.scored_reuse(held, 1) == 0  # cached, but not scored
    slot.scores = kept_scores(held.ids, 2)
    assert slot.scored_reuse(held, 2) == len(held.ids) - 1  # the last token alone is prefilled again
    assert slot.scored_reuse(held, 3) == 0  # more alternatives than were kept: scored again from the start
    other = Prompt(held.ids[:20] + held.ids[30:])
    assert slot.reusable(other) == 20 and slot.scored_reuse(other, 1) == 19  # token 20's kept score is another token's
    slot.keep_scores(10)  # a write from position 10: the scores of tokens 1…10 stay
    assert len(slot.scores.rows) == 10 and slot.scores.ids == held.ids[:11]
    assert slot.scored_reuse(held, 1) == 10
    slot.keep_scores(0)
    assert slot.scores is None and slot.scored_reuse(held, 1) == 0


def test_a_scored_prompt_chooses_the_slot_by_the_scores_it_kept_in_the_prompts_namespace_only(loaded, builder):
    pool = SlotPool(loaded, 2)
    held = Prompt(builder.first_turn("A question about boats and the sea. " * 4))
    for slot in pool.slots:
        hold(slot, held)
    pool.slots[1].scores, pool.slots[1].last_used = kept_scores(held.ids, 1), 1  # slot 0: cached, no scores
    plain, scored = Prompt(list(held.ids)), Prompt(list(held.ids), scored_k=1)
    assert pool.choose(plain) == (pool.slots[0], len(held.ids) - 1)  # a tie: the least recently used
    assert pool.choose(scored) == (pool.slots[1], len(held.ids) - 1)
    assert pool.choose(Prompt(list(held.ids), scored_k=2)) == (pool.slots[0], 0)  # too few alternatives kept anywhere
    salted = Prompt(list(held.ids), namespace=cache_namespace("alice"), scored_k=1)
    assert pool.choose(salted) == (pool.slots[0], 0)  # another namespace keeps nothing: the least recently used


def test_kept_scores_never_cover_a_picture_a_token_id_prompt_does_not_hold(loaded, builder):
    pool = SlotPool(loaded, 1)
    [slot] = pool.slots
    cat = image_prompt(builder, "What is it?", "cat")
    hold(slot, cat)
    slot.scores = kept_scores(cat.ids, 1)
    assert slot.scored_reuse(Prompt(list(cat.ids)), 1) == cat.spans[0].start  # up to the picture, never past it


def test_kept_scores_are_cut_to_the_most_likely_alternatives_asked_for():
    rows = kept_scores([5, 6, 7], 3).rows
    assert with_alternatives(rows, 3, 1).tolist() == [[-1, -1, 1], [-2, -2, 2]]
    assert with_alternatives(rows, 3, 0).tolist() == [[-1], [-2]]
    assert with_alternatives(rows, 3, 3) is rows


def test_each_slot_has_its_own_kv_cache(loaded):
    pool = SlotPool(loaded, 3)
    lm = loaded.model.language_model
    assert pool.slots[0].session._kv.k[0] is lm.k_cache[0]  # slot 0 adopts the model's own cache
    pointers = {slot.session._kv.k[0].data_ptr() for slot in pool.slots}
    assert len(pointers) == 3
    pool.slots[2].session.activate_kv_cache()
    assert lm.k_cache[0].data_ptr() == pool.slots[2].session._kv.k[0].data_ptr()
    pool.slots[0].session.activate_kv_cache()
    assert pool.kv_bytes == 3 * lm.cache_bytes()


# ---- the listening socket ----------------------------------------------------------------------


def test_accepted_connections_have_nagle_off():
    """Headers and body are separate writes: with Nagle on, the body waited 40 ms for a delayed ACK."""
    import asyncio
    import socket

    from internvl_chat.serve.main import listen_socket

    async def accept_one() -> int:
        listener = listen_socket("127.0.0.1", 0)
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname())
        try:
            return await asyncio.wait_for(seen, 60)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accept_one()) != 0


def test_the_printed_address_accepts_connections_before_the_server_loop_runs():
    """`serve` prints its address before uvicorn starts: a client that connects at once must wait
    in the listen backlog, not be refused (a bound socket that is not listening refuses)."""
    import socket

    from internvl_chat.serve.main import listen_socket

    listener = listen_socket("127.0.0.1", 0)
    try:
        socket.create_connection(listener.getsockname()[:2], timeout=60).close()
    finally:
        listener.close()


def test_an_address_in_use_is_one_clear_line():
    from internvl_chat.errors import UsageError
    from internvl_chat.serve.main import listen_socket

    taken = listen_socket("127.0.0.1", 0)
    try:
        with pytest.raises(UsageError, match="choose another --port"):
            listen_socket("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_a_port_bound_by_a_server_still_loading_is_refused_to_a_second_at_once():
    """`serve` binds before the model loads, but with SO_REUSEADDR on, which Linux lets a second
    SO_REUSEADDR socket share while neither listens: a second server started while the first
    still loaded bound the same port, loaded too, and the later of the two to finish failed then
    (the first, if its model was the larger). The port is held alone until it listens."""
    import socket

    from internvl_chat.errors import UsageError
    from internvl_chat.serve.main import bind_socket, start_listening

    loading = bind_socket("127.0.0.1", 0)
    port = loading.getsockname()[1]
    try:
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port} .*choose another --port"):
            bind_socket("127.0.0.1", port)
        other = socket.socket()  # another program's, with SO_REUSEADDR (as uvicorn's or nginx's)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError), other:
            other.bind(("127.0.0.1", port))
        start_listening(loading, "127.0.0.1", port)
        # listening with SO_REUSEADDR: the connections it leaves in TIME_WAIT do not keep the next
        # start off the port
        assert loading.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
    finally:
        loading.close()


def test_a_port_whose_last_connections_are_in_time_wait_can_be_bound_again():
    """A restart finds the previous run's closed connections in TIME_WAIT (a minute on Linux):
    binding the port alone fails then, so it is bound as SO_REUSEADDR allows."""
    import socket

    from internvl_chat.serve.main import bind_socket, start_listening

    listener = start_listening(bind_socket("127.0.0.1", 0), "127.0.0.1", 0)
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=60)
    accepted, _ = listener.accept()
    accepted.close()  # the server's side closes first: it is the one left in TIME_WAIT
    assert client.recv(1) == b""
    client.close()
    listener.close()
    bind_socket("127.0.0.1", port).close()


def test_prerendered_text_events_equal_fully_rendered_ones():
    from internvl_chat.serve import sse
    from internvl_chat.serve.protocol import chunk

    template = chunk("chatcmpl-1", "m", 7, {"content": ""}, include_usage=True)
    render = sse.TextEvents(template, ("choices", 0, "delta", "content"))
    for text in ("", "plain", 'quo"te\\', "new\nline", "ünï 中文 \u2028", "\x00\x1b[31m"):
        expected = chunk("chatcmpl-1", "m", 7, {"content": text}, include_usage=True)
        assert render(text) == sse.event(expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_slots_with_cuda_graphs_decode_into_their_own_caches(tiny_original):
    """CUDA graphs capture the cache's addresses: each slot needs its own, or slots overwrite each other."""
    from internvl_chat.chat.sampling import SamplingParams
    from internvl_chat.chat.session import Session

    cuda = load_model(tiny_original, device="cuda", dtype="float32", max_context=1024)
    assert cuda.model.decode_graphs is not None
    params = SamplingParams(max_new_tokens=12)
    questions = {"a": ["Tell me about boats.", "More."], "b": ["Explain glaciers to me.", "And?"]}

    def answers(session, texts):
        return [[e for e in session.ask(t, params=params)][-1]["token_ids"] for t in texts]

    alone = {name: answers(Session(cuda), texts) for name, texts in questions.items()}
    slots = {name: Session(cuda) for name in questions}
    for session in slots.values():
        session.own_kv_cache()
    interleaved = {name: [] for name in questions}
    for turn in range(2):
        for name, session in slots.items():
            session.activate_kv_cache()
            interleaved[name] += answers(session, [questions[name][turn]])
    assert interleaved == alone


def test_data_url_base64_may_be_wrapped_or_unpadded_and_other_mistakes_say_what_to_do():
    # MIME encoders and `base64` wrap at 76 columns, and some leave the padding off: the bytes are
    # unambiguous, so they are read (were 400 "not valid base64")
    data = bytes(range(256)) * 3
    text = base64.b64encode(data).decode()
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + "\r\n"
    for payload in (wrapped, text.rstrip("="), " " + text + " "):
        assert _data_url("data:image/png;base64," + payload, "p", "image") == (data, "image/png")
    for payload, words in (("", "is empty"), (base64.urlsafe_b64encode(b"\xfb\xff").decode(), "URL-safe"),
                           ("a", "send the file's bytes base64-encoded"), ("aGk=ü", "not base64")):  # fmt: skip
        with pytest.raises(APIError) as err:
            _data_url("data:image/png;base64," + payload, "p", "image")
        assert err.value.status == 400 and words in str(err.value), (payload, str(err.value))



def test_a_percent_encoded_data_url_is_read_as_the_url_it_is():
    # a data: URL is a URL: browsers and urllib read "%2B" as "+"; it was 400 "send the file's bytes
    # base64-encoded", which they were
    data = bytes(range(256)) * 3
    text = base64.b64encode(data + b"x").decode()  # with its "=" padding
    encoded = text.replace("+", "%2B").replace("/", "%2f").replace("=", "%3D")
    assert "+" in text and "/" in text and "=" in text
    assert _data_url("data:image/png;base64," + encoded, "p", "image") == (data + b"x", "image/png")
    with pytest.raises(APIError) as err:
        _data_url("data:image/png;base64,aGk%zz", "p", "image")
    assert err.value.status == 400 and "not valid base64" in str(err.value)


def test_percent_encoded_line_breaks_are_left_out_as_plain_ones_are():
    # quote(base64.encodebytes(...)) wraps with "%0A": the line breaks were kept after the decoding
    # and refused as "not valid base64" (WHATWG's data: URL processor strips them after it)
    data = bytes(range(256)) * 3
    wrapped = base64.encodebytes(data).decode()
    encoded = quote(wrapped, safe="").replace("%2B", "%2b")
    assert "%0A" in encoded and "\n" not in encoded
    assert _data_url("data:image/png;base64," + encoded, "p", "image") == (data, "image/png")
    assert _data_url("data:image/png;base64,%20" + encoded + "%0D%0A", "p", "image") == (data, "image/png")


def test_percent_decoding_a_large_data_url_costs_memory_in_proportion_to_it():
    # urllib's unquote_to_bytes splits at every "%": 64 MiB of escapes took 4.7 GB and half a minute
    data = bytes(range(256)) * 1536
    encoded = "".join(f"%{b:02X}" for b in base64.b64encode(data))  # every character escaped: 1.5 MiB
    tracemalloc.start()
    try:
        assert _data_url("data:image/png;base64," + encoded, "p", "image") == (data, "image/png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * len(encoded), (peak, len(encoded))


def test_a_frame_list_of_more_frames_than_allowed_is_refused_before_it_is_split(tmp_path):
    # the frames were counted by splitting the list: 6 MB of "ab," made two million bytes objects
    # (60 MB took 870 MB and seconds) before the count was found over max_frames
    from types import SimpleNamespace

    from internvl_chat.serve.media import MediaReader
    from internvl_chat.serve.options import ServeOptions

    reader = MediaReader(ServeOptions(max_frames=32), SimpleNamespace(image_size=448, use_thumbnail=True))
    data = b"ab," * (2 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(APIError) as err:
            reader._measure_frames(data, "p")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        reader.close()
    assert err.value.status == 400 and "the video has 2,097,153 frames, over this server's limit of 32" in str(err.value)
    assert peak < len(data), (peak, len(data))


# ---- vLLM's answer controls: refused unless neutral, never silently ignored ---------------------

VLLM_CONTROLS = [
    ("guided_json", {"type": "object"}), ("guided_regex", "[ab]+"), ("guided_choice", ["yes", "no"]),
    ("guided_grammar", 'root ::= "a"'), ("structured_outputs", {"choice": ["yes", "no"]}),
    ("include_stop_str_in_output", True), ("prompt_logprobs", 0), ("allowed_token_ids", [1, 2]),
    ("bad_words", ["red"]), ("logits_processors", ["pkg.Processor"]), ("truncate_prompt_tokens", 8),
    ("skip_special_tokens", False), ("return_tokens_as_token_ids", True),
    ("stream_options", {"include_usage": True, "continuous_usage_stats": True}),
    ("response_format", {"type": "json_object"}),  # /v1/completions ignored it (vLLM's takes it there too)
]  # fmt: skip
# the same constraints as SGLang and llama.cpp's servers name them (README names both as peers): each
# was an unknown field, ignored, and the answer came back free-form
PEER_GUIDED_CONTROLS = [("regex", "[ab]+"), ("ebnf", 'root ::= "a"'), ("json_schema", {"type": "object"}),
                        ("grammar", 'root ::= "a"')]  # fmt: skip
CHAT_TEMPLATE_CONTROLS = [("chat_template", "{{ messages }}"), ("continue_final_message", True),
                          ("add_generation_prompt", False)]  # fmt: skip


def chat_body(**fields) -> bytes:
    import json

    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **fields}).encode()


def completion_body(**fields) -> bytes:
    import json

    return json.dumps({"model": "tiny", "prompt": "Hi", **fields}).encode()


@pytest.mark.parametrize("field, value", VLLM_CONTROLS + PEER_GUIDED_CONTROLS + CHAT_TEMPLATE_CONTROLS)
def test_a_chat_request_with_an_answer_control_it_cannot_honour_is_a_400_naming_it(field, value):
    # each was accepted and ignored: a guided answer came back free-form, a banned word in it
    from internvl_chat.serve.protocol import parse_request

    with pytest.raises(APIError) as err:
        parse_request(chat_body(**{field: value}))
    assert err.value.status == 400 and err.value.param.partition(".")[0] == field
    assert "\n" not in err.value.message and ("leave" in err.value.message or "send" in err.value.message)


@pytest.mark.parametrize("field, value", VLLM_CONTROLS + PEER_GUIDED_CONTROLS)
def test_a_completion_request_with_an_answer_control_it_cannot_honour_is_a_400_naming_it(field, value):
    from internvl_chat.serve.text_completions import parse_completion_request

    with pytest.raises(APIError) as err:
        parse_completion_request(completion_body(**{field: value}))
    assert err.value.status == 400 and err.value.param.partition(".")[0] == field


@pytest.mark.parametrize("field, value", CHAT_TEMPLATE_CONTROLS + [("add_generation_prompt", 0),
                                                  ("add_generation_prompt", None)])  # fmt: skip
def test_a_template_control_sent_in_chat_template_kwargs_is_a_400_naming_it(field, value):
    """vLLM passes chat_template_kwargs to the template over its own fields (and the template here
    reads add_generation_prompt as a condition): {"add_generation_prompt": false} there asked for a
    prompt without the assistant's cue, and was ignored, as the field alone is refused."""
    from internvl_chat.serve.protocol import parse_request

    with pytest.raises(APIError) as err:
        parse_request(chat_body(chat_template_kwargs={field: value}))
    assert err.value.status == 400 and err.value.param == f"chat_template_kwargs.{field}"
    assert err.value.message.startswith(f"chat_template_kwargs.{field}")
    # as the template reads them, the neutral values change nothing
    parse_request(chat_body(chat_template_kwargs={"chat_template": None, "continue_final_message": False,
                                                  "add_generation_prompt": True, "enable_thinking": True}))  # fmt: skip


def test_neutral_values_of_vllms_answer_controls_are_accepted():
    from internvl_chat.serve.protocol import parse_request
    from internvl_chat.serve.text_completions import parse_completion_request

    neutral = {"guided_json": None, "guided_regex": "", "guided_choice": [], "structured_outputs": {},
               "include_stop_str_in_output": False, "prompt_logprobs": None,
               "allowed_token_ids": [], "bad_words": [], "logits_processors": [], "truncate_prompt_tokens": None,
               "skip_special_tokens": True, "return_tokens_as_token_ids": False,
               "regex": "", "ebnf": None, "json_schema": {}, "grammar": "",
               "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": False}}  # fmt: skip
    parse_completion_request(completion_body(**neutral, response_format={"type": "text"}, prompt_embeds=None))
    parse_request(chat_body(**neutral, chat_template=None, continue_final_message=False, add_generation_prompt=True,
                            chat_template_kwargs={"enable_thinking": False}))  # fmt: skip


def parse_for(endpoint: str):
    from internvl_chat.serve.protocol import parse_request
    from internvl_chat.serve.text_completions import parse_completion_request

    return (parse_request, chat_body) if endpoint == "chat" else (parse_completion_request, completion_body)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("stream", ["missing", False, None])
@pytest.mark.parametrize("options, named", [
    ({"include_usage": True}, "stream_options.include_usage is set"),
    ({"include_usage": False, "continuous_usage_stats": None}, "stream_options.include_usage is set"),
    ({"include_usage": False, "continuous_usage_stats": False},
     "stream_options.include_usage and stream_options.continuous_usage_stats are set"),
])  # fmt: skip
def test_stream_options_without_a_stream_are_a_400_naming_them(endpoint, stream, options, named):
    # they were accepted and meant nothing (an answer sent whole has no usage chunk); OpenAI and vLLM refuse them
    parse, body = parse_for(endpoint)
    fields = {"stream_options": options} | ({} if stream == "missing" else {"stream": stream})
    with pytest.raises(APIError) as err:
        parse(body(**fields))
    assert err.value.status == 400 and err.value.param == "stream_options"
    assert err.value.message.startswith(named + " but stream is not true") and "send stream: true" in err.value.message


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("fields", [
    {"stream": False, "stream_options": None}, {"stream": False, "stream_options": {}},
    {"stream": None, "stream_options": {"include_usage": None}},  # a client that sends every argument
    {"stream_options": {"include_usage": None, "continuous_usage_stats": None}},
    {"stream": True, "stream_options": {"include_usage": True}}, {"stream": True, "stream_options": {"include_usage": False}},
])  # fmt: skip
def test_stream_options_that_ask_for_nothing_or_come_with_a_stream_are_accepted(endpoint, fields):
    parse, body = parse_for(endpoint)
    req = parse(body(**fields))
    assert req.stream is bool(fields.get("stream"))


def test_an_empty_prompt_list_is_told_to_send_a_prompt():
    # it was told "prompt must be a string, a list of strings, …": a list, as it had sent
    from internvl_chat.serve.text_completions import prompt_items

    with pytest.raises(APIError) as err:
        prompt_items([])
    assert err.value.param == "prompt" and "prompt is an empty list; send at least one prompt" in str(err.value)


@pytest.mark.parametrize("body, kind", [(b"null", "null"), (b"[]", "array"), (b'"Hi"', "string"), (b"1", "number")])
def test_a_body_that_is_no_json_object_is_told_to_send_one(body, kind):
    # pydantic's words were "request: Input should be an object"
    from internvl_chat.serve.protocol import parse_body, parse_request
    from internvl_chat.serve.text_completions import parse_completion_request
    from internvl_chat.serve.tokenizer_api import DetokenizeRequest

    for parse in (parse_request, parse_completion_request, lambda b: parse_body(b, DetokenizeRequest)):
        with pytest.raises(APIError) as err:
            parse(body)
        said = str(err.value)
        assert err.value.status == 400 and f"is a JSON {kind}, not an object" in said and "one JSON object" in said


def test_an_empty_body_is_told_what_its_endpoint_takes():
    # every endpoint said "send the chat request as a JSON object (model, messages)": /v1/completions
    # takes a prompt, /tokenize a prompt or messages, /detokenize tokens
    from internvl_chat.serve.protocol import parse_body, parse_request
    from internvl_chat.serve.text_completions import parse_completion_request
    from internvl_chat.serve.tokenizer_api import DetokenizeRequest, TokenizeRequest

    cases = [(parse_request, "the chat request as a JSON object (model, messages)"),
             (parse_completion_request, "the completion request as a JSON object (model, prompt)"),
             (lambda b: parse_body(b, TokenizeRequest), "a JSON object with prompt (a text) or messages (a conversation)"),
             (lambda b: parse_body(b, DetokenizeRequest), "a JSON object with tokens (a list of token ids)")]  # fmt: skip
    for parse, fields in cases:
        for body in (b"", b" \r\n"):
            with pytest.raises(APIError) as err:
                parse(body)
            assert str(err.value) == f"the request body is empty; send {fields}", body


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("model", ["missing", None])
def test_a_request_without_a_model_is_told_to_send_the_served_id(endpoint, model):
    # pydantic's words were "model: Field required" and "model: Input should be a valid string"
    import json

    from internvl_chat.serve.protocol import parse_request
    from internvl_chat.serve.text_completions import parse_completion_request

    body = json.loads(chat_body() if endpoint == "chat" else completion_body())
    if model == "missing":
        del body["model"]
    else:
        body["model"] = model
    parse = parse_request if endpoint == "chat" else parse_completion_request
    with pytest.raises(APIError) as err:
        parse(json.dumps(body).encode())
    assert err.value.param == "model"
    assert err.value.message == "model is required: send the served model's id (GET /v1/models lists it)"


@pytest.mark.parametrize("messages", ["missing", None])
def test_a_chat_request_without_messages_is_shown_their_shape(messages):
    import json

    from internvl_chat.serve.protocol import parse_request

    body = json.loads(chat_body())
    if messages == "missing":
        del body["messages"]
    else:
        body["messages"] = messages
    with pytest.raises(APIError) as err:
        parse_request(json.dumps(body).encode())
    assert err.value.param == "messages" and err.value.message.startswith("messages is required: send the conversation")


def test_a_completion_request_with_prompt_embeddings_is_told_to_send_text_or_ids():
    # vLLM's prompt_embeds was ignored and the `prompt` beside it answered
    from internvl_chat.serve.text_completions import parse_completion_request

    with pytest.raises(APIError) as err:
        parse_completion_request(completion_body(prompt_embeds="AAAA"))
    assert err.value.param == "prompt_embeds" and "send the prompt as text or token ids" in err.value.message


@pytest.mark.parametrize("field", ["max_tokens", "temperature", "n"])
def test_a_boolean_for_a_number_is_refused_in_our_words_alone(field):
    # pydantic put "Value error, " before them: "max_tokens: Value error, must be a number, not true or false"
    from internvl_chat.serve.protocol import parse_request

    with pytest.raises(APIError) as err:
        parse_request(chat_body(**{field: True}))
    assert err.value.message == f"{field}: must be a number, not true or false"


def test_unread_tells_waiting_bytes_and_is_false_once_the_transport_is_closed():
    """`_unread` (FIONREAD) is True while the client's bytes wait in the socket, and False, not an
    exception, once the connection is closed: a closed socket's fileno() is -1, for which ioctl
    raises ValueError, not the OSError it caught."""
    import asyncio
    import socket as sockets
    import time

    from internvl_chat.serve.connections import _unread

    async def run() -> list[bool]:
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_connect(reader, writer) -> None:
            accepted.set_result(writer.transport)

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        client = sockets.create_connection(server.sockets[0].getsockname()[:2])
        try:
            transport = await accepted
            transport.pause_reading()  # the bytes stay in the kernel, unread
            seen = [_unread(transport)]
            client.sendall(b"GET / HTTP/1.1\r\n")
            deadline = time.monotonic() + 10
            while not _unread(transport) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            seen.append(_unread(transport))
            transport.abort()
            for _ in range(100):  # its socket is closed on a later turn of the loop
                if transport.get_extra_info("socket").fileno() == -1:
                    break
                await asyncio.sleep(0)
            seen.append(_unread(transport))
            return seen
        finally:
            client.close()
            server.close()

    assert asyncio.run(run()) == [False, True, False]
