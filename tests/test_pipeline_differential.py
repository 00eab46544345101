"""The whole pipeline against transformers' own InternVL, on a tiny -hf checkpoint with random weights.

Random (seeded) conversations: a system message, turns of text, one image or several (sizes and
aspect ratios from strips to squares, one max_tiles per conversation, 1..12, thumbnail on), a
video's frames, /undo and /retry moving the cache back. For every turn:

1. the prompt ids the Session builds equal those of transformers' InternVLProcessor over the real
   InternVL3-hf chat template. Where SPEC §3 follows the original InternVL rather than the -hf
   template (several images are labelled `Image-k: `), the labels are sent as text parts, so the
   template renders SPEC's layout and the processor only expands the placeholders;
2. the image tiles equal the processor's (GotOcr2 image processor, crop_to_patches, PIL bicubic;
   the -hf *video* processor resizes with torchvision, which SPEC §4 does not follow, so video frames
   go in as our own tiles and only their prompt layout is compared);
3. the Session's greedy answers (which never hold an image token or <|im_start|>: the reference is
   given the same ban) (chunk prefill across turns, KV cache kept and rewound) equal
   InternVLForConditionalGeneration.generate(do_sample=False) on the whole conversation, in fp32,
   with prefill chunks of 97, 300 or 2048 tokens.

`INTERNVL_DIFF_CASES=N` runs N conversations instead of the few CI runs.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from PIL import Image

from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.engine.loader import load_model
from media_helpers import textured_rgb, write_numbered_video
from published_files import published_replica
from reference import reference_model
from session_helpers import final_event
from test_serve_order import INTERNVL3_HF_TEMPLATE

pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
CASES = int(os.environ.get("INTERNVL_DIFF_CASES", "3"))
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return published_replica(tmp_path_factory.mktemp("diff") / "hf", "hf")


class _FramesAsGiven:
    """Stands in for InternVLVideoProcessor (needs torchvision): the frames given are already tiles."""

    def __call__(self, videos, **kwargs):
        from transformers.feature_extraction_utils import BatchFeature

        return BatchFeature({"pixel_values_videos": torch.stack([torch.as_tensor(v) for v in videos])})


@pytest.fixture(scope="module")
def processor(hf_folder):
    from transformers import AutoTokenizer, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder))
    images = GotOcr2ImageProcessorPil.from_pretrained(str(hf_folder))
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None  # the stand-in video processor
    try:
        proc = InternVLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=_FramesAsGiven(),
                                 chat_template=INTERNVL3_HF_TEMPLATE)  # fmt: skip
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    return proc


@pytest.fixture(scope="module")
def hf_loaded(hf_folder):
    return load_model(hf_folder, device="cpu", dtype="float32", max_context=32768)


@pytest.fixture(scope="module")
def ref(hf_folder):
    return reference_model(hf_folder)


def _size(rng: random.Random) -> tuple[int, int]:
    kind = rng.choice(["square", "wide", "tall", "strip", "any", "tile"])
    if kind == "square":
        side = rng.randint(1, 1400)
        return side, side
    if kind in ("wide", "tall"):
        a, b = rng.randint(200, 1600), rng.randint(20, 700)
        return (a, b) if kind == "wide" else (b, a)
    if kind == "strip":
        a, b = rng.randint(1, 12), rng.randint(300, 3000)
        return (a, b) if rng.random() < 0.5 else (b, a)
    if kind == "tile":
        return 448 * rng.randint(1, 4) + rng.choice([-1, 0, 1]), 448 * rng.randint(1, 3)
    return rng.randint(1, 2000), rng.randint(1, 2000)


def _conversation(seed: int, folder) -> dict:
    rng = random.Random(seed)
    turns, n = [], 0
    for k in range(rng.randint(2, 4)):
        shape = rng.choice(["text", "image", "images", "video", "video+image"])
        media = []
        if shape in ("image", "images", "video+image"):
            for _ in range(1 if shape != "images" else rng.randint(2, 3)):
                w, h = _size(rng)
                path = folder / f"im{seed}_{n}.png"
                n += 1
                Image.fromarray(textured_rgb(w, h, seed=seed * 100 + n)).save(path)
                media.append(("image", path))
        if shape.startswith("video"):
            media.insert(0, ("video", rng.randint(1, 4)))  # given first: the prompt still puts images first
        turns.append((rng.choice(["What is this?", "Describe it.", "Tell me more.", "Why?", "名字是什么？"]), media))
    return {"system": rng.choice([None, "You are terse.", "Answer in French."]), "max_tiles": rng.randint(1, 12),
            "turns": turns, "undo_at": rng.randrange(len(turns)), "retry": rng.random() < 0.5,
            "prefill_chunk": rng.choice([97, 300, 2048])}  # fmt: skip


def _user_parts(text, media) -> list[dict]:
    """A user message's content parts, laid out as SPEC §3 (images first, `Image-k: ` labels as text)."""
    images = [p for kind, p in media if kind == "image"]
    parts = [{"type": "image"}] if len(images) == 1 else []
    for k in range(1, len(images) + 1 if len(images) > 1 else 1):
        parts += [{"type": "text", "text": f"Image-{k}: "}, {"type": "image"}]
    parts += [{"type": "video"}] * sum(kind == "video" for kind, _ in media)
    return parts + [{"type": "text", "text": text}]


def _processed(processor, messages, images, videos, max_tiles, generation_prompt=True):
    rendered = processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    out = processor(text=rendered, images=[Image.open(p) for p in images] or None, videos=videos or None,
                    max_patches=max_tiles, return_tensors="pt")  # fmt: skip
    return out["input_ids"][0].tolist(), out.get("pixel_values")


def _reference_turn(processor, text, media, pixels_of, max_tiles, system):
    """The processor's ids and pixels for one user turn (with the system message before it, if any)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": _user_parts(text, media)}]
    images = [p for kind, p in media if kind == "image"]
    return _processed(processor, messages, images, [pixels_of(m) for kind, m in media if kind == "video"], max_tiles)


def _check_conversation(seed, folder, processor, loaded, ref, monkeypatch):
    conv = _conversation(seed, folder)
    # prefill chunks that end inside an image's run, or hold the whole turn
    monkeypatch.setattr(loaded.model, "prefill_chunk", conv["prefill_chunk"])
    video = folder / "clip.mp4"
    if not video.exists():
        write_numbered_video(video, num_frames=24)
    session = Session(loaded, SamplingParams(max_new_tokens=NEW_TOKENS), system_message=conv["system"])
    stops = list(session.builder.stop_ids)
    close = session.builder.answer_close()
    special = loaded.special  # never in our answers (Session._make_sampler): banned in the reference's too
    banned = [[special.img_start], [special.img_end], [special.img_context], [special.im_start]]
    history_pixels: list[torch.Tensor | None] = []
    log = []  # (text, media, video tiles) of the turns the session holds

    def check_answer(turn, pixels):
        prompt = session.ids[: turn.ids_before] + turn.prompt_ids
        present = [p for p in pixels if p is not None]
        vision = {"pixel_values": torch.cat(present)} if present else {}  # an explicit None fails in transformers 5
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor([prompt]), **vision,
                               max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops, pad_token_id=stops[0],
                               bad_words_ids=banned)  # fmt: skip
        expected = out[0, len(prompt) :].tolist()
        if expected and expected[-1] in stops:
            expected = expected[:-1]
        assert turn.answer_ids == expected, (seed, len(session.turns))

    def ask(k, text, media_specs):
        media = [session.describe_image(p, conv["max_tiles"]) if kind == "image" else session.describe_video(video, frames=p)
                 for kind, p in media_specs]  # fmt: skip
        decoded = {}

        def pixels_of(frames):
            m = next(m for m in media if m.kind == "video" and m.frames == frames and id(m) not in decoded)
            decoded[id(m)] = session._decode(m).clone()
            return decoded[id(m)]

        ids, pixels = _reference_turn(processor, text, media_specs, pixels_of, conv["max_tiles"],
                                      conv["system"] if not session.ids else None)  # fmt: skip
        final_event(session.ask(text, media))
        turn = session.turns[-1]
        log.append((text, media_specs, [decoded[id(m)] for m in media if m.kind == "video"]))
        expected_ids = ids if turn.ids_before == 0 else close + ids
        assert turn.prompt_ids == expected_ids, (seed, k)  # (1)
        ours = [session._decode(m) for m in sorted(media, key=lambda m: m.kind != "image")] if media else []
        if media:  # (2): our tiles, in prompt order, equal the processor's pixel_values
            mine = torch.cat(ours)
            assert pixels is not None and mine.shape == pixels.shape, (seed, k, mine.shape)
            torch.testing.assert_close(mine, pixels.float(), atol=1e-5, rtol=0)
        history_pixels.append(pixels.float() if pixels is not None else None)
        check_answer(turn, history_pixels)  # (3)

    for k, (text, media) in enumerate(conv["turns"]):
        ask(k, text, media)
    # /retry (greedy: the same answer, from the cache moved back) and /undo to a random turn, then ask on
    if conv["retry"]:
        final_event(session.retry())
        check_answer(session.turns[-1], history_pixels)
    while len(session.turns) > conv["undo_at"]:
        session.undo()
        history_pixels.pop()
        log.pop()
    ask("undo", "Another question?", [])
    final_event(session.retry())
    check_answer(session.turns[-1], history_pixels)
    _check_whole_conversation(processor, session, conv, log, history_pixels)


def _check_whole_conversation(processor, session, conv, log, history_pixels):
    """The whole conversation in one processor call, every answer left empty (random weights answer
    in tokens whose text need not tokenize back to them): every turn's prompt ids laid end to end,
    the last answer closed, and the pixels every turn's tiles in order; the session's ids are those
    prompts with each answer after its own."""
    messages = [{"role": "system", "content": conv["system"]}] if conv["system"] else []
    images, videos = [], []
    for (text, media, tiles), turn in zip(log, session.turns):
        messages += [{"role": "user", "content": _user_parts(text, media)}, {"role": "assistant", "content": ""}]
        images += [p for kind, p in media if kind == "image"]
        videos += tiles
    assert session.ids == [t for turn in session.turns for t in turn.prompt_ids + turn.answer_ids]
    if len({len(tiles) for tiles in videos}) > 1:
        return  # InternVLProcessor takes one frame count for all the videos of a call (each turn is checked alone)
    ids, pixels = _processed(processor, messages, images, videos, conv["max_tiles"], generation_prompt=False)
    assert ids == [t for turn in session.turns for t in turn.prompt_ids] + session.builder.answer_close()
    present = [p for p in history_pixels if p is not None]
    if present:
        torch.testing.assert_close(torch.cat(present), pixels.float(), atol=0, rtol=0)


@pytest.mark.parametrize("seed", range(CASES))
def test_session_matches_transformers_internvl_end_to_end(seed, tmp_path, processor, hf_loaded, ref, monkeypatch):
    _check_conversation(seed, tmp_path, processor, hf_loaded, ref, monkeypatch)
