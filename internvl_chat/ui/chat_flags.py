"""The chat app's flags (`internvl-chat --help`) and the setting each gives.

Here, not in cli.py, so that `/set` (set_keys.py) can name the flag of a setting read at start
from the parser itself. Only argparse and the app's lower layers are imported: it runs at start.
"""

from __future__ import annotations

import argparse
import os
from functools import cache

from .. import __version__
from ..errors import OneLineParser, UsageError
from ..setting_flags import SettingFlags, add_engine_flags, add_setting_flag, add_setting_switch


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="internvl-chat",
        description="Chat with InternVL3 vision-language models (bf16 or 4-bit AWQ) in the terminal.",
        epilog=(
            "modes: a REPL when stdin and stdout are terminals and no prompt is given (-I keeps it after a "
            "prompt); one-shot otherwise (piped stdin is prepended to the prompt); --script runs REPL lines. "
            "`internvl-chat quantize` makes 4-bit AWQ checkpoints and `internvl-chat serve` serves one "
            "over an OpenAI-compatible API (each has its own --help). "
            "Exit status: 0 done, 1 an error (stdout unwritable included), 2 bad usage or input, "
            "130 interrupted (Ctrl-C), 143/129 ended by SIGTERM/SIGHUP (131 by SIGQUIT in the REPL)."
        ),
    )
    p.add_argument("prompt", nargs="*", help="the question (one-shot mode); same as -p")
    p.add_argument("-p", "--prompt", dest="prompt_flag", metavar="TEXT",
                   help="the question (one-shot mode; - reads it from stdin, sent as it is); a leading // is sent as one / (as in the REPL)")
    add_setting_flag(p, "--model", setting="model.path", metavar="DIR", help="checkpoint folder (default: the embedded demo model)")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="attach an image (repeatable; a quoted pattern, 'shots/*', attaches the images it matches)")
    p.add_argument("--video", action="append", default=[], metavar="FILE",
                   help="attach a video (repeatable; a quoted pattern, 'clips/*', attaches the videos it matches)")
    add_setting_flag(p, "--frames", setting="media.frames", type=int, metavar="N", help="frames sampled per video (default 8)")
    p.add_argument("--video-range", metavar="A-B", help="only sample frames between A and B seconds (or m:ss, h:mm:ss)")
    add_setting_flag(p, "--max-tiles", setting="media.max_tiles", type=int, metavar="N",
                     help="448-pixel tiles per image (default: the checkpoint's, 12)")
    add_setting_flag(p, "--system", setting="system.message", metavar="TEXT",
                     help="system message ('' for none; default: the checkpoint's, or with --server the server's)")
    add_setting_flag(p, "--max-new-tokens", setting="generation.max_new_tokens", type=int, metavar="N",
                     help="longest answer in tokens (default 1024)")
    add_setting_flag(p, "--temperature", setting="generation.temperature", type=float, metavar="T", help="0 is greedy (default)")
    add_setting_flag(p, "--top-p", setting="generation.top_p", type=float, metavar="P",
                     help="nucleus sampling mass, 1 is off (default)")
    add_setting_flag(p, "--top-k", setting="generation.top_k", type=int, metavar="K",
                     help="sample among the K likeliest tokens, 0 is off (default)")
    add_setting_flag(p, "--repetition-penalty", setting="generation.repetition_penalty", type=float, metavar="R",
                     help="penalise tokens already in the conversation, 1 is off (default)")
    add_setting_flag(p, "--seed", setting="generation.seed", type=int, metavar="S", help="make sampling reproducible")
    add_engine_flags(p, "KV cache length in tokens")
    _add_remote_flags(p)
    p.add_argument("--json", action="store_true", help="one-shot: print one JSON object instead of streaming text")
    p.add_argument("--script", metavar="FILE", help="run REPL lines from FILE ('-' for stdin), printed as a transcript; "
                   "failing lines are reported and skipped, and the exit status is then 1")
    p.add_argument("-I", "--interactive", action="store_true", help="stay in the REPL after the prompt's answer")
    add_setting_switch(p, "--plain", setting="ui.plain", value=True, default=None,
                       help="raw text output, no Markdown, colour or spinner")
    add_setting_switch(p, "--no-stats", setting="ui.stats", value=False, help="hide the stats line after each answer")
    add_setting_switch(p, "--no-history", setting="ui.history", value=False, help="do not read or write the REPL input history")
    add_setting_switch(p, "--no-auto-attach", setting="media.auto_attach", value=False,
                       help="do not attach media paths typed in messages")
    p.add_argument("--config", metavar="FILE",
                   help="settings file (default: $INTERNVL_CHAT_CONFIG, else ~/.config/internvl-chat/config.toml; $XDG_CONFIG_HOME replaces ~/.config)")
    p.add_argument("--print-config", action="store_true", help="print the merged settings and where each came from (TOML; with --json, one JSON object)")
    p.add_argument("--version", action="version", version=f"internvl-chat {__version__}")
    return p


@cache
def chat_setting_flags() -> SettingFlags:
    """The chat's flags that give settings (a parser of its own: nothing parses with it)."""
    return SettingFlags(build_parser())


# --- remote backend (chat/remote.py) ----------------------------------------------------------
OPENAI_BASE_URL_ENV = "OPENAI_BASE_URL"
_SERVER_FROM_ENV = object()  # `--server` given without a URL


def _add_remote_flags(p: argparse.ArgumentParser) -> None:
    add_setting_flag(p, "--server", setting="remote.server", nargs="?", const=_SERVER_FROM_ENV, metavar="URL",
                     help="chat with an OpenAI-compatible server (lmdeploy, vLLM, SGLang, llama-server, "
                          f"internvl-chat serve) instead of a local model; without URL: ${OPENAI_BASE_URL_ENV}")  # fmt: skip
    add_setting_flag(p, "--api-key", setting="remote.api_key", metavar="KEY",
                     help="the server's key (better: the OPENAI_API_KEY environment variable)")
    add_setting_flag(p, "--remote-model", setting="remote.model", metavar="ID",
                     help="a model id the server serves (default: the first it lists)")
    add_setting_flag(p, "--dialect", setting="remote.dialect", metavar="D", help="the server's request dialect: auto (default, from its model list), "
                     "lmdeploy, vllm, sglang, llamacpp, ollama, internvl-chat or generic")  # fmt: skip


def server_flag(value: object) -> str | None:
    """--server's URL: as given, or $OPENAI_BASE_URL for `--server` alone."""
    if value is not _SERVER_FROM_ENV:
        return value  # type: ignore[return-value]
    url = os.environ.get(OPENAI_BASE_URL_ENV, "").strip()
    if not url:
        raise UsageError(f"--server without a URL reads {OPENAI_BASE_URL_ENV}, which is not set; pass --server http://HOST:PORT/v1")
    return url
