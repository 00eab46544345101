"""`internvl-chat quantize SRC DST`: make a 4-bit AWQ checkpoint from a float InternVL3 checkpoint.

Method (AWQ, Lin et al.; the losses and grids of AutoAWQ): run calibration images and text through
the real model, then block by block collect the inputs of the decoder's linears and, for each group
of linears that share an input, search per-input-channel scales s = mean|x|^α (α on a grid in
[0, 1]) that minimise the output error of the module they feed (attention for q/k/v, the MLP for
gate/up, the linear itself for down) when those linears are quantized. The best scales are folded
into the preceding norm (or linear), then an optional clipping search shrinks each group's range,
and the weights are quantized per group (SPEC §2 quantizer) and packed in the AWQ GEMM layout. RTN
skips calibration and the searches. The output is the published layout (lmdeploy's
InternVL3-*-AWQ): `quantization_config` under `llm_config`, fp16 for everything that stays 16-bit.

Where the time goes, and how it is kept small without changing what is searched: the scale
statistics (mean|x|) and the clip search use every calibration token, but the α-grid losses (20
forward passes of a module per group of linears) are measured on at most SEARCH_TOKENS tokens. The
clip error goes through per-group Gram matrices X_gᵀX_g (all groups of a weight searched at once,
all rows at the cost of a few), and a linear's own output error too where that is cheaper.

Only one decoder block's activations are alive at a time, next to the model itself. The output is
written to a hidden folder next to DST and renamed to DST at the end (inside DST where that is an
existing empty folder, its files moved up at the end, config.json last): an interrupted run leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from safetensors.torch import save_file

from .chat.template import MediaSpec, PromptBuilder
from .engine.checkpoint import find_weight_files
from .engine.config import AWQ_GROUP_MULTIPLE, ModelConfig, load_config, read_config_json
from .engine.language import Attention, DecoderLayer, Qwen2ForCausalLM
from .engine.loader import LoadedModel, load_model, resolve_device
from .errors import CheckpointError, OneLineParser, UsageError
from .files import MiB, current_umask, expand_home, read_bytes_file, sniff_binary, visible
from .media.image import load_image, normalize_tiles
from .quant.awq_format import SCALE_MIN, dequantize_awq, quantize_rtn

ALPHA_GRID = 20  # α = 0, 1/20, … , 19/20 (as AutoAWQ)
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5  # try clipping each group's range down to half (as AutoAWQ)
SEARCH_TOKENS = 2048  # tokens behind each α-grid loss (AutoAWQ's clip search uses 512)
STANDARD_GROUP_SIZES = (32, 64, 128, 256)  # the ones the int4 kernels take; 128 is the published default
MAX_ANSWER_TOKENS = 512  # calibration text per sample
MAX_SAMPLES = 1024  # all are held in memory (an image sample's tiles are megabytes); AWQ needs 32-128
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


# ---- progress -------------------------------------------------------------------------------

Step = Callable[..., None]  # step(n=1, detail=""): n more units done; detail says what is running now


def _no_step(n: int = 1, detail: str = "") -> None:
    pass


class Progress:
    """The run's phases, each with a real total. This base class shows nothing (library use, tests);
    `BarProgress` draws rich bars on a terminal, `LineProgress` prints a few plain lines elsewhere."""

    @contextmanager
    def phase(self, name: str, total: int, unit: str) -> Iterator[Step]:
        done = 0
        start = time.perf_counter()
        self.begin(name, total, unit)

        def step(n: int = 1, detail: str = "") -> None:
            nonlocal done
            done += n
            self.update(name, done, total, unit, detail)

        yield step
        self.end(name, total, unit, time.perf_counter() - start)

    def begin(self, name: str, total: int, unit: str) -> None:
        pass

    def update(self, name: str, done: int, total: int, unit: str, detail: str) -> None:
        pass

    def end(self, name: str, total: int, unit: str, seconds: float) -> None:
        pass


class LineProgress(Progress):
    """Plain lines for logs and pipes: one per finished phase, and one every `every_s` seconds of a
    long phase."""

    def __init__(self, stream: TextIO, every_s: float = 30.0):
        self.stream, self.every_s, self._last = stream, every_s, 0.0

    def _print(self, line: str) -> None:
        print(f"quantize: {line}", file=self.stream, flush=True)

    def begin(self, name: str, total: int, unit: str) -> None:
        self._last = time.perf_counter()

    def update(self, name: str, done: int, total: int, unit: str, detail: str) -> None:
        if time.perf_counter() - self._last >= self.every_s:
            self._last = time.perf_counter()
            self._print(f"{name}: {done}/{total} {unit}" + (f" ({detail})" if detail else ""))

    def end(self, name: str, total: int, unit: str, seconds: float) -> None:
        self._print(f"{name}: {total} {unit} in {seconds:.1f} s")


class BarProgress(Progress):
    """One rich progress bar per phase (finished ones stay, with their time); use as a context manager."""

    def __init__(self, console):
        from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bars = RichProgress(
            TextColumn("{task.description:<19}"), BarColumn(bar_width=28), TextColumn("{task.fields[count]:>14}"),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("[dim]{task.fields[detail]}"),
            console=console, transient=False,
        )  # fmt: skip
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> BarProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bars.stop()

    def begin(self, name: str, total: int, unit: str) -> None:
        self._tasks[name] = self._bars.add_task(name, total=total, count=f"0/{total} {unit}", detail="")

    def update(self, name: str, done: int, total: int, unit: str, detail: str) -> None:
        self._bars.update(self._tasks[name], completed=done, count=f"{done}/{total} {unit}", detail=detail)

    def end(self, name: str, total: int, unit: str, seconds: float) -> None:
        self._bars.update(self._tasks[name], completed=total, count=f"{total}/{total} {unit}", detail="")
        self._bars.stop_task(self._tasks[name])


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


@dataclass
class Calibration:
    """What a --calib folder gives: the tiles of the images the samples use, and its texts."""

    tiles: list[torch.Tensor]
    texts: list[str]


def calibration_tiles(images: Sequence[Path], max_tiles: int = 2, step: Step = _no_step) -> list[torch.Tensor]:
    """The images decoded and tiled; done before the model loads: a damaged or unreadable image
    stopped the run only once the model was loaded (minutes for a large one)."""
    tiles = []
    for path in images:
        tiles.append(load_image(path, max_tiles=max_tiles).pixel_values)
        step()
    return tiles


def calibration_samples(
    builder: PromptBuilder,
    tokenizer,
    count: int,
    seed: int = 0,
    calib: Calibration | None = None,
    step: Step = _no_step,
) -> list[Sample]:
    """`count` prompts + answers, half of them with an image (built-in, or from `calib`)."""
    rng = random.Random(seed)
    texts, images = list(CALIBRATION_TEXT), []
    if calib is not None:
        images = calib.tiles
        texts += calib.texts
    samples = []
    for i in range(count):
        answer = tokenizer.encode(rng.choice(texts))[:MAX_ANSWER_TOKENS]
        if i % 2 == 0:
            if images:
                tiles = images[(i // 2) % len(images)]
            else:
                tiles = normalize_tiles([synthetic_image(rng)])
            ids = builder.first_turn(rng.choice(QUESTIONS), [MediaSpec("image", tiles.shape[0])]) + answer
            samples.append(Sample(ids, tiles))
        else:
            ids = builder.first_turn(rng.choice(CALIBRATION_TEXT[:6]) + " Continue.", []) + answer
            samples.append(Sample(ids, None))
        step()
    return samples


CALIB_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def calibration_files(calib_dir: Path) -> tuple[list[Path], list[str]]:
    """The images of a --calib folder and the texts of its .txt files (`calibration_text`)."""
    shown = visible(str(calib_dir))
    if not calib_dir.is_dir():
        raise UsageError(f"--calib {shown} is not a folder; give a folder of images and .txt files")
    try:
        entries = sorted(calib_dir.iterdir())
    except OSError as e:
        raise UsageError(f"cannot list --calib {shown} ({e.strerror or e}); check its permissions") from None
    images = [p for p in entries if p.suffix.lower() in CALIB_IMAGE_SUFFIXES and p.is_file()]
    texts = [calibration_text(p) for p in entries if p.suffix.lower() == ".txt"]
    if not images and not texts:
        raise UsageError(f"--calib {shown} has no images ({', '.join(CALIB_IMAGE_SUFFIXES)}) or .txt files")
    return images, texts


def calibration_text(path: Path) -> str:
    """The first 2,000 characters of a --calib .txt file (a regular file of at most 1 MiB),
    undecodable bytes replaced; one that holds binary data (an image or archive named .txt) is
    refused: it was tokenized as calibration text without a word, skewing the statistics the
    scales are searched on."""
    data = read_bytes_file(path, "calibration text", limit=MiB)
    kind = sniff_binary(data)
    if kind is not None:
        raise UsageError(f"calibration text {visible(str(path))} holds {kind}, not text; take it out of the --calib folder")
    return data.decode("utf-8", errors="replace")[:2000]


# ---- running one block ----------------------------------------------------------------------


def first_block_inputs(loaded: LoadedModel, samples: Sequence[Sample], step: Step = _no_step) -> list[torch.Tensor]:
    """Token embeddings (image features in place) for each sample: the input of decoder block 0."""
    model = loaded.model
    out = []
    with torch.inference_mode():
        for s in samples:
            features = model.encode_images(s.pixel_values) if s.pixel_values is not None else None
            # cut to the model's positions (a short-context model): RoPE tables end there
            out.append(model.embed(torch.tensor(s.ids, device=model.device), features)[:, : model.max_seq_len])
            step()
    return out


def _scratch_kv(lm: Qwen2ForCausalLM, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, lm.cfg.num_kv_heads, h.shape[1], lm.cfg.head_dim)
    return torch.empty(shape, device=h.device, dtype=h.dtype), torch.empty(shape, device=h.device, dtype=h.dtype)


def run_block(lm: Qwen2ForCausalLM, layer: DecoderLayer, h: torch.Tensor) -> torch.Tensor:
    """A decoder block over a whole sequence from position 0, with a private K/V scratch cache."""
    t = h.shape[1]
    positions = torch.arange(t, device=h.device)
    return layer(h, lm.cos[:t], lm.sin[:t], positions, t, "causal", *_scratch_kv(lm, h))


def run_attention(lm: Qwen2ForCausalLM, attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The attention module (q/k/v, RoPE, causal attention, o_proj) over a normed sequence from position 0."""
    t = x.shape[1]
    positions = torch.arange(t, device=x.device)
    return attn(x, lm.cos[:t], lm.sin[:t], positions, t, "causal", *_scratch_kv(lm, x))


def collect_linear_inputs(lm, layer, inputs) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Rows fed to each of the block's linears, concatenated over the calibration samples, and the
    block's outputs (the next block's inputs)."""
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


def spread_rows(x: torch.Tensor, limit: int) -> torch.Tensor:
    """At most `limit` rows of x, evenly spaced (every sample contributes)."""
    if x.shape[0] <= limit:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, limit, device=x.device).long()]


# ---- quantizing weights ---------------------------------------------------------------------


def fake_quantize(weight_out_in: torch.Tensor, group_size: int, clip: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The weight after the 4-bit round trip of `quantize_rtn` (the same formula, without packing),
    nn.Linear layout in and out; `clip` = (max, min) per [output, group] replaces the group range."""
    n, k = weight_out_in.shape
    w = weight_out_in.float().reshape(n, k // group_size, group_size)
    w_max, w_min = clip if clip is not None else (w.amax(dim=-1), w.amin(dim=-1))
    scale = ((w_max - w_min) / 15).clamp(min=SCALE_MIN).half().float().unsqueeze(-1)
    zero = (-torch.round(w_min.unsqueeze(-1) / scale)).clamp(0, 15)
    q = (torch.round(w / scale) + zero).clamp(0, 15)
    return ((q - zero) * scale).reshape(n, k).to(weight_out_in.dtype)


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^α, normalised so that max·min = 1 (as AutoAWQ)."""
    scales = x_mean.pow(alpha).clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def search_scales(linear: torch.nn.Linear, x: torch.Tensor, error: Callable[[], torch.Tensor], group_size: int) -> torch.Tensor:
    """The per-input-channel scales on the α grid whose 4-bit round trip of `linear` gives the least
    `error()` (measured with the linear's weight temporarily replaced)."""
    x_mean = x.abs().float().mean(dim=0)
    original = linear.weight.data
    best_err, best_scales = math.inf, torch.ones_like(x_mean)
    try:
        for step in range(ALPHA_GRID):
            scales = awq_scales(x_mean, step / ALPHA_GRID)
            s = scales.to(original.dtype)
            linear.weight.data = fake_quantize(original * s, group_size) / s
            err = float(error())
            if err < best_err:
                best_err, best_scales = err, scales
    finally:
        linear.weight.data = original
    return best_scales


def linear_error(x: torch.Tensor, reference: torch.Tensor, linear: torch.nn.Linear, calls: int = ALPHA_GRID) -> Callable[[], torch.Tensor]:
    """Mean squared output error of `linear` (its current weight) against `reference`'s on rows x,
    for `calls` evaluations. Through the Gram matrix XᵀX when that costs fewer operations (few input
    channels: the demo model), else row by row (wide inputs: down_proj of real models); same value."""
    rows, k = x.shape
    n = reference.shape[0]
    if rows * k * k + calls * n * k * k < calls * rows * k * n:
        gram = (x.t().float() @ x.float()) / rows  # [K, K]

        def through_gram() -> torch.Tensor:
            delta = linear.weight.float() - reference.float()  # [N, K]
            return ((delta @ gram) * delta).sum() / delta.shape[0]

        return through_gram

    def row_by_row() -> torch.Tensor:
        return (x @ (linear.weight - reference).t()).float().pow(2).mean()

    return row_by_row


def group_grams(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per input group g: X_gᵀX_g / rows, [G, g, g] — all the clip search needs to know about the inputs."""
    xg = x.float().view(x.shape[0], -1, group_size).transpose(0, 1)  # [G, R, g]
    return xg.transpose(1, 2) @ xg / x.shape[0]


def search_clip(weight_out_in: torch.Tensor, grams: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (output, group) range shrink with the least squared partial-output error, vectorised over
    all groups: for weight error d of a group, the error over all calibration rows is d·C_g·dᵀ.
    Returns (max, min) [N, G]; the first grid point is the unclipped range, so it never does worse."""
    n, k = weight_out_in.shape
    w = weight_out_in.float().view(n, k // group_size, group_size)
    w_max, w_min = w.amax(dim=-1), w.amin(dim=-1)  # [N, G]
    best_max, best_min = w_max.clone(), w_min.clone()
    best_err = torch.full_like(w_max, math.inf)
    for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        ratio = 1 - step / CLIP_GRID
        c_max, c_min = w_max * ratio, w_min * ratio
        d = fake_quantize(w.view(n, k), group_size, (c_max, c_min)).view(n, -1, group_size) - w
        err = (torch.einsum("ngk,gkl->ngl", d, grams) * d).sum(dim=-1)  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, c_max, best_max)
        best_min = torch.where(better, c_min, best_min)
    return best_max, best_min


def _fused_parts(cfg: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    t = cfg.text
    q, kv, f = t.q_size, t.kv_size, t.intermediate_size
    return {
        "self_attn.qkv_proj": [("self_attn.q_proj", 0, q), ("self_attn.k_proj", q, q + kv), ("self_attn.v_proj", q + kv, q + 2 * kv)],
        "self_attn.o_proj": [("self_attn.o_proj", 0, t.hidden_size)],
        "mlp.gate_up_proj": [("mlp.gate_proj", 0, f), ("mlp.up_proj", f, 2 * f)],
        "mlp.down_proj": [("mlp.down_proj", 0, t.hidden_size)],
    }


AWQ_STEPS = ("collecting inputs", "scales q/k/v", "scales gate/up", "scales down", "clip ranges", "packing")


def awq_block(lm: Qwen2ForCausalLM, layer: DecoderLayer, inputs: list[torch.Tensor], group_size: int, clip: bool,
              detail: Callable[[str], None] = lambda _: None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:  # fmt: skip
    """AWQ for one decoder block, in place: search and fold the scales, then search clip ranges.
    Returns the clip ranges per fused linear and the block's float outputs (the next block's inputs)."""
    attn, mlp = layer.self_attn, layer.mlp
    detail(AWQ_STEPS[0])
    x, outputs = collect_linear_inputs(lm, layer, inputs)

    # q/k/v share the input norm. Error: the attention module's output over whole sequences
    # (RoPE and softmax see the rounding), on the first samples up to SEARCH_TOKENS tokens.
    detail(AWQ_STEPS[1])
    lengths = [h.shape[1] for h in inputs]
    count = max(1, sum(1 for total in itertools.accumulate(lengths) if total <= SEARCH_TOKENS))
    sequences = [seq[None] for seq in x["qkv"][: sum(lengths[:count])].split(lengths[:count])]
    reference = [run_attention(lm, attn, seq) for seq in sequences]

    def attention_error() -> torch.Tensor:
        err = sum((run_attention(lm, attn, seq) - ref).float().pow(2).sum() for seq, ref in zip(sequences, reference))
        return err / sum(ref.numel() for ref in reference)

    s_qkv = search_scales(attn.qkv_proj, x["qkv"], attention_error, group_size)
    _fold(layer.input_layernorm.weight, [attn.qkv_proj.weight], s_qkv)

    # gate/up share the post-attention norm. Error: the MLP's output (SiLU and down_proj included)
    detail(AWQ_STEPS[2])
    rows = spread_rows(x["gate_up"], SEARCH_TOKENS)
    mlp_reference = mlp(rows)
    s_gate_up = search_scales(mlp.gate_up_proj, x["gate_up"], lambda: (mlp(rows) - mlp_reference).float().pow(2).mean(), group_size)
    _fold(layer.post_attention_layernorm.weight, [mlp.gate_up_proj.weight], s_gate_up)

    # down's input is up's output (folding the gate/up scales left it unchanged). Error: its own output
    detail(AWQ_STEPS[3])
    down_reference = mlp.down_proj.weight.data.clone()
    down_rows = spread_rows(x["down"], SEARCH_TOKENS)
    s_down = search_scales(mlp.down_proj, x["down"], linear_error(down_rows, down_reference, mlp.down_proj), group_size)
    up_rows = mlp.gate_up_proj.weight.data[mlp.intermediate_size :]
    up_rows.div_(s_down.to(up_rows.dtype)[:, None])
    mlp.down_proj.weight.data.mul_(s_down.to(mlp.down_proj.weight.dtype))
    # o_proj's input is v_proj's output; with grouped-query attention (all InternVL3 sizes) the
    # shapes differ and AWQ leaves it unscaled, as AutoAWQ does

    clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if clip:  # on the scaled weights, with the inputs they now see (x / s)
        detail(AWQ_STEPS[4])
        # q/k/v keep their full range: the attention scores are sensitive to it (AutoAWQ skips q and
        # k; clipping v too measured 0.4 points lower on the demo model's eval, over three seeds)
        inputs_now = {"self_attn.o_proj": x["o"], "mlp.gate_up_proj": x["gate_up"] / s_gate_up.to(x["gate_up"].dtype),
                      "mlp.down_proj": x["down"] / s_down.to(x["down"].dtype)}  # fmt: skip
        for name, rows_now in inputs_now.items():
            clips[name] = search_clip(layer.get_submodule(name).weight.data, group_grams(rows_now, group_size), group_size)
    return clips, outputs


def _fold(prev_weight: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor) -> None:
    prev_weight.data.div_(s.to(prev_weight.dtype))
    for w in weights:
        w.data.mul_(s.to(w.dtype))


def check_group_size(cfg: ModelConfig, group_size: int | None) -> int:
    """The group size to use: the one asked for if it divides every quantized linear's input width
    and the loader takes it (a multiple of 32), or by default the largest standard one that does (128
    when it can). Refused in one line otherwise."""
    t = cfg.text
    widths = {"hidden size": t.hidden_size, "attention width (heads × head_dim)": t.q_size, "intermediate size": t.intermediate_size}
    outputs = {"hidden size": t.hidden_size, "query width": t.q_size, "key/value width": t.kv_size, "intermediate size": t.intermediate_size}
    for what, dim in outputs.items():
        if dim % 8:
            raise UsageError(f"the model's {what} {dim} is not a multiple of 8; the AWQ GEMM layout cannot store it")
    fitting = [g for g in STANDARD_GROUP_SIZES if all(dim % g == 0 for dim in widths.values())]
    if not fitting:  # 32 is one: no multiple of 32 divides them either, and the loader takes no other
        raise UsageError(f"the model's widths ({', '.join(str(d) for d in widths.values())}) are not all multiples of "
                         f"{AWQ_GROUP_MULTIPLE}, which every 4-bit group size needs; this model cannot be quantized")  # fmt: skip
    if group_size is None:
        return 128 if 128 in fitting else max(fitting)
    if group_size < 1:
        raise UsageError(f"--group-size must be positive, not {group_size}")
    for what, dim in widths.items():
        if dim % group_size:
            hint = f"use {' or '.join(map(str, sorted(fitting, reverse=True)))}"
            raise UsageError(f"group size {group_size} does not divide the model's {what} {dim}; {hint}")
    if group_size % AWQ_GROUP_MULTIPLE:  # the loader refuses it: the whole run would make an unloadable checkpoint
        hint = f"use {' or '.join(map(str, sorted(fitting, reverse=True)))}"
        raise UsageError(f"group size {group_size} is not a multiple of {AWQ_GROUP_MULTIPLE}, which the 4-bit loader needs; {hint}")
    return group_size


def quantize_model(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    method: str = "awq",
    group_size: int = 128,
    clip: bool = True,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize the decoder linears in place (weights become their 4-bit round trip, AWQ scales are
    folded into the norms) and return the packed AWQ tensors under canonical checkpoint names."""
    if method not in ("awq", "rtn"):
        raise UsageError(f"unknown method {method!r}; use awq or rtn")
    progress = progress or Progress()
    model, cfg = loaded.model, loaded.config
    if cfg.quant is not None:
        raise UsageError("the source checkpoint is already quantized; quantize a 16-bit checkpoint")
    group_size = check_group_size(cfg, group_size)
    lm = model.language_model
    layers = lm.model.layers
    parts = _fused_parts(cfg)
    packed: dict[str, torch.Tensor] = {}
    inputs: list[torch.Tensor] = []
    if method == "awq":
        with progress.phase("calibration forward", len(samples), "samples") as step:
            inputs = first_block_inputs(loaded, samples, step)
    name = "AWQ search" if method == "awq" else "RTN"
    with torch.inference_mode(), progress.phase(name, len(layers), "blocks") as step:
        for index, layer in enumerate(layers):
            where = f"block {index + 1}/{len(layers)}"
            clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            if method == "awq":
                clips, inputs = awq_block(lm, layer, inputs, group_size, clip, lambda what: step(0, f"{where}: {what}"))
                step(0, f"{where}: {AWQ_STEPS[-1]}")
            prefix = f"language_model.model.layers.{index}"
            for fused, pieces in parts.items():
                linear = layer.get_submodule(fused)
                w = linear.weight.data
                clip_max, clip_min = (c.t().contiguous() for c in clips[fused]) if fused in clips else (None, None)
                qweight, qzeros, scales = quantize_rtn(w.t(), group_size, clip_max, clip_min)
                linear.weight.data = dequantize_awq(qweight, qzeros, scales, group_size, dtype=w.dtype).t().contiguous()
                for piece, start, end in pieces:
                    packed[f"{prefix}.{piece}.qweight"] = qweight[:, start // 8 : end // 8].contiguous().cpu()
                    packed[f"{prefix}.{piece}.qzeros"] = qzeros[:, start // 8 : end // 8].contiguous().cpu()
                    packed[f"{prefix}.{piece}.scales"] = scales[:, start:end].contiguous().cpu()
            step(1, where)
    return packed


_FILE_NAMES = {".qkv_proj.": ".{q,k,v}_proj.", ".gate_up_proj.": ".{gate,up}_proj."}  # the engine fuses them


def _file_name(name: str) -> str:
    for fused, pieces in _FILE_NAMES.items():  # the names the weight file uses
        name = name.replace(fused, pieces)
    return name


def _is_quantized(name: str) -> bool:
    return name.startswith("language_model.model.layers.") and name.endswith("_proj.weight")


FP16_OVERFLOW = 65520.0  # magnitudes from here up round to inf in float16 (its largest value is 65,504)


def check_source_values(loaded: LoadedModel) -> None:
    """Refuse a source whose weights hold NaN or inf (quantizing it wrote a NaN scale and garbage
    4-bit values without a word), or whose tensors that stay 16-bit exceed float16's range, the type
    the AWQ layout stores them in (bf16 reaches 3e38: they were written as inf). Either way the output
    then failed in chat, with advice to re-download it. One pass in slices, so no copy the size of
    the embeddings is made."""
    with torch.inference_mode():
        for name, tensor in loaded.model.named_parameters():
            if not tensor.is_floating_point():
                continue
            largest = 0.0
            for part in tensor.reshape(-1).split(1 << 24):
                part_largest = float(part.abs().amax())
                if not math.isfinite(part_largest):  # amax passes a NaN on (max() would not)
                    raise CheckpointError(
                        f"the source checkpoint's tensor {visible(_file_name(name))} holds NaN or inf values: its weight file "
                        "is damaged; download it again before quantizing"
                    )
                largest = max(largest, part_largest)
            if largest >= FP16_OVERFLOW and not _is_quantized(name):
                raise CheckpointError(
                    f"the source checkpoint's tensor {visible(_file_name(name))} holds values beyond float16's range "
                    "(±65,504), the type the AWQ layout stores it in; keep this model in 16 bits"
                )


def check_written_range(tensors: dict[str, torch.Tensor], method: str) -> None:
    """The last word before writing: no float16 tensor of the output overflowed (a group's scale of
    a huge weight, a norm that AWQ's scales pushed past 65,504)."""
    for name, tensor in tensors.items():
        if tensor.dtype == torch.float16 and not all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(1 << 24)):
            advice = "try --method rtn, which does not rescale the weights" if method == "awq" else "keep this model in 16 bits"
            raise CheckpointError(
                f"the quantized tensor {visible(name)} exceeds float16's range (±65,504), the type the AWQ layout stores it in; {advice}"
            )


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
        elif _is_quantized(name):
            continue
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
            "min_dynamic_patch": cfg.min_dynamic_patch,
            "dynamic_image_size": cfg.dynamic_image_size,
            "use_thumbnail": cfg.use_thumbnail,
            "vision_config": {
                "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                "hidden_size": cfg.vision.hidden_size, "num_hidden_layers": cfg.vision.num_layers,
                "num_attention_heads": cfg.vision.num_heads, "intermediate_size": cfg.vision.intermediate_size,
                "norm_type": cfg.vision.norm_type, "layer_norm_eps": cfg.vision.norm_eps,
                "qkv_bias": cfg.vision.qkv_bias, "qk_normalization": cfg.vision.qk_norm,
                "image_size": cfg.image_size, "patch_size": cfg.vision.patch_size, "hidden_act": v.get("hidden_act", "gelu"),
            },  # fmt: skip
            # transformers ties an -hf head by the top-level flag (text_config's may say otherwise)
            "llm_config": {**t, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                           "tie_word_embeddings": cfg.text.tie_word_embeddings},
        }
        # transformers ≥ 5 keeps rope_theta under rope_parameters; the original layout's readers
        # (InternVL's own code, lmdeploy, transformers 4) read it at the top and default to 10,000
        out["llm_config"].setdefault("rope_theta", cfg.text.rope_theta)
        if cfg.system_message is None:
            out["system_message"] = ""  # the -hf template has no system prompt; keep it that way
    # one the source carried empty (or null) at the top would be read there first by tools that
    # look for it there; the published layout keeps it under llm_config only (SPEC §2)
    out.pop("quantization_config", None)
    out["llm_config"]["quantization_config"] = {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group_size, "zero_point": True,
    }  # fmt: skip
    for section in (out["llm_config"], out):  # transformers ≥ 5 names it dtype: one left at bfloat16 would contradict
        section["torch_dtype"] = "float16"
        if "dtype" in section:
            section["dtype"] = "float16"
    return out


def checkpoint_files(tensors: dict[str, torch.Tensor]) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) per safetensors file: one file, or shards of about SHARD_BYTES."""
    shards, current, size = [], [], 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    return [(f"model-{i:05d}-of-{len(shards):05d}.safetensors", shard) for i, shard in enumerate(shards, 1)]


def config_text(config: dict) -> str:
    """config.json's text: readable UTF-8, or all-ASCII escapes where the source config holds a
    lone surrogate (a JSON "\\ud800" escape in a key we do not read), which UTF-8 cannot encode;
    writing it failed with a traceback once the whole run was done."""
    text = json.dumps(config, indent=2, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(config, indent=2)  # the escapes as the source wrote them
    return text


def _save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file with the umask's permissions, its I/O failures as the OSError they are: safetensors
    raises its own SafetensorError ("… No space left on device (os error 28)"), which escaped the
    one-line write error (`_write_error`) as a traceback on a full disk."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        if found is None:  # not the disk's doing: a bug of ours, which a message about the disk would hide
            raise
        raise OSError(int(found.group(1)), os.strerror(int(found.group(1))), str(path)) from None
    # the library makes the file private (0600) whatever the umask: the rest of the checkpoint was
    # readable by others and the weights not, so a server run as another user could not load it
    os.chmod(path, 0o666 & ~current_umask())


def write_checkpoint(dst: Path, config: dict, tensors: dict[str, torch.Tensor], src_dir: Path, step: Step = _no_step) -> None:
    """The weight file(s), config.json and the tokenizer files into `dst`; `step()` after each file."""
    dst.mkdir(parents=True, exist_ok=True)
    files = checkpoint_files(tensors)
    for file, names in files:
        _save_weights({n: tensors[n] for n in names}, dst / file)
        step()
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": {n: file for file, names in files for n in names}}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dst / "config.json").write_text(config_text(config), encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, dst / name)
    step()


# ---- the command --------------------------------------------------------------------------------


def _staging_prefix(dst: Path) -> str:
    """The staging folder's name up to its random part: `dst`'s name, cut to 100 bytes. Whole, a
    valid name of 238 bytes or more made one over the file system's 255, and the output was
    refused as 'File name too long'."""
    name = dst.name
    while len(os.fsencode(name)) > 100:
        name = name[:-1]
    return f".{name}."


def staging_folder(dst: Path) -> Path:
    """Refuse an output folder we cannot use, before any work, and make the hidden folder that the
    checkpoint is written to: next to a new `dst` (renamed to it when complete), inside an empty
    one. Renaming over an existing folder failed at the end of the run where it is a mount point (a
    fresh disk: the checkpoint had been written to the disk above it) or its parent is not ours."""
    shown = visible(str(dst))
    where = dst
    try:
        if dst.is_symlink():
            raise UsageError(f"output {shown} is a symlink; give a new folder")
        if dst.exists():
            if not dst.is_dir():
                raise UsageError(f"output {shown} exists and is not a folder; choose a new output folder")
            entries = sorted(p.name for p in dst.iterdir())
            if entries and all(name.startswith(_staging_prefix(dst)) and name.endswith(".partial") for name in entries):
                # a run killed outright (SIGKILL, out of memory) leaves its hidden staging folder; `ls` shows nothing
                raise UsageError(f"output {shown} holds only {visible(entries[0])}, left by a quantize run that was killed "
                                 "(or is still running); delete it, or choose a new output folder")  # fmt: skip
            if entries:
                raise UsageError(f"output {shown} exists and is not empty; choose a new output folder")
        else:
            where = dst.parent
            where.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(dst), suffix=".partial", dir=where))
    except UsageError:
        raise
    except OSError as e:  # named by the user's paths, never the staging folder's
        inside = "" if where == dst else f" in {visible(str(where))}"
        raise UsageError(f"cannot write the output {shown}{inside} ({e.strerror or e}); "
                         "choose a folder you can write to") from None  # fmt: skip
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it private; the checkpoint should not be
    return staging


def publish(staging: Path, dst: Path) -> None:
    """Rename the finished staging folder to `dst`, or, staged inside `dst`, move its files there
    with config.json last (a folder without it is no checkpoint), taking them back out if a move
    fails or is interrupted."""
    moved: list[Path] = []
    try:
        if staging.parent != dst:
            os.rename(staging, dst)
            return
        if [p.name for p in dst.iterdir()] != [staging.name]:  # a move would replace (and mix with) what is there now
            raise UsageError(f"output {visible(str(dst))} is no longer empty (another run writing to it?); choose a new output folder")
        try:
            for entry in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
                moved.append(dst / entry.name)  # before the move: an interrupt right after it must not leave it
                os.rename(entry, dst / entry.name)
            os.rmdir(staging)
        except BaseException:
            for path in moved:
                path.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise UsageError(f"cannot create the output {visible(str(dst))} ({e.strerror or e}); choose a new output folder") from None


def _write_error(e: OSError, src: Path, dst: Path) -> UsageError:
    """One line for a failed write (a full disk, an I/O error) or a source file that could not be
    copied, named by the user's paths, never the staging folder's."""
    reason = e.strerror or str(e)
    if isinstance(e.filename, str) and Path(e.filename).parent == src:  # a tokenizer file of the source
        return UsageError(f"cannot read {visible(e.filename)} ({reason}); check the file and its permissions")
    advice = "free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the disk"
    return UsageError(f"cannot write the output {visible(str(dst))} ({reason}); {advice} or choose another output folder")


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    method: str = "awq",
    group_size: int | None = None,
    samples: int = 32,
    calib_dir: str | Path | None = None,
    device: str = "auto",
    clip: bool = True,
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Quantize `src` into the new folder `dst`. Everything that can be checked without the weights
    (flags, group size against config.json, the output folder) is checked before loading them."""
    progress = progress or Progress()
    src, dst = expand_home(src), Path(os.path.abspath(expand_home(dst)))
    if method not in ("awq", "rtn"):
        raise UsageError(f"unknown method {method!r}; use awq or rtn")
    if samples < 1:
        raise UsageError("--samples must be at least 1")
    if samples > MAX_SAMPLES:
        raise UsageError(f"--samples {samples} is too many: every sample is held in memory; use at most {MAX_SAMPLES} (32 is the default)")
    if not src.is_dir():
        raise UsageError(f"the source {visible(str(src))} is not a folder; give a 16-bit checkpoint folder")
    if not os.path.lexists(src / "config.json"):  # the loader's own words advise --model, the chat's flag
        raise UsageError(f"the source {visible(str(src))} has no config.json; give a downloaded 16-bit InternVL3 checkpoint folder")
    try:
        cfg = load_config(src)
    except CheckpointError:
        declared = _declared_quantization(src)
        if declared is None:
            raise
        # the loader's words ("… not supported; internvl-chat loads AWQ 4-bit checkpoints") are for chatting
        raise UsageError(f"the source checkpoint is already quantized ({visible(declared)}); quantize a 16-bit checkpoint") from None
    if cfg.quant is not None or _weights_kind(src) == "tinychat":
        raise UsageError("the source checkpoint is already quantized; quantize a 16-bit checkpoint")
    check_copied_files(src)
    group_size = check_group_size(cfg, group_size)
    resolve_device(device)
    calib_images, calib_texts = [], []
    if calib_dir and method == "awq":
        calib_images, calib_texts = calibration_files(expand_home(calib_dir))
        calib_images = calib_images[: (samples + 1) // 2]  # the ones the samples use (every other one has an image)
    new_parents = _missing_parents(dst)
    try:
        staging = staging_folder(dst)
    except BaseException:
        _remove_empty(new_parents)
        raise
    try:
        calib = None
        if calib_dir and method == "awq":
            tiles = []
            if calib_images:
                with progress.phase("calibration images", len(calib_images), "images") as step:
                    tiles = calibration_tiles(calib_images, step=step)
            calib = Calibration(tiles, calib_texts)
        with progress.phase("loading", 1, "model") as step:
            # the app's default dtype (cpu_features: bf16 for a large decoder on CPU too, its products in
            # fp32 over upcast weights where bf16 is emulated), bf16 on CUDA
            # a calibration sample is at most ~1.3k tokens; the cache may not exceed the model's positions
            context = min(4096, cfg.text.max_position_embeddings)
            loaded = load_model(src, device=device, dtype="auto", max_context=context, cuda_graphs=False)
            check_source_values(loaded)
            step()
        data: list[Sample] = []
        if method == "awq":
            builder = PromptBuilder(loaded.tokenizer, loaded.config.system_message, loaded.config.tokens_per_tile)
            with progress.phase("calibration data", samples, "samples") as step:
                data = calibration_samples(builder, loaded.tokenizer, samples, seed, calib, step=step)
        packed = quantize_model(loaded, data, method, group_size, clip, progress)
        tensors = {**float_tensors(loaded), **packed}
        check_written_range(tensors, method)
        with progress.phase("writing", len(checkpoint_files(tensors)) + 1, "files") as step:
            try:
                write_checkpoint(staging, original_config(src, loaded.config, group_size), tensors, src, step)
            except OSError as e:
                raise _write_error(e, src, dst) from None
            publish(staging, dst)
    except BaseException:
        with _no_second_interrupt():
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(new_parents)
        raise
    return dst


@contextmanager
def _no_second_interrupt() -> Iterator[None]:
    """Ctrl-C ignored while a failed or interrupted run cleans up: pressed again (people do), it cut
    the removal of the staging folder short and left part of it, a checkpoint's size, behind.
    (SIGTERM and SIGHUP are ignored by `_end_on_signal` once one arrived.)"""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _declared_quantization(src: Path) -> str | None:
    """The quant_method (or bits) of a quantization_config where either layout keeps one: a GPTQ,
    FP8 or 8-bit AWQ source is refused by the loader in words meant for chatting with it."""
    try:
        raw = read_config_json(src)
    except CheckpointError:
        return None
    for section in (raw, raw.get("llm_config"), raw.get("text_config")):
        quant = section.get("quantization_config") if isinstance(section, dict) else None
        if isinstance(quant, dict) and quant:
            method = quant.get("quant_method")
            return str(method) if method else "quantization_config"
    return None


def _weights_kind(src: Path) -> str | None:
    """safetensors, bin or tinychat (llm-awq's 4-bit .pt: 4-bit whatever config.json says); None
    where there are no weights, which loading reports in its place."""
    try:
        return find_weight_files(src).kind
    except CheckpointError:
        return None


def check_copied_files(src: Path) -> None:
    """The source files copied to the output at the end can be opened: one that could not ended a
    whole run (an hour for a large model) with nothing written."""
    for name in TOKENIZER_FILES:
        path = src / name
        if path.is_file():
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise UsageError(f"cannot read {visible(str(path))} ({e.strerror or e}); check the file and its permissions") from None


def _missing_parents(dst: Path) -> list[Path]:
    """The folders above `dst` that do not exist yet, deepest first: the staging folder's creation
    makes them, and a failed run removes them again (it left `a/b/` behind for `a/b/out`)."""
    missing = []
    for parent in dst.parents:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; one that is no longer empty is someone else's now
        try:
            os.rmdir(folder)
        except OSError:
            return


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="internvl-chat quantize",
        description="Quantize an InternVL3 checkpoint's LLM to 4-bit AWQ (published GEMM layout); "
        "the vision encoder and projector stay 16-bit. Progress goes to stderr.",
    )
    p.add_argument("src", help="16-bit checkpoint folder (original or -hf layout)")
    p.add_argument("dst", help="output folder: new or empty; written complete or not at all")
    p.add_argument("--method", choices=["awq", "rtn"], default="awq",
                   help="awq: activation-aware scales + clipping, calibrated on images and text (default); "
                        "rtn: round to nearest, no calibration")  # fmt: skip
    p.add_argument("--group-size", type=_positive_int, metavar="N",
                   help="weights per scale/zero group along each input: a multiple of 32 that divides the "
                        "model's widths (default 128, or the largest of 64 and 32 that divides them)")  # fmt: skip
    p.add_argument("--calib", metavar="DIR", help="folder of calibration images and .txt files; every other sample has an image, "
                   "the first ones by name (default: built-in generated data)")  # fmt: skip
    p.add_argument("--samples", type=_positive_int, default=32, metavar="N",
                   help=f"calibration samples, half with an image (default 32, at most {MAX_SAMPLES})")  # fmt: skip
    p.add_argument("--no-clip", action="store_true", help="skip AWQ's weight-clipping search")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto | cpu | cuda | cuda:N (default auto: CUDA if present)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the built-in calibration data (default 0)")
    return p


def _end_on_signal(signum: int, frame) -> None:
    """SIGTERM/SIGHUP as SystemExit(128 + signal), so the half-written staging folder is removed
    (`quantize_checkpoint`) as on Ctrl-C; by default they ended the process with it left behind."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _end_on_signal)
    signal.signal(signal.SIGHUP, _end_on_signal)
    from rich.console import Console

    console = Console(stderr=True)
    start = time.perf_counter()
    run = dict(method=args.method, group_size=args.group_size, samples=args.samples, calib_dir=args.calib,
               device=args.device, clip=not args.no_clip, seed=args.seed)  # fmt: skip
    if console.is_terminal:
        with BarProgress(console) as bars:
            dst = quantize_checkpoint(args.src, args.dst, progress=bars, **run)
    else:
        dst = quantize_checkpoint(args.src, args.dst, progress=LineProgress(sys.stderr), **run)
    group = json.loads((dst / "config.json").read_text())["llm_config"]["quantization_config"]["group_size"]
    print(f"wrote {visible(str(dst))} ({args.method}, group {group}) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0
