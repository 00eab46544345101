"""The vision tower's dtype on a CPU without native bf16, side by side in one process: one 448²
tile through `encode_images` of an InternVL3-1B-shaped model (InternViT-300M + mlp1, random
weights) in bf16, with the tower in bf16 (as before `cpu_features.vision_dtype`) and in fp32 (as
now), rounds interleaved so that load from other jobs falls on both alike. Prints seconds per tile.

    .venv/bin/python scripts/bench_vision_dtype_ab.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from time import perf_counter

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lib as bl  # noqa: E402

from internvl_chat.engine import cpu_features  # noqa: E402
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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if cpu_features.native_bf16():
        sys.exit("this CPU computes bf16 natively: both towers would be bf16")
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
