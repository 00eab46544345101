"""The conversation interface: the local Session implements it with the numbers the UI computes today,
and the [remote] settings / flags reach it without leaking the key."""

from __future__ import annotations

import json
import tomllib
import os

import pytest
from PIL import Image

from internvl_chat.chat.conversation import Conversation
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.cli import _overrides, build_parser
from internvl_chat.engine.loader import load_model
from internvl_chat.errors import ContextOverflowError, UsageError
from internvl_chat.settings import format_settings, load_settings
from media_helpers import textured_rgb


@pytest.fixture(scope="module")
def session(tiny_original):
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=2048)
    return Session(loaded, params=SamplingParams(max_new_tokens=8)), None


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    path = tmp_path_factory.mktemp("iface") / "wide.png"
    Image.fromarray(textured_rgb(900, 450, seed=3)).save(path)  # 2×1 + thumbnail = 3 tiles
    return path


def test_session_implements_the_interface_with_exact_numbers(session, wide):
    conv, _ = session
    conv.clear()
    assert isinstance(conv, Conversation) and conv.token_counts_exact
    image = conv.describe_image(wide)
    builder = conv.builder
    for first in (True, False):  # before and after a first turn
        make = builder.first_turn if first else builder.next_turn
        assert conv.turn_tokens([image]) == len(make("", [image.spec]))
        assert conv.turn_tokens([]) == len(make("", []))
        items = conv.context_items([image])
        names = [name for name, _ in items]
        assert names[-3:] == [f"attached: image {wide.name}", "next message: template, plus your text",
                              "reserved for the answer (max_new_tokens)"]  # fmt: skip
        held = sum(tokens for _, tokens in items[:-3])  # system message and the turns so far
        assert held == (conv.context_used or len(builder.first_turn("", [])) - len(builder.user_turn("", [])))
        assert items[-3][1] + items[-2][1] + (0 if conv.ids else held) == conv.turn_tokens([image])
        assert items[-1][1] == conv.params.max_new_tokens
        list(conv.ask("What is it?", [image]))
    info = conv.describe()
    assert (info.name, info.context, info.memory_device) == (conv.loaded.path.name, 2048, "cpu")
    assert info.where == "cpu float32"
    prompt = conv.last_prompt()
    assert prompt.turn == 2 and "<image>" in prompt.text and "768 in all" in prompt.note
    assert conv.turns[-1].answer_tokens == len(conv.turns[-1].answer_ids)


def test_session_check_attach_counts_the_uncached_tail(session, wide):
    conv, _ = session
    conv.clear()
    image = conv.describe_image(wide, max_tiles=12)
    conv.check_attach([image])
    with pytest.raises(ContextOverflowError):
        conv.check_attach([image] * 3)  # 3 × 768 tokens > 2048


# ---- settings and flags --------------------------------------------------------------------------


def test_the_remote_flags_become_settings():
    args = build_parser().parse_args(
        ["--server", "http://gpu:8000/v1", "--api-key", "k", "--remote-model", "m", "--dialect", "vllm", "-p", "hi"]
    )
    settings = load_settings(os.devnull, env={}, overrides=_overrides(args))
    r = settings.remote
    assert (r.server, r.api_key, r.model, r.dialect, r.timeout) == ("http://gpu:8000/v1", "k", "m", "vllm", 300.0)
    assert settings.sources["remote.server"] == "flag"


def test_server_without_a_url_reads_openai_base_url(monkeypatch):
    args = build_parser().parse_args(["--server", "-p", "hi"])
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env-host:1/v1")
    assert _overrides(args)["remote.server"] == "http://env-host:1/v1"
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(UsageError, match="OPENAI_BASE_URL, which is not set"):
        _overrides(args)
    assert _overrides(build_parser().parse_args(["-p", "hi"]))["remote.server"] is None  # local by default


def test_openai_api_key_is_the_fallback_and_the_key_never_shows(tmp_path):
    env = {"HOME": str(tmp_path), "OPENAI_API_KEY": "sk-from-env"}
    settings = load_settings(os.devnull, env=env)
    assert settings.remote.api_key == "sk-from-env" and settings.sources["remote.api_key"] == "env OPENAI_API_KEY"
    config = tmp_path / "c.toml"
    config.write_text('[remote]\napi_key = "sk-from-file"\n')
    assert load_settings(config, env=env).remote.api_key == "sk-from-file"  # the more specific wins
    flagged = load_settings(config, env=env, overrides={"remote.api_key": "sk-flag"})
    assert flagged.remote.api_key == "sk-flag"
    assert "sk-" not in format_settings(flagged) and "# api_key = (set, not shown)" in format_settings(flagged)
    # --print-config's TOML, pasted into a settings file as the README invites, set the key to "***"
    assert "api_key" not in tomllib.loads(format_settings(flagged))["remote"]
    assert "sk-" not in json.dumps(flagged.to_dict())  # what /save writes into a session file
    assert load_settings(os.devnull, env={"HOME": str(tmp_path)}).to_dict()["remote"]["api_key"] == ""


@pytest.mark.parametrize(("key", "value"), [("remote.dialect", "klingon"), ("remote.timeout", "0"), ("remote.timeout", "soon")])
def test_bad_remote_settings_are_one_line(key, value):
    with pytest.raises(UsageError, match=key.replace(".", r"\.")):
        load_settings(os.devnull, env={}, overrides={key: value})


# ---- session files across the two conversations -----------------------------------------------


def _remote_file(path, answers: list[tuple[str, str]], system=None):
    """A session file as RemoteConversation saves it: replies as returned, no token ids."""
    messages = []
    for n, (reply, finish) in enumerate(answers, start=1):
        messages += [{"role": "user", "text": f"Question {n}?", "media": []},
                     {"role": "assistant", "text": reply, "finish_reason": finish, "usage": {"completion_tokens": 3}}]
    path.write_text(json.dumps({"format": "internvl-chat-session", "version": 1, "system_message": system,
                                "backend": {"kind": "remote", "server": "http://h:1/v1", "model": "m", "dialect": "vllm"},
                                "model": "m", "settings": {}, "messages": messages}))  # fmt: skip
    return path


def test_a_remote_session_loads_into_the_local_session_by_tokenizing_its_answers(session, tmp_path):
    conv, _ = session
    conv.clear()
    saved = _remote_file(tmp_path / "r.json", [("A red circle, 2 of them.", "stop"), ("Half an ans", "cancelled")])
    conv.load(saved)
    tok = conv.tokenizer
    first, second = conv.turns
    assert first.answer_ids == tok.encode("A red circle, 2 of them.") and first.answer_text == "A red circle, 2 of them."
    assert second.answer_ids == tok.encode("Half an ans") and second.answer_text == "Half an ans [cancelled]"
    # no system message was sent to the server, so it used the model's own: so does the local session
    assert conv.system_message == conv.loaded.config.system_message
    assert conv.ids == conv.conversation_ids(conv.turns) and conv.start_pos == len(conv.ids)
    list(conv.ask("And now?"))  # the conversation goes on
    assert len(conv.turns) == 3
    # saved again by the local session: a local file, the cancelled mark in the text, ids kept
    data = json.loads(conv.save(tmp_path / "l.json").read_text())
    assert data["backend"] == {"kind": "local"} and data["messages"][3]["text"] == "Half an ans [cancelled]"
    assert data["messages"][1]["token_ids"] == first.answer_ids


def test_a_remote_answer_whose_text_cannot_give_its_tokens_back_is_refused(session, tmp_path):
    conv, _ = session
    conv.clear()
    list(conv.ask("Keep me."))
    before = (list(conv.ids), conv.start_pos, list(conv.turns))
    saved = _remote_file(tmp_path / "r.json", [("fine", "stop"), ("bytes \ufffd lost", "length")])
    with pytest.raises(UsageError) as err:
        conv.load(saved)
    assert str(err.value).startswith("answer 2 in ") and "continue it with --server" in str(err.value)
    assert "\n" not in str(err.value) and (list(conv.ids), conv.start_pos, list(conv.turns)) == before
