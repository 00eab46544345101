"""Time per decoder block of `internvl-chat quantize` (AWQ search + packing, and RTN) at real shapes.

    python scripts/bench_quantize.py                       # InternVL3-1B's LLM shapes, 2 blocks
    python scripts/bench_quantize.py --shape InternVL3-2B --blocks 1 --json out.json

The decoder has random weights (scripts/bench_lib.py; the time of these searches does not depend
on the values) and the calibration inputs are the embeddings of random token ids, in sequences of
the lengths the default calibration set has on the demo model (its tokenizer spends more tokens per
character than Qwen's, so real runs are shorter). Per-block time = the quantizer's block phase /
blocks; the vision tower and calibration forward are not included (they do not scale with blocks).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the quantize command sets it, before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
for _p in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import bench_lib  # noqa: E402
from make_tiny_checkpoint import TinySizes  # noqa: E402

from internvl_chat.chat.template import PromptBuilder  # noqa: E402
from internvl_chat.engine.config import VisionConfig  # noqa: E402
from internvl_chat.engine.loader import LoadedModel, load_model  # noqa: E402
from internvl_chat.quantize import Progress, Sample, calibration_samples, quantize_model  # noqa: E402
from script_args import one_line_errors, output_file, positive_int  # noqa: E402

DEMO_MODEL = REPO_ROOT / "internvl_chat" / "demo_model"
TINY_VISION = VisionConfig(
    hidden_size=TinySizes.vision_hidden, num_layers=1, num_heads=TinySizes.vision_heads, intermediate_size=128,
    norm_type="layer_norm", norm_eps=1e-6, qkv_bias=True, qk_norm=False,
)  # fmt: skip


class BlockTimes(Progress):
    """Seconds of each finished block of the quantizer's block phase."""

    def __init__(self):
        self.times: list[float] = []
        self._last = 0.0

    def begin(self, name, total, unit):
        self._last = time.perf_counter()

    def update(self, name, done, total, unit, detail):
        if name in ("AWQ search", "RTN") and done > len(self.times):
            now = time.perf_counter()
            self.times.append(now - self._last)
            self._last = now


def calibration_lengths(samples: int) -> list[int]:
    """Token counts of the default calibration set (built with the demo model's tokenizer)."""
    demo = load_model(DEMO_MODEL, device="cpu", dtype="float32", max_context=4096)
    builder = PromptBuilder(demo.tokenizer, demo.config.system_message, demo.config.tokens_per_tile)
    return [len(s.ids) for s in calibration_samples(builder, demo.tokenizer, samples)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="InternVL3-1B", choices=sorted(bench_lib.LLM_SHAPES), help="LLM shapes (SPEC §1)")
    p.add_argument("--blocks", type=positive_int, default=2, help="decoder blocks to quantize (the time is per block)")
    p.add_argument("--samples", type=positive_int, default=32, help="calibration samples (the command's default: 32)")
    p.add_argument("--group-size", type=positive_int, default=128, help="group size (default 128)")
    p.add_argument("--methods", default="awq,rtn", help="comma-separated: awq, rtn")
    p.add_argument("--json", type=output_file, help="also write the results here")
    args = p.parse_args(argv)

    hidden, _, heads, kv_heads, ffn = bench_lib.LLM_SHAPES[args.shape]
    vocab = 4096
    cfg = bench_lib.text_shape_config(hidden, args.blocks, heads, kv_heads, ffn, False, TINY_VISION, vocab)
    lengths = calibration_lengths(args.samples)
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(0, vocab, (n,), generator=gen).tolist(), None) for n in lengths]
    print(f"{args.shape}: hidden {hidden}, heads {heads}/{kv_heads}, FFN {ffn}; {args.blocks} blocks, "
          f"{len(samples)} calibration sequences, {sum(lengths)} tokens; torch threads {torch.get_num_threads()}",
          file=sys.stderr, flush=True)  # fmt: skip
    result = {"shape": args.shape, "blocks": args.blocks, "calibration_tokens": sum(lengths), "group_size": args.group_size,
              "machine": bench_lib.machine_info(torch.device("cpu")), "methods": {}}  # fmt: skip
    for method in args.methods.split(","):
        model = bench_lib.build_random_model(cfg, torch.device("cpu"), torch.float32, max_seq_len=4096)
        loaded = LoadedModel(model, None, cfg, None, Path("."), 0.0)
        timer = BlockTimes()
        wall, cpu = time.perf_counter(), time.process_time()
        quantize_model(loaded, samples, method, args.group_size, progress=timer)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        per_block = sum(timer.times) / len(timer.times)
        result["methods"][method] = {"block_s": [round(t, 2) for t in timer.times], "per_block_s": round(per_block, 2),
                                     "total_wall_s": round(wall, 2), "total_cpu_s": round(cpu, 2)}  # fmt: skip
        print(f"{method}: {per_block:.2f} s per block (blocks {', '.join(f'{t:.2f}' for t in timer.times)} s; "
              f"run incl. calibration forward: wall {wall:.1f} s, CPU {cpu:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
        del model, loaded
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
