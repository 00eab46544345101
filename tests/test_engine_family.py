"""Our engine against transformers' InternVLForConditionalGeneration on tiny checkpoints shaped as
the published InternVL3 family varies (SPEC §1), beyond the fixtures test_engine.py compares:

- grouped-query ratios of the family's LLMs: 7 (1B: 14 q / 2 kv heads), 6 (2B: 12 / 2), 5 (14B and
  38B: 40 / 8), and none at all;
- the InternViT-6B tower of 38B / 78B (RMSNorm, q/k norm over the whole width, no qkv bias; an odd
  head count, as its 25 heads), in the -hf layout too;
- widths that are no multiple of 16 (FFN 152), as a tiny stand-in for widths the kernels must not
  assume.

Each is compared in both checkpoint layouts' loaders as one prefill (the image run included), as a
prefill cut into chunks across the image run, and as one-token steps after a cached prefix.
"""

from __future__ import annotations

import pytest
import torch

from internvl_chat.engine.loader import load_model
from make_tiny_checkpoint import TinySizes, make_tiny_checkpoint
from reference import reference_model

TOL = 1e-4  # max|Δ| ≤ TOL · max|ref|, fp32 (as test_engine.py)

VARIANTS = {
    # name: (layout, vit, sizes)
    "gqa7-6b-vision-hf": ("hf", "6b", TinySizes(vision_hidden=80, vision_heads=5, vision_mlp=320,
                                               text_hidden=112, text_heads=7, text_kv_heads=1, text_ffn=256)),
    "gqa6-ffn152-original": ("original", "300m", TinySizes(text_hidden=96, text_heads=12, text_kv_heads=2, text_ffn=152)),
    "gqa5-6b-vision-original": ("original", "6b", TinySizes(vision_hidden=80, vision_heads=5, vision_mlp=320,
                                                            text_hidden=80, text_heads=10, text_kv_heads=2, text_ffn=160)),
    "no-gqa-hf": ("hf", "300m", TinySizes(text_kv_heads=4)),
}  # fmt: skip


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (ours.float() - ref.float()).abs().max().item()
    scale = ref.abs().max().item()
    assert diff <= TOL * scale, f"{what}: max|Δ| {diff:.3g} > {TOL} × max|ref| {scale:.3g}"


def _prompt(loaded, tiles: int) -> list[int]:
    s, tok = loaded.special, loaded.tokenizer
    return ([s.im_start] + tok.encode("user\n") + [s.img_start] + [s.img_context] * (256 * tiles) + [s.img_end]
            + tok.encode("\nWhat shape is this?") + [s.im_end] + tok.encode("\n") + [s.im_start]
            + tok.encode("assistant\n"))  # fmt: skip


def _compare(folder) -> None:
    loaded = load_model(folder, device="cpu", dtype="float32", max_context=1024)
    ref = reference_model(folder)
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    ids = _prompt(loaded, tiles=2)
    with torch.no_grad():
        ref_features = ref.model.get_image_features(pixel_values=pixels).pooler_output
        ref_logits = ref(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
    model = loaded.model
    features = model.encode_images(pixels)
    _close(features, ref_features, "image features")
    _close(model.forward(ids, 0, features, all_logits=True), ref_logits, "one prefill")
    model.prefill_chunk = 100  # chunks that cut the image run
    _close(model.forward(ids, 0, features), ref_logits[-1], "chunked prefill")
    split = len(ids) - 4
    model.forward(ids[:split], 0, features)
    steps = torch.stack([model.forward(ids[p : p + 1], p) for p in range(split, len(ids))])
    _close(steps, ref_logits[split:], "one-token steps")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_family_shapes_match_transformers(variant, tiny_tokenizer, tmp_path):
    layout, vit, sizes = VARIANTS[variant]
    folder = make_tiny_checkpoint(tmp_path / variant, layout=layout, vit=vit, sizes=sizes, dtype="float32",
                                  tokenizer_dir=tiny_tokenizer)  # fmt: skip
    _compare(folder)
