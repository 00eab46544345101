"""/retry on a CPU, its two paths side by side in one session: the one-token path (the last token
of the turn's cached prompt fed again) and the whole-prompt path it replaced (the turn's prompt,
picture tokens included, prefilled again; still the fallback where the cache cannot be shown to
hold the prompt). The LLM of InternVL3-1B (the 0.5B shape, random weights, bf16) with a 13-tile
picture; rounds alternate the two paths. Prints seconds per retry.

    .venv/bin/python scripts/bench_retry_ab.py --threads 2 --rounds 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from time import perf_counter

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lib as bl  # noqa: E402
from script_args import positive_int  # noqa: E402

from internvl_chat.chat.sampling import SamplingParams  # noqa: E402
from internvl_chat.chat.session import Session  # noqa: E402
from internvl_chat.engine.loader import load_model  # noqa: E402


def last_event(events) -> dict:
    final = None
    for event in events:
        final = event
    return final


def timed_retry(session: Session) -> float:
    start = perf_counter()
    last_event(session.retry())
    return perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("--work-dir", default="/tmp/internvl-bench-retry")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = bl.build_shape_checkpoint(work / "qwen05")
    picture = bl.write_test_image(work / "scene.png", 800, 600)  # 12 tiles + the thumbnail
    loaded = load_model(str(checkpoint), device="cpu", dtype="bfloat16", max_context=8192)
    session = Session(loaded, SamplingParams(max_new_tokens=4))
    start = perf_counter()
    last_event(session.ask("Describe it.", [session.describe_image(picture)]))
    print(f"prompt {len(session.ids):,} tokens, first answer {perf_counter() - start:.1f} s ({args.threads} threads)")
    for n in range(args.rounds):
        one_token = timed_retry(session)
        session._cached_prompt_end = lambda turn: None  # the whole-prompt path
        whole = timed_retry(session)
        del session._cached_prompt_end
        print(f"round {n + 1}: one-token {one_token:.2f} s, whole prompt {whole:.2f} s (×{whole / one_token:.0f})")


if __name__ == "__main__":
    main()
