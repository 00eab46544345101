"""Multi-turn sessions: chunk prefilling is exact, and the session survives every failure."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.engine.loader import load_model
from internvl_chat.errors import ContextOverflowError, GenerationError, MediaError
from fault_helpers import fail_once
from media_helpers import textured_rgb, write_numbered_video
from reference import reference_model
from session_helpers import final_event

TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=8192)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(textured_rgb(800, 600, seed=3)).save(d / "scene.png")  # 12 tiles + thumbnail
    Image.fromarray(textured_rgb(448, 448, seed=4)).save(d / "small.png")
    write_numbered_video(d / "clip.mp4", num_frames=40)
    return d


def _params(n=6):
    return SamplingParams(max_new_tokens=n)


def _pixels(session: Session, media) -> torch.Tensor:
    """The pixels of sent media, decoded again (a committed turn keeps its features, not its pixels)."""
    return session._decode(dataclasses.replace(media))


def _three_turns(session: Session, media_dir: Path) -> None:
    final_event(session.ask("Describe the picture.", [session.describe_image(media_dir / "scene.png")]))
    final_event(session.ask("And this clip?", [session.describe_video(media_dir / "clip.mp4", frames=4)]))
    final_event(session.ask("Thanks, one more thing."))


def test_chunk_prefilling_equals_prefilling_everything(loaded, media_dir):
    session = Session(loaded, _params())
    _three_turns(session, media_dir)
    assert [len(t.media) for t in session.turns] == [1, 1, 0]
    follow_up = session.builder.next_turn("Last question?", [])

    chunked = loaded.model.forward(session.ids[session.start_pos :] + follow_up, session.start_pos)

    media = [m for t in session.turns for m in t.media]
    features = loaded.model.encode_images(torch.cat([_pixels(session, m) for m in media]))
    fresh = loaded.model.forward(session.ids + follow_up, 0, features)
    diff = (chunked - fresh).abs().max().item()
    assert diff <= TOL * fresh.abs().max().item(), diff


def test_each_turn_prefills_only_its_own_tokens(loaded, media_dir):
    session = Session(loaded, _params())
    calls = []
    original = loaded.model.forward

    def spy(ids, start_pos, *a, **k):
        calls.append((start_pos, len(ids) if not isinstance(ids, torch.Tensor) else ids.numel()))
        return original(ids, start_pos, *a, **k)

    loaded.model.forward = spy
    try:
        final_event(session.ask("Hello there."))
        before = session.start_pos
        calls.clear()
        final_event(session.ask("Second turn."))
    finally:
        del loaded.model.forward
    start, length = calls[0]
    assert start == before
    assert length == len(session.turns[-1].prompt_ids) + (session.turns[-1].ids_before - session.turns[-1].pos_before)
    assert length < 30  # the new turn only, not the history


def test_greedy_multi_turn_matches_transformers_generate(tiny_original, loaded, media_dir):
    ref = reference_model(tiny_original)
    session = Session(loaded, _params(8))
    stops = list(session.builder.stop_ids)
    turns = [
        ("What is this?", [session.describe_image(media_dir / "small.png")]),
        ("Tell me more.", []),
        # several media in one turn, the video given first: the prompt and the features put images first
        ("And these?", [session.describe_video(media_dir / "clip.mp4", frames=2), session.describe_image(media_dir / "small.png")]),
    ]
    pixels = []
    for text, media in turns:
        in_prompt_order = sorted(media, key=lambda m: m.kind != "image")
        context = session.ids + session.builder.next_turn(text, [m.spec for m in in_prompt_order]) if session.ids else None
        final_event(session.ask(text, media))
        turn = session.turns[-1]
        pixels += [_pixels(session, m) for m in in_prompt_order]
        prompt = session.ids[: turn.ids_before] + turn.prompt_ids
        if context is not None:
            assert prompt == context
        with torch.no_grad():
            out = ref.generate(
                input_ids=torch.tensor([prompt]),
                pixel_values=torch.cat(pixels) if pixels else None,
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )
        expected = out[0, len(prompt) :].tolist()
        if expected and expected[-1] in stops:
            expected = expected[:-1]
        assert turn.answer_ids == expected


def test_overflow_names_the_largest_part_of_the_turn_first(tiny_original, media_dir):
    # a long paste or a long --system message was told "use fewer tiles or frames" (there were none)
    small = load_model(tiny_original, device="cpu", dtype="float32", max_context=1024)
    fix = r"over the 1,024-token context; {}, a smaller max_new_tokens"
    with pytest.raises(ContextOverflowError, match=fix.format("send a shorter message")):
        final_event(Session(small, _params()).ask("word " * 2000))
    long_system = Session(small, _params(), system_message="be brief. " * 500)
    with pytest.raises(ContextOverflowError, match=fix.format(r"use a shorter system message \(/system TEXT, --system\)")):
        final_event(long_system.ask("Hi."))
    session = Session(small, _params())
    final_event(session.ask("Hi."))
    with pytest.raises(ContextOverflowError, match=fix.format("use fewer tiles or frames, /clear")):
        final_event(session.ask("What is this? " * 20, [session.describe_image(media_dir / "scene.png")]))


def test_overflow_advice_fits_what_is_cached_and_reserved(tiny_original):
    """Nothing cached (a first turn, every one-shot question): /clear frees nothing, so it is not
    suggested; an answer reserve larger than the turn (`-p hi --max-context 100`) is named first,
    not the 15-token system message."""
    small = load_model(tiny_original, device="cpu", dtype="float32", max_context=256)
    with pytest.raises(ContextOverflowError) as first:
        final_event(Session(small, _params()).ask("word " * 200))
    assert "/clear" not in str(first.value) and "send a shorter message, a smaller max_new_tokens" in str(first.value)
    with pytest.raises(ContextOverflowError, match=r"; use a smaller max_new_tokens, use a shorter system message "
                       r"\(/system TEXT, --system\), or a larger --max-context$"):  # fmt: skip
        final_event(Session(small, _params(300)).ask("Hi."))
    session = Session(small, _params())
    final_event(session.ask("Hi."))
    with pytest.raises(ContextOverflowError, match=r"; send a shorter message, /clear, a smaller max_new_tokens"):
        final_event(session.ask("word " * 200))
    # no shorter message fits a 300-token answer after the cached turn: that is not advised
    with pytest.raises(ContextOverflowError, match=r"; use a smaller max_new_tokens, /undo or /clear, "
                       r"or a larger --max-context$"):  # fmt: skip
        final_event(session.ask("Hi.", params=_params(300)))


def test_overflow_advice_in_one_shot_mode_names_flags_not_commands(tiny_original, media_dir):
    """One-shot mode (`commands` False) has no /system or /set: the advice names the next run's flags."""
    small = load_model(tiny_original, device="cpu", dtype="float32", max_context=1024)
    session = Session(small, _params())
    session.commands = False
    picture = session.describe_image(media_dir / "scene.png")
    with pytest.raises(ContextOverflowError, match=r"; use fewer tiles or frames \(--max-tiles, --frames\), "
                       r"a smaller --max-new-tokens, or a larger --max-context$"):  # fmt: skip
        final_event(session.ask("What is this?", [picture, picture]))
    with pytest.raises(ContextOverflowError, match=r"; use a smaller --max-new-tokens, use a shorter system message "
                       r"\(--system\), or a larger --max-context$"):  # fmt: skip
        final_event(session.ask("Hi.", params=_params(1200)))
    long_system = Session(small, _params(), system_message="be brief. " * 500)
    long_system.commands = False
    with pytest.raises(ContextOverflowError, match=r"; use a shorter system message \(--system\), a smaller --max-new-tokens"):
        final_event(long_system.ask("Hi."))
    huge_system = Session(small, _params(), system_message="be brief. " * (1 << 18))
    huge_system.commands = False  # refused before tokenizing: its fewest tokens already overflow
    with pytest.raises(ContextOverflowError, match=r"; use a shorter system message \(--system\), or a larger --max-context$"):
        final_event(huge_system.ask("Hi."))


def test_a_hopeless_paste_is_refused_before_it_is_tokenized(tiny_original, monkeypatch):
    """A paste whose fewest possible tokens overflow is refused without encoding it (a 15 MB one
    took ~25 s and ~3 GB to tokenize, only to be refused); the session is unchanged after."""
    small = load_model(tiny_original, device="cpu", dtype="float32", max_context=1024)
    session = Session(small, _params())
    final_event(session.ask("Hi."))
    state = (list(session.ids), session.start_pos, len(session.turns))
    paste = "x" * (1 << 21)  # 2 MiB
    assert small.tokenizer.fewest_tokens(paste) > 1024
    _refuse_tokenizing_long_texts(small, monkeypatch)
    with pytest.raises(ContextOverflowError, match=r"this message is at least [\d,]+ tokens \(2,097,152 characters\).*"
                       r"over the 1,024-token context; send a shorter message, /clear"):  # fmt: skip
        final_event(session.ask(paste))
    assert (session.ids, session.start_pos, len(session.turns)) == state
    final_event(session.ask("Still there?"))
    assert len(session.turns) == 2


def _refuse_tokenizing_long_texts(loaded, monkeypatch) -> None:
    real_encode = type(loaded.tokenizer).encode

    def encode(self, text):
        assert len(text) < 1 << 20, "a hopeless text was tokenized"
        return real_encode(self, text)

    monkeypatch.setattr(type(loaded.tokenizer), "encode", encode)


def test_a_hopeless_system_message_is_refused_before_it_is_tokenized(tiny_original, monkeypatch):
    """A system message that cannot fit (config.json's, a config file's, /system's) was tokenized on
    every first turn, and by /system's replay, only to be refused: 4 MB took ~29 s and 1.6 GB."""
    small = load_model(tiny_original, device="cpu", dtype="float32", max_context=1024)
    _refuse_tokenizing_long_texts(small, monkeypatch)
    huge = "be brief. " * (1 << 18)
    session = Session(small, _params(), system_message=huge)
    with pytest.raises(ContextOverflowError, match=r"the system message is at least [\d,]+ tokens \(2,621,440 characters\).*"
                       r"over the 1,024-token context; use a shorter system message \(/system TEXT, --system\)"):  # fmt: skip
        final_event(session.ask("Hi."))
    assert session.ids == [] and not session.turns
    session.set_system(None)
    final_event(session.ask("Hi."))
    state = (list(session.ids), session.start_pos, len(session.turns))
    with pytest.raises(ContextOverflowError, match=r"the conversation needs at least [\d,]+ tokens, over the 1,024-token "
                       "context; use a shorter system message"):  # fmt: skip
        session.set_system(huge)
    assert (session.ids, session.start_pos, len(session.turns), session.system_message) == (*state, None)
    final_event(session.ask("Still there?"))
    assert len(session.turns) == 2


def test_a_session_file_with_a_hopeless_text_is_refused_before_it_is_tokenized(tiny_original, tmp_path, monkeypatch):
    """A 15 MB question in a session file took ~43 s and 4.5 GB to tokenize before /load refused it."""
    small = load_model(tiny_original, device="cpu", dtype="float32", max_context=1024)
    session = Session(small, _params())
    final_event(session.ask("Hi."))
    session.save(tmp_path / "chat.json")
    data = json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))
    state = (list(session.ids), session.start_pos, len(session.turns))
    _refuse_tokenizing_long_texts(small, monkeypatch)
    question, system = json.loads(json.dumps(data)), json.loads(json.dumps(data))
    question["messages"][0]["text"] = system["system_message"] = "word " * (1 << 18)
    for name, hostile in (("question", question), ("system message", system)):
        (tmp_path / "hostile.json").write_text(json.dumps(hostile), encoding="utf-8")
        with pytest.raises(ContextOverflowError, match=r"needs more than [\d,]+ tokens, over the 1,024-token context"):
            session.load(tmp_path / "hostile.json")
        assert (session.ids, session.start_pos, len(session.turns)) == state, name
    final_event(session.ask("Still there?"))
    assert len(session.turns) == 2


@pytest.mark.parametrize(
    "text",
    ["x" * 70000, " " * 70000, "\n" * 5000 + "ab" * 30000, "e\u0301" * 30000, "\u1100\u1161\u11a8" * 25000,
     "<|im_start|>" * 6000, "日本語のテキスト" * 9000, "\U0001F600" * 20000],
    ids=["one-letter", "spaces", "lines", "combining", "hangul-jamo", "special-token-text", "cjk", "emoji"],
)
def test_the_fewest_tokens_bound_never_exceeds_the_real_count(tiny_original, text):
    from internvl_chat.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_original)
    assert 0 < tokenizer.fewest_tokens(text) <= len(tokenizer.encode(text))


def test_overflow_leaves_the_session_unchanged(tiny_original, media_dir):
    small = load_model(tiny_original, device="cpu", dtype="float32", max_context=1024)
    session = Session(small, _params())
    final_event(session.ask("Hi."))
    state = (list(session.ids), session.start_pos, len(session.turns))
    big = session.describe_image(media_dir / "scene.png")
    with pytest.raises(ContextOverflowError, match=r"over the 1,024-token context; use fewer tiles or frames, /clear"):
        final_event(session.ask("What is this?", [big]))
    assert (session.ids, session.start_pos, len(session.turns)) == state
    final_event(session.ask("Still there?"))
    assert len(session.turns) == 2


def test_decoding_stops_with_length_when_the_cache_is_full(tiny_original):
    from internvl_chat.chat.generate import stream_generate
    from internvl_chat.chat.sampling import Sampler

    small = load_model(tiny_original, device="cpu", dtype="float32", max_context=64)
    params = SamplingParams(max_new_tokens=50)
    prompt = small.tokenizer.encode("one two three four five six seven eight nine ten " * 3)
    prompt = (prompt * 4)[:60]
    sampler = Sampler(params, small.config.text.vocab_size, "cpu")
    final = final_event(stream_generate(small.model, small.tokenizer, prompt, 0, params, sampler, stop_ids=()))
    assert final["finish_reason"] == "length"
    assert final["cache_end"] == 64 and len(final["token_ids"]) == 5  # 4 fed + 1 that did not fit


def test_cancel_keeps_partial_answer_and_next_turn_works(loaded):
    session = Session(loaded, SamplingParams(max_new_tokens=50, stop_ids=()))
    cancel = threading.Event()
    seen = 0
    final = None
    for event in session.ask("Tell me a long story.", cancel=cancel):
        seen += 1
        if seen == 3:
            cancel.set()
        final = event
    if final["finish_reason"] == "stop":
        pytest.skip("the random model stopped before the cancel")
    assert final["finish_reason"] == "cancelled"
    assert session.turns[-1].answer_text.endswith("[cancelled]")
    # the cache holds the partial answer; the next turn closes it with <|im_end|>
    assert session.start_pos == len(session.ids)
    final = final_event(session.ask("Go on."))
    closing = [session.builder.im_end_id, *session.builder.tokenizer.encode("\n")]
    assert session.turns[-1].prompt_ids[: len(closing)] == closing


def test_undo_and_retry_rewind_without_reprefill(loaded, media_dir):
    session = Session(loaded, _params())
    final_event(session.ask("First.", [session.describe_image(media_dir / "small.png")]))
    after_first = (list(session.ids), session.start_pos)
    final_event(session.ask("Second."))
    first_answer = session.turns[-1].answer_ids
    session.undo()
    assert (session.ids, session.start_pos) == after_first
    calls = []
    original = loaded.model.encode_images
    loaded.model.encode_images = lambda px, cancel=None: calls.append(px.shape[0]) or original(px, cancel)
    try:
        final_event(session.ask("Second."))
        assert session.turns[-1].answer_ids == first_answer  # greedy: same answer after undo
        final_event(session.retry())
        assert session.turns[-1].answer_ids == first_answer
        assert len(session.turns) == 2
        session.undo()
        final_event(session.retry())  # retry of turn 1 reuses its kept features: no vision run
    finally:
        del loaded.model.encode_images
    assert calls == []
    assert len(session.turns) == 1


def test_save_load_gives_identical_next_token_logits(loaded, media_dir, tmp_path):
    session = Session(loaded, _params())
    _three_turns(session, media_dir)
    path = session.save(tmp_path / "chat.json")
    data = json.loads(path.read_text())
    assert data["format"] == "internvl-chat-session" and data["version"] == 1
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] * 3
    assert data["messages"][0]["media"][0]["sha256"]
    follow = session.builder.next_turn("Next?", [])
    expected = loaded.model.forward(session.ids[session.start_pos :] + follow, session.start_pos)

    restored = Session(loaded, _params())
    restored.load(path)
    assert restored.ids == session.ids
    got = loaded.model.forward(restored.ids[restored.start_pos :] + follow, restored.start_pos)
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()
    restored.undo()  # turn boundaries survive a load
    assert len(restored.turns) == 2


def _saved_then_picture_changed(loaded, image: Path, question: str, seeds: tuple[int, int]) -> Path:
    """A session of one turn about `image`, saved, and then `image` rewritten with other pixels."""
    Image.fromarray(textured_rgb(448, 448, seed=seeds[0])).save(image)
    session = Session(loaded, _params())
    final_event(session.ask(question, [session.describe_image(image)]))
    path = session.save(image.parent / "chat.json")
    Image.fromarray(textured_rgb(448, 448, seed=seeds[1])).save(image)
    return path


def test_a_picture_changed_after_load_checked_it_is_refused_not_read(loaded, tmp_path):
    """/load hashed each picture, then (in the REPL after its y/N question on the unsaved
    conversation) decoded it again to replay the conversation: a picture rewritten meanwhile was
    read as the saved one, and /save then wrote the old hash beside the new pixels. A server's
    conversation checked it; this one did not. The same holds for a /retry that decodes it again."""
    image = tmp_path / "photo.png"
    Image.fromarray(textured_rgb(448, 448, seed=3)).save(image)
    session = Session(loaded, _params())
    final_event(session.ask("What is this?", [session.describe_image(image)]))
    path = session.save(tmp_path / "chat.json")
    fresh = Session(loaded, _params())
    final_event(fresh.ask("Hello."))
    before = (list(fresh.ids), fresh.start_pos)
    readied = fresh.read_saved(path)
    Image.fromarray(textured_rgb(448, 448, seed=4)).save(image)  # while the REPL asked y/N
    with pytest.raises(MediaError, match="photo.png has changed since it was attached or loaded"):
        fresh.restore(readied)
    assert (fresh.ids, fresh.start_pos) == before and [t.user_text for t in fresh.turns] == ["Hello."]

    turn = session.turns[0]
    turn.features = None  # a retry that prefills the whole prompt again decodes the picture again
    with pytest.raises(MediaError, match="has changed since it was attached or loaded"):
        session._retry_prefilling(turn, _params(), None).__next__()
    assert session.turns == [turn]


def test_load_reports_changed_or_vanished_media(loaded, media_dir, tmp_path):
    image = tmp_path / "photo.png"
    path = _saved_then_picture_changed(loaded, image, "What is this?", (9, 10))
    fresh = Session(loaded, _params())
    with pytest.raises(MediaError, match="has changed since the session was saved"):
        fresh.load(path)
    image.unlink()
    with pytest.raises(MediaError, match="has vanished"):
        fresh.load(path)
    image.mkdir()  # "has vanished" misled when a folder (a pipe, a device, a symlink loop) stood there
    with pytest.raises(MediaError, match="photo.png is not a regular file"):
        fresh.load(path)
    assert fresh.ids == [] and fresh.turns == []


def test_skip_missing_loads_the_conversation_without_the_pictures_that_vanished(loaded, tmp_path):
    """A session naming a picture that vanished is refused by default (the refusal names the way
    out); with skip_missing it loads: that turn keeps its text with a note where the picture was,
    the other turn keeps its picture, and the conversation goes on, undoes, retries and saves."""
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    Image.fromarray(textured_rgb(448, 448, seed=21)).save(first)
    Image.fromarray(textured_rgb(448, 448, seed=22)).save(second)
    session = Session(loaded, _params())
    final_event(session.ask("What is this?", [session.describe_image(first)]))
    final_event(session.ask("And this one?", [session.describe_image(second)]))
    path = session.save(tmp_path / "chat.json")
    first.unlink()

    fresh = Session(loaded, _params())
    final_event(fresh.ask("Kept."))
    kept = list(fresh.ids)
    with pytest.raises(MediaError, match=r"first\.png has vanished; put the files back, add --skip-missing to /load"):
        fresh.load(path)
    assert fresh.ids == kept and [t.user_text for t in fresh.turns] == ["Kept."]

    readied = fresh.read_saved(path, skip_missing=True)
    assert [(m.turn, m.kind, m.name, m.found) for m in readied.left_out] == [(1, "image", "first.png", False)]
    fresh.restore(readied)
    assert [t.user_text for t in fresh.turns] == ["[image first.png was not found]\nWhat is this?", "And this one?"]
    assert [[m.path for m in t.media] for t in fresh.turns] == [[], [second]]
    assert [t.answer_ids for t in fresh.turns] == [t.answer_ids for t in session.turns]
    assert fresh.ids == fresh.conversation_ids(fresh.turns) and fresh.start_pos == len(fresh.ids)

    final_event(fresh.ask("Anything else?"))
    assert len(fresh.turns) == 3
    fresh.undo()
    final_event(fresh.retry())
    assert fresh.ids == fresh.conversation_ids(fresh.turns)

    again = fresh.save(tmp_path / "again.json")
    data = json.loads(again.read_text())
    assert [m["media"] for m in data["messages"][::2]][0] == []
    assert [m["path"] for m in data["messages"][2]["media"]] == [str(second)]
    back = Session(loaded, _params())
    back.load(again)  # nothing is missing from it: it loads without the flag
    assert back.ids == fresh.ids


def test_skip_missing_notes_a_changed_picture_and_escapes_its_name(loaded, tmp_path):
    image = tmp_path / "cat\x1b[31m.png"
    path = _saved_then_picture_changed(loaded, image, "", (23, 24))
    with pytest.raises(MediaError, match="has changed since the session was saved"):
        Session(loaded, _params()).load(path)
    fresh = Session(loaded, _params())
    fresh.load(path, skip_missing=True)
    assert fresh.turns[0].user_text == "[image cat\\e[31m.png has changed]" and fresh.turns[0].media == []
    assert fresh.ids == fresh.conversation_ids(fresh.turns)


def _one_clip_in_three_turns_loaded(loaded, media_dir, tmp_path, monkeypatch, module, name: str):
    """A session whose three turns each show the same clip, saved, then loaded into a new Session
    while `module.name` (a one-path function) notes each call: (session, restored, the paths called with)."""
    session = Session(loaded, _params(2))
    for question in ("What happens?", "And now?", "Anything else?"):
        final_event(session.ask(question, [session.describe_video(media_dir / "clip.mp4", frames=2)]))
    path = session.save(tmp_path / "chat.json")
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda p: calls.append(p) or real(p))
    restored = Session(loaded, _params(2))
    restored.load(path)
    return session, restored, calls


def test_a_file_every_turn_shows_is_hashed_once_on_load(loaded, media_dir, tmp_path, monkeypatch):
    """/load checks each saved media file by its sha256: a video that every turn shows (a long one
    takes seconds to read) is read once per load, not once per turn."""
    from internvl_chat.chat import saved_media as saved_media_module

    session, restored, hashed = _one_clip_in_three_turns_loaded(loaded, media_dir, tmp_path, monkeypatch,
                                                                saved_media_module, "sha256_of")  # fmt: skip
    assert restored.ids == session.ids and len(hashed) == 1


def test_a_file_every_turn_shows_is_measured_once_on_load(loaded, media_dir, tmp_path, monkeypatch):
    """/load hashed a file every turn shows once, but measured it again for each turn: an MKV's
    frames counted by demuxing each time (seconds for a long one), and a hand-made session of 80,000
    items naming one small picture took 25 s with --skip-missing before the context refused it."""
    from internvl_chat.chat import session as session_module

    session, restored, measured = _one_clip_in_three_turns_loaded(loaded, media_dir, tmp_path, monkeypatch,
                                                                  session_module, "measure_video")  # fmt: skip
    assert restored.ids == session.ids and len(measured) == 1
    media = [turn.media[0] for turn in restored.turns]
    assert len({id(m) for m in media}) == 3 and all(m.path == media_dir / "clip.mp4" and m.tiles == 2 for m in media)
    restored.undo()
    final_event(restored.retry())  # each turn's own media: features and pixels kept apart
    assert [t.user_text for t in restored.turns] == ["What happens?", "And now?"]


def test_a_replay_whose_pictures_alone_overflow_is_refused_before_its_ids_are_built(loaded, media_dir, tmp_path, monkeypatch):
    """With --skip-missing the bound before measuring counts no media (they may be left out); the
    replay's bound then counted only texts, so a file naming one picture in thousands of turns had
    its whole conversation's ids built (21 M for 80,000 pictures) only to be refused."""
    session = Session(loaded, _params(2))
    final_event(session.ask("What is it?", [session.describe_video(media_dir / "clip.mp4", frames=2)]))
    data = json.loads(session.save(tmp_path / "chat.json").read_text())
    per_turn = 2 * loaded.config.tokens_per_tile  # the two frames' image tokens
    data["messages"] *= loaded.model.max_seq_len // per_turn + 1  # those alone: over the context
    (tmp_path / "many.json").write_text(json.dumps(data))
    built = []
    monkeypatch.setattr(Session, "conversation_ids", lambda self, *a, **k: built.append(1) or [])
    fresh = Session(loaded, _params(2))
    with pytest.raises(ContextOverflowError, match="needs at least"):
        fresh.load(tmp_path / "many.json", skip_missing=True)
    assert built == [] and fresh.turns == []


def test_a_file_of_another_size_is_not_read_to_learn_it_changed(loaded, media_dir, tmp_path, monkeypatch):
    """/load read every candidate file whole to hash it: a video that grew to gigabytes (or any
    large file a hand-made session names) was read through before "has changed". The size saved
    with the session tells it at once; a file of the same size is still hashed."""
    from internvl_chat.chat import saved_media as saved_media_module

    video = tmp_path / "clip.mp4"
    video.write_bytes((media_dir / "clip.mp4").read_bytes())
    session = Session(loaded, _params(2))
    final_event(session.ask("What happens?", [session.describe_video(video, frames=2)]))
    path = session.save(tmp_path / "chat.json")
    assert json.loads(path.read_text())["messages"][0]["media"][0]["bytes"] == video.stat().st_size
    hashed = []
    real = saved_media_module.sha256_of
    monkeypatch.setattr(saved_media_module, "sha256_of", lambda p: hashed.append(p) or real(p))
    with open(video, "ab") as f:
        f.write(bytes(1000))
    fresh = Session(loaded, _params(2))
    with pytest.raises(MediaError, match="has changed since the session was saved"):
        fresh.load(path)
    assert hashed == [] and fresh.turns == []
    with open(video, "r+b") as f:
        f.truncate(video.stat().st_size - 1000)
    fresh.load(path)
    assert hashed == [video] and len(fresh.turns) == 1


def test_save_is_atomic(loaded, tmp_path, monkeypatch):
    session = Session(loaded, _params())
    final_event(session.ask("Hi."))
    target = tmp_path / "chat.json"
    target.write_text("previous content")

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        session.save(target)
    assert target.read_text() == "previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]


def test_interrupted_retry_restores_the_previous_answer(loaded):
    session = Session(loaded, _params())
    final_event(session.ask("First."))
    final_event(session.ask("Second."))
    before = (list(session.ids), session.start_pos, [t.answer_ids for t in session.turns])
    follow = session.builder.next_turn("Third?", [])
    expected = loaded.model.forward(session.ids[session.start_pos :] + follow, session.start_pos)
    events = session.retry()
    next(events)  # the new answer has been prefilled and started
    events.close()  # interrupted before it was committed
    assert (session.ids, session.start_pos, [t.answer_ids for t in session.turns]) == before
    got = loaded.model.forward(session.ids[session.start_pos :] + follow, session.start_pos)
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()


def test_set_system_that_overflows_changes_nothing(tiny_original):
    small = load_model(tiny_original, device="cpu", dtype="float32", max_context=400)
    session = Session(small, SamplingParams(max_new_tokens=8), system_message="Be brief.")
    final_event(session.ask("Hi."))
    state = (list(session.ids), session.start_pos, session.system_message)
    with pytest.raises(ContextOverflowError):
        session.set_system("A much longer system message. " * 40)
    assert (session.ids, session.start_pos, session.system_message) == state
    session.set_system("Be very brief.")  # fits: re-prefilled under the new message
    assert session.system_message == "Be very brief."
    assert session.ids == session.conversation_ids(session.turns)


def test_media_tokens_counts_labels_of_several_images(loaded, media_dir):
    session = Session(loaded, _params())
    images = [session.describe_image(media_dir / "small.png"), session.describe_image(media_dir / "small.png")]
    with_media = session._turn_ids("Compare.", images)
    without = session._turn_ids("Compare.", [])
    assert session.media_tokens(images) == len(with_media) - len(without) > 2 * 258


# --- sessions that travel -------------------------------------------------------------------------


def test_media_paths_are_saved_absolute_and_found_again_after_a_move(loaded, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "pics").mkdir(parents=True)
    Image.fromarray(textured_rgb(448, 448, seed=11)).save(project / "pics" / "cat.png")
    monkeypatch.chdir(project)
    session = Session(loaded, _params())
    final_event(session.ask("What is this?", [session.describe_image(Path("pics/cat.png"))]))  # a relative path
    session.save(project / "chat.json")
    media = json.loads((project / "chat.json").read_text())["messages"][0]["media"][0]
    assert media["path"] == str(project / "pics" / "cat.png") and media["relative_path"] == "pics/cat.png"

    # the folder travels (another machine, another name); the old place is gone
    moved = tmp_path / "elsewhere" / "copy"
    moved.parent.mkdir()
    (project).rename(moved)
    monkeypatch.chdir(tmp_path)
    restored = Session(loaded, _params())
    restored.load(moved / "chat.json")
    assert restored.turns[0].media[0].path == moved / "pics" / "cat.png"
    assert restored.ids == session.ids

    # a session file beside its pictures, saved with paths that exist nowhere now
    data = json.loads((moved / "chat.json").read_text())
    data["messages"][0]["media"][0].update(path="/gone/cat.png", relative_path=None)
    (moved / "pics" / "beside.json").write_text(json.dumps(data))
    again = Session(loaded, _params())
    again.load(moved / "pics" / "beside.json")
    assert again.turns[0].media[0].path == moved / "pics" / "cat.png"

    (moved / "pics" / "cat.png").unlink()  # really gone: only now "has vanished"
    with pytest.raises(MediaError, match=r"/gone/cat\.png has vanished"):
        Session(loaded, _params()).load(moved / "pics" / "beside.json")


def test_save_replaces_a_symlink_and_errors_name_the_users_path(loaded, tmp_path, monkeypatch):
    session = Session(loaded, _params())
    final_event(session.ask("Hi."))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "chat.json"
    link.symlink_to(victim)
    session.save(link)
    assert victim.read_text() == "precious" and not link.is_symlink()

    def refuse(*_):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".chat.json.abc.tmp"))

    monkeypatch.setattr("os.replace", refuse)
    with pytest.raises(OSError) as err:
        session.save(tmp_path / "chat.json")
    assert err.value.filename == str(tmp_path / "chat.json")  # never the temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "victim.txt"]  # no temporary file left


def test_answers_never_hold_image_placeholders(tiny_original):
    """The sampler of every turn bans <img>, </img> and <IMG_CONTEXT>: one in an answer would take a
    picture's feature slot at the next turn's prefill (and the session file would be refused)."""
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=512)
    special = loaded.special
    text = loaded.model.language_model
    with torch.no_grad():
        # the final norm keeps only channel 0, and only two image placeholders read it, with
        # opposite signs and huge weights: one of them is the model's favourite at every step
        text.model.norm.weight.zero_()[0] = 1.0
        text.lm_head.weight[special.img_context, 0] = 1e4
        text.lm_head.weight[special.img_end, 0] = -1e4
    session = Session(loaded, SamplingParams(max_new_tokens=6))
    logits = loaded.model.forward(session._turn_ids("Hi", []), 0)
    assert int(logits.argmax()) in (special.img_context, special.img_end)  # unbanned, it would be picked
    events = list(session.ask("Hi"))
    answer = session.turns[-1].answer_ids
    assert answer and not {special.img_start, special.img_end, special.img_context} & set(answer), answer
    assert events[-1]["finish_reason"] in ("stop", "length")


def test_answers_never_open_a_turn_so_a_saved_session_loads_back_as_it_was(tiny_original, tmp_path):
    """The sampler bans <|im_start|> too: /load does not replay answer ids holding it (they would open
    a hidden turn) but tokenizes the answer's text again, so a model that wrote one got back another
    conversation (and one that had filled the context was refused as over it). Found by the session
    fuzz (seeds 25, 66 and 90 of 150)."""
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=512)
    im_start = loaded.special.im_start
    text = loaded.model.language_model
    with torch.no_grad():  # <|im_start|> the model's favourite at every step, as in the test above
        text.model.norm.weight.zero_()[0] = 1.0
        text.lm_head.weight[im_start, 0] = 1e4
    session = Session(loaded, SamplingParams(max_new_tokens=6))
    assert int(loaded.model.forward(session._turn_ids("Hi", []), 0).argmax()) == im_start  # unbanned, it would be picked
    final_event(session.ask("Hi"))
    assert im_start not in session.turns[-1].answer_ids
    session.save(tmp_path / "chat.json")
    again = Session(loaded, SamplingParams(max_new_tokens=6))
    again.load(tmp_path / "chat.json")
    assert again.ids == session.ids


def test_sent_media_keep_their_features_and_free_their_pixels(loaded, media_dir, tmp_path, monkeypatch):
    """The decoded pixels of every picture and video sent were held for the whole session (float32:
    ~31 MB for a 13-tile picture, ~600 MB for a 256-frame video), though once a turn keeps their
    features nothing reads them again: a retry, /system and a load's replay use the features."""
    from internvl_chat.chat import session as session_module

    session = Session(loaded, _params(3))
    picture, clip = session.describe_image(media_dir / "scene.png"), session.describe_video(media_dir / "clip.mp4", frames=2)
    final_event(session.ask("Look.", [picture, clip]))
    final_event(session.ask("And now?"))
    assert session.turns[0].features.shape[0] == 13 + 2
    assert [m.pixel_values is None for t in session.turns for m in t.media] == [True, True]
    refuse = lambda *a, **k: pytest.fail("decoded again")  # noqa: E731
    monkeypatch.setattr(session_module, "load_image", refuse)
    monkeypatch.setattr(session_module, "load_video", refuse)
    session.undo()
    assert final_event(session.retry())["finish_reason"] is not None  # its cached prompt: one token fed again
    session._cached_prompt_end = lambda turn: None  # the retry that prefills the prompt again
    assert final_event(session.retry())["finish_reason"] is not None
    del session._cached_prompt_end
    session.set_system("Answer briefly.")  # the whole conversation prefilled again
    assert session.turns[0].features.shape[0] == 13 + 2 and picture.pixel_values is None
    session.save(tmp_path / "chat.json")
    monkeypatch.undo()

    other = Session(loaded, _params(3))
    other.load(tmp_path / "chat.json")  # decoded once for the replay, then freed
    assert other.turns[0].features.shape[0] == 13 + 2
    assert [m.pixel_values is None for m in other.turns[0].media] == [True, True]


def test_each_turn_read_again_keeps_only_its_own_features(loaded, media_dir, tmp_path):
    """A load (or /system) encodes all media at once; each turn kept a view of that one tensor, so
    the features of a turn taken off by /undo stayed in memory while any other picture's turn stayed."""
    session = Session(loaded, _params(3))
    final_event(session.ask("Look.", [session.describe_image(media_dir / "scene.png")]))
    final_event(session.ask("And this?", [session.describe_video(media_dir / "clip.mp4", frames=2)]))
    session.save(tmp_path / "chat.json")
    for replay in (lambda: session.load(tmp_path / "chat.json"), lambda: session.set_system("Answer briefly.")):
        replay()
        for turn, tiles in zip(session.turns, (13, 2)):
            assert turn.features.shape[0] == tiles
            held = turn.features.untyped_storage().nbytes()
            assert held == turn.features.numel() * turn.features.element_size()


def test_a_turn_makes_no_tensor_of_the_whole_conversation_without_a_repetition_penalty(loaded, monkeypatch):
    """Every turn turned all the conversation's ids into a tensor for the repetition penalty, even
    with the penalty off (1.0, the default), where the sampler never reads them."""
    session = Session(loaded, _params(8))
    for text in ("A first question, long enough to make the conversation longer than one turn.", "Another.", "More."):
        final_event(session.ask(text))
    made = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)

        def counting(data, *args, _real=real, **kwargs):
            made.append(len(data) if isinstance(data, (list, tuple)) else 1)
            return _real(data, *args, **kwargs)

        monkeypatch.setattr(torch, name, counting)
    before = len(session.ids)
    final_event(session.ask("Last."))
    monkeypatch.undo()
    turn = session.turns[-1]
    prompt = turn.ids_before - turn.pos_before + len(turn.prompt_ids)  # what this turn prefilled
    assert before > 3 * prompt and max(made) <= prompt


def test_the_context_budget_tokenizes_no_more_for_more_text_turns(loaded, monkeypatch):
    """/context tokenized a template twice for every turn, pictures or not: ten texts a turn, 1,661
    at 160 turns; now only a turn with media is measured so."""
    session = Session(loaded, _params(2))
    tokenizer = session.builder.tokenizer
    counts = []
    for turns in (2, 6):
        while len(session.turns) < turns:
            final_event(session.ask(f"Question {len(session.turns)}."))
        encoded = []
        monkeypatch.setattr(tokenizer, "encode", lambda text, _real=tokenizer.encode: encoded.append(text) or _real(text))
        items = session.context_items([])
        monkeypatch.undo()
        assert len(items) == turns + 3
        counts.append(len(encoded))
    assert counts[0] == counts[1]


def test_media_that_changed_after_attaching_fails_the_same_way_when_resent(loaded, media_dir, tmp_path):
    # the UI keeps attachments after a failed send; the second send must not trust the bad pixels
    path = tmp_path / "photo.png"
    path.write_bytes((media_dir / "small.png").read_bytes())
    session = Session(loaded, _params(3))
    media = session.describe_image(path)  # 1 tile
    path.write_bytes((media_dir / "scene.png").read_bytes())  # replaced before sending: 13 tiles
    for _ in range(2):
        with pytest.raises(MediaError, match="photo.png changed after it was attached: it gave 13 tiles, expected 1; attach it again"):
            final_event(session.ask("What is this?", [media]))
    assert (session.ids, session.start_pos, session.turns) == ([], 0, [])
    assert media.pixel_values is None and media.size == (448, 448)


def test_a_session_file_listing_a_video_before_an_image_loads_in_prompt_order(loaded, media_dir, tmp_path):
    # the template puts images before videos; the features of a loaded turn must follow that order
    session = Session(loaded, _params(4))
    video, image = session.describe_video(media_dir / "clip.mp4", frames=2), session.describe_image(media_dir / "small.png")
    final_event(session.ask("Look.", [video, image]))
    data = session.to_json(path=tmp_path / "chat.json")
    assert [m["kind"] for m in data["messages"][0]["media"]] == ["image", "video"]
    data["messages"][0]["media"].reverse()  # written by hand, or by another tool
    (tmp_path / "chat.json").write_text(json.dumps(data))
    restored = Session(loaded, _params(4))
    restored.load(tmp_path / "chat.json")
    assert restored.ids == session.ids
    assert [m.kind for m in restored.turns[0].media] == ["image", "video"]
    follow = session.builder.next_turn("Next?", [])
    expected = loaded.model.forward(session.ids[session.start_pos :] + follow, session.start_pos)
    got = loaded.model.forward(restored.ids[restored.start_pos :] + follow, restored.start_pos)
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()


def test_a_retry_whose_restore_also_fails_leaves_the_conversation_without_the_last_turn(loaded, media_dir, monkeypatch):
    # the failed retry's new answer and the re-prefill of the old one both fail (e.g. out of memory twice)
    session = Session(loaded, _params(3))
    final_event(session.ask("First."))
    after_first = (list(session.ids), session.start_pos)
    final_event(session.ask("Second.", [session.describe_image(media_dir / "small.png")]))

    def fail(*_a, **_k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(loaded.model, "forward", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        final_event(session.retry())
    monkeypatch.undo()
    # as the app says: the last question and its answer were removed; nothing stale is left to prefill
    assert (session.ids, session.start_pos, len(session.turns)) == (*after_first, 1)
    follow = final_event(session.ask("Third?"))
    fresh = Session(loaded, _params(3))
    final_event(fresh.ask("First."))
    assert final_event(fresh.ask("Third?"))["token_ids"] == follow["token_ids"]


CPU_OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8")


@pytest.mark.parametrize("error, at_call", [(MemoryError(), 1), (CPU_OOM, 3), (torch.OutOfMemoryError("CUDA out of memory"), 2)])
def test_running_out_of_memory_in_a_turn_is_one_error_and_the_turn_can_be_asked_again(loaded, media_dir, monkeypatch,
                                                                                      error, at_call):  # fmt: skip
    session = Session(loaded, _params(4))
    final_event(session.ask("First."))
    before = (list(session.ids), session.start_pos, len(session.turns))
    image = session.describe_image(media_dir / "small.png")
    fail_once(monkeypatch, loaded.model, "forward", error, at_call)  # prefill, or a decode step
    with pytest.raises(GenerationError, match="out of memory during generation"):
        final_event(session.ask("What is this?", [image]))
    assert (session.ids, session.start_pos, len(session.turns)) == before
    fail_once(monkeypatch, loaded.model, "encode_images", error)  # the vision encoder
    with pytest.raises(GenerationError, match="out of memory in the vision encoder"):
        final_event(session.ask("What is this?", [image]))
    assert (session.ids, session.start_pos, len(session.turns)) == before
    monkeypatch.undo()
    answer = final_event(session.ask("What is this?", [image]))["token_ids"]
    fresh = Session(loaded, _params(4))
    final_event(fresh.ask("First."))
    again = final_event(fresh.ask("What is this?", [fresh.describe_image(media_dir / "small.png")]))
    assert again["token_ids"] == answer
    fail_once(monkeypatch, loaded.model, "forward", error)  # /system prefills the conversation again
    with pytest.raises(GenerationError, match="out of memory reading the .* conversation again, so it was cleared"):
        session.set_system("Be brief.")
    assert (session.ids, session.start_pos, session.turns) == ([], 0, [])


def test_an_answer_abandoned_mid_stream_leaves_no_trace_in_the_next_answer(loaded):
    # the consumer stops reading (generator closed, or an exception in the consumer drops it)
    session = Session(loaded, SamplingParams(max_new_tokens=8, stop_ids=()))
    final_event(session.ask("First."))
    before = (list(session.ids), session.start_pos, len(session.turns))
    events = session.ask("Tell me a long story.")
    next(events), next(events)
    events.close()
    assert (session.ids, session.start_pos, len(session.turns)) == before
    answer = final_event(session.ask("Second."))["token_ids"]
    fresh = Session(loaded, SamplingParams(max_new_tokens=8, stop_ids=()))
    final_event(fresh.ask("First."))
    assert final_event(fresh.ask("Second."))["token_ids"] == answer


def test_a_turn_that_overflowed_to_nan_leaves_no_nan_in_the_cache(loaded, monkeypatch):
    # A half-precision overflow makes the turn's keys and values NaN and fails it with non-finite
    # logits. The masked decode step (CUDA graphs) reads a whole bucket past its position with the
    # tail masked out, where 0 × NaN is NaN: NaN left there would fail every later turn.
    session = Session(loaded, _params(4))
    final_event(session.ask("Remember forty-two."))
    model, lm = loaded.model, loaded.model.language_model
    forward = model.forward

    def overflowing(ids, start_pos, *args, **kw):
        logits = forward(ids, start_pos, *args, **kw)
        for k, v in lm.caches():
            k[:, :, start_pos:].fill_(float("nan"))
            v[:, :, start_pos:].fill_(float("nan"))
        return logits * float("nan")

    monkeypatch.setattr(model, "forward", overflowing)
    with pytest.raises(GenerationError, match="non-finite"):
        final_event(session.ask("Which number?"))
    monkeypatch.undo()
    with torch.inference_mode():
        logits = lm.decode_masked(torch.tensor([5]), torch.tensor([session.start_pos]), lm.max_seq_len)
    assert torch.isfinite(logits).all()
    answer = final_event(session.ask("Which number?"))["token_ids"]
    fresh = Session(loaded, _params(4))
    final_event(fresh.ask("Remember forty-two."))
    assert final_event(fresh.ask("Which number?"))["token_ids"] == answer


def test_a_conversation_saved_empty_loads_back_empty(loaded, tmp_path):
    # /save of an empty conversation is allowed (with a warning); loading that file prefilled
    # nothing and failed with an IndexError (found by tests/test_session_fuzz.py)
    path = Session(loaded, _params(3), system_message="Be brief.").save(tmp_path / "empty.json")
    session = Session(loaded, _params(3))
    final_event(session.ask("Hello there."))
    session.load(path)
    assert (session.ids, session.start_pos, session.turns, session.system_message) == ([], 0, [], "Be brief.")
    answer = final_event(session.ask("Hi."))["token_ids"]
    fresh = Session(loaded, _params(3), system_message="Be brief.")
    assert final_event(fresh.ask("Hi."))["token_ids"] == answer


@pytest.mark.parametrize("error", [MemoryError(), CPU_OOM, torch.OutOfMemoryError("CUDA out of memory")])
def test_running_out_of_memory_again_while_putting_back_a_failed_retrys_answer_is_one_error(loaded, monkeypatch, error):
    # a retry that runs out of memory puts the old answer back by prefilling it again, which needs
    # more memory than the decode step that failed: that failure escaped as a raw MemoryError or
    # RuntimeError (a traceback in the REPL) (found by tests/test_session_fuzz.py)
    session = Session(loaded, _params(3))
    final_event(session.ask("First."))
    after_first = (list(session.ids), session.start_pos)
    final_event(session.ask("Second."))
    forward, calls = loaded.model.forward, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) in (2, 3):  # a decode step of the new answer, then the prefill that restores the old
            raise error
        return forward(*a, **k)

    monkeypatch.setattr(loaded.model, "forward", failing)
    with pytest.raises(GenerationError, match=r"^out of memory putting the last answer back; use fewer tiles or frames"):
        final_event(session.retry())
    monkeypatch.undo()
    assert (session.ids, session.start_pos, len(session.turns)) == (*after_first, 1)  # as the app then says
    answer = final_event(session.ask("Third?"))["token_ids"]
    fresh = Session(loaded, _params(3))
    final_event(fresh.ask("First."))
    assert final_event(fresh.ask("Third?"))["token_ids"] == answer


def test_a_saved_conversation_over_a_smaller_context_is_refused_with_its_exact_size(loaded, tiny_original, media_dir,
                                                                                    tmp_path):  # fmt: skip
    """A session saved near the edge of a larger context and loaded with a smaller one: the refusal
    says how many tokens it needs, so the next --max-context is the one that works. It once gave
    only the cheap bound below that (its picture's image tokens and its texts' fewest tokens,
    "needs more than 4,356 tokens" for a conversation of 4,626), and a --max-context between the two
    was refused again."""
    session = Session(loaded, _params())
    _three_turns(session, media_dir)
    session.save(tmp_path / "chat.json")
    need = len(session.ids)
    small = load_model(tiny_original, device="cpu", dtype="float32", max_context=need // 2)
    with pytest.raises(ContextOverflowError, match=f"needs {need:,} tokens, over the {need // 2:,}-token context"):
        Session(small, _params()).load(tmp_path / "chat.json")
    just = load_model(tiny_original, device="cpu", dtype="float32", max_context=need)
    fits = Session(just, _params())
    fits.load(tmp_path / "chat.json")
    assert fits.ids == session.ids


def test_a_turn_refused_at_the_edge_of_a_long_conversation_advises_what_makes_room(tiny_original, media_dir):
    """Near the context's end no shorter message and no fewer attachments fit: the refusal once
    advised "send a shorter message" (or "use fewer tiles or frames" as a picture was attached) and
    "a smaller max_new_tokens" where neither could, and left out /undo. It now names what frees the
    room: /undo or /clear (and a smaller answer where that alone fits)."""
    small = load_model(tiny_original, device="cpu", dtype="float32", max_context=512)
    session = Session(small, _params(2))
    final_event(session.ask("Describe the picture.", [session.describe_image(media_dir / "scene.png", max_tiles=1)]))
    while True:  # fill it, two tokens an answer
        try:
            final_event(session.ask("Hi."))
        except ContextOverflowError as e:
            refused_hi = str(e)
            break
    assert refused_hi.endswith("; /undo or /clear, or a larger --max-context"), refused_hi
    assert len(session.ids) + session.turn_tokens([]) + 1 + 2 > 512  # no message fits any more (a token at least)
    with pytest.raises(ContextOverflowError) as refused:
        final_event(session.ask("And now?"))
    message = str(refused.value)
    assert message.endswith("; /undo or /clear, or a larger --max-context"), message
    with pytest.raises(ContextOverflowError) as refused:
        session.check_attach([session.describe_image(media_dir / "scene.png", max_tiles=1)])
    assert "tiles or frames" not in str(refused.value) and "/undo or /clear" in str(refused.value), str(refused.value)
    session.undo()
    session.undo()  # room again for a question and its answer
    final_event(session.ask("And now?"))


def test_a_load_tokenizes_the_saved_conversation_once(loaded, media_dir, tmp_path, monkeypatch):
    """read_saved counts the conversation exactly (before the REPL asks to replace this one), and
    the replay counted it all again: every text of a long session tokenized twice per /load."""
    session = Session(loaded, _params())
    _three_turns(session, media_dir)
    session.save(tmp_path / "chat.json")
    calls = []
    real = Session.conversation_ids
    monkeypatch.setattr(Session, "conversation_ids", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    fresh = Session(loaded, _params())
    fresh.load(tmp_path / "chat.json")
    assert fresh.ids == session.ids and len(calls) == 1


def test_the_exact_size_of_a_refused_saved_conversation_is_not_counted_from_millions_of_ids(loaded, tiny_original,
                                                                                           media_dir, tmp_path):  # fmt: skip
    """The refusal's exact count (`_saved_tokens`) was bounded by the texts' length only: a file
    whose answer holds hundreds of thousands of ids behind a short text had them all decoded, only
    to say the size of a conversation that is refused anyway. It says the bound then."""
    session = Session(loaded, _params())
    _three_turns(session, media_dir)
    path = session.save(tmp_path / "chat.json")
    data = json.loads(path.read_text())
    data["messages"][-1]["token_ids"] = [data["messages"][-1]["token_ids"][0]] * 300_000
    path.write_text(json.dumps(data))
    small = Session(load_model(tiny_original, device="cpu", dtype="float32", max_context=len(session.ids) // 2), _params())
    decoded = []
    real = small.tokenizer.decode
    small.tokenizer.decode = lambda ids, *a, **k: decoded.append(len(ids)) or real(ids, *a, **k)
    with pytest.raises(ContextOverflowError, match=r"needs more than [\d,]+ tokens, over the"):
        small.read_saved(path)
    assert max(decoded, default=0) < 300_000, decoded
