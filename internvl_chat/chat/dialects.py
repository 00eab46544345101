"""How each OpenAI-compatible server wants a chat request, so InternVL sees its own prompt.

The OpenAI chat format says nothing of where an image goes in the prompt, how many tiles it may
use, or how a video is sent, and each engine fills the gaps its own way (read from their source,
2026-12). The aim is always InternVL's own layout (chat/template.py):

    one image:  <image>\\n{Q}        several: Image-1: <image>\\nImage-2: <image>\\n{Q}
    a video:    Frame1: <image>\\nFrame2: <image>\\n…{Q}      (images first, then videos)

- lmdeploy renders each `image_url` part as `<img>…</img>\\n` in place and concatenates text parts
  (lmdeploy/vl/model/internvl.py `proc_messages`), and reads `max_dynamic_patch` from the part's
  `image_url` dict. So: interleaved parts, no `\\n` after a picture; frames as images with
  `max_dynamic_patch: 1` behind `FrameK: ` labels.
- vLLM joins text parts with `\\n` and puts a picture where its placeholder stands in the text
  (`<image>`, `<video>` for InternVL); the tile limit is request-wide, `mm_processor_kwargs:
  {max_dynamic_patch}`; a video is one `video_url` whose data URL holds the JPEG frames
  (`data:video/jpeg;base64,F1,F2,…`). vLLM writes the frames as `Frame1: <img>…</img>Frame2: …`
  without InternVL's `\\n` between them: that is vLLM's choice, not ours.
- SGLang places the image tokens itself (its `internvl-2-5` template); `max_dynamic_patch` goes in
  each `image_url`. Frames go as images with `max_dynamic_patch: 1`.
- llama.cpp replaces each media part by a marker in place, with no `\\n` after it, so the `\\n`
  travels in the next text part. Its InternVL tiling is its own (llava-1.6 style): no tile limit
  is sent, and a picture's tokens are estimated with its tiling (`llamacpp_tiles`). The default
  sampler there has `min_p 0.05` and `top_k 40`; we send ours. Its seed is 32 bits, 4294967295
  meaning random: a seed goes modulo 4294967295.
- internvl-chat serve (ours) builds the exact template itself from plain parts: images, then videos
  as `video_url` JPEG frames, then the text; tile limits both per image and request-wide.
- Ollama and anything else ("generic"): interleaved parts as for llama.cpp, no tile limit, and
  only the standard sampling fields.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .sampling import SamplingParams

DIALECTS = ("lmdeploy", "vllm", "sglang", "llamacpp", "ollama", "internvl-chat", "generic")
LABELS = {
    "lmdeploy": "lmdeploy",
    "vllm": "vLLM",
    "sglang": "SGLang",
    "llamacpp": "llama.cpp",
    "ollama": "Ollama",
    "internvl-chat": "internvl-chat serve",
    "generic": "OpenAI-compatible",
}
# `owned_by` of GET /v1/models, as each server fills it in its own source:
# vLLM ModelCard "vllm", lmdeploy ModelCard "lmdeploy", SGLang ModelCard "sglang",
# llama.cpp server-context.cpp "llamacpp", Ollama the model's namespace ("library" for its own).
OWNED_BY = {
    "vllm": "vllm",
    "lmdeploy": "lmdeploy",
    "sglang": "sglang",
    "llamacpp": "llamacpp",
    "internvl-chat": "internvl-chat",
    "library": "ollama",
    "ollama": "ollama",
}


def detect_dialect(owned_by: Any) -> str:
    """The dialect a model card's `owned_by` names; "generic" for anything else."""
    return OWNED_BY.get(owned_by.strip().lower(), "generic") if isinstance(owned_by, str) else "generic"


def check_dialect(name: str) -> str:
    name = name.strip().lower()
    if name not in DIALECTS:
        raise UsageError(f"unknown dialect {name!r}; use one of auto, {', '.join(DIALECTS)}")
    return name


@dataclass(frozen=True)
class Picture:
    """One picture as it is sent: its data URL (made once, so resends are byte-identical)."""

    url: str
    max_tiles: int  # the tile limit InternVL's tiling uses for it (1 for a video frame)


@dataclass(frozen=True)
class Clip:
    """One video as it is sent: its sampled frames, each a JPEG data URL."""

    frames: tuple[Picture, ...]

    @property
    def video_url(self) -> str:
        """All frames in one `data:video/jpeg` URL, comma-separated (vLLM's and serve's form)."""
        return "data:video/jpeg;base64," + ",".join(f.url.partition(",")[2] for f in self.frames)


def data_url(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


# ---- InternVL's layout, neutral ------------------------------------------------------------

_BREAK = "\n"  # marks the line break after a picture, which some servers write themselves


def _layout(text: str, images: list[Picture], videos: list[Clip]) -> list[str | Picture | None]:
    """InternVL's user content as a list: text, a Picture, or None for the break after a picture."""
    items: list[str | Picture | None] = []
    if len(images) == 1:
        items += [images[0], None]
    else:
        for n, image in enumerate(images, start=1):
            items += [f"Image-{n}: ", image, None]
    for clip in videos:
        for k, frame in enumerate(clip.frames, start=1):
            items += [f"Frame{k}: ", frame, None]
    if text:
        items.append(text)
    return items


def _interleaved(items: list[str | Picture | None], break_after_picture: bool, tiles: bool) -> list[dict]:
    parts: list[dict] = []
    for item in items:
        if isinstance(item, Picture):
            parts.append(_image_part(item, tiles))
            continue
        text = (_BREAK if break_after_picture else "") if item is None else item
        if not text:
            continue
        if parts and parts[-1]["type"] == "text":
            parts[-1] = {"type": "text", "text": parts[-1]["text"] + text}
        else:
            parts.append({"type": "text", "text": text})
    return parts


def _image_part(picture: Picture, tiles: bool) -> dict:
    image_url: dict[str, Any] = {"url": picture.url}
    if tiles:
        image_url["max_dynamic_patch"] = picture.max_tiles
    return {"type": "image_url", "image_url": image_url}


def _vllm_text(text: str, images: list[Picture], videos: list[Clip]) -> str:
    head = ""
    if len(images) == 1:
        head = "<image>\n"
    else:
        head = "".join(f"Image-{n}: <image>\n" for n in range(1, len(images) + 1))
    head += "<video>\n" * len(videos)
    return head + text


def user_content(dialect: str, text: str, images: list[Picture], videos: list[Clip]) -> str | list[dict]:
    """The `content` of a user message in this dialect (a plain string when there is no media)."""
    if not images and not videos:
        return text
    if dialect == "lmdeploy":
        return _interleaved(_layout(text, images, videos), break_after_picture=False, tiles=True)
    if dialect == "vllm":
        parts: list[dict] = [{"type": "text", "text": _vllm_text(text, images, videos)}]
        parts += [_image_part(p, tiles=False) for p in images]
        parts += [{"type": "video_url", "video_url": {"url": clip.video_url}} for clip in videos]
        return parts
    if dialect == "sglang":
        parts = [_image_part(p, tiles=True) for p in images]
        parts += [_image_part(frame, tiles=True) for clip in videos for frame in clip.frames]
        return parts + ([{"type": "text", "text": text}] if text else [])
    if dialect == "internvl-chat":
        parts = [_image_part(p, tiles=True) for p in images]
        parts += [{"type": "video_url", "video_url": {"url": clip.video_url}} for clip in videos]
        return parts + ([{"type": "text", "text": text}] if text else [])
    # llamacpp, ollama, generic: the picture stands where it is, the break travels as text
    return _interleaved(_layout(text, images, videos), break_after_picture=True, tiles=False)


def _uniform_tiles(images: list[Picture]) -> int | None:
    limits = {p.max_tiles for p in images}
    return limits.pop() if len(limits) == 1 else None


def request_body(
    dialect: str, model: str, messages: list[dict], params: SamplingParams, images: list[Picture],
    context: int | None = None,
) -> dict:
    """The whole POST /v1/chat/completions body: streaming, with usage, our sampling made explicit.

    Servers fill missing sampling fields with their own defaults (lmdeploy top_k 40, llama.cpp
    min_p 0.05, vLLM and SGLang the model's generation_config), so every field we have is sent.
    `images` are all still pictures of the conversation (for a request-wide tile limit);
    `context`: the server's context length when known (llama.cpp's repetition window).
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.seed is not None:
        # llama.cpp keeps a seed's low 32 bits, and all ones there (4294967295, 2**63-1) means a
        # random seed: a seeded answer would change every time. Seeds below that go as they are.
        body["seed"] = params.seed % LLAMACPP_RANDOM_SEED if dialect == "llamacpp" else params.seed
    if dialect in ("lmdeploy", "internvl-chat"):
        body.update(top_k=params.top_k, repetition_penalty=params.repetition_penalty)  # top_k 0: off
    elif dialect in ("vllm", "sglang"):
        body.update(top_k=params.top_k or -1, repetition_penalty=params.repetition_penalty)  # -1: off
    elif dialect == "llamacpp":
        body.update(top_k=params.top_k, min_p=0.0, repeat_penalty=params.repetition_penalty)
        if params.repetition_penalty != 1.0 and context:
            # the whole context, as our sampler penalises; llama-server refuses -1 (400: 0 <= value),
            # which older ones took for the context. Not known: its default window (64 tokens)
            body["repeat_last_n"] = context
    elif params.top_k:
        body["top_k"] = params.top_k  # a common extension; only sent when it matters
    if dialect in ("vllm", "internvl-chat") and images:
        limit = _uniform_tiles(images)
        if limit is not None:
            body["mm_processor_kwargs"] = {"max_dynamic_patch": limit}
    return body


LLAMACPP_RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: "pick a random seed"
LLAMACPP_MAX_TILES = 12  # llama.cpp's InternVL default when the mmproj GGUF names none (InternVL3's own 12)


def llamacpp_tiles(width: int, height: int, max_tiles: int = LLAMACPP_MAX_TILES, tile: int = 448) -> int:
    """How many 448×448 tiles llama.cpp's InternVL preprocessing makes of a `width`×`height` picture
    (its llava-1.6 style slicing, not InternVL's closest aspect ratio; read from tools/mtmd, 2026-12):
    a picture that fits one tile is one tile; a larger one is sliced on the grid (at most `max_tiles`
    tiles) that shows the most of its pixels, the least padding breaking ties, plus an overview tile.
    A 640×400 picture is 2 tiles and the overview here, 6 and a thumbnail for InternVL.
    The scale and the scaled sides are single-precision floats, as there: in double precision a
    4276×4275 picture was 12 tiles and the overview, 9 and the overview on a real llama-server."""
    if width <= tile and height <= tile:
        return 1
    best: tuple[int, int] | None = None  # (pixels shown, -padding)
    tiles = 1
    for cols in range(1, max_tiles + 1):
        for rows in range(1, max_tiles // cols + 1):
            # each float operation rounded once to float32 (a double result rounded again is exact for
            # +, -, *, / of float32 values: 53 >= 2*24 + 2 bits)
            scale = min(_f32(cols * tile / width), _f32(rows * tile / height))
            shown = min(int(_f32(width * scale)) * int(_f32(height * scale)), width * height)
            rank = (shown, shown - cols * rows * tile * tile)
            if best is None or rank > best:  # the first of equal grids wins
                best, tiles = rank, cols * rows
    return tiles + 1


def _f32(x: float) -> float:
    """`x` rounded to the nearest single-precision float (C's `float`)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def tiles_are_per_request(dialect: str) -> bool:
    """True where one tile limit covers every image of a request (vLLM's mm_processor_kwargs)."""
    return dialect == "vllm"


def render_content(content: str | list[dict]) -> str:
    """A user message's content for /show: text as sent, each picture as a short marker."""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            out.append(part["text"])
        elif kind == "image_url":
            limit = part["image_url"].get("max_dynamic_patch")
            out.append("[image]" if limit is None else f"[image ≤{limit} tiles]")
        elif kind == "video_url":
            frames = part["video_url"]["url"].count(",")
            out.append(f"[video, {frames} frames]")
    return "".join(out)
