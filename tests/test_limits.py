"""Limits, budgets and numerics end to end: a conversation that fills the context, sampling values
at their extremes (flags, settings and the server's request body), and a model's own positions."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from internvl_chat.chat.sampling import Sampler, SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.engine.loader import load_model
from internvl_chat.errors import ContextOverflowError, UsageError
from internvl_chat.settings import load_settings
from internvl_chat.ui.app import ERROR, OK
from internvl_chat.ui.setup import load_for_settings
from serve_support import RunningServer
from app_helpers import make_app as _make_app
from app_helpers import output

make_app = functools.partial(_make_app, width=300, max_new_tokens=None)

CONTEXT = 256


@pytest.fixture(scope="module")
def small(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT)


def _filling_question(loaded, answer_room: int) -> str:
    """A first question that leaves exactly `answer_room` tokens of the context for its answer."""
    probe = Session(loaded, SamplingParams())
    target = loaded.model.max_seq_len - answer_room
    for n in range(1, target):
        for text in ("x" * n, "x" * n + "."):
            length = len(probe._turn_ids(text, []))
            if length == target:
                return text
            if length > target:
                break
    raise AssertionError(f"no question of {target} tokens")


# ---- a conversation that fills the context -----------------------------------------------------


def test_a_conversation_that_filled_the_context_loads_back_and_undo_and_retry_still_work(small, tmp_path):
    # /load (and /system) demanded room for another answer on top of the conversation, so a
    # conversation the app itself had just filled to the last token could not be loaded back with
    # the very settings it was made with, although /undo, /retry and /export all worked on it.
    room = 4
    app, out = make_app(small, tmp_path, **{"generation.max_new_tokens": room})
    assert app.handle_line(_filling_question(small, room)) == OK
    turn = app.session.turns[-1]
    assert turn.finish_reason == "length" and app.session.context_used == CONTEXT  # precondition: it filled it
    assert "the context is full" in output(out)
    assert app.handle_line(f"/save {tmp_path / 'full.json'}") == OK

    other, out2 = make_app(small, tmp_path, **{"generation.max_new_tokens": room})
    assert other.handle_line(f"/load {tmp_path / 'full.json'}") == OK, output(out2)
    said = output(out2)
    assert f"context {CONTEXT}/{CONTEXT}" in said
    assert "warning: the context has no room for another question and its answer; /undo or /clear make room" in said
    assert other.session.turns[-1].answer_ids == turn.answer_ids
    assert other.handle_line("And then?") == ERROR  # refused with the budget's own message, nothing lost
    assert "over the 256-token context" in output(out2) and len(other.session.turns) == 1
    assert other.handle_line("/retry") == OK  # greedy: the same answer, from the same cache
    assert other.session.turns[-1].answer_ids == turn.answer_ids
    assert other.handle_line("/undo") == OK and other.session.context_used == 0


# ---- sampling values at their extremes -----------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324, 1e-6])
def test_a_vanishing_temperature_samples_the_argmax_instead_of_failing_as_non_finite(temperature):
    # logits / 1e-45 overflow float32 to inf: the draw failed with "non-finite logits … half
    # precision", a 500 from the server, for a value the server accepted
    logits = torch.tensor([0.5, 3.0, -2.0, 2.9, 1.0])
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=0.9, top_k=3, seed=0), vocab_size=5, device="cpu")
    assert [sampler.read(sampler.next_token(logits)) for _ in range(3)] == [1, 1, 1]


@pytest.mark.parametrize(
    "field, value",
    [("repetition_penalty", 1e-40), ("repetition_penalty", 0.001), ("repetition_penalty", 101.0), ("temperature", 100.5)],
)
def test_sampling_params_refuse_what_the_settings_refuse(field, value):
    # a repetition penalty of 1e-40 divides the seen logits into inf: refused up front, in the
    # settings' own range, wherever the value comes from (flags, /set, a session file, a request)
    with pytest.raises(UsageError, match=f"{field} must be a number from"):
        SamplingParams(**{field: value}).validate()
    with pytest.raises(UsageError, match=field):
        load_settings(os.devnull, env={}, overrides={f"generation.{field}": value})


@pytest.fixture(scope="module")
def server(tiny_original):
    with RunningServer(tiny_original, max_context=512, slots=1) as running:
        yield running


def _post(server, **fields) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


def test_the_server_answers_a_vanishing_temperature_greedily(server):
    greedy = _post(server, temperature=0)
    assert greedy.status_code == 200
    for temperature in (1e-45, 1e-300):
        r = _post(server, temperature=temperature, seed=1)
        assert r.status_code == 200, r.text  # was 500 generation_failed "non-finite logits"
        assert r.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


@pytest.mark.parametrize("penalty", [1e-40, 0.001, 1e3])
def test_the_server_refuses_a_repetition_penalty_outside_the_apps_range_with_a_400(server, penalty):
    r = _post(server, repetition_penalty=penalty)
    assert r.status_code == 400, r.text  # 1e-40 was a 500: the seen logits divided into inf
    assert r.json()["error"]["param"] == "repetition_penalty"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {"5": 100}}, "logit_bias"),  # the answer silently ignored them
        ({"min_p": 0.5}, "min_p"),
        ({"min_tokens": 8}, "min_tokens"),
        ({"best_of": 3}, "best_of"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"max_tokens": True}, "max_tokens"),  # read as 1: a one-token answer
        ({"temperature": True}, "temperature"),  # read as 1.0
        ({"seed": True}, "seed"),
        ({"top_k": False}, "top_k"),
    ],
)  # fmt: skip
def test_the_server_refuses_sampling_fields_it_would_have_ignored_or_misread(server, fields, param):
    r = _post(server, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_the_server_accepts_those_fields_at_their_neutral_values(server):
    neutral = {"logit_bias": {}, "min_p": 0.0, "min_tokens": 0, "best_of": 1, "use_beam_search": False, "n": 1}
    r = _post(server, **neutral)
    assert r.status_code == 200, r.text


# ---- the model's own positions --------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_model(tiny_original, tmp_path_factory) -> Path:
    """The tiny checkpoint, saying it has only 512 positions."""
    folder = tmp_path_factory.mktemp("limits") / "short"
    shutil.copytree(tiny_original, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["llm_config"]["max_position_embeddings"] = 512
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_the_default_context_fits_a_model_with_fewer_positions_but_an_asked_for_one_is_refused(short_model):
    # the default 8192 refused such a model with "--max-context 8192 exceeds the model's 512
    # positions", naming a flag nobody had given: the app and serve could not start without it
    settings = load_settings(os.devnull, env={}, overrides={"model.path": str(short_model), "model.device": "cpu"})
    assert settings.is_default("model.max_context") and settings.model.max_context == 8192
    assert load_for_settings(settings, show_progress=False).model.max_seq_len == 512
    for source in ({"overrides": {"model.max_context": 8192}}, {"env": {"INTERNVL_CHAT_MODEL_MAX_CONTEXT": "1024"}}):
        asked = load_settings(os.devnull, env=source.get("env", {}),
                              overrides={"model.path": str(short_model), "model.device": "cpu", **source.get("overrides", {})})  # fmt: skip
        with pytest.raises(UsageError, match="exceeds the model's 512 positions; use --max-context 512 or less"):
            load_for_settings(asked, show_progress=False)


def test_at_the_model_s_own_limit_no_message_suggests_a_larger_max_context(short_model, small, tmp_path):
    # "a larger --max-context" was suggested when the context was already the model's own 512
    # positions, a value the loader then refuses (above); below that limit it is still suggested
    at_limit = load_model(short_model, device="cpu", dtype="float32", max_context=512)
    for loaded, suggested in ((at_limit, False), (small, True)):
        session = Session(loaded, SamplingParams(max_new_tokens=4))
        with pytest.raises(ContextOverflowError) as refused:
            list(session.ask("word " * 600))
        with pytest.raises(ContextOverflowError) as long_system:
            list(Session(loaded, SamplingParams(max_new_tokens=4), system_message="be brief. " * 400).ask("Hi."))
        with pytest.raises(ContextOverflowError) as in_model:
            loaded.model.forward([1] * (loaded.model.max_seq_len + 1), 0)
        for error in (refused, long_system, in_model):
            assert ("--max-context" in str(error.value)) is suggested, str(error.value)
        assert str(in_model.value).endswith(", /clear, or a larger --max-context" if suggested else "frames or /clear")
        assert session.describe().more_room == ("a larger --max-context" if suggested else "")
    room = 4
    app, out = make_app(at_limit, tmp_path, **{"generation.max_new_tokens": room})
    assert app.handle_line(_filling_question(at_limit, room)) == OK
    assert "[stopped: the context is full; /undo or /clear make room]" in output(out)


# ---- the KV cache stays clean --------------------------------------------------------------------


def test_the_stop_token_s_overflow_past_a_finished_answer_does_not_outlive_an_undo(small, monkeypatch):
    # The stop token is fed to the model before it is read back: its keys and values land at the
    # end of the finished answer, outside the conversation. A half-precision overflow on that one
    # step left NaN there; after /undo the masked decode step (CUDA graphs), which reads the whole
    # bucket with the tail masked out (0 × NaN = NaN), failed every later answer.
    stop = [e for e in Session(small, SamplingParams(max_new_tokens=4)).ask("Hi.")][-1]["token_ids"][0]  # made a stop id
    session = Session(small, SamplingParams(max_new_tokens=4, stop_ids=(stop,)))
    lm, forward = small.model.language_model, small.model.forward

    def overflow_on_the_stop_token(ids, start_pos, *args, **kw):
        logits = forward(ids, start_pos, *args, **kw)
        if isinstance(ids, torch.Tensor) and ids.numel() == 1 and int(ids) == stop:
            with torch.inference_mode():
                for k, v in lm.caches():
                    k[:, :, start_pos].fill_(float("nan"))
                    v[:, :, start_pos].fill_(float("nan"))
        return logits

    monkeypatch.setattr(small.model, "forward", overflow_on_the_stop_token)
    final = [e for e in session.ask("Hi.")][-1]
    monkeypatch.undo()
    assert final["finish_reason"] == "stop" and final["token_ids"] == []  # precondition: it stopped at once
    session.undo()
    with torch.inference_mode():
        logits = lm.decode_masked(torch.tensor([5]), torch.tensor([session.start_pos]), lm.max_seq_len)
    assert torch.isfinite(logits).all()
