"""Server-sent events framed as OpenAI frames them: `data: {json}\\n\\n`, ending with `data: [DONE]\\n\\n`."""

from __future__ import annotations

import json

DONE = b"data: [DONE]\n\n"

# Line ends that json leaves raw (it escapes those below U+0020): Python's str.splitlines, which
# httpx's iter_lines follows, ends a line at each, and a client reading events by lines got half
# an event (a model can be made to write them). Escaped, they read back as the same text.
_LINE_ENDS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def to_json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_ENDS)


def event(obj: dict) -> bytes:
    # json.dumps escapes newlines inside strings (to_json the other line ends): one event is one `data:` line
    return f"data: {to_json(obj)}\n\n".encode()


class TextEvents:
    """Events for text deltas from one template chunk: its constant parts are rendered once, so each
    delta costs one json.dumps of the text (the per-token path of a stream)."""

    _MARK = "\\u0000"  # how json writes the placeholder "\\x00"

    def __init__(self, template: dict, path: tuple):
        probe = json.loads(json.dumps(template))
        target = probe
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = "\x00"
        rendered = to_json(probe)
        if rendered.count(self._MARK) != 1:
            raise ValueError("the template already holds a NUL character")
        before, after = rendered.split(self._MARK)
        self._head = f"data: {before[:-1]}"  # without the placeholder's opening quote
        self._tail = f"{after[1:]}\n\n"  # nor its closing one

    def __call__(self, text: str) -> bytes:
        return f"{self._head}{json.dumps(text, ensure_ascii=False).translate(_LINE_ENDS)}{self._tail}".encode()
