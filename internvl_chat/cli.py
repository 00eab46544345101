"""`internvl-chat`: flags → Settings → a mode (REPL, one-shot, script, quantize).

Exit codes: 0 success, 1 an error, 2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import InternVLChatError, UsageError



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="internvl-chat",
        description="Chat with InternVL3 vision-language models (bf16 or 4-bit AWQ) in the terminal.",
        epilog=(
            "modes: a REPL when stdin and stdout are terminals and no prompt is given (-I keeps it after a "
            "prompt); one-shot otherwise (piped stdin is prepended to the prompt); --script runs REPL lines. "
            "`internvl-chat quantize --help` makes 4-bit AWQ checkpoints."
        ),
    )
    p.add_argument("prompt", nargs="*", help="the question (one-shot mode); same as -p")
    p.add_argument("-p", "--prompt", dest="prompt_flag", metavar="TEXT", help="the question (one-shot mode)")
    p.add_argument("--model", metavar="DIR", help="checkpoint folder (default: the embedded demo model)")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="attach an image (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="FILE", help="attach a video (repeatable)")
    p.add_argument("--frames", type=int, metavar="N", help="frames sampled per video (default 8)")
    p.add_argument("--video-range", metavar="A-B", help="only sample frames between A and B seconds")
    p.add_argument("--max-tiles", type=int, metavar="N", help="448-pixel tiles per image (default 12)")
    p.add_argument("--system", metavar="TEXT", help="system message ('' for none; default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="longest answer in tokens (default 1024)")
    p.add_argument("--temperature", type=float, metavar="T", help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass, 1 is off (default)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens, 0 is off (default)")
    p.add_argument("--repetition-penalty", type=float, metavar="R", help="penalise tokens already in the conversation, 1 is off (default)")
    p.add_argument("--seed", type=int, metavar="S", help="make sampling reproducible")
    p.add_argument("--device", metavar="DEV", help="auto | cpu | cuda | cuda:N (default auto: CUDA if present)")
    p.add_argument("--dtype", metavar="T", help="auto | float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-context", type=int, metavar="N", help="KV cache length in tokens (default 8192)")
    p.add_argument("--int4-backend", metavar="B", help="auto | torch | dequant: kernels for 4-bit weights")
    p.add_argument("--json", action="store_true", help="one-shot: print one JSON object instead of streaming text")
    p.add_argument("--script", metavar="FILE", help="run REPL lines from FILE ('-' for stdin), printed as a transcript; "
                   "failing lines are reported and skipped, and the exit status is then 1")
    p.add_argument("-I", "--interactive", action="store_true", help="stay in the REPL after the prompt's answer")
    p.add_argument("--plain", action="store_true", default=None, help="raw text output, no Markdown or colour")
    p.add_argument("--no-stats", action="store_true", help="hide the stats line after each answer")
    p.add_argument("--no-history", action="store_true", help="do not read or write the REPL input history")
    p.add_argument("--no-auto-attach", action="store_true", help="do not attach media paths typed in messages")
    p.add_argument("--config", metavar="FILE", help="settings file (default ~/.config/internvl-chat/config.toml)")
    p.add_argument("--print-config", action="store_true", help="print the merged settings and where each came from")
    p.add_argument("--version", action="version", version=f"internvl-chat {__version__}")
    return p


def _overrides(args: argparse.Namespace) -> dict:
    return {
        "model.path": args.model,
        "model.device": args.device,
        "model.dtype": args.dtype,
        "model.max_context": args.max_context,
        "model.int4_backend": args.int4_backend,
        "generation.temperature": args.temperature,
        "generation.top_p": args.top_p,
        "generation.top_k": args.top_k,
        "generation.repetition_penalty": args.repetition_penalty,
        "generation.max_new_tokens": args.max_new_tokens,
        "generation.seed": args.seed,
        "media.max_tiles": args.max_tiles,
        "media.frames": args.frames,
        "media.auto_attach": False if args.no_auto_attach else None,
        "ui.stats": False if args.no_stats else None,
        "ui.history": False if args.no_history else None,
        "ui.plain": True if args.plain else None,
        "system.message": args.system,
    }


def _read_prompt(args: argparse.Namespace) -> str | None:
    parts = [args.prompt_flag] if args.prompt_flag else []
    parts += [" ".join(args.prompt)] if args.prompt else []
    prompt = " ".join(parts) if parts else None
    if args.script != "-" and not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped.strip():
            prompt = f"{piped.rstrip()}\n\n{prompt}" if prompt else piped.rstrip()
    return prompt


def run(argv: list[str]) -> int:
    if argv[:1] == ["quantize"]:
        # before torch loads OpenMP: idle threads sleep instead of spinning, which on a busy CPU
        # made quantizing ~10× slower in CPU time (benchmarks/RESULTS.md, quantize)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from .quantize import main as quantize_main

        return quantize_main(argv[1:])
    from .settings import format_settings, load_settings

    args = build_parser().parse_args(argv)
    settings = load_settings(args.config, os.environ, _overrides(args))
    if args.print_config:
        sys.stdout.write(format_settings(settings))
        return 0
    if args.script:
        if args.prompt_flag or args.prompt or args.interactive or args.json:
            raise UsageError("--script takes its messages from the script; drop -p/the prompt words, -I and --json")
        from .ui.script import run_script

        return run_script(args, settings)  # stdin is left alone unless the script is '-'
    prompt = _read_prompt(args)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if prompt is None and interactive or args.interactive:
        from .ui.repl import run_repl

        return run_repl(args, settings, prompt)
    if prompt is None:
        raise UsageError("no prompt given; pass -p TEXT (or words after the flags), or pipe text on stdin")
    from .ui.oneshot import run_oneshot

    return run_oneshot(args, settings, prompt)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = run(argv)
    except InternVLChatError as e:
        print(f"internvl-chat: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("internvl-chat: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error worth a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
