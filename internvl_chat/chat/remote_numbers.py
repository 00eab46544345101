"""The numbers a server reports, kept only where well-formed: a model card's context length
(`context_of`), an answer's usage (`clean_usage`) and timings; and the answer's timing measured
here (`answer_timing`: time to first token, decode speed, the server's own numbers under "server")."""

from __future__ import annotations

MAX_USAGE_COUNT = 1 << 31  # a token count beyond any context: a broken server's usage
FINISH_REASONS = {"stop": "stop", "eos": "stop", "tool_calls": "stop", "content_filter": "stop", "length": "length"}


def context_of(card: dict) -> int | None:
    """The context length a model card states: `max_model_len` (vLLM, SGLang, serve) or llama.cpp's `meta.n_ctx`."""
    meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}
    for value in (card.get("max_model_len"), meta.get("n_ctx")):
        if _is_count(value) and value > 0:  # beyond 2**31 tokens: a broken card, not a context
            return value
    return None


def clean_usage(usage: dict | None, max_answer: int | None = None, context: int | None = None) -> dict | None:
    """The server's usage with only well-formed counts (prompt, completion, total, cached); None when
    a count is impossible for the request made (a prompt past the server's `context`, an answer
    past the `max_answer` tokens asked for): such a count would be shown and enforced as the context
    used, refusing every later turn. Cached tokens past the prompt are left out."""
    if not usage:
        return None
    out = {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if _is_count(usage.get(k))}
    if _over(out.get("prompt_tokens"), context) or _over(out.get("completion_tokens"), max_answer):
        return None
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and _is_count(details.get("cached_tokens")) \
            and not _over(details["cached_tokens"], out.get("prompt_tokens")):  # fmt: skip
        out["cached_tokens"] = details["cached_tokens"]
    return out or None


def _over(count: int | None, limit: int | None) -> bool:
    return count is not None and limit is not None and count > limit


def _is_count(value: object) -> bool:
    """A token count a request can have: an int (not a bool), 0 ≤ n < 2**31."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_USAGE_COUNT


def _is_measure(value: object) -> bool:
    """A number of the server's timings (ms, tokens, tokens/s): 0 ≤ x < 2**31. Compared, not passed
    to math.isfinite, which raises for an int too large for a float; NaN fails the comparison."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < MAX_USAGE_COUNT


def answer_timing(t0, t_first, t_last, end, chunks, usage, server_timings, raw_finish) -> dict:
    """Client-measured TTFT and decode speed; the server's own numbers under "server"."""
    timing: dict = {"request_s": end - t0}
    if t_first is not None:
        timing["ttft_s"] = t_first - t0
        completion = (usage or {}).get("completion_tokens", chunks)
        decode_tokens = max(completion - 1, 0)  # the first token belongs to the time to first token
        decode_s = (t_last or t_first) - t_first
        timing.update(decode_tokens=decode_tokens, decode_s=decode_s,
                      decode_tokens_per_s=decode_tokens / decode_s if decode_s > 0 else 0.0)  # fmt: skip
    server: dict = dict(usage or {})
    if server_timings:
        for key in ("cache_n", "prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second"):
            value = server_timings.get(key)
            if _is_measure(value):
                server[key] = value
    if raw_finish and raw_finish not in FINISH_REASONS:
        server["finish_reason"] = raw_finish
    if server:
        timing["server"] = server
    return timing
