"""A seeded state-machine fuzz of a `Session` and its KV cache (used by test_session_fuzz.py and
test_compiled.py).

`SessionFuzz(live, ref, media, folder, seed).run(steps)` drives a Session on the `live` model through
random operations: asks (short, long and tricky texts; images and videos; greedy and seeded
sampling; small max_new_tokens, so answers stop at the length limit and leave a pending token; extra
stop ids; turns that exactly fill or overflow the context), answers cancelled or abandoned mid-stream,
out of memory or Ctrl-C injected into the model, undo, retry (one cached token fed again, or now and
then the whole prompt prefilled again, as where the cache cannot be shown to hold it), clear, /system,
save then load (into a fresh Session, or an older file into the live one), stale values written past
the valid cache, and server requests on a KV slot of its own (`continue_with`) between the
conversation's turns.

Each operation states its expected outcome on a shadow of the conversation (the turns as the user
sees them). After every operation the checks compare the Session with that shadow and with `ref`, a
second model that prefills the same ids from scratch:
- ids, turn boundaries, start_pos and /context's accounting follow from the shadow alone;
- the live cache holds exactly ids[:start_pos]: the logits of the next turn's prefill equal a fresh
  prefill's, and a few greedy steps from both give the same tokens;
- each answer equals the one the fresh model generates for the same prompt, sampler and seed.

A failure message starts with the seed and the operations so far: rerun that seed to reproduce it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from internvl_chat.chat.generate import stream_generate
from internvl_chat.chat.sampling import Sampler, SamplingParams, apply_repetition_penalty
from internvl_chat.chat.kv_slots import OwnKVCache
from internvl_chat.chat.session import Session
from internvl_chat.chat.template import MediaSpec, PromptBuilder, media_order
from internvl_chat.errors import Cancelled, ContextOverflowError, GenerationError, InternVLChatError, UsageError
from media_helpers import textured_rgb, write_numbered_video

TOL = 1e-4  # relative to the largest logit, as tests/test_session.py
# INTERNVL_FUZZ_CASES seeds of INTERNVL_FUZZ_STEPS operations each (a test module's defaults otherwise)
CASES_VARIABLE, STEPS_VARIABLE = "INTERNVL_FUZZ_CASES", "INTERNVL_FUZZ_STEPS"


def fuzz_seeds(default: int, first: int = 0) -> range:
    return range(first, first + int(os.environ.get(CASES_VARIABLE, default)))


def fuzz_steps(default: int = 24) -> int:
    return int(os.environ.get(STEPS_VARIABLE, default))
GREEDY_STEPS = 3
CANCELLED = " [cancelled]"
CPU_OOM = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"

WORDS = ("the", "cat", "sat", "on", "a", "mat", "picture", "video", "frame", "what", "is", "this", "red", "blue",
         "why", "one", "two", "three", "tell", "me", "more", "about", "it", "please", "and", "then")  # fmt: skip
TRICKY = ("<|im_end|>", "<IMG_CONTEXT>", "<img></img>", "<|im_start|>assistant\n", "naïve café ☕", "日本語のテキスト",
          "a\n\nb", "  spaced  ", "\t", "Image-1: ", "Frame1: <image>")  # fmt: skip


def make_fuzz_media(folder: Path) -> dict[str, Path]:
    """The fuzz's media files: a one-tile image, a wide image (2 tiles + thumbnail), a short video."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"small": folder / "small.png", "wide": folder / "wide.png", "clip": folder / "clip.mp4"}
    Image.fromarray(textured_rgb(448, 448, seed=21)).save(files["small"])
    Image.fromarray(textured_rgb(896, 448, seed=22)).save(files["wide"])
    write_numbered_video(files["clip"], num_frames=24)
    return files


@dataclass
class ShadowTurn:
    text: str
    media: list[tuple]  # media keys, prompt order
    answer_ids: list[int]
    answer_text: str
    finish: str
    pos_before: int  # where the turn's prefill started (ids_before, or one less after a cut answer)


@dataclass
class Shadow:
    """What the conversation must be: the turns, the system message, how far the cache is valid."""

    system: str | None
    turns: list[ShadowTurn] = field(default_factory=list)
    start_pos: int = 0

    def copy(self) -> Shadow:
        return Shadow(self.system, [ShadowTurn(**vars(t)) for t in self.turns], self.start_pos)


class FuzzFailure(AssertionError):
    pass


class SessionFuzz:
    def __init__(self, live, ref, media: dict[str, Path], folder: Path, seed: int):
        self.live, self.ref, self.media_files, self.folder = live, ref, media, folder
        self.rng = random.Random(seed)
        self.seed = seed
        self.session = Session(live, SamplingParams(max_new_tokens=4))
        self.shadow = Shadow(self.session.system_message)
        self.log: list[str] = []
        self.saved: list[tuple[Path, Shadow]] = []
        self.ref_features: dict[tuple, torch.Tensor] = {}
        self.ops = 0
        self.outcomes: Counter = Counter()  # what happened, by kind: shows what a run covered
        self.slot: Session | None = None  # a server's KV slot on the same model (op_serve)
        self.prefilling_retry = False  # the retry under way prefills its whole prompt again (op_retry)
        self.main_kv: OwnKVCache | None = None  # the model's own KV tensors, which the conversation uses
        special = live.special
        self.banned = (special.img_start, special.img_end, special.img_context, special.im_start)  # as Session's sampler

    # ---- running -------------------------------------------------------------------------------
    def run(self, steps: int) -> None:
        ops = [(self.op_ask, 10), (self.op_retry, 3), (self.op_undo, 2), (self.op_clear, 1), (self.op_system, 1),
               (self.op_save_load, 2), (self.op_overflow, 1), (self.op_scribble, 1), (self.op_serve, 1)]  # fmt: skip
        choices, weights = zip(*ops)
        self.check()
        for _ in range(steps):
            op = self.rng.choices(choices, weights)[0]
            try:
                op()
                self.check()
            except FuzzFailure:
                raise
            except BaseException as e:  # noqa: BLE001 — anything unexpected is a finding, with its history
                raise self.fail(f"unexpected {type(e).__name__}: {e}") from e
            self.ops += 1

    def fail(self, message: str) -> FuzzFailure:
        history = "\n  ".join(self.log[-25:])
        return FuzzFailure(f"seed {self.seed}, op {len(self.log)}: {message}\n  recent operations:\n  {history}")

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            raise self.fail(message)

    # ---- random inputs -------------------------------------------------------------------------
    def _text(self) -> str:
        r = self.rng.random()
        if r < 0.5:
            return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 8))).capitalize() + "?"
        if r < 0.75:
            return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(30, 160)))
        return self.rng.choice(TRICKY) + " " + self.rng.choice(WORDS)

    def _media(self) -> list:
        s, kind = self.session, self.rng.choice(["none"] * 5 + ["small", "wide", "clip", "clip+small", "small+small"])
        out = []
        for part in kind.split("+"):
            if part == "none":
                continue
            if part == "clip":
                frames = self.rng.randint(1, 3)
                span = self.rng.choice([None, (0.0, 0.5)])
                m = s.describe_video(self.media_files["clip"], frames=frames, video_range=span)
            else:
                max_tiles = self.rng.choice([None, 1, 2]) if part == "wide" else None
                m = s.describe_image(self.media_files[part], max_tiles)
            out.append(m)
        if len(out) == 2 and self.rng.random() < 0.5:
            out.reverse()  # a video given before an image: the prompt still puts images first
        return out

    def _params(self, max_new: int | None = None) -> SamplingParams:
        rng = self.rng
        params = SamplingParams(max_new_tokens=max_new or rng.choice([1, 2, 3, 4, 6, 8]))
        if rng.random() < 0.5:
            params.temperature = rng.choice([0.6, 1.0, 1.5])
            params.top_p = rng.choice([1.0, 0.9, 0.5])
            params.top_k = rng.choice([0, 5, 40])
            params.seed = rng.randrange(2**31)
        if rng.random() < 0.2:
            params.repetition_penalty = rng.choice([1.2, 0.8])
        if rng.random() < 0.4:  # a share of the vocabulary: random weights rarely pick <|im_end|> themselves
            vocab = self.live.config.text.vocab_size
            params.stop_ids = tuple(sorted(rng.sample(range(vocab), int(vocab * rng.choice([0.05, 0.2, 0.5])))))
        return params

    # ---- what the conversation must be ---------------------------------------------------------
    def builder(self, shadow: Shadow | None = None) -> PromptBuilder:
        system = (shadow or self.shadow).system
        return PromptBuilder(self.live.tokenizer, system, self.live.config.tokens_per_tile)

    @staticmethod
    def _specs(keys) -> list[MediaSpec]:
        return [MediaSpec(k[0], k[2]) for k in keys]

    def _turn_ids(self, builder: PromptBuilder, index: int, text: str, keys) -> list[int]:
        specs = self._specs(keys)
        return builder.first_turn(text, specs) if index == 0 else builder.next_turn(text, specs)

    def expected_ids(self, shadow: Shadow | None = None) -> list[int]:
        shadow = shadow or self.shadow
        builder = self.builder(shadow)
        ids: list[int] = []
        for i, t in enumerate(shadow.turns):
            ids += self._turn_ids(builder, i, t.text, t.media) + t.answer_ids
        return ids

    def features_for(self, keys) -> torch.Tensor | None:
        """The fresh model's features of these media, each encoded once from the first pixels seen."""
        if not keys:
            return None
        return torch.cat([self.ref_features[k] for k in keys])

    def _remember_pixels(self, media) -> None:
        for m in media:
            key = self._key_of(m)
            if key in self.ref_features:
                continue
            if m.pixel_values is not None:
                self.ref_features[key] = self.ref.model.encode_images(m.pixel_values)
            elif self.session.turns and any(x is m for x in self.session.turns[-1].media):
                # committed: the turn kept its features, not its pixels; decode a copy as it was sent
                self.ref_features[key] = self.ref.model.encode_images(self.session._decode(dataclasses.replace(m)))

    # ---- operations ----------------------------------------------------------------------------
    def op_ask(self, max_new: int | None = None, variant: str | None = None) -> None:
        s, rng = self.session, self.rng
        text, media = self._text(), self._media()
        if not text.strip() and not media:
            text = "Hi."
        params = self._params(max_new)
        variant = variant or rng.choice(["plain"] * 8 + ["cancel", "abandon", "oom", "oom_vision", "ctrl_c", "cancel_first"])
        keys = [self._key_of(media[i]) for i in media_order([m.spec for m in media])]
        new_ids = self._turn_ids(self.builder(), len(self.shadow.turns), text, keys)
        fits = len(s.ids) + len(new_ids) + params.max_new_tokens <= s.max_context
        self.log.append(f"ask {text[:30]!r} media={keys} {self._describe(params)} {variant} (fits={fits})")
        use_default = rng.random() < 0.3
        if use_default:
            s.params = params
        self._answer(lambda cancel: s.ask(text, media, None if use_default else params, cancel), params, variant,
                     fits, new_turn=(text, keys, media))  # fmt: skip

    def op_retry(self) -> None:
        s = self.session
        params = self._params()
        variant = self.rng.choice(["plain"] * 4 + ["cancel", "abandon", "oom", "oom_twice", "ctrl_c", "cancel_first"])
        # a retry feeds its cached prompt's last token again; now and then it is made to take the path
        # kept for a cache that cannot be shown to hold the prompt: prefilling all of it again
        self.prefilling_retry = self.rng.random() < 0.25
        self.log.append(f"retry {self._describe(params)} {variant}{' (prefilling)' if self.prefilling_retry else ''}")
        if not self.shadow.turns:
            try:
                for _ in s.retry(params):
                    pass
            except UsageError as e:
                self.expect("nothing to retry" in str(e), f"retry of nothing said {e}")
                return
            raise self.fail("retry with no turns did not fail")
        last = self.shadow.turns[-1]
        new_ids = self._turn_ids(self.builder(), len(self.shadow.turns) - 1, last.text, last.media)
        before = len(s.ids) - len(last.answer_ids) - len(new_ids)
        fits = before + len(new_ids) + params.max_new_tokens <= s.max_context
        if self.prefilling_retry:
            s._cached_prompt_end = lambda turn: None
        try:
            self._answer(lambda cancel: s.retry(params, cancel), params, variant, fits, new_turn=None)
        finally:
            vars(s).pop("_cached_prompt_end", None)

    def _answer(self, start, params: SamplingParams, variant: str, fits: bool, new_turn) -> None:
        """Run one ask or retry under `variant` and check its outcome against the shadow."""
        s, rng = self.session, self.rng
        retry = new_turn is None
        before = self.shadow.copy()
        cancel = threading.Event()
        if variant == "cancel_first":
            cancel.set()
        injected = self._inject(variant, params)
        events, final, error = [], None, None
        try:
            stream = start(cancel)
            stop_after = rng.randint(1, 3)
            for event in stream:
                events.append(event)
                if event["finish_reason"] is not None:
                    final = event
                if variant == "cancel" and len(events) == stop_after:
                    cancel.set()
                if variant == "abandon" and len(events) == stop_after and final is None:
                    stream.close()
                    break
        except (InternVLChatError, KeyboardInterrupt, Cancelled, RuntimeError, MemoryError) as e:
            error = e
        finally:
            fired = injected.undo() if injected else 0
        self._remember_pixels(new_turn[2] if new_turn else [])
        kind = "retry" if retry else "ask"
        self.outcomes[f"{kind} {variant}: " + (type(error).__name__ if error else final["finish_reason"] if final else "abandoned")] += 1
        if not fits:
            self.expect(isinstance(error, ContextOverflowError), f"a turn over the context gave {error!r}")
            self._expect_one_line(error, "over the")
            # (a retry takes the old answer off before it checks, then puts it back)
            self.expect(self._same_as(before), f"{kind} over the context changed the conversation")
            return
        if error is not None:
            self.expect(fired > 0 or variant == "cancel_first", f"{kind} failed by itself: {error!r}")
            # a cancel set before the answer began stops it before the prefill: nothing is committed
            self.expect(isinstance(error, Cancelled) == (variant == "cancel_first"), f"{kind} {variant} gave {error!r}")
            if not isinstance(error, (KeyboardInterrupt, Cancelled)):  # Ctrl-C stays itself; the app prints its line
                self.expect(isinstance(error, GenerationError), f"an injected failure surfaced as {type(error).__name__}: {error}")
                self.expect("out of memory" in str(error), f"out of memory said {error}")
                self._expect_one_line(error, "out of memory")
            if retry and len(s.turns) == len(before.turns) - 1:
                self.expect(variant == "oom_twice", "a retry lost its turn though the old answer could be restored")
                before.start_pos = before.turns.pop().pos_before  # the restore failed too: as after /undo
            self.shadow = before
            return
        if final is None:  # abandoned before the last event: nothing was committed
            self.expect(variant == "abandon", f"the stream ended without a final event ({variant})")
            self.shadow = before
            return
        self._check_answer(final, events, params, variant, new_turn, before)

    def _check_answer(self, final: dict, events: list[dict], params, variant, new_turn, before: Shadow) -> None:
        """A committed answer: its ids equal the fresh model's for the same prompt and sampler."""
        answer, finish = list(final["token_ids"]), final["finish_reason"]
        retry = new_turn is None
        if retry:
            last = before.turns[-1]
            text, keys, index = last.text, last.media, len(before.turns) - 1
            pos_before = last.pos_before
            history = Shadow(before.system, before.turns[:-1])
        else:
            text, keys = new_turn[0], new_turn[1]
            index, pos_before, history = len(before.turns), before.start_pos, before
        prior = self.expected_ids(history)
        prompt = self._turn_ids(self.builder(), index, text, keys)
        want, want_finish = self.reference_answer(prior + prompt, history, keys, params)
        self.expect(len(answer) <= params.max_new_tokens, f"{len(answer)} answer tokens over max_new_tokens {params.max_new_tokens}")
        self.expect(not set(answer) & set(self.banned), f"an answer holds an image placeholder or a turn's start: {answer}")
        if finish == "cancelled":
            self.expect(variant == "cancel", "cancelled without a cancel, or after a cancel set before it began")
            self.expect(len(answer) < params.max_new_tokens, f"cancelled with {len(answer)} tokens, all that were asked for")
            same = answer == want[: len(answer)]
        else:
            same = (answer, finish) == (want, want_finish)
        if not same and self._tied(prior + prompt, answer, want, history, keys, params):
            self.outcomes["answer parted from the fresh model's at tied logits"] += 1
        else:
            self.expect(same, f"answer {answer} ({finish}) differs from the fresh model's {want} ({want_finish})")
        self.expect(final["usage"]["completion_tokens"] == len(answer), f"usage {final['usage']} for {len(answer)} tokens")
        pending = len(prior) - pos_before
        # a retry feeds its cached prompt's last token again, and nothing else (every committed turn's prompt is cached)
        fed = 1 if retry and not self.prefilling_retry else pending + len(prompt)
        kind = "retry" if retry else "ask"
        self.expect(final["usage"]["prompt_tokens"] == fed, f"{kind}: usage {final['usage']} for a prompt of {pending} + {len(prompt)}")
        self.expect(final["timing"]["prefill_tokens"] == fed, f"{kind}: {final['timing']['prefill_tokens']} tokens prefilled, not {fed}")
        streamed = "".join(e["text"] for e in events)
        decoded = self.live.tokenizer.decode(answer, skip_special_tokens=True)  # specials are never shown
        self.expect(streamed == decoded, f"streamed text {streamed!r} is not the answer's {decoded!r}")
        answer_text = streamed + (CANCELLED if streamed else CANCELLED.strip()) if finish == "cancelled" else streamed
        turn = ShadowTurn(text, keys, answer, answer_text, finish, pos_before)
        self.shadow = Shadow(before.system, history.turns + [turn])
        ids_len = len(prior) + len(prompt) + len(answer)
        self.shadow.start_pos = ids_len - (1 if finish == "length" else 0)
        self.expect(final["cache_end"] == self.shadow.start_pos, f"cache_end {final['cache_end']}, expected {self.shadow.start_pos}")

    def reference_answer(self, prompt: list[int], history: Shadow, keys, params: SamplingParams) -> tuple[list[int], str]:
        """The fresh model's answer to the whole conversation `prompt`, prefilled from position 0."""
        all_keys = [k for t in history.turns for k in t.media] + list(keys)
        features = self.features_for(all_keys)
        sampler = Sampler(params, self.ref.config.text.vocab_size, self.ref.model.device, banned_ids=self.banned)
        sampler.observe(torch.tensor(prompt))
        final = None
        for final in stream_generate(self.ref.model, self.ref.tokenizer, prompt, 0, params, sampler,
                                     image_features=features, stop_ids=self.builder().stop_ids):  # fmt: skip
            pass
        return list(final["token_ids"]), final["finish_reason"]

    def _tied(self, prompt: list[int], answer: list[int], want: list[int], history: Shadow, keys, params) -> bool:
        """Whether greedy answers part where the fresh model's two best scores are equal within the
        tolerance (chunked and whole prefills differ in the last bits: either token is right)."""
        at = next((i for i, (a, b) in enumerate(zip(answer, want)) if a != b), None)
        if not params.greedy or at is None:
            return False
        seen = prompt + want[:at]
        logits = self.ref.model.forward(seen, 0, self.features_for([k for t in history.turns for k in t.media] + list(keys)))
        logits = logits.index_fill(0, torch.tensor(self.banned), float("-inf"))
        if params.repetition_penalty != 1:
            logits = apply_repetition_penalty(logits, torch.tensor(seen), params.repetition_penalty)
        a, b = logits[answer[at]].item(), logits[want[at]].item()
        return abs(a - b) <= TOL * logits[torch.isfinite(logits)].abs().max().item()

    def _inject(self, variant: str, params: SamplingParams):
        """Make the live model fail (out of memory, or Ctrl-C) at a random call; None for other variants."""
        model, rng = self.live.model, self.rng
        if variant in ("oom", "oom_twice", "ctrl_c"):
            name, at = "forward", rng.randint(1, params.max_new_tokens + 1)
        elif variant == "oom_vision":
            name, at = "encode_images", 1
        else:
            return None
        error = KeyboardInterrupt if variant == "ctrl_c" else rng.choice(
            [lambda: RuntimeError(CPU_OOM), MemoryError, lambda: torch.OutOfMemoryError("CUDA out of memory")])
        times = 2 if variant == "oom_twice" else 1
        return Injection(model, name, at, times, error)

    def op_overflow(self) -> None:
        """A turn one token over the context, or a text long enough that the answer's limit fills it
        exactly (the conversation may then hold max_context tokens: probes, undo, retry, save and
        load of a full cache follow)."""
        s = self.session
        text, room = self._filling_text() if self.rng.random() < 0.6 else ("Hi.", self._room("Hi."))
        if 1 <= room <= 24:
            params = self._params(room)
            self.log.append(f"overflow: {len(text)} characters, exactly filled by {self._describe(params)}")
            self.outcomes["ask filling the context exactly"] += 1
            before = self.shadow.copy()
            events = list(s.ask(text, (), params))
            self._check_answer(events[-1], events, params, "plain", (text, [], []), before)
            return
        params = SamplingParams(max_new_tokens=max(room + 1, 1))
        self.log.append(f"overflow: max_new_tokens {params.max_new_tokens} for a room of {room}")
        self.outcomes["ask one token over the context"] += 1
        before = self.shadow.copy()
        try:
            for _ in s.ask(text, (), params):
                pass
        except ContextOverflowError as e:
            self._expect_one_line(e, "over the")
        else:
            raise self.fail("a turn one token over the context was answered")
        self.expect(self._same_as(before), "an overflowing turn changed the conversation")

    def _room(self, text: str) -> int:
        """The most answer tokens a next turn of `text` may ask for."""
        return self.session.max_context - len(self.session.ids) - len(self._turn_ids(self.builder(), len(self.shadow.turns), text, []))

    def _filling_text(self) -> tuple[str, int]:
        """Words enough to leave a room of at most 24 answer tokens (or "Hi." when even that overflows)."""
        words, room = ["Hi."], self._room("Hi.")
        while room > 24:
            words += [self.rng.choice(WORDS) for _ in range(max(1, (room - 12) // 3))]
            room = self._room(" ".join(words))
        while room < 1 and len(words) > 1:
            words.pop()
            room = self._room(" ".join(words))
        return " ".join(words), room

    def op_undo(self) -> None:
        self.log.append("undo")
        self.outcomes["undo" + ("" if self.shadow.turns else " of nothing")] += 1
        if not self.shadow.turns:
            try:
                self.session.undo()
            except UsageError as e:
                self.expect("nothing to undo" in str(e), f"undo of nothing said {e}")
                return
            raise self.fail("undo with no turns did not fail")
        removed = self.shadow.turns.pop()
        self.session.undo()
        self.shadow.start_pos = removed.pos_before

    def op_clear(self) -> None:
        self.log.append("clear")
        self.outcomes["clear"] += 1
        self.session.clear()
        self.shadow = Shadow(self.shadow.system)

    def op_system(self) -> None:
        s = self.session
        text = self.rng.choice([None, "", "Be brief.", "You are a careful assistant. " * 3, "Long system. " * 400])
        oom = self.rng.random() < 0.15 and bool(self.shadow.turns)
        self.log.append(f"system {str(text)[:20]!r}{' (out of memory)' if oom else ''}")
        ids = self.expected_ids(Shadow(text, self.shadow.turns))
        injected = Injection(self.live.model, "forward", 1, 1, lambda: RuntimeError(CPU_OOM)) if oom else None
        self.outcomes[f"system, {len(self.shadow.turns)} turns" if len(ids) <= s.max_context else "system over the context"] += 1
        try:
            s.set_system(text)
        except ContextOverflowError as e:
            self.expect(len(ids) > s.max_context, f"/system refused a conversation of {len(ids)} tokens: {e}")
            self._expect_one_line(e, "over the")
            return
        except GenerationError as e:
            self.expect(oom, f"/system failed by itself: {e}")
            self._expect_one_line(e, "so it was cleared")
            self.shadow = Shadow(self.shadow.system)  # the prefill failed: the conversation is cleared
            return
        finally:
            if injected:
                injected.undo()
        self.expect(not oom, "/system did not prefill the conversation again")
        self.expect(len(ids) <= s.max_context, f"/system took a conversation of {len(ids)} tokens")
        if self.shadow.turns:
            self._replayed(Shadow(text, self.shadow.turns))
        else:
            self.shadow.system = text

    def _replayed(self, shadow: Shadow) -> None:
        """After a whole-conversation prefill every turn starts where its ids do, and all is cached."""
        builder = self.builder(shadow)
        position = 0
        for i, t in enumerate(shadow.turns):
            t.pos_before = position
            position += len(self._turn_ids(builder, i, t.text, t.media)) + len(t.answer_ids)
        shadow.start_pos = position
        self.shadow = shadow

    def op_save_load(self) -> None:
        s, rng = self.session, self.rng
        r = rng.random()
        if r < 0.5 or not self.saved:
            path = self.folder / f"session-{self.seed}-{len(self.log)}.json"
            s.save(path)
            self.saved.append((path, self.shadow.copy()))
            fresh = Session(self.live, s.params)
            oom = rng.random() < 0.1 and bool(self.shadow.turns)
            self.log.append(f"save {path.name}, load into a fresh Session{' (out of memory)' if oom else ''}")
            expected_logits = self.probe_logits()[0] if self.shadow.turns else None
            self._load(fresh, path, self.shadow.copy(), oom)
            if expected_logits is not None and self.session is fresh and self.shadow.turns:
                got = self.probe_logits()[0]
                self._close(got[-1:], expected_logits[-1:], "next-token logits after save and load")
        else:
            path, shadow = rng.choice(self.saved)
            self.log.append(f"load {path.name} into the live Session")
            self._load(s, path, shadow.copy(), False)

    def _load(self, target: Session, path: Path, shadow: Shadow, oom: bool) -> None:
        what = "into a fresh Session" if target is not self.session else "into the live Session"
        self.outcomes[f"load {what}{' (out of memory)' if oom else ''}, {len(shadow.turns)} turns"] += 1
        injected = Injection(self.live.model, "forward", 1, 1, MemoryError) if oom else None
        try:
            target.load(path)
        except GenerationError as e:
            self.expect(oom, f"load failed by itself: {e}")
            self._expect_one_line(e, "so it was cleared")
            self.session, self.shadow = target, Shadow(target.system_message)
            return
        finally:
            if injected:
                injected.undo()
        self.expect(not oom, "load did not prefill the conversation")
        self.session = target  # the model's one cache now holds the loaded conversation
        self._replayed(shadow)

    def op_serve(self) -> None:
        """A server request on a slot with KV tensors of its own (serve/slots.py's use of a Session):
        the conversation so far as text only, plus a question; the slot keeps the longest prefix it
        shares with its last request. Its answer must be the fresh model's, and the conversation's
        own cache must be untouched by it."""
        model = self.live.model
        if self.slot is None:
            self.main_kv = OwnKVCache(model, share_model_cache=True)
            self.slot = Session(self.live)
            self.slot.own_kv_cache()
        builder, ids = self.builder(), []
        for i, t in enumerate(self.shadow.turns):
            ids += self._turn_ids(builder, i, t.text, []) + t.answer_ids
        ids += self._turn_ids(builder, len(self.shadow.turns), self._text(), [])
        params = self._params()
        reuse = min(self.slot.cached_prefix(ids), len(ids) - 1)
        fits = len(ids) + params.max_new_tokens <= model.max_seq_len
        self.log.append(f"serve request of {len(ids)} tokens reusing {reuse}, {self._describe(params)} (fits={fits})")
        self.outcomes["serve request" + ("" if fits else " over the context") + (", prefix reused" if reuse else "")] += 1
        self.slot.activate_kv_cache()
        try:
            events = list(self.slot.continue_with(ids, reuse, None, params))
        except ContextOverflowError as e:
            self.expect(not fits, f"a request of {len(ids)} + {params.max_new_tokens} tokens was refused: {e}")
            self._expect_one_line(e, "over the")
            return
        finally:
            self.main_kv.activate(model)
        self.expect(fits, "a request over the context was answered")
        want, want_finish = self.reference_answer(ids, Shadow(self.shadow.system), [], params)
        final = events[-1]
        same = (final["token_ids"], final["finish_reason"]) == (want, want_finish)
        if not same and self._tied(ids, final["token_ids"], want, Shadow(self.shadow.system), [], params):
            return
        self.expect(same, f"the slot answered {final['token_ids']} ({final['finish_reason']}), the fresh model {want} ({want_finish})")
        answer = final["token_ids"]
        end = len(ids) + len(answer) - (1 if final["finish_reason"] == "length" else 0)
        self.expect((self.slot.ids, self.slot.start_pos) == (ids + answer, end), "the slot's ids or start_pos")

    def op_scribble(self) -> None:
        """Stale values past the valid cache (a server slot, an abandoned answer) must never be read."""
        s = self.session
        self.log.append("scribble past start_pos")
        self.outcomes["scribble"] += 1
        g = torch.Generator().manual_seed(self.rng.randrange(2**31))
        with torch.inference_mode():
            for k, v in self.live.model.language_model.caches():
                for t in (k, v):
                    tail = t[:, :, s.start_pos :]
                    tail.copy_(torch.randn(tail.shape, generator=g, dtype=tail.dtype) * 3)

    # ---- checks --------------------------------------------------------------------------------
    def _describe(self, params: SamplingParams) -> str:
        how = "greedy" if params.greedy else f"T{params.temperature} p{params.top_p} k{params.top_k} seed {params.seed}"
        extra = f" penalty {params.repetition_penalty}" if params.repetition_penalty != 1 else ""
        stops = f" {len(params.stop_ids)} stop ids" if params.stop_ids else ""
        return f"max_new {params.max_new_tokens} {how}{extra}{stops}"

    def _expect_one_line(self, error: BaseException, words: str) -> None:
        text = str(error)
        self.expect(words in text and "\n" not in text, f"not a one-line error naming {words!r}: {text!r}")

    def _same_as(self, before: Shadow) -> bool:
        s = self.session
        return (len(s.turns) == len(before.turns) and s.start_pos == before.start_pos
                and s.ids == self.expected_ids(before))  # fmt: skip

    def check(self) -> None:
        s, shadow = self.session, self.shadow
        self.expect(s.system_message == shadow.system, f"system {s.system_message!r}, expected {shadow.system!r}")
        ids = self.expected_ids()
        self.expect(s.ids == ids, f"ids differ from the conversation's ({len(s.ids)} vs {len(ids)})")
        self.expect(s.start_pos == shadow.start_pos, f"start_pos {s.start_pos}, expected {shadow.start_pos}")
        self.expect(len(s.turns) == len(shadow.turns), f"{len(s.turns)} turns, expected {len(shadow.turns)}")
        builder, position = self.builder(), 0
        for i, (turn, want) in enumerate(zip(s.turns, shadow.turns)):
            where = f"turn {i + 1}"
            prompt = self._turn_ids(builder, i, want.text, want.media)
            keys = [self._key_of(m) for m in turn.media]
            self.expect((turn.user_text, keys) == (want.text, want.media), f"{where}: text or media differ")
            self.expect(turn.answer_ids == want.answer_ids, f"{where}: answer {turn.answer_ids}, expected {want.answer_ids}")
            self.expect((turn.answer_text, turn.finish_reason) == (want.answer_text, want.finish),
                        f"{where}: answer text {turn.answer_text!r} ({turn.finish_reason}), expected {want.answer_text!r} ({want.finish})")  # fmt: skip
            self.expect(turn.ids_before == position and turn.pos_before == want.pos_before,
                        f"{where}: begins at {turn.ids_before}/{turn.pos_before}, expected {position}/{want.pos_before}")  # fmt: skip
            self.expect(turn.prompt_ids == prompt, f"{where}: prompt ids differ")
            self._check_features(turn, want, where)
            position += len(prompt) + len(want.answer_ids)
        pending = len(ids) - s.start_pos
        cut = bool(shadow.turns) and shadow.turns[-1].finish == "length"
        self.expect(pending == 0 or (pending == 1 and cut), f"{pending} tokens past the cache")
        self._check_accounting(ids)
        self._check_cache(ids)

    def _key_of(self, media) -> tuple:
        """What identifies a Media's pixels in this fuzz: its file, and its tiles or frames and range."""
        name = next(n for n, p in self.media_files.items() if p.resolve() == Path(media.path).resolve())
        if media.kind == "video":
            key = ("video", name, media.frames, tuple(media.video_range) if media.video_range else None)
        else:
            key = ("image", name, media.tiles)
        return key

    def _check_features(self, turn, want: ShadowTurn, where: str) -> None:
        expected = self.features_for(want.media)
        if expected is None:
            self.expect(turn.features is None, f"{where}: features without media")
            return
        self.expect(turn.features is not None and turn.features.shape == expected.shape, f"{where}: features of the wrong shape")
        self._close(turn.features.float(), expected.float(), f"{where}: image features")

    def _check_accounting(self, ids: list[int]) -> None:
        """What /context shows adds up to the ids, and the next turn fits exactly when the budget says."""
        s = self.session
        builder = self.builder()
        items = s.context_items([])
        self.expect(s.context_used == len(ids), f"context_used {s.context_used} for {len(ids)} ids")
        system = len(builder.first_turn("", [])) - len(builder.user_turn("", []))
        rows = [n for n, _ in items]
        turn_rows = [(n, v) for n, v in items if n.startswith("turn ")]
        self.expect(len(turn_rows) == len(self.shadow.turns), f"/context lists {len(turn_rows)} turns: {rows}")
        held = sum(v for n, v in items if n.startswith(("turn ", "system message")))
        self.expect(held == (len(ids) if ids else system), f"/context's items hold {held}, the ids {len(ids)}")
        for (name, _), t in zip(turn_rows, self.shadow.turns):
            self.expect(f"answer {len(t.answer_ids):,})" in name, f"/context row {name!r}: answer of {len(t.answer_ids)}")
        next_ids = self._turn_ids(builder, len(self.shadow.turns), "", [])
        planned = sum(v for _, v in items)
        self.expect(planned == len(ids) + len(next_ids) + s.params.max_new_tokens, f"/context plans {planned}")
        fits = planned < s.max_context  # a message is never empty: it takes a token at least
        try:
            s.check_attach([])
            self.expect(fits, f"check_attach accepted {planned} tokens over {s.max_context}")
        except ContextOverflowError:
            self.expect(not fits, f"check_attach refused {planned} tokens within {s.max_context}")

    def probe_logits(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Logits of the live session for what its next turn would prefill (or, in a full context, for
        its last cached token fed again), and the greedy steps after them; the live cache is put back
        as it was, so checking never changes what the session does next."""
        s = self.session
        ids = s.ids
        probe = self._turn_ids(self.builder(), len(self.shadow.turns), "Probe?", [])
        start = s.start_pos
        feed = ids[start:] + probe
        if start + len(feed) + GREEDY_STEPS > s.max_context:
            start = max(s.start_pos - 1, 0)
            feed = ids[start:]
            if not feed:
                return torch.empty(0), torch.empty(0), start
        lm = self.live.model.language_model
        kept = [(k.clone(), v.clone()) for k, v in lm.caches()]
        try:
            rows = self.live.model.forward(feed, start, all_logits=True).clone()
            steps = self._greedy(self.live.model, rows[-1], start + len(feed))
        finally:
            with torch.inference_mode():
                for (k, v), (k0, v0) in zip(lm.caches(), kept):
                    k.copy_(k0)
                    v.copy_(v0)
        return rows, steps, start

    def _greedy(self, model, logits: torch.Tensor, pos: int) -> torch.Tensor:
        out = [logits]
        for i in range(min(GREEDY_STEPS, model.max_seq_len - pos)):
            token = out[-1].argmax().view(1)
            out.append(model.forward(token, pos + i).clone())
        return torch.stack(out)

    def _check_cache(self, ids: list[int]) -> None:
        if not ids and self.rng.random() < 0.5:
            return
        live_rows, live_steps, start = self.probe_logits()
        if not live_rows.numel():
            return
        s = self.session
        probe = self._turn_ids(self.builder(), len(self.shadow.turns), "Probe?", [])
        whole = ids + probe if start == s.start_pos else ids
        features = self.features_for([k for t in self.shadow.turns for k in t.media])
        fresh_rows = self.ref.model.forward(whole, 0, features, all_logits=True)[start:]
        self._close(live_rows, fresh_rows, f"the live cache's logits (from position {start}) vs a fresh prefill")
        fresh_steps = self._greedy(self.ref.model, fresh_rows[-1], len(whole))
        for i in range(1, len(live_steps)):
            a, b = int(live_steps[i - 1].argmax()), int(fresh_steps[i - 1].argmax())
            if a != b:
                top = fresh_steps[i - 1].topk(2).values
                tied = (top[0] - top[1]).item() <= TOL * top.abs().max().item()
                self.expect(tied, f"greedy step {i}: live token {a}, fresh {b}")
                return
            self._close(live_steps[i], fresh_steps[i], f"greedy step {i}'s logits")

    def _close(self, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        self.expect(got.shape == want.shape, f"{what}: shapes {tuple(got.shape)} vs {tuple(want.shape)}")
        scale = max(want.abs().max().item(), 1e-6)
        diff = (got - want).abs().max().item()
        self.expect(diff <= TOL * scale, f"{what}: differ by {diff:.3g} (scale {scale:.3g})")


class Injection:
    """`owner.name` raises `make_error()` on calls at..at+times-1, then behaves again; `undo()` puts the
    original back and returns how many calls failed."""

    def __init__(self, owner, name: str, at: int, times: int, make_error):
        self.owner, self.name, self.fired = owner, name, 0
        original, calls = getattr(owner, name), [0]

        def flaky(*a, **k):
            calls[0] += 1
            if at <= calls[0] < at + times:
                self.fired += 1
                raise make_error()
            return original(*a, **k)

        setattr(owner, name, flaky)

    def undo(self) -> int:
        delattr(self.owner, self.name)
        return self.fired
