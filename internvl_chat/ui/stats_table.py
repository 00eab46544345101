"""`/stats`: the last answer's numbers, one row each (the stats line after an answer is summary_lines.py's
`format_stats`)."""

from __future__ import annotations

from typing import Any

from ..chat.conversation import BackendInfo
from ..files import visible
from ..numbers import counted
from .summary_lines import format_bytes, format_server_numbers


def stats_rows(turn: Any, info: BackendInfo, context_used: int, limit: int | None, approx: str,
               peak: int | None) -> list[tuple[str, str]]:  # fmt: skip
    """(label, value) rows for a turn answered in this run (it has timings); `approx` marks token
    numbers that are estimates, `peak` is the answer's peak memory in bytes."""
    t = turn.timing
    rows = [("finish", str(turn.finish_reason))]
    if t.get("vision_s"):  # as the stats line: no row when no picture was encoded
        rows.append(("vision", f"{t['vision_s']:.3f} s"))
    if "prefill_tokens" in t:
        rows.append(("prefill", f"{counted(t['prefill_tokens'], 'token')} in {t.get('prefill_s', 0):.3f} s"
                                f" ({t.get('prefill_tokens_per_s', 0):,.0f} tok/s)"))  # fmt: skip
    if "ttft_s" in t:
        rows.append(("time to first token", f"{t['ttft_s']:.3f} s"))
    if t.get("decode_tokens"):  # 0: the answer's one token (or piece) came as the first: no rate to tell
        # beside a server's own rate (the stats line's), the client's is how fast the pieces arrived
        server_rate = (t.get("server") or {}).get("predicted_per_second")
        label = "decode (as received)" if isinstance(server_rate, (int, float)) and server_rate > 0 else "decode"
        rows.append((label, f"{counted(t['decode_tokens'], 'token')} in {t.get('decode_s', 0):.3f} s"
                            f" ({t.get('decode_tokens_per_s', 0):,.1f} tok/s)"))  # fmt: skip
    answer = turn.answer_tokens
    rows.append(("answer", "? tokens (not reported)" if answer is None else counted(answer, 'token')))
    rows.append(("context", f"{approx}{context_used:,} / {f'{limit:,}' if limit else '?'}"))
    server = format_server_numbers(t.get("server"))
    if server:
        rows.append(("server reports", server))
    rows.append(("model", f"{visible(info.name)} · {visible(info.where)}"))
    if info.load_s is not None:
        rows.append(("start-up", f"{info.load_s:.2f} s"))  # the model's load, or the server's first answer
    if peak and info.memory_device is not None:
        where = "GPU" if info.memory_device.startswith("cuda") else "RAM"
        rows.append(("peak memory", f"{format_bytes(peak)} {where}"))
    return rows
