"""Train the embedded demo model from scratch: a tiny InternVL3 that answers questions about
synthetic scenes (internvl_chat/demo/scenes.py), written in the original checkpoint layout.

    # the shipped model: one CUDA GPU, about four minutes in all
    python scripts/train_demo_model.py --minutes 3 --out internvl_chat/demo_model
    # without a GPU (2-core CPU, about an hour)
    python scripts/train_demo_model.py --device cpu --minutes 50 --out internvl_chat/demo_model
    # continued training of an existing demo checkpoint (its weights and tokenizer, same sizes)
    python scripts/train_demo_model.py --device cpu --init internvl_chat/demo_model --seed 1 \
        --lr 5e-4 --warmup 30 --curriculum-steps 0 --minutes 55 --out /tmp/demo_cont

The model is transformers' `InternVLForConditionalGeneration` (the reference implementation of the
architecture, trained with autograd); only the written checkpoint has to be InternVL3's. Prompts are
built by our own `PromptBuilder` exactly as the app builds them (system message included), images go
through our own dynamic tiling with the thumbnail, and the loss is on the answers only (each
answer's closing `<|im_end|>` included). What makes it learn quickly enough:
- a curriculum: one large, mostly centred shape on a one-tile image first, the full mix later;
- layer scales at 1 and 2-D sin-cos initial position embeddings, so the ViT sees where things are
  from the first step; a higher learning rate on the vision side;
- dense auxiliary supervision of the image tokens: a throw-away linear head on the projector's
  output predicts, for every token of every tile, the shape kind and colour under it and which half
  of the tile it is in, so the vision side learns to see shapes long before the answers alone
  would teach it (the head is not part of the checkpoint);
- several questions per image (one multi-turn conversation), each answer weighted equally;
- scenes drawn and tiled in DataLoader workers; batches of similar tile counts, right-padded, so
  causal attention needs no padding mask and runs on the fused kernels.

Reproducible: with --steps N the run is a function of --seed (data, initialisation, schedule) up to
floating-point reduction order on the GPU. --minutes alone uses the clock for the schedule's
progress and prints the number of steps it made.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from make_tiny_checkpoint import (  # noqa: E402
    DEFAULT_CORPUS,
    TinySizes,
    build_tokenizer,
    internvl_config,
    token_ids,
    write_original_layout,
)

from internvl_chat.chat.template import MediaSpec, PromptBuilder  # noqa: E402
from internvl_chat.files import visible  # noqa: E402
from script_args import nonnegative_int, positive_float, positive_int  # noqa: E402
from internvl_chat.demo.scenes import (  # noqa: E402
    COLOURS,
    HELDOUT_SEED_BASE,
    SHAPES,
    QUESTION_TYPES,
    TRAIN_SEED_BASE,
    QA,
    Scene,
    corpus_texts,
    make_scene,
)
from internvl_chat.engine.checkpoint import load_state_dict  # noqa: E402
from internvl_chat.engine.weight_names import canonical_to_hf  # noqa: E402
from internvl_chat.engine.tokenizer import load_tokenizer  # noqa: E402
from internvl_chat.media.image import IMAGENET_MEAN, IMAGENET_STD, choose_grid, count_tiles, tile_image  # noqa: E402
from PIL import Image  # noqa: E402

SYSTEM_MESSAGE = "You are a helpful assistant that describes simple pictures."
DEMO_SIZES = TinySizes(
    vision_hidden=128,
    vision_layers=4,
    vision_heads=4,
    vision_mlp=512,
    text_hidden=192,  # a multiple of 64: 4-bit groups of 32 or 64 divide every LLM linear
    text_layers=4,
    text_heads=6,
    text_kv_heads=2,
    text_ffn=512,
)
MAX_TILES = 12  # the checkpoint's max_dynamic_patch: training tiles exactly as the app does
VOCAB_SIZE = 768
MAX_BYTES = 10_000_000
IGNORE = -100
TILE = 448
TOKEN_GRID = 16  # tokens per tile side after pixel shuffle; token (i, j) covers pixels [28i, 28i+28) × [28j, 28j+28)
# auxiliary per-token classes: shape kind (0 = background), colour (0 = background), column half, row half
AUX_CLASSES = (1 + len(SHAPES), 1 + len(COLOURS), 2, 2)
NO_LABEL = 255  # a token whose auxiliary label is unknown (ignored by the loss)


# ---------------------------------------------------------------- tokenizer


def tokenizer_corpus() -> list[str]:
    """Scene questions and answers, the chat scaffolding, and some general text (for the REPL)."""
    scaffolding = ["system\n" + SYSTEM_MESSAGE, "user\n", "assistant\n", "\n", "Image-1: ", "Image-2: ", "Frame1: "]
    return corpus_texts() + scaffolding * 20 + DEFAULT_CORPUS


# ---------------------------------------------------------------- data


def easy_fraction(step: int, curriculum_steps: int) -> float:
    """Share of easy scenes at `step`: all easy at first, then linearly down to 10 %."""
    if curriculum_steps <= 0:
        return 0.1
    return max(0.1, 1.0 - 0.9 * step / curriculum_steps)


def build_sequence(builder: PromptBuilder, tokenizer, tiles: int, turns: list[QA]) -> tuple[list[int], list[int], list[int]]:
    """One conversation about one image as the app's KV cache holds it: ids, the target at each
    position (IGNORE where nothing is predicted), and which turn each target belongs to (-1: none).

    Each answer is followed by the `<|im_end|>` the model must produce to stop: the next turn's
    ids start with it (PromptBuilder.next_turn), and the last answer gets one appended.
    """
    ids: list[int] = []
    targets: list[int] = []
    turn_of: list[int] = []
    for k, qa in enumerate(turns):
        prompt = builder.first_turn(qa.question, [MediaSpec("image", tiles)]) if k == 0 else builder.next_turn(qa.question)
        if k > 0:  # the first id closes the previous answer: a target of that turn
            assert prompt[0] == builder.im_end_id
            ids.append(prompt[0])
            targets.append(prompt[0])
            turn_of.append(k - 1)
            prompt = prompt[1:]
        ids += prompt
        targets += [IGNORE] * len(prompt)
        turn_of += [-1] * len(prompt)
        answer = tokenizer.encode(qa.answer)
        ids += answer
        targets += answer
        turn_of += [k] * len(answer)
    ids.append(builder.im_end_id)
    targets.append(builder.im_end_id)
    turn_of.append(len(turns) - 1)
    return ids, targets, turn_of


def token_labels(scene: Scene) -> np.ndarray:
    """uint8 [tiles, 2, 16, 16]: shape kind and colour (0 = background) under the centre of every
    image token of every tile, the tiles cut exactly as `tile_image` cuts them (nearest-neighbour
    resampling, so labels stay labels). The kind is given only on tiles that show the whole image
    (a single tile, or the thumbnail): a grid tile may show a corner of a square, which is no square
    (NO_LABEL there). Colour is local, so every tile has it."""
    labels = scene.label_map()
    cols, rows = choose_grid(scene.width, scene.height, MAX_TILES)
    resized = labels.resize((TILE * cols, TILE * rows), Image.Resampling.NEAREST)
    tiles = [np.asarray(resized)[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:  # the thumbnail, last
        tiles.append(np.asarray(labels.resize((TILE, TILE), Image.Resampling.NEAREST)))
    centre = TILE // TOKEN_GRID // 2
    index = np.stack([t[centre::TILE // TOKEN_GRID, centre::TILE // TOKEN_GRID] for t in tiles])  # shape k + 1, 0 = none
    kind = np.array([0] + [1 + SHAPES.index(s.kind) for s in scene.shapes], dtype=np.uint8)
    colour = np.array([0] + [1 + list(COLOURS).index(s.colour) for s in scene.shapes], dtype=np.uint8)
    out = np.stack([kind[index], colour[index]], axis=1)
    if len(tiles) > 1:
        out[:-1, 0] = NO_LABEL
    return out


class SceneBatches(torch.utils.data.IterableDataset):
    """Whole batches of tiled scenes and their token ids, made in worker processes.

    Training batches are endless and deterministic: worker w of W makes groups of `group` batches
    whose scenes come from a seed range of their own; inside a group the scenes are sorted by tile
    count before being cut into batches, so a batch pads little. The DataLoader takes batches from
    the workers in turn, so the k-th batch of worker w is global step k·W + w (the curriculum uses
    that). With `heldout` > 0 the dataset is finite: `heldout` fixed scenes (HELDOUT_SEED_BASE…),
    every question type asked once per scene.
    """

    def __init__(
        self,
        tokenizer_dir: Path,
        batch_size: int,
        seed: int = 0,
        curriculum_steps: int = 300,
        max_turns: int = 5,
        group: int = 8,
        heldout: int = 0,
    ):
        super().__init__()
        self.tokenizer_dir = Path(tokenizer_dir)
        self.batch_size = batch_size
        self.seed = seed
        self.curriculum_steps = curriculum_steps
        self.max_turns = max_turns
        self.group = group
        self.heldout = heldout

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        tokenizer = load_tokenizer(self.tokenizer_dir)
        builder = PromptBuilder(tokenizer, SYSTEM_MESSAGE, tokens_per_tile=256)
        if self.heldout:
            scenes = sorted((make_scene(HELDOUT_SEED_BASE + k) for k in range(self.heldout)), key=_tile_key)
            chunks = [scenes[i : i + self.batch_size] for i in range(0, len(scenes), self.batch_size)]
            for chunk in chunks[worker::workers]:
                yield self._batch(chunk, builder, tokenizer, all_types=True)
            return
        per_group = self.group * self.batch_size
        for g in itertools.count():
            first_step = (g * self.group) * workers + worker
            easy = easy_fraction(first_step, self.curriculum_steps)
            base = TRAIN_SEED_BASE + self.seed * 10**12 + (g * workers + worker) * per_group
            rng = random.Random(base)
            scenes = sorted((make_scene(base + i, easy=rng.random() < easy) for i in range(per_group)), key=_tile_key)
            chunks = [scenes[i : i + self.batch_size] for i in range(0, per_group, self.batch_size)]
            rng.shuffle(chunks)
            for chunk in chunks:
                yield self._batch(chunk, builder, tokenizer, all_types=False)

    def _batch(self, scenes: list[Scene], builder: PromptBuilder, tokenizer, all_types: bool) -> dict:
        tiles, labels, seqs, qa_types = [], [], [], []
        for scene in scenes:
            scene_tiles = tile_image(scene.render(), MAX_TILES, use_thumbnail=True)
            tiles += [np.asarray(t, dtype=np.uint8) for t in scene_tiles]
            labels.append(token_labels(scene))
            rng = random.Random(f"turns-{scene.seed}")
            turns = scene.conversation(rng, len(QUESTION_TYPES) if all_types else rng.randint(1, self.max_turns))
            ids, targets, turn_of = build_sequence(builder, tokenizer, len(scene_tiles), turns)
            offset = len(qa_types)
            seqs.append((ids, targets, [t + offset if t >= 0 else -1 for t in turn_of]))
            qa_types += [QUESTION_TYPES.index(qa.type) for qa in turns]
        length = max(len(s[0]) for s in seqs)
        pad = builder.end_of_text_id
        batch = {
            "tiles": torch.from_numpy(np.stack(tiles)),  # uint8 [N, 448, 448, 3]: 4× less to move than float
            "labels": torch.from_numpy(np.concatenate(labels)),  # uint8 [N, 2, 16, 16]
            "ids": torch.full((len(seqs), length), pad, dtype=torch.long),
            "lengths": torch.tensor([len(seq[0]) for seq in seqs], dtype=torch.long),
            "targets": torch.full((len(seqs), length), IGNORE, dtype=torch.long),
            "turn": torch.full((len(seqs), length), -1, dtype=torch.long),
            "qa_types": torch.tensor(qa_types, dtype=torch.long),
        }
        for row, (ids, targets, turn_of) in enumerate(seqs):
            n = len(ids)
            batch["ids"][row, :n] = torch.tensor(ids)
            batch["targets"][row, :n] = torch.tensor(targets)
            batch["turn"][row, :n] = torch.tensor(turn_of)
        # flat indices, computed here so the training step never waits on the GPU for them:
        # where the image features go (row-major = tile order), and which positions predict answers
        batch["image_index"] = (batch["ids"].view(-1) == builder.img_context_id).nonzero().view(-1)
        predicts = batch["targets"][:, 1:].reshape(-1)
        batch["answer_index"] = (predicts != IGNORE).nonzero().view(-1)
        batch["answer_targets"] = predicts[batch["answer_index"]]
        batch["answer_turn"] = batch["turn"][:, 1:].reshape(-1)[batch["answer_index"]]
        return batch


def _tile_key(scene: Scene) -> tuple[int, int]:
    return (count_tiles(scene.width, scene.height, MAX_TILES), scene.seed)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the workers draw and resize; the main process owns the cores' BLAS


def make_loader(dataset: SceneBatches, workers: int, pin: bool, prefetch: int = 2) -> torch.utils.data.DataLoader:
    extra = {"prefetch_factor": prefetch, "worker_init_fn": _worker_init} if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin, **extra)


# ---------------------------------------------------------------- model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid², dim] fixed 2-D sin-cos position code (half the channels for rows, half for columns)."""
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    pos = torch.arange(grid, dtype=torch.float64)
    rows = torch.cat([torch.sin(pos[:, None] * freq), torch.cos(pos[:, None] * freq)], dim=1)  # [grid, dim/2]
    code = torch.cat([rows[:, None, :].expand(grid, grid, -1), rows[None, :, :].expand(grid, grid, -1)], dim=-1)
    return code.reshape(grid * grid, dim).float()


def build_model(tokenizer_dir: Path, seed: int):
    from transformers import InternVLForConditionalGeneration

    num_tokens, special = token_ids(tokenizer_dir)
    vocab_size = -(-num_tokens // 64) * 64
    config = internvl_config(DEMO_SIZES, vocab_size, special)
    config.vision_config.layer_scale_init_value = 1.0  # the note's advice: residual branches at full strength
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():
        grid = DEMO_SIZES.image_size // DEMO_SIZES.patch_size
        pos = model.model.vision_tower.embeddings.position_embeddings
        pos[0, 1:] = 0.5 * sincos_2d(grid, DEMO_SIZES.vision_hidden)  # where a patch is, known from step 0
    model.generation_config.eos_token_id = [special["<|im_end|>"], special["<|endoftext|>"]]
    model.generation_config.pad_token_id = special["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_init_tokenizer(init_dir: Path, tokenizer_dir: Path) -> None:
    """The starting checkpoint's tokenizer, copied: its token ids are the ones its weights learned."""
    if not (init_dir / "tokenizer.json").is_file():
        raise SystemExit(f"error: {init_dir} has no tokenizer.json; --init needs a checkpoint written by this script")
    for name in TOKENIZER_FILES:
        if (init_dir / name).is_file():
            shutil.copy2(init_dir / name, tokenizer_dir / name)


def check_init_sizes(init_dir: Path) -> None:
    """Refuse a starting checkpoint whose widths differ from DEMO_SIZES (the script trains only those)."""
    config = json.loads((init_dir / "config.json").read_text(encoding="utf-8"))
    if "llm_config" not in config or "vision_config" not in config:
        raise SystemExit(f"error: {init_dir} is not an original-layout checkpoint (no llm_config / vision_config in config.json)")
    v, t = config["vision_config"], config["llm_config"]
    found = {
        "vision_hidden": v.get("hidden_size"), "vision_layers": v.get("num_hidden_layers"),
        "vision_heads": v.get("num_attention_heads"), "vision_mlp": v.get("intermediate_size"),
        "text_hidden": t.get("hidden_size"), "text_layers": t.get("num_hidden_layers"),
        "text_heads": t.get("num_attention_heads"), "text_kv_heads": t.get("num_key_value_heads"),
        "text_ffn": t.get("intermediate_size"), "image_size": v.get("image_size"),
        "patch_size": v.get("patch_size"), "downsample_ratio": config.get("downsample_ratio"),
    }
    wanted = asdict(DEMO_SIZES)
    differ = [f"{k} {found[k]} (want {wanted[k]})" for k in wanted if found[k] != wanted[k]]
    if differ:
        raise SystemExit(f"error: {init_dir} has other sizes than the demo model: {', '.join(differ)}")


def load_init_weights(model, init_dir: Path) -> None:
    """Overwrite every parameter of `model` with the checkpoint's tensors (original names mapped to
    transformers' in-memory ones, the fused vision qkv split into q, k, v rows), in float32.
    Every parameter must be found and every checkpoint tensor used, so a partial start cannot pass."""
    state = {n: t for n, t in model.state_dict().items() if not n.endswith("inv_freq")}
    loaded: dict[str, torch.Tensor] = {}
    unused = []
    for name, tensor in load_state_dict(init_dir, layout="original").items():
        targets = canonical_to_hf(name, "new")
        if not all(t in state for t in targets):
            unused.append(name)
            continue
        for target, piece in zip(targets, tensor.chunk(len(targets), dim=0)):
            if piece.shape != state[target].shape:
                raise SystemExit(f"error: {init_dir}: {name} has shape {tuple(piece.shape)}, the model wants {tuple(state[target].shape)}")
            loaded[target] = piece.float()
    missing = sorted(set(state) - set(loaded))
    if missing or unused:
        raise SystemExit(f"error: {init_dir} does not match the demo model: missing {missing[:5]}, unused {unused[:5]}")
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in loaded:
                tensor.copy_(loaded[name])


def previous_stages(init_dir: Path) -> list[dict]:
    """The training records of the starting checkpoint's own stages (oldest first), for training.json."""
    path = init_dir / "training.json"
    if not path.is_file():
        return [{"command": f"(unknown: {init_dir} has no training.json)"}]
    record = json.loads(path.read_text(encoding="utf-8"))
    earlier = record.pop("previous_stages", [])
    return earlier + [record]


def use_matmul_patch_embedding(model) -> None:
    """Run the 14×14, stride-14 patch convolution as what it is, a reshape and one matmul.

    Same parameters (the state dict is unchanged) and the same numbers; but a matmul costs the
    same for any number of tiles, where the convolution may be planned anew for every new batch
    shape (the tile count changes every step).
    """
    conv = model.model.vision_tower.embeddings.patch_embeddings.projection
    size = conv.kernel_size[0]
    assert conv.stride[0] == size and conv.kernel_size[1] == size and conv.stride[1] == size

    def forward(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        gh, gw = h // size, w // size
        patches = x.reshape(n, c, gh, size, gw, size).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * size * size)
        out = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)  # [n, patches, D]
        return out.transpose(1, 2).reshape(n, conv.out_channels, gh, gw)

    conv.forward = forward


def param_groups(model, aux_head, lr: float, vision_lr_scale: float, weight_decay: float) -> list[dict]:
    groups: dict[tuple[bool, bool], list] = {}
    named = list(model.named_parameters()) + [(f"aux_head.{n}", p) for n, p in aux_head.named_parameters()]
    for name, p in named:
        vision = "vision_tower" in name or "multi_modal_projector" in name or name.startswith("aux_head")
        decay = p.ndim >= 2 and "embed" not in name  # no decay on norms, biases, layer scales, embeddings
        groups.setdefault((vision, decay), []).append(p)
    return [
        {"params": ps, "lr": lr * (vision_lr_scale if vision else 1.0), "base_lr": lr * (vision_lr_scale if vision else 1.0),
         "weight_decay": weight_decay if decay else 0.0}
        for (vision, decay), ps in sorted(groups.items())
    ]


def lr_factor(progress: float, step: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0.05 over the run's progress (0…1)."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Batch:
    """One batch on the device: normalised tiles, token ids, and where the answers are."""

    def __init__(self, raw: dict, device: torch.device):
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        tiles = raw["tiles"].to(device, non_blocking=True).permute(0, 3, 1, 2)
        # the same float32 arithmetic as media.image.normalize_tiles
        self.pixels = (tiles.float() / 255.0 - mean) / std
        self.labels = raw["labels"].to(device, non_blocking=True).long()  # [N, 2, 16, 16]
        self.ids = raw["ids"].to(device, non_blocking=True)
        self.image_index = raw["image_index"].to(device, non_blocking=True)
        self.answer_index = raw["answer_index"].to(device, non_blocking=True)  # into [B·(T−1)]: position t predicts t+1
        self.targets = raw["answer_targets"].to(device, non_blocking=True)
        self.turn = raw["answer_turn"].to(device, non_blocking=True)
        self.qa_types = raw["qa_types"].to(device, non_blocking=True)
        self.num_qas = int(raw["qa_types"].numel())
        self.num_images = int(raw["ids"].shape[0])
        self.num_tiles = int(raw["tiles"].shape[0])


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 3, 448, 448] → [N, 256, D]: ViT, drop CLS, pixel shuffle, mlp1 — transformers' own
    modules in the order its InternVLModel.get_image_features runs them."""
    hidden = model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
    n, patches, width = hidden.shape
    side = int(round(patches**0.5))
    shuffled = model.model.pixel_shuffle(hidden.reshape(n, side, side, width), scale_factor=model.config.downsample_ratio)
    return model.model.multi_modal_projector(shuffled.reshape(n, -1, shuffled.shape[-1]))


def forward(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits at the positions that predict answer tokens, image features [N, 256, D]).

    The rows are right-padded, and with causal attention no real token ever attends to a later
    position, so no padding mask is needed: attention runs on the fused (flash) kernels instead of
    a materialised [B, T, T] mask. The LM head runs only where there is something to predict.
    """
    features = image_features(model, batch.pixels)
    embeds = model.model.language_model.get_input_embeddings()(batch.ids)
    rows, length, width = embeds.shape
    # the features overwrite the <IMG_CONTEXT> embeddings in order (what masked_scatter does, sync-free)
    embeds = embeds.reshape(-1, width).index_copy(0, batch.image_index, features.reshape(-1, width).to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds.view(rows, length, width)).last_hidden_state
    answer_hidden = hidden[:, :-1].reshape(-1, width).index_select(0, batch.answer_index)
    return model.lm_head(answer_hidden).float(), features


def answer_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean over answers of each answer's mean token loss: a one-word answer counts as much as a sentence."""
    token_loss = F.cross_entropy(logits, batch.targets, reduction="none")
    per_qa = torch.zeros(batch.num_qas, device=logits.device).index_add_(0, batch.turn, token_loss)
    lengths = torch.zeros(batch.num_qas, device=logits.device).index_add_(0, batch.turn, torch.ones_like(token_loss))
    return (per_qa / lengths.clamp(min=1)).mean()


def make_aux_head(text_hidden: int) -> torch.nn.Linear:
    """Training-only linear probe on the image tokens (never written to the checkpoint)."""
    return torch.nn.Linear(text_hidden, sum(AUX_CLASSES))


def aux_loss(head: torch.nn.Linear, features: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-token cross-entropy of shape kind, colour, column half and row half, summed over the four."""
    logits = head(features).float().view(-1, sum(AUX_CLASSES))  # [N·256, C]
    n = batch.labels.shape[0]
    grid = torch.arange(TOKEN_GRID, device=features.device)
    col_half = (grid >= TOKEN_GRID // 2).long().view(1, TOKEN_GRID).expand(TOKEN_GRID, TOKEN_GRID)
    row_half = col_half.t()
    targets = [
        batch.labels[:, 0].reshape(-1),
        batch.labels[:, 1].reshape(-1),
        col_half.reshape(1, -1).expand(n, -1).reshape(-1),
        row_half.reshape(1, -1).expand(n, -1).reshape(-1),
    ]
    # 9 tokens in 10 are background: weigh the tokens on a shape 4× more, so they are not drowned out
    weight = 1.0 + 3.0 * (targets[1] > 0).float()
    total = logits.new_zeros(())
    for part, target in zip(logits.split(AUX_CLASSES, dim=-1), targets):
        known = (target != NO_LABEL).float() * weight
        loss = F.cross_entropy(part, target.masked_fill(target == NO_LABEL, 0), reduction="none")
        total = total + (loss * known).sum() / known.sum().clamp(min=1)
    return total


@torch.no_grad()
def heldout_accuracy(model, aux_head, batches: list[dict], device: torch.device, autocast) -> tuple[dict[str, float], dict[str, float]]:
    """Exact-match accuracy per question type, teacher-forced: an answer counts as right when every
    one of its tokens (and the closing <|im_end|>) is the argmax, which is what greedy decoding
    would produce. Also the auxiliary head's accuracy on the image tokens that lie on a shape
    (kind and colour): how well the vision side sees."""
    was_training = model.training
    model.eval()
    right = torch.zeros(len(QUESTION_TYPES), device=device)
    total = torch.zeros(len(QUESTION_TYPES), device=device)
    token_right = torch.zeros(2, device=device)
    token_total = torch.zeros(2, device=device)
    for raw in batches:
        batch = Batch(raw, device)
        with autocast():
            logits, features = forward(model, batch)
            aux = aux_head(features).float()
        wrong = torch.zeros(batch.num_qas, device=device).index_add_(0, batch.turn, (logits.argmax(-1) != batch.targets).float())
        right.index_add_(0, batch.qa_types, (wrong == 0).float())
        total.index_add_(0, batch.qa_types, torch.ones_like(wrong))
        kind, colour = batch.labels[:, 0].reshape(-1), batch.labels[:, 1].reshape(-1)
        kind_logits, colour_logits = aux.reshape(-1, aux.shape[-1]).split(AUX_CLASSES, dim=-1)[:2]
        on_shape = colour > 0
        whole = on_shape & (kind != NO_LABEL)  # tokens of whole-image tiles that lie on a shape
        token_right[0] += ((kind_logits.argmax(-1) == kind) & whole).sum()
        token_right[1] += ((colour_logits.argmax(-1) == colour) & on_shape).sum()
        token_total[0] += whole.sum()
        token_total[1] += on_shape.sum()
    model.train(was_training)
    answers = {t: float(r / n) if n else float("nan") for t, r, n in zip(QUESTION_TYPES, right.tolist(), total.tolist())}
    tokens = {"kind": float(token_right[0] / token_total[0].clamp(min=1)), "colour": float(token_right[1] / token_total[1].clamp(min=1))}
    return answers, tokens


# ---------------------------------------------------------------- checkpoint


def write_checkpoint(model, out: Path, tokenizer_dir: Path, dtype: str, record: dict) -> int:
    """Original layout with the demo's system message; returns the folder's size in bytes."""
    cpu_model = model.to("cpu").float()
    write_original_layout(cpu_model, out, tokenizer_dir, DEMO_SIZES, dtype, {"system_message": SYSTEM_MESSAGE})
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return sum(f.stat().st_size for f in out.iterdir() if f.is_file())


def check_with_engine(model, out: Path, raw: dict) -> tuple[float, float]:
    """Load the written checkpoint with our engine and compare its last-position logits with the
    trained model's (float32, CPU) on the first held-out conversation's first turn.
    Returns (max |Δlogit|, share of positions with the same argmax)."""
    from internvl_chat.engine.loader import load_model

    loaded = load_model(out, device="cpu", dtype="float32", max_context=4096)
    builder = PromptBuilder(loaded.tokenizer, loaded.config.system_message, loaded.config.tokens_per_tile)
    ids = raw["ids"][0][: int(raw["lengths"][0])]
    first_answer = int((raw["targets"][0] != IGNORE).nonzero()[0])
    prompt = ids[:first_answer]
    tiles_in_first = int((prompt == builder.img_context_id).sum()) // loaded.config.tokens_per_tile
    pixels = Batch({**raw, "tiles": raw["tiles"][:tiles_in_first]}, torch.device("cpu")).pixels
    features = loaded.model.encode_images(pixels)
    ours = loaded.model.forward(prompt.tolist(), 0, features, all_logits=True)
    reference = model.float().cpu().eval()
    with torch.no_grad():
        for p in reference.parameters():  # the same rounding as the written weights
            p.copy_(p.to(getattr(torch, loaded.config.torch_dtype, torch.bfloat16)).float())
        ref = reference(input_ids=prompt[None], pixel_values=pixels).logits[0].float()
    return float((ours - ref).abs().max()), float((ours.argmax(-1) == ref.argmax(-1)).float().mean())


# ---------------------------------------------------------------- main


@dataclass
class RunRecord:
    seed: int
    steps: int
    batch_size: int
    images: int
    tiles: int
    train_seconds: float
    device: str
    heldout_accuracy: dict
    heldout_token_accuracy: dict
    sizes: dict


def fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


def progress_bar(fraction: float, width: int = 24) -> str:
    filled = int(round(width * min(1.0, max(0.0, fraction))))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def format_accuracy(acc: dict[str, float]) -> str:
    return "  ".join(f"{t} {100 * a:5.1f}%" for t, a in acc.items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (original layout)")
    p.add_argument("--minutes", type=positive_float, default=None, help="time budget of the training loop")
    p.add_argument("--steps", type=positive_int, default=None, help="number of optimizer steps (the reproducible form)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per step (default 64 on CUDA, 8 on CPU)")
    p.add_argument("--workers", type=nonnegative_int, default=None, help="data worker processes (default: cores - 1 on CUDA, 1 on CPU)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this original-layout demo checkpoint (its weights and tokenizer, same sizes) instead of random weights")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="data, initialisation and schedule (with --init, pick one the first stage did not use)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate of the language side")
    p.add_argument("--vision-lr-scale", type=float, default=2.0, help="vision tower and projector learn this much faster")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=nonnegative_int, default=150, help="warm-up steps (at most a tenth of a --steps run)")
    p.add_argument("--curriculum-steps", type=nonnegative_int, default=None,
                   help="steps until easy scenes fall to 10 %% (default 300 on CUDA, 150 on CPU; 0: no curriculum)")
    p.add_argument("--max-turns", type=positive_int, default=5, help="questions per image, 1…5")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the dense per-token auxiliary loss (0: off)")
    p.add_argument("--eval-every", type=positive_int, default=None, help="held-out accuracy every N steps (default 250 on CUDA, 200 on CPU)")
    p.add_argument("--heldout", type=positive_int, default=None, help="held-out scenes (default 160 on CUDA, 40 on CPU)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="dtype of the written weights")
    args = p.parse_args(argv)
    if args.minutes is None and args.steps is None:
        p.error("give --minutes (a time budget) and/or --steps (a step count)")
    if args.max_turns > 5:
        p.error(f"argument --max-turns: must be from 1 to 5, not {args.max_turns}")
    if args.init is not None and not (args.init / "config.json").is_file():
        p.error(f"argument --init: {visible(str(args.init))} has no config.json; give the folder of a checkpoint this script wrote")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from internvl_chat.engine.loader import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch_size = args.batch_size or (64 if cuda else 8)
    workers = args.workers if args.workers is not None else (max(1, min(15, (os.cpu_count() or 2) - 1)) if cuda else 1)
    curriculum = args.curriculum_steps if args.curriculum_steps is not None else (300 if cuda else 150)
    eval_every = args.eval_every or (250 if cuda else 200)
    heldout_scenes = args.heldout or (160 if cuda else 40)
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    start = time.perf_counter()
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="demo_tokenizer_"))
    if args.init is not None:  # continued training: the checkpoint's tokenizer and weights
        check_init_sizes(args.init)
        copy_init_tokenizer(args.init, tokenizer_dir)
        model = build_model(tokenizer_dir, args.seed)
        load_init_weights(model, args.init)
        model = model.to(device)
        print(f"initialised from {args.init}", flush=True)
    else:
        build_tokenizer(tokenizer_dir, corpus=tokenizer_corpus(), vocab_size=VOCAB_SIZE)
        model = build_model(tokenizer_dir, args.seed).to(device)
    use_matmul_patch_embedding(model)
    aux_head = make_aux_head(DEMO_SIZES.text_hidden).to(device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        param_groups(model, aux_head, args.lr, args.vision_lr_scale, args.weight_decay),
        betas=(0.9, 0.98),
        eps=1e-8,
        **({"fused": True} if cuda else {}),
    )
    trained = list(model.parameters()) + list(aux_head.parameters())
    print(f"device {device}  params {params / 1e6:.2f} M  batch {batch_size}  workers {workers}  seed {args.seed}", flush=True)
    if workers and Path("/dev/shm").is_dir():  # worker batches travel through shared memory (~100 MB each)
        shm = os.statvfs("/dev/shm")
        free_gb = shm.f_bavail * shm.f_frsize / 1e9
        if free_gb < 4:
            print(f"warning: only {free_gb:.1f} GB free in /dev/shm; if workers die, use fewer --workers or a smaller --batch-size")

    heldout = list(make_loader(SceneBatches(tokenizer_dir, batch_size, heldout=heldout_scenes), workers, False))
    train = SceneBatches(tokenizer_dir, batch_size, args.seed, curriculum, args.max_turns)
    loader = iter(make_loader(train, workers, cuda))
    total_steps = args.steps
    budget = args.minutes * 60 if args.minutes is not None else None
    warmup = min(args.warmup, total_steps // 10) if total_steps else args.warmup
    print(f"setup {time.perf_counter() - start:.1f} s; training for "
          + (f"{total_steps} steps" if total_steps else "") + (" or " if total_steps and budget else "")
          + (f"{args.minutes:g} min" if budget else ""), flush=True)

    if args.init is not None:  # where the continued training starts from, on the same scenes
        acc, token_acc = heldout_accuracy(model, aux_head, heldout, device, autocast)
        print(f"  held-out @ start: {format_accuracy(acc)}   | image tokens (untrained aux head): {format_accuracy(token_acc)}", flush=True)

    t0 = time.perf_counter()
    last_print = t0
    images = tiles = step = skipped = 0
    data_wait = 0.0  # time spent waiting for the workers: high means the data, not the GPU, sets the pace
    while True:
        elapsed = time.perf_counter() - t0
        progress = max(step / total_steps if total_steps else 0.0, elapsed / budget if budget else 0.0)
        if progress >= 1.0:
            break
        wait_start = time.perf_counter()
        raw = next(loader)
        data_wait += time.perf_counter() - wait_start
        batch = Batch(raw, device)
        factor = lr_factor(progress, step, warmup)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        optimizer.zero_grad(set_to_none=True)
        try:
            with autocast():
                logits, features = forward(model, batch)
                loss = answer_loss(logits, batch)
                aux = aux_loss(aux_head, features, batch) if args.aux_weight > 0 else loss.new_zeros(())
            (loss + args.aux_weight * aux).backward()
        except torch.OutOfMemoryError:
            # a batch of many 13-tile images: skip it rather than lose the run; lower --batch-size if frequent
            loss = None
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            skipped += 1
            print(f"  out of memory on a batch of {batch.num_tiles} tiles: skipped ({skipped} so far)", flush=True)
            continue
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        step += 1
        images += batch.num_images
        tiles += batch.num_tiles
        now = time.perf_counter()
        if now - last_print >= 10 or step == 1:
            value, aux_value = loss.item(), aux.item()  # host syncs, only when printing
            secs = now - t0
            eta = secs / progress - secs if progress > 0.02 else float("nan")
            easy = easy_fraction(step, curriculum)
            print(f"{progress_bar(progress)} step {step}{'/' + str(total_steps) if total_steps else ''}  loss {value:.3f}  "
                  f"aux {aux_value:.3f}  lr {factor * args.lr:.2e}  easy {easy:.2f}  {images / secs:.1f} img/s  "
                  f"{tiles / secs:.1f} tiles/s  data wait {100 * data_wait / secs:.0f}%  "
                  f"{fmt_time(secs)} (eta {fmt_time(eta) if eta == eta else '?'})", flush=True)
            last_print = now
        if step % eval_every == 0:
            acc, token_acc = heldout_accuracy(model, aux_head, heldout, device, autocast)
            print(f"  held-out @ {step}: {format_accuracy(acc)}   | image tokens: {format_accuracy(token_acc)}", flush=True)
    train_seconds = time.perf_counter() - t0
    acc, token_acc = heldout_accuracy(model, aux_head, heldout, device, autocast)
    print(f"done: {step} steps, {images} images ({images / train_seconds:.1f} img/s, {tiles / train_seconds:.1f} tiles/s) "
          f"in {fmt_time(train_seconds)}", flush=True)
    print(f"held-out (teacher-forced exact match, {heldout_scenes} scenes): {format_accuracy(acc)}", flush=True)
    print(f"image tokens on a shape, auxiliary head: {format_accuracy(token_acc)}", flush=True)
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB; {skipped} batches skipped", flush=True)
    del loader

    record = RunRecord(args.seed, step, batch_size, images, tiles, round(train_seconds, 1), str(device), acc, token_acc, asdict(DEMO_SIZES))
    record_dict = {**asdict(record), "command": "python scripts/train_demo_model.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.init is not None:  # read before writing: --out may be the --init folder itself
        record_dict["init"] = str(args.init)
        record_dict["previous_stages"] = previous_stages(args.init)
    size = write_checkpoint(model, args.out, tokenizer_dir, args.dtype, record_dict)
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)", flush=True)
    diff, agree = check_with_engine(model, args.out, heldout[0])
    print(f"engine check: max |logit difference| {diff:.3f} (bf16 weights), argmax agreement {100 * agree:.1f}%", flush=True)
    print(f"total {fmt_time(time.perf_counter() - start)}", flush=True)
    if size > MAX_BYTES:
        print(f"error: the checkpoint is {size / 1e6:.2f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit; use smaller widths", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
