"""`internvl-chat quantize SRC DST`: make a 4-bit AWQ checkpoint from a float InternVL3 checkpoint.

Method (AWQ, Lin et al.): run calibration images and text through the real model, then block by
block collect the inputs of the decoder's linears and, for each group of linears that share an
input, search per-input-channel scales s = mean|x|^α (α on a grid in [0, 1]) that minimise the
error of the whole decoder block's output when those linears are quantized. The best scales are
folded into the preceding norm (or linear), then an optional clipping search shrinks each group's
range, and the weights are quantized per group (SPEC §2 quantizer) and packed in the AWQ GEMM
layout. RTN skips the searches. The output is the published layout (lmdeploy's InternVL3-*-AWQ):
`quantization_config` under `llm_config`, fp16 for everything that stays 16-bit.

Only one decoder block's activations are alive at a time, next to the model itself.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from .chat.template import MediaSpec, PromptBuilder
from .engine.config import ModelConfig, read_config_json
from .engine.language import DecoderLayer, Qwen2ForCausalLM
from .engine.loader import LoadedModel, load_model
from .errors import UsageError
from .media.image import load_image, normalize_tiles
from .quant.awq_format import dequantize_awq, quantize_rtn

ALPHA_GRID = 20  # α = 0, 1/20, … , 19/20 (as AutoAWQ)
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5  # try clipping each group's range down to half
CLIP_ROWS = 512  # calibration rows used by the clipping search
SHARD_BYTES = 4 << 30
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.json", "chat_template.jinja",
    "generation_config.json", "preprocessor_config.json",
)  # fmt: skip

CALIBRATION_TEXT = [
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
    "In 1905, Albert Einstein published four papers that changed physics: on the photoelectric "
    "effect, Brownian motion, special relativity and the equivalence of mass and energy.",
    "To make bread, mix flour, water, salt and yeast, knead for ten minutes, let the dough rise, "
    "shape it, and bake at 230 °C until the crust is deep brown.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "人工智能是计算机科学的一个分支，它试图理解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。",
    "The picture shows a red circle in the upper left, a blue square near the centre and a small "
    "green triangle at the bottom right, all on a light grey background.",
    "Q: What is the capital of France? A: Paris. Q: And of Japan? A: Tokyo.",
    "Photosynthesis converts light energy into chemical energy: carbon dioxide and water become "
    "glucose and oxygen inside the chloroplasts of plant cells.",
    "| year | revenue | profit |\n|---|---|---|\n| 2021 | 4.2 | 0.8 |\n| 2022 | 5.1 | 1.1 |",
    "Dear team, the meeting moves to Thursday at 3 pm; please bring the quarterly figures.",
    "La tour Eiffel a été construite pour l'Exposition universelle de 1889 à Paris.",
    "A video of a cat jumping onto a table, knocking over a glass of water, then running away.",
]
QUESTIONS = [
    "Describe this image in detail.",
    "What objects can you see, and where are they?",
    "What colours dominate the picture?",
    "Is there any text in the image? Read it.",
]


# ---- calibration data -----------------------------------------------------------------------


def synthetic_image(rng: random.Random, size: int = 448) -> Image.Image:
    """Shapes, gradients, lines and text on a random background: varied, deterministic content."""
    w, h = rng.choice([(size, size), (size * 2, size), (size, size * 2)])
    image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 12)):
        color = tuple(rng.randrange(256) for _ in range(3))
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w, x0 + rng.randint(10, w // 2)), min(h, y0 + rng.randint(10, h // 2))
        kind = rng.choice(["ellipse", "rectangle", "line", "polygon", "text"])
        if kind == "ellipse":
            draw.ellipse([x0, y0, x1, y1], fill=color)
        elif kind == "rectangle":
            draw.rectangle([x0, y0, x1, y1], fill=color)
        elif kind == "line":
            draw.line([x0, y0, x1, y1], fill=color, width=rng.randint(1, 12))
        elif kind == "polygon":
            draw.polygon([(rng.randrange(w), rng.randrange(h)) for _ in range(rng.randint(3, 6))], fill=color)
        else:
            draw.text((x0, y0), rng.choice(CALIBRATION_TEXT)[:30], fill=color)
    return image


@dataclass
class Sample:
    ids: list[int]
    pixel_values: torch.Tensor | None  # tiles for the <image> run in ids


def calibration_samples(
    builder: PromptBuilder, tokenizer, count: int, seed: int = 0, calib_dir: Path | None = None, max_tiles: int = 2
) -> list[Sample]:
    """`count` prompts + answers, half of them with an image (built-in, or from `calib_dir`)."""
    rng = random.Random(seed)
    texts, images = list(CALIBRATION_TEXT), []
    if calib_dir is not None:
        if not calib_dir.is_dir():
            raise UsageError(f"--calib {calib_dir} is not a folder; give a folder of images and .txt files")
        images = sorted(p for p in calib_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp"))
        texts += [p.read_text(encoding="utf-8", errors="replace")[:2000] for p in sorted(calib_dir.glob("*.txt"))]
    samples = []
    for i in range(count):
        answer = tokenizer.encode(rng.choice(texts))
        if i % 2 == 0:
            if images:
                tiles = load_image(images[(i // 2) % len(images)], max_tiles=max_tiles).pixel_values
            else:
                tiles = normalize_tiles([synthetic_image(rng)])
            ids = builder.first_turn(rng.choice(QUESTIONS), [MediaSpec("image", tiles.shape[0])]) + answer
            samples.append(Sample(ids, tiles))
        else:
            ids = builder.first_turn(rng.choice(CALIBRATION_TEXT[:6]) + " Continue.", []) + answer
            samples.append(Sample(ids, None))
    return samples


# ---- running one block ----------------------------------------------------------------------


def first_block_inputs(loaded: LoadedModel, samples: Sequence[Sample]) -> list[torch.Tensor]:
    """Token embeddings (image features in place) for each sample: the input of decoder block 0."""
    model = loaded.model
    out = []
    with torch.inference_mode():
        for s in samples:
            features = model.encode_images(s.pixel_values) if s.pixel_values is not None else None
            out.append(model.embed(torch.tensor(s.ids, device=model.device), features))
    return out


def run_block(lm: Qwen2ForCausalLM, layer: DecoderLayer, h: torch.Tensor) -> torch.Tensor:
    """A decoder block over a whole sequence from position 0, with a private K/V scratch cache."""
    t = h.shape[1]
    positions = torch.arange(t, device=h.device)
    shape = (1, lm.cfg.num_kv_heads, t, lm.cfg.head_dim)
    k, v = torch.empty(shape, device=h.device, dtype=h.dtype), torch.empty(shape, device=h.device, dtype=h.dtype)
    return layer(h, lm.cos[positions], lm.sin[positions], positions, t, "causal", k, v)


def block_error(lm, layer, inputs, targets) -> float:
    err = 0.0
    for h, y in zip(inputs, targets):
        err += (run_block(lm, layer, h) - y).float().pow(2).mean().item()
    return err / len(inputs)


def collect_linear_inputs(lm, layer, inputs) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Rows fed to each of the block's linears, concatenated over the calibration samples."""
    rows: dict[str, list[torch.Tensor]] = {"qkv": [], "o": [], "gate_up": [], "down": []}
    modules = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj, "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj}
    hooks = [m.register_forward_hook(lambda _m, args, _o, key=key: rows[key].append(args[0].reshape(-1, args[0].shape[-1])))
             for key, m in modules.items()]  # fmt: skip
    try:
        outputs = [run_block(lm, layer, h) for h in inputs]
    finally:
        for hook in hooks:
            hook.remove()
    return {k: torch.cat(v) for k, v in rows.items()}, outputs


# ---- quantizing weights ---------------------------------------------------------------------


def fake_quantize(weight_out_in: torch.Tensor, group_size: int, clip: tuple | None = None) -> torch.Tensor:
    """The weight after a 4-bit round trip (nn.Linear layout in, same layout out)."""
    clip_max, clip_min = clip if clip is not None else (None, None)
    qweight, qzeros, scales = quantize_rtn(weight_out_in.t(), group_size, clip_max, clip_min)
    return dequantize_awq(qweight, qzeros, scales, group_size, dtype=weight_out_in.dtype).t()


def search_scales(lm, layer, linears: Sequence[torch.nn.Linear], x: torch.Tensor, inputs, targets, group_size: int) -> torch.Tensor:
    """The per-input-channel scales (α grid) with the least block-output error for these linears."""
    x_mean = x.abs().float().mean(dim=0)
    originals = [lin.weight.data.clone() for lin in linears]
    best_err, best_scales = math.inf, torch.ones_like(x_mean)
    try:
        for step in range(ALPHA_GRID):
            alpha = step / ALPHA_GRID
            scales = x_mean.pow(alpha).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            s = scales.to(originals[0].dtype)
            for lin, w in zip(linears, originals):
                lin.weight.data = fake_quantize(w * s, group_size) / s
            err = block_error(lm, layer, inputs, targets)
            if err < best_err:
                best_err, best_scales = err, scales
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    return best_scales


def search_clip(weight_out_in: torch.Tensor, x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (group, output) clip range shrink that minimises that group's partial-output error."""
    n, k = weight_out_in.shape
    groups = k // group_size
    rows = x[torch.linspace(0, x.shape[0] - 1, min(CLIP_ROWS, x.shape[0])).long()].float()
    xg = rows.view(-1, groups, group_size)  # [R, G, g]
    w = weight_out_in.float().view(n, groups, group_size)
    w_max, w_min = w.amax(dim=-1), w.amin(dim=-1)  # [N, G]
    best_max, best_min = w_max.clone(), w_min.clone()
    best_err = torch.full_like(w_max, math.inf)
    ref_out = torch.einsum("rgk,ngk->rng", xg, w)
    for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        ratio = 1 - step / CLIP_GRID
        c_max, c_min = w_max * ratio, w_min * ratio
        wq = fake_quantize(weight_out_in.float(), group_size, (c_max.t().contiguous(), c_min.t().contiguous()))
        out = torch.einsum("rgk,ngk->rng", xg, wq.view(n, groups, group_size))
        err = (out - ref_out).pow(2).mean(dim=0)  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, c_max, best_max)
        best_min = torch.where(better, c_min, best_min)
    return best_max.t().contiguous(), best_min.t().contiguous()


def _fused_parts(cfg: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    t = cfg.text
    q, kv, f = t.q_size, t.kv_size, t.intermediate_size
    return {
        "self_attn.qkv_proj": [("self_attn.q_proj", 0, q), ("self_attn.k_proj", q, q + kv), ("self_attn.v_proj", q + kv, q + 2 * kv)],
        "self_attn.o_proj": [("self_attn.o_proj", 0, t.hidden_size)],
        "mlp.gate_up_proj": [("mlp.gate_proj", 0, f), ("mlp.up_proj", f, 2 * f)],
        "mlp.down_proj": [("mlp.down_proj", 0, t.hidden_size)],
    }


def quantize_model(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    method: str = "awq",
    group_size: int = 128,
    clip: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize the decoder linears in place (weights become their 4-bit round trip, AWQ scales are
    folded into the norms) and return the packed AWQ tensors under canonical checkpoint names."""
    if method not in ("awq", "rtn"):
        raise UsageError(f"unknown method {method!r}; use awq or rtn")
    model, cfg = loaded.model, loaded.config
    if cfg.quant is not None:
        raise UsageError("the source checkpoint is already quantized; quantize a 16-bit checkpoint")
    lm = model.language_model
    t = cfg.text
    for dim, what in ((t.hidden_size, "hidden size"), (t.intermediate_size, "intermediate size")):
        if dim % group_size:
            raise UsageError(f"group size {group_size} does not divide the model's {what} {dim}; use a divisor such as 64 or 32")
    parts = _fused_parts(cfg)
    packed: dict[str, torch.Tensor] = {}
    inputs = first_block_inputs(loaded, samples) if method == "awq" else []
    with torch.inference_mode():
        for index, layer in enumerate(lm.model.layers):
            if method == "awq":
                x, targets = collect_linear_inputs(lm, layer, inputs)
                _apply_awq_scales(lm, layer, x, inputs, targets, group_size)
                x, targets = collect_linear_inputs(lm, layer, inputs)  # inputs after scaling
            prefix = f"language_model.model.layers.{index}"
            for fused, pieces in parts.items():
                linear = layer.get_submodule(fused)
                w = linear.weight.data
                clip_range = None
                if method == "awq" and clip and fused != "self_attn.qkv_proj":  # q/k ranges stay intact (attention scores)
                    key = {"self_attn.o_proj": "o", "mlp.gate_up_proj": "gate_up", "mlp.down_proj": "down"}[fused]
                    clip_range = search_clip(w, x[key], group_size)
                clip_max, clip_min = clip_range if clip_range is not None else (None, None)
                qweight, qzeros, scales = quantize_rtn(w.t(), group_size, clip_max, clip_min)
                linear.weight.data = dequantize_awq(qweight, qzeros, scales, group_size, dtype=w.dtype).t().contiguous()
                for name, start, end in pieces:
                    packed[f"{prefix}.{name}.qweight"] = qweight[:, start // 8 : end // 8].contiguous().cpu()
                    packed[f"{prefix}.{name}.qzeros"] = qzeros[:, start // 8 : end // 8].contiguous().cpu()
                    packed[f"{prefix}.{name}.scales"] = scales[:, start:end].contiguous().cpu()
            if method == "awq":
                inputs = targets  # the next block sees this block's (scaled, float) outputs
            if progress:
                progress(index + 1, len(lm.model.layers))
    return packed


def _apply_awq_scales(lm, layer, x, inputs, targets, group_size) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    # q/k/v share the input norm; gate/up share the post-attention norm; down's input is up's output
    s = search_scales(lm, layer, [attn.qkv_proj], x["qkv"], inputs, targets, group_size)
    _fold(layer.input_layernorm.weight, [attn.qkv_proj.weight], s)
    s = search_scales(lm, layer, [mlp.gate_up_proj], x["gate_up"], inputs, targets, group_size)
    _fold(layer.post_attention_layernorm.weight, [mlp.gate_up_proj.weight], s)
    s = search_scales(lm, layer, [mlp.down_proj], x["down"], inputs, targets, group_size)
    up_rows = mlp.gate_up_proj.weight.data[mlp.intermediate_size :]
    up_rows.div_(s.to(up_rows.dtype)[:, None])
    mlp.down_proj.weight.data.mul_(s.to(mlp.down_proj.weight.dtype))
    # o_proj's input is v_proj's output; with grouped-query attention (all InternVL3 sizes) the
    # shapes differ and AWQ leaves it unscaled, as AutoAWQ does


def _fold(prev_weight: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor) -> None:
    prev_weight.data.div_(s.to(prev_weight.dtype))
    for w in weights:
        w.data.mul_(s.to(w.dtype))


# ---- writing the checkpoint -------------------------------------------------------------------


def float_tensors(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Everything that stays 16-bit, under canonical names (fused q/k/v biases split back)."""
    cfg = loaded.config
    parts = _fused_parts(cfg)["self_attn.qkv_proj"]
    out = {}
    for name, tensor in loaded.model.named_parameters():
        if ".self_attn.qkv_proj.bias" in name:
            prefix = name.removesuffix("self_attn.qkv_proj.bias")
            for part, start, end in parts:
                out[f"{prefix}{part}.bias"] = tensor.data[start:end]
        elif name.startswith("language_model.model.layers.") and name.endswith("_proj.weight"):
            continue  # quantized
        elif name == "language_model.lm_head.weight" and cfg.text.tie_word_embeddings:
            continue
        else:
            out[name] = tensor.data
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in out.items()}


def original_config(src_dir: Path, cfg: ModelConfig, group_size: int) -> dict:
    """The source config in the original layout, with AWQ's quantization_config under llm_config."""
    raw = read_config_json(src_dir)
    if cfg.layout == "original":
        out = json.loads(json.dumps(raw))
    else:
        v, t = raw["vision_config"], dict(raw["text_config"])
        out = {
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "downsample_ratio": cfg.downsample_ratio,
            "ps_version": "v2",
            "select_layer": -1,
            "template": "internvl2_5",
            "force_image_size": cfg.image_size,
            "max_dynamic_patch": cfg.max_dynamic_patch,
            "use_thumbnail": cfg.use_thumbnail,
            "vision_config": {
                "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                "hidden_size": cfg.vision.hidden_size, "num_hidden_layers": cfg.vision.num_layers,
                "num_attention_heads": cfg.vision.num_heads, "intermediate_size": cfg.vision.intermediate_size,
                "norm_type": cfg.vision.norm_type, "layer_norm_eps": cfg.vision.norm_eps,
                "qkv_bias": cfg.vision.qkv_bias, "qk_normalization": cfg.vision.qk_norm,
                "image_size": cfg.image_size, "patch_size": cfg.vision.patch_size, "hidden_act": v.get("hidden_act", "gelu"),
            },  # fmt: skip
            "llm_config": {**t, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
        }
        if cfg.system_message is None:
            out["system_message"] = ""  # the -hf template has no system prompt; keep it that way
    out["llm_config"]["quantization_config"] = {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group_size, "zero_point": True,
    }  # fmt: skip
    out["llm_config"]["torch_dtype"] = "float16"
    out["torch_dtype"] = "float16"
    return out


def write_checkpoint(dst: Path, config: dict, tensors: dict[str, torch.Tensor], src_dir: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards, current, size = [], [], 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file({n: tensors[n] for n in shards[0]}, dst / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in shard}, dst / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dst / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, dst / name)


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    method: str = "awq",
    group_size: int = 128,
    samples: int = 32,
    calib_dir: str | Path | None = None,
    device: str = "auto",
    clip: bool = True,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.exists() and any(dst.iterdir()):
        raise UsageError(f"{dst} exists and is not empty; choose a new output folder")
    if samples < 1:
        raise UsageError("--samples must be at least 1")
    # fp32 on CPU (bf16 matmuls are slow there), bf16 on CUDA
    loaded = load_model(src, device=device, dtype="auto", max_context=4096, cuda_graphs=False)
    builder = PromptBuilder(loaded.tokenizer, loaded.config.system_message, loaded.config.tokens_per_tile)
    data = calibration_samples(builder, loaded.tokenizer, samples, seed, Path(calib_dir) if calib_dir else None)
    packed = quantize_model(loaded, data, method, group_size, clip, progress)
    tensors = {**float_tensors(loaded), **packed}
    write_checkpoint(dst, original_config(src, loaded.config, group_size), tensors, src)
    return dst


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="internvl-chat quantize",
        description="Quantize an InternVL3 checkpoint's LLM to 4-bit AWQ (published GEMM layout); "
        "the vision encoder and projector stay 16-bit.",
    )
    p.add_argument("src", help="16-bit checkpoint folder (original or -hf layout)")
    p.add_argument("dst", help="output folder (new or empty)")
    p.add_argument("--method", choices=["awq", "rtn"], default="awq", help="awq: activation-aware scales + clipping (default); rtn: round to nearest")
    p.add_argument("--group-size", type=int, default=128, help="weights per scale/zero group along the input (default 128)")
    p.add_argument("--calib", metavar="DIR", help="calibration images and .txt files (default: built-in generated data)")
    p.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--no-clip", action="store_true", help="skip the weight-clipping search")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    start = time.perf_counter()
    with Progress(
        TextColumn("quantizing blocks"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        transient=not sys.stderr.isatty(), console=None,
    ) as bar:  # fmt: skip
        task = bar.add_task("blocks", total=None)
        dst = quantize_checkpoint(
            args.src, args.dst, args.method, args.group_size, args.samples, args.calib, args.device,
            clip=not args.no_clip, seed=args.seed, progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    print(f"wrote {dst} ({args.method}, group {args.group_size}) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


