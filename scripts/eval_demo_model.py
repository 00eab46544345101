"""Accuracy of the demo model per question type, measured through our own engine.

    python scripts/eval_demo_model.py                       # the shipped model, 200 questions per type
    python scripts/eval_demo_model.py --model DIR --per-type 50 --device cpu
    python scripts/eval_demo_model.py --quantized awq       # the same model after 4-bit quantization

Scenes come from the evaluation seed range (EVAL_SEED_BASE…), which training never uses. Each scene
is one multi-turn conversation that asks the question types still short of `--per-type`, in a
random order, every answer greedy and kept in the KV cache as the chat app keeps it
(`--single-turn` asks each question in a fresh conversation instead). An answer is right when it
equals the canonical answer after `normalize_answer` (case, spaces, final full stop).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from internvl_chat.chat.template import MediaSpec, PromptBuilder  # noqa: E402
from internvl_chat.demo.scenes import (  # noqa: E402
    CALIBRATION_SEED_BASE,
    EVAL_SEED_BASE,
    QA,
    QUESTION_TYPES,
    Scene,
    answers_match,
    make_scene,
)
from internvl_chat.engine.loader import LoadedModel, load_model  # noqa: E402
from internvl_chat.errors import InternVLChatError, UsageError  # noqa: E402
from internvl_chat.files import visible  # noqa: E402
from internvl_chat.media.image import normalize_tiles, tile_image  # noqa: E402
from script_args import nonnegative_int, output_file, positive_int  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "internvl_chat" / "demo_model"
QUANT_METHODS = ("none", "rtn", "awq")
DEFAULT_GROUP_SIZE = 64  # divides the demo model's widths (192, 512); 128 does not divide 192
MAX_NEW_TOKENS = 48  # the longest canonical description is about 30 tokens
MAX_CONTEXT = 4096  # 13 tiles (3,328 image tokens) + five short turns


@dataclass
class EvalResult:
    right: dict[str, int] = field(default_factory=lambda: {t: 0 for t in QUESTION_TYPES})
    total: dict[str, int] = field(default_factory=lambda: {t: 0 for t in QUESTION_TYPES})
    first_turn: list[int] = field(default_factory=lambda: [0, 0])  # right, total
    later_turns: list[int] = field(default_factory=lambda: [0, 0])
    scenes: int = 0
    seconds: float = 0.0
    mistakes: list[dict] = field(default_factory=list)

    def accuracy(self) -> dict[str, float]:
        return {t: self.right[t] / self.total[t] if self.total[t] else float("nan") for t in QUESTION_TYPES}

    def add(self, qa: QA, predicted: str, turn: int, scene: Scene) -> None:
        ok = answers_match(predicted, qa.answer)
        self.right[qa.type] += ok
        self.total[qa.type] += 1
        bucket = self.first_turn if turn == 0 else self.later_turns
        bucket[0] += ok
        bucket[1] += 1
        if not ok and len(self.mistakes) < 20:
            self.mistakes.append(
                {"seed": scene.seed, "size": list(scene.size), "turn": turn, "question": qa.question, "expected": qa.answer, "got": predicted}
            )


def greedy_answer(loaded: LoadedModel, prompt: list[int], start_pos: int, features: torch.Tensor | None, stop: set[int]) -> tuple[list[int], int]:
    """Prefill `prompt` at `start_pos`, decode greedily until a stop token; every generated token is
    fed (so the cache holds the whole answer) and the stop token is not. Returns (ids, new start_pos)."""
    model = loaded.model
    logits = model.forward(prompt, start_pos, features)
    pos = start_pos + len(prompt)
    out: list[int] = []
    while True:
        token = int(logits.argmax())
        if token in stop or len(out) >= MAX_NEW_TOKENS:
            return out, pos
        out.append(token)
        logits = model.forward([token], pos)
        pos += 1


def ask(loaded: LoadedModel, builder: PromptBuilder, scene: Scene, questions: list[QA], single_turn: bool) -> list[str]:
    """Answers to `questions` about `scene`: one conversation, or a fresh one per question."""
    cfg = loaded.config
    tiles = tile_image(scene.render(), cfg.max_dynamic_patch, cfg.use_thumbnail, cfg.image_size)
    features = loaded.model.encode_images(normalize_tiles(tiles, cfg.image_size))
    media = [MediaSpec("image", len(tiles))]
    stop = set(builder.stop_ids)
    answers, pos = [], 0
    for k, qa in enumerate(questions):
        if k == 0 or single_turn:
            prompt, pos, feats = builder.first_turn(qa.question, media), 0, features
        else:  # starts with <|im_end|>\n: closes the previous answer, as the chat session does
            prompt, feats = builder.next_turn(qa.question), None
        ids, pos = greedy_answer(loaded, prompt, pos, feats, stop)
        answers.append(loaded.tokenizer.decode(ids, skip_special_tokens=True))
    return answers


def evaluate_loaded(
    loaded: LoadedModel, per_type: int = 200, single_turn: bool = False, seed_base: int = EVAL_SEED_BASE, log=print
) -> EvalResult:
    """`per_type` questions of every type over scenes seed_base, seed_base + 1, …"""
    builder = PromptBuilder(loaded.tokenizer, loaded.config.system_message, loaded.config.tokens_per_tile)
    result = EvalResult()
    start = last_log = time.perf_counter()
    seed = seed_base
    while any(result.total[t] < per_type for t in QUESTION_TYPES):
        scene = make_scene(seed)
        rng = random.Random(f"eval-{seed}")
        seed += 1
        needed = tuple(t for t in QUESTION_TYPES if result.total[t] < per_type)
        questions = scene.conversation(rng, len(needed), needed)
        if not questions:
            continue
        with torch.inference_mode():
            answers = ask(loaded, builder, scene, questions, single_turn)
        for turn, (qa, answer) in enumerate(zip(questions, answers)):
            result.add(qa, answer, turn, scene)
        result.scenes += 1
        if log and time.perf_counter() - last_log > 15:
            done = sum(min(per_type, n) for n in result.total.values())
            log(f"  {result.scenes} scenes, {done}/{per_type * len(QUESTION_TYPES)} questions, {time.perf_counter() - start:.0f} s")
            last_log = time.perf_counter()
    result.seconds = time.perf_counter() - start
    return result


def write_calibration_scenes(folder: Path, count: int) -> Path:
    """`count` scene images with their questions and answers as text, from a seed range of their
    own (neither trained on nor evaluated), for the quantizer's calibration (`--calib`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        scene = make_scene(CALIBRATION_SEED_BASE + k)
        scene.render().save(folder / f"scene_{k:03d}.png")
        turns = scene.conversation(random.Random(k), len(QUESTION_TYPES))
        (folder / f"scene_{k:03d}.txt").write_text("\n".join(f"{qa.question} {qa.answer}" for qa in turns), encoding="utf-8")
    return folder


def quantized_checkpoint(model_dir: Path, method: str, work_dir: Path, group_size: int, device: str, calib_scenes: int) -> Path:
    """The model quantized to 4 bits by our own quantizer (internvl_chat/quantize/), in work_dir."""
    try:
        from internvl_chat.quantize import quantize_checkpoint
    except ImportError:
        raise UsageError("--quantized needs internvl_chat/quantize/, which this build lacks; use --quantized none") from None
    # RTN takes no calibration data (the quantizer refuses it, naming its own --calib): the scenes are AWQ's
    calib = write_calibration_scenes(work_dir / "calib", calib_scenes) if method == "awq" and calib_scenes > 0 else None
    return quantize_checkpoint(model_dir, work_dir / f"demo-{method}", method=method, group_size=group_size, calib_dir=calib, device=device)


def evaluate(
    model_dir: str | Path = DEFAULT_MODEL,
    per_type: int = 200,
    device: str = "auto",
    quantized: str = "none",
    single_turn: bool = False,
    dtype: str = "auto",
    group_size: int = DEFAULT_GROUP_SIZE,
    log=print,
) -> dict[str, float]:
    """Accuracy (0…1) per question type of the checkpoint in `model_dir` (quantized first if asked)."""
    return evaluate_full(model_dir, per_type, device, quantized, single_turn, dtype, group_size, log=log).accuracy()


def evaluate_full(
    model_dir: str | Path,
    per_type: int,
    device: str,
    quantized: str,
    single_turn: bool,
    dtype: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    calib_scenes: int = 16,
    log=print,
) -> EvalResult:
    if quantized not in QUANT_METHODS:
        raise UsageError(f"--quantized must be one of {', '.join(QUANT_METHODS)}, not {quantized!r}")
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="demo_eval_") as work:
        path = model_dir
        if quantized != "none":
            start = time.perf_counter()
            path = quantized_checkpoint(model_dir, quantized, Path(work), group_size, device, calib_scenes)
            if log:
                log(f"quantized ({quantized}, group {group_size}) in {time.perf_counter() - start:.0f} s")
        loaded = load_model(path, device=device, dtype=dtype, max_context=MAX_CONTEXT)
        return evaluate_loaded(loaded, per_type, single_turn, log=log)


def format_table(result: EvalResult, title: str) -> str:
    lines = [title, f"{'question type':<14} {'right':>6} {'total':>6} {'accuracy':>9}"]
    for t in QUESTION_TYPES:
        acc = result.right[t] / result.total[t] if result.total[t] else float("nan")
        lines.append(f"{t:<14} {result.right[t]:>6} {result.total[t]:>6} {100 * acc:>8.1f}%")
    right, total = sum(result.right.values()), sum(result.total.values())
    lines.append(f"{'all':<14} {right:>6} {total:>6} {100 * right / max(1, total):>8.1f}%")
    for name, (r, n) in (("first turn", result.first_turn), ("later turns", result.later_turns)):
        if n:
            lines.append(f"{name:<14} {r:>6} {n:>6} {100 * r / n:>8.1f}%")
    lines.append(f"{result.scenes} scenes in {result.seconds:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder (default: the shipped demo model)")
    p.add_argument("--per-type", type=positive_int, default=200, help="questions per question type")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (as the app: bf16 on CUDA; on a CPU fp32 for the demo model), float32, bfloat16, float16")
    p.add_argument("--quantized", choices=QUANT_METHODS, default="none", help="quantize to 4 bits first (our quantizer)")
    p.add_argument("--group-size", type=positive_int, default=DEFAULT_GROUP_SIZE, help="4-bit group size for --quantized")
    p.add_argument("--calib-scenes", type=nonnegative_int, default=16,
                   help="--quantized awq: scenes for the quantizer's calibration (0: its built-in data)")
    p.add_argument("--single-turn", action="store_true", help="one fresh conversation per question")
    p.add_argument("--json", type=output_file, help="also write the results here")
    p.add_argument("--show-mistakes", type=nonnegative_int, default=5, help="print this many wrong answers")
    args = p.parse_args(argv)
    try:
        result = evaluate_full(
            args.model, args.per_type, args.device, args.quantized, args.single_turn, args.dtype, args.group_size, args.calib_scenes
        )
    except InternVLChatError as e:
        print(f"error: {visible(str(e))}", file=sys.stderr)  # inert, as the CLI prints it
        return 1
    mode = "single-turn" if args.single_turn else "multi-turn"
    kind = f"4-bit {args.quantized}, group {args.group_size}" if args.quantized != "none" else "float"
    print(format_table(result, f"{args.model} ({kind}, {mode}, greedy)"))
    for m in result.mistakes[: args.show_mistakes]:
        print(f"  seed {m['seed']} {m['size'][0]}x{m['size'][1]} turn {m['turn'] + 1}: {m['question']!r} expected {m['expected']!r}, got {m['got']!r}")
    if args.json:
        payload = {
            "model": str(args.model),
            "quantized": args.quantized,
            "group_size": args.group_size if args.quantized != "none" else None,
            "mode": mode,
            "per_type": args.per_type,
            "accuracy": result.accuracy(),
            "right": result.right,
            "total": result.total,
            "first_turn": result.first_turn,
            "later_turns": result.later_turns,
            "scenes": result.scenes,
            "seconds": round(result.seconds, 1),
            "mistakes": result.mistakes,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
