"""One-shot mode: one question, the answer streamed as raw text to stdout, stats to stderr."""

from __future__ import annotations

import argparse
import json
import sys

from ..settings import Settings
from .app import peak_memory, sanitize
from .render import format_stats
from .setup import media_from_flags, open_session


def run_oneshot(args: argparse.Namespace, settings: Settings, prompt: str) -> int:
    session = open_session(settings)
    media = media_from_flags(session, args, settings)
    final = None
    # raw text for pipes; a terminal must not receive the model's control characters
    clean = sanitize if sys.stdout.isatty() else str
    for event in session.ask(prompt, media):
        if not args.json and event["text"]:
            sys.stdout.write(clean(event["text"]))
            sys.stdout.flush()
        if event["finish_reason"] is not None:
            final = event
    timing = dict(final["timing"], load_s=session.loaded.load_s)
    if args.json:
        out = {
            "text": session.turns[-1].answer_text,
            "token_ids": final["token_ids"],
            "finish_reason": final["finish_reason"],
            "usage": final["usage"],
            "timing": timing,
        }
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if settings.ui.stats and not args.json:
        device = session.loaded.device
        stats = format_stats(timing, final["usage"], session.context_used, session.max_context, peak_memory(device), device)
        print(stats, file=sys.stderr)
    return 0
