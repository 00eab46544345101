"""The engine thread: one model, one request at a time, a bounded queue in front of it.

Request handlers (asyncio) submit Jobs; the thread picks a KV slot, gets the image features the
uncached part needs (feature LRU, else decode + vision encoder), runs the slot Session's
`continue_with` and sends text deltas back to the handler's event loop. A job whose client went
away has its `cancel` event set: generation stops at the next token, a job that has not started
is skipped (and gives up its place in the queue), a video being decoded for it stops at the next
frame, and a job whose client left while its pictures were encoded gets no prefill. Stop strings
end their choice's generation at the next token too (ChoiceHalt) and cut the text where they begin.

A job's first event is "started", sent once every one of its prompts has passed the Session's
checks (each fits the context with its answer) and its first prompt's pictures are decoded (or
found in the feature cache), right before prefill: a stream's handler sends its status line only
then (serve/replies.py), so what fails before it (a picture that does not decode, a later prompt
that cannot fit) is an HTTP status, as without `stream`.

A job that asked for logprobs gets "tokens" events, (text, logprob entries), in place of "text":
the entries of the tokens whose text that event completes (serve/logprobs.py), and its "choice"
result lists them all. A non-streamed job holds them all until its answer is sent whole, so one
whose worst case could pass the server's `max_logprobs_bytes` is refused before it is queued
(`check_logprobs`).

A job answers `choices` times (the request's n), one choice after another on the same slot: the
events are each choice's text, then its "choice" result, and after the last one "done" with the
request's totals. The prompt is prefilled (and its pictures encoded) for choice 0 only; a later
choice keeps the slot's cache of the prompt and prefills its last token again, whose logits the
answer before it did not keep. A stop string ends its own choice; a cancelled job stops at the
next token, whichever choice it is in, and no later choice begins. The queue stays first come,
first served by request: a job with n choices holds the engine for n answers.

A /v1/completions job (text_completions.py) may hold several prompts: each is answered in turn,
its n choices as above, result `index` prompt × n + choice, with its own answer limit where the
request set none (`answer_limits`). With `echo` each choice opens with a
"prompt" event (the prompt's logprob entries, or None); with `prompt_logprobs` choice 0 scores
every prompt token as it prefills (engine/model.py's PromptScores), keeping only the cached prefix
whose scores the slot has kept (slots.py's ScoredPrefix: an lm-eval context shared by several
continuations is scored once), and the later choices reuse its entries. `discard_answer`
(max_tokens 0) drops the one token sampled, and `list_stop_token` lists the stop token that ended
an answer, as vLLM does.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..chat.detokenize import IncrementalDetokenizer
from ..chat.generate import MEDIA_ADVICE, out_of_memory_as_error
from ..chat.sampling import SamplingParams, unpack_logprobs
from ..engine.loader import LoadedModel
from ..engine.model import PromptScores
from ..errors import Cancelled, ContextOverflowError, InternVLChatError
from ..settings import SEED_MAX
from .answers import AnswerMemory, prompt_digest
from .conversation import Prompt, PromptMaker
from .errors import APIError, from_app_error, shown
from .features import FeatureCache
from .logprobs import SentTokens, TokenPieces, entries_bytes, held_bytes
from .media import DecodeAllowance, MediaReader
from .namespaces import found_again
from .options import ServeOptions
from .protocol import completion_id, request_totals, timings, usage
from .slots import ScoredPrefix, Slot, SlotPool
from .stops import StopStrings

log = logging.getLogger("internvl_chat.serve")
_ids = itertools.count(1)


class ClientGone(Exception):
    """The job was cancelled before generation began (its client disconnected)."""


COALESCE_S = 0.005  # text that comes faster than this is sent in one event
JOB_HISTORY = 64  # the last jobs whose durations a 429's Retry-After is estimated from
RETRY_AFTER_MAX_S = 600  # a 429's Retry-After (1 s at least): longer estimates say little more than "later"
TOLD_MAX = 64  # the refused clients still to come back that a 429's estimate counts (the latest ones): a
# client that retries at once, ignoring Retry-After, lengthens the others' waits by at most this many jobs


def event_bytes(item: tuple) -> int:
    """About the memory an event takes while it waits for its handler: its text, and its logprob
    entries as serve/logprobs.py's entries_bytes counts them. Not a prompt's echo: it comes once,
    before the answer, whatever the client's pace (a 32k-token prompt's entries with 5
    alternatives take ~60 MB), and counted it would drop a client that reads at once."""
    kind, payload = item
    if kind == "text":
        return len(payload)
    if kind == "tokens":
        text, entries = payload
        return len(text) + entries_bytes(entries)
    return 0


class EventChannel:
    """Engine thread → asyncio handler.

    Each wake-up of the handler's loop takes the GIL from the engine thread in the middle of a
    token, which slows a fast decode. So the loop is woken at most once per COALESCE_S: the first
    event of an answer goes out at once, events that follow within the window are sent together
    when it ends (a reader cannot see 5 ms; a decode of hundreds of tokens/s keeps its speed).

    A stream's handler takes the events only as fast as its client reads them (each write waits
    for the last one to be taken), so `queued` counts about the bytes waiting here (`event_bytes`)
    and `watch`, where a handler set it, hears that count at each wake-up (serve/replies.py: a
    client that lets too much wait is dropped).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._last_wake = 0.0
        self._ready = asyncio.Event()
        self.queued = 0  # about the bytes of the events waiting (event_bytes)
        self.watch: Callable[[int], None] | None = None  # called on the loop with `queued` at each wake-up

    def put(self, item) -> None:  # engine thread
        with self._lock:
            self._items.append(item)
            self.queued += event_bytes(item)
            if self._wake_pending:
                return
            self._wake_pending = True
            delay = self._last_wake + COALESCE_S - time.monotonic()
        self.loop.call_soon_threadsafe(self._schedule, delay)

    def _schedule(self, delay: float) -> None:  # loop thread
        if delay > 0:
            self.loop.call_later(delay, self._wake)
        else:
            self._wake()

    def _wake(self) -> None:  # loop thread
        with self._lock:
            self._wake_pending = False
            self._last_wake = time.monotonic()
            queued = self.queued
        self._ready.set()
        if self.watch is not None:
            self.watch(queued)

    async def get_batch(self, timeout: float) -> list:
        """Every event waiting now (at least one), or [] after `timeout` seconds without any."""
        while True:
            self._ready.clear()
            with self._lock:
                if self._items:
                    batch = list(self._items)
                    self._items.clear()
                    self.queued = 0
                    return batch
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []


def prompt_param(field: str, number: int, count: int) -> str:
    """A request's name for its prompt `number` of `count`, as a refusal of it names it: the field
    ("messages", "prompt"), or "prompt.1" in a list of several (the handler's checks and the engine's
    name the same prompt alike)."""
    return f"{field}.{number}" if count > 1 else field


@dataclass
class Job:
    prompt: Prompt
    params: SamplingParams
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)
    number: int = field(default_factory=lambda: next(_ids))
    cid: str = field(default_factory=completion_id)  # the response's "id"
    choices: int = 1  # answers to give (the request's n), one after another
    # /v1/completions (text_completions.py): more prompts after `prompt`, each answered `choices` times
    more_prompts: list[Prompt] = field(default_factory=list)
    prompt_field: str = "messages"  # the request's field that holds its prompts, named in a refusal of one
    # each prompt's max_new_tokens (None: `params`' for all): a /v1/completions list without max_tokens
    # gives each prompt the room its own length leaves (as vLLM), not the room of the longest
    answer_limits: list[int] | None = None
    echo: bool = False  # a "prompt" event (its logprob entries or None) opens each choice
    prompt_logprobs: int | None = None  # score the prompt's tokens, listing this many alternatives each
    discard_answer: bool = False  # max_tokens 0: the prompt alone is wanted; the one token sampled is dropped
    list_stop_token: bool = False  # logprobs list the stop token that ended an answer (its text is not sent)
    # an answer's logprob entries kept for its "choice" event (a non-streamed answer's list); a stream
    # sent each with its text, and kept them all the same until the answer's end (a 32k-token answer
    # with top_logprobs 20: ~190 MB, whatever the bound on what may wait unsent)
    keep_entries: bool = True

    def __post_init__(self) -> None:
        self.events = EventChannel(self.loop)
        self.begun = False  # the "started" event was sent

    def begin(self) -> None:
        """Tell the handler, once, that the engine has taken the job, checked every prompt of it, has
        its first prompt's pictures (decoded, or found in the feature cache) and is about to prefill:
        a stream's status line goes out now (serve/replies.py), and what fails from here is an event in it."""
        if not self.begun:
            self.begun = True
            self.emit("started", None)

    @property
    def prompts(self) -> list[Prompt]:
        return [self.prompt, *self.more_prompts]

    def prompt_params(self, number: int) -> SamplingParams:
        """The sampling settings of prompt `number` (its own answer limit, if it has one)."""
        if self.answer_limits is None:
            return self.params
        return replace(self.params, max_new_tokens=self.answer_limits[number])

    def held_logprobs(self) -> tuple[int, int, int]:
        """The most logprob entries this job's answer may hold until it is sent whole: (answer
        tokens' entries, echoed prompt tokens' entries, about the bytes of all), each choice its own
        (a choice's list is built for it; an echoed prompt's entries are listed again in each);
        (0, 0, 0) for a stream, which sends each entry with its text and keeps none."""
        if not self.keep_entries:
            return 0, 0, 0
        answer = echoed = 0
        for number, prompt in enumerate(self.prompts):
            if self.params.logprobs is not None and not self.discard_answer:
                # every token it may generate, and the stop token after them when that is listed
                answer += self.choices * (self.prompt_params(number).max_new_tokens + self.list_stop_token)
            if self.echo and self.prompt_logprobs is not None:
                echoed += self.choices * len(prompt.ids)
        held = 0
        if answer:
            held += answer * held_bytes(self.params.logprobs)
        if echoed:
            held += echoed * held_bytes(self.prompt_logprobs)
        return answer, echoed, held

    def param(self, number: int) -> str:
        """The request's name for its prompt `number` (`prompt_param`)."""
        return prompt_param(self.prompt_field, number, 1 + len(self.more_prompts))

    def emit(self, kind: str, payload) -> None:
        """Hand an event to the request handler's loop (called from the engine thread)."""
        try:
            self.events.put((kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel.set()


class EngineWorker:
    def __init__(self, loaded: LoadedModel, options: ServeOptions):
        self.loaded = loaded
        self.options = options
        self.model = loaded.model
        self.slots = SlotPool(loaded, options.slots, options.stream_interval)
        self.features = FeatureCache(options.feature_cache_bytes)
        self.answers = AnswerMemory()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        # the last jobs' durations and when the running one began (`clock`), for Retry-After
        self._durations: collections.deque[float] = collections.deque(maxlen=JOB_HISTORY)
        self._running_since = 0.0
        # when the clients refused lately were told to come back (clock times), for Retry-After
        self._told: collections.deque[float] = collections.deque(maxlen=TOLD_MAX)
        self.running: Job | None = None
        self.clock: Callable[[], float] = time.perf_counter  # (a test seam: jobs' durations without waiting)
        # test and monitoring seams, called in the engine thread
        self.on_start: Callable[[Job], None] | None = None
        self.on_event: Callable[[Job, dict], None] | None = None
        self.finished: collections.deque[dict] = collections.deque(maxlen=256)
        self.counts = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="internvl-chat-engine", daemon=True)
        self.reader = MediaReader(options, loaded.config)  # last: its temp folder is removed on every way out
        try:  # the tokenizer's warm-ups take seconds on a large vocabulary: a SIGTERM may end the start there
            self.prompts = PromptMaker(loaded, options, self.answers, self.reader)
            self.pieces = TokenPieces(loaded.tokenizer)  # logprob entries' text and bytes (engine thread only)
            builder = self.prompts.builder
            self._image_ids = {builder.img_start_id, builder.img_end_id, builder.img_context_id}
        except BaseException:
            self.reader.close()
            raise

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.end_jobs(include_running=False)  # the running one ends with its own "cancelled" error
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.reader.close()

    def end_jobs(self, include_running: bool = True) -> None:
        """Take no more jobs, cancel the running one and tell every handler waiting for one (the
        running one's too, unless `include_running` is False) that the server is shutting down.

        The handler hears it at once, whatever the engine thread is doing (a long prefill chunk
        or video decode): its client gets a 503 or a stream's error event and `[DONE]`, not a
        connection cut when the server's grace period is over."""
        with self._cond:
            self._stopping = True
            jobs = list(self._queue)
            self._queue.clear()
            if self.running is not None:
                self.running.cancel.set()
                if include_running:
                    jobs.append(self.running)
            self._cond.notify_all()
        for job in jobs:
            job.emit("error", APIError(503, "the server is shutting down; retry later", code="shutting_down"))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def unavailable(self, retry: str = "; retry later") -> APIError | None:
        """Why the engine takes no job (a 503), None while it takes them: the server is shutting
        down (`shutting_down`, as the jobs it ended were told: a request still being read then
        reaches the queue after it), or the engine thread has ended."""
        if self._stopping:
            return APIError(503, f"the server is shutting down{retry}", code="shutting_down")
        if not self._thread.is_alive():
            return APIError(503, f"the engine is not running{retry}", code="engine_unavailable")
        return None

    # ---- admission ---------------------------------------------------------------------------
    def check_capacity(self) -> None:
        """Raise 503 when the engine is down, 429 when the queue is full (cheap: before any parsing)."""
        with self._cond:
            self._check_locked()

    def _check_locked(self) -> None:
        if (error := self.unavailable()) is not None:
            raise error
        self._drop_cancelled_locked()
        busy = self.running is not None or self._queue  # an idle engine takes a request even with depth 0
        if busy and len(self._queue) >= self.options.queue_depth:
            seconds = self._retry_after_locked()
            # the message says the Retry-After sent (it said "about 2700 s" with a header of 600)
            wait = min(max(1, math.ceil(seconds)), RETRY_AFTER_MAX_S)
            waiting = f"{len(self._queue)} already wait" if self._queue else "none may wait (queue depth 0)"
            headers = {"Retry-After": str(wait), "retry-after-ms": str(max(1, round(seconds * 1000)))}
            raise APIError(429, f"the model is busy and its queue is full ({waiting}); retry in about {wait} s",
                           code="queue_full", headers=headers)  # fmt: skip

    def _retry_after_locked(self) -> float:
        """The seconds a refused client is told to wait (at most RETRY_AFTER_MAX_S): until the jobs
        there now are done (`_wait_locked`), then a mean job for each client refused before it that
        is still to come back. Clients refused together were all told the same moment, in whole
        seconds: they came back at once (openai-python waits exactly the Retry-After), filled the
        queue again and were refused again, while the engine had sat idle since its jobs were done
        (30 concurrent openai clients on a queue of 8 and jobs of 50 ms: 3 failed after their two
        retries, 2 s later). Each is now told its own moment, one mean job after the one before,
        also in `retry-after-ms` (openai-python's and openai-node's, preferred to Retry-After):
        whole seconds are far apart for short jobs."""
        now = self.clock()
        pending = [t for t in self._told if t > now]  # the clients told of a moment still to come
        seconds = min(self._wait_locked() + self._mean_locked() * len(pending), RETRY_AFTER_MAX_S)
        self._told.clear()
        self._told.extend(pending)
        self._told.append(now + seconds)
        return seconds

    def _mean_locked(self) -> float:
        """The recent jobs' mean duration; 1 s with no job done yet."""
        done = self._durations
        return sum(done) / len(done) if done else 1.0

    def _wait_locked(self) -> float:
        """About the seconds until the jobs there now are done: what the running job has left, then
        a mean job for each one waiting (not just until a place frees, when the running job ends:
        every client refused meanwhile would be told the same moment, and most find it taken).
        What the running one has left is the mean of what the recent jobs that ran longer than it
        has so far had left at this point (a job's length is mostly its answer's, which varies a
        hundredfold: counting it as a mean job whatever it has run told a client to wait a whole
        job for one about to end); none ran as long, it counts as a mean job (nothing says how
        much longer it runs). With no job done yet, a job counts as 1 s."""
        done = self._durations
        mean = self._mean_locked()
        left = 0.0
        if self.running is not None:
            ran = self.clock() - self._running_since
            longer = [d - ran for d in done if d > ran]
            left = sum(longer) / len(longer) if longer else mean
        return left + mean * len(self._queue)

    def _drop_cancelled_locked(self) -> None:
        """Forget queued jobs whose clients left: they would be skipped, and meanwhile they would
        hold places in the queue (429 for live clients) and lengthen the Retry-After estimate."""
        if any(job.cancel.is_set() for job in self._queue):
            live = [job for job in self._queue if not job.cancel.is_set()]
            self.counts["skipped"] += len(self._queue) - len(live)
            self._queue = collections.deque(live)
            self._cond.notify_all()  # the queue may be empty now (wait_idle)

    def check_logprobs(self, job: Job) -> None:
        """400 for a non-streamed job whose logprob entries could take more than the server's
        `max_logprobs_bytes` (Job.held_logprobs, its worst case: every choice as long as it may be):
        they are all held until its answer is sent whole, gigabytes for a long answer of n 16 and
        top_logprobs 20. A stream sends each with its text (its unsent part is bounded, UNSENT_BYTES)."""
        budget = self.options.max_logprobs_bytes
        if budget is None:
            return
        answer, echoed, held = job.held_logprobs()
        if held <= budget:
            return
        legacy = job.prompt_field == "prompt"  # /v1/completions
        parts, fixes = [], []
        if answer:
            parts.append(f"up to {answer:,} answer tokens with {job.params.logprobs + 1} log-probabilities each")
            fixes.append(f"set {'max_tokens' if legacy else 'max_tokens (or max_completion_tokens)'} to the length you need")
        if echoed:
            parts.append(f"{echoed:,} echoed prompt tokens with {job.prompt_logprobs + 1} log-probabilities each")
        fixes.append(f"lower n or {'logprobs' if legacy else 'top_logprobs'}")
        if legacy:
            fixes.append("send fewer or shorter prompts")
        fixes.append("send stream: true (a stream's logprobs go out with its text and are not held)")
        needed, allowed = _sizes_over(held, budget)
        raise APIError(400, f"this request's logprobs could take about {needed} of server memory, held until its "
                       f"answer is sent whole ({' and '.join(parts)}); this server allows {allowed} "
                       f"(--max-logprobs-mb). {fixes[0][0].upper()}{', '.join(fixes[:-1])[1:]}, or {fixes[-1]}",
                       code="logprobs_too_large", param="logprobs")  # fmt: skip

    def submit(self, job: Job) -> None:
        self.check_logprobs(job)  # before the queue: a 400, whatever the queue holds
        with self._cond:
            self._check_locked()
            self._queue.append(job)
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job runs or waits (tests, benchmarks, shutdown); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self.running is None, timeout)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    # ---- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                if job.cancel.is_set():
                    self.counts["skipped"] += 1
                    self._cond.notify_all()  # that may have emptied the queue: wake wait_idle
                    continue
                self.running = job
                self._running_since = self.clock()
            try:
                self._serve(job)
            finally:
                with self._cond:
                    self.running = None
                    self._durations.append(self.clock() - self._running_since)
                    self._cond.notify_all()

    def _serve(self, job: Job) -> None:
        try:
            if self.on_start is not None:
                self.on_start(job)
            self._generate(job)
        except APIError as e:
            job.emit("error", e)
        except InternVLChatError as e:
            job.emit("error", from_app_error(e))
        except (ClientGone, Cancelled):  # Cancelled: between video frames, the vision encoder's batches or prefill chunks
            self.counts["cancelled"] += 1
            job.emit("error", _cancelled())
        except Exception as e:  # noqa: BLE001 - a bug must not kill the engine thread; the client gets a 500
            log.error("request failed:\n%s", traceback.format_exc().rstrip())
            # escaped and cut as any text a client is shown: an exception's may quote the request
            job.emit("error", APIError(500, f"internal error ({shown(f'{type(e).__name__}: {e}')})", code="internal_error"))

    def _generate(self, job: Job) -> None:
        self._check_prompts(job)
        results = []
        for number, prompt in enumerate(job.prompts):
            if number and job.cancel.is_set():  # the client left between two prompts
                raise ClientGone
            slot, reuse = self.slots.choose(prompt)
            if job.prompt_logprobs is not None:
                # every prompt token needs its score (choose measured the slots so; asked here again
                # whatever chose the slot, so a token is never kept without one)
                reuse = slot.scored_reuse(prompt, job.prompt_logprobs)
            scored = None
            for index in range(job.choices):
                if index:
                    if job.cancel.is_set():  # the client left between two choices
                        raise ClientGone
                    # the slot holds the prompt and the answer before: all but the prompt's last token is kept
                    reuse = slot.reusable(prompt)
                result = self._answer(job, prompt, job.prompt_params(number), index, slot, reuse, scored)
                if result is None:  # cancelled: the handler has been told
                    return
                scored = result["prompt_logprobs"]
                result.update(index=number * job.choices + index, prompt=number)
                results.append(result)
                job.emit("choice", result)
        job.emit("done", request_totals(results))

    def _check_prompts(self, job: Job) -> None:
        """Refuse the job now for what any of its prompts would be refused at its own prefill (the
        Session's checks: its context, the sampling settings), before "started": a later prompt's
        refusal is then a stream's status, as without `stream`, not an error event after the answers
        before it. (Its choices share its ids and settings: one check is theirs too.)"""
        session = self.slots.slots[0].session  # the checks read no slot's cache with nothing to reuse
        for number, prompt in enumerate(job.prompts):
            try:
                session.check_continuation(prompt.ids, 0, job.prompt_params(number))
            except ContextOverflowError as e:  # named, as the handler's own checks name a prompt of a list
                raise from_app_error(e, param=job.param(number)) from None

    def _answer(self, job: Job, prompt: Prompt, params: SamplingParams, index: int, slot: Slot, reuse: int,
                scored: list[dict] | None) -> dict | None:  # fmt: skip
        """Choice `index` of `prompt` sampled with `params`, generated on `slot` keeping `reuse` cached
        prompt tokens; its text sent as it comes. With `job.prompt_logprobs`, choice 0 scores the
        prompt as it is prefilled and the later ones are given its entries (`scored`). Its result,
        or None when the job was cancelled meanwhile."""
        session = slot.session
        session.activate_kv_cache()
        features, vision_s = self._features(prompt, reuse, job)
        if job.cancel.is_set():  # the client left while its pictures were encoded: no prefill for nobody
            raise ClientGone
        session.check_continuation(prompt.ids, reuse, params)  # refused before "started": an HTTP status
        job.begin()  # before prefill: a long one must not hold back a stream's headers
        # from here the slot's cache is rewound to `reuse` (until then it still held its last conversation)
        self.slots.use(slot)
        slot.claim(prompt.namespace)  # (`reuse` is 0 unless the slot's cache is this namespace's already)
        slot.spans = [s for s in prompt.spans if s.end <= reuse]  # the same runs the slot held up to `reuse`
        slot.keep_scores(reuse)  # a scored choice 0 keeps exactly the scores its `reuse` was chosen for
        stops = StopStrings(job.stops)
        halt = ChoiceHalt(job.cancel)
        tokens = SentTokens(self.pieces, job.keep_entries) if params.logprobs is not None else None
        params = replace(params, seed=choice_seed(params.seed, index))
        scores = self._prompt_scores(job, slot, reuse) if job.prompt_logprobs is not None and scored is None else None
        echoed = not job.echo  # (prompt_logprobs comes with echo only)
        sent: list[str] = []
        try:
            for event in session.continue_with(prompt.ids, reuse, features, params, halt, vision_s, scores):
                if event["finish_reason"] is not None:
                    # the Session has committed the prompt: record its pictures before anything here can
                    # fail, or the slot would hold their KV as plain ids that any prompt may continue from
                    slot.spans = list(prompt.spans)
                if self.on_event is not None:
                    self.on_event(job, event)
                if not echoed:  # the prompt is prefilled (and scored) by now: its echo goes before any text
                    if scores is not None:
                        rows = self._keep_scores(slot, prompt, reuse, scores, job.prompt_logprobs)
                        scored = self._prompt_entries(prompt.ids, rows)
                    job.emit("prompt", scored)
                    echoed = True
                if job.discard_answer:
                    continue
                if tokens is not None:
                    tokens.receive(event)
                text = stops.push(event["text"])
                if stops.hit and (not job.cancel.is_set() or event["finish_reason"] not in (None, "cancelled")):
                    # stream_generate samples no token after this event's; at the answer's last event
                    # the answer is whole, even if its client left (or the server stops) meanwhile:
                    # its text is cut here, so its finish, ids and usage must say so too
                    halt.stop_hit = True
                if event["finish_reason"] is not None:
                    text += stops.flush()
                sent.append(text)
                _send(job, text, tokens)
        finally:
            # kept by the Session for /retry, which serve never does: GPU memory no setting counts, held
            # by the slot until its next request; dropped on every way out (a failure after the answer too)
            for turn in session.turns:
                turn.features = None
        final = event
        ended_by_token = final.get("stop_logprob") is not None and not (job.discard_answer or halt.stop_hit)
        if job.list_stop_token and tokens is not None and ended_by_token:
            # lm-eval's loglikelihood drops the answer's last listed token as the one generated
            stop_entry = self.pieces.content(final["stop_logprob"], ends=True)
            if job.keep_entries:
                tokens.listed.append(stop_entry)
            job.emit("tokens", ("", [stop_entry]))
        stop_end = stops.hit_end if halt.stop_hit else None
        result = self._finish(job, prompt, index, slot.index, reuse, final, "".join(sent), tokens, stop_end)
        if result is not None:
            result["prompt_logprobs"] = scored
        return result

    @staticmethod
    def _prompt_scores(job: Job, slot: Slot, reuse: int) -> PromptScores:
        """What scores the prompt's tokens after `reuse`: with as many alternatives as the scores
        kept before them (at least the job's), so that all of them can be kept together."""
        kept = slot.scores
        return PromptScores(kept.k if reuse and kept is not None else job.prompt_logprobs)

    @staticmethod
    def _keep_scores(slot: Slot, prompt: Prompt, reuse: int, scores: PromptScores, k: int) -> torch.Tensor:
        """Once the prompt is prefilled: the slot keeps its tokens' scores (those it kept for the
        `reuse` tokens after the first, then the new ones); the job's rows are those with k alternatives."""
        new = scores.table()
        before = slot.scores.rows[:reuse] if reuse else new[:0]
        slot.scores = ScoredPrefix(scores.k, list(prompt.ids), torch.cat([before, new]))
        return slot.scores.first(len(prompt.ids) - 1, k)

    def _prompt_entries(self, ids: list[int], rows: torch.Tensor) -> list[dict]:
        """The prompt's logprob entries: the first token's without a value (nothing comes before
        it), then each later one's as a generated token's (serve/logprobs.py)."""
        first = {**self.pieces.entry(ids[0], 0.0), "logprob": None, "top_logprobs": None}
        return [first] + [self.pieces.content(unpack_logprobs(token, row)) for token, row in zip(ids[1:], rows.tolist())]

    def _features(self, prompt: Prompt, reuse: int, job: Job) -> tuple[torch.Tensor | None, float]:
        """Features for the image runs after `reuse`, in prompt order (LRU first, else the vision encoder).

        Each content key is decoded and encoded at most once per job, whatever the LRU holds (off,
        or too small for it): a picture or video sent twice in one request uses one set of features,
        and its decoding counts once against the request's allowance."""
        needed = [s for s in prompt.spans if s.start >= reuse]
        if not needed:
            return None, 0.0
        by_key: dict[str, torch.Tensor] = {}
        cached = self.features if found_again(prompt.namespace) else None  # none for a request's own namespace
        vision_s = 0.0
        allowance = DecodeAllowance(self.options.max_video_decode_pixels)  # for all the video files decoded for this job
        parts = []
        for span in needed:
            item = prompt.media[span.media]
            features = by_key.get(item.key)
            if features is None:
                features = cached.get(item.key) if cached is not None else None
                if features is None:
                    if job.cancel.is_set():
                        raise ClientGone
                    with out_of_memory_as_error("reading the attachments", MEDIA_ADVICE):  # decoding and tiling allocate too
                        pixels = self.reader.pixels(item, job.cancel, allowance)  # a video's decoding stops at cancel
                    t0 = time.perf_counter()
                    with out_of_memory_as_error("in the vision encoder"):  # the app's one line, not a 500 crash
                        features = self.model.encode_images(pixels, job.cancel)
                    if features.device.type == "cuda":
                        torch.cuda.synchronize(features.device)
                    vision_s += time.perf_counter() - t0
                    if cached is not None:
                        cached.put(item.key, features)
                by_key[item.key] = features
            parts.append(features[span.tile : span.tile + span.tiles])
        return torch.cat(parts), vision_s

    def _finish(self, job: Job, prompt: Prompt, index: int, slot: int, reuse: int, final: dict, text: str,
                tokens: SentTokens | None, stop_end: int | None) -> dict | None:  # fmt: skip
        """`stop_end`: where the stop string that ended the answer ends in the text generated, which
        `text` is cut from before it (None: none did)."""
        generated = list(final["token_ids"])
        reason = final["finish_reason"]
        if job.discard_answer and reason != "cancelled":  # max_tokens 0: no answer, as if cut at once
            generated, reason = [], "length"
        completion_tokens = len(generated)
        if stop_end is not None:
            reason = "stop"
            answer_ids = self._ids_for_text(generated, text)
            # as vLLM counts them: an event of several tokens (stream_interval) has some after it
            completion_tokens = self._tokens_through(generated, stop_end)
        elif reason == "cancelled":  # the client went away (then nobody reads this) or the server is stopping
            self.counts["cancelled"] += 1
            self.finished.append({"job": job.number, "choice": index, "finish_reason": "cancelled",
                                  "completion_tokens": len(generated)})  # fmt: skip
            job.emit("error", _cancelled())
            return None
        else:
            answer_ids = generated
        # (a request of its own namespace, --no-shared-cache, is never resent into it: nothing to remember)
        if answer_ids is not None and found_again(prompt.namespace) and not self._image_ids.intersection(answer_ids):
            self.answers.remember(text, answer_ids, prompt_digest(prompt.ids, prompt.spans, prompt.namespace))
        timing = final["timing"]
        prompt_n = len(prompt.ids) - reuse
        result = {
            "index": index,
            "finish_reason": reason,
            "text": text,
            "token_ids": generated[:completion_tokens],  # vLLM's: the ids usage counts
            "logprobs": tokens.listed if tokens is not None else None,
            "usage": usage(len(prompt.ids), completion_tokens, reuse),
            "timings": timings(prompt_n, timing["vision_s"] + timing["prefill_s"], timing["decode_tokens"],
                               timing["decode_s"], reuse),  # fmt: skip
        }
        self.counts[reason] += 1
        self.finished.append({"job": job.number, "choice": index, "finish_reason": reason,
                              "completion_tokens": completion_tokens, "cached_tokens": reuse, "prompt_n": prompt_n,
                              "slot": slot})  # fmt: skip
        return result

    def _tokens_through(self, ids: list[int], chars: int) -> int:
        """How many of the generated ids it takes to spell the first `chars` characters of their text."""
        detok = IncrementalDetokenizer(self.loaded.tokenizer)
        decoded = 0
        for k, token in enumerate(ids, start=1):
            decoded += len(detok.push(token))
            if decoded >= chars:
                return k
        return len(ids)

    def _ids_for_text(self, ids: list[int], text: str) -> list[int] | None:
        """The leading generated ids that decode to exactly `text` (an answer cut by a stop string), if any."""
        if not text:
            return []
        detok = IncrementalDetokenizer(self.loaded.tokenizer)
        decoded = ""
        for k, token in enumerate(ids, start=1):
            decoded += detok.push(token)
            if decoded == text:
                return ids[:k]
            if len(decoded) > len(text):
                return None
        return None


class ChoiceHalt:
    """What stops one choice's generation, read as the generator reads a threading.Event: a stop
    string in its answer (that choice alone) or the job's cancel (its client left, the server stops)."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel
        self.stop_hit = False

    def is_set(self) -> bool:
        return self.stop_hit or self.cancel.is_set()


# an odd step (2**64 / the golden ratio, cut to 63 bits): i × step differs for every i below 2**63,
# so the choices of one request never share a seed, nor (near certainly) a nearby request's
_SEED_STEP = 0x9E3779B97F4A7C15 & SEED_MAX


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed that choice `index` samples with: `seed` itself for choice 0 (n=1 answers as before),
    then seed + index × an odd step, modulo 2**63; None (a random seed each) stays None."""
    if seed is None:
        return None
    return (seed + index * _SEED_STEP) % (SEED_MAX + 1)


def _send(job: Job, text: str, tokens: SentTokens | None) -> None:
    """Hand the handler the text just let through, with the logprob entries it completes when asked."""
    if tokens is None:
        if text:
            job.emit("text", text)
        return
    entries = tokens.sent(text)
    if text or entries:
        job.emit("tokens", (text, entries))


def _size(n: int) -> str:
    """Bytes in MiB, or GiB from 1 GiB on: "412 MiB", "3.2 GiB"."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):,.1f} GiB".replace(".0 GiB", " GiB")
    return f"{max(1, round(n / (1 << 20))):,} MiB"


def _sizes_over(held: int, budget: int) -> tuple[str, str]:
    """`held` and the `budget` it passes, as `_size` shows them where they differ so; else both in
    MiB, `held` rounded up, the budget down: a request just over 1 GiB was told it "could take
    about 1 GiB" where "this server allows 1 GiB"."""
    needed, allowed = _size(held), _size(budget)
    if needed != allowed:
        return needed, allowed
    return f"{-(-held // (1 << 20)):,} MiB", f"{budget // (1 << 20):,} MiB"


def _cancelled() -> APIError:
    return APIError(503, "the request was cancelled: the server is shutting down; retry later", code="cancelled")
