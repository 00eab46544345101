"""`serve` builds the prompt the terminal app builds and reuses the KV cache exactly as the Session does.

Greedy tokens through the server (vLLM's `return_token_ids`) are compared with the one-shot CLI
(`--json` gives ids) and with a local Session driven turn by turn on a second copy of the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image

from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.engine.loader import load_model
from media_helpers import textured_rgb, write_numbered_video
from serve_support import RunningServer, data_url

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def local(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=4096)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("exact_media")
    Image.fromarray(textured_rgb(900, 450, seed=5)).save(d / "wide.png")  # 3 tiles
    Image.fromarray(textured_rgb(448, 448, seed=7)).save(d / "square.png")  # 1 tile
    write_numbered_video(d / "clip.mp4", num_frames=30)
    return d


def image(path: Path, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path, "image/png"), **extra}}


def complete(client, messages, max_tokens=8):
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0,
                                         extra_body={"return_token_ids": True})  # fmt: skip
    choice = out.choices[0]
    return choice.message.content, choice.model_extra["token_ids"], out


def local_answer(session: Session, text: str, media=(), max_tokens=8):
    final = None
    for event in session.ask(text, media, SamplingParams(max_new_tokens=max_tokens)):
        final = event
    return session.turns[-1].answer_text, final["token_ids"]


def test_greedy_tokens_equal_the_one_shot_cli(tiny_original, client, media):
    question = "What is in the picture?"
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}
    run = subprocess.run(
        [sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "--image", str(media / "wide.png"),
         "-p", question, "--json", "--max-new-tokens", "12", "--device", "cpu", "--dtype", "float32"],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    cli = json.loads(run.stdout)
    text, ids, out = complete(client, [{"role": "user", "content": [{"type": "text", "text": question}, image(media / "wide.png")]}], 12)
    assert ids == cli["token_ids"]
    assert text == cli["text"]
    assert out.usage.prompt_tokens == cli["usage"]["prompt_tokens"]


def test_four_turns_resent_in_full_reuse_the_cache_and_match_the_session(server, client, local, media):
    turns = [
        ("Describe the first picture.", [media / "wide.png"]),
        ("What colour dominates?", []),
        ("Now compare with this one.", [media / "square.png"]),
        ("Summarise both.", []),
    ]
    session = Session(local)
    messages: list[dict] = []
    for k, (text, images) in enumerate(turns):
        cached_before, ids_before = session.start_pos, len(session.ids)
        local_text, local_ids = local_answer(session, text, [session.describe_image(p) for p in images])
        new_turn = session.turns[-1].prompt_ids

        content = [{"type": "text", "text": text}, *(image(p) for p in images)] if images else text
        messages.append({"role": "user", "content": content})
        served_text, served_ids, out = complete(client, messages)
        messages.append({"role": "assistant", "content": served_text})

        assert served_ids == local_ids, f"turn {k + 1}"
        assert served_text == local_text
        assert out.usage.prompt_tokens == ids_before + len(new_turn)  # the whole conversation …
        timings = out.model_extra["timings"]
        cached = out.usage.prompt_tokens_details.cached_tokens
        assert cached == timings["cache_n"] and timings["prompt_n"] == out.usage.prompt_tokens - cached
        if k > 0:  # (the first turn may share a prefix with earlier tests' requests)
            assert cached == cached_before  # the conversation so far came from the cache …
            assert timings["prompt_n"] == ids_before - cached_before + len(new_turn)  # … only the new tokens prefilled
        assert server.worker.answers.lookup(served_text) == served_ids  # a resent reply maps back to our ids


def test_an_edited_reply_is_prefilled_again_from_where_it_differs(client):
    question = [{"role": "user", "content": "Say something."}]
    text, ids, first = complete(client, question)
    edited = question + [{"role": "assistant", "content": "Something else entirely."}, {"role": "user", "content": "And?"}]
    _, _, out = complete(client, edited)
    assert out.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens + len(ids)
    assert out.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens  # the question stays cached


@pytest.mark.parametrize("system", ["You are terse.", ""])
def test_system_message_of_the_request_is_used_as_the_app_uses_it(client, local, system):
    session = Session(local, system_message=system)
    local_text, local_ids = local_answer(session, "Hello?")
    text, ids, out = complete(client, [{"role": "system", "content": system}, {"role": "user", "content": "Hello?"}])
    assert (ids, text) == (local_ids, local_text)
    assert out.usage.prompt_tokens == len(session.turns[-1].prompt_ids)


def test_several_images_and_a_video_match_the_session(client, local, media):
    session = Session(local)
    video = session.describe_video(media / "clip.mp4", frames=4)
    wanted = local_answer(session, "What do you see?", [session.describe_image(media / "square.png"),
                                                          session.describe_image(media / "wide.png", max_tiles=2), video])  # fmt: skip
    content = [
        {"type": "video_url", "video_url": {"url": data_url(media / "clip.mp4", "video/mp4")}},  # videos go after images
        image(media / "square.png"),
        image(media / "wide.png", max_dynamic_patch=2),
        {"type": "text", "text": "What do you see?"},
    ]
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=8,
                                         temperature=0, extra_body={"return_token_ids": True,
                                                                    "media_io_kwargs": {"video": {"num_frames": 4}}})  # fmt: skip
    assert (out.choices[0].model_extra["token_ids"], out.choices[0].message.content) == (wanted[1], wanted[0])


def test_interleaved_conversations_keep_their_own_slots(client, local):
    opening = {
        "a": "Tell me about the harbour: the boats, the cranes, the gulls and the fishermen mending nets. " * 3,
        "b": "Explain how a mountain glacier moves, melts and carves the valley below it over the centuries. " * 3,
    }
    sessions = {name: Session(local) for name in opening}
    for session in sessions.values():
        session.own_kv_cache()  # two local conversations on one model need two caches, like the server's slots
    history: dict[str, list[dict]] = {name: [] for name in opening}
    for round_, follow_up in enumerate([None, "Go on.", "And then?"]):
        for name, session in sessions.items():
            text = opening[name] if follow_up is None else follow_up
            cached_before = session.start_pos
            session.activate_kv_cache()
            wanted = local_answer(session, text)
            history[name].append({"role": "user", "content": text})
            served_text, served_ids, out = complete(client, history[name])
            history[name].append({"role": "assistant", "content": served_text})
            assert (served_text, served_ids) == wanted, (name, round_)
            if round_:
                assert out.usage.prompt_tokens_details.cached_tokens == cached_before, (name, round_)


def test_a_request_that_overflowed_to_nan_leaves_no_nan_in_its_slot(server, client, monkeypatch):
    # A half-precision overflow makes a request's keys and values NaN from some position on, and it
    # fails with non-finite logits. The slot keeps only the prefix before that request; the NaNs past
    # it stay in the tensors, and the masked decode step (CUDA graphs, compiled step) reads a whole
    # bucket past the position with the tail masked out, where 0 × NaN is NaN: every later request
    # on that slot would fail too. Here the overflow is simulated in the forward pass.
    history = [{"role": "user", "content": "Remember the number forty-two. " * 4}]
    answer, _, _ = complete(client, history)
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Which number was it?"}]
    model = server.worker.model
    forward = model.forward

    def overflowing(ids, start_pos, *args, **kw):
        logits = forward(ids, start_pos, *args, **kw)
        for t in model.language_model.k_cache + model.language_model.v_cache:
            t[:, :, start_pos:].fill_(float("nan"))
        return logits * float("nan")

    monkeypatch.setattr(model, "forward", overflowing)
    with pytest.raises(openai.InternalServerError, match="non-finite"):
        complete(client, history)
    monkeypatch.setattr(model, "forward", forward)

    slot = max(server.worker.slots.slots, key=lambda s: s.last_used)
    slot.session.activate_kv_cache()
    lm = model.language_model
    position = slot.cached  # the next token goes here; the bucket past it is masked out
    logits = lm.decode_masked(torch.tensor([5]), torch.tensor([position]), lm.max_seq_len)
    assert torch.isfinite(logits).all()
    text, ids, out = complete(client, history)  # and the slot serves the conversation as a fresh server would
    assert out.usage.prompt_tokens_details.cached_tokens == position


def test_a_seeded_sample_is_the_same_whether_its_prefix_was_cached_by_another_request(server, client, media, tiny_original):
    """A seeded answer must not depend on what ran before it: the prefix (system message and
    picture) prefilled here, or kept from another conversation, gives the same tokens; the
    repetition penalty counts the kept prompt tokens as the prefilled ones."""
    # text of many different tokens, so that the penalty weighs on what the answer would sample
    many = " ".join(f"{a}{b}" for a in "abcdefghijklmnopqrstuvwxyz0123456789" for b in "aeiou.,;!?")
    system = {"role": "system", "content": f"You describe pictures. {many}"}
    picture = image(media / "square.png")

    def ask(chat, question, **kw):
        messages = [system, {"role": "user", "content": [picture, {"type": "text", "text": question}]}]
        out = chat.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **kw,
                                           extra_body={"return_token_ids": True, "repetition_penalty": 2.0})  # fmt: skip
        return out.choices[0].model_extra["token_ids"], out.usage.prompt_tokens_details.cached_tokens

    seeded = dict(temperature=1.0, seed=1234)
    with RunningServer(tiny_original, slots=1) as fresh:
        wanted, cached = ask(fresh.client(), "What is it?", **seeded)
    assert cached == 0
    ask(client, "Describe every colour in it, one by one.", temperature=0)  # another conversation: the same prefix
    got, cached = ask(client, "What is it?", **seeded)
    assert cached > 256  # the picture's tokens were kept, not prefilled
    assert got == wanted
