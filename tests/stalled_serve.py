"""`internvl-chat serve` (same flags) whose every answer stops for good after its first text piece:
a real server to kill in the middle of an answer, at a moment the test does not have to race for.

Run as a script (`python tests/stalled_serve.py --model DIR --port N`); the engine's `on_event`
seam holds the engine thread before it hands on anything after the first piece of text.
"""

from __future__ import annotations

import sys
import threading

from internvl_chat.serve import engine
from internvl_chat.serve.main import main

_real_init = engine.EngineWorker.__init__


def _stalling_init(self, *args, **kwargs) -> None:
    _real_init(self, *args, **kwargs)
    texts = 0

    def on_event(job, event) -> None:
        nonlocal texts
        if texts:
            threading.Event().wait()  # never set: the answer goes no further until the process dies
        texts += bool(event["text"])

    self.on_event = on_event


engine.EngineWorker.__init__ = _stalling_init

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], exiting=True))  # as the command: the process ends when it returns
