"""`internvl-chat quantize SRC DST`: flags → `quantize_checkpoint`, with progress on stderr (bars on a
terminal, plain lines elsewhere); SIGTERM and SIGHUP end it as Ctrl-C does, its output removed and
one line said (cli.main: `stopped by SIGTERM`), unless they were ignored when it started (`nohup`)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from ..errors import EndedBySignal, OneLineParser, UsageError, add_user_note, replace_signal_handlers
from ..files import visible
from ..numbers import parse_int
from .calibration import CALIB_TEXT_CHARS, MAX_SAMPLES
from .pipeline import quantize_checkpoint
from .progress import BarProgress, LineProgress


def _positive_int(text: str) -> int:
    try:
        value = parse_int(text)  # as OneLineParser's int flags read it: not `٣٢` (32) nor `1_0` (10)
    except ValueError as refused:
        raise argparse.ArgumentTypeError(str(refused)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _seed(text: str) -> int:
    """A seed of 0 or more: Python's random takes a negative seed's absolute value, so `--seed -1`
    made exactly the checkpoint `--seed 1` did, and a sweep over both made duplicates without a word."""
    try:
        value = parse_int(text)
    except ValueError as refused:
        raise argparse.ArgumentTypeError(str(refused)) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more (-N would calibrate exactly as N does)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="internvl-chat quantize",
        description="Quantize an InternVL3 checkpoint's LLM to 4-bit AWQ (published GEMM layout); "
        "the vision encoder and projector stay 16-bit. Progress goes to stderr.",
    )
    p.add_argument("src", help="16-bit checkpoint folder (original or -hf layout)")
    p.add_argument("dst", help="output folder: new or empty, outside src; written complete or not at all")
    p.add_argument("--method", choices=["awq", "rtn"], default="awq",
                   help="awq: activation-aware scales + clipping, calibrated on images and text (default); "
                        "rtn: round to nearest, no calibration")  # fmt: skip
    p.add_argument("--group-size", type=_positive_int, metavar="N",
                   help="weights per scale/zero group along each input: a multiple of 32 that divides the "
                        "model's widths (default 128, or the largest of 64 and 32 that divides them)")  # fmt: skip
    p.add_argument("--calib", metavar="DIR", help="awq: folder of calibration images and .txt files (each one text: its "
                   f"first {CALIB_TEXT_CHARS:,} characters), used in place of the built-in ones (a kind it lacks stays built-in); every "
                   "other sample has an image; both are taken in turn by name, repeated where there are fewer than "
                   "samples (default: built-in generated data)")  # fmt: skip
    p.add_argument("--samples", type=_positive_int, metavar="N",
                   help=f"awq: calibration samples, half with an image (default 32, at most {MAX_SAMPLES})")  # fmt: skip
    p.add_argument("--no-clip", action="store_true", help="awq: skip the weight-clipping search")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto | cpu | cuda | cuda:N (default auto: CUDA if present)")
    p.add_argument("--seed", type=_seed, metavar="S", help="awq: seed of the built-in calibration data, 0 or more (default 0)")
    return p


def _end_on_signal(signum: int, frame) -> None:
    """SIGTERM/SIGHUP as EndedBySignal, so the half-written staging folder is removed
    (`output_folder.staged_output`) as on Ctrl-C; by default they ended the process with it left behind.
    cli.main says why in one line and exits 128 + signal (a SystemExit ended the run without a word)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise EndedBySignal(signum)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    # one ignored stays ignored: under `nohup` a closed terminal's SIGHUP ended an hour-long run
    replaced = replace_signal_handlers((signal.SIGTERM, signal.SIGHUP), _end_on_signal)
    try:
        return _quantize(args)
    finally:  # called in-process (cli.main from a script, tests), a later `kill` raised where the caller was
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


def _refuse_empty(args: argparse.Namespace) -> None:
    """An empty argument (`"$SRC"`, `--calib "$DIR"` with the variable unset) named the working folder
    ("the source . has no config.json", "output /home/me exists and is not empty"), or was taken as
    not given: --calib '' quantized on the built-in data, --device '' on the default device."""
    for name, value, fix in (("SRC", args.src, "pass a 16-bit checkpoint folder"),
                             ("DST", args.dst, "pass a new output folder"),
                             ("--calib", args.calib, "pass a folder of images and .txt files, or leave --calib out for the built-in data"),
                             ("--device", args.device, "pass auto, cpu, cuda or cuda:N")):  # fmt: skip
        if value is not None and not value.strip():
            raise UsageError(f"{name} was given an empty {'value' if name == '--device' else 'path'}; {fix}")


def _quantize(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    start = time.perf_counter()
    _refuse_empty(args)
    awq_only = [flag for flag, given in (("--calib", args.calib), ("--samples", args.samples is not None),
                                         ("--no-clip", args.no_clip), ("--seed", args.seed is not None)) if given]
    if args.method == "rtn" and awq_only:  # a user would believe they changed the result
        flags = ", ".join(awq_only)
        raise UsageError(f"{flags} {'is' if len(awq_only) == 1 else 'are'} for --method awq: RTN uses no calibration "
                         f"data and no clipping search; drop {flags} or use --method awq")
    run = dict(method=args.method, group_size=args.group_size, calib_dir=args.calib, device=args.device, clip=not args.no_clip)
    run.update({name: value for name, value in (("samples", args.samples), ("seed", args.seed)) if value is not None})
    dst = None
    try:
        if console.is_terminal:
            with BarProgress(console) as bars:
                dst = quantize_checkpoint(args.src, args.dst, progress=bars, **run)
        else:
            dst = quantize_checkpoint(args.src, args.dst, progress=LineProgress(sys.stderr), **run)
        group = json.loads((dst / "config.json").read_text())["llm_config"]["quantization_config"]["group_size"]
        print(f"wrote {visible(str(dst))} ({args.method}, group {group}) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    except (KeyboardInterrupt, EndedBySignal) as stop:
        if dst is not None:  # a stop after the output appeared (the bars' last redraw): "interrupted" alone read as "nothing left"
            add_user_note(stop, f"the output {visible(str(dst))} was already written whole and stays; delete it if you do not want it")
        raise
    return 0
