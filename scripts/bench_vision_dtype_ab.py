"""The CPU's dtype choices for a bf16 model, side by side in one process, rounds interleaved so that
load from other jobs falls on all alike. The vision tower: one 448² tile through `encode_images`
of an InternVL3-1B-shaped model (InternViT-300M + mlp1, random weights) with the tower in bf16
and in fp32 (`cpu_features.vision_dtype` keeps fp32 unless the CPU computes bf16 natively); prints
seconds per tile. With `--prefill`, also the decoder's prefill on the 0.5B shape: fp32 weights,
bf16 products as the CPU computes them, and bf16 weights upcast to fp32 products
(`language.UPCAST_MIN_ROWS`, taken where bf16 is not native); prints tokens/s.

    .venv/bin/python scripts/bench_vision_dtype_ab.py --threads 2 --rounds 3 [--prefill]
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

from internvl_chat.engine import cpu_features, language  # noqa: E402
from internvl_chat.engine.model import InternVLModel  # noqa: E402


def model_with_tower(cfg, native: bool) -> InternVLModel:
    """A bf16 model whose vision tower is in the dtype `vision_dtype` gives with or without native bf16."""
    real = cpu_features.native_bf16
    cpu_features.native_bf16 = lambda: native
    try:
        return InternVLModel.empty(cfg, torch.device("cpu"), torch.bfloat16, 512)
    finally:
        cpu_features.native_bf16 = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--prefill", action="store_true", help="also the decoder's prefill (0.5B shape, 256 tokens)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bf16 native on this CPU: {cpu_features.native_bf16()}")
    towers(args)
    if args.prefill:
        prefill(args)


def towers(args) -> None:
    cfg = bl.shape_config("InternVL3-1B", w4=False)
    variants = {"bf16 tower": model_with_tower(cfg, native=True), "fp32 tower": model_with_tower(cfg, native=False)}
    first = variants["fp32 tower"]
    for tower in (first.vision_model, first.mlp1):
        bl.fill_random_(tower)
    for model in variants.values():
        model.vision_model.load_state_dict(first.vision_model.state_dict())
        model.mlp1.load_state_dict(first.mlp1.state_dict())
    tile = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        a, b = (m.encode_images(tile).float().flatten() for m in variants.values())
        print(f"features: cosine {torch.nn.functional.cosine_similarity(a, b, dim=0).item():.6f} between the towers")
        for _ in range(args.rounds):
            for name, model in variants.items():
                start = perf_counter()
                model.encode_images(tile)
                seconds[name].append(perf_counter() - start)
    for name, runs in seconds.items():
        print(f"{name}: {', '.join(f'{s:.2f}' for s in runs)} s per tile ({args.threads} thread(s), {bl.cpu_model()})")


def prefill(args, tokens: int = 256) -> None:
    """fp32, native bf16 and upcast bf16 prefill of `tokens` tokens (one warm-up round not counted)."""
    hidden, layers, heads, kv_heads, ffn = 896, 24, 14, 2, 4864  # SPEC §1, InternVL3-1B's LLM
    cfg = bl.text_shape_config(hidden, layers, heads, kv_heads, ffn, False, bl.VISION_TINY, bl.VOCAB)
    models = {dtype: bl.build_random_model(cfg, torch.device("cpu"), dtype, tokens + 64) for dtype in (torch.float32, torch.bfloat16)}
    # (name, weights, whether bf16 products count as native: None leaves the CPU's own answer)
    paths = [("fp32", torch.float32, None), ("bf16 products", torch.bfloat16, True), ("bf16 upcast", torch.bfloat16, False)]
    ids = torch.arange(10, 10 + tokens)
    real = language.computes_natively
    rates: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    try:
        with torch.inference_mode():
            for round_ in range(args.rounds + 1):
                for name, dtype, native in paths:
                    language.computes_natively = real if native is None else (lambda _dtype, native=native: native)
                    start = perf_counter()
                    models[dtype].forward(ids, 0)
                    if round_:
                        rates[name].append(tokens / (perf_counter() - start))
    finally:
        language.computes_natively = real
    for name, runs in rates.items():
        print(f"prefill {name}: {', '.join(f'{r:.1f}' for r in runs)} tok/s ({tokens} tokens, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
