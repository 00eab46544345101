"""The one-line summaries around an answer: the stats line after it (`format_stats`), a server's
own numbers for /stats (`format_server_numbers`), an attachment's cost (`format_attach_line`), and
the numbers in them (`percent`, `format_bytes`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from rich.cells import cell_len

from ..files import visible


def _count(n: float) -> str:
    return f"{int(n):,}"


def _rate(per_s: float) -> str:
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}"


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 10 else f"{s:,.1f} s"


def percent(fraction: float) -> str:
    return f"{int(fraction * 100 + 0.5)} %"  # half up, unlike round()


def format_bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


# Fields of the stats line, most wanted first: a narrow terminal drops them from the end.
_STATS_PRIORITY = ("decode", "context", "ttft", "server", "prefill", "vision", "peak")


def format_stats(
    timing: Mapping[str, Any] | None,
    usage: Mapping[str, Any] | None = None,
    context_used: int | None = None,
    context_limit: int | None = None,
    peak_mem_bytes: int | None = None,
    device: Any = None,
    width: int | None = None,
    approximate: bool = False,
) -> str:
    """One line after an answer; parts whose numbers are missing are left out.

    `vision 0.41 s · prefill 2,310 tok @ 5,120 tok/s · ttft 0.52 s · decode 41.3 tok/s ·
    context 2,480/8,192 (30 %) · peak 1.2 GiB GPU`. Vision is left out when it took no time
    (a text-only turn); decode tokens fall back to usage["completion_tokens"]. With `width`, the
    line fits it: the context shrinks to its percentage, then the least wanted fields go (peak,
    vision, prefill, ttft, context), and the decode rate stays. `approximate`: the context numbers
    are estimates (shown with ≈). A server's own numbers (`timing["server"]`) are labelled
    `server: prompt 812 tok (790 cached)`; the decode rate is the server's where it measured one
    (`decode 81.4 tok/s (server)`), else the client's.
    """
    timing = timing or {}
    usage = usage or {}
    parts: dict[str, tuple[str, str]] = {}  # name -> (full, short)

    def add(name: str, full: str, short: str | None = None) -> None:
        parts[name] = (full, short or full)

    vision_s = timing.get("vision_s")
    if vision_s:
        add("vision", f"vision {_seconds(vision_s)}")

    prefill_tokens, prefill_s = timing.get("prefill_tokens"), timing.get("prefill_s")
    if prefill_tokens is not None:
        text = f"prefill {_count(prefill_tokens)} tok"
        if prefill_s:
            text += f" @ {_rate(prefill_tokens / prefill_s)} tok/s"
        add("prefill", text)
    elif prefill_s is not None:
        add("prefill", f"prefill {_seconds(prefill_s)}")

    if timing.get("ttft_s") is not None:
        add("ttft", f"ttft {_seconds(timing['ttft_s'])}")

    decode_rate = timing.get("decode_tokens_per_s")
    decode_tokens = timing.get("decode_tokens", usage.get("completion_tokens"))
    if decode_rate is None and decode_tokens is not None and timing.get("decode_s"):
        decode_rate = decode_tokens / timing["decode_s"]
    # a server's own decode rate (llama.cpp's, serve's `timings.predicted_per_second`): the client's
    # measure is how fast pieces arrived, which buffering bunches (15,045 tok/s read, 932 decoded)
    server_rate = (timing.get("server") or {}).get("predicted_per_second")
    if decode_tokens == 0:
        pass  # one token, or one piece of a server's answer (cut by a kill): no decode to measure, not "0.0 tok/s"
    elif isinstance(server_rate, (int, float)) and not isinstance(server_rate, bool) and server_rate > 0:
        add("decode", f"decode {_rate(server_rate)} tok/s (server)")
    elif decode_rate is not None:
        add("decode", f"decode {_rate(decode_rate)} tok/s")
    elif decode_tokens is not None:
        add("decode", f"decode {_count(decode_tokens)} tok")

    about = "≈" if approximate else ""
    if context_used is not None and context_limit:
        share = percent(context_used / context_limit)
        add("context", f"context {about}{_count(context_used)}/{_count(context_limit)} ({share})", f"context {about}{share}")
    elif context_used is not None and approximate:
        add("context", f"context {about}{_count(context_used)}")

    server = timing.get("server") or {}
    if isinstance(server.get("prompt_tokens"), int):
        cached = server.get("cached_tokens")
        text = f"server: prompt {_count(server['prompt_tokens'])} tok"
        add("server", text + (f" ({_count(cached)} cached)" if isinstance(cached, int) else ""), text)

    if peak_mem_bytes:
        where = str(device or "")
        where = "GPU" if where.startswith("cuda") else "RAM" if where == "cpu" else where
        add("peak", f"peak {format_bytes(peak_mem_bytes)}" + (f" {where}" if where else ""))

    order = list(parts)  # display order
    kept = sorted(parts, key=_STATS_PRIORITY.index)
    while True:
        for form in (0, 1):
            line = " · ".join(parts[name][form] for name in order if name in kept)
            if width is None or cell_len(line) <= width or len(kept) <= 1:
                return line
        kept.pop()


# What a server reported about an answer (chat/remote_numbers.py `timing["server"]`), in /stats.
_SERVER_NUMBERS = (
    ("prompt_tokens", "prompt {:,} tokens"),
    ("cached_tokens", "{:,} cached"),
    ("completion_tokens", "answer {:,} tokens"),
    ("prompt_ms", "prompt {:,.0f} ms"),
    ("prompt_per_second", "prefill {:,.0f} tok/s"),
    ("predicted_per_second", "decode {:,.1f} tok/s"),
)


def format_server_numbers(server: Mapping[str, Any] | None) -> str:
    """`prompt 812 tokens · 790 cached · answer 12 tokens · decode 81.3 tok/s` (what is there)."""
    if not server:
        return ""
    parts = []
    for key, form in _SERVER_NUMBERS:
        value = server.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(form.format(value))
    if isinstance(server.get("finish_reason"), str):
        parts.append(f"finish {visible(server['finish_reason'])}")
    return " · ".join(parts)


def format_attach_line(
    kind: str,
    name: str | Path,
    size_or_frames: tuple[int, int] | int | str | None,
    tiles: int | None,
    tokens: int | None,
    context_fraction: float | None,
    approximate: bool = False,
) -> str:
    """`+ image cat.jpg 1920×1080 → 9 tiles · 2,304 tokens · context 14 %`.

    `size_or_frames`: (width, height) for an image, a frame count for a video (or any text).
    `approximate`: the token numbers are estimates (`≈2,304 tokens`).
    """
    about = "≈" if approximate else ""
    head = f"+ {kind} {name.name if isinstance(name, Path) else name}"
    if isinstance(size_or_frames, tuple):
        head += f" {size_or_frames[0]}×{size_or_frames[1]}"
    elif isinstance(size_or_frames, int):
        head += f" {size_or_frames} frame" + ("" if size_or_frames == 1 else "s")
    elif size_or_frames:
        head += f" {size_or_frames}"
    costs = []
    if tiles is not None:
        costs.append(f"{tiles} tile" + ("" if tiles == 1 else "s"))
    if tokens is not None:
        costs.append(f"{about}{_count(tokens)} tokens")
    if context_fraction is not None:
        costs.append(f"context {about}{percent(context_fraction)}")
    return head + (" → " + " · ".join(costs) if costs else "")
