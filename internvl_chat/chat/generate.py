"""The streaming generator: prefill a turn's new tokens, then decode token by token.

It keeps the contract of the original demo's stream generator (events with "text", "usage",
"finish_reason", "timing") and improves it: "text" is the new text since the previous event
(UTF-8 safe, never a broken character), "cancelled" is a finish reason, timing separates vision,
prefill and decode, and the final event says exactly what reached the KV cache.

Decode overlaps host and device work: the forward pass for token n is queued before token n is
read back to the host, so on CUDA the GPU is busy while Python detokenizes. A stop token's
speculative K/V lands beyond the valid cache and is simply overwritten later.

With log-probabilities asked for (`params.logprobs`), each event also has "logprobs": the
TokenLogprob of each token whose text the event completes, with where that text ends in the
event's "text" (see `TokenEnds`); a stop token is not listed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence

import torch

from ..engine.model import InternVLModel, PromptScores
from ..engine.out_of_memory import is_out_of_memory
from ..errors import GenerationError
from .detokenize import IncrementalDetokenizer
from .sampling import Sampler, SamplingParams, TokenLogprob


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


OUT_OF_MEMORY_ADVICE = "use fewer tiles or frames, a smaller --max-context, or a 4-bit model"
# decoding and tiling pictures and videos: the model's size and the context do not matter there
MEDIA_ADVICE = "attach fewer or smaller pictures, or use fewer tiles or frames"


@contextlib.contextmanager
def out_of_memory_as_error(during: str, advice: str = OUT_OF_MEMORY_ADVICE) -> Iterator[None]:
    """Running out of memory in the block becomes one GenerationError line (the turn can be asked
    again); any other error passes through."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise GenerationError(f"out of memory {during}; {advice}") from None


class TokenEnds:
    """Generated tokens' log-probabilities grouped with the text they produce: each is given as
    (TokenLogprob, end), `end` being where its text ends in the event's text. A token whose bytes
    stop inside a character waits for the token that completes it: its text is given with that one's."""

    def __init__(self) -> None:
        self._waiting: list[TokenLogprob] = []
        self._done: list[tuple[TokenLogprob, int]] = []

    def add(self, entry: TokenLogprob, text_len: int, holding: bool) -> None:
        """A token pushed to the detokenizer; `text_len`: the event's text so far, `holding`: the detokenizer's."""
        self._waiting.append(entry)
        if not holding:
            self.settle(text_len)

    def settle(self, text_len: int) -> None:
        """Every waiting token's text ends at `text_len` (all of it is given)."""
        self._done.extend((entry, text_len) for entry in self._waiting)
        self._waiting.clear()

    def take(self) -> list[tuple[TokenLogprob, int]]:
        """The tokens settled since the last take, for the event about to be given."""
        done, self._done = self._done, []
        return done


def stream_generate(
    model: InternVLModel,
    tokenizer,
    prompt_ids: Sequence[int],
    start_pos: int,
    params: SamplingParams,
    sampler: Sampler,
    image_features: torch.Tensor | None = None,
    stop_ids: Sequence[int] = (),
    stream_interval: int = 1,
    cancel: threading.Event | None = None,
    vision_s: float = 0.0,
    scores: PromptScores | None = None,
) -> Iterator[dict]:
    """Yield text events (`scores`: the prompt's tokens are scored into it as it is prefilled);
    the last one has a finish_reason and these extra keys:

    - "token_ids": the generated ids, stop token excluded;
    - "cache_end": how far the KV cache is valid afterwards (prompt + fed answer tokens);
      generated ids beyond it (at most one: the token that hit the length limit) are not cached;
    - with logprobs asked for, "stop_logprob": the stop token's TokenLogprob where one ended the answer, else None.
    """
    device = model.device
    stops = set(stop_ids) | set(params.stop_ids)
    detok = IncrementalDetokenizer(tokenizer)
    prompt_len = len(prompt_ids)
    generated: list[int] = []
    pending_text = ""
    since_emit = 0
    ends = TokenEnds() if sampler.params.logprobs is not None else None

    def usage() -> dict:
        return {"prompt_tokens": prompt_len, "completion_tokens": len(generated), "total_tokens": prompt_len + len(generated)}

    t0 = time.perf_counter()
    with out_of_memory_as_error("during generation"):
        logits = model.forward(prompt_ids, start_pos, image_features, cancel=cancel, scores=scores)  # chunked: may raise Cancelled
        pos = start_pos + prompt_len
        token = sampler.next_token(logits)
        t_first = None
        decode_start = None
        finish = None
        while finish is None:
            # queue the next forward before reading this token back (see module docstring)
            room = len(generated) + 1 < params.max_new_tokens and pos < model.max_seq_len
            next_logits = model.forward(token, pos) if room else None
            token_id = sampler.read(token)  # the one host sync per token; raises on non-finite logits
            now = time.perf_counter()
            if t_first is None:
                t_first = decode_start = now
            if token_id in stops:
                finish = "stop"
                break
            generated.append(token_id)
            if room:
                pos += 1
            pending_text += detok.push(token_id)
            if ends is not None:
                ends.add(sampler.last_logprob, len(pending_text), detok.holding)
            since_emit += 1
            if not room:
                finish = "length"
            elif cancel is not None and cancel.is_set():
                finish = "cancelled"
            else:
                if since_emit >= stream_interval and pending_text:
                    event = {"text": pending_text, "usage": usage(), "finish_reason": None, "timing": None}
                    if ends is not None:
                        event["logprobs"] = ends.take()
                    yield event
                    pending_text, since_emit = "", 0
                    if cancel is not None and cancel.is_set():
                        # set while this event was read (serve's stop string in it, a client gone):
                        # sampling one more token would count and cache a token of no answer
                        finish = "cancelled"
                        break
                token = sampler.next_token(next_logits)
        _sync(device)
        end = time.perf_counter()
        pending_text += detok.flush()  # it may allocate too: the same one line, not a traceback
    prefill_s = (t_first or end) - t0
    decode_tokens = max(len(generated) - 1, 0)  # the first token belongs to the prefill
    decode_s = end - (decode_start or end)
    timing = {
        "vision_s": vision_s,
        "prefill_tokens": prompt_len,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": prompt_len / prefill_s if prefill_s > 0 else 0.0,
        "ttft_s": vision_s + prefill_s,
        "decode_tokens": decode_tokens,
        "decode_s": decode_s,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
    }
    final = {
        "text": pending_text,
        "usage": usage(),
        "finish_reason": finish,
        "timing": timing,
        "token_ids": generated,
        "cache_end": pos,
    }
    if ends is not None:
        ends.settle(len(pending_text))
        final["logprobs"] = ends.take()
        # the stop token is in no event's list; /v1/completions lists it, as vLLM does
        final["stop_logprob"] = sampler.last_logprob if finish == "stop" else None
    yield final
