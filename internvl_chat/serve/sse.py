"""Server-sent events framed as OpenAI frames them: `data: {json}\\n\\n`, ending with `data: [DONE]\\n\\n`."""

from __future__ import annotations

import json

DONE = b"data: [DONE]\n\n"


def to_json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def event(obj: dict) -> bytes:
    # json.dumps escapes newlines inside strings, so one event is always one `data:` line
    return f"data: {to_json(obj)}\n\n".encode()
