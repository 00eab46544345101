"""A seeded differential fuzz of `serve`'s engine (serve/engine.py, its KV slots, the Session's
`continue_with`, the feature and answer caches), used by test_serve_fuzz.py.

`ServeFuzz(live, ref, pictures, seed, slots).run(steps)` builds requests as the app does (the
request body parsed, its prompt made by the worker's PromptMaker, its Job as app.py and
text_completions.py make it) and serves each one synchronously on the test's thread
(`EngineWorker._serve`: no engine thread, no timing): chat conversations that are extended,
branched, resent with another cache_salt, another picture of the same size or a picture moved;
/v1/completions texts and token ids that share prefixes, with echo and prompt logprobs,
max_tokens 0 and several prompts; n > 1, logprobs, stop strings taken from the answer itself,
small max_tokens (length finishes), clients that leave at a random event, and a failure of the
model's forward pass at a random call. Few slots, so that slots are reused and evicted.

After each request the checks compare it with `ref`, a second model that prefills from scratch:
- each greedy (or seeded) answer's token ids equal the fresh model's for the same prompt ids and
  pictures (a stop string's answer: their prefix, its text cut where the stop string begins);
- prompt logprobs equal a fresh prefill's log_softmax within fp32 tolerance;
- `usage` counts the prompt, the answer ids, and as cached the tokens the slot kept: no more than
  the slot held of this prompt (same ids, same pictures at the same places, same namespace), all
  but the last prompt token for a later choice of n;
- every slot's KV cache holds exactly its ids[:start_pos] (with its pictures' features): the
  logits of a probe token fed there equal a fresh prefill's.

A failure message starts with the seed and the operations so far: rerun that seed to reproduce it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import threading
from collections import Counter
from dataclasses import replace

import torch

from internvl_chat.chat.detokenize import IncrementalDetokenizer
from internvl_chat.chat.generate import stream_generate
from internvl_chat.chat.sampling import Sampler, SamplingParams
from internvl_chat.serve.answers import AnswerMemory
from internvl_chat.serve.conversation import PromptMaker, sampling_params
from internvl_chat.serve.errors import APIError
from internvl_chat.serve.engine import EngineWorker, Job, choice_seed
from internvl_chat.serve.logprobs import LOGPROB_FLOOR
from internvl_chat.serve.media import DecodeAllowance
from internvl_chat.serve.options import ServeOptions
from internvl_chat.serve.protocol import choices, parse_request, stop_strings
from internvl_chat.serve.text_completions import parse_completion_request, text_job, text_prompts

TOL = 1e-4  # relative to the largest logit, as session_fuzz.py
LOGPROB_TOL = 1e-3
WORDS = ("the", "cat", "sat", "on", "a", "mat", "picture", "what", "is", "this", "red", "blue", "why", "one",
         "two", "three", "tell", "me", "more", "about", "it", "please", "and", "then")  # fmt: skip


class FuzzFailure(AssertionError):
    pass


class ServeFuzz:
    def __init__(self, live, ref, pictures: dict[str, bytes], seed: int, slots: int):
        self.live, self.ref, self.seed = live, ref, seed
        self.rng = random.Random(seed)
        self.stream_interval = self.rng.choice([1, 1, 2, 4])  # tokens per generation event
        self.worker = EngineWorker(live, ServeOptions(slots=slots, stream_interval=self.stream_interval))
        self.loop = asyncio.new_event_loop()
        self.urls = {name: "data:image/png;base64," + base64.b64encode(png).decode() for name, png in pictures.items()}
        self.ref_features: dict[str, torch.Tensor] = {}
        self.conversations: list[list[dict]] = []  # chat requests' messages answered so far
        self.texts: list[list[int]] = []  # completion prompts sent so far (ids)
        self.log: list[str] = []
        self.outcomes: Counter = Counter()
        self.ops = 0
        special = live.special
        self.banned = (special.img_start, special.img_end, special.img_context, special.im_start)
        self.context = self.worker.model.max_seq_len
        self.fresh_prompts = PromptMaker(live, self.worker.options, AnswerMemory(), self.worker.reader)
        self._answers: list[dict] = []  # (per job) the state of its slot at each _answer call
        answer = self.worker._answer

        def watched(job, prompt, params, index, slot, reuse, scored):
            session = slot.session
            self._answers.append({"slot": slot.index, "reuse": reuse, "index": index, "prompt": prompt,
                                  "held": list(session.ids[: session.start_pos]), "spans": list(slot.spans),
                                  "namespace": slot.namespace})  # fmt: skip
            return answer(job, prompt, params, index, slot, reuse, scored)

        self.worker._answer = watched

    def close(self) -> None:
        self.worker.reader.close()
        self.loop.close()

    # ---- running -------------------------------------------------------------------------------
    def run(self, steps: int) -> None:
        try:
            for _ in range(steps):
                try:
                    self.step()
                    self.check_slots()
                except FuzzFailure:
                    raise
                except BaseException as e:  # noqa: BLE001 — anything unexpected is a finding, with its history
                    raise self.fail(f"unexpected {type(e).__name__}: {e}") from e
                self.ops += 1
        finally:
            self.close()

    def fail(self, message: str) -> FuzzFailure:
        history = "\n  ".join(self.log[-25:])
        return FuzzFailure(f"seed {self.seed} (stream_interval {self.stream_interval}), op {len(self.log)}: {message}\n  operations so far:\n  {history}")

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            raise self.fail(message)

    # ---- random requests -----------------------------------------------------------------------
    def _text(self) -> str:
        r = self.rng.random()
        n = self.rng.randint(1, 8) if r < 0.7 else self.rng.randint(20, 80)
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def _user(self) -> dict:
        text = self._text()
        pictures = self.rng.choice([[], [], [], ["a"], ["b"], ["a", "b"], ["wide"]])
        if not pictures:
            return {"role": "user", "content": text}
        parts = [{"type": "image_url", "image_url": {"url": self.urls[p]}} for p in pictures]
        parts.insert(self.rng.randint(0, len(parts)), {"type": "text", "text": text})
        return {"role": "user", "content": parts}

    def _sampling(self, body: dict) -> None:
        rng = self.rng
        body["max_tokens"] = rng.choice([1, 2, 3, 5, 8])
        if rng.random() < 0.75:
            body["temperature"] = 0
        else:
            body.update(temperature=rng.choice([0.7, 1.0]), seed=rng.randrange(2**31))
        if rng.random() < 0.25:
            body["n"] = rng.randint(2, 3)
        if rng.random() < 0.15:
            body["repetition_penalty"] = 1.3

    def step(self) -> None:
        rng = self.rng
        kind = rng.choices(["chat_new", "chat_extend", "chat_branch", "chat_salt", "chat_picture", "text"],
                           [3, 4, 2, 1, 2, 4])[0]  # fmt: skip
        if kind != "chat_new" and kind.startswith("chat") and not self.conversations:
            kind = "chat_new"
        if kind == "text":
            self.text_request()
            return
        salt = None
        if kind == "chat_new":
            messages = [{"role": "system", "content": self._text()}] if rng.random() < 0.3 else []
            messages.append(self._user())
        else:
            base = rng.choice(self.conversations)
            if kind == "chat_extend":
                messages = base + [self._user()]
            elif kind == "chat_branch":
                users = [i for i, m in enumerate(base) if m["role"] == "user"]
                messages = base[: rng.choice(users)] + [self._user()]
            elif kind == "chat_salt":
                messages = [dict(m) for m in base[:-1]] + [base[-1]] if base[-1]["role"] == "user" else base[:-1]
                salt = rng.choice(["x", "y"])
            else:  # another picture of the same size, or one moved
                messages = [dict(m) for m in base if m["role"] != "assistant" or rng.random() < 0.8]
                users = [m for m in messages if m["role"] == "user"]
                target = rng.choice(users)
                content = target["content"]
                if isinstance(content, str):
                    target["content"] = [{"type": "image_url", "image_url": {"url": self.urls["a"]}},
                                         {"type": "text", "text": content}]  # fmt: skip
                else:
                    parts = [dict(p) for p in content]
                    pics = [p for p in parts if p["type"] == "image_url"]
                    others = [m for m in users if m is not target]
                    if pics and others and rng.random() < 0.3:  # the same picture in another message
                        p = rng.choice(pics)
                        parts.remove(p)
                        moved = rng.choice(others)
                        body = moved["content"]
                        moved["content"] = ([{"type": "text", "text": body}] if isinstance(body, str) else list(body)) + [p]
                        if not parts:
                            parts = [{"type": "text", "text": self._text()}]
                    elif pics and rng.random() < 0.5:
                        p = rng.choice(pics)
                        p["image_url"] = {"url": self.urls["b" if p["image_url"]["url"] == self.urls["a"] else "a"]}
                    else:
                        rng.shuffle(parts)
                    target["content"] = parts
                if messages[-1]["role"] != "user":
                    messages.append(self._user())
        body = {"model": "tiny", "messages": messages, "return_token_ids": True}
        if salt is not None:
            body["cache_salt"] = salt
        self._sampling(body)
        if rng.random() < 0.3:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 3))
        self.chat_request(kind, body)

    def text_request(self) -> None:
        rng = self.rng
        held = [list(x.session.ids[: x.session.start_pos]) for x in self.worker.slots.slots]
        held = [h for h in held if len(h) > 1]
        if held and rng.random() < 0.15:  # a slot's ids sent as token ids: its pictures' runs with no picture
            base = rng.choice(held)
            ids = base[: rng.randint(2, len(base))]
        elif self.texts and rng.random() < 0.6:
            base = rng.choice(self.texts)
            cut = rng.randint(1, len(base))
            ids = base[:cut] + self.live.tokenizer.encode(" " + self._text())
        else:
            ids = self.live.tokenizer.encode(self._text())
        body: dict = {"model": "tiny", "prompt": ids, "return_token_ids": True}
        self._sampling(body)
        if rng.random() < 0.4:
            body.update(echo=True, logprobs=rng.randint(0, 3))
            if rng.random() < 0.3:
                body["max_tokens"] = 0
        elif rng.random() < 0.3:
            body["logprobs"] = rng.randint(0, 2)
        if rng.random() < 0.2:
            body["cache_salt"] = rng.choice(["x", "y"])
        if rng.random() < 0.2:
            other = self.live.tokenizer.encode(self._text())
            body["prompt"] = [ids, other] if rng.random() < 0.5 else [other, ids]
        self.texts.append(ids)
        req = parse_completion_request(json.dumps(body).encode())
        try:
            prompts = text_prompts(req, self.worker.prompts, self.context)
            params = sampling_params(req, self.worker.options.defaults, prompts.longest, self.context)
        except APIError as e:
            self.refused("text", e)
            return
        job = text_job(req, prompts, params, self.context, self.loop)
        self.serve("text", body, job, texts=True)

    def chat_request(self, kind: str, body: dict) -> None:
        req = parse_request(json.dumps(body).encode())
        try:
            prompt = self.worker.prompts.make(req)
            params = sampling_params(req, self.worker.options.defaults, len(prompt.ids), self.context)
        except APIError as e:
            self.refused(kind, e)
            return
        job = Job(prompt, params, stop_strings(req), self.loop, choices=choices(req), keep_entries=True)
        # our replies resent come back as our ids (answers.py): the same text as a fresh server's prompt
        # (but for the bytes of a character an answer's length limit cut, which its text leaves out)
        fresh = self.fresh_prompts.make(req)
        ours, theirs = (self.live.tokenizer.decode(p.ids, skip_special_tokens=True).replace("\ufffd", "")
                        for p in (prompt, fresh))  # fmt: skip
        self.expect(ours == theirs and [s.key for s in prompt.spans] == [s.key for s in fresh.spans],
                    f"{kind}: the prompt's text or pictures differ from a fresh server's: {ours!r} vs {theirs!r}")
        result = self.serve(kind, body, job)
        if result is not None and result[0]["finish_reason"] != "cancelled":
            self.conversations.append(body["messages"] + [{"role": "assistant", "content": result[0]["text"]}])
            self.conversations = self.conversations[-8:]

    def refused(self, kind: str, error: APIError) -> None:
        """A prompt over the context is refused before it is queued; its conversation is not continued."""
        self.log.append(f"{kind}: refused ({error})")
        # (or an id past the tokenizer's vocabulary: the tiny model's embedding has more rows, and an
        # answer of ours sent back as token ids may hold one)
        self.expect(error.status == 400 and ("context" in str(error) or "outside this model's vocabulary" in str(error)),
                    f"refused: {error}")  # fmt: skip
        self.outcomes["refused"] += 1
        self.conversations = [c for c in self.conversations if len(json.dumps(c)) < 6000]

    # ---- serving one request ---------------------------------------------------------------------
    def _features(self, prompt) -> None:
        """The fresh model's features of the prompt's pictures (each encoded once)."""
        for item in prompt.media:
            if item.key not in self.ref_features:
                pixels = self.worker.reader.pixels(item, threading.Event(), DecodeAllowance(None))
                self.ref_features[item.key] = self.ref.model.encode_images(pixels)

    def features_of(self, spans) -> torch.Tensor | None:
        if not spans:
            return None
        return torch.cat([self.ref_features[s.key][s.tile : s.tile + s.tiles] for s in spans])

    def reference(self, ids: list[int], spans, params: SamplingParams) -> dict:
        sampler = Sampler(params, self.ref.config.text.vocab_size, self.ref.model.device, banned_ids=self.banned)
        sampler.observe(torch.tensor(ids))
        final, text = None, []
        for final in stream_generate(self.ref.model, self.ref.tokenizer, ids, 0, params, sampler,
                                     image_features=self.features_of(spans),
                                     stop_ids=self.worker.prompts.builder.stop_ids):  # fmt: skip
            text.append(final["text"])
        return {**final, "whole_text": "".join(text)}  # (the text as the answer spells it: no special tokens)

    def _tied(self, ids, spans, got: list[int], want: list[int], params) -> bool:
        """Greedy answers that part where the fresh model's two best scores are equal within TOL."""
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if not params.greedy or at is None or params.repetition_penalty != 1:
            return False
        logits = self.ref.model.forward(ids + want[:at], 0, self.features_of(spans))
        logits = logits.index_fill(0, torch.tensor(self.banned), float("-inf"))
        a, b = logits[got[at]].item(), logits[want[at]].item()
        return abs(a - b) <= TOL * logits[torch.isfinite(logits)].abs().max().item()

    def serve(self, kind: str, body: dict, job: Job, texts: bool = False):
        rng = self.rng
        prompts = job.prompts
        for p in prompts:
            self._features(p)
        # a stop string from the greedy answer itself (computed first), now and then
        if job.params.greedy and rng.random() < 0.25 and not job.discard_answer:
            want = self.reference(list(prompts[0].ids), prompts[0].spans, job.prompt_params(0))
            text = want["whole_text"]
            if len(text) >= 2:
                a = rng.randrange(len(text) - 1)
                job.stops = [text[a : a + rng.randint(1, 3)]]
        # a client that leaves at a random event, or a failure of the model at a random call
        fault = rng.random()
        cancel_at = rng.randint(-1, 6) if fault < 0.12 else None  # -1: it left before the engine took it
        fail_at = rng.randint(1, 6) if 0.12 <= fault < 0.2 else None
        fail_in = rng.choice(["forward", "forward", "encode_images"]) if fail_at is not None else None
        if fail_in == "encode_images":
            fail_at = 1
        desc = (f"{kind}: {json.dumps({k: v for k, v in body.items() if k not in ('messages', 'prompt')})} "
                f"prompts {[len(p.ids) for p in prompts]} stops {job.stops} cancel_at {cancel_at} fail_at {fail_at} in {fail_in}")
        if "messages" in body:
            shown = json.dumps(body["messages"])
            for name, url in self.urls.items():
                shown = shown.replace(url, name.upper())
            desc += " messages " + shown[:2000]
        else:
            desc += f" prompt {body['prompt']}"
        self.log.append(desc)
        self._answers = []
        seen = [0]

        def on_event(j, event):
            seen[0] += 1
            if cancel_at is not None and seen[0] > cancel_at:
                j.cancel.set()

        self.worker.on_event = on_event
        model = self.worker.model
        if cancel_at == -1:
            job.cancel.set()
        if fail_at is not None:
            original, calls = getattr(model, fail_in), [0]

            def flaky(*a, **k):
                calls[0] += 1
                if calls[0] == fail_at:
                    raise RuntimeError("injected fault")
                return original(*a, **k)

            setattr(model, fail_in, flaky)
        try:
            self.worker._serve(job)
        finally:
            self.worker.on_event = None
            if fail_at is not None:
                delattr(model, fail_in)
        events = list(job.events._items)
        kinds = [k for k, _ in events]
        results = [p for k, p in events if k == "choice"]
        errors = [p for k, p in events if k == "error"]
        overflow = any(len(p.ids) + job.prompt_params(i).max_new_tokens > self.context for i, p in enumerate(prompts))
        if overflow:
            self.expect(errors and errors[0].status == 400 and "choice" not in kinds, f"a prompt over the context: {kinds}")
            self.outcomes["over the context"] += 1
            return None
        if errors:
            self.outcomes["cancelled" if cancel_at is not None else "failed" if fail_at is not None else "error"] += 1
            self.expect(cancel_at is not None or fail_at is not None, f"an error: {errors[0]}")
            self.expect("done" not in kinds, "an error, then done")
        else:
            self.expect(kinds[-1] == "done", f"the last event is {kinds[-1]}")
            self.expect(len(results) == len(prompts) * job.choices, f"{len(results)} choices")
        for result in results:
            self.check_result(job, result)
        if not errors:
            self.check_totals(job, results, events[-1][1])
            self.outcomes[kind] += 1
        return results if not errors else None

    def check_result(self, job: Job, result: dict) -> None:
        number = result["prompt"]
        index = result["index"] - number * job.choices
        prompt = job.prompts[number]
        ids = list(prompt.ids)
        params = job.prompt_params(number)
        seen = next(a for a in self._answers if a["prompt"] is prompt and a["index"] == index)
        where = f"prompt {number} choice {index}"
        # usage: what the slot really held of this prompt
        reuse = seen["reuse"]
        u = result["usage"]
        self.expect(u["prompt_tokens"] == len(ids), f"{where}: prompt_tokens {u['prompt_tokens']} of {len(ids)}")
        self.expect(u["prompt_tokens_details"]["cached_tokens"] == reuse, f"{where}: cached_tokens vs reuse {reuse}")
        held = seen["held"]
        same = 0
        while same < min(len(held), len(ids)) and held[same] == ids[same]:
            same += 1
        self.expect(reuse <= same and reuse < len(ids), f"{where}: reused {reuse}, the slot held {same} of the prompt")
        self.expect(reuse == 0 or seen["namespace"] == prompt.namespace, f"{where}: reused another namespace's cache")
        theirs = {(s.start, s.end): s.key for s in seen["spans"]}
        for s in prompt.spans:
            if s.start < reuse:
                self.expect(s.end <= reuse and theirs.get((s.start, s.end)) == s.key, f"{where}: reused another picture")
        for s in seen["spans"]:
            if s.start < reuse:
                self.expect(any((x.start, x.end, x.key) == (s.start, s.end, s.key) for x in prompt.spans),
                            f"{where}: a picture of the slot kept for plain ids")  # fmt: skip
        if index:
            self.expect(reuse == len(ids) - 1, f"{where}: a later choice reused {reuse} of {len(ids)}")
        if reuse:
            self.outcomes["reused"] += 1
        # the answer: the fresh model's
        got = result["token_ids"]
        self.expect(u["completion_tokens"] == len(got), f"{where}: completion_tokens {u['completion_tokens']} vs {len(got)}")
        if job.discard_answer:
            self.expect(got == [] and result["finish_reason"] == "length", f"{where}: max_tokens 0 answered {got}")
        else:
            seeded = replace(params, seed=choice_seed(params.seed, index))
            if params.greedy or params.seed is not None:
                want = self.reference(ids, prompt.spans, seeded)
                want_ids = list(want["token_ids"])
                if result["finish_reason"] == "stop" and any(x in want["whole_text"] for x in job.stops):
                    ok = want_ids[: len(got)] == got
                    text = want["whole_text"]
                    cut = min((text.find(s) for s in job.stops if s in text), default=-1)
                    ok = ok and cut >= 0 and result["text"] == text[:cut]
                    if not ok and params.greedy and self._tied(ids, prompt.spans, got, want_ids, params):
                        self.outcomes["tie"] += 1
                        return
                    self.expect(ok, f"{where}: stopped with {got} {result['text']!r}; fresh {want_ids} {text!r}")
                    # usage counts the ids through the one that completes the stop string (vLLM's count),
                    # whatever the number of tokens per event
                    end = min(text.find(s) + len(s) for s in job.stops if s in text)
                    detok, spelled, through = IncrementalDetokenizer(self.live.tokenizer), 0, len(want_ids)
                    for k, token in enumerate(want_ids, start=1):
                        spelled += len(detok.push(token))
                        if spelled >= end:
                            through = k
                            break
                    self.expect(len(got) == through, f"{where}: a stop string's answer counts {len(got)} ids, "
                                                     f"{through} spell it through the stop string")  # fmt: skip
                    self.outcomes["stop string"] += 1
                else:
                    ok = (got, result["finish_reason"]) == (want_ids, want["finish_reason"])
                    if not ok and self._tied(ids, prompt.spans, got, want_ids, params):
                        self.outcomes["tie"] += 1
                        return
                    self.expect(ok, f"{where}: answered {got} ({result['finish_reason']}), fresh {want_ids} "
                                    f"({want['finish_reason']}); slot {seen['slot']} reused {reuse}")  # fmt: skip
            if result["logprobs"] is not None and result["finish_reason"] != "stop":  # (entries of the text sent)
                listed = result["logprobs"]
                self.expect(len(listed) >= len(got), f"{where}: {len(listed)} logprob entries for {len(got)} tokens")
                # each the fresh model's raw log_softmax at its position (the answer's ids fed after the prompt)
                logits = self.ref.model.forward(ids + got, 0, self.features_of(prompt.spans), all_logits=True)
                lp = torch.log_softmax(logits.double(), dim=-1)
                for j, token in enumerate(got):
                    want_lp = max(lp[len(ids) - 1 + j, token].item(), LOGPROB_FLOOR)
                    self.expect(abs(listed[j]["logprob"] - want_lp) <= LOGPROB_TOL,
                                f"{where}: answer token {j}'s logprob {listed[j]['logprob']} vs fresh {want_lp}")  # fmt: skip
                    self.expect(len(listed[j]["top_logprobs"]) == params.logprobs, f"{where}: top_logprobs count")
                self.outcomes["answer logprobs"] += 1
        # prompt logprobs: a fresh prefill's
        if job.prompt_logprobs is not None:
            entries = result["prompt_logprobs"]
            self.expect(entries is not None and len(entries) == len(ids), f"{where}: prompt logprobs' count")
            logits = self.ref.model.forward(ids, 0, self.features_of(prompt.spans), all_logits=True)
            lp = torch.log_softmax(logits.double(), dim=-1)
            for j in range(1, len(ids)):
                want = max(lp[j - 1, ids[j]].item(), LOGPROB_FLOOR)
                gotv = entries[j]["logprob"]
                self.expect(abs(gotv - want) <= LOGPROB_TOL, f"{where}: prompt token {j}'s logprob {gotv} vs fresh {want}")
                self.expect(len(entries[j]["top_logprobs"]) == job.prompt_logprobs, f"{where}: top count at {j}")
            self.outcomes["prompt logprobs"] += 1

    def check_totals(self, job: Job, results: list[dict], done: dict) -> None:
        firsts = [r for r in results if r["index"] % job.choices == 0]
        u = done["usage"]
        self.expect(u["prompt_tokens"] == sum(len(p.ids) for p in job.prompts), "the request's prompt_tokens")
        self.expect(u["completion_tokens"] == sum(len(r["token_ids"]) for r in results), "the request's completion_tokens")
        self.expect(u["prompt_tokens_details"]["cached_tokens"] == sum(r["usage"]["prompt_tokens_details"]["cached_tokens"]
                                                                      for r in firsts), "the request's cached_tokens")  # fmt: skip

    # ---- every slot's cache --------------------------------------------------------------------
    def check_slots(self) -> None:
        model = self.worker.model
        probe = self.live.tokenizer.encode(" probe")[:1]
        for slot in self.worker.slots.slots:
            s = slot.session
            held = list(s.ids[: s.start_pos])
            if not held:
                continue
            spans = slot.spans
            self.expect(all(sp.end <= len(held) for sp in spans), f"slot {slot.index}: a picture past its cache")
            img_starts = [i for i, t in enumerate(held) if t == self.worker.prompts.builder.img_start_id]
            # every picture run of its cache is a picture's, or none is (a prompt of token ids spelled them)
            self.expect(img_starts == [sp.start for sp in spans] or not spans,
                        f"slot {slot.index}: picture runs {img_starts} vs spans {[sp.start for sp in spans]}")  # fmt: skip
            s.activate_kv_cache()
            got = model.forward(probe, len(held)).clone()
            want = self.ref.model.forward(held + probe, 0, self.features_of(spans))
            scale = max(want.abs().max().item(), 1e-6)
            diff = (got - want).abs().max().item()
            self.expect(diff <= TOL * scale, f"slot {slot.index}: its cache of {len(held)} tokens differs from a "
                                             f"fresh prefill by {diff:.3g} (scale {scale:.3g})")  # fmt: skip
        self.outcomes["slot checks"] += 1
