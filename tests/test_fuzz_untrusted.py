"""A deterministic mutation fuzz of the readers of untrusted text: session files, the settings
file, scripts, and what a remote server sends (its model list, event streams and their chunks,
error bodies, a whole answer in place of a stream). tests/fuzz_helpers.py says how mutants are
made and what each must do: read as valid, or be refused in one line of the project's error type.

Each reader starts from a valid file the other tests make, cut at every structural boundary and
then mutated with fixed seeds, so a failure names the mutant and reproduces everywhere.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from fuzz_helpers import DEEP, DEEP_MARK, Findings, byte_mutants, json_boundaries, json_text, spread, tree_mutants
from remote_helpers import fixture
from test_session_file import FORBIDDEN, VOCAB, valid_session

from internvl_chat.chat.remote_stream import _parse_event
from internvl_chat.chat.sampling import params_from_settings
from internvl_chat.chat.session_file import media_candidates, read_session_file, session_json
from internvl_chat.chat.sse import SSEDecoder
from internvl_chat.settings import Settings, format_settings, load_settings
from internvl_chat.ui.saved_sessions import RESTORED_SETTINGS
from internvl_chat.ui.script import _read_script, read_entries

SEEDS = (1,)  # more seeds, or INTERNVL_FUZZ_SCALE, for a longer hunt

# ------------------------------------------------------------------ session files


def _use_session(path: Path) -> None:
    """What /load does with a file it read: its settings tried on a copy, its media looked for."""
    saved = read_session_file(path, VOCAB, FORBIDDEN)
    trial = Settings()
    for key in RESTORED_SETTINGS:
        section, name = key.split(".")
        table = saved.settings.get(section, {})
        if name in table:
            trial.set(key, table[name], source=f"session {path}")
    params_from_settings(trial)
    for turn in saved.turns:
        for media in turn.media:
            for candidate in media_candidates(media, path):
                os.path.lexists(candidate)


@pytest.mark.parametrize("seed", SEEDS)
def test_session_file_byte_mutants(tmp_path, seed, capfd):
    good = session_json(valid_session()).encode()
    findings = Findings("session file (bytes)", capfd)
    path = tmp_path / "chat.json"
    cuts = json_boundaries(good)[::3] if seed == SEEDS[0] else []
    for label, data in byte_mutants(good, seed, 200, cuts):
        path.write_bytes(data)
        findings.check(label, lambda: _use_session(path))
    findings.assert_none()


@pytest.mark.parametrize("seed", SEEDS)
def test_session_file_field_mutants(tmp_path, seed, capfd):
    findings = Findings("session file (fields)", capfd)
    path = tmp_path / "chat.json"
    for label, tree in tree_mutants(valid_session(), seed, 300):
        path.write_text(json_text(tree), encoding="utf-8", errors="surrogatepass")
        findings.check(label, lambda: _use_session(path))
    findings.assert_none()


# ------------------------------------------------------------------ the settings file


def _toml_value(value) -> str:
    if value == DEEP_MARK:
        return "[" * DEEP + "]" * DEEP
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, but for a lone surrogate (then not TOML: refused)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(value)


def _toml(tree) -> str:
    """A settings tree as a TOML file (None values are left out: TOML has no null)."""
    if not isinstance(tree, dict):
        return f"x = {_toml_value(tree)}\n"
    lines = []
    for section, table in tree.items():
        if not isinstance(table, dict):
            if table is not None:
                lines.insert(0, f"{json.dumps(section)} = {_toml_value(table)}")
            continue
        lines.append(f"[{json.dumps(section)}]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def _use_settings(path: Path) -> None:
    settings = load_settings(path, env={})
    params_from_settings(settings)
    format_settings(settings)  # --print-config


def _settings_seed() -> dict:
    tree = Settings().to_dict()
    tree["generation"]["seed"] = 7
    tree["media"]["max_tiles"] = 6
    tree["system"]["message"] = "Be brief."
    tree["serve"]["allow_origins"] = ["http://localhost:3000"]
    return tree


@pytest.mark.parametrize("seed", SEEDS)
def test_settings_file_byte_mutants(tmp_path, seed, capfd):
    good = _toml(_settings_seed()).encode()
    path = tmp_path / "config.toml"
    path.write_bytes(good)
    _use_settings(path)  # the seed itself is valid
    findings = Findings("settings file (bytes)", capfd)
    cuts = [i for i, b in enumerate(good) if b in b"\n=[]\"."] if seed == SEEDS[0] else []
    for label, data in byte_mutants(good, seed, 100, cuts[::4]):
        path.write_bytes(data)
        findings.check(label, lambda: _use_settings(path))
    findings.assert_none()


@pytest.mark.parametrize("seed", SEEDS)
def test_settings_file_field_mutants(tmp_path, seed, capfd):
    findings = Findings("settings file (fields)", capfd)
    path = tmp_path / "config.toml"
    for label, tree in tree_mutants(_settings_seed(), seed, 150):
        path.write_text(_toml(tree), encoding="utf-8", errors="surrogatepass")
        findings.check(label, lambda: _use_settings(path))
    findings.assert_none()


# ------------------------------------------------------------------ scripts

SCRIPT = (
    '# a script\n/system Be brief.\n/image "cat.png"\nWhat is this?\n"""\nA block\nof lines\n"""\n'
    "/set temperature 0.7\n/save chat.json\n/exit\n"
).encode()


@pytest.mark.parametrize("seed", SEEDS)
def test_script_byte_mutants(tmp_path, seed, capfd):
    findings = Findings("script", capfd)
    path = tmp_path / "script.txt"
    for label, data in byte_mutants(SCRIPT, seed, 400, list(range(len(SCRIPT))) if seed == SEEDS[0] else []):
        path.write_bytes(data)
        findings.check(label, lambda: list(read_entries(_read_script(str(path)))))
    findings.assert_none()


# ------------------------------------------------------------------ a remote server's event stream


def _stream_chunks(body: bytes, piece: int) -> list[dict]:
    """The chunks remote_stream makes of a body read in pieces of `piece` bytes."""
    decoder = SSEDecoder()
    chunks = []
    events = [e for start in range(0, len(body), piece) for e in decoder.feed(body[start : start + piece])]
    for event in events + decoder.finish():
        chunk = _parse_event(event.event, event.data)
        if chunk is None:
            break
        chunks.append(chunk)
    return chunks


@pytest.mark.parametrize("name", ["vllm/stream.sse", "llamacpp/stream.sse", "lmdeploy/stream_error.sse"])
def test_event_stream_byte_mutants(name, capfd):
    good = fixture(name)
    findings = Findings(f"event stream {name}", capfd)
    cuts = [i for i, b in enumerate(good) if b in b"\n:{}"][::2]
    for index, (label, data) in enumerate(byte_mutants(good, 3, 300, cuts)):
        findings.check(label, lambda: _stream_chunks(data, 1 + index % 7 * 9))
    findings.assert_none()


def _sse(chunks: list) -> bytes:
    return b"".join(b"data: " + json_text(c).encode("utf-8", "surrogatepass") + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _seed_chunks(name: str) -> list:
    body = fixture(name).decode()
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]


def _answer_and_save(conv, folder: Path) -> None:
    """One answer taken whole, as the app takes it, then saved and read back (/save, /load)."""
    conv.turns.clear()
    for _ in conv.ask("What is this?"):
        pass
    conv.context_used  # /context
    path = conv.save(folder / "remote.json")
    conv.load(path)


@pytest.mark.parametrize("name", ["vllm/stream.sse", "llamacpp/stream.sse"])
def test_stream_chunk_field_mutants(tmp_path, name, capfd):
    """Each chunk's fields mutated, through the app as a user meets them: the answer shown (on a
    terminal, as Markdown), its numbers in /stats and /context, the prompt in /show, /save and /load."""
    from io import StringIO

    from remote_helpers import FakeServer, Reply
    from rich.console import Console

    from internvl_chat.chat.remote import RemoteConversation
    from internvl_chat.chat.sampling import SamplingParams
    from internvl_chat.ui.app import ERROR, OK, App

    chunks = _seed_chunks(name)
    findings = Findings(f"stream chunks {name}", capfd)
    models = fixture(name.split("/")[0] + "/models.json")
    with FakeServer(models=models) as server:
        conv = RemoteConversation.connect(server.url, timeout=30, params=SamplingParams(max_new_tokens=64))
        out = StringIO()
        console = Console(file=out, width=80, color_system="truecolor", force_terminal=True, force_interactive=False)
        app = App(conv, load_settings(os.devnull, env={}), console, cwd=tmp_path)

        def answer() -> None:
            conv.turns.clear()
            assert app.handle_line("What is this?") in (OK, ERROR)
            for line in ("/stats", "/context", "/show", "/save remote.json --force", "/load remote.json"):
                assert app.handle_line(line) in (OK, ERROR), line
            out.truncate(0), out.seek(0)

        for label, tree in tree_mutants(chunks, 5, 50):
            server.chat(Reply.sse(_sse(tree)))
            findings.check(label, answer, refusals=())
        conv.close()
    findings.assert_none()


@pytest.mark.parametrize("name", ["vllm/models.json", "llamacpp/models.json"])
def test_model_list_mutants(name, capfd):
    from remote_helpers import FakeServer

    from internvl_chat.chat.remote import RemoteConversation

    good = fixture(name)
    findings = Findings(f"model list {name}", capfd)
    mutants = list(tree_mutants(json.loads(good), 6, 30))
    mutants += [(label, data) for label, data in byte_mutants(good, 6, 10, spread(json_boundaries(good), 10))]

    def connect(server: FakeServer) -> None:
        conv = RemoteConversation.connect(server.url, timeout=30)
        conv.describe()
        conv.close()

    with FakeServer() as server:
        for label, mutant in mutants:
            server.models = mutant if isinstance(mutant, bytes) else json_text(mutant).encode("utf-8", "surrogatepass")
            findings.check(label, lambda: connect(server))
    findings.assert_none()


WHOLE_ANSWER = {  # a chat.completion, as a server that ignores stream=true sends it
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1764590010, "model": "OpenGVLab/InternVL3-8B",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "A red circle."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1843, "completion_tokens": 5, "total_tokens": 1848},
}  # fmt: skip


@pytest.mark.parametrize(("name", "status"), [
    ("whole answer", 200), ("vllm/error_flat.json", 404), ("llamacpp/error_nested.json", 400), ("lmdeploy/error_flat.json", 500),
])  # fmt: skip
def test_error_and_whole_answer_body_mutants(tmp_path, capfd, name, status):
    """A refusal's JSON body (each server's error shape), or a whole answer instead of a stream."""
    from remote_helpers import FakeServer, Reply

    from internvl_chat.chat.remote import RemoteConversation
    from internvl_chat.chat.sampling import SamplingParams

    good = json.dumps(WHOLE_ANSWER).encode() if status == 200 else fixture(name)
    mutants = [*tree_mutants(json.loads(good), 40, 12), *byte_mutants(good, 40, 3, spread(json_boundaries(good), 4))]
    findings = Findings(f"answer body {name}", capfd)
    with FakeServer(models=fixture("vllm/models.json")) as server:
        conv = RemoteConversation.connect(server.url, timeout=30, params=SamplingParams(max_new_tokens=64))
        for label, mutant in mutants:
            body = mutant if isinstance(mutant, bytes) else json_text(mutant).encode("utf-8", "surrogatepass")
            server.chat(Reply.json(body, status=status))
            findings.check(label, lambda: _answer_and_save(conv, tmp_path))
        conv.close()
    findings.assert_none()


@pytest.mark.parametrize("name", ["vllm/stream.sse", "llamacpp/stream.sse", "lmdeploy/stream_error.sse"])
def test_event_stream_byte_mutants_through_a_conversation(tmp_path, name, capfd):
    """Fewer than the decoder's own fuzz: each goes over HTTP, in pieces that split lines and characters."""
    from remote_helpers import FakeServer, Reply

    from internvl_chat.chat.remote import RemoteConversation
    from internvl_chat.chat.sampling import SamplingParams

    good = fixture(name)
    findings = Findings(f"event stream {name} (conversation)", capfd)
    with FakeServer(models=fixture("vllm/models.json")) as server:
        conv = RemoteConversation.connect(server.url, timeout=30, params=SamplingParams(max_new_tokens=64))
        for index, (label, data) in enumerate(byte_mutants(good, 7, 30)):
            server.chat(Reply.sse(data, piece_size=[0, 1, 7, 64][index % 4]))
            findings.check(label, lambda: _answer_and_save(conv, tmp_path))
        conv.close()
    findings.assert_none()
